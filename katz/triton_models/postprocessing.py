"""``postprocessing``: ``image [1, 3, H, W]`` in ``[-1, 1]`` -> ``image`` uint8 ``[H, W, 3]`` and ``png`` BYTES ``[1]``."""

from __future__ import annotations

import numpy as np

from katz.images import encode_png, to_uint8


class Postprocessing:
    def __init__(self, deployment):
        pass

    def execute(self, inputs: dict) -> dict:
        pixels = to_uint8(inputs["image"])
        return {"image": pixels, "png": np.array([encode_png(pixels)], dtype=object)}

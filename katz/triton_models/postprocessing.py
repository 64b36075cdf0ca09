"""``postprocessing``: ``image [1, 3, H, W]`` in ``[-1, 1]`` -> ``image`` uint8 ``[H, W, 3]`` and ``png`` BYTES ``[1]``.

The PNG carries the generation settings (seed, steps, guidance, scheduler,
size, ControlNets, LoRAs) as tEXt chunks, so a saved file says how to make it again.
"""

from __future__ import annotations

import numpy as np

from katz.images import encode_png, to_uint8
from katz.triton_models.preprocessing import read_params

PNG_TEXT_KEYS = ("seed", "steps", "guidance_scale", "scheduler", "width", "height", "controlnets", "loras")


class Postprocessing:
    def __init__(self, deployment):
        pass

    def execute(self, inputs: dict) -> dict:
        pixels = to_uint8(inputs["image"])
        params = read_params(inputs) if "params" in inputs else {}
        text = {f"katz:{k}": str(params[k]) for k in PNG_TEXT_KEYS if k in params}
        return {"image": pixels, "png": np.array([encode_png(pixels, text)], dtype=object)}

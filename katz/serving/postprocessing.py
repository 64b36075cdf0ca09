"""The ensemble's last two steps, apart so that a client asking only for ``image`` skips the PNG encode.

* ``postprocessing``: ``image [1, 3, H, W]`` in ``[-1, 1]`` -> ``image`` uint8 ``[H, W, 3]``, and
  the same array as ``pixels``, the ensemble's tensor for ``png_encoder`` (see ``model_repository/katz``:
  ``png_encoder`` cannot read the ensemble output ``image`` itself).
* ``png_encoder``: ``image`` uint8 ``[H, W, 3]`` and ``params`` -> ``png`` BYTES ``[1]``.

Triton's ensemble scheduler runs a step only when one of its outputs is requested, so
``png_encoder`` (~270 ms for a 1024² noise-like image) runs only for requests that ask for
``png`` (or for all outputs). The PNG carries the generation settings (seed, steps, guidance,
scheduler, size, ControlNets, LoRAs) as tEXt chunks, so a saved file says how to make it again.
"""

from __future__ import annotations

import numpy as np

from katz.diffusion.images import encode_png, to_uint8
from katz.request import params_json

PNG_TEXT_KEYS = ("seed", "steps", "guidance_scale", "scheduler", "width", "height", "controlnets", "loras")


class Postprocessing:
    def __init__(self, deployment):
        pass

    def execute(self, inputs: dict) -> dict:
        pixels = to_uint8(inputs["image"])
        return {"image": pixels, "pixels": pixels}


class PngEncoder:
    def __init__(self, deployment):
        pass

    def execute(self, inputs: dict) -> dict:
        pixels = inputs["image"]
        if not isinstance(pixels, np.ndarray):  # a torch tensor from the backend
            pixels = pixels.cpu().numpy()
        params = params_json(inputs["params"]) if "params" in inputs else {}  # the settings it has, as text
        text = {f"katz:{k}": str(params[k]) for k in PNG_TEXT_KEYS if k in params}
        png = encode_png(np.ascontiguousarray(pixels, dtype=np.uint8), text)
        return {"png": np.array([png], dtype=object)}

"""``controlnet``: one evaluation of a named ControlNet -> ``down_residual_0..N-1``, ``mid_residual``.

Inputs as :mod:`katz.triton_models.unet` (without residuals and LoRAs) plus
``controlnet_name`` BYTES ``[1]``, ``controlnet_cond [B, 3, H, W]`` in ``[0, 1]``
and ``conditioning_scale`` FP32 ``[1]``.
"""

from __future__ import annotations

from katz.engines.torch_engines import ControlNetEngine
from katz.request import InvalidArgument
from katz.triton_models.unet import added_cond


class ControlNet:
    def __init__(self, deployment):
        self.engine = ControlNetEngine(deployment.folder, deployment.device, deployment.torch_dtype)

    def execute(self, inputs: dict) -> dict:
        name = bytes(inputs["controlnet_name"].reshape(-1)[0]).decode()
        if name not in self.engine.nets:
            raise InvalidArgument("controlnets", f"unknown ControlNet {name!r}")
        down, mid = self.engine(
            name,
            inputs["sample"],
            inputs["timestep"],
            inputs["encoder_hidden_states"],
            added_cond(inputs),
            inputs["controlnet_cond"],
            float(inputs["conditioning_scale"].reshape(-1)[0]),
        )
        out = {f"down_residual_{i}": r for i, r in enumerate(down)}
        out["mid_residual"] = mid
        return out

"""``unet``: one UNet evaluation, LoRAs named in the request merged in first.

Inputs: ``sample [B, C, h, w]``, ``timestep [1]``, ``encoder_hidden_states [B, 77, D]``,
SDXL ``text_embeds [B, P]`` and ``time_ids [B, 6]``, optional ControlNet
``down_residual_0..N-1`` and ``mid_residual``, optional ``loras`` / ``lora_scales``.
Output: ``noise_pred [B, C, h, w]``.
"""

from __future__ import annotations

from katz.engines.torch_engines import UNetEngine


def added_cond(inputs: dict) -> dict | None:
    if "text_embeds" in inputs and inputs["text_embeds"] is not None:
        return {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    return None


def lora_names(inputs: dict) -> list[tuple[str, float]]:
    names = inputs.get("loras")
    if names is None:
        return []
    scales = inputs.get("lora_scales")
    scales = [1.0] * len(names) if scales is None else scales.reshape(-1).tolist()
    return [(bytes(n).decode(), float(s)) for n, s in zip(names.reshape(-1), scales)]


class UNet:
    def __init__(self, deployment):
        self.deployment = deployment
        self.engine = UNetEngine(deployment.folder, deployment.device, deployment.torch_dtype)
        self.num_residuals = deployment.folder.num_down_residuals

    def execute(self, inputs: dict) -> dict:
        store = self.deployment.loras
        self.engine.set_loras([(store.get(n), s) for n, s in lora_names(inputs)])
        down = None
        if inputs.get("mid_residual") is not None:
            down = [inputs[f"down_residual_{i}"] for i in range(self.num_residuals)]
        noise = self.engine(
            inputs["sample"],
            inputs["timestep"],
            inputs["encoder_hidden_states"],
            added_cond(inputs),
            down,
            inputs.get("mid_residual"),
        )
        return {"noise_pred": noise}

"""``text_encoder``: token ids -> ``prompt_embeds`` ``[B, 77, D]`` (+ SDXL ``pooled_prompt_embeds`` ``[B, P]``)."""

from __future__ import annotations

from katz.engines.torch.text_encoder import TextEncoderEngine
from katz.request import read_params


class TextEncoder:
    def __init__(self, deployment):
        self.deployment = deployment
        self.engine = TextEncoderEngine(deployment.folder, deployment.device, deployment.torch_dtype)

    def execute(self, inputs: dict) -> dict:
        params = read_params(inputs)
        # only the text-encoder tensors of each file: the UNet part is the unet model's business
        parts = self.deployment.folder.text_encoder_parts
        loras = [(self.deployment.loras.get(n, parts), s) for n, s in zip(params.loras, params.lora_scales)]
        self.engine.set_loras(loras)
        ids = {k: v for k, v in inputs.items() if k.startswith("input_ids")}
        embeds, pooled = self.engine(ids, params.zero_negative)
        out = {"prompt_embeds": embeds}
        if pooled is not None:
            out["pooled_prompt_embeds"] = pooled
        return out

"""``katz_pipeline``: the denoising loop, calling ``unet`` and ``controlnet`` over BLS.

Inputs: ``prompt_embeds [B, 77, D]``, SDXL ``pooled_prompt_embeds [B, P]``,
``control_images [n, 3, H, W]``, ``params``. Output: ``latents [1, 4, h, w]``.

``call(model, inputs, output_names) -> outputs`` is the BLS transport, given by
the Triton glue (or by a test, wiring the models together in-process).
"""

from __future__ import annotations

import numpy as np
import torch

from katz.denoise import ControlInput, denoise
from katz.schedulers import make_scheduler
from katz.triton_models.preprocessing import read_params


def _bytes(*values: str) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=object)


class Pipeline:
    def __init__(self, deployment, call):
        self.deployment = deployment
        self.call = call
        folder = deployment.folder
        self.family = folder.family
        self.latent_channels = folder.unet_config["in_channels"]
        self.vae_scale_factor = folder.vae_scale_factor
        self.scheduler_config = folder.scheduler_config
        self.num_residuals = folder.num_down_residuals
        self.residual_names = [f"down_residual_{i}" for i in range(self.num_residuals)] + ["mid_residual"]
        self.device = torch.device(deployment.device)

    def execute(self, inputs: dict) -> dict:
        params = read_params(inputs)
        dtype = self.deployment.torch_dtype
        embeds = inputs["prompt_embeds"].to(self.device, dtype)
        pooled = inputs.get("pooled_prompt_embeds")
        pooled = pooled.to(self.device, dtype) if pooled is not None else None
        images = inputs["control_images"]
        controls = [
            ControlInput(name=name, image=images[i : i + 1], scale=scale)
            for i, (name, scale) in enumerate(zip(params["controlnets"], params["controlnet_scales"]))
        ]
        lora_inputs = {}
        if params["loras"]:
            lora_inputs = {
                "loras": _bytes(*params["loras"]),
                "lora_scales": torch.tensor(params["lora_scales"], dtype=torch.float32),
            }

        def conditioning(sample, t, hidden, added):
            tensors = {
                "sample": sample.contiguous(),
                "timestep": t.reshape(1).to(self.device, torch.float32),
                "encoder_hidden_states": hidden,
            }
            if added is not None:
                tensors.update(added)
            return tensors

        def unet(sample, t, hidden, added, down, mid):
            tensors = conditioning(sample, t, hidden, added)
            if down is not None:
                tensors.update({f"down_residual_{i}": r for i, r in enumerate(down)})
                tensors["mid_residual"] = mid
            tensors.update(lora_inputs)
            return self.call("unet", tensors, ["noise_pred"])["noise_pred"]

        def controlnet(name, sample, t, hidden, added, image, scale):
            tensors = conditioning(sample, t, hidden, added)
            tensors["controlnet_name"] = _bytes(name)
            tensors["controlnet_cond"] = image
            tensors["conditioning_scale"] = torch.tensor([scale], dtype=torch.float32)
            out = self.call("controlnet", tensors, self.residual_names)
            return [out[n] for n in self.residual_names[:-1]], out["mid_residual"]

        latents = denoise(
            unet=unet,
            controlnet=controlnet,
            scheduler=make_scheduler(params["scheduler"], self.scheduler_config),
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            seed=params["seed"],
            steps=params["steps"],
            guidance_scale=params["guidance_scale"],
            height=params["height"],
            width=params["width"],
            latent_channels=self.latent_channels,
            vae_scale_factor=self.vae_scale_factor,
            controls=controls,
        )
        return {"latents": latents}

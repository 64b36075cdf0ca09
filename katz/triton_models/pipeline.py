"""``katz_pipeline``: the denoising loop, calling ``unet`` and ``controlnet`` over BLS.

Inputs: ``prompt_embeds [B, 77, D]``, SDXL ``pooled_prompt_embeds [B, P]``,
``control_images [n, 3, H, W]``, ``params``. Outputs: ``latents [1, 4, h, w]`` and
``lora_applied_step`` int32 ``[1]`` (the step from which the LoRAs were in; -1 without LoRAs).

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


class _BoundedLora:
    """Per-request BAL state: which step we are at and whether the LoRAs are in yet.

    Step ``i`` asks the UNet to wait for the LoRAs once ``i >= k`` or once they
    were applied at an earlier step (so a request never goes back to base weights).
    """

    def __init__(self, names: list[str], scales: list[float], k: int):
        self.names, self.scales, self.k = names, scales, k
        self.step = 0
        self.applied_at: int | None = None

    def inputs(self, batch: int) -> dict:
        if not self.names:
            return {}
        wait = self.applied_at is not None or self.step >= self.k
        return {
            "loras": np.array([[n.encode() for n in self.names]] * batch, dtype=object),
            "lora_scales": torch.tensor([self.scales] * batch, dtype=torch.float32),
            "lora_wait": torch.full((batch, 1), wait, dtype=torch.bool),
        }

    def step_done(self, applied: torch.Tensor) -> None:
        if self.names and self.applied_at is None and bool(applied.reshape(-1)[0]):
            self.applied_at = self.step
        self.step += 1


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
        bal = _BoundedLora(params["loras"], params["lora_scales"], params.get("lora_k", 0))

        def conditioning(sample, t, hidden, added, batched=False):
            tensors = {
                "sample": sample.contiguous(),
                "timestep": t.reshape(1).to(self.device, torch.float32),
                "encoder_hidden_states": hidden,
            }
            if batched:  # the unet model batches: every tensor has the batch dimension first
                tensors["timestep"] = tensors["timestep"].expand(sample.shape[0], 1).contiguous()
            if added is not None:
                tensors.update(added)
            return tensors

        def unet(sample, t, hidden, added, down, mid):
            tensors = conditioning(sample, t, hidden, added, batched=True)
            if down is not None:
                tensors.update({f"down_residual_{i}": r for i, r in enumerate(down)})
                tensors["mid_residual"] = mid
            tensors.update(bal.inputs(sample.shape[0]))
            out = self.call("unet", tensors, ["noise_pred", "lora_applied"])
            bal.step_done(out["lora_applied"])
            return out["noise_pred"]

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
        applied_at = -1 if bal.applied_at is None else bal.applied_at
        return {"latents": latents, "lora_applied_step": torch.tensor([applied_at], dtype=torch.int32)}

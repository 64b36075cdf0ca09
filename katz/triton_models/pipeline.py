"""``katz_pipeline``: the denoising loop, calling ``unet`` and ``controlnet`` over BLS.

Inputs: ``prompt_embeds [B, 77, D]``, SDXL ``pooled_prompt_embeds [B, P]``,
``control_images [n, 3, H, W]``, ``params``. Outputs: ``latents [1, 4, h, w]`` and
``lora_applied_step`` int32 ``[1]`` (the step from which the LoRAs were in; -1 without LoRAs).

``call(model, inputs, output_names) -> outputs`` is the BLS transport, given by
the Triton glue (or by a test, wiring the models together in-process).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from katz.denoise import ControlInput, denoise
from katz.schedulers import make_scheduler
from katz.triton_models.preprocessing import read_params


def _bytes(*values: str) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=object)


def unet_model_names(shards: int) -> list[str]:
    """The Triton models holding the UNet shards: ``unet``, ``unet_1``, ..."""
    return ["unet"] + [f"unet_{i}" for i in range(1, shards)]


def _rows(value, start: int, count: int):
    """Rows ``start:start+count`` of a batch-first tensor or numpy array."""
    return value[start : start + count]


def _control_inputs(controls, batch: int) -> dict:
    """The step's active ControlNets as ``unet`` inputs (batch dimension first, rows repeat)."""
    names = [c.name.encode() for c, _, _ in controls]
    keys = [c.key.encode() for c, _, _ in controls]
    return {
        "controlnets": np.array([names] * batch, dtype=object),
        "controlnet_scales": torch.tensor([[s for _, _, s in controls]] * batch, dtype=torch.float32),
        "control_image_keys": np.array([keys] * batch, dtype=object),
        # [B, 3n, H, W]: each ControlNet's image (already doubled for CFG) side by side in channels
        "control_images": torch.cat([image for _, image, _ in controls], dim=1).contiguous(),
    }


class _BoundedLora:
    """Per-request BAL state: which step we are at and whether the LoRAs are in yet.

    Step ``i`` asks the UNet to wait for the LoRAs once ``i >= k`` or once they
    were applied at an earlier step (so a request never goes back to base weights).
    Before that, one UNet decides by itself (the LoRAs go in as soon as they are
    on its device). Several UNet shards must agree, so the pipeline decides for
    them: the LoRAs go in at the step after every shard reported them ready,
    and until then every shard runs on base weights (``lora_skip``).
    """

    def __init__(self, names: list[str], scales: list[float], k: int):
        self.names, self.scales, self.k = names, scales, k
        self.step = 0
        self.applied_at: int | None = None
        self.all_ready = False

    def inputs(self, batch: int, sharded: bool = False) -> dict:
        if not self.names:
            return {}
        wait = self.applied_at is not None or self.step >= self.k or (sharded and self.all_ready)
        out = {
            "loras": np.array([[n.encode() for n in self.names]] * batch, dtype=object),
            "lora_scales": torch.tensor([self.scales] * batch, dtype=torch.float32),
            "lora_wait": torch.full((batch, 1), wait, dtype=torch.bool),
        }
        if sharded and not wait:
            out["lora_skip"] = torch.ones((batch, 1), dtype=torch.bool)
        return out

    def step_done(self, applied: list[torch.Tensor], ready: list[torch.Tensor]) -> None:
        flags = [bool(a.reshape(-1)[0]) for a in applied]
        if self.names and self.applied_at is None and any(flags):
            if not all(flags):
                raise RuntimeError("UNet shards disagreed on the LoRA weights of one step")
            self.applied_at = self.step
        self.all_ready = all(bool(r.reshape(-1)[0]) for r in ready)
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
        self.unet_shards = unet_model_names(deployment.unet_shards)
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(self.unet_shards)), thread_name_prefix="katz-shard")

    def execute(self, inputs: dict, on_step=None) -> dict:
        params = read_params(inputs)
        dtype = self.deployment.torch_dtype
        embeds = inputs["prompt_embeds"].to(self.device, dtype)
        pooled = inputs.get("pooled_prompt_embeds")
        pooled = pooled.to(self.device, dtype) if pooled is not None else None
        images = inputs["control_images"]
        n = len(params["controlnets"])
        controls = [
            ControlInput(
                name=params["controlnets"][i],
                image=images[i : i + 1],
                scale=params["controlnet_scales"][i],
                start=params.get("control_guidance_start", [0.0] * n)[i],
                end=params.get("control_guidance_end", [1.0] * n)[i],
                key=params.get("control_image_keys", [""] * n)[i],
            )
            for i in range(n)
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

        def unet(sample, t, hidden, added, down, mid, controls=()):
            tensors = conditioning(sample, t, hidden, added, batched=True)
            if down is not None:
                tensors.update({f"down_residual_{i}": r for i, r in enumerate(down)})
                tensors["mid_residual"] = mid
            if controls:  # ControlNet-as-a-Service: the unet model calls the ControlNets itself
                tensors.update(_control_inputs(controls, sample.shape[0]))
            if len(self.unet_shards) > 1 and sample.shape[0] == len(self.unet_shards):
                # latent parallelism: one CFG half per UNet shard (each on its own GPU), concurrently
                tensors.update(bal.inputs(sample.shape[0], sharded=True))
                parts = [{k: _rows(v, j, 1) for k, v in tensors.items()} for j in range(len(self.unet_shards))]
                outs = list(self.pool.map(
                    lambda job: self.call(job[0], job[1], ["noise_pred", "lora_applied", "lora_ready"]),
                    zip(self.unet_shards, parts),
                ))
                bal.step_done([o["lora_applied"] for o in outs], [o["lora_ready"] for o in outs])
                return torch.cat([o["noise_pred"] for o in outs])
            tensors.update(bal.inputs(sample.shape[0]))
            out = self.call("unet", tensors, ["noise_pred", "lora_applied", "lora_ready"])
            bal.step_done([out["lora_applied"]], [out["lora_ready"]])
            return out["noise_pred"]

        def controlnet(name, sample, t, hidden, added, image, scale, cond_key=""):
            tensors = conditioning(sample, t, hidden, added)
            tensors["controlnet_name"] = _bytes(name)
            tensors["controlnet_cond"] = image
            tensors["conditioning_scale"] = torch.tensor([scale], dtype=torch.float32)
            tensors["cond_key"] = _bytes(cond_key)
            out = self.call("controlnet", tensors, self.residual_names)
            return [out[n] for n in self.residual_names[:-1]], out["mid_residual"]

        latents = denoise(
            unet=unet,
            controlnet=controlnet,
            controlnet_in_unet=self.deployment.controlnet_mode != "inline",
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
            on_step=on_step,  # katz_stream: progress and cancellation
        )
        applied_at = -1 if bal.applied_at is None else bal.applied_at
        return {"latents": latents, "lora_applied_step": torch.tensor([applied_at], dtype=torch.int32)}

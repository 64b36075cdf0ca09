"""The denoising loop, read top to bottom as the algorithm.

It matches diffusers' ``StableDiffusion(XL)(ControlNet)Pipeline.__call__``
step for step, so the same weights, embeddings, scheduler, steps, guidance and
seed give the same latents. The networks are passed in as callables, so the
same loop runs on local modules (tests) and on Triton models over BLS
(:mod:`katz.serving.pipeline`).

Shapes (``B`` = 2 with classifier-free guidance, else 1; ``h, w`` = latent size
= image size / ``vae_scale_factor``):

* ``prompt_embeds`` ``[B, 77, D]``, row 0 negative, row 1 positive;
* ``pooled_prompt_embeds`` ``[B, P]`` (SDXL only);
* control images ``[1, 3, H, W]`` in ``[0, 1]``;
* result: latents ``[1, C, h, w]``, still scaled by the VAE's scaling factor.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from katz.controlnet.step import sum_residuals


class UNetFn(Protocol):
    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None,
        down_residuals: Sequence[torch.Tensor] | None,
        mid_residual: torch.Tensor | None,
    ) -> torch.Tensor: ...


class ControlNetFn(Protocol):
    def __call__(
        self,
        name: str,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None,
        cond_image: torch.Tensor,
        scale: float,
        cond_key: str | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]: ...


@dataclass
class ControlInput:
    """One ControlNet of a request: which net, its image, scale and step window."""

    name: str
    image: torch.Tensor  # [1, 3, H, W] in [0, 1]
    scale: float = 1.0
    start: float = 0.0  # fraction of the steps where it starts applying
    end: float = 1.0  # fraction where it stops
    key: str = ""  # content hash of the image (feature-cache key)

    def keep(self, i: int, n: int) -> float:
        """diffusers' ``controlnet_keep``: 1.0 inside the window, 0.0 outside."""
        return 1.0 - float(i / n < self.start or (i + 1) / n > self.end)


def sdxl_time_ids(height: int, width: int, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """SDXL micro-conditioning ``[batch, 6]``: original size, crop (0, 0), target size."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
    return ids.repeat(batch, 1)


def step_kwargs(scheduler, generator: torch.Generator) -> dict:
    """The extra ``scheduler.step`` arguments diffusers passes (``eta=0``, the generator)."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


@torch.no_grad()
def denoise(
    *,
    unet: UNetFn,
    scheduler,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor | None,
    seed: int,
    steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    latent_channels: int,
    vae_scale_factor: int,
    controlnet: ControlNetFn | None = None,
    controls: Sequence[ControlInput] = (),
    controlnet_in_unet: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run the whole denoising loop and return the final latents ``[1, C, h, w]``.

    ``on_step(i, n)`` is called after step ``i`` of ``n`` (progress streaming,
    cancellation: an exception raised there stops the loop).

    ControlNets run one after the other through ``controlnet`` (the *inline*
    baseline), or, with ``controlnet_in_unet``, are handed to ``unet`` as
    ``controls=[(ControlInput, image, scale at this step), ...]`` so it can run
    them beside its own down path (ControlNet-as-a-Service).
    """
    device, dtype = prompt_embeds.device, prompt_embeds.dtype
    do_cfg = guidance_scale > 1.0
    batch = 2 if do_cfg else 1
    if prompt_embeds.shape[0] != batch:
        raise ValueError(f"prompt_embeds has batch {prompt_embeds.shape[0]}, expected {batch}")

    # 1. timesteps
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps

    # 2. initial noise; one CPU generator also feeds stochastic schedulers (euler_a)
    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (1, latent_channels, height // vae_scale_factor, width // vae_scale_factor)
    latents = torch.randn(shape, generator=generator, dtype=dtype).to(device)
    latents = latents * scheduler.init_noise_sigma
    extra = step_kwargs(scheduler, generator)

    # 3. added conditioning (SDXL)
    added_cond = None
    if pooled_prompt_embeds is not None:
        added_cond = {
            "text_embeds": pooled_prompt_embeds,
            "time_ids": sdxl_time_ids(height, width, batch, dtype, device),
        }

    # 4. control images, doubled for CFG
    control_images = [torch.cat([c.image] * batch).to(device=device, dtype=dtype) for c in controls]

    # 5. the loop
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents] * batch)
        model_input = scheduler.scale_model_input(model_input, t)

        # ControlNets inside their step window (outside it they cost nothing)
        active = [(c, image, c.scale * c.keep(i, n)) for c, image in zip(controls, control_images)]
        active = [a for a in active if a[2] != 0.0]

        if controlnet_in_unet:
            noise_pred = unet(model_input, t, prompt_embeds, added_cond, None, None, controls=active)
        else:
            down_residuals, mid_residual = sum_residuals(
                controlnet(control.name, model_input, t, prompt_embeds, added_cond, image, scale, control.key or None)
                for control, image, scale in active
            )
            noise_pred = unet(model_input, t, prompt_embeds, added_cond, down_residuals, mid_residual)

        if do_cfg:
            noise_uncond, noise_text = noise_pred.chunk(2)
            noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)

        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        if on_step is not None:
            on_step(i, n)
    return latents

"""The FLUX.1 denoising loop: flow matching over packed latent tokens, as diffusers'
``FluxPipeline`` / ``FluxControlNetPipeline`` run it step for step.

The pieces, each as diffusers computes it, so the same weights, embeddings, steps, guidance and
seed give the same latents:

* **packed latents**: the ``[1, C, h, w]`` latent is cut into 2x2 patches, one token of ``4 C``
  values each (``[1, h/2 * w/2, 4 C]``), row by row (:func:`pack_latents`, :func:`unpack_latents`);
  every token carries its ``(0, row, column)`` position (:func:`latent_image_ids`) for the
  transformer's rotary embedding, every text token ``(0, 0, 0)``.
* **schedule**: ``FlowMatchEulerDiscreteScheduler`` on the sigmas ``linspace(1, 1/steps, steps)``,
  shifted by ``mu``, which grows linearly with the number of image tokens (:func:`calculate_shift`:
  more tokens, more steps at high noise). The transformer takes ``t / 1000``.
* **guidance**: FLUX.1-dev was distilled with the guidance scale as an input (the guidance
  embedding: one transformer evaluation a step, no negative prompt); schnell has none.
* **ControlNets** (``FluxControlNetModel``, InstantX layout): the control image is VAE-encoded,
  *sampled* from the encoder's distribution with the request's generator (before the initial
  noise is drawn, as diffusers does, so the seed fixes both) and packed like the latents. Each
  ControlNet returns one residual per block of its own, added to the image tokens after the
  transformer's blocks. They run before each step (``controlnet``: the *inline* baseline), or are
  handed to ``transformer`` as ``controls`` to run beside it
  (:class:`katz.controlnet.blocks.TransformerControlNetStep`).

Shapes: ``prompt_embeds [1, L, D]`` (T5), ``pooled_prompt_embeds [1, P]`` (CLIP); the result is
the unpacked latents ``[1, C, h, w]``, still scaled and shifted by the VAE's factors.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from katz.diffusion.denoise import ControlInput


class TransformerFn(Protocol):
    def __call__(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        guidance: torch.Tensor | None,
        pooled_projections: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        txt_ids: torch.Tensor,
        img_ids: torch.Tensor,
        block_residuals: Sequence[torch.Tensor] | None,
        single_block_residuals: Sequence[torch.Tensor] | None,
        controls: Sequence[tuple[ControlInput, torch.Tensor, float]] = (),
    ) -> torch.Tensor: ...


class FluxControlNetFn(Protocol):
    def __call__(
        self,
        name: str,
        hidden_states: torch.Tensor,
        cond: torch.Tensor,
        scale: float,
        timestep: torch.Tensor,
        guidance: torch.Tensor | None,
        pooled_projections: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        txt_ids: torch.Tensor,
        img_ids: torch.Tensor,
    ) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]: ...


# A control image [1, 3, H, W] in [-1, 1] -> the VAE encoder's (mean, std) [1, C, h, w] each
EncodeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """``mu``: the schedule's shift, linear in the image's token count from ``base_shift`` at
    ``base_seq_len`` tokens to ``max_shift`` at ``max_seq_len`` (FLUX.1-dev: 0.5 at 256 tokens,
    512 px; 1.15 at 4096 tokens, 1024 px)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def latent_size(height: int, width: int, vae_scale_factor: int) -> tuple[int, int]:
    """The latent's ``(h, w)`` for an image: even, as packing into 2x2 patches needs."""
    return 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, h/2 * w/2, 4 C]``: one token per 2x2 patch, row by row."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """:func:`pack_latents`' inverse for a latent of ``h x w``."""
    b, _, channels = tokens.shape
    x = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, h, w)


def latent_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """``[h/2 * w/2, 3]``: each packed token's ``(0, row, column)``."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flux_timesteps(scheduler, steps: int, image_seq_len: int, device) -> torch.Tensor:
    """Set ``scheduler`` (``FlowMatchEulerDiscreteScheduler``) for ``steps`` steps on an image of
    ``image_seq_len`` tokens and return its timesteps (``FluxPipeline``'s step 5)."""
    cfg = scheduler.config
    sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler.timesteps


def control_latents(image: torch.Tensor, encode: EncodeFn, generator: torch.Generator,
                    shift_factor: float, scaling_factor: float) -> torch.Tensor:
    """A control image ``[1, 3, H, W]`` in ``[0, 1]`` -> packed ControlNet input ``[1, N, 4 C]``:
    encoded, sampled with ``generator`` (diffusers draws it on the generator's device: the CPU),
    shifted and scaled as latents are."""
    mean, std = encode(image * 2.0 - 1.0)
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    return pack_latents((mean + std * noise - shift_factor) * scaling_factor)


def _add(total: list[torch.Tensor] | None, more: Sequence[torch.Tensor] | None) -> list[torch.Tensor] | None:
    """Several ControlNets' residuals summed in order, as ``FluxMultiControlNetModel`` sums them
    (None: a ControlNet without blocks of that kind)."""
    if more is None:
        return total
    return list(more) if total is None else [x + y for x, y in zip(total, more)]


@torch.no_grad()
def denoise_flux(
    *,
    transformer: TransformerFn,
    scheduler,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    seed: int,
    steps: int,
    guidance_scale: float,
    guidance_embeds: bool,
    height: int,
    width: int,
    latent_channels: int,
    vae_scale_factor: int,
    controlnet: FluxControlNetFn | None = None,
    controls: Sequence[ControlInput] = (),
    controlnet_in_transformer: bool = False,
    encode: EncodeFn | None = None,
    vae_shift_factor: float = 0.0,
    vae_scaling_factor: float = 1.0,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run the FLUX loop and return the final latents ``[1, C, h, w]`` (unpacked).

    ``guidance_embeds``: the transformer takes the guidance scale (dev); else it is ignored
    (schnell). ControlNets need the VAE encoder ``encode`` (with the VAE's shift and scaling
    factors) and ``controlnet``, or, with ``controlnet_in_transformer``, a ``transformer`` that runs
    ``controls=[(ControlInput, packed control latents, scale at this step), ...]`` itself.
    ``on_step(i, n)`` is called after step ``i`` of ``n``.
    """
    device, dtype = prompt_embeds.device, prompt_embeds.dtype
    if prompt_embeds.shape[0] != 1:
        raise ValueError(f"prompt_embeds has batch {prompt_embeds.shape[0]}; FLUX runs one row (no CFG)")
    if controls and ((controlnet is None and not controlnet_in_transformer) or encode is None):
        raise ValueError("ControlNets need a controlnet (or a transformer that runs them) and the VAE encoder")
    h, w = latent_size(height, width, vae_scale_factor)
    generator = torch.Generator("cpu").manual_seed(seed)

    # 1. control images first: their latents are sampled from the same generator as the noise
    conds = [control_latents(c.image.to(device, dtype), encode, generator, vae_shift_factor, vae_scaling_factor)
             for c in controls]

    # 2. initial noise, packed; positions of the image and text tokens
    noise = torch.randn((1, latent_channels, h, w), generator=generator, dtype=dtype).to(device)
    latents = pack_latents(noise)
    img_ids = latent_image_ids(h, w, device, dtype)
    txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)

    # 3. the shifted schedule, and the guidance input (dev only)
    timesteps = flux_timesteps(scheduler, steps, latents.shape[1], device)
    guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32) if guidance_embeds else None

    # 4. the loop: one transformer evaluation per step
    n = len(timesteps)
    for i, t in enumerate(timesteps):
        timestep = t.expand(1).to(dtype) / 1000
        # ControlNets inside their step window (outside it, adding zero residuals changes nothing)
        active = [(c, cond, c.scale * c.keep(i, n)) for c, cond in zip(controls, conds)]
        active = [a for a in active if a[2] != 0.0]
        args = (latents, timestep, guidance, pooled_prompt_embeds, prompt_embeds, txt_ids, img_ids)
        if controlnet_in_transformer:
            noise_pred = transformer(*args, None, None, controls=active)
        else:
            blocks, singles = None, None
            for control, cond, scale in active:
                b, s = controlnet(control.name, *args[:1], cond, scale, *args[1:])
                blocks, singles = _add(blocks, b), _add(singles, s)
            noise_pred = transformer(*args, blocks, singles)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i, n)
    return unpack_latents(latents, h, w)

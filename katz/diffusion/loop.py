"""A request's denoising loop, wherever it runs: in ``katz_pipeline`` or in the ``unet`` model.

The loop (:func:`katz.diffusion.denoise.denoise`) runs in one of two places (``Deployment.loop``):

* ``pipeline``: ``katz_pipeline`` runs it and calls ``unet`` over BLS once per step. Latent
  parallelism (several UNet shards) and ``katz_stream`` (a response per step) always run so.
* ``unet``: ``katz_pipeline`` sends the whole request to the ``unet`` model in one BLS call (a
  *loop request*) and the UNet's process runs the loop next to its engine. No tensor leaves the
  GPU between steps and no step waits for a BLS round trip, so the host launches step ``i + 1``
  while the GPU still runs step ``i``. (With ControlNets each step waits for the GPU once: the
  ControlNet's process reads the step's sample.)

A loop request is the pipeline's own inputs with a leading batch dimension of 1 (``unet`` is a
batching model): ``loop_params [1, 1]`` (the preprocessing ``params`` JSON),
``loop_prompt_embeds [1, B, 77, D]``, SDXL ``loop_pooled_prompt_embeds [1, B, P]`` and
``loop_control_images [1, n, 3, H, W]`` (float32, in ``[0, 1]``). Its outputs are
``latents [1, C, h, w]`` and ``lora_applied_step`` int32 ``[1, 1]``.

A FLUX request is a loop request too (its loop always runs in the transformer's process,
:func:`run_flux_loop`): ``loop_prompt_embeds [1, 1, L, D]`` (T5), ``loop_pooled_prompt_embeds
[1, 1, P]`` (CLIP).
"""

from __future__ import annotations

from typing import Callable

import torch

from katz.diffusion.denoise import ControlInput, ControlNetFn, UNetFn, denoise
from katz.diffusion.flux import EncodeFn, FluxControlNetFn, TransformerFn, denoise_flux
from katz.diffusion.schedulers import make_scheduler
from katz.errors import InvalidArgument
from katz.request import RequestParams

LOOP_OUTPUTS = ("latents", "lora_applied_step")
def request_controls(params: RequestParams, images: torch.Tensor) -> list[ControlInput]:
    """The request's ControlNets from its params and ``images [n, 3, H, W]``."""
    n = len(params.controlnets)
    return [
        ControlInput(
            name=params.controlnets[i],
            image=images[i : i + 1],
            scale=params.controlnet_scales[i],
            start=(params.control_guidance_start or [0.0] * n)[i],
            end=(params.control_guidance_end or [1.0] * n)[i],
            key=(params.control_image_keys or [""] * n)[i],
        )
        for i in range(n)
    ]


def run_loop(
    params: RequestParams,
    embeds: torch.Tensor,
    pooled: torch.Tensor | None,
    images: torch.Tensor,
    folder,
    unet: UNetFn,
    controlnet: ControlNetFn | None,
    controlnet_in_unet: bool,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The request's loop: ``embeds [B, 77, D]`` (and SDXL ``pooled [B, P]``) on the loop's device,
    ``images [n, 3, H, W]`` -> latents ``[1, C, h, w]``. ``folder`` is the deployment's model folder."""
    return denoise(unet=unet, controlnet=controlnet, controlnet_in_unet=controlnet_in_unet,
                   **_request_loop(params, embeds, pooled, images, folder, on_step))


def _request_loop(params: RequestParams, embeds, pooled, images, folder, on_step) -> dict:
    """The loop arguments a request and the model folder give, whatever the family."""
    return dict(
        scheduler=make_scheduler(params.scheduler, folder.scheduler_config),
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        seed=params.seed,
        steps=params.steps,
        guidance_scale=params.guidance_scale,
        height=params.height,
        width=params.width,
        latent_channels=folder.latent_channels,
        vae_scale_factor=folder.vae_scale_factor,
        controls=request_controls(params, images),
        on_step=on_step,
    )


def run_flux_loop(
    params: RequestParams,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    images: torch.Tensor,
    folder,
    transformer: TransformerFn,
    controlnet: FluxControlNetFn | None,
    controlnet_in_transformer: bool,
    encode: EncodeFn | None,
    vae_shift_factor: float,
    vae_scaling_factor: float,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """A FLUX request's loop (:func:`katz.diffusion.flux.denoise_flux`): ``embeds [1, L, D]``,
    ``pooled [1, P]``, ``images [n, 3, H, W]`` -> latents ``[1, C, h, w]``; its ControlNets need the
    VAE encoder ``encode`` and the VAE's factors, and run through ``controlnet`` before each step or,
    with ``controlnet_in_transformer``, inside ``transformer``'s call."""
    return denoise_flux(
        transformer=transformer, controlnet=controlnet, controlnet_in_transformer=controlnet_in_transformer,
        guidance_embeds=folder.guidance_embeds, encode=encode, vae_shift_factor=vae_shift_factor,
        vae_scaling_factor=vae_scaling_factor, **_request_loop(params, embeds, pooled, images, folder, on_step),
    )


def step_tensors(sample, t, hidden, added, batched: bool, device) -> dict:
    """One network evaluation's conditioning as model inputs: ``sample``, ``timestep`` float32
    (``[1]``; ``[B, 1]`` for a batching model), ``encoder_hidden_states`` and SDXL's added cond."""
    tensors = {
        "sample": sample.contiguous(),
        "timestep": t.reshape(1).to(device, torch.float32),
        "encoder_hidden_states": hidden,
    }
    if batched:  # every tensor has the batch dimension first
        tensors["timestep"] = tensors["timestep"].expand(sample.shape[0], 1).contiguous()
    if added is not None:
        tensors.update(added)
    return tensors


def added_cond(inputs: dict) -> dict | None:
    """SDXL's added conditioning of a step call (:func:`step_tensors`' inverse); None for SD 1.5."""
    if inputs.get("text_embeds") is not None:
        return {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    return None


def loop_request(inputs: dict) -> dict:
    """``katz_pipeline``'s inputs as a loop request for the ``unet`` model (batch dimension 1)."""
    out = {
        "loop_params": inputs["params"].reshape(1, 1),
        "loop_prompt_embeds": inputs["prompt_embeds"].unsqueeze(0),
        "loop_control_images": inputs["control_images"].to(torch.float32).unsqueeze(0),
    }
    if inputs.get("pooled_prompt_embeds") is not None:
        out["loop_pooled_prompt_embeds"] = inputs["pooled_prompt_embeds"].unsqueeze(0)
    return out


def is_loop_request(inputs: dict) -> bool:
    return inputs.get("loop_params") is not None


def read_loop_request(inputs: dict, device, dtype) -> tuple[RequestParams, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A loop request's ``(params, embeds [B, 77, D], pooled [B, P] or None, images [n, 3, H, W])``,
    the tensors on ``device`` in ``dtype`` (images stay float32, as the pipeline passes them).
    Raises :class:`InvalidArgument` naming the input that is missing or malformed."""
    for name in ("loop_prompt_embeds", "loop_control_images"):
        if inputs.get(name) is None:
            raise InvalidArgument(name, "required in a loop request")
    embeds = inputs["loop_prompt_embeds"]
    if embeds.ndim != 4 or embeds.shape[0] != 1:
        raise InvalidArgument("loop_prompt_embeds", f"must be [1, B, 77, D], not {list(embeds.shape)}")
    images = inputs["loop_control_images"]
    if images.ndim != 5 or images.shape[0] != 1:
        raise InvalidArgument("loop_control_images", f"must be [1, n, 3, H, W], not {list(images.shape)}")
    params = RequestParams.from_tensor(inputs["loop_params"], "loop_params")
    if len(params.controlnets) != images.shape[1]:
        raise InvalidArgument("loop_control_images", f"has {images.shape[1]} images for "
                              f"{len(params.controlnets)} ControlNets")
    pooled = inputs.get("loop_pooled_prompt_embeds")
    return (
        params,
        embeds[0].to(device, dtype),
        pooled[0].to(device, dtype) if pooled is not None else None,
        images[0],
    )

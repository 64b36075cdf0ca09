"""The PyTorch FLUX.1 engines: the transformer (LoRAs merged in place, as the UNet engine does) and
the folder's FLUX ControlNets. Eager only: no CUDA graphs or compile for FLUX yet.
"""

from __future__ import annotations

from typing import Sequence

import torch

from katz.lora.patch import LoraPatcher, apply_loras
from katz.lora.weights import LoraWeights
from katz.models.folder import ModelFolder


class FluxTransformerEngine:
    """``FluxTransformer2DModel``: one step's evaluation (:class:`katz.diffusion.flux.TransformerFn`).
    ``lora`` is its :class:`LoraPatcher` (component ``transformer``), for the LoRA manager and BAL."""

    def __init__(self, folder: ModelFolder, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.transformer = folder.load_transformer(device, dtype)
        self.lora = LoraPatcher(self.transformer, "transformer")

    def set_loras(self, loras: Sequence[tuple[LoraWeights, float]]) -> None:
        """Make the weights base + exactly these LoRAs (an empty list restores the base)."""
        apply_loras(self.lora, loras)

    @torch.no_grad()
    def __call__(self, hidden_states, timestep, guidance, pooled_projections, encoder_hidden_states, txt_ids,
                 img_ids, block_residuals=None, single_block_residuals=None, attention_kwargs=None) -> torch.Tensor:
        """``attention_kwargs``: passed to the attention processors (a sequence shard's place,
        :mod:`katz.parallel.sequence`)."""
        return self.transformer(
            hidden_states=hidden_states, timestep=timestep, guidance=guidance,
            pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
            txt_ids=txt_ids, img_ids=img_ids,
            controlnet_block_samples=block_residuals, controlnet_single_block_samples=single_block_residuals,
            joint_attention_kwargs=attention_kwargs, return_dict=False,
        )[0]


class FluxControlNetEngine:
    """The folder's ``FluxControlNetModel``s by name, loaded on first use
    (:class:`katz.diffusion.flux.FluxControlNetFn`). Only the InstantX layout (control image as
    packed VAE latents, no ``input_hint_block``) is served; another is refused at load."""

    def __init__(self, folder: ModelFolder, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.folder, self.device, self.dtype = folder, device, dtype
        self.nets: dict[str, torch.nn.Module] = {}

    def net(self, name: str) -> torch.nn.Module:
        if name not in self.nets:
            net = self.folder.load_controlnet(name, self.device, self.dtype)
            if net.input_hint_block is not None:
                raise ValueError(f"ControlNet {name!r} has an input_hint_block (XLabs layout); "
                                 "only InstantX-layout FLUX ControlNets are served")
            self.nets[name] = net
        return self.nets[name]

    @torch.no_grad()
    def __call__(self, name, hidden_states, cond, scale, timestep, guidance, pooled_projections,
                 encoder_hidden_states, txt_ids, img_ids) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
        net = self.net(name)
        blocks, singles = net(
            hidden_states=hidden_states, controlnet_cond=cond, conditioning_scale=scale, timestep=timestep,
            guidance=guidance if net.config.guidance_embeds else None,
            pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )
        return (list(blocks) if blocks else None), (list(singles) if singles else None)

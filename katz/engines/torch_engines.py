"""PyTorch engines for the UNet, the ControlNets, the VAE decoder and the text encoders.

Tensors in and out are on the engine's device in the engine's dtype; shapes are
documented on each ``__call__``. LoRAs are merged into the weights in place
(:class:`katz.lora.LoraPatcher`), so a step costs the same with or without them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from katz.lora import LoraPatcher, LoraWeights
from katz.model_folder import ModelFolder
from katz.text_encoding import PromptEncoder


def _apply_loras(patcher: LoraPatcher, loras: Sequence[tuple[LoraWeights, float]]) -> None:
    patcher.apply([(w, s) for w, s in loras if patcher.component in w.layers])


class UNetEngine:
    """The denoising UNet, with LoRAs merged on demand."""

    def __init__(self, folder: ModelFolder, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.unet = folder.load_unet(device, dtype)
        self.lora = LoraPatcher(self.unet, "unet")

    def set_loras(self, loras: Sequence[tuple[LoraWeights, float]]) -> None:
        """Make the weights base + exactly these LoRAs (an empty list restores the base)."""
        _apply_loras(self.lora, loras)

    @torch.no_grad()
    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None = None,
        down_residuals: Sequence[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``sample [B, C, h, w]``, ``timestep`` scalar, ``encoder_hidden_states [B, 77, D]``,
        SDXL ``added_cond = {text_embeds [B, P], time_ids [B, 6]}`` -> noise prediction ``[B, C, h, w]``."""
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added_cond,
            down_block_additional_residuals=list(down_residuals) if down_residuals is not None else None,
            mid_block_additional_residual=mid_residual,
            return_dict=False,
        )[0]


class ControlNetEngine:
    """The registered ControlNets of a deployment, by name, all resident."""

    def __init__(self, folder: ModelFolder, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.nets = {name: folder.load_controlnet(name, device, dtype) for name in folder.controlnets}

    @torch.no_grad()
    def __call__(
        self,
        name: str,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond: dict[str, torch.Tensor] | None,
        cond_image: torch.Tensor,
        scale: float,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``cond_image [B, 3, H, W]`` in ``[0, 1]`` -> (down residuals, mid residual), already scaled."""
        down, mid = self.nets[name](
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            controlnet_cond=cond_image,
            conditioning_scale=scale,
            added_cond_kwargs=added_cond,
            return_dict=False,
        )
        return list(down), mid


class VaeDecoderEngine:
    """VAE decoder: scaled latents ``[B, 4, h, w]`` -> image ``[B, 3, H, W]`` in ``[-1, 1]``."""

    def __init__(self, folder: ModelFolder, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.vae = folder.load_vae(device, dtype)
        cfg = self.vae.config
        self.scaling_factor = cfg.scaling_factor
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        self.latents_mean = torch.tensor(mean).view(1, -1, 1, 1) if mean is not None and std is not None else None
        self.latents_std = torch.tensor(std).view(1, -1, 1, 1) if mean is not None and std is not None else None

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.device, self.dtype)
        if self.latents_mean is not None:
            mean = self.latents_mean.to(latents)
            std = self.latents_std.to(latents)
            latents = latents * std / self.scaling_factor + mean
        else:
            latents = latents / self.scaling_factor
        return self.vae.decode(latents, return_dict=False)[0]


class TextEncoderEngine:
    """CLIP text encoder(s) with LoRAs merged on demand; see :class:`katz.text_encoding.PromptEncoder`."""

    def __init__(self, folder: ModelFolder, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.encoders = folder.load_text_encoders(device, dtype)
        self.encoder = PromptEncoder(self.encoders, folder.family)
        self.lora = [LoraPatcher(m, part) for part, m in self.encoders.items()]

    def set_loras(self, loras: Sequence[tuple[LoraWeights, float]]) -> None:
        for patcher in self.lora:
            _apply_loras(patcher, loras)

    def __call__(self, input_ids: dict[str, torch.Tensor], zero_negative: bool):
        return self.encoder.encode(input_ids, zero_negative)

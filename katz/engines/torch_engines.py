"""PyTorch engines for the UNet, the ControlNets, the VAE decoder and the text encoders.

Tensors in and out are on the engine's device in the engine's dtype; shapes are
documented on each ``__call__``. LoRAs are merged into the weights in place
(:class:`katz.lora.LoraPatcher`), so a step costs the same with or without them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

import torch

from katz.lora import LoraPatcher, LoraWeights
from katz.model_folder import ModelFolder
from katz.engines.unet_split import unet_down, unet_up
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


    # ---- split forward (katz.engines.unet_split): down + mid, then the up path -----
    @torch.no_grad()
    def down(self, sample, timestep, encoder_hidden_states, added_cond=None) -> dict:
        """Time embedding, ``conv_in``, down blocks and mid block; returns the state :meth:`up` needs."""
        skips, mid, emb = unet_down(self.unet, sample, timestep, encoder_hidden_states, added_cond)
        return {"skips": skips, "sample": mid, "emb": emb, "hidden": encoder_hidden_states}

    @torch.no_grad()
    def up(self, state: dict, down_residuals=None, mid_residual=None) -> torch.Tensor:
        """Add the ControlNet residuals (if any), run the up blocks and the output head."""
        return unet_up(self.unet, state["skips"], down_residuals, state["sample"], mid_residual, state["emb"],
                       state["hidden"])


class _CachedCondEmbedding(torch.nn.Module):
    """Wraps a ControlNet's ``controlnet_cond_embedding``: the features of a control image
    are computed once (on one row of the CFG batch) and reused while the cache holds them."""

    def __init__(self, inner: torch.nn.Module, cache: "FeatureCache", net_name: str):
        super().__init__()
        self.inner, self.cache, self.net_name = inner, cache, net_name
        self.key: str | None = None  # set by ControlNetEngine before each forward

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        if self.key is None:
            return self.inner(cond)
        key = (self.net_name, self.key, tuple(cond.shape[1:]), cond.dtype, cond.device)
        feats = self.cache.get(key)
        if feats is None:
            feats = self.inner(cond[:1])
            self.cache.put(key, feats)
        return feats.expand(cond.shape[0], *feats.shape[1:])


class FeatureCache:
    """LRU of ControlNet conditioning features by (net, image content hash, shape), bytes-bounded."""

    def __init__(self, budget_bytes: int):
        self.budget, self.used = budget_bytes, 0
        self.items: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key):
        t = self.items.get(key)
        if t is None:
            self.misses += 1
            return None
        self.items.move_to_end(key)
        self.hits += 1
        return t

    def put(self, key, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.budget:
            return
        self.items[key] = t
        self.used += size
        while self.used > self.budget:
            _, old = self.items.popitem(last=False)
            self.used -= old.numel() * old.element_size()


class ControlNetEngine:
    """The registered ControlNets of a deployment, by name.

    ``resident`` nets are loaded at start and never evicted; the others are
    loaded on first use into an LRU bounded by ``cache_bytes``. Control-image
    features are cached across requests (:class:`FeatureCache`).
    """

    def __init__(
        self,
        folder: ModelFolder,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        resident: Sequence[str] | None = None,
        cache_bytes: int = 8 << 30,
        feature_cache_bytes: int = 1 << 30,
    ):
        self.folder, self.device, self.dtype = folder, torch.device(device), dtype
        self.names = set(folder.controlnets)
        self.resident = set(folder.controlnets if resident is None else resident) & self.names
        self.cache_bytes = cache_bytes
        self.features = FeatureCache(feature_cache_bytes)
        self.nets: "OrderedDict[str, torch.nn.Module]" = OrderedDict()
        self.loads = 0
        # one evaluation at a time, like one Triton instance (the feature-cache key lives on the net)
        self._lock = threading.Lock()
        for name in sorted(self.resident):
            self._load(name)

    def _size(self, net) -> int:
        return sum(p.numel() * p.element_size() for p in net.parameters())

    def _load(self, name: str):
        net = self.folder.load_controlnet(name, self.device, self.dtype)
        net.controlnet_cond_embedding = _CachedCondEmbedding(net.controlnet_cond_embedding, self.features, name)
        self.nets[name] = net
        self.loads += 1
        evictable = [n for n in self.nets if n not in self.resident and n != name]
        while evictable and sum(self._size(n_) for n_ in self.nets.values()) > self.cache_bytes:
            self.nets.pop(evictable.pop(0))
        return net

    def get(self, name: str):
        net = self.nets.get(name)
        if net is None:
            net = self._load(name)
        self.nets.move_to_end(name)
        return net

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
        cond_key: str | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``cond_image [B, 3, H, W]`` in ``[0, 1]`` -> (down residuals, mid residual), already scaled.

        ``cond_key`` (a content hash of the control image) lets the image's
        features come from the feature cache.
        """
        with self._lock:
            return self._run(name, sample, timestep, encoder_hidden_states, added_cond, cond_image, scale, cond_key)

    def _run(self, name, sample, timestep, encoder_hidden_states, added_cond, cond_image, scale, cond_key):
        net = self.get(name)
        net.controlnet_cond_embedding.key = cond_key
        try:
            down, mid = net(
                sample,
                timestep,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=cond_image,
                conditioning_scale=scale,
                added_cond_kwargs=added_cond,
                return_dict=False,
            )
        finally:
            net.controlnet_cond_embedding.key = None
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

"""The TensorRT UNet, ControlNet and VAE-decoder engines: the same call signatures as the PyTorch
engines (:mod:`katz.engines.torch`), built from the engine folder ``katz build-engines`` wrote."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import torch

from katz.engines.tensorrt.engine import TrtEngine, load_manifest
from katz.engines.tensorrt.manifest import (
    EngineMismatch,
)
from katz.engines.tensorrt.refit import RefitPart, TrtLoraRefitter
from katz.lora.refit_map import RefitMap
from katz.lora.weights import LoraWeights


class _TrtComponent:
    def __init__(self, engine_dir, device, dtype, limits):
        if engine_dir is None:
            raise EngineMismatch("engine: tensorrt needs an engine folder (katz serve --engine-dir DIR)")
        self.engine_dir = Path(engine_dir)
        self.device, self.dtype = torch.device(device), dtype
        self.manifest = load_manifest(self.engine_dir, device, limits)

    def _engine(self, name: str) -> TrtEngine:
        record = self.manifest.engines.get(name)
        if record is None:
            raise EngineMismatch(
                f"{self.engine_dir} has no TensorRT engine {name!r} "
                f"(it has {', '.join(self.manifest.engines) or 'none'}); "
                + self.manifest.rebuild_hint(self.engine_dir)
            )
        return TrtEngine(self.engine_dir, record, self.manifest, str(self.device))

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.dtype == self.dtype else t.to(self.dtype)


class TrtUNetEngine(_TrtComponent):
    """The UNet on TensorRT. Uses the ``unet_down`` + ``unet_up`` engines when they were built
    (ControlNet parallelism: :meth:`down` runs while the ControlNets do), else ``unet``."""

    def __init__(self, folder, device: str = "cuda", dtype: torch.dtype = torch.float16,
                 engine_dir: Path | None = None, limits=None):
        super().__init__(engine_dir, device, dtype, limits)
        from katz.models.unet import UNetLayout

        self.folder = folder
        self.num_residuals = folder.num_down_residuals
        self.layout = UNetLayout(folder)
        self.split = "unet_down" in self.manifest.engines and "unet_up" in self.manifest.engines
        names = ("unet_down", "unet_up") if self.split else ("unet",)
        self.engines = {n: self._engine(n) for n in names}
        parts = []
        for n, eng in self.engines.items():
            if eng.record.refit and eng.record.refit_map:
                parts.append(RefitPart(eng, RefitMap.load(self.engine_dir / eng.record.refit_map)))
        self.lora = TrtLoraRefitter(parts, "unet", self.manifest.rebuild_hint(self.engine_dir))
        self._zeros: dict[tuple, list[torch.Tensor]] = {}

    def set_loras(self, loras: Sequence[tuple[LoraWeights, float]]) -> None:
        """Make the weights base + exactly these LoRAs (an empty list restores the base)."""
        self.lora.apply(loras)

    def _cond(self, sample, timestep, encoder_hidden_states, added_cond) -> dict[str, torch.Tensor]:
        b = sample.shape[0]
        t = timestep.reshape(-1).to(device=self.device, dtype=torch.float32)
        feeds = {
            "sample": sample,
            "timestep": t.expand(b).contiguous() if t.numel() == 1 else t,
            "encoder_hidden_states": encoder_hidden_states,
        }
        if added_cond is not None:
            feeds.update(text_embeds=added_cond["text_embeds"], time_ids=added_cond["time_ids"])
        return feeds

    def _residuals(self, state_shapes: list[tuple], like: torch.Tensor, down, mid) -> dict[str, torch.Tensor]:
        if down is None or mid is None:
            key = (tuple(state_shapes), like.dtype, like.device)
            zeros = self._zeros.get(key)
            if zeros is None:
                zeros = self._zeros[key] = [torch.zeros(s, dtype=like.dtype, device=like.device) for s in state_shapes]
            down, mid = zeros[:-1], zeros[-1]
        feeds = {f"down_residual_{i}": r for i, r in enumerate(down)}
        feeds["mid_residual"] = mid
        return feeds

    def _full_residual_shapes(self, sample) -> list[tuple]:
        b, _, h, w = sample.shape
        shapes = self.layout.residual_shapes("r", "mid", b, h, w)
        return [shapes[f"r{i}"] for i in range(self.num_residuals)] + [shapes["mid"]]

    @torch.no_grad()
    def __call__(self, sample, timestep, encoder_hidden_states, added_cond=None, down_residuals=None,
                 mid_residual=None) -> torch.Tensor:
        if self.split:
            return self.up(self.down(sample, timestep, encoder_hidden_states, added_cond), down_residuals, mid_residual)
        feeds = self._cond(sample, timestep, encoder_hidden_states, added_cond)
        feeds.update(self._residuals(self._full_residual_shapes(sample), sample, down_residuals, mid_residual))
        return self._out(self.engines["unet"].run(feeds)["noise_pred"])

    @torch.no_grad()
    def down(self, sample, timestep, encoder_hidden_states, added_cond=None) -> dict:
        """The down and mid blocks (``unet_down``); returns the state :meth:`up` needs."""
        feeds = self._cond(sample, timestep, encoder_hidden_states, added_cond)
        if not self.split:
            return {"feeds": feeds}
        out = self.engines["unet_down"].run(feeds)
        out["encoder_hidden_states"] = encoder_hidden_states
        return {"outputs": out}

    @torch.no_grad()
    def up(self, state: dict, down_residuals=None, mid_residual=None) -> torch.Tensor:
        """Add the ControlNet residuals (zeros if none) and run the up path."""
        if "feeds" in state:  # no split engines: the full UNet, now that the residuals are known
            feeds = dict(state["feeds"])
            feeds.update(self._residuals(self._full_residual_shapes(feeds["sample"]), feeds["sample"],
                                         down_residuals, mid_residual))
            return self._out(self.engines["unet"].run(feeds)["noise_pred"])
        feeds = dict(state["outputs"])
        skips = [feeds[f"skip_{i}"] for i in range(self.num_residuals)] + [feeds["mid_sample"]]
        feeds.update(self._residuals([tuple(s.shape) for s in skips], skips[0], down_residuals, mid_residual))
        return self._out(self.engines["unet_up"].run(feeds)["noise_pred"])


class TrtControlNetEngine(_TrtComponent):
    """The registered ControlNets on TensorRT, one engine each, all resident. ``cond_key`` is
    accepted for interface parity; the conditioning embedding is part of each engine."""

    def __init__(self, folder, device: str = "cuda", dtype: torch.dtype = torch.float16,
                 engine_dir: Path | None = None, limits=None, **_ignored):
        super().__init__(engine_dir, device, dtype, limits)
        self.names = set(folder.controlnets)
        self.nets = {name: self._engine(f"controlnet_{name}") for name in sorted(self.names)}
        self.loads = len(self.nets)
        self.features = SimpleNamespace(hits=0, misses=0)  # no feature cache: the embedding is in the engine

    @torch.no_grad()
    def __call__(self, name, sample, timestep, encoder_hidden_states, added_cond, cond_image, scale,
                 cond_key=None) -> tuple[list[torch.Tensor], torch.Tensor]:
        b = sample.shape[0]
        t = timestep.reshape(-1).to(device=self.device, dtype=torch.float32)
        feeds = {
            "sample": sample,
            "timestep": t.expand(b).contiguous() if t.numel() == 1 else t,
            "encoder_hidden_states": encoder_hidden_states,
            "controlnet_cond": cond_image,
            "conditioning_scale": torch.tensor([float(scale)], dtype=torch.float32, device=self.device),
        }
        if added_cond is not None:
            feeds.update(text_embeds=added_cond["text_embeds"], time_ids=added_cond["time_ids"])
        out = self.nets[name].run(feeds)
        n = len(out) - 1
        return [self._out(out[f"down_residual_{i}"]) for i in range(n)], self._out(out["mid_residual"])


class TrtVaeDecoderEngine(_TrtComponent):
    """VAE decoder on TensorRT: scaled latents ``[B, 4, h, w]`` -> image ``[B, 3, H, W]`` in ``[-1, 1]``
    (the unscaling is inside the engine)."""

    def __init__(self, folder, device: str = "cuda", dtype: torch.dtype = torch.float16,
                 engine_dir: Path | None = None, limits=None):
        super().__init__(engine_dir, device, dtype, limits)
        self.engine = self._engine("vae_decoder")

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self._out(self.engine.run({"latents": latents})["image"])

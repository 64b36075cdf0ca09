"""The PyTorch VAE decoder engine: latents -> image in [-1, 1], compiled and captured at load on a GPU.
"""

from __future__ import annotations

import time
import warnings
from typing import Sequence

import torch

from katz.engines.torch.cuda_graphs import Acceleration, CudaGraphs, process_pool
from katz.models.folder import ModelFolder


def vae_compute_dtype(vae_config: dict, dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE runs in: float32 where the model asks for it (``force_upcast`` in its config,
    :attr:`ModelFolder.vae_config`, as the SDXL VAE does: its activations overflow float16) and
    ``dtype`` is float16, as diffusers decodes; otherwise ``dtype``. A VAE fixed for float16 (e.g.
    "sdxl-vae-fp16-fix") says ``force_upcast: false`` and runs in float16."""
    return torch.float32 if dtype == torch.float16 and vae_config.get("force_upcast", False) else dtype


class VaeDecoderEngine:
    """VAE decoder: scaled latents ``[B, 4, h, w]`` -> image ``[B, 3, H, W]`` in ``[-1, 1]``, in ``dtype``
    (computed in :func:`vae_compute_dtype`).

    With ``accel`` on a CUDA device, :meth:`warm_up` compiles (``accel.compile_vae``) and captures
    (``accel.cuda_graphs``) the decode of one latent of each given size; other shapes run eagerly.
    (Channels-last convolutions made the SDXL decode slower on an H200, 131 vs 86 ms: it stays NCHW.)
    """

    def __init__(self, folder: ModelFolder, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 accel: Acceleration | None = None):
        self.device, self.dtype = torch.device(device), dtype
        self.compute_dtype = vae_compute_dtype(folder.vae_config, dtype)
        self.vae = folder.load_vae(device, self.compute_dtype)
        self.scale = folder.vae_scale_factor
        cfg = self.vae.config
        self.scaling_factor = cfg.scaling_factor
        # FLUX's VAE: latents are (x - shift) * scale
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        stats = mean is not None and std is not None
        self.latents_mean = torch.tensor(mean).view(1, -1, 1, 1).to(device, self.compute_dtype) if stats else None
        self.latents_std = torch.tensor(std).view(1, -1, 1, 1).to(device, self.compute_dtype) if stats else None
        self.warmup_s = 0.0  # compilation and graph capture at load
        # the compiled and/or captured decode (CudaGraphs where graphs are on), for the shapes warmed up
        self.fast_decode = None
        self._warmed: set[tuple[int, ...]] = set()
        self.compiled = False
        on_gpu = accel is not None and self.device.type == "cuda"
        if on_gpu and (accel.cuda_graphs or accel.compile_vae):
            self.fast_decode = self._make_fast(accel.compiled(self.eager_decode, on=accel.compile_vae), accel.cuda_graphs)
            self.compiled = accel.compile_vae

    def _make_fast(self, fn, graphs: bool):
        return CudaGraphs(fn, "vae.decode", *process_pool(self.device), eager=self.eager_decode) if graphs else fn

    @torch.no_grad()
    def warm_up(self, sizes: Sequence[tuple[int, int]]) -> float:
        """Compile and capture the decode of one latent for every ``(height, width)`` in pixels.

        Where compiling fails (inductor needs a C compiler and Triton on the host), the decode
        stays uncompiled (with a warning) instead of failing the model's load."""
        if self.fast_decode is None:
            return 0.0
        start = time.perf_counter()
        try:
            self._warm(sizes)
        except Exception as exc:
            if not self.compiled:
                raise
            warnings.warn(f"katz: compiling the VAE decoder failed ({type(exc).__name__}: {exc}); "
                          "it decodes uncompiled", RuntimeWarning, stacklevel=2)
            graphs = isinstance(self.fast_decode, CudaGraphs)
            self.compiled, self._warmed = False, set()
            self.fast_decode = self._make_fast(self.eager_decode, graphs) if graphs else None
            if self.fast_decode is not None:
                self._warm(sizes)
        self.warmup_s += time.perf_counter() - start
        return time.perf_counter() - start

    def _warm(self, sizes: Sequence[tuple[int, int]]) -> None:
        channels = self.vae.config.latent_channels
        for height, width in sizes:
            x = torch.zeros(1, channels, height // self.scale, width // self.scale, device=self.device,
                            dtype=self.compute_dtype)
            if isinstance(self.fast_decode, CudaGraphs):
                self.fast_decode.capture(x)
            else:
                self.fast_decode(x)
            self._warmed.add(tuple(x.shape))

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.device, self.compute_dtype)
        if self.fast_decode is not None and tuple(latents.shape) in self._warmed:
            return self.fast_decode(latents).clone()  # a captured graph's output is overwritten by the next replay
        return self.eager_decode(latents)

    def eager_decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.latents_mean is not None:
            mean = self.latents_mean.to(latents)
            std = self.latents_std.to(latents)
            latents = latents * std / self.scaling_factor + mean
        else:
            latents = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(latents, return_dict=False)[0].to(self.dtype)

    @torch.no_grad()
    def encode_distribution(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``image [1, 3, H, W]`` in ``[-1, 1]`` -> the encoder's latent distribution ``(mean, std)``
        (FLUX ControlNets take a sample of it: :func:`katz.diffusion.flux.control_latents`)."""
        dist = self.vae.encode(image.to(self.device, self.compute_dtype)).latent_dist
        return dist.mean, dist.std

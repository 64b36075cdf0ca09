"""The VAE decoder: ``latents [B, 4, h, w]`` (scaled, as the denoiser leaves them) -> ``image
[B, 3, H, W]`` in ``[-1, 1]``, the Triton ``vae_decoder`` model's tensors. The latent unscaling
(``/ scaling_factor``, or SDXL-style ``latents_mean`` / ``latents_std``) is part of the graph, so
the engine can be served as a plain ``tensorrt_plan`` model.
"""

from __future__ import annotations

import torch

from katz.export.graph import Graph, preloaded
from katz.models.shapes import TensorSpec


class _VaeDecoderWrapper(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.net = vae
        cfg = vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        self.mean = list(mean) if mean is not None and std is not None else None
        self.std = list(std) if mean is not None and std is not None else None

    def forward(self, latents):
        # the same arithmetic, in the same order, as katz.engines.torch.vae.VaeDecoderEngine:
        # computed in the VAE's dtype (float32 for a force_upcast VAE in a float16 export), the image
        # returned in the latents' dtype
        io_dtype = latents.dtype
        latents = latents.to(self.net.dtype)
        if self.mean is not None:
            mean = torch.tensor(self.mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(self.std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / self.scaling_factor + mean
        else:
            latents = latents / self.scaling_factor
        return self.net.decode(latents, return_dict=False)[0].to(io_dtype)


class VaeDecoderGraph(Graph):
    name = "vae_decoder"
    model = "vae_decoder"
    component = "vae"

    @property
    def latent_channels(self) -> int:
        return self.folder.vae_config.get("latent_channels", 4)

    @property
    def inputs(self):
        return [TensorSpec("latents", "float", ("batch", self.latent_channels, "height", "width"))]

    @property
    def outputs(self):
        return [TensorSpec("image", "float", ("batch", 3, "image_height", "image_width"))]

    def shapes(self, shape):
        s = self.folder.vae_scale_factor
        return {"latents": (shape.batch, self.latent_channels, shape.height // s, shape.width // s)}

    def profile(self, ranges):
        # the pipeline decodes one image at a time
        prof = super().profile(ranges)
        return {k: tuple((1, *s[1:]) for s in v) for k, v in prof.items()}

    def load(self, dtype):
        from katz.engines.torch.vae import vae_compute_dtype

        return self.folder.load_vae("cpu", vae_compute_dtype(self.folder.vae_config, dtype))

    def wrapper(self, component):
        return _VaeDecoderWrapper(component)

    def reference(self, component, inputs):
        from katz.engines.torch.vae import VaeDecoderEngine

        engine = VaeDecoderEngine(preloaded(self.folder, vae=component), "cpu", inputs["latents"].dtype)
        return {"image": engine(inputs["latents"])}

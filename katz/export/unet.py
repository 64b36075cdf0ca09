"""The UNet: the full graph (ControlNet residuals as inputs) and its down/up split.

``unet``: ``sample [B, C, h, w]``, ``timestep [B]`` (fp32), ``encoder_hidden_states [B, 77, D]``,
SDXL ``text_embeds [B, P]`` and ``time_ids [B, 6]``, ``down_residual_0..N-1`` and
``mid_residual`` -> ``noise_pred [B, C, h, w]``. The names are the Triton ``unet`` model's.
Without a ControlNet the engine feeds zero residuals: ``x + 0 == x`` exactly, so one graph
serves both cases.

ControlNet parallelism: the residuals only enter after the down and mid blocks, so the UNet's
first half can run while the ControlNets do. ``unet_down`` is that half (-> ``skip_0..N-1``,
``mid_sample``, ``temb``) and ``unet_up`` the rest (skips + residuals -> ``noise_pred``).
Latent parallelism (the CFG pair split across GPUs, or latent tiles) needs only batch 1 and
smaller latents, which the dynamic batch and size axes cover.
"""

from __future__ import annotations

import torch

from katz.errors import ExportError
from katz.export.graph import Graph
from katz.models.shapes import TEXT_LEN, Shape, TensorSpec
from katz.models.unet import UNetLayout, sample_conditioning, unet_down, unet_up


class _UNetGraphBase(Graph):
    component = "unet"
    lora_component = "unet"
    refit = True

    def __init__(self, folder):
        super().__init__(folder)
        self.layout = UNetLayout(folder)

    def load(self, dtype):
        return self.folder.load_unet("cpu", dtype)

    def latent(self, shape: Shape) -> tuple[int, int]:
        s = self.folder.vae_scale_factor
        return shape.height // s, shape.width // s

    def sample_value(self, spec, shape, dtype, gen):
        value = sample_conditioning(spec.name, shape, dtype, gen)
        if value is not None:
            return value
        if spec.name.startswith(("down_residual_", "mid_residual")):
            return (torch.randn(shape, generator=gen) * 0.5).to(dtype)
        return torch.randn(shape, generator=gen).to(dtype)


# --------------------------------------------------------------------------- #
# The full UNet
# --------------------------------------------------------------------------- #
class _UNetWrapper(torch.nn.Module):
    def __init__(self, unet, sdxl: bool):
        super().__init__()
        self.net, self.sdxl = unet, sdxl

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        added = None
        if self.sdxl:
            added, rest = {"text_embeds": rest[0], "time_ids": rest[1]}, rest[2:]
        return self.net(
            sample,
            timestep,
            encoder_hidden_states=encoder_hidden_states,
            added_cond_kwargs=added,
            down_block_additional_residuals=list(rest[:-1]),
            mid_block_additional_residual=rest[-1],
            return_dict=False,
        )[0]


class UNetGraph(_UNetGraphBase):
    """The UNet with ControlNet residuals as inputs (the Triton ``unet`` model's tensors)."""

    name = "unet"
    model = "unet"

    @property
    def inputs(self):
        return self.layout.conditioning_specs() + self.layout.residual_specs("down_residual_", "mid_residual")

    @property
    def outputs(self):
        return [TensorSpec("noise_pred", "float", ("batch", self.layout.out_channels, "height", "width"))]

    def shapes(self, shape):
        h, w = self.latent(shape)
        out = self.layout.conditioning_shapes(shape.batch, h, w)
        out.update(self.layout.residual_shapes("down_residual_", "mid_residual", shape.batch, h, w))
        return out

    def wrapper(self, component):
        return _UNetWrapper(component, self.layout.sdxl)

    def reference(self, component, inputs):
        # what katz.engines.torch.unet.UNetEngine.__call__ runs: diffusers' forward
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]} if self.layout.sdxl else None
        n = len(self.layout.residuals)
        with torch.no_grad():
            noise = component(
                inputs["sample"],
                inputs["timestep"],
                encoder_hidden_states=inputs["encoder_hidden_states"],
                added_cond_kwargs=added,
                down_block_additional_residuals=[inputs[f"down_residual_{i}"] for i in range(n)],
                mid_block_additional_residual=inputs["mid_residual"],
                return_dict=False,
            )[0]
        return {"noise_pred": noise}


# --------------------------------------------------------------------------- #
# The split: down (+ mid) and up
# --------------------------------------------------------------------------- #
def _check_splittable(unet) -> None:
    cfg = unet.config
    problems = []
    if cfg.get("class_embed_type") is not None or cfg.get("num_class_embeds") is not None:
        problems.append("class embeddings")
    if cfg.get("addition_embed_type") not in (None, "text_time"):
        problems.append(f"addition_embed_type={cfg.get('addition_embed_type')}")
    if cfg.get("encoder_hid_dim_type") is not None:
        problems.append("encoder_hid_proj")
    if getattr(unet, "position_net", None) is not None:
        problems.append("GLIGEN")
    if problems:
        raise ExportError(f"the UNet down/up split does not support {', '.join(problems)}")


class _DownWrapper(torch.nn.Module):
    def __init__(self, unet, sdxl):
        super().__init__()
        self.net, self.sdxl = unet, sdxl

    def forward(self, sample, timestep, encoder_hidden_states, *added):
        cond = {"text_embeds": added[0], "time_ids": added[1]} if self.sdxl else None
        skips, mid, temb = unet_down(self.net, sample, timestep, encoder_hidden_states, cond)
        return (*skips, mid, temb)


class _UpWrapper(torch.nn.Module):
    def __init__(self, unet, n: int):
        super().__init__()
        self.net, self.n = unet, n

    def forward(self, *args):
        n = self.n
        skips, residuals = args[:n], args[n : 2 * n]
        mid, mid_res, temb, hidden = args[2 * n : 2 * n + 4]
        return unet_up(self.net, skips, residuals, mid, mid_res, temb, hidden)


class UNetDownGraph(_UNetGraphBase):
    """``unet_down``: conditioning -> ``skip_0..N-1``, ``mid_sample``, ``temb``."""

    name = "unet_down"
    model = "unet"

    @property
    def temb_dim(self) -> int:
        return self.folder.unet_config["block_out_channels"][0] * 4

    @property
    def inputs(self):
        return self.layout.conditioning_specs()

    @property
    def outputs(self):
        temb = TensorSpec("temb", "float", ("batch", self.temb_dim))
        return self.layout.residual_specs("skip_", "mid_sample") + [temb]

    def shapes(self, shape):
        h, w = self.latent(shape)
        return self.layout.conditioning_shapes(shape.batch, h, w)

    def load(self, dtype):
        unet = super().load(dtype)
        _check_splittable(unet)
        return unet

    def wrapper(self, component):
        return _DownWrapper(component, self.layout.sdxl)


class UNetUpGraph(_UNetGraphBase):
    """``unet_up``: skips + ControlNet residuals + ``mid_sample``, ``temb`` -> ``noise_pred``."""

    name = "unet_up"
    model = "unet"

    @property
    def temb_dim(self) -> int:
        return self.folder.unet_config["block_out_channels"][0] * 4

    @property
    def inputs(self):
        skips = self.layout.residual_specs("skip_", "mid_sample")
        residuals = self.layout.residual_specs("down_residual_", "mid_residual")
        return (
            skips[:-1] + residuals[:-1] + [skips[-1], residuals[-1]]
            + [TensorSpec("temb", "float", ("batch", self.temb_dim)), self.layout.conditioning_specs()[2]]
        )

    @property
    def outputs(self):
        return [TensorSpec("noise_pred", "float", ("batch", self.layout.out_channels, "height", "width"))]

    def shapes(self, shape):
        h, w = self.latent(shape)
        out = self.layout.residual_shapes("skip_", "mid_sample", shape.batch, h, w)
        out.update(self.layout.residual_shapes("down_residual_", "mid_residual", shape.batch, h, w))
        out["temb"] = (shape.batch, self.temb_dim)
        out["encoder_hidden_states"] = (shape.batch, TEXT_LEN, self.layout.cross_dim)
        return out

    def load(self, dtype):
        unet = super().load(dtype)
        _check_splittable(unet)
        return unet

    def wrapper(self, component):
        return _UpWrapper(component, len(self.layout.residuals))

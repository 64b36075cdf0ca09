"""The UNet as Katz sees it: its tensor layout, example inputs, and its forward in two halves.

:class:`UNetLayout` gives the residual/skip channels and resolution levels from the UNet config;
:func:`unet_example_inputs` random inputs of one step (warm-up, CUDA-graph capture, benchmarks).

The forward in two halves is for ControlNet-as-a-Service.

The ControlNet residuals are only needed after the mid block, so ``unet_down``
(time embedding, ``conv_in``, down and mid blocks) can run while the
ControlNets compute them; ``unet_up`` adds them and runs the rest. The same ops
as diffusers' ``UNet2DConditionModel.forward`` for SD 1.5 / SDXL
configurations; up-sampling sizes always come from the skips, which gives the
same result and keeps exported graphs shape-generic. Used by the PyTorch UNet
engine and by the ONNX export of the split UNet.
"""

from __future__ import annotations

import torch

from katz.models.shapes import TEXT_LEN, TensorSpec, down_sizes


def unet_down(unet, sample, timestep, encoder_hidden_states, added_cond=None):
    """UNet2DConditionModel.forward up to and including the mid block (what ControlNets don't feed).

    Returns ``(skips, mid_sample, temb)``; ``skips`` are the down-block outputs that the up blocks
    take as skip connections, before the ControlNet residuals are added.
    """
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond or {})
    if aug is not None:
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(encoder_hidden_states, added_cond or {})
    sample = unet.conv_in(sample)
    skips = (sample,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        skips += res
    if unet.mid_block is not None:
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample = unet.mid_block(sample, emb)
    return skips, sample, emb


def unet_up(unet, skips, down_residuals, mid_sample, mid_residual, temb, encoder_hidden_states):
    """The rest of the forward: add the residuals, run the up blocks and the output head.

    Up-sampling sizes are always taken from the skips, so any latent size works."""
    if down_residuals is not None:
        skips = tuple(s + r for s, r in zip(skips, down_residuals))
        mid_sample = mid_sample + mid_residual
    sample = mid_sample
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        res, skips = skips[-n:], skips[:-n]
        size = skips[-1].shape[2:] if i < len(unet.up_blocks) - 1 else None
        if getattr(block, "has_cross_attention", False):
            sample = block(
                hidden_states=sample, temb=temb, res_hidden_states_tuple=res,
                encoder_hidden_states=encoder_hidden_states, upsample_size=size,
            )
        else:
            sample = block(hidden_states=sample, temb=temb, res_hidden_states_tuple=res, upsample_size=size)
    if unet.conv_norm_out is not None:
        sample = unet.conv_act(unet.conv_norm_out(sample))
    return unet.conv_out(sample)


class UNetLayout:
    """Residual/skip tensor channels and resolution levels, from the UNet config."""

    def __init__(self, folder):
        cfg = folder.unet_config
        self.sdxl = folder.family == "sdxl"
        self.in_channels = cfg["in_channels"]
        self.out_channels = cfg.get("out_channels", self.in_channels)
        self.cross_dim = cfg["cross_attention_dim"]
        if isinstance(self.cross_dim, (list, tuple)):
            self.cross_dim = self.cross_dim[0]
        self.pooled_dim = (
            cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"] if self.sdxl else 0
        )
        channels = cfg["block_out_channels"]
        blocks = len(cfg["down_block_types"])
        layers = cfg.get("layers_per_block", 2)
        layers = layers if isinstance(layers, (list, tuple)) else [layers] * blocks
        self.levels = blocks - 1  # number of down-samplers
        # (channels, level) of conv_in, every resnet and every down-sampler, then the mid block
        res = [(channels[0], 0)]
        for i in range(blocks):
            res += [(channels[i], i)] * layers[i]
            if i < blocks - 1:
                res.append((channels[i], i + 1))
        self.residuals = res
        self.mid = (channels[-1], blocks - 1)
        if len(res) != folder.num_down_residuals:
            raise ValueError(f"UNet layout gives {len(res)} residuals, the folder says {folder.num_down_residuals}")

    @staticmethod
    def level_dims(level: int) -> tuple[str, str]:
        return ("height", "width") if level == 0 else (f"height_{level}", f"width_{level}")

    def residual_specs(self, prefix: str, mid_name: str) -> list[TensorSpec]:
        specs = [
            TensorSpec(f"{prefix}{i}", "float", ("batch", c, *self.level_dims(lvl)))
            for i, (c, lvl) in enumerate(self.residuals)
        ]
        c, lvl = self.mid
        specs.append(TensorSpec(mid_name, "float", ("batch", c, *self.level_dims(lvl))))
        return specs

    def residual_shapes(self, prefix: str, mid_name: str, batch: int, h: int, w: int) -> dict[str, tuple]:
        hs, ws = down_sizes(h, self.levels), down_sizes(w, self.levels)
        out = {f"{prefix}{i}": (batch, c, hs[lvl], ws[lvl]) for i, (c, lvl) in enumerate(self.residuals)}
        c, lvl = self.mid
        out[mid_name] = (batch, c, hs[lvl], ws[lvl])
        return out

    def conditioning_specs(self) -> list[TensorSpec]:
        specs = [
            TensorSpec("sample", "float", ("batch", self.in_channels, "height", "width")),
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("encoder_hidden_states", "float", ("batch", TEXT_LEN, self.cross_dim)),
        ]
        if self.sdxl:
            specs += [
                TensorSpec("text_embeds", "float", ("batch", self.pooled_dim)),
                TensorSpec("time_ids", "float", ("batch", 6)),
            ]
        return specs

    def conditioning_shapes(self, batch: int, h: int, w: int) -> dict[str, tuple]:
        out = {
            "sample": (batch, self.in_channels, h, w),
            "timestep": (batch,),
            "encoder_hidden_states": (batch, TEXT_LEN, self.cross_dim),
        }
        if self.sdxl:
            out.update(text_embeds=(batch, self.pooled_dim), time_ids=(batch, 6))
        return out


def sample_conditioning(name: str, shape: tuple, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor | None:
    """Realistic values for the conditioning inputs shared by the UNet and ControlNet graphs."""
    if name == "timestep":
        return torch.randint(0, 1000, shape, generator=gen).to(dtype)
    if name == "time_ids":  # (orig h, orig w, crop top, crop left, target h, target w)
        return torch.randint(0, 1024, shape, generator=gen).to(dtype)
    return None


def unet_example_inputs(folder, batch: int, height: int, width: int, device, dtype) -> dict:
    """Random inputs of one UNet step for an image of ``height x width`` pixels (for warm-up)."""
    cfg = folder.unet_config
    f = folder.vae_scale_factor
    x = {
        "sample": torch.randn(batch, cfg["in_channels"], height // f, width // f, device=device, dtype=dtype),
        "timestep": torch.full((batch,), 500.0, device=device),
        "encoder_hidden_states": torch.randn(batch, 77, cfg["cross_attention_dim"], device=device, dtype=dtype),
        "added_cond": None,
    }
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        x["added_cond"] = {
            "text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
            "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * batch, device=device, dtype=dtype),
        }
    return x

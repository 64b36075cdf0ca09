"""Test inputs as real model downloads look: variant-only folders, pickle-only folders, and single-file
checkpoints in the original (A1111 / ComfyUI) layout written from a diffusers folder's weights.

The original names are the inverse of diffusers' single-file conversion, written out here (diffusers
ships only the forward direction) so that the tests check Katz's loading against an independent map.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))


def _rename(sd: dict, prefixes: list[tuple[str, str]], inner=()) -> dict:
    """Each key's longest matching diffusers prefix replaced by its original one; ``inner`` renames
    applied after a prefix that ends in a resnet."""
    out = {}
    for key, value in sd.items():
        new = key
        for old, repl in sorted(prefixes, key=lambda p: -len(p[0])):
            if key.startswith(old):
                rest = key[len(old):]
                if ".resnets." in old or old.startswith("mid_block.resnets"):
                    for a, b in inner:
                        rest = rest.replace(a, b)
                new = repl + rest
                break
        out[new] = value
    return out


def unet_to_original(sd: dict, cfg: dict, controlnet: bool = False) -> dict:
    """A diffusers UNet / ControlNet state dict under the original ``input_blocks`` / ``output_blocks`` names."""
    layers, n = cfg["layers_per_block"], len(cfg["down_block_types"])
    m = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
         ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
         ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
         ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
         ("mid_block.resnets.1.", "middle_block.2.")]
    for i in range(n):
        for j in range(layers):
            m += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(layers + 1) * i + j + 1}.0."),
                  (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(layers + 1) * i + j + 1}.1.")]
        if i < n - 1:
            m.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(layers + 1) * (i + 1)}.0.op."))
        if controlnet:
            continue
        for j in range(layers + 1):
            m += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(layers + 1) * i + j}.0."),
                  (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(layers + 1) * i + j}.1.")]
        if i < n - 1:
            with_attention = "CrossAttn" in cfg["up_block_types"][i]
            m.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(layers + 1) * i + layers}.{2 if with_attention else 1}."))
    if controlnet:
        blocks = len(cfg["conditioning_embedding_out_channels"]) - 1
        m += [("controlnet_cond_embedding.conv_in.", "input_hint_block.0."),
              ("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * (2 * blocks + 1)}."),
              ("controlnet_mid_block.", "middle_block_out.0.")]
        m += [(f"controlnet_cond_embedding.blocks.{i}.", f"input_hint_block.{2 * (i + 1)}.") for i in range(2 * blocks)]
        m += [(f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0.") for i in range(1 + n * layers + n - 1)]
    return _rename(sd, m, _RESNET)


def vae_to_original(sd: dict, cfg: dict) -> dict:
    n, layers = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    m = [(f"{p}.conv_norm_out.", f"{p}.norm_out.") for p in ("encoder", "decoder")]
    m += [(f"{p}.mid_block.resnets.{i}.", f"{p}.mid.block_{i + 1}.") for p in ("encoder", "decoder") for i in range(2)]
    for i in range(n):
        m += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(layers)]
        m += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.") for j in range(layers + 1)]
        if i < n - 1:
            m += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]
    out = _rename(sd, m, [("conv_shortcut", "nin_shortcut")])
    # the mid-block attention: 1x1 convolutions named q, k, v, proj_out in the original
    for key in [k for k in out if ".mid_block.attentions.0." in k]:
        part = key.split(".")[0]
        name = key.split("mid_block.attentions.0.")[1]
        for a, b in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")):
            name = name.replace(a, b) if name.startswith(a) else name
        value = out.pop(key)
        out[f"{part}.mid.attn_1.{name}"] = value[:, :, None, None] if value.ndim == 2 else value
    return out


def clip_to_original(sd: dict) -> dict:
    """transformers CLIPTextModel names as SD checkpoints hold them (under ``text_model.``)."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def open_clip_to_original(sd: dict) -> dict:
    """CLIPTextModelWithProjection in OpenCLIP's layout (SDXL's second text encoder): fused q/k/v."""
    out = {"positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].T.contiguous()}
    layers = {int(k.split(".")[3]) for k in sd if k.startswith("text_model.encoder.layers.")}
    for i in sorted(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[dst + f"attn.in_proj_{p}"] = __import__("torch").cat(
                [sd[src + f"self_attn.{q}_proj.{p}"] for q in "qkv"])
            out[dst + f"attn.out_proj.{p}"] = sd[src + f"self_attn.out_proj.{p}"]
            out[dst + f"ln_1.{p}"] = sd[src + f"layer_norm1.{p}"]
            out[dst + f"ln_2.{p}"] = sd[src + f"layer_norm2.{p}"]
            out[dst + f"mlp.c_fc.{p}"] = sd[src + f"mlp.fc1.{p}"]
            out[dst + f"mlp.c_proj.{p}"] = sd[src + f"mlp.fc2.{p}"]
    return out


def _weights(part_dir: Path) -> dict:
    files = sorted(part_dir.glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(files[0])


def write_checkpoint(folder: Path, out: Path) -> Path:
    """The diffusers model ``folder`` as one original-layout ``.safetensors`` (as A1111 / ComfyUI save it)."""
    sdxl = (folder / "text_encoder_2").is_dir()
    cfg = lambda part: json.loads((folder / part / "config.json").read_text())  # noqa: E731
    state = {}
    state.update({"model.diffusion_model." + k: v for k, v in unet_to_original(_weights(folder / "unet"), cfg("unet")).items()})
    state.update({"first_stage_model." + k: v for k, v in vae_to_original(_weights(folder / "vae"), cfg("vae")).items()})
    te_prefix = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
    state.update({te_prefix + k: v for k, v in clip_to_original(_weights(folder / "text_encoder")).items()})
    if sdxl:
        state.update({"conditioner.embedders.1.model." + k: v
                      for k, v in open_clip_to_original(_weights(folder / "text_encoder_2")).items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def write_controlnet_checkpoint(folder: Path, out: Path) -> Path:
    """A diffusers ControlNet folder as one original-layout file (``control_model.`` names, as lllyasviel's)."""
    cfg = json.loads((folder / "config.json").read_text())
    state = {"control_model." + k: v for k, v in unet_to_original(_weights(folder), cfg, controlnet=True).items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out


def variant_only_copy(folder: Path, out: Path, variant: str = "fp16") -> Path:
    """``folder`` with every weight file renamed to its ``variant`` name (``unet/diffusion_pytorch_model.fp16.safetensors``,
    ...), as a download of only the fp16 files leaves it; the weights themselves are unchanged."""
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("loras"))
    for f in list(out.rglob("*.safetensors")):
        f.rename(f.with_name(f"{f.stem}.{variant}.safetensors"))
    return out


def pickle_only_copy(folder: Path, out: Path) -> Path:
    """``folder`` with its UNet and first text encoder as pickles (``.bin``), as old downloads hold them."""
    import torch

    shutil.copytree(folder, out, ignore=shutil.ignore_patterns("loras"))
    for part, name in (("unet", "diffusion_pytorch_model"), ("text_encoder", "pytorch_model")):
        (f,) = (out / part).glob("*.safetensors")
        torch.save(load_file(f), out / part / f"{name}.bin")
        f.unlink()
    return out

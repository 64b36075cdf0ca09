"""Seeded random LoRA files on a model's attention projections (tests, presets, benchmarks)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch

from katz.lora.flux_names import flux_target
from katz.lora.safetensors import DIFFUSERS_METADATA_KEY

_UNET_ATTN_RE = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_FLUX_ATTN_RE = re.compile(
    r"^(transformer_blocks|single_transformer_blocks)\.\d+\.attn\."
    r"(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
)
# CLIPTextModel has no 'text_model.' level in transformers>=5; CLIPTextModelWithProjection has.
_TE_ATTN_RE = re.compile(r"^(text_model\.)?encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")


def _targets(module: torch.nn.Module | None, pattern: re.Pattern) -> Iterable[tuple[str, torch.nn.Linear]]:
    if module is None:
        return []
    return [(n, m) for n, m in module.named_modules() if pattern.search(n) and isinstance(m, torch.nn.Linear)]


def make_random_lora(
    path: str | Path,
    unet: torch.nn.Module | None,
    text_encoders: Mapping[str, torch.nn.Module],
    rank: int,
    seed: int,
    fmt: str,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write a seeded random LoRA (``.safetensors``) on the attention projections.

    Targets to_q/to_k/to_v/to_out.0 of every UNet transformer block and q/k/v/out_proj of every
    text-encoder layer. ``down ~ N(0, 1) / sqrt(in)``, ``up ~ N(0, 1) / sqrt(r)``, alpha = r / 2,
    so each delta has std ``0.5 / sqrt(in)`` (comparable to the weights). fmt 'peft': diffusers
    names, alpha in diffusers' ``lora_adapter_metadata`` header; fmt 'kohya': kohya names
    (``lora_te_`` for a lone text_encoder, else ``lora_te1_`` / ``lora_te2_``) with ``.alpha``
    tensors. Both load with diffusers' ``pipe.load_lora_weights(folder, weight_name=...)``.
    ``dtype`` is the dtype of the down/up weights (drawn in float32, then cast; kohya alphas stay
    float32): a rank-64 SDXL UNet LoRA takes 186 MB in float16, 372 MB in float32.
    """
    layers = [(p, "lora_unet_" + p.replace(".", "_"), lin.in_features, lin.out_features)
              for p, lin in _targets(unet, _UNET_ATTN_RE)]
    _write(path, "unet", layers, text_encoders, rank, seed, fmt, dtype)


def make_random_flux_lora(
    path: str | Path,
    transformer: torch.nn.Module,
    text_encoder: torch.nn.Module | None,
    rank: int,
    seed: int,
    fmt: str,
    dtype: torch.dtype = torch.float32,
    pattern: re.Pattern | None = None,
) -> None:
    """:func:`make_random_lora` for a FLUX.1 ``FluxTransformer2DModel`` (and its CLIP text encoder).

    fmt 'peft': diffusers names on the attention projections of every double block (image and
    text) and single block. fmt 'kohya': the original FLUX layer names, fused as there
    (``img_attn_qkv`` is one layer over to_q, to_k and to_v; :mod:`katz.lora.flux_names`), on the
    double blocks' attention and the single blocks' ``linear2``, and ``lora_te1_`` names on the
    text encoder. (Not on ``linear1``: diffusers' kohya loader, the reference the tests hold Katz
    to, splits it at full-size FLUX widths only.) ``pattern`` (peft only): the linears targeted, by
    module path, instead of the attention projections (a benchmark's LoRA on the feed-forwards too).
    """
    if pattern is not None and fmt != "peft":
        raise ValueError("pattern is for fmt 'peft' only")
    if fmt == "peft":
        layers = [(p, "", lin.in_features, lin.out_features)
                  for p, lin in _targets(transformer, pattern or _FLUX_ATTN_RE)]
    else:
        modules = dict(transformer.named_modules())
        flats = [f"double_blocks_{i}_{part}" for i in range(len(transformer.transformer_blocks))
                 for part in ("img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj")]
        flats += [f"single_blocks_{i}_linear2" for i in range(len(transformer.single_transformer_blocks))]
        layers = []
        for flat in flats:
            parts = [modules[p] for p, _ in flux_target(flat).parts]
            layers.append(("", "lora_unet_" + flat, parts[0].in_features, sum(m.out_features for m in parts)))
    encoders = {"text_encoder": text_encoder} if text_encoder is not None else {}
    # FLUX's kohya files name the CLIP encoder lora_te1_ (its T5 would be lora_te2_)
    _write(path, "transformer", layers, encoders, rank, seed, fmt, dtype, te_prefix={"text_encoder": "lora_te1_"})


def _write(path, component, layers, text_encoders, rank, seed, fmt, dtype, te_prefix=None) -> None:
    """Draw and save the LoRA: ``layers`` = [(peft module path, kohya stem, in, out)] of the
    denoiser ``component``, then the text encoders' attention projections."""
    from safetensors.torch import save_file

    if fmt not in ("peft", "kohya"):
        raise ValueError(f"unknown LoRA format {fmt!r}; expected 'peft' or 'kohya'")
    unknown = set(text_encoders) - {"text_encoder", "text_encoder_2"}
    if unknown:
        raise ValueError(f"unknown text encoder component(s) {sorted(unknown)}")
    gen = torch.Generator().manual_seed(seed)
    alpha = rank / 2
    if te_prefix is None:
        te_prefix = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
        if "text_encoder_2" not in text_encoders:
            te_prefix["text_encoder"] = "lora_te_"
    parts = [(component, layers)]
    for c in ("text_encoder", "text_encoder_2"):
        if c in text_encoders:
            # Files always say 'text_model.encoder...' (kohya: 'text_model_encoder_...').
            te = [("text_model." + p.removeprefix("text_model."), "", lin.in_features, lin.out_features)
                  for p, lin in _targets(text_encoders[c], _TE_ATTN_RE)]
            parts.append((c, [(p, te_prefix[c] + p.replace(".", "_"), i, o) for p, _, i, o in te]))

    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, object] = {}
    for comp, targets in parts:
        if not targets:
            continue
        for mod_path, stem, fan_in, fan_out in targets:
            down = torch.randn(rank, fan_in, generator=gen) / math.sqrt(fan_in)
            up = torch.randn(fan_out, rank, generator=gen) / math.sqrt(rank)
            if fmt == "peft":
                tensors[f"{comp}.{mod_path}.lora_A.weight"] = down.to(dtype).contiguous()
                tensors[f"{comp}.{mod_path}.lora_B.weight"] = up.to(dtype).contiguous()
            else:
                tensors[f"{stem}.lora_down.weight"] = down.to(dtype).contiguous()
                tensors[f"{stem}.lora_up.weight"] = up.to(dtype).contiguous()
                tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if fmt == "peft":
            metadata[f"{comp}.r"] = rank
            metadata[f"{comp}.lora_alpha"] = alpha
            # peft matches target_modules by suffix, so the short text-encoder paths fit both
            # CLIPTextModel layouts (with and without 'text_model.').
            metadata[f"{comp}.target_modules"] = sorted(t[0].removeprefix("text_model.") for t in targets)
    if not tensors:
        raise ValueError("no attention projections found to put a LoRA on")
    # One header entry only: safetensors writes the header map in arbitrary order, and the
    # files must come out byte-identical for the same seed.
    header = {DIFFUSERS_METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata else {"format": "pt"}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)

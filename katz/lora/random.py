"""Seeded random LoRA files on a model's attention projections (tests, presets, benchmarks)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch

from katz.lora.safetensors import DIFFUSERS_METADATA_KEY

_UNET_ATTN_RE = re.compile(r"(^|\.)transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
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
    from safetensors.torch import save_file

    if fmt not in ("peft", "kohya"):
        raise ValueError(f"unknown LoRA format {fmt!r}; expected 'peft' or 'kohya'")
    unknown = set(text_encoders) - {"text_encoder", "text_encoder_2"}
    if unknown:
        raise ValueError(f"unknown text encoder component(s) {sorted(unknown)}")
    gen = torch.Generator().manual_seed(seed)
    alpha = rank / 2
    te_prefix = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    if "text_encoder_2" not in text_encoders:
        te_prefix["text_encoder"] = "lora_te_"
    parts = [("unet", unet, _UNET_ATTN_RE, "lora_unet_")]
    for c in ("text_encoder", "text_encoder_2"):
        if c in text_encoders:
            parts.append((c, text_encoders[c], _TE_ATTN_RE, te_prefix[c]))

    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, object] = {}
    for component, module, pattern, kohya_prefix in parts:
        targets = _targets(module, pattern)
        if not targets:
            continue
        short_paths = []
        for mod_path, lin in targets:
            if component != "unet":
                # Files always say 'text_model.encoder...' (kohya: 'text_model_encoder_...').
                short_paths.append(mod_path.removeprefix("text_model."))
                mod_path = "text_model." + short_paths[-1]
            else:
                short_paths.append(mod_path)
            down = torch.randn(rank, lin.in_features, generator=gen) / math.sqrt(lin.in_features)
            up = torch.randn(lin.out_features, rank, generator=gen) / math.sqrt(rank)
            if fmt == "peft":
                tensors[f"{component}.{mod_path}.lora_A.weight"] = down.to(dtype).contiguous()
                tensors[f"{component}.{mod_path}.lora_B.weight"] = up.to(dtype).contiguous()
            else:
                stem = kohya_prefix + mod_path.replace(".", "_")
                tensors[f"{stem}.lora_down.weight"] = down.to(dtype).contiguous()
                tensors[f"{stem}.lora_up.weight"] = up.to(dtype).contiguous()
                tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if fmt == "peft":
            metadata[f"{component}.r"] = rank
            metadata[f"{component}.lora_alpha"] = alpha
            # peft matches target_modules by suffix, so the short text-encoder paths fit both
            # CLIPTextModel layouts (with and without 'text_model.').
            metadata[f"{component}.target_modules"] = sorted(short_paths)
    if not tensors:
        raise ValueError("no attention projections found to put a LoRA on")
    # One header entry only: safetensors writes the header map in arbitrary order, and the
    # files must come out byte-identical for the same seed.
    header = {DIFFUSERS_METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata else {"format": "pt"}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)

"""The original FLUX.1 layer names (Black Forest Labs' layout, which kohya/sd-scripts LoRAs use)
as diffusers ``FluxTransformer2DModel`` module paths.

The original layout fuses layers diffusers keeps apart: a double block's ``img_attn_qkv`` is
diffusers' ``to_q``, ``to_k`` and ``to_v`` stacked on the output side, a single block's
``linear1`` is ``to_q``, ``to_k``, ``to_v`` and ``proj_mlp``. A LoRA on a fused layer is one
``down`` and an ``up`` whose rows are the parts' rows in that order, so it splits exactly into one
LoRA per part sharing ``down``.

The final adaLN projection (``final_layer_adaLN_modulation_1``) is left out: it orders its output
(shift, scale) and diffusers' ``norm_out.linear`` (scale, shift), so its ``up`` would have to be
copied with its halves swapped, which a LoRA streamed onto the device as views of the file's bytes
cannot do; such a file is refused naming the tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# a single block's MLP is mlp_ratio 4 wide: linear1's rows are 3 * dim (q, k, v) + 4 * dim
_SINGLE_LINEAR1 = (("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1), ("proj_mlp", 4))

_DOUBLE = {
    "img_attn_qkv": (("attn.to_q", 1), ("attn.to_k", 1), ("attn.to_v", 1)),
    "txt_attn_qkv": (("attn.add_q_proj", 1), ("attn.add_k_proj", 1), ("attn.add_v_proj", 1)),
    "img_attn_proj": (("attn.to_out.0", 1),),
    "txt_attn_proj": (("attn.to_add_out", 1),),
    "img_mlp_0": (("ff.net.0.proj", 1),),
    "img_mlp_2": (("ff.net.2", 1),),
    "txt_mlp_0": (("ff_context.net.0.proj", 1),),
    "txt_mlp_2": (("ff_context.net.2", 1),),
    "img_mod_lin": (("norm1.linear", 1),),
    "txt_mod_lin": (("norm1_context.linear", 1),),
}
_SINGLE = {
    "linear1": _SINGLE_LINEAR1,
    "linear2": (("proj_out", 1),),
    "modulation_lin": (("norm.linear", 1),),
}
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
}
_BLOCK_RE = re.compile(r"(double|single)_blocks_(\d+)_(\w+)")


@dataclass(frozen=True)
class FluxTarget:
    """Where one original-layout layer goes: ``parts`` = ((diffusers module path, relative rows), ...)
    in the order of the fused output rows."""

    parts: tuple[tuple[str, int], ...]

    def row_slices(self, rows: int) -> list[tuple[str, int, int]] | None:
        """``(path, first row, end row)`` of each part for a fused output of ``rows`` rows; None if
        ``rows`` does not divide into the parts."""
        unit, rest = divmod(rows, sum(w for _, w in self.parts))
        if rest or unit == 0:
            return None
        out, start = [], 0
        for path, weight in self.parts:
            out.append((path, start, start + weight * unit))
            start += weight * unit
        return out


def flux_target(flat: str) -> FluxTarget | None:
    """The diffusers module(s) of an original-layout FLUX layer name without the ``lora_unet_``
    prefix (``double_blocks_0_img_attn_qkv``); None if it is not one."""
    if flat in _TOP:
        return FluxTarget(((_TOP[flat], 1),))
    m = _BLOCK_RE.fullmatch(flat)
    if m is None:
        return None
    table, prefix = (_DOUBLE, "transformer_blocks") if m[1] == "double" else (_SINGLE, "single_transformer_blocks")
    parts = table.get(m[3])
    if parts is None:
        return None
    return FluxTarget(tuple((f"{prefix}.{m[2]}.{path}", w) for path, w in parts))


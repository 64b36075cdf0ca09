"""FP8 (e4m3) matrix multiplies for the UNet's, FLUX transformer's and ControlNets' transformer layers (Hopper, Ada).

Most of an SDXL UNet step's FLOPs are the linear layers of its transformer blocks (attention
projections, GEGLU feed-forward, ``proj_in`` / ``proj_out``). :func:`quantize_linears` swaps those
``nn.Linear`` modules for :class:`Fp8Linear`, which multiplies in float8 e4m3 with per-tensor
scales on the tensor cores (``torch._scaled_mm``, twice float16's rate on an H100/H200):

* the weight is quantized once at load, ``w8 = round_e4m3(w / sw)`` with ``sw = max|w| / 448``;
* each input is quantized on the fly the same way (one ``max|x|`` reduction and one cast, which
  ``torch.compile`` fuses into the producing kernels; uncompiled they are extra kernels);
* ``y = (x8 @ w8.T) * sx * sw + bias``, accumulated by the tensor cores and written in the
  input's dtype.

In a FLUX.1 transformer (and its ControlNets) the same swap takes the linears of every double and
single block (:data:`FLUX_TARGETS`: the image and text attention projections, both feed-forwards,
the single blocks' ``proj_mlp`` / ``proj_out``), ~70% of the 12 B parameters; the AdaLN modulation
linears (one token) and the embedders stay.

Convolutions, attention itself (softmax(QK^T)V), the cross-attention keys and values of the
77 text tokens (``attn2.to_k`` / ``to_v``), norms and embeddings stay in float16.

The float16 weight stays the module's ``weight`` parameter: LoRAs are merged there as before
(:class:`katz.lora.patch.LoraPatcher`, exact restore of the base), and :func:`requantize` then rewrites
the float8 copy of the modules a merge touched, in place, so captured CUDA graphs read the new
values. A restored base weight re-quantizes to the very bytes it had at load.

Measured by ``bench/gpu_bench.py --variants fp8`` on an H200 (bench/RESULTS.md, sixth session), the
SDXL 1024² step compiled + graph is **no faster** than float16 (32.9 vs 32.8 ms): the float8 GEMMs
save ~6 ms and the inputs' quantization (a whole-tensor max, then a cast, both reading the input)
costs as much; rowwise scales were slower (36.3 ms). The images move by PSNR ~31 dB (random weights).
Cheaper quantization (scales fixed ahead, so the cast fuses into the producing kernel) is what
would make it pay.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8 e4m3fn value
_MIN_SCALE = 1e-12  # an all-zero tensor quantizes to zeros, not NaN
# Hopper's fast fp8 accumulation (fewer promotions of the partial sums to float32), as torchao's
# float8 training uses for the forward pass
FAST_ACCUM = True

# the transformer layers' linears, by their diffusers module paths (UNet2DConditionModel,
# ControlNetModel): attention projections but the text keys/values, feed-forward, proj_in/out
_TARGETS = re.compile(
    r"(^|\.)attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
    r"(attn1\.(to_q|to_k|to_v|to_out\.0)|attn2\.(to_q|to_out\.0)|ff\.net\.(0\.proj|2)))$"
)
# a FLUX transformer's or FLUX ControlNet's block linears (FluxTransformerBlock, FluxSingleTransformerBlock):
# where the step's FLOPs are, thousands of tokens each; not the per-block AdaLN linears (norm1.linear,
# one row: no tensor-core work to save)
FLUX_TARGETS = re.compile(
    r"(^|\.)(transformer_blocks|single_transformer_blocks)\.\d+\."
    r"(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff(_context)?\.net\.(0\.proj|2)|proj_mlp|proj_out)$"
)


def fp8_capable(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies float8 on its tensor cores (CUDA compute capability 8.9+)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def tensor_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale ``max|x| / 448`` as a float32 0-d tensor (no host sync)."""
    return (x.abs().amax().float() / FP8_MAX).clamp(min=_MIN_SCALE)


def row_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-row scales ``max_j |x[i, j]| / 448`` of a 2-D ``x`` as float32 ``[rows, 1]``."""
    return (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=_MIN_SCALE)


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` rounded to float8 e4m3 (clamped to its finite range)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


class Fp8Linear(torch.nn.Linear):
    """``nn.Linear`` that multiplies in float8; ``weight`` (and ``bias``) keep their dtype.

    Buffers: ``weight_fp8 [out, in]`` float8 e4m3 and ``weight_scale`` (float32), made from
    ``weight`` by :meth:`requantize` (call it after changing ``weight``; :func:`requantize` does
    it for many modules at once). ``in_features`` and ``out_features`` must be multiples of 16.

    ``rowwise``: one scale per output channel of the weight (``weight_scale [1, out]``) and per
    row (token) of the input, instead of one per tensor (0-d): finer, and the input's scales
    come from a per-row reduction that fuses with the cast (cuBLAS writes such a product in
    bfloat16, converted to the input's dtype).
    """

    rowwise = False

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, rowwise: bool = False) -> "Fp8Linear":
        """An Fp8Linear sharing ``linear``'s weight and bias parameters."""
        if linear.in_features % 16 or linear.out_features % 16:
            raise ValueError(f"fp8 linears need in/out features that are multiples of 16, "
                             f"not {linear.in_features} -> {linear.out_features}")
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        w = linear.weight
        new.register_buffer("weight_fp8", torch.empty(w.shape, dtype=FP8, device=w.device), persistent=False)
        new.rowwise = rowwise
        new.register_buffer("weight_scale", torch.ones((1, w.shape[0]) if rowwise else (), dtype=torch.float32,
                                                       device=w.device), persistent=False)
        new.requantize()
        return new

    @torch.no_grad()
    def requantize(self) -> None:
        requantize([self])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in]`` -> ``[..., out]`` in ``x``'s dtype."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        sx = row_scale(x2) if self.rowwise else tensor_scale(x2)
        out_dtype = torch.bfloat16 if self.rowwise else x.dtype
        fused_bias = self.bias is not None and out_dtype == x.dtype and x.dtype in (torch.float16, torch.bfloat16)
        y = torch._scaled_mm(quantize(x2, sx).contiguous(), self.weight_fp8.t(), scale_a=sx,
                             scale_b=self.weight_scale, bias=self.bias.to(x.dtype) if fused_bias else None,
                             out_dtype=out_dtype, use_fast_accum=FAST_ACCUM).to(x.dtype)
        if self.bias is not None and not fused_bias:  # cuBLAS fuses no bias into a float32 output
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8=e4m3 {'rowwise' if self.rowwise else 'per tensor'}"


_REQUANT_SCRATCH_BYTES = 128 << 20  # float16 scratch per batch of weights in requantize


@torch.no_grad()
def requantize(modules: Iterable[torch.nn.Module]) -> None:
    """Rewrite ``weight_fp8`` / ``weight_scale`` of every :class:`Fp8Linear` in ``modules`` (others
    are skipped) from its current ``weight``, in place, with a few fused kernels per batch.

    Deterministic: the same weight always gives the same bytes (a restored base weight
    re-quantizes to what it was at load)."""
    modules = list(modules)
    mods = [m for m in modules if isinstance(m, Fp8Linear) and not m.rowwise]
    for m in modules:
        if isinstance(m, Fp8Linear) and m.rowwise:
            w = m.weight.detach()
            scale = row_scale(w)  # [out, 1]
            m.weight_fp8.copy_(quantize(w, scale))
            m.weight_scale.copy_(scale.t())
    start = 0
    while start < len(mods):
        batch, size = [], 0
        while start < len(mods) and (not batch or size < _REQUANT_SCRATCH_BYTES):
            m = mods[start]
            batch.append(m)
            size += m.weight.numel() * m.weight.element_size()
            start += 1
        weights = [m.weight.detach() for m in batch]
        amax = torch._foreach_norm(weights, float("inf"))
        scales = [(a.float() / FP8_MAX).clamp(min=_MIN_SCALE) for a in amax]
        scaled = torch._foreach_div([w.float() for w in weights], scales)
        torch._foreach_clamp_min_(scaled, -FP8_MAX)
        torch._foreach_clamp_max_(scaled, FP8_MAX)
        torch._foreach_copy_([m.weight_fp8 for m in batch], scaled)
        torch._foreach_copy_([m.weight_scale for m in batch], scales)


def fp8_targets(module: torch.nn.Module, targets: re.Pattern | None = None) -> list[tuple[str, torch.nn.Linear]]:
    """The linears :func:`quantize_linears` converts in ``module``: ``(path, module)`` in module order.
    ``targets``: the module paths taken (default: a diffusers UNet's or SD ControlNet's transformer
    linears; :data:`FLUX_TARGETS` for a FLUX transformer or ControlNet). Linears converted already
    are not listed again."""
    pattern = targets if targets is not None else _TARGETS
    return [(name, m) for name, m in module.named_modules()
            if type(m) is torch.nn.Linear and pattern.search(name)
            and m.in_features % 16 == 0 and m.out_features % 16 == 0]


def has_fp8(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds :class:`Fp8Linear` layers (whose float8 copies follow weight changes)."""
    return any(isinstance(m, Fp8Linear) for m in module.modules())


def quantize_linears(module: torch.nn.Module, rowwise: bool = False, targets: re.Pattern | None = None) -> list[str]:
    """Swap the transformer linears of ``module`` (``targets``: see :func:`fp8_targets`) for
    :class:`Fp8Linear` (sharing their weights); returns their paths. Do it before anything indexes
    the modules (a LoRA patcher, a compile)."""
    done = []
    for name, linear in fp8_targets(module, targets):
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, Fp8Linear.from_linear(linear, rowwise))
        done.append(name)
    return done

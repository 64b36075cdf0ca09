"""LoRA files: reading, parsing, and exact in-place merge/restore for PyTorch modules.

A LoRA adapts a Linear (weight ``[out, in]``) or Conv2d (weight ``[out, in, kh, kw]``) with
``down [r, in]`` / ``[r, in, kh, kw]`` and ``up [out, r]`` / ``[out, r, 1, 1]``:

    W' = W + sum_i  scale_i * (alpha / r) * (up @ down.flatten(1)).view_as(W)

``alpha`` absent means ``alpha == r`` (factor 1). Accepted key formats (see :func:`parse_lora`):

* diffusers/peft  ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha`` (also
  ``text_encoder.`` / ``text_encoder_2.``); older diffusers ``<path>.lora.down.weight`` /
  ``.lora.up.weight`` / ``.lora_linear_layer.down.weight`` and
  ``<path>.processor.to_q_lora.down.weight`` (these may lack the ``unet.`` prefix).
* kohya/A1111     ``lora_unet_<path, '.' -> '_'>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``; ``lora_te_`` (= text_encoder), ``lora_te1_`` / ``lora_te2_``. UNet names may be
  diffusers names or original-SD (ldm/sgm) names such as ``input_blocks_4_1_...``.
* FLUX.1: diffusers/peft (and ai-toolkit) ``transformer.<module path>.lora_A.weight``; kohya
  ``lora_unet_<original FLUX layer>`` (``double_blocks_0_img_attn_qkv``, ``single_blocks_1_linear1``),
  whose fused layers become one layer per diffusers module (:mod:`katz.lora.flux_names`).

Kohya names are flattened, so they only become module paths against a real module: either pass
``modules`` to :func:`parse_lora`, or (the serving path) leave them flattened (no ``.`` in the
key of ``LoraWeights.layers``) and :class:`LoraPatcher` resolves them against its module.
Text-encoder paths ``text_model.encoder...`` also match transformers>=5 ``CLIPTextModel``,
which has no ``text_model`` level (``encoder.layers.N...``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch

from katz.errors import lora_error
from katz.lora.flux_names import flux_target

COMPONENTS = {
    "sdxl": ("unet", "text_encoder", "text_encoder_2"),
    "sd15": ("unet", "text_encoder"),
    "flux": ("transformer", "text_encoder", "text_encoder_2"),
}
# UNet ``layers_per_block`` of the original-SD layouts (both SD 1.x and SDXL use 2); needed to
# turn ldm ``input_blocks.N`` / ``output_blocks.N`` numbers into diffusers block/layer indices.
_LAYERS_PER_BLOCK = {"sdxl": 2, "sd15": 2}


@dataclass
class LoraLayer:
    """One adapted module: ``down [r, in]`` (or ``[r, in, kh, kw]``), ``up [out, r]`` (or ``[out, r, 1, 1]``)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None  # None -> alpha == rank (factor 1)
    key: str = ""  # the file key of ``down`` (for error messages)
    _matrices: tuple | None = field(default=None, repr=False, compare=False)

    def matrices(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up [out, r], down [r, in * kh * kw])`` as 2-D matrices of ``dtype`` on ``device``: views
        (made once per layer) when the tensors already are that, else converted copies."""
        up, down = self.matrix_views()
        if up.dtype == dtype and down.dtype == dtype and up.device == device:
            return up, down
        return up.to(device=device, dtype=dtype), down.to(device=device, dtype=dtype)

    def matrix_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``up`` and ``down`` as 2-D views, made once (again if either tensor is replaced)."""
        m = self._matrices
        if m is None or m[0] is not self.up or m[1] is not self.down:
            m = self._matrices = (self.up, self.down, self.up.reshape(self.up.shape[0], -1),
                                  self.down.reshape(self.rank, -1))
        return m[2], m[3]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def factor(self) -> float:
        """``alpha / r`` (1.0 when alpha is None)."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass
class LoraWeights:
    """A parsed LoRA: ``layers[component][module path] -> LoraLayer``.

    ``component`` is 'unet' (FLUX: 'transformer'), 'text_encoder' or 'text_encoder_2' (only those
    with layers appear).
    A module path is dotted (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``), or,
    for an unresolved kohya name, the flattened form without dots (``down_blocks_1_..._to_q``).
    """

    name: str
    layers: dict[str, dict[str, LoraLayer]]


# --------------------------------------------------------------------------- #
# Parsing
# --------------------------------------------------------------------------- #
_KOHYA_RE = re.compile(r"lora_(unet|te|te1|te2)_(\w+)\.(lora_down\.weight|lora_up\.weight|alpha)")
_KOHYA_COMPONENT = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
_PEFT_RE = re.compile(r"(unet|transformer|text_encoder|text_encoder_2)\.(.+)\.(lora_A\.weight|lora_B\.weight|alpha)")
_OLD_RE = re.compile(r"(?:(unet|text_encoder|text_encoder_2)\.)?(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight")
_OLD_PROC_RE = re.compile(
    r"(?:(unet|text_encoder|text_encoder_2)\.)?(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight"
)
_ROLE = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "down": "down",
    "up": "up",
    "alpha": "alpha",
}
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _resnet_part(rest: str) -> str | None:
    for ldm, diff in (
        ("in_layers_2", "conv1"),
        ("out_layers_3", "conv2"),
        ("emb_layers_1", "time_emb_proj"),
        ("skip_connection", "conv_shortcut"),
    ):
        if rest == ldm:
            return diff
    return None


def _ldm_unet_name(flat: str, layers_per_block: int) -> str | None:
    """Original-SD (ldm/sgm) flattened UNet name -> flattened diffusers name; the input unchanged
    if it is not an ldm name; None if it is one that cannot be mapped."""
    simple = {
        "input_blocks_0_0": "conv_in",
        "out_2": "conv_out",
        "time_embed_0": "time_embedding_linear_1",
        "time_embed_2": "time_embedding_linear_2",
        "label_emb_0_0": "add_embedding_linear_1",
        "label_emb_0_2": "add_embedding_linear_2",
    }
    if flat in simple:
        return simple[flat]
    n = layers_per_block
    m = re.fullmatch(r"input_blocks_(\d+)_(\d+)_(\w+)", flat)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        if i == 0:
            return None
        block, layer = divmod(i - 1, n + 1)
        if layer == n:  # the block's downsampler: input_blocks.N.0.op
            return f"down_blocks_{block}_downsamplers_0_conv" if (j, rest) == (0, "op") else None
        if j == 0:
            part = _resnet_part(rest)
            return f"down_blocks_{block}_resnets_{layer}_{part}" if part else None
        if j == 1:
            return f"down_blocks_{block}_attentions_{layer}_{rest}"
        return None
    m = re.fullmatch(r"middle_block_(\d+)_(\w+)", flat)
    if m:
        i, rest = int(m[1]), m[2]
        if i == 1:
            return f"mid_block_attentions_0_{rest}"
        part = _resnet_part(rest)
        if i in (0, 2) and part:
            return f"mid_block_resnets_{i // 2}_{part}"
        return None
    m = re.fullmatch(r"output_blocks_(\d+)_(\d+)_(\w+)", flat)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        block, layer = divmod(i, n + 1)
        if j == 0:
            part = _resnet_part(rest)
            return f"up_blocks_{block}_resnets_{layer}_{part}" if part else None
        if rest == "conv" and j in (1, 2):  # upsampler (j == 1 in blocks without attention)
            return f"up_blocks_{block}_upsamplers_0_conv"
        if j == 1:
            return f"up_blocks_{block}_attentions_{layer}_{rest}"
        return None
    if flat.startswith(("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_")):
        return None
    return flat


def _classify(key: str, name: str, family: str) -> tuple[str, str, str]:
    """File key -> (component, target module path or flattened kohya name, role)."""
    m = _KOHYA_RE.fullmatch(key) if key.startswith("lora_") else None
    if m:
        component, target, role = _KOHYA_COMPONENT[m[1]], m[2], _ROLE[m[3]]
        if component == "unet" and family == "flux":
            # kohya names FLUX's transformer 'unet'; its layers keep the original names, mapped later
            if flux_target(target) is None:
                raise lora_error(name, f"tensor {key!r} names no layer of the original FLUX.1 layout")
            return "transformer", target, role
        if component == "unet":
            mapped = _ldm_unet_name(target, _LAYERS_PER_BLOCK[family])
            if mapped is None:
                raise lora_error(name, f"tensor {key!r} uses an original-SD UNet name that has no diffusers equivalent")
            target = mapped
        return component, target, role
    m = _PEFT_RE.fullmatch(key)
    if m:
        return m[1], m[2], _ROLE[m[3]]
    m = _OLD_RE.fullmatch(key)
    if m:
        return m[1] or "unet", m[2], m[3]
    m = _OLD_PROC_RE.fullmatch(key)
    if m:
        component = m[1] or "unet"
        if component == "unet":
            target = f"{m[2]}.{m[3]}" + (".0" if m[3] == "to_out" else "")
        else:
            target = f"{m[2]}.{_TE_PROJ[m[3]]}"
        return component, target, m[4]
    if "dora_scale" in key or "lora_magnitude_vector" in key:
        raise lora_error(name, f"tensor {key!r}: DoRA LoRAs are not supported")
    raise lora_error(
        name,
        f"tensor {key!r} has an unknown key format (expected diffusers/peft "
        f"'unet.<module>.lora_A.weight' or kohya 'lora_unet_<module>.lora_down.weight' style names)",
    )


def _check_finite(t: torch.Tensor, name: str, key: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise lora_error(name, f"tensor {key!r} contains NaN or infinite values")


def parse_lora(
    state_dict: Mapping[str, torch.Tensor],
    name: str,
    family: str,
    modules: Mapping[str, torch.nn.Module] | None = None,
    check_finite: bool = True,
) -> LoraWeights:
    """Group a LoRA state dict into :class:`LoraWeights` for ``family`` ('sdxl' or 'sd15').

    An alpha may be a scalar tensor or a Python float.

    Checks key formats, down/up pairing, ranks, dtypes and finiteness (not the target modules:
    that is :meth:`LoraPatcher.validate`). Kohya names stay flattened unless ``modules``
    (component -> module, e.g. ``{'unet': unet}``) is given; then they are resolved to dotted
    module paths here, and a name matching no module raises. ``check_finite=False`` skips the
    per-tensor finiteness check of the down/up weights (the caller checks them, e.g. on the GPU in
    one pass: :class:`katz.lora.manager.LoraManager`); alphas are always checked. Reads only the
    tensors' shapes and dtypes (and the alpha scalars), so the weights may be on any device.
    """
    if family not in COMPONENTS:
        raise lora_error(name, f"unknown model family {family!r} (expected one of {', '.join(COMPONENTS)})")
    if not state_dict:
        raise lora_error(name, "the file contains no LoRA tensors")
    groups: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in state_dict.items():
        component, target, role = _classify(key, name, family)
        if component not in COMPONENTS[family]:
            raise lora_error(name, f"tensor {key!r} targets {component}, which a {family} model does not have")
        if role == "alpha" and type(tensor) is float:
            pass  # an alpha already read (LoraRead.tensors(floats=True))
        elif not isinstance(tensor, torch.Tensor) or not (tensor.is_floating_point()):
            raise lora_error(name, f"tensor {key!r} is not a floating-point tensor")
        slot = groups.setdefault((component, target), {})
        if role in slot:
            raise lora_error(name, f"tensors {slot[role][0]!r} and {key!r} both give the {role} of the same module")
        slot[role] = (key, tensor)

    indexes = {c: ModuleIndex(m) for c, m in (modules or {}).items()}
    layers: dict[str, dict[str, LoraLayer]] = {}
    for (component, target), slot in groups.items():
        if "down" not in slot and "up" not in slot:
            continue  # an alpha without weights adapts nothing
        if "down" not in slot or "up" not in slot:
            have, miss = ("down", "up") if "down" in slot else ("up", "down")
            raise lora_error(name, f"tensor {slot[have][0]!r} has no matching {miss} tensor")
        (down_key, down), (up_key, up) = slot["down"], slot["up"]
        for key, t in ((down_key, down), (up_key, up)):
            if t.ndim not in (2, 4):
                raise lora_error(name, f"tensor {key!r} has shape {list(t.shape)}; expected 2 or 4 dimensions")
            if check_finite:
                _check_finite(t, name, key)
        if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
            raise lora_error(name, f"tensor {up_key!r} has shape {list(up.shape)}; a conv LoRA up must be [out, r, 1, 1]")
        if down.shape[0] != up.shape[1] or down.shape[0] == 0:
            raise lora_error(
                name,
                f"tensors {down_key!r} {list(down.shape)} and {up_key!r} {list(up.shape)} disagree on the rank",
            )
        alpha = None
        if "alpha" in slot:
            alpha_key, a = slot["alpha"]
            if type(a) is float:
                alpha = a
            elif a.numel() != 1:
                raise lora_error(name, f"tensor {alpha_key!r} has shape {list(a.shape)}; alpha must be a scalar")
            else:
                alpha = float(a.reshape(()).to(torch.float64))
            if not math.isfinite(alpha):
                raise lora_error(name, f"tensor {alpha_key!r} contains NaN or infinite values")
        if family == "flux" and component == "transformer" and flux_target(target) is not None:
            split = _split_flux_layer(target, down, up, alpha, down_key, up_key, name)
        else:
            if component in indexes:
                resolved = indexes[component].resolve(target)
                if resolved is None:
                    raise lora_error(name, f"tensor {down_key!r} targets no module of the {component}")
                target = resolved
            split = [(target, LoraLayer(down=down, up=up, alpha=alpha, key=down_key))]
        per = layers.setdefault(component, {})
        for target, layer in split:
            if target in per:
                raise lora_error(name, f"tensors {per[target].key!r} and {down_key!r} target the same module {target!r}")
            per[target] = layer
    if not layers:
        raise lora_error(name, "the file contains no LoRA layers (no down/up weight pairs)")
    return LoraWeights(name=name, layers=layers)


def _split_flux_layer(flat, down, up, alpha, down_key, up_key, name) -> list[tuple[str, LoraLayer]]:
    """An original-layout FLUX layer's LoRA as one LoRA per diffusers module: ``down`` shared, ``up``
    cut into the parts' rows (W_part + up_part @ down is the fused layer's update, row for row)."""
    target = flux_target(flat)
    slices = target.row_slices(up.shape[0])
    if slices is None:
        raise lora_error(name, f"tensor {up_key!r} has {up.shape[0]} output rows, which do not split into "
                               f"{' + '.join(p for p, _ in target.parts)}")
    return [(path, LoraLayer(down=down, up=up[a:b], alpha=alpha, key=down_key)) for path, a, b in slices]


class PathIndex:
    """Module paths by dotted name, or by kohya-flattened name ('.' -> '_'), including CLIP's
    optional 'text_model.' level."""

    def __init__(self, paths: Iterable[str]):
        self.paths = {p for p in paths if p}
        self.flat: dict[str, list[str]] = {}
        for path in self.paths:
            self.flat.setdefault(path.replace(".", "_"), []).append(path)

    def _lookup(self, target: str) -> str | None:
        if target in self.paths:
            return target
        if "." not in target:
            hits = self.flat.get(target, [])
            if len(hits) == 1:
                return hits[0]
        return None

    def resolve(self, target: str) -> str | None:
        hit = self._lookup(target)
        if hit is None:
            # LoRA files name CLIP layers 'text_model.encoder.layers...'; transformers>=5 CLIPTextModel
            # has no 'text_model' wrapper (CLIPTextModelWithProjection still has). Try the other form.
            for sep in (".", "_"):
                if target.startswith("text_model" + sep):
                    return self._lookup(target[len("text_model") + 1 :])
            hit = self._lookup("text_model" + ("." if "." in target else "_") + target)
        return hit


class ModuleIndex(PathIndex):
    """A :class:`PathIndex` over a module's submodules, keeping the modules."""

    def __init__(self, module: torch.nn.Module):
        self.modules = dict(module.named_modules())
        super().__init__(self.modules)


def lora_delta(
    items: Sequence[tuple[float, "LoraLayer"]], shape: Sequence[int], dtype: torch.dtype, device
) -> torch.Tensor:
    """``sum(scale * alpha / r * up @ down)`` over ``items`` = [(scale, layer)], as a tensor of ``shape``."""
    delta = torch.zeros((shape[0], math.prod(shape[1:])), dtype=dtype, device=device)
    for scale, layer in items:
        up, down = layer.matrices(dtype, torch.device(device))
        delta += (up @ down) * (scale * (layer.alpha if layer.alpha is not None else layer.rank) / layer.rank)
    return delta.view(tuple(shape))


def lora_fits(down: torch.Tensor, up: torch.Tensor, weight_shape: Sequence[int]) -> bool:
    """Whether ``up @ down`` ([out, r] @ [r, in], or 1x1-conv forms) gives a weight of ``weight_shape``."""
    w = tuple(weight_shape)
    rank = down.shape[0]
    down_ok = down.ndim in (2, 4) and (
        tuple(down.shape[1:]) == w[1:]
        or (down.ndim == 2 and len(w) == 4 and w[2:] == (1, 1) and down.shape[1] == w[1])
        or (down.ndim == 4 and len(w) == 2 and tuple(down.shape[2:]) == (1, 1) and down.shape[1] == w[1])
    )
    up_ok = (
        (up.ndim == 2 or (up.ndim == 4 and tuple(up.shape[2:]) == (1, 1)))
        and up.shape[0] == w[0]
        and up.shape[1] == rank
    )
    return bool(down_ok and up_ok)

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

Kohya names are flattened, so they only become module paths against a real module: either pass
``modules`` to :func:`parse_lora`, or (the serving path) leave them flattened (no ``.`` in the
key of ``LoraWeights.layers``) and :class:`LoraPatcher` resolves them against its module.
Text-encoder paths ``text_model.encoder...`` also match transformers>=5 ``CLIPTextModel``,
which has no ``text_model`` level (``encoder.layers.N...``).
"""

from __future__ import annotations

import functools
import json
import math
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

__all__ = [
    "LoraError",
    "LoraLayer",
    "LoraWeights",
    "LoraPatcher",
    "read_lora_file",
    "parse_lora",
    "make_random_lora",
]

COMPONENTS = {
    "sdxl": ("unet", "text_encoder", "text_encoder_2"),
    "sd15": ("unet", "text_encoder"),
}
# UNet ``layers_per_block`` of the original-SD layouts (both SD 1.x and SDXL use 2); needed to
# turn ldm ``input_blocks.N`` / ``output_blocks.N`` numbers into diffusers block/layer indices.
_LAYERS_PER_BLOCK = {"sdxl": 2, "sd15": 2}
# diffusers' safetensors header entry holding the peft LoraConfig of each component.
_DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"


class LoraError(ValueError):
    """Bad LoRA file/request; ``str(e)`` names the LoRA and says why."""


def _err(name: str, msg: str) -> LoraError:
    return LoraError(f"lora {name!r}: {msg}")


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

    ``component`` is 'unet', 'text_encoder' or 'text_encoder_2' (only those with layers appear).
    A module path is dotted (``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``), or,
    for an unresolved kohya name, the flattened form without dots (``down_blocks_1_..._to_q``).
    """

    name: str
    layers: dict[str, dict[str, LoraLayer]]


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #
# file-key prefixes of each component, in the formats parse_lora reads
COMPONENT_PREFIXES = {
    "unet": ("unet.", "lora_unet_"),
    "text_encoder": ("text_encoder.", "lora_te_", "lora_te1_"),
    "text_encoder_2": ("text_encoder_2.", "lora_te2_"),
}


def read_lora_file(
    path: str | Path, name: str, components: Sequence[str] | None = None
) -> dict[str, torch.Tensor]:
    """Load a ``.safetensors`` LoRA into CPU tensors (never unpickles anything).

    The header is checked strictly and the wanted bytes are read in parallel into one buffer
    (see :mod:`katz.lora.safetensors`); the tensors are views into that buffer.

    ``components`` (e.g. ``["text_encoder", "text_encoder_2"]``) reads only
    those components' tensors: a text-encoder model then skips the (large) UNet
    part of the file. Keys of no known component are always read, so that
    :func:`parse_lora` still reports them.

    diffusers writes the alpha of peft-format LoRAs into the safetensors header
    (``lora_adapter_metadata``: a peft ``LoraConfig`` per component); it is folded into the
    returned dict as ``<component>.<module path>.alpha`` scalars, so :func:`parse_lora` needs
    only the tensors. Any failure raises :class:`LoraError` naming ``name``.
    """
    from katz.lora.safetensors import read_lora_bytes

    return read_lora_bytes(path, name, components, lambda n: torch.empty(n, dtype=torch.uint8)).tensors()


_KNOWN_PREFIXES = tuple(p for ps in COMPONENT_PREFIXES.values() for p in ps)


@functools.lru_cache(maxsize=64)
def _component_prefixes(components: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p for c in components for p in COMPONENT_PREFIXES[c])


def _in_components(key: str, components: Sequence[str] | None) -> bool:
    """Whether a file key belongs to ``components`` (None: all); keys of no known component always do."""
    if components is None:
        return True
    return key.startswith(_component_prefixes(tuple(components))) or not key.startswith(_KNOWN_PREFIXES)


def _peft_pattern_match(patterns: Mapping[str, object], module_path: str):
    """Value of the first peft ``rank_pattern`` / ``alpha_pattern`` entry matching ``module_path``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return None


def _fold_diffusers_metadata(tensors: dict[str, torch.Tensor], raw: str, name: str) -> None:
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise _err(name, f"unreadable {_DIFFUSERS_METADATA_KEY} in the file header ({e})") from None
    for component in ("unet", "text_encoder", "text_encoder_2"):
        cfg = {k[len(component) + 1 :]: v for k, v in meta.items() if k.startswith(component + ".")}
        if not cfg:
            continue
        if cfg.get("use_dora"):
            raise _err(name, f"DoRA LoRAs are not supported ({component} has use_dora=true)")
        rank_pattern = cfg.get("rank_pattern") or {}
        alpha_pattern = cfg.get("alpha_pattern") or {}
        prefix, suffix = component + ".", ".lora_A.weight"
        for key, down in list(tensors.items()):
            if not (key.startswith(prefix) and key.endswith(suffix)):
                continue
            module_path = key[len(prefix) : -len(suffix)]
            alpha_key = f"{prefix}{module_path}.alpha"
            if alpha_key in tensors:
                continue
            try:
                r_cfg = _peft_pattern_match(rank_pattern, module_path)
                r_cfg = float(cfg.get("r", 8) if r_cfg is None else r_cfg)
                alpha = _peft_pattern_match(alpha_pattern, module_path)
                alpha = float(cfg.get("lora_alpha", 8) if alpha is None else alpha)
            except (TypeError, ValueError, re.error) as e:
                raise _err(name, f"bad {_DIFFUSERS_METADATA_KEY} for {component} ({e})") from None
            # peft scales by alpha / r_cfg (alpha / sqrt(r_cfg) with rslora); express that as an
            # alpha for the tensor's own rank.
            rank = down.shape[0] if down.ndim else 1
            scaling = alpha / math.sqrt(r_cfg) if cfg.get("use_rslora") else alpha / r_cfg
            tensors[alpha_key] = torch.tensor(scaling * rank, dtype=torch.float64)


# --------------------------------------------------------------------------- #
# Parsing
# --------------------------------------------------------------------------- #
_KOHYA_RE = re.compile(r"lora_(unet|te|te1|te2)_(\w+)\.(lora_down\.weight|lora_up\.weight|alpha)")
_KOHYA_COMPONENT = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
_PEFT_RE = re.compile(r"(unet|text_encoder|text_encoder_2)\.(.+)\.(lora_A\.weight|lora_B\.weight|alpha)")
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
    m = _KOHYA_RE.fullmatch(key)
    if m:
        component, target, role = _KOHYA_COMPONENT[m[1]], m[2], _ROLE[m[3]]
        if component == "unet":
            mapped = _ldm_unet_name(target, _LAYERS_PER_BLOCK[family])
            if mapped is None:
                raise _err(name, f"tensor {key!r} uses an original-SD UNet name that has no diffusers equivalent")
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
        raise _err(name, f"tensor {key!r}: DoRA LoRAs are not supported")
    raise _err(
        name,
        f"tensor {key!r} has an unknown key format (expected diffusers/peft "
        f"'unet.<module>.lora_A.weight' or kohya 'lora_unet_<module>.lora_down.weight' style names)",
    )


def _check_finite(t: torch.Tensor, name: str, key: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise _err(name, f"tensor {key!r} contains NaN or infinite values")


def parse_lora(
    state_dict: Mapping[str, torch.Tensor],
    name: str,
    family: str,
    modules: Mapping[str, torch.nn.Module] | None = None,
    check_finite: bool = True,
) -> LoraWeights:
    """Group a LoRA state dict into :class:`LoraWeights` for ``family`` ('sdxl' or 'sd15').

    Checks key formats, down/up pairing, ranks, dtypes and finiteness (not the target modules:
    that is :meth:`LoraPatcher.validate`). Kohya names stay flattened unless ``modules``
    (component -> module, e.g. ``{'unet': unet}``) is given; then they are resolved to dotted
    module paths here, and a name matching no module raises. ``check_finite=False`` skips the
    per-tensor finiteness check of the down/up weights (the caller checks them, e.g. on the GPU in
    one pass: :class:`katz.lora.manager.LoraManager`); alphas are always checked. Reads only the
    tensors' shapes and dtypes (and the alpha scalars), so the weights may be on any device.
    """
    if family not in COMPONENTS:
        raise _err(name, f"unknown model family {family!r} (expected one of {', '.join(COMPONENTS)})")
    if not state_dict:
        raise _err(name, "the file contains no LoRA tensors")
    groups: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in state_dict.items():
        component, target, role = _classify(key, name, family)
        if component not in COMPONENTS[family]:
            raise _err(name, f"tensor {key!r} targets {component}, which a {family} model does not have")
        if not isinstance(tensor, torch.Tensor) or not (tensor.is_floating_point()):
            raise _err(name, f"tensor {key!r} is not a floating-point tensor")
        slot = groups.setdefault((component, target), {})
        if role in slot:
            raise _err(name, f"tensors {slot[role][0]!r} and {key!r} both give the {role} of the same module")
        slot[role] = (key, tensor)

    indexes = {c: _ModuleIndex(m) for c, m in (modules or {}).items()}
    layers: dict[str, dict[str, LoraLayer]] = {}
    for (component, target), slot in groups.items():
        if "down" not in slot and "up" not in slot:
            continue  # an alpha without weights adapts nothing
        if "down" not in slot or "up" not in slot:
            have, miss = ("down", "up") if "down" in slot else ("up", "down")
            raise _err(name, f"tensor {slot[have][0]!r} has no matching {miss} tensor")
        (down_key, down), (up_key, up) = slot["down"], slot["up"]
        for key, t in ((down_key, down), (up_key, up)):
            if t.ndim not in (2, 4):
                raise _err(name, f"tensor {key!r} has shape {list(t.shape)}; expected 2 or 4 dimensions")
            if check_finite:
                _check_finite(t, name, key)
        if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
            raise _err(name, f"tensor {up_key!r} has shape {list(up.shape)}; a conv LoRA up must be [out, r, 1, 1]")
        if down.shape[0] != up.shape[1] or down.shape[0] == 0:
            raise _err(
                name,
                f"tensors {down_key!r} {list(down.shape)} and {up_key!r} {list(up.shape)} disagree on the rank",
            )
        alpha = None
        if "alpha" in slot:
            alpha_key, a = slot["alpha"]
            if a.numel() != 1:
                raise _err(name, f"tensor {alpha_key!r} has shape {list(a.shape)}; alpha must be a scalar")
            alpha = float(a.reshape(()).to(torch.float64))
            if not math.isfinite(alpha):
                raise _err(name, f"tensor {alpha_key!r} contains NaN or infinite values")
        if component in indexes:
            resolved = indexes[component].resolve(target)
            if resolved is None:
                raise _err(name, f"tensor {down_key!r} targets no module of the {component}")
            target = resolved
        per = layers.setdefault(component, {})
        if target in per:
            raise _err(name, f"tensors {per[target].key!r} and {down_key!r} target the same module {target!r}")
        per[target] = LoraLayer(down=down, up=up, alpha=alpha, key=down_key)
    if not layers:
        raise _err(name, "the file contains no LoRA layers (no down/up weight pairs)")
    return LoraWeights(name=name, layers=layers)


# --------------------------------------------------------------------------- #
# Merging
# --------------------------------------------------------------------------- #
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


class _ModuleIndex(PathIndex):
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


def _is_patchable(module: torch.nn.Module) -> bool:
    # diffusers' LoRACompatibleLinear / LoRACompatibleConv subclass these.
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))


_PLAN_CACHE_SIZE = 16


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class LoraPatcher:
    """Owns one torch.nn.Module (a UNet or a text encoder) for one component name and merges LoRAs
    into its weights in place.

    Every weight it ever changes is first copied (same device/dtype) and is only ever rewritten
    as ``pristine + delta`` or copied back, so the base weights come back bit-identical.
    Thread-safe (one lock per patcher).
    """

    def __init__(self, module: torch.nn.Module, component: str,
                 on_change: Callable[[list[torch.nn.Module]], None] | None = None):
        self.module = module
        self.component = component
        # called with the modules whose weights a merge or restore rewrote, after it (e.g. to
        # re-quantize their float8 copies: katz.engines.torch.experimental.fp8.requantize)
        self.on_change = on_change
        self._index = _ModuleIndex(module)
        self._pristine: dict[str, torch.Tensor] = {}
        self.pristine_bytes = 0  # device memory of the pristine copies (they are kept for good)
        self._current: tuple[tuple[LoraWeights, float], ...] = ()
        self._lock = threading.RLock()
        # plans of recently applied LoRA objects: id -> (weak reference, plan); a LoraWeights is
        # not changed once parsed, so its plan (checks included) holds while the object lives
        self._plans: OrderedDict[int, tuple[weakref.ref, list]] = OrderedDict()
        self._plans_lock = threading.Lock()
        self._views: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # see _weight_views

    @property
    def applied(self) -> tuple[tuple[str, float], ...]:
        """``(name, scale)`` of the LoRAs merged now, in the order given to :meth:`apply`."""
        return tuple((w.name, s) for w, s in self._current)

    # -- validation ------------------------------------------------------- #
    def _plan(self, lora: LoraWeights, check_values: bool = True) -> list[tuple[str, torch.nn.Module, LoraLayer]]:
        name, comp = lora.name, self.component
        plan, seen = [], {}
        for target, layer in lora.layers.get(comp, {}).items():
            key = layer.key or target
            path = self._index.resolve(target)
            if path is None:
                raise _err(name, f"tensor {key!r} targets no module of the {comp}")
            if path in seen:
                raise _err(name, f"tensors {seen[path]!r} and {key!r} both target {comp} module {path!r}")
            seen[path] = key
            mod = self._index.modules[path]
            if not _is_patchable(mod):
                raise _err(
                    name,
                    f"tensor {key!r} targets {comp} module {path!r} of type {type(mod).__name__}; "
                    "only Linear and Conv2d modules can take a LoRA",
                )
            if isinstance(mod, torch.nn.Conv2d) and mod.groups != 1:
                raise _err(name, f"tensor {key!r} targets grouped conv {comp} module {path!r} (groups={mod.groups})")
            w = mod.weight
            down, up = layer.down, layer.up
            if not lora_fits(down, up, w.shape):
                raise _err(
                    name,
                    f"tensor {key!r}: shape mismatch, up {list(up.shape)} @ down {list(down.shape)} does not give "
                    f"the weight shape {list(w.shape)} of {comp} module {path!r} ({type(mod).__name__})",
                )
            # Device tensors were checked on the host when loaded; checking them again
            # here would cost a GPU sync per layer.
            for what, t in (("down", down), ("up", up)) if check_values else ():
                if t.device.type == "cpu" and not bool(torch.isfinite(t).all()):
                    raise _err(name, f"tensor {key!r} ({what}) contains NaN or infinite values")
            if layer.alpha is not None and not math.isfinite(layer.alpha):
                raise _err(name, f"tensor {key!r} has a non-finite alpha")
            layer.matrix_views()  # made here (the loader's validate), not in the merge
            plan.append((path, mod, layer))
        return plan

    def _cached_plan(self, lora: LoraWeights, check_values: bool = True) -> list[tuple[str, torch.nn.Module, LoraLayer]]:
        """:meth:`_plan`, remembered for the last few LoRA objects (the loader's :meth:`validate`
        plans a LoRA off the request path; its merge then finds the plan made). Only the resolved
        ``(path, module)`` pairs are kept, never the LoRA's tensors (the caches own those)."""
        layers = lora.layers.get(self.component, {}).values()
        with self._plans_lock:
            hit = self._plans.get(id(lora))
            if hit is not None and hit[0]() is lora:
                self._plans.move_to_end(id(lora))
                return [(path, mod, layer) for (path, mod), layer in zip(hit[1], layers)]
        plan = self._plan(lora, check_values)
        with self._plans_lock:
            self._plans[id(lora)] = (weakref.ref(lora), [(path, mod) for path, mod, _ in plan])
            while len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return plan

    def validate(self, lora: LoraWeights, check_values: bool = True) -> None:
        """Raise :class:`LoraError` unless every layer of this component fits a Linear/Conv2d here.

        ``check_values=False``: the caller checks the tensors' values itself (the LoRA manager does, on
        the device, in one pass); shapes, targets and alphas are checked either way."""
        self._cached_plan(lora, check_values)

    # -- merging ------------------------------------------------------------ #
    def apply(self, loras: Sequence[tuple[LoraWeights, float]]) -> None:
        """Make the weights ``base + sum(scale * alpha / r * up @ down)`` for exactly ``loras``.

        A no-op when the same LoraWeights objects with the same scales are applied already.
        On any error the weights are restored to the base and the error is raised.
        """
        entries = tuple((w, float(s)) for w, s in loras)
        with self._lock:
            if len(entries) == len(self._current) and all(
                a is b and sa == sb for (a, sa), (b, sb) in zip(entries, self._current)
            ):
                return
            try:
                plans = []
                for w, s in entries:
                    if not math.isfinite(s):
                        raise _err(w.name, f"scale {s} is not finite")
                    plans.append((w, s, self._cached_plan(w)))
                self._merge(plans)
            except BaseException:
                self.restore()
                raise
            self._current = entries

    @torch.no_grad()
    def _merge(self, plans) -> None:
        by_module: dict[str, list[tuple[float, LoraLayer]]] = {}
        modules: dict[str, torch.nn.Module] = {}
        for _w, scale, plan in plans:
            for path, mod, layer in plan:
                by_module.setdefault(path, []).append((scale, layer))
                modules[path] = mod
        # Modules patched before but not now: back to base.
        stale = [path for path in self._pristine if path not in by_module]
        copy_all([self._index.modules[p].weight for p in stale], [self._pristine[p] for p in stale])
        merged = []
        groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for path, items in by_module.items():
            weight = modules[path].weight
            base = self._pristine.get(path)
            if base is None:
                base = self._pristine[path] = weight.detach().clone()
                self.pristine_bytes += base.numel() * base.element_size()
            views = self._weight_views(path, weight, base)
            merged.append(weight)
            if len(items) == 1 and views is not None:
                # one LoRA on a module: batched with the modules of its shape and factor
                scale, layer = items[0]
                up, down = layer.matrices(weight.dtype, weight.device)
                key = (tuple(views[0].shape), weight.dtype, weight.device, up.shape[1], scale * layer.factor)
                groups.setdefault(key, []).append((views[0], views[1], up, down))
            else:
                _merge_into(weight, base, items)
        for key, members in groups.items():
            _merge_group(members, alpha=key[-1])
        self._changed([*stale, *by_module])
        # one host sync for the whole merge; find the culprit only on failure
        if all_finite(merged):
            return
        for path in by_module:
            weight = modules[path].weight
            if not bool(torch.isfinite(weight).all()):
                names = ", ".join(sorted({w.name for w, _s, p in plans if any(q[0] == path for q in p)}))
                raise _err(
                    names,
                    f"merged weight of {self.component} module {path!r} is not finite in {weight.dtype} "
                    "(scale too large?)",
                )

    def _weight_views(self, path: str, weight: torch.Tensor, base: torch.Tensor) -> tuple | None:
        """``(weight, pristine)`` as 2-D ``[out, in * kh * kw]`` views, made once per module, when
        ``addmm`` / ``baddbmm_`` into the weight rounds once from a float32-or-better sum: float32/float64
        weights, or CUDA weights (cuBLAS accumulates and applies alpha/beta in float32); None
        otherwise (half precision on the CPU, non-contiguous weights)."""
        views = self._views.get(path)
        if views is None or views[0].data_ptr() != weight.data_ptr():
            exact = weight.is_cuda or weight.dtype in (torch.float32, torch.float64)
            if not (exact and weight.is_contiguous() and base.is_contiguous()):
                return None
            views = self._views[path] = (weight.view(weight.shape[0], -1), base.view(base.shape[0], -1))
        return views

    def restore(self) -> None:
        """Copy every touched weight back from its pristine copy (bit-identical base)."""
        with self._lock, torch.no_grad():
            paths = list(self._pristine)
            copy_all([self._index.modules[p].weight for p in paths], [self._pristine[p] for p in paths])
            self._changed(paths)
            self._current = ()

    def _changed(self, paths: Sequence[str]) -> None:
        if self.on_change is not None and paths:
            self.on_change([self._index.modules[p] for p in paths])


def _merge_into(weight: torch.Tensor, base: torch.Tensor, items: Sequence[tuple[float, LoraLayer]]) -> None:
    """``weight = base + sum(scale * alpha / r * up @ down)``, the sum formed in float32 (float64)
    and rounded once to ``weight.dtype``: several LoRAs on a module, or a weight
    :func:`_merge_group` does not take (half precision on the CPU, non-contiguous)."""
    cdt = _compute_dtype(weight.dtype)
    delta = lora_delta(items, weight.shape, cdt, weight.device)
    weight.copy_((base.to(cdt) + delta).to(weight.dtype))


_GROUP_SCRATCH_BYTES = 128 << 20  # the merge's scratch per batch of same-shape layers


def _merge_group(members: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                 alpha: float) -> None:
    """``weight = pristine + alpha * up @ down`` for modules of one shape, a few kernels per batch.

    ``members``: ``(weight, pristine, up, down)`` as 2-D ``[out, in]``, ``[out, in]``, ``[out, r]``,
    ``[r, in]`` views (:meth:`LoraPatcher._weight_views`, :meth:`LoraLayer.matrices`), all of one
    shape, dtype and rank. Per batch of layers (at most ``_GROUP_SCRATCH_BYTES`` of weights): the
    pristine weights and the factors are stacked, one ``baddbmm_`` adds the products in place (on
    CUDA cuBLAS sums in float32 and rounds once, like ``addmm``), one ``_foreach_copy_`` writes the
    weights. On a launch-bound GPU this costs ~5 kernel launches per batch instead of two per layer.
    """
    if len(members) == 1:
        weight, base, up, down = members[0]
        torch.addmm(base, up, down, alpha=alpha, out=weight)
        return
    weight0 = members[0][0]
    per = max(1, _GROUP_SCRATCH_BYTES // (weight0.numel() * weight0.element_size()))
    for start in range(0, len(members), per):
        batch = members[start : start + per]
        scratch = torch.stack([m[1] for m in batch])  # [n, out, in], the pristine weights
        scratch.baddbmm_(torch.stack([m[2] for m in batch]), torch.stack([m[3] for m in batch]), alpha=alpha)
        copy_all([m[0] for m in batch], scratch.unbind(0))


def copy_all(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor]) -> None:
    """``d.copy_(s)`` for each pair, as few kernels as torch allows (``_foreach_copy_``)."""
    if not dst:
        return
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(list(dst), list(src))
        return
    for d, s in zip(dst, src):
        d.copy_(s)


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every value of ``tensors`` is finite, with one host sync (per-tensor L2 norms in
    one fused pass; NaN and Inf make a norm non-finite). May answer False for finite tensors whose
    norm overflows float32; callers then look tensor by tensor."""
    if not tensors:
        return True
    if not hasattr(torch, "_foreach_norm"):
        return all(bool(torch.isfinite(t).all()) for t in tensors)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    flags = []
    for dtype, group in by_dtype.items():
        if dtype in (torch.float16, torch.bfloat16):
            try:
                norms = torch._foreach_norm(group, 2, dtype=torch.float32)
            except (TypeError, RuntimeError):  # a torch without the dtype argument: one pass per tensor
                flags.extend(torch.isfinite(t).all() for t in group)
                continue
        else:
            norms = torch._foreach_norm(group, 2)
        flags.append(torch.isfinite(torch.stack(norms)).all())
    return bool(torch.stack(flags).all())


# --------------------------------------------------------------------------- #
# Test LoRAs
# --------------------------------------------------------------------------- #
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
    header = {_DIFFUSERS_METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata else {"format": "pt"}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=header)

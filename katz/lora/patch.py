"""Exact in-place LoRA merge and restore for PyTorch modules (:class:`LoraPatcher`).

``W' = W + sum_i scale_i * (alpha / r) * up @ down``, computed in float32 (float64 for float64
weights) and written over the weight in place, so captured CUDA graphs and compiled code see the new
values; the first patch of a weight keeps a pristine copy, and a restore copies it back bit for bit.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from typing import Callable, Sequence

import torch

from katz.errors import lora_error
from katz.lora.weights import LoraLayer, LoraWeights, ModuleIndex, lora_delta, lora_fits


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
        self._index = ModuleIndex(module)
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
                raise lora_error(name, f"tensor {key!r} targets no module of the {comp}")
            if path in seen:
                raise lora_error(name, f"tensors {seen[path]!r} and {key!r} both target {comp} module {path!r}")
            seen[path] = key
            mod = self._index.modules[path]
            if not _is_patchable(mod):
                raise lora_error(
                    name,
                    f"tensor {key!r} targets {comp} module {path!r} of type {type(mod).__name__}; "
                    "only Linear and Conv2d modules can take a LoRA",
                )
            if isinstance(mod, torch.nn.Conv2d) and mod.groups != 1:
                raise lora_error(name, f"tensor {key!r} targets grouped conv {comp} module {path!r} (groups={mod.groups})")
            w = mod.weight
            down, up = layer.down, layer.up
            if not lora_fits(down, up, w.shape):
                raise lora_error(
                    name,
                    f"tensor {key!r}: shape mismatch, up {list(up.shape)} @ down {list(down.shape)} does not give "
                    f"the weight shape {list(w.shape)} of {comp} module {path!r} ({type(mod).__name__})",
                )
            # Device tensors were checked on the host when loaded; checking them again
            # here would cost a GPU sync per layer.
            for what, t in (("down", down), ("up", up)) if check_values else ():
                if t.device.type == "cpu" and not bool(torch.isfinite(t).all()):
                    raise lora_error(name, f"tensor {key!r} ({what}) contains NaN or infinite values")
            if layer.alpha is not None and not math.isfinite(layer.alpha):
                raise lora_error(name, f"tensor {key!r} has a non-finite alpha")
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
                        raise lora_error(w.name, f"scale {s} is not finite")
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
                raise lora_error(
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


def apply_loras(patcher: LoraPatcher, loras: Sequence[tuple[LoraWeights, float]]) -> None:
    """Merge into ``patcher``'s module the LoRAs of ``loras`` that have layers for its component."""
    patcher.apply([(w, s) for w, s in loras if patcher.component in w.layers])

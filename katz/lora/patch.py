"""Exact in-place LoRA merge and restore for PyTorch modules (:class:`LoraPatcher`).

``W' = W + sum_i scale_i * (alpha / r) * up @ down``, computed in float32 (float64 for float64
weights) and written over the weight in place, so captured CUDA graphs and compiled code see the new
values; the first patch of a weight keeps a pristine copy, and a restore copies it back bit for bit.

A merge is a list of *units* (:meth:`LoraPatcher.merge_units`): batches of same-shape layers and
modules that take several LoRAs, fixed by the LoRAs alone. :meth:`LoraPatcher.apply` runs them at
once or, given an ``arrival`` (LoRAs still being uploaded by the loader), each as soon as the bytes
of its layers are on the device; the units and their kernels are the same either way, so the
weights are the same bit for bit.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from katz.errors import lora_error
from katz.lora.weights import LoraLayer, LoraWeights, ModuleIndex, lora_delta, lora_fits


def _is_patchable(module: torch.nn.Module) -> bool:
    # diffusers' LoRACompatibleLinear / LoRACompatibleConv subclass these.
    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))


_PLAN_CACHE_SIZE = 16


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class Arrival(Protocol):
    """LoRAs whose bytes are still arriving on the device (:meth:`katz.lora.manager.LoraManager.stream`)."""

    def arrived(self, layer: LoraLayer) -> bool:
        """Whether ``layer``'s ``down`` and ``up`` bytes are on the device (uploads may still be queued)."""

    def await_more(self) -> None:
        """Block until more bytes arrived or a load ended; raise a load's error."""

    def fence(self) -> None:
        """Make the current stream wait for the uploads of everything :meth:`arrived` answered True for."""

    def finish(self) -> None:
        """Wait for the loads to end and raise their errors (e.g. a non-finite tensor found at the end)."""


@dataclass
class MergeUnit:
    """A piece of a merge: one batch of same-shape layers with one LoRA each (``group`` holds the
    ``(weight, pristine)`` 2-D views of each, in the order of ``layers``, and ``alpha``), or one
    module (``path``) with several LoRAs or a weight the batched kernels do not take (``items``).
    ``layers``: the LoRA layers it reads."""

    layers: list[LoraLayer]
    group: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    alpha: float = 0.0
    path: str = ""
    items: list[tuple[float, LoraLayer]] = field(default_factory=list)


class MergeCheck:
    """The finiteness of a merge's weights, read without stopping the host: the flag is copied to
    the host behind the merge's kernels and looked at later (:meth:`LoraPatcher.settle`)."""

    def __init__(self, flag: torch.Tensor):
        self._event = None
        if flag.is_cuda:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(flag.device))
            flag = host
        self._flag = flag

    def done(self) -> bool:
        return self._event is None or self._event.query()

    def ok(self) -> bool:
        """Whether every merged weight is finite (waits for the merge's kernels)."""
        if self._event is not None:
            self._event.synchronize()
        return bool(self._flag)


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
        self._dirty: set[str] = set()  # modules whose weight may differ from its pristine copy now
        # pristine copies made by prepare() on another thread's stream: merges and restores wait for it
        self._pristine_event: tuple[torch.cuda.Event, torch.device] | None = None
        self._unchecked: tuple[MergeCheck, list[str]] | None = None  # a merge whose finiteness is not read yet

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

    @torch.no_grad()
    def prepare(self, lora: LoraWeights) -> int:
        """Make the pristine copies of the weights ``lora`` (validated) targets that have none yet, so
        that its merge allocates and copies nothing more: the LoRA loader calls this off the request's
        path (the first merge of a module otherwise clones it inside the switch). Skipped, returning 0,
        while a merge or restore runs (it makes the copies it needs itself). Returns the bytes copied."""
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            todo = [(path, mod) for path, mod, _ in self._cached_plan(lora, check_values=False)
                    if path not in self._pristine]
            copied = 0
            for path, mod in todo:
                # not in _pristine, under the lock: the weight was never patched, it is the base
                base = self._pristine[path] = mod.weight.detach().clone()
                copied += base.numel() * base.element_size()
            self.pristine_bytes += copied
            device = todo[0][1].weight.device if todo else None
            if copied and device.type == "cuda":
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                self._pristine_event = (event, device)
            return copied
        finally:
            self._lock.release()

    def _pristine_ready(self) -> None:
        """The current stream waits for pristine copies :meth:`prepare` queued on another stream."""
        if self._pristine_event is not None:
            event, device = self._pristine_event
            torch.cuda.current_stream(device).wait_event(event)
            self._pristine_event = None

    # -- merging ------------------------------------------------------------ #
    def apply(self, loras: Sequence[tuple[LoraWeights, float]], arrival: Arrival | None = None,
              defer_check: bool = False) -> None:
        """Make the weights ``base + sum(scale * alpha / r * up @ down)`` for exactly ``loras``.

        A no-op when the same LoraWeights objects with the same scales are applied already.
        On any error the weights are restored to the base and the error is raised.

        ``arrival``: some of ``loras`` are still being uploaded; each unit of the merge runs once its
        layers' bytes are on the device, and the call returns when all have (the loads' own checks
        passed). Nothing may run on the module meanwhile (the weights are partly merged).

        ``defer_check``: the merged weights' finiteness is read later, by :meth:`settle` (the merge
        then never waits for the device); until then the merge counts as applied.
        """
        entries = tuple((w, float(s)) for w, s in loras)
        with self._lock:
            if len(entries) == len(self._current) and all(
                a is b and sa == sb for (a, sa), (b, sb) in zip(entries, self._current)
            ):
                if arrival is not None:
                    arrival.finish()
                return
            self._unchecked = None  # an earlier merge's weights are all rewritten below, from the pristine copies
            try:
                plans = []
                for w, s in entries:
                    if not math.isfinite(s):
                        raise lora_error(w.name, f"scale {s} is not finite")
                    plans.append((w, s, self._cached_plan(w)))
                check = self._merge(plans, arrival)
                self._current = entries
                if defer_check:
                    self._unchecked = check
                    return
                self._unchecked = None
                self._raise_if_not_finite(*check)
            except BaseException:
                self.restore()
                raise

    def settle(self) -> None:
        """Read the finiteness of a merge made with ``defer_check`` (waits for its kernels): raise
        :class:`LoraError` naming the LoRAs, with the base weights restored, if a weight is not finite."""
        with self._lock:
            pending, self._unchecked = self._unchecked, None
            if pending is None:
                return
            try:
                self._raise_if_not_finite(*pending)
            except BaseException:
                self.restore()
                raise

    def check_done(self) -> bool:
        """Whether a deferred finiteness check can be read without waiting (or there is none)."""
        pending = self._unchecked
        return pending is None or pending[0].done()

    def _raise_if_not_finite(self, check: MergeCheck, paths: list[str]) -> None:
        if check.ok():
            return
        for path in paths:  # find the culprit only on failure
            weight = self._index.modules[path].weight
            if not bool(torch.isfinite(weight).all()):
                names = ", ".join(sorted({w.name for w, _s in self._current
                                          if any(q[0] == path for q in self._cached_plan(w))}))
                raise lora_error(
                    names,
                    f"merged weight of {self.component} module {path!r} is not finite in {weight.dtype} "
                    "(scale too large?)",
                )

    def merge_units(self, plans) -> tuple[list[str], list[MergeUnit]]:
        """The modules a merge of ``plans`` (``(LoraWeights, scale, plan)``) touches and its units, in
        the order they run at once; makes the pristine copies still missing. A unit depends only on
        the LoRAs, their scales and their order, never on when their bytes arrive."""
        by_module: dict[str, list[tuple[float, LoraLayer]]] = {}
        modules: dict[str, torch.nn.Module] = {}
        for _w, scale, plan in plans:
            for path, mod, layer in plan:
                by_module.setdefault(path, []).append((scale, layer))
                modules[path] = mod
        units: list[MergeUnit] = []
        groups: dict[tuple, list[tuple[tuple, LoraLayer]]] = {}
        for path, items in by_module.items():
            weight = modules[path].weight
            base = self._pristine.get(path)
            if base is None:
                base = self._pristine[path] = weight.detach().clone()
                self.pristine_bytes += base.numel() * base.element_size()
            views = self._weight_views(path, weight, base)
            if len(items) == 1 and views is not None:
                # one LoRA on a module: batched with the modules of its shape and factor
                scale, layer = items[0]
                # the factors' matrices are taken when the unit runs: a conversion to the weight's
                # dtype reads the LoRA's bytes, which may not have arrived yet
                key = (tuple(views[0].shape), weight.dtype, weight.device, layer.rank, scale * layer.factor)
                groups.setdefault(key, []).append(((views[0], views[1]), layer))
            else:
                units.append(MergeUnit(layers=[layer for _s, layer in items], path=path, items=items))
        for key, members in groups.items():
            weight0 = members[0][0][0]
            per = max(1, _GROUP_SCRATCH_BYTES // (weight0.numel() * weight0.element_size()))
            batch: list = []
            for member in members:
                if batch and (len(batch) == per or _apart(batch[0][1], member[1])):
                    units.append(_group_unit(batch, key[-1]))
                    batch = []
                batch.append(member)
            units.append(_group_unit(batch, key[-1]))
        return list(by_module), units

    @torch.no_grad()
    def _merge(self, plans, arrival: Arrival | None = None) -> tuple[MergeCheck, list[str]]:
        self._pristine_ready()
        paths, units = self.merge_units(plans)
        # Modules patched before but not now: back to base.
        now = set(paths)
        stale = [path for path in self._dirty if path not in now]
        self._dirty.update(paths)
        copy_all([self._index.modules[p].weight for p in stale], [self._pristine[p] for p in stale])
        self._dirty.difference_update(stale)
        pending = units
        while pending:
            runnable = [u for u in pending if arrival is None or all(arrival.arrived(l) for l in u.layers)]
            if not runnable:
                arrival.await_more()
                continue
            if arrival is not None:
                arrival.fence()
            for unit in runnable:
                self._run_unit(unit)
            done = {id(u) for u in runnable}
            pending = [u for u in pending if id(u) not in done]
        if arrival is not None:
            arrival.finish()  # the loads' own finiteness checks
        self._changed([*stale, *paths])
        # one flag for the whole merge, read with one host sync (now, or later with defer_check)
        return MergeCheck(finite_flag_of([self._index.modules[p].weight for p in paths])), paths

    def _run_unit(self, unit: MergeUnit) -> None:
        if unit.group:
            members = []
            for (weight, base), layer in zip(unit.group, unit.layers):
                up, down = layer.matrices(weight.dtype, weight.device)
                members.append((weight, base, up, down))
            _merge_group(members, alpha=unit.alpha)
        else:
            _merge_into(self._index.modules[unit.path].weight, self._pristine[unit.path], unit.items)

    def _weight_views(self, path: str, weight: torch.Tensor, base: torch.Tensor) -> tuple | None:
        """``(weight, pristine)`` as 2-D ``[out, in * kh * kw]`` views, made once per module, when
        ``addmm`` / ``baddbmm_`` into the weight rounds once from a float32-or-better sum: float32/float64
        weights, or CUDA weights (cuBLAS accumulates and applies alpha/beta in float32); None
        otherwise (half precision on the CPU, non-contiguous weights)."""
        views = self._views.get(path)
        if views is None or views[0].data_ptr() != weight.data_ptr() or views[1].data_ptr() != base.data_ptr():
            exact = weight.is_cuda or weight.dtype in (torch.float32, torch.float64)
            if not (exact and weight.is_contiguous() and base.is_contiguous()):
                return None
            views = self._views[path] = (weight.view(weight.shape[0], -1), base.view(base.shape[0], -1))
        return views

    def restore(self) -> None:
        """Copy every touched weight back from its pristine copy (bit-identical base)."""
        with self._lock, torch.no_grad():
            self._pristine_ready()
            paths = [p for p in self._pristine if p in self._dirty]
            copy_all([self._index.modules[p].weight for p in paths], [self._pristine[p] for p in paths])
            self._changed(paths)
            self._dirty.clear()
            self._current = ()
            self._unchecked = None

    def _changed(self, paths: Sequence[str]) -> None:
        if self.on_change is not None and paths:
            self.on_change([self._index.modules[p] for p in paths])


_STREAM_SPLITS = 8  # a batch of layers spans at most this share (1/n) of its LoRA's bytes


def _apart(first: LoraLayer, layer: LoraLayer) -> bool:
    """Whether ``layer`` lies more than 1/:data:`_STREAM_SPLITS` of its LoRA's buffer after ``first``
    (both views into one buffer, as the loader makes them; separate tensors are never apart): such
    layers go in different batches, so a merge streaming the LoRA in can run the first batch before
    the second's bytes have arrived. Fixed by the LoRA alone, so the batches are the same either way."""
    a, b = first.down, layer.down
    storage = a.untyped_storage()
    if b.untyped_storage().data_ptr() != storage.data_ptr():
        return False
    offset = (b.storage_offset() - a.storage_offset()) * b.element_size()
    return offset * _STREAM_SPLITS > storage.nbytes()


def _group_unit(batch: list, alpha: float) -> "MergeUnit":
    return MergeUnit(layers=[layer for _m, layer in batch], group=[m for m, _l in batch], alpha=alpha)


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


def finite_flag_of(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """0-dim bool tensor, True when every value of ``tensors`` is finite; queued, not waited for
    (per-tensor L2 norms in one fused pass; NaN and Inf make a norm non-finite). May say False for
    finite tensors whose norm overflows float32; callers then look tensor by tensor."""
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    if not hasattr(torch, "_foreach_norm"):
        return torch.stack([torch.isfinite(t).all() for t in tensors]).all()
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
    return torch.stack(flags).all()


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """:func:`finite_flag_of`, read (one host sync)."""
    return bool(finite_flag_of(tensors))


def apply_loras(patcher: LoraPatcher, loras: Sequence[tuple[LoraWeights, float]]) -> None:
    """Merge into ``patcher``'s module the LoRAs of ``loras`` that have layers for its component."""
    patcher.apply([(w, s) for w, s in loras if patcher.component in w.layers])


def attention_projections(module: torch.nn.Module) -> list[str]:
    """Module paths of the attention projections of ``module``'s transformer blocks (``to_q``, ``to_k``,
    ``to_v``, ``to_out.0`` of ``attn1``/``attn2``): what most published LoRAs adapt."""
    suffixes = (".to_q", ".to_k", ".to_v", ".to_out.0")
    return [name for name, mod in module.named_modules()
            if ".transformer_blocks." in f".{name}" and name.endswith(suffixes) and isinstance(mod, torch.nn.Linear)]


@torch.no_grad()
def warm_up(patcher: LoraPatcher, ranks: Sequence[int] = (8, 64, 128)) -> float:
    """Merge and restore an all-zero LoRA of each rank of ``ranks`` on the attention projections, so the
    first request with a LoRA does not pay for what a first merge costs once (on a GPU: loading the
    merge's kernels for each shape and rank, the merge's scratch memory, the pristine copies, ~0.1 s
    in all). A zero LoRA changes no weight; the base is restored either way. Returns the seconds taken
    (0.0 when the module has no attention projections)."""
    import time

    paths = attention_projections(patcher.module)
    if not paths:
        return 0.0
    start = time.perf_counter()
    modules = dict(patcher.module.named_modules())
    for rank in ranks:
        layers = {}
        for path in paths:
            w = modules[path].weight
            layers[path] = LoraLayer(down=torch.zeros(rank, w.shape[1], dtype=w.dtype, device=w.device),
                                     up=torch.zeros(w.shape[0], rank, dtype=w.dtype, device=w.device), alpha=None,
                                     key=f"warm-up.{path}")
        lora = LoraWeights(name=f"warm-up-rank-{rank}", layers={patcher.component: layers})
        try:
            patcher.apply([(lora, 1.0)])
        finally:
            patcher.restore()
    if paths and modules[paths[0]].weight.is_cuda:
        torch.cuda.synchronize(modules[paths[0]].weight.device)
    return time.perf_counter() - start

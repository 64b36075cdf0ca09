"""The LoRA manager: loads LoRAs off the request path and keeps them ready to patch.

One loader thread reads, parses and validates LoRA files and moves them to the
engine's device. Two LRU tiers with byte budgets keep them: *host* (the raw bytes
read from the file, with the parsed LoRA as views into them) and *device* (one
buffer per LoRA on the engine's device, with the parsed LoRA as views into it,
ready for :class:`katz.lora.patch.LoraPatcher`). The UNet model asks
:meth:`LoraManager.prefetch` at the first step of a request and patches the
LoRA in at the first step boundary where :meth:`LoraManager.ready` says so,
or waits in :meth:`LoraManager.get` at the bounding step *k*.

A load from disk (:meth:`LoraManager._read_entry`): the header is parsed and the
bytes of the manager's components are read by several threads straight into one
reusable staging buffer (pinned on CUDA, see :mod:`katz.lora.safetensors`); meanwhile the
loader thread makes the device buffer and the views into it, parses them and
validates them against the patchers' modules (only the header and the alphas,
read first, are needed for that). Then the bytes are uploaded in one copy on a
side stream and checked for finiteness on the device in one pass with one host sync. The host tier is filled afterwards,
once the waiting request can already go on. The same code runs on a CPU device
(the upload is then a CPU copy and the staging buffer is not pinned).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

import torch

from katz.errors import LoraError, lora_error
from katz.lora.patch import LoraPatcher
from katz.lora.safetensors import COMPONENT_PREFIXES, read_lora_bytes, tensor_views
from katz.lora.store import LoraStore
from katz.lora.weights import COMPONENTS, LoraLayer, LoraWeights, parse_lora


@dataclass
class LoraStats:
    """Totals since start. ``loads`` .. ``wait_seconds`` are exported as Triton custom metrics
    (:meth:`metrics`, published by the ``unet`` model).

    ``read_seconds`` .. ``device_wait_seconds`` split the loader thread's time over the stages of a
    load, failed loads included; for successful loads they add up to ``load_seconds`` less
    ``load_delay_s`` and bookkeeping. ``host_fill_seconds`` comes after a load, when its waiters
    have been let go. Read bandwidth: ``read_bytes / read_seconds``.
    """

    loads: int = 0
    load_seconds: float = 0.0
    load_failures: int = 0
    host_hits: int = 0
    host_misses: int = 0
    device_hits: int = 0
    device_misses: int = 0
    steps_before_patch: int = 0
    patches: int = 0
    wait_seconds: float = 0.0
    read_seconds: float = 0.0  # header + waiting for the file bytes beyond the parsing done meanwhile (host misses)
    read_bytes: int = 0  # bytes read from LoRA files (host misses)
    parse_seconds: float = 0.0  # parse_lora + LoraPatcher.validate (host misses)
    upload_seconds: float = 0.0  # issuing the upload and the device finiteness check, views of the device buffer
    device_wait_seconds: float = 0.0  # waiting for the upload and the finiteness check (the load's one host sync)
    host_copy_seconds: float = 0.0  # host hits: host tier -> staging buffer
    host_fill_seconds: float = 0.0  # after a load: staging buffer -> host tier (off the request's path)
    # the UNet model's weight switches (merge a LoRA set in, or restore the base): host time,
    # which for a merge ends with its one device sync (the finiteness check)
    switch_seconds: float = 0.0

    def metrics(self) -> list[tuple[str, str, dict, float]]:
        """The totals as Triton custom metrics ``(name, description, labels, total)``."""
        s = self
        return [
            ("katz_lora_loads_total", "LoRAs loaded to the device", {}, s.loads),
            ("katz_lora_load_seconds_total", "time spent loading LoRAs (s)", {}, s.load_seconds),
            ("katz_lora_load_failures_total", "LoRA loads that failed", {}, s.load_failures),
            ("katz_lora_cache_hits_total", "LoRA cache hits", {"tier": "host"}, s.host_hits),
            ("katz_lora_cache_misses_total", "LoRA cache misses", {"tier": "host"}, s.host_misses),
            ("katz_lora_cache_hits_total", "LoRA cache hits", {"tier": "device"}, s.device_hits),
            ("katz_lora_cache_misses_total", "LoRA cache misses", {"tier": "device"}, s.device_misses),
            ("katz_lora_steps_before_patch_total", "UNet steps run on base weights while a LoRA loaded", {},
             s.steps_before_patch),
            ("katz_lora_patches_total", "LoRA sets patched into the UNet", {}, s.patches),
            ("katz_lora_wait_seconds_total", "time steps waited for a LoRA at the bound k (s)", {}, s.wait_seconds),
            ("katz_lora_switch_seconds_total", "time switching the UNet weights: LoRA sets merged in, base restored (s)",
             {}, s.switch_seconds),
            ("katz_lora_load_phase_seconds_total", "LoRA load time by phase (s)", {"phase": "read"}, s.read_seconds),
            ("katz_lora_load_phase_seconds_total", "LoRA load time by phase (s)", {"phase": "parse"}, s.parse_seconds),
            ("katz_lora_load_phase_seconds_total", "LoRA load time by phase (s)", {"phase": "upload"},
             s.upload_seconds),
            ("katz_lora_load_phase_seconds_total", "LoRA load time by phase (s)", {"phase": "device_wait"},
             s.device_wait_seconds),
        ]


@dataclass
class _Entry:
    """A cached LoRA: ``weights`` whose down/up tensors are views into ``buffer`` (uint8 ``[bytes]``)
    or are among ``extra`` (tensors that could not be views: a file offset not a multiple of the
    dtype size); ``nbytes`` counts both (what the tier's byte budget counts)."""

    weights: LoraWeights
    buffer: torch.Tensor | None
    extra: tuple[torch.Tensor, ...]
    nbytes: int

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.buffer, *self.extra) if t is not None]


@dataclass
class _Prepared:
    """A load parsed and validated (:meth:`LoraManager._prepare`): the device buffer ``dev``, the
    parsed ``weights`` (views into it), the on-device tensors by key, the finiteness ``spans`` of
    ``dev`` and the ``extra`` tensors (copies), the validation error to report after the values'
    check (or None), and the ``seconds`` it took."""

    dev: torch.Tensor
    weights: LoraWeights
    on_device: dict[str, torch.Tensor]
    spans: list[tuple[int, int, torch.dtype]]
    extra: list[torch.Tensor]
    invalid: LoraError | None
    seconds: float


class _LruBytes:
    """An LRU map of :class:`_Entry` with a byte budget; the newest entry always stays."""

    def __init__(self, budget: int):
        self.budget = budget
        self.items: OrderedDict[str, tuple[tuple, _Entry]] = OrderedDict()
        self.used = 0

    def clear(self) -> None:
        self.items.clear()
        self.used = 0

    def get(self, name: str, key: tuple) -> _Entry | None:
        hit = self.items.get(name)
        if hit is None or hit[0] != key:
            return None
        self.items.move_to_end(name)
        return hit[1]

    def put(self, name: str, key: tuple, entry: _Entry) -> None:
        self.drop(name)
        self.items[name] = (key, entry)
        self.used += entry.nbytes
        while self.used > self.budget and len(self.items) > 1:
            _, (_, old) = self.items.popitem(last=False)
            self.used -= old.nbytes

    def drop(self, name: str) -> None:
        old = self.items.pop(name, None)
        if old is not None:
            self.used -= old[1].nbytes


class StagingBuffer:
    """One reusable host buffer (uint8) for reads and uploads, pinned when ``pin``; grows to the
    largest request, in steps of :attr:`GRANULE` bytes.

    After an asynchronous upload from it, :meth:`uploaded` records an event on the upload stream;
    the next :meth:`acquire` waits for it, so the buffer is never overwritten while a copy reads it.
    """

    GRANULE = 32 << 20

    def __init__(self, pin: bool):
        self.pin = pin
        self.buffer: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None

    def acquire(self, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` bytes of the buffer (uint8 ``[nbytes]``), free to overwrite."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = None  # free the old one first
            size = -(-max(nbytes, 1) // self.GRANULE) * self.GRANULE
            self.buffer = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        return self.buffer[:nbytes]

    def uploaded(self, stream: torch.cuda.Stream | None) -> None:
        """Mark the buffer as read by copies queued on ``stream`` (None: copies already done)."""
        if stream is not None:
            self._event = torch.cuda.Event()
            self._event.record(stream)


def _byte_offset(t: torch.Tensor, base: torch.Tensor) -> int | None:
    """Byte offset of contiguous ``t``'s data in ``base`` (contiguous uint8), or None if not in it."""
    if (
        base is None
        or t.numel() == 0
        or not t.is_contiguous()
        or t.device != base.device
        or t.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    ):
        return None
    start = t.storage_offset() * t.element_size() - base.storage_offset()
    if start < 0 or start + t.numel() * t.element_size() > base.numel():
        return None
    return start


def _rebase(t: torch.Tensor, old: torch.Tensor, new: torch.Tensor, extra: list) -> torch.Tensor:
    """``t`` at the same byte offset in ``new`` as it has in ``old`` (same size buffers); a tensor
    not in ``old`` is copied to ``new``'s device (asynchronously where it can) and appended to ``extra``."""
    start = _byte_offset(t, old)
    if start is None:
        # non_blocking only towards a GPU: an asynchronous copy to the host may not have landed yet
        moved = t.to(new.device, non_blocking=new.device.type == "cuda")
        extra.append(moved)
        return moved
    return new[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)


def _rebase_weights(weights: LoraWeights, old: torch.Tensor, new: torch.Tensor) -> _Entry:
    """``weights`` (views into ``old``) as views into ``new``, a byte copy of ``old``."""
    extra: list[torch.Tensor] = []
    layers = {
        comp: {
            path: LoraLayer(
                down=_rebase(l.down, old, new, extra), up=_rebase(l.up, old, new, extra), alpha=l.alpha, key=l.key
            )
            for path, l in group.items()
        }
        for comp, group in weights.layers.items()
    }
    nbytes = new.numel() + sum(t.numel() * t.element_size() for t in extra)
    return _Entry(LoraWeights(name=weights.name, layers=layers), new, tuple(extra), nbytes)


def _finite(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool: every element of ``t`` is finite (aminmax propagates NaN and keeps ±inf)."""
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


def finite_flag(
    base: torch.Tensor, spans: Iterable[tuple[int, int, torch.dtype]], others: Iterable[torch.Tensor] = ()
) -> torch.Tensor:
    """0-dim bool tensor on ``base``'s device, True when every element is finite of the ``spans``
    ``(start, end, dtype)`` of ``base`` (uint8; byte offsets, ``start`` a multiple of the dtype
    size) and of the tensors ``others``.

    Queues the reductions without waiting for them. Adjacent spans of one dtype are merged into
    runs, and each run is reduced once: a file written by safetensors groups its tensors by dtype,
    so a LoRA costs one reduction per dtype. Bytes in no span are not looked at.
    """
    merged: list[list] = []
    for start, end, dtype in sorted(spans, key=lambda r: (r[0], r[1])):
        last = merged[-1] if merged else None
        if last is not None and last[2] == dtype and last[0] <= start <= last[1]:
            if (start - last[0]) % dtype.itemsize == 0:  # same element grid: one view covers both
                last[1] = max(last[1], end)
                continue
        merged.append([start, end, dtype])
    flags = [_finite(base[start:end].view(dtype)) for start, end, dtype in merged if end > start]
    flags += [_finite(t) for t in others if t.numel()]
    if not flags:
        return torch.ones((), dtype=torch.bool, device=base.device)
    return torch.stack(flags).all()


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first key of ``tensors`` whose tensor has a NaN or infinite value (one host sync), or None."""
    keys = [k for k, t in tensors.items() if t.numel()]
    if not keys:
        return None
    ok = torch.stack([torch.isfinite(tensors[k]).all() for k in keys]).cpu()
    bad = [k for k, good in zip(keys, ok.tolist()) if not good]
    return bad[0] if bad else None


def _is_alpha(key: str) -> bool:
    return key.endswith(".alpha")  # the alpha role in every key format parse_lora reads


class LoraManager:
    """Asynchronous LoRA loading into host and device caches for one engine's patchers.

    Reads only the tensors of the patchers' components (and keys of no known component, which
    parse_lora reports). ``staging_bytes`` of pinned staging memory are allocated up front on a
    CUDA device (the buffer grows to the largest file's wanted bytes).
    """

    def __init__(
        self,
        store: LoraStore,
        patchers: list[LoraPatcher],
        device: str | torch.device = "cpu",
        host_budget_bytes: int = 2 << 30,
        device_budget_bytes: int = 1 << 30,
        load_delay_s: float = 0.0,
        staging_bytes: int = 256 << 20,
    ):
        self.store = store
        self.patchers = {p.component: p for p in patchers}
        self.components = tuple(self.patchers)
        self.device = torch.device(device)
        self.host = _LruBytes(host_budget_bytes)
        self.device_cache = _LruBytes(device_budget_bytes)
        self.load_delay_s = load_delay_s  # simulates slow storage (tests, benchmarks)
        self.stats = LoraStats()
        self._lock = threading.Lock()
        self._inflight: dict[str, tuple[tuple, Future]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="katz-lora-loader")
        cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if cuda else None
        self._staging = StagingBuffer(pin=cuda)
        if cuda and staging_bytes:
            self._pool.submit(self._staging.acquire, staging_bytes)  # cudaHostAlloc off the first load

    # ------------------------------------------------------------- queries
    def cache_key(self, name: str) -> tuple:
        """The key the caches hold ``name`` under: its file's size and mtime (a rewritten file is a new entry)."""
        path = self.store.path(name)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise LoraError(f"lora {name!r}: file {path.name} is not in the LoRA store") from None
        return (st.st_size, st.st_mtime_ns)

    def ready(self, names: list[str]) -> bool:
        """True when every LoRA in ``names`` is on the device, unchanged on disk, and no load is pending."""
        with self._lock:
            for name in names:
                try:
                    key = self.cache_key(name)
                except LoraError:
                    return True  # let get() report it now
                if self.device_cache.get(name, key) is None:
                    fut = self._inflight.get(name)
                    if fut is None or not fut[1].done():
                        return False
        return True

    # ------------------------------------------------------------- loading
    def prefetch(self, names: list[str]) -> None:
        """Start loading whatever of ``names`` is not on the device yet (returns at once)."""
        for name in names:
            self._future(name)

    def hint(self, names: list[str], max_pending: int = 2) -> bool:
        """:meth:`prefetch` for a request that has not reached this UNet yet (a LoRA hint), unless
        ``max_pending`` loads are queued already (a long queue would only evict what it loads
        before its requests run); names not in the store are left for the request to report.
        Returns whether the loads were started."""
        with self._lock:
            if sum(not fut.done() for _, fut in self._inflight.values()) >= max_pending:
                return False
        for name in names:
            try:
                self._future(name)
            except LoraError:
                pass
        return True

    def _future(self, name: str) -> Future | None:
        key = self.cache_key(name)
        with self._lock:
            if self.device_cache.get(name, key) is not None:
                return None
            pending = self._inflight.get(name)
            if pending is not None and pending[0] == key:
                return pending[1]
            # Resolved by _load as soon as the device entry is in; the host tier is filled after.
            fut: Future = Future()
            self._pool.submit(self._load, name, key, fut)
            self._inflight[name] = (key, fut)
            return fut

    def _load(self, name: str, key: tuple, fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        start = time.perf_counter()
        fill = None
        try:
            if self.load_delay_s:
                time.sleep(self.load_delay_s)
            with self._lock:
                host = self.host.get(name, key)
                self.stats.host_hits += host is not None
                self.stats.host_misses += host is None
            if host is not None:
                entry = self._upload_entry(host)
            else:
                entry, fill = self._read_entry(name)
            with self._lock:
                self.device_cache.put(name, key, entry)
                self.stats.loads += 1
                self.stats.load_seconds += time.perf_counter() - start
        except BaseException as exc:
            with self._lock:
                self.stats.load_failures += 1
            fut.set_exception(exc)
            return
        fut.set_result(None)
        if fill is not None:
            self._fill_host(name, key, entry, fill)

    def _stream_ctx(self):
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    def _upload(self, staged: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Queue a copy of ``staged`` (uint8, a slice of the staging buffer) to ``out`` (default: a new
        device buffer) on the side stream (a plain copy on a CPU device); call inside :meth:`_stream_ctx`."""
        if out is None:
            out = torch.empty(staged.numel(), dtype=torch.uint8, device=self.device)
        out.copy_(staged, non_blocking=True)
        self._staging.uploaded(self._stream)
        return out

    def _check_family(self, name: str, keys: Iterable[str]) -> None:
        """Report keys of a component the model family lacks (they are not read: not the manager's)."""
        missing = [c for c in COMPONENT_PREFIXES if c not in COMPONENTS[self.store.family]]
        for key in keys:
            for c in missing:
                if key.startswith(COMPONENT_PREFIXES[c]):
                    raise lora_error(name, f"tensor {key!r} targets {c}, which a {self.store.family} model does not have")

    @contextlib.contextmanager
    def _timed(self, stat: str):
        """Add the seconds the block takes (also when it raises) to ``self.stats.<stat>``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                setattr(self.stats, stat, getattr(self.stats, stat) + time.perf_counter() - t0)

    def _read_entry(self, name: str) -> tuple[_Entry, torch.Tensor | None]:
        """Load ``name`` from disk: (device entry, the staging bytes to fill the host tier from, or None).

        While the read threads fill the staging buffer, this thread already makes the device buffer,
        the views into it, parses and validates (:meth:`_prepare`, needing only the header and the
        alphas, read first); once the bytes are in: one upload, one finiteness pass, one host sync."""
        path = self.store.path(name)
        if not path.is_file():
            raise LoraError(f"lora {name!r}: file {path.name} is not in the LoRA store")
        t0 = time.perf_counter()
        read = read_lora_bytes(path, name, self.components, self._staging.acquire,
                               overlap=lambda r: self._prepare(r, None), first=_is_alpha)
        prepared: _Prepared | None = read.overlapped
        with self._lock:
            self.stats.read_bytes += read.buffer.numel()
            overlapped = prepared.seconds if prepared is not None else 0.0
            self.stats.read_seconds += time.perf_counter() - t0 - overlapped  # the wait for the disk
        if read.overlap_error is not None:  # a component the family lacks, a key parse_lora rejects
            raise read.overlap_error
        if not read.keys:  # nothing for these components (e.g. a text-encoder-only LoRA)
            return _Entry(LoraWeights(name=name, layers={}), None, (), 0), None
        if prepared is None:  # a tensor must be copied out of the bytes: prepare after the upload
            with self._timed("upload_seconds"), self._stream_ctx():
                dev = self._upload(read.buffer)
            prepared = self._prepare(read, dev)
        else:
            with self._timed("upload_seconds"), self._stream_ctx():
                self._upload(read.buffer, out=prepared.dev)
        dev, extra = prepared.dev, prepared.extra
        with self._timed("upload_seconds"), self._stream_ctx():
            finite = finite_flag(dev, prepared.spans, extra)  # queued behind the upload
        with self._timed("device_wait_seconds"), self._stream_ctx():
            if not bool(finite):  # the one host sync of the load: the upload is done too
                bad = first_non_finite(prepared.on_device)
                if bad is not None:
                    raise lora_error(name, f"tensor {bad!r} contains NaN or infinite values")
        if prepared.invalid is not None:
            raise prepared.invalid
        nbytes = dev.numel() + sum(t.numel() * t.element_size() for t in extra)
        return _Entry(prepared.weights, dev, tuple(extra), nbytes), read.buffer

    def _prepare(self, read, dev: torch.Tensor | None) -> _Prepared | None:
        """Parse and validate ``read`` against a device buffer: ``dev`` holding the bytes already, or
        None (called while the bytes are read: a new, still empty buffer). None when there is nothing
        to load, or when ``dev`` is None and a tensor would have to be copied out of bytes not read yet
        (then it is called again once they are uploaded)."""
        t0 = time.perf_counter()
        name = read.name
        device_keys = [k for k in read.keys if not _is_alpha(k)]
        if dev is None and any(read.plan.offsets[k] % read.header.tensors[k].dtype.itemsize for k in device_keys):
            return None  # tensor_views copies such tensors: they need the bytes
        self._check_family(name, read.header.tensors)
        if not read.keys:
            return None
        if dev is None:
            with self._timed("upload_seconds"), self._stream_ctx():
                dev = torch.empty(read.buffer.numel(), dtype=torch.uint8, device=self.device)
        with self._timed("upload_seconds"), self._stream_ctx():
            tensors = read.tensors(dev)  # views into the device buffer; folded alphas on the host
            # the file's alphas (scalars) on the host, as copies: parse_lora reads them as floats
            alphas = [k for k in read.keys if _is_alpha(k)]
            tensors.update((k, t.clone()) for k, t in tensor_views(read.buffer, read.header, read.plan, alphas).items())
        on_device = {k: t for k, t in tensors.items() if not _is_alpha(k)}
        spans, extra = [], []
        for k, t in on_device.items():
            spec, at = read.header.tensors[k], read.plan.offsets[k]
            if at % spec.dtype.itemsize:
                extra.append(t)  # copied on the device by tensor_views: not a view of dev
            else:
                spans.append((at, at + spec.nbytes, spec.dtype))
        with self._timed("parse_seconds"):
            weights = parse_lora(tensors, name, self.store.family, check_finite=False)
        invalid = None
        with self._timed("parse_seconds"):
            try:
                for comp, patcher in self.patchers.items():
                    if comp in weights.layers:
                        # values are checked on the device, in one pass, once the bytes are there
                        patcher.validate(weights, check_values=False)
            except LoraError as e:
                invalid = e  # reported after a non-finite tensor, as parse_lora + validate order them
        return _Prepared(dev, weights, on_device, spans, extra, invalid, time.perf_counter() - t0)

    def _upload_entry(self, host: _Entry) -> _Entry:
        """A host-tier entry on the device (no disk, no parsing, no validation: done when it was read)."""
        if host.buffer is None:
            return host  # no tensors
        with self._timed("host_copy_seconds"):
            staged = self._staging.acquire(host.buffer.numel())
            staged.copy_(host.buffer)
        with self._timed("upload_seconds"):
            with self._stream_ctx():
                entry = _rebase_weights(host.weights, host.buffer, self._upload(staged))
            if self._stream is not None:
                self._stream.synchronize()
        with self._timed("parse_seconds"):  # plans the merge here, off the request's path (checked when read)
            for comp, patcher in self.patchers.items():
                if comp in entry.weights.layers:
                    patcher.validate(entry.weights)
        return entry

    def _fill_host(self, name: str, key: tuple, entry: _Entry, staged: torch.Tensor) -> None:
        """Keep the bytes just loaded in the host tier (ordinary memory) if they fit its budget.

        Runs on the loader thread after the load's future is resolved, before the next load, so
        ``staged`` still holds this LoRA's bytes.
        """
        if entry.nbytes > self.host.budget:
            return
        with self._timed("host_fill_seconds"):
            blob = torch.empty(staged.numel(), dtype=torch.uint8)
            blob.copy_(staged)
            host = _rebase_weights(entry.weights, entry.buffer, blob)
            with self._lock:
                self.host.put(name, key, host)

    def get(self, names: list[str], timeout: float | None = None) -> list[LoraWeights]:
        """The device-resident LoRAs ``names``, waiting for their loads; raises :class:`LoraError`."""
        out = []
        start = time.perf_counter()
        waited = False
        for name in names:
            fut = self._future(name)
            if fut is not None:
                waited = waited or not fut.done()
                try:
                    fut.result(timeout=timeout)
                except LoraError:
                    raise
                except Exception as exc:
                    raise LoraError(f"lora {name!r}: could not be loaded ({type(exc).__name__}: {exc})") from exc
                finally:
                    with self._lock:
                        if self._inflight.get(name, (None, None))[1] is fut:
                            del self._inflight[name]
            key = self.cache_key(name)
            with self._lock:
                entry = self.device_cache.get(name, key)
                self.stats.device_hits += fut is None
                self.stats.device_misses += fut is not None
            if entry is None:  # evicted or replaced while we waited: load it again, now
                fut = self._future(name)
                if fut is not None:
                    fut.result(timeout=timeout)
                with self._lock:
                    entry = self.device_cache.get(name, key)
                if entry is None:
                    raise LoraError(f"lora {name!r}: changed on disk while loading; retry the request")
            if self.device.type == "cuda":
                # The caller's stream reads these buffers: if the entry is evicted meanwhile, the
                # allocator must not hand them to the loader's stream before that stream is done.
                for t in entry.tensors():
                    t.record_stream(torch.cuda.current_stream(self.device))
            out.append(entry.weights)
        if waited:
            with self._lock:
                self.stats.wait_seconds += time.perf_counter() - start
        return out

    def clear_caches(self) -> None:
        """Empty the host and device tiers (a cold start for the next load; benchmarks, tests). Waits for
        the loads in flight first, so a host-tier fill finishing later does not refill them."""
        self.wait_idle()
        with self._lock:
            self.host.clear()
            self.device_cache.clear()

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until the loader thread has done all it was given so far (loads and host-tier fills)."""
        self._pool.submit(lambda: None).result(timeout=timeout)

    def close(self) -> None:
        with self._lock:
            for _, fut in self._inflight.values():
                fut.cancel()  # a load not started yet; waiters get CancelledError
        self._pool.shutdown(wait=False, cancel_futures=True)

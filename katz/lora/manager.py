"""The LoRA manager: loads LoRAs off the request path and keeps them ready to patch.

One loader thread reads, parses and validates LoRA files and moves them to the
engine's device. Two tiers with byte budgets keep them: *host* (the raw bytes
read from the file and where each tensor lies in them) and *device* (one
buffer per LoRA on the engine's device, with the parsed LoRA as views into it,
ready for :class:`katz.lora.patch.LoraPatcher`). The UNet model's BAL
(:mod:`katz.lora.bal`) asks :meth:`LoraManager.prefetch` at the first step of a
request, :meth:`LoraManager.eta` when the LoRAs will be on the device, and
patches them in with :meth:`LoraManager.stream` (merging each part as its bytes
arrive) or :meth:`LoraManager.get`.

A load from disk (:meth:`LoraManager._read_entry`): the header is parsed and the
bytes of the manager's components are read by several threads straight into one
reusable staging buffer (pinned on CUDA, see :mod:`katz.lora.safetensors`); meanwhile the
loader thread makes the device buffer and the views into it, parses them and
validates them against the patchers' modules (only the header and the alphas,
read first, are needed for that), has the patchers make the pristine copies of the
weights the LoRA targets, then uploads each chunk as soon as the read threads have
it (in buffer order, on a side stream), so a merge waiting for the LoRA can start on
what has arrived. Once all bytes are up: one finiteness pass on the device and one
host sync. The host tier is filled afterwards, once the waiting request can already go on,
and only with LoRAs used more than what they would evict (:mod:`katz.lora.tiers`).
The same code runs on a CPU device (the uploads are then CPU copies and the staging
buffer is not pinned).

The manager keeps running estimates of each phase per tier (:mod:`katz.lora.estimates`);
:meth:`LoraManager.eta` predicts from them, and from the loads queued ahead, when a set of
LoRAs will be on the device. The tiers' entries, eviction and admission are in
:mod:`katz.lora.tiers`; what is counted, in :mod:`katz.lora.stats`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable

import torch

from katz.errors import LoraError, lora_error
from katz.lora.estimates import LoadEstimates
from katz.lora.patch import LoraPatcher
from katz.lora.readahead import resident_fraction
from katz.lora.safetensors import COMPONENT_PREFIXES, read_lora_bytes, tensor_views
from katz.lora.stats import LoraStats
from katz.lora.store import LoraStore
from katz.lora.tiers import ByteTier, Entry, Popularity, Spec, default_host_budget, layout_of, numel, streamable, \
    weights_from
from katz.lora.weights import COMPONENTS, LoraLayer, LoraWeights, parse_lora

# a file this much in the page cache loads from the page_cache tier, else from the disk tier
RESIDENT_FRACTION = 0.95
HOST_CHUNK_BYTES = 16 << 20  # a host-tier load copies and uploads this much at a time


@dataclass
class _Prepared:
    """A load parsed and validated (:meth:`LoraManager._prepare`): the device buffer ``dev``, the
    parsed ``weights`` (views into it), their ``layout``, the on-device tensors by key, the
    finiteness ``spans`` of ``dev`` and the ``extra`` tensors (copies), the validation error to
    report after the values' check (or None), and the ``seconds`` it took."""

    dev: torch.Tensor
    weights: LoraWeights
    layout: list
    on_device: dict[str, torch.Tensor]
    spans: list[tuple[int, int, torch.dtype]]
    extra: list[torch.Tensor]
    invalid: LoraError | None
    seconds: float


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


class LoadProgress:
    """How far one load is: its parsed LoRA (views into its device ``buffer``, validated, with
    ``layout``) once published, how many bytes of that buffer are on the device (``upto``, with the
    CUDA ``event`` recorded after their uploads), and whether the load ``ended`` (its future holds
    the outcome). The loader thread advances it; a merge streaming the LoRA in reads it."""

    def __init__(self, cond: threading.Condition):
        self._cond = cond  # the manager's: one wake-up for any load's progress
        self.weights: LoraWeights | None = None
        self.buffer: torch.Tensor | None = None
        self.layout: list = []
        self.upto = 0
        self.event: torch.cuda.Event | None = None
        self.ended = False

    def _changed(self, **values) -> None:
        with self._cond:
            for k, v in values.items():
                setattr(self, k, v)
            self._cond.version += 1
            self._cond.notify_all()

    def publish(self, weights: LoraWeights, buffer: torch.Tensor, layout: list) -> None:
        self._changed(weights=weights, buffer=buffer, layout=layout)

    def advance(self, upto: int, event: torch.cuda.Event | None) -> None:
        self._changed(upto=upto, event=event)

    def end(self) -> None:
        self._changed(ended=True)


@dataclass
class _Load:
    """A load submitted to the loader thread: the file's cache ``key``, the ``future`` resolved when
    the LoRA is on the device, the ``tier`` it comes from (set again when the loader starts it),
    its file's ``nbytes``, its :class:`LoadProgress` and when the loader started it."""

    key: tuple
    fut: Future
    tier: str
    nbytes: int
    progress: LoadProgress
    started: float | None = None


class _Arrival:
    """The loads a merge streams in (:class:`katz.lora.patch.Arrival`): which layers' bytes are on
    the device, waiting for more, and the loads' outcome. ``waited``: seconds spent blocked (also
    counted in the manager's ``wait_seconds``)."""

    def __init__(self, manager: "LoraManager", loads: dict[str, _Load]):
        self._manager = manager
        self._loads = loads
        self._cond = manager._progress
        self._seen = self._cond.version
        self.waited = 0.0
        # id(layer) -> (its load's progress, the byte of the buffer after its tensors), from the layout
        self._ends: dict[int, tuple[LoadProgress, int]] = {}
        for load in loads.values():
            p = load.progress
            for comp, path, _alpha, _key, down, up in p.layout:
                layer = p.weights.layers[comp][path]
                end = max(s.offset + s.dtype.itemsize * numel(s.shape) for s in (down, up))
                self._ends[id(layer)] = (p, end)

    def arrived(self, layer: LoraLayer) -> bool:
        hit = self._ends.get(id(layer))
        return hit is None or hit[0].upto >= hit[1]  # None: a LoRA that was on the device already

    def await_more(self) -> None:
        t0 = time.perf_counter()
        try:
            with self._cond:
                while self._cond.version == self._seen and not all(load.fut.done() for load in self._loads.values()):
                    self._cond.wait()
                self._seen = self._cond.version
            for name, load in self._loads.items():
                if load.fut.done():
                    self._manager._result(name, load)  # raises the load's error
            if all(load.fut.done() for load in self._loads.values()) and any(
                    p.upto < end for p, end in self._ends.values()):
                raise RuntimeError("a LoRA load ended without uploading every layer it published")
        finally:
            self._waited(time.perf_counter() - t0)

    def _waited(self, seconds: float) -> None:
        self.waited += seconds
        with self._manager._lock:
            self._manager.stats.wait_seconds += seconds

    def fence(self) -> None:
        for load in self._loads.values():
            event = load.progress.event
            if event is not None:
                torch.cuda.current_stream(self._manager.device).wait_event(event)

    def finish(self) -> None:
        t0 = time.perf_counter()
        try:
            for name, load in self._loads.items():
                self._manager._result(name, load)
                if self._manager.device.type == "cuda":
                    load.progress.buffer.record_stream(torch.cuda.current_stream(self._manager.device))
        finally:
            self._waited(time.perf_counter() - t0)


def _progress_condition() -> threading.Condition:
    cond = threading.Condition()
    cond.version = 0  # bumped on every change of any load's progress
    return cond


class LoraManager:
    """Asynchronous LoRA loading into host and device caches for one engine's patchers.

    Reads only the tensors of the patchers' components (and keys of no known component, which
    parse_lora reports). ``staging_bytes`` of pinned staging memory are allocated up front on a
    CUDA device (the buffer grows to the largest file's wanted bytes). ``host_budget_bytes`` < 0:
    :func:`default_host_budget`. ``popularity_window``: the LoRA uses counted for the tiers'
    eviction and the host tier's admission (0: plain LRU tiers).
    """

    def __init__(
        self,
        store: LoraStore,
        patchers: list[LoraPatcher],
        device: str | torch.device = "cpu",
        host_budget_bytes: int = -1,
        device_budget_bytes: int = 1 << 30,
        load_delay_s: float = 0.0,
        staging_bytes: int = 256 << 20,
        popularity_window: int = 512,
    ):
        self.store = store
        self.patchers = {p.component: p for p in patchers}
        self.components = tuple(self.patchers)
        self.device = torch.device(device)
        self.popularity = Popularity(popularity_window)
        budget = default_host_budget() if host_budget_bytes < 0 else host_budget_bytes
        self.host = ByteTier(budget, self.popularity, admit=popularity_window > 0)
        self.device_cache = ByteTier(device_budget_bytes, self.popularity)
        self.load_delay_s = load_delay_s  # simulates slow storage: each file read (tests, benchmarks)
        self.stats = LoraStats()
        self.estimates = LoadEstimates()
        self._lock = threading.Lock()
        self._progress = _progress_condition()
        self._inflight: dict[str, _Load] = {}  # in submission order (the loader thread's order)
        self._phases: Counter = Counter()  # the running load's phase seconds (loader thread only)
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
                if self.device_cache.peek(name, key) is None:
                    load = self._inflight.get(name)
                    if load is None or not load.fut.done():
                        return False
        return True

    def _file_tier(self, name: str) -> str:
        """``page_cache`` when the file is (almost) all in the OS page cache, else ``disk``."""
        try:
            fraction = resident_fraction(self.store.path(name))
        except (OSError, LoraError):
            fraction = None
        return "page_cache" if fraction is not None and fraction >= RESIDENT_FRACTION else "disk"

    def _tier(self, name: str, key: tuple) -> str:
        """Where ``name`` would load from now (call under the lock)."""
        if self.device_cache.peek(name, key) is not None:
            return "device"
        load = self._inflight.get(name)
        if load is not None and load.key == key:
            return "device" if load.fut.done() else load.tier
        if self.host.peek(name, key) is not None:
            return "host"
        return self._file_tier(name)

    def tiers(self, names: list[str]) -> list[str]:
        """Where each LoRA of ``names`` is (``device``, ``host``) or loads from (an in-flight load's
        tier; ``page_cache``, ``disk``); a name not in the store counts as ``device`` (its request
        fails at once, when the LoRA is asked for)."""
        out = []
        with self._lock:
            for name in names:
                try:
                    key = self.cache_key(name)
                except LoraError:
                    out.append("device")
                    continue
                out.append(self._tier(name, key))
        return out

    def eta(self, names: list[str]) -> float:
        """Predicted seconds until every LoRA of ``names`` is on the device (0: they are), from the
        estimates (:mod:`katz.lora.estimates`) and the loads the loader thread has queued ahead of
        them; starts nothing. A load running longer than predicted is taken to need as long again
        as it has overrun (at most one more prediction)."""
        now = time.perf_counter()
        with self._lock:
            t, done_at = 0.0, {}
            for name, load in self._inflight.items():
                if load.fut.done():
                    continue
                d = self._busy_seconds(load.tier, load.nbytes)
                if load.started is not None:
                    elapsed = now - load.started
                    t = d - elapsed if d > elapsed else min(elapsed - d, d)
                else:
                    t += d
                done_at[name] = t
            worst = 0.0
            for name in names:
                try:
                    key = self.cache_key(name)
                except LoraError:
                    continue
                if name in done_at:
                    worst = max(worst, done_at[name])
                    continue
                tier = self._tier(name, key)
                if tier != "device":
                    t += self._busy_seconds(tier, key[0])
                    worst = max(worst, t)
        return worst

    def _busy_seconds(self, tier: str, nbytes: int) -> float:
        return self.estimates.seconds(tier, nbytes)

    def observe_merge(self, names: list[str], seconds: float) -> None:
        """A switch merged ``names`` in (``seconds`` of host work, waits excluded): the ``merge``
        estimate, per byte of the LoRA files (the ``device`` tier: a merge is the same from any tier)."""
        try:
            nbytes = sum(self.cache_key(n)[0] for n in names)
        except LoraError:
            return
        self.estimates.observe("device", "merge", nbytes, seconds)

    def note_request(self, names: list[str]) -> None:
        """Count a request's LoRAs (once per request) for the tiers' popularity."""
        self.popularity.note(names)

    def gauges(self) -> list[tuple[str, str, dict, float]]:
        """The longest switch, the tiers' bytes and budgets, and the load estimates (Triton gauges)."""
        with self._lock:
            tiers = [("katz_lora_cache_bytes", "bytes the LoRA tiers hold and may hold", {"tier": t, "kind": kind}, float(v))
                     for t, c in (("host", self.host), ("device", self.device_cache))
                     for kind, v in (("used", c.used), ("budget", c.budget))]
        return [*self.stats.gauges(), *tiers, *self.estimates.gauges()]

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
            if sum(not load.fut.done() for load in self._inflight.values()) >= max_pending:
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
            if pending is not None and pending.key == key:
                return pending.fut
            # Resolved by _load as soon as the device entry is in; the host tier is filled after.
            fut: Future = Future()
            tier = "host" if self.host.peek(name, key) is not None else self._file_tier(name)
            self._inflight.pop(name, None)  # re-inserted last: the loader's order
            load = self._inflight[name] = _Load(key, fut, tier, key[0], LoadProgress(self._progress))
            self._pool.submit(self._load, name, load)
            return fut

    def _load(self, name: str, load: _Load) -> None:
        fut, key = load.fut, load.key
        if not fut.set_running_or_notify_cancel():
            load.progress.end()
            return
        start = load.started = time.perf_counter()
        self._phases.clear()
        fill = None
        try:
            with self._lock:
                host = self.host.get(name, key)
                self.stats.host_hits += host is not None
                self.stats.host_misses += host is None
            if host is not None:
                tier = "host"
                entry = self._upload_entry(host, load.progress)
            else:
                if self.load_delay_s:  # slow storage: the file, not the host tier
                    time.sleep(self.load_delay_s)
                tier = self._file_tier(name)  # the readahead may have brought it in since it was asked for
                entry, fill = self._read_entry(name, load.progress)
            seconds = time.perf_counter() - start
            with self._lock:
                load.tier = tier
                self.device_cache.put(name, key, entry)
                # Forgotten now that the device tier answers for it: a load nobody collects (a hint's,
                # finished before its request asked) would otherwise keep its device buffer alive
                # after the tier evicts the entry, one buffer per LoRA ever hinted. A merge streaming
                # it holds the load itself; a failed load stays until a request collects its error.
                if self._inflight.get(name) is load:
                    del self._inflight[name]
                self.stats.loads += 1
                self.stats.load_seconds += seconds
                self.stats.loads_by_tier[tier] += 1
                self.stats.load_seconds_by_tier[tier] += seconds
        except BaseException as exc:
            with self._lock:
                self.stats.load_failures += 1
            fut.set_exception(exc)
            load.progress.end()
            return
        fut.set_result(None)
        load.progress.end()
        self._observe(tier, key[0], seconds)
        if fill is not None:
            self._fill_host(name, key, entry, fill)

    def _observe(self, tier: str, nbytes: int, seconds: float) -> None:
        """Feed one successful load's phases and critical path to the estimates."""
        est, phases = self.estimates, self._phases
        est.observe(tier, "load", nbytes, seconds)
        for phase, stats in (("read", ("read_seconds",)), ("parse", ("parse_seconds",)),
                             ("upload", ("upload_seconds", "device_wait_seconds", "host_copy_seconds"))):
            if any(s in phases for s in stats):
                est.observe(tier, phase, nbytes, sum(phases[s] for s in stats))

    def _result(self, name: str, load: _Load, timeout: float | None = None) -> None:
        """Wait for ``load`` and raise its error as a :class:`LoraError`; forget it once done."""
        try:
            load.fut.result(timeout=timeout)
        except LoraError:
            raise
        except Exception as exc:
            raise LoraError(f"lora {name!r}: could not be loaded ({type(exc).__name__}: {exc})") from exc
        finally:
            with self._lock:
                if self._inflight.get(name) is load and load.fut.done():
                    del self._inflight[name]

    def _stream_ctx(self):
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    def _uploaded_event(self) -> torch.cuda.Event | None:
        """An event after the uploads queued so far on the side stream (None on a CPU device: done)."""
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self._stream)
        return event

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
        family = COMPONENTS[self.store.family]
        missing = [c for c in COMPONENT_PREFIXES if c not in family]
        # a prefix two components share (kohya's lora_unet_: UNet or FLUX transformer) is the family's
        present = tuple(p for c in family for p in COMPONENT_PREFIXES[c])
        for key in keys:
            if key.startswith(present):
                continue
            for c in missing:
                if key.startswith(COMPONENT_PREFIXES[c]):
                    raise lora_error(name, f"tensor {key!r} targets {c}, which a {self.store.family} model does not have")

    @contextlib.contextmanager
    def _timed(self, stat: str):
        """Add the seconds the block takes (also when it raises) to ``self.stats.<stat>`` (and to the
        running load's phases)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self._phases[stat] += dt
            with self._lock:
                setattr(self.stats, stat, getattr(self.stats, stat) + dt)

    def _read_entry(self, name: str, progress: LoadProgress) -> tuple[Entry, torch.Tensor | None]:
        """Load ``name`` from disk: (device entry, the staging bytes to fill the host tier from, or None).

        While the read threads fill the staging buffer, this thread makes the device buffer, the
        views into it, parses and validates (:meth:`_prepare`, needing only the header and the
        alphas, read first), publishes the LoRA to ``progress`` and uploads each chunk as soon as
        it is read; once all bytes are up: one finiteness pass, one host sync."""
        path = self.store.path(name)
        if not path.is_file():
            raise LoraError(f"lora {name!r}: file {path.name} is not in the LoRA store")
        t0 = time.perf_counter()
        uploading = [0.0]  # seconds issuing uploads inside the overlap (not reading)

        def overlap(read):
            prepared = self._prepare(read, None)
            if prepared is None:
                return None
            if prepared.invalid is None and streamable(prepared.layout):
                progress.publish(prepared.weights, prepared.dev, prepared.layout)  # a merge may start on it
            uploading[0] = self._upload_chunks(read, prepared.dev, progress)
            return prepared

        read = read_lora_bytes(path, name, self.components, self._staging.acquire, overlap=overlap, first=_is_alpha)
        prepared: _Prepared | None = read.overlapped
        with self._lock:
            self.stats.read_bytes += read.buffer.numel()
        overlapped = (prepared.seconds if prepared is not None else 0.0) + uploading[0]
        read_s = time.perf_counter() - t0 - overlapped  # the wait for the disk
        self._phases["read_seconds"] += read_s
        with self._lock:
            self.stats.read_seconds += read_s
        if read.overlap_error is not None:  # a component the family lacks, a key parse_lora rejects
            raise read.overlap_error
        if not read.keys:  # nothing for these components (e.g. a text-encoder-only LoRA)
            return Entry(name, LoraWeights(name=name, layers={}), None, (), 0), None
        if prepared is None:  # a tensor must be copied out of the bytes: prepare after the upload
            with self._timed("upload_seconds"), self._stream_ctx():
                dev = self._upload(read.buffer)
            prepared = self._prepare(read, dev)
            progress.advance(dev.numel(), self._uploaded_event())
        dev, extra = prepared.dev, prepared.extra
        with self._timed("upload_seconds"), self._stream_ctx():
            finite = finite_flag(dev, prepared.spans, extra)  # queued behind the uploads
        with self._timed("device_wait_seconds"), self._stream_ctx():
            if not bool(finite):  # the one host sync of the load: the uploads are done too
                bad = first_non_finite(prepared.on_device)
                if bad is not None:
                    raise lora_error(name, f"tensor {bad!r} contains NaN or infinite values")
        if prepared.invalid is not None:
            raise prepared.invalid
        nbytes = dev.numel() + sum(t.numel() * t.element_size() for t in extra)
        return Entry(name, prepared.weights, dev, tuple(extra), nbytes, prepared.layout), read.buffer

    def _upload_chunks(self, read, dev: torch.Tensor, progress: LoadProgress) -> float:
        """Upload each chunk of ``read`` to ``dev`` as soon as the read threads have it, in buffer order,
        advancing ``progress``; returns the seconds spent issuing the uploads. A chunk's read error
        stops it (:func:`read_lora_bytes` then raises that error)."""
        spent = 0.0
        for at, n, fut in read.chunks:
            fut.result()
            t0 = time.perf_counter()
            with self._stream_ctx():
                dev[at : at + n].copy_(read.buffer[at : at + n], non_blocking=True)
                event = self._uploaded_event()
            progress.advance(at + n, event)
            spent += time.perf_counter() - t0
        self._staging.uploaded(self._stream)
        self._phases["upload_seconds"] += spent
        with self._lock:
            self.stats.upload_seconds += spent
        return spent

    def _prepare(self, read, dev: torch.Tensor | None) -> _Prepared | None:
        """Parse and validate ``read`` against a device buffer: ``dev`` holding the bytes already, or
        None (called while the bytes are read: a new, still empty buffer). None when there is nothing
        to load, or when ``dev`` is None and a tensor would have to be copied out of bytes not read yet
        (then it is called again once they are uploaded). A valid LoRA also gets the pristine copies
        of the weights it targets made here (:meth:`LoraPatcher.prepare`), off the request's path."""
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
            tensors = read.tensors(dev, floats=True)  # views into the device buffer; folded alphas as floats
            # the file's alphas (read first) from the host bytes, as floats; parse_lora rejects any
            # that is not a scalar
            alphas = [k for k in read.keys if _is_alpha(k)]
            tensors.update((k, float(t) if t.numel() == 1 else t.clone())
                           for k, t in tensor_views(read.buffer, read.header, read.plan, alphas).items())
        on_device = {k: t for k, t in tensors.items() if not _is_alpha(k)}
        spans, extra, known = [], [], {}
        for k, t in on_device.items():
            spec, at = read.header.tensors[k], read.plan.offsets[k]
            if at % spec.dtype.itemsize:
                extra.append(t)  # copied on the device by tensor_views: not a view of dev
            else:
                spans.append((at, at + spec.nbytes, spec.dtype))
                known[id(t)] = Spec(offset=at, shape=spec.shape, dtype=spec.dtype)
        with self._timed("parse_seconds"):
            weights = parse_lora(tensors, name, self.store.family, check_finite=False)
            layout = layout_of(weights, dev, known=known)
        invalid = None
        with self._timed("parse_seconds"):
            try:
                for comp, patcher in self.patchers.items():
                    if comp in weights.layers:
                        # values are checked on the device, in one pass, once the bytes are there
                        patcher.validate(weights, check_values=False)
            except LoraError as e:
                invalid = e  # reported after a non-finite tensor, as parse_lora + validate order them
        if invalid is None:
            self._prepare_pristine(weights)
        return _Prepared(dev, weights, layout, on_device, spans, extra, invalid, time.perf_counter() - t0)

    def _prepare_pristine(self, weights: LoraWeights) -> None:
        with self._timed("pristine_seconds"):
            for comp, patcher in self.patchers.items():
                if comp in weights.layers and hasattr(patcher, "prepare"):
                    patcher.prepare(weights)

    def _upload_entry(self, host: Entry, progress: LoadProgress) -> Entry:
        """A host-tier entry on the device, chunk by chunk (no disk, no parsing, no value checks: done
        when it was read; the plans are made again for the new tensors, off the request's path)."""
        if host.buffer is None:
            return Entry(host.name, LoraWeights(name=host.name, layers={}), None, (), 0)
        n = host.buffer.numel()
        with self._timed("upload_seconds"), self._stream_ctx():
            dev = torch.empty(n, dtype=torch.uint8, device=self.device)
            weights, extra = weights_from(host.name, host.layout, dev)
        with self._timed("parse_seconds"):
            for comp, patcher in self.patchers.items():
                if comp in weights.layers:
                    patcher.validate(weights, check_values=False)
        self._prepare_pristine(weights)
        if streamable(host.layout):
            progress.publish(weights, dev, host.layout)
        staged = self._staging.acquire(n)
        for at in range(0, n, HOST_CHUNK_BYTES):
            end = min(n, at + HOST_CHUNK_BYTES)
            with self._timed("host_copy_seconds"):
                staged[at:end].copy_(host.buffer[at:end])
            with self._timed("upload_seconds"), self._stream_ctx():
                dev[at:end].copy_(staged[at:end], non_blocking=True)
                event = self._uploaded_event()
            progress.advance(end, event)
        self._staging.uploaded(self._stream)
        with self._timed("device_wait_seconds"):
            if self._stream is not None:
                self._stream.synchronize()
        return Entry(host.name, weights, dev, tuple(extra), host.nbytes, host.layout)

    def _fill_host(self, name: str, key: tuple, entry: Entry, staged: torch.Tensor) -> None:
        """Keep the bytes just loaded in the host tier (ordinary memory) if it admits them.

        Runs on the loader thread after the load's future is resolved, before the next load, so
        ``staged`` still holds this LoRA's bytes. Only a byte copy: no per-tensor work while the
        request that waited for the LoRA merges it (the two threads share the GIL).
        """
        with self._lock:
            if not self.host.admits(name, entry.nbytes):
                self.stats.host_rejected += 1
                return
        with self._timed("host_fill_seconds"):
            blob = torch.empty(staged.numel(), dtype=torch.uint8)
            blob.copy_(staged)
            layout = [(c, p, a, k, *(Spec(tensor=s.tensor.to("cpu")) if s.tensor is not None else s for s in (d, u)))
                      for c, p, a, k, d, u in entry.layout]
            extra = tuple(s.tensor for row in layout for s in row[4:] if s.tensor is not None)
            with self._lock:
                if not self.host.put(name, key, Entry(name, None, blob, extra, entry.nbytes, layout)):
                    self.stats.host_rejected += 1

    def get(self, names: list[str], timeout: float | None = None) -> list[LoraWeights]:
        """The device-resident LoRAs ``names``, waiting for their loads; raises :class:`LoraError`."""
        out = []
        start = time.perf_counter()
        waited = False
        for name in names:
            fut = self._future(name)
            if fut is not None:
                waited = waited or not fut.done()
                with self._lock:
                    load = self._inflight.get(name)
                if load is not None and load.fut is fut:
                    self._result(name, load, timeout)
                else:  # finished and forgotten meanwhile
                    fut.result(timeout=timeout)
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
            self._used_by_caller(entry)
            out.append(entry.weights)
        if waited:
            with self._lock:
                self.stats.wait_seconds += time.perf_counter() - start
        return out

    def _used_by_caller(self, entry: Entry) -> None:
        if self.device.type == "cuda":
            # The caller's stream reads these buffers: if the entry is evicted meanwhile, the
            # allocator must not hand them to the loader's stream before that stream is done.
            for t in entry.tensors():
                t.record_stream(torch.cuda.current_stream(self.device))

    def stream(self, names: list[str]) -> tuple[list[LoraWeights], _Arrival | None]:
        """The LoRAs ``names`` to merge now, without waiting for all their bytes: those on the device,
        and those still loading once parsed and validated (their bytes arrive while the merge runs:
        the returned arrival, for :meth:`LoraPatcher.apply`; None when nothing is still arriving).
        A load that cannot stream (a tensor to copy out of its bytes) is waited for. Raises
        :class:`LoraError`."""
        out, streaming = [], {}
        for name in names:
            fut = self._future(name)
            with self._lock:
                load = self._inflight.get(name)
            if fut is None or load is None or load.fut is not fut:
                out.extend(self.get([name]))
                continue
            progress = load.progress
            t0 = time.perf_counter()
            with self._progress:
                while progress.weights is None and not progress.ended:
                    self._progress.wait()
            with self._lock:
                self.stats.wait_seconds += time.perf_counter() - t0
            if progress.ended or progress.weights is None or fut.done():
                out.extend(self.get([name]))
                continue
            with self._lock:
                self.stats.device_misses += 1
            streaming[name] = load
            out.append(progress.weights)
        return out, (_Arrival(self, streaming) if streaming else None)

    def clear_caches(self) -> None:
        """Empty the host and device tiers (a cold start for the next load; benchmarks, tests). Waits for
        the loads in flight first, so a host-tier fill finishing later does not refill them."""
        self.wait_idle()
        with self._lock:
            self.host.clear()
            self.device_cache.clear()
            # a failed load still listed would answer ready() and get() with its error
            for name in [n for n, load in self._inflight.items() if load.fut.done()]:
                del self._inflight[name]

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until the loader thread has done all it was given so far (loads and host-tier fills)."""
        self._pool.submit(lambda: None).result(timeout=timeout)

    def close(self) -> None:
        with self._lock:
            loads = list(self._inflight.values())
        for load in loads:
            if load.fut.cancel():  # a load not started yet; waiters get CancelledError
                load.progress.end()
        self._pool.shutdown(wait=False, cancel_futures=True)

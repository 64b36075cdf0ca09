"""The LoRA manager: loads LoRAs off the request path and keeps them ready to patch.

One loader thread reads, parses and validates LoRA files and moves them to the
engine's device (pinned host memory and a side CUDA stream on GPUs). Two LRU
tiers with byte budgets keep them: *host* (parsed CPU tensors) and *device*
(tensors ready for :class:`katz.lora.LoraPatcher`). The UNet model asks
:meth:`LoraManager.prefetch` at the first step of a request and patches the
LoRA in at the first step boundary where :meth:`LoraManager.ready` says so,
or waits in :meth:`LoraManager.get` at the bounding step *k*.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from katz.lora import LoraError, LoraLayer, LoraPatcher, LoraWeights
from katz.lora_store import LoraStore


def lora_bytes(weights: LoraWeights) -> int:
    return sum(
        layer.down.numel() * layer.down.element_size() + layer.up.numel() * layer.up.element_size()
        for layers in weights.layers.values()
        for layer in layers.values()
    )


@dataclass
class LoraStats:
    """Counters exported as Triton custom metrics (all totals since start)."""

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
    extra: dict = field(default_factory=dict)


class _LruBytes:
    """An LRU map with a byte budget; the newest entry always stays."""

    def __init__(self, budget: int):
        self.budget = budget
        self.items: OrderedDict[str, tuple[tuple, LoraWeights, int]] = OrderedDict()
        self.used = 0

    def get(self, name: str, key: tuple) -> LoraWeights | None:
        hit = self.items.get(name)
        if hit is None or hit[0] != key:
            return None
        self.items.move_to_end(name)
        return hit[1]

    def put(self, name: str, key: tuple, weights: LoraWeights) -> None:
        self.drop(name)
        size = lora_bytes(weights)
        self.items[name] = (key, weights, size)
        self.used += size
        while self.used > self.budget and len(self.items) > 1:
            _, (_, _, s) = self.items.popitem(last=False)
            self.used -= s

    def drop(self, name: str) -> None:
        old = self.items.pop(name, None)
        if old is not None:
            self.used -= old[2]


class LoraManager:
    """Asynchronous LoRA loading into host and device caches for one engine's patchers."""

    def __init__(
        self,
        store: LoraStore,
        patchers: list[LoraPatcher],
        device: str | torch.device = "cpu",
        host_budget_bytes: int = 2 << 30,
        device_budget_bytes: int = 1 << 30,
        load_delay_s: float = 0.0,
    ):
        self.store = store
        self.patchers = {p.component: p for p in patchers}
        self.device = torch.device(device)
        self.host = _LruBytes(host_budget_bytes)
        self.device_cache = _LruBytes(device_budget_bytes)
        self.load_delay_s = load_delay_s  # simulates slow storage (tests, benchmarks)
        self.stats = LoraStats()
        self._lock = threading.Lock()
        self._inflight: dict[str, tuple[tuple, Future]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="katz-lora-loader")
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    # ------------------------------------------------------------- queries
    def _file_key(self, name: str) -> tuple:
        path: Path = self.store.path(name)
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
                    key = self._file_key(name)
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

    def _future(self, name: str) -> Future | None:
        key = self._file_key(name)
        with self._lock:
            if self.device_cache.get(name, key) is not None:
                return None
            pending = self._inflight.get(name)
            if pending is not None and pending[0] == key:
                return pending[1]
            fut = self._pool.submit(self._load, name, key)
            self._inflight[name] = (key, fut)
            return fut

    def _load(self, name: str, key: tuple) -> None:
        start = time.perf_counter()
        try:
            if self.load_delay_s:
                time.sleep(self.load_delay_s)
            with self._lock:
                host = self.host.get(name, key)
                self.stats.host_hits += host is not None
                self.stats.host_misses += host is None
            if host is None:
                host = self.store.read(name)
                for comp, patcher in self.patchers.items():
                    if comp in host.layers:
                        patcher.validate(host)
                with self._lock:
                    self.host.put(name, key, host)
            on_device = self._to_device(host)
            with self._lock:
                self.device_cache.put(name, key, on_device)
                self.stats.loads += 1
                self.stats.load_seconds += time.perf_counter() - start
        except BaseException:
            with self._lock:
                self.stats.load_failures += 1
            raise

    def _to_device(self, weights: LoraWeights) -> LoraWeights:
        if self.device.type == "cpu":
            return weights

        # One pinned buffer and one copy per dtype: pinning each of a LoRA's ~1,000
        # tensors separately costs a page-locking call each.
        entries = [(comp, path, l) for comp, group in weights.layers.items() for path, l in group.items()]
        tensors = [t for _, _, l in entries for t in (l.down, l.up)]
        moved: list[torch.Tensor | None] = [None] * len(tensors)
        with torch.cuda.stream(self._stream):
            for dtype in {t.dtype for t in tensors}:
                idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
                flat = torch.empty(sum(tensors[i].numel() for i in idx), dtype=dtype, pin_memory=True)
                offset = 0
                for i in idx:
                    n = tensors[i].numel()
                    flat[offset : offset + n].copy_(tensors[i].reshape(-1))
                    offset += n
                on_device = flat.to(self.device, non_blocking=True)
                offset = 0
                for i in idx:
                    n = tensors[i].numel()
                    moved[i] = on_device[offset : offset + n].view(tensors[i].shape)
                    offset += n
        self._stream.synchronize()
        layers: dict = {}
        for j, (comp, path, l) in enumerate(entries):
            layers.setdefault(comp, {})[path] = LoraLayer(down=moved[2 * j], up=moved[2 * j + 1], alpha=l.alpha, key=l.key)
        return LoraWeights(name=weights.name, layers=layers)

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
            key = self._file_key(name)
            with self._lock:
                weights = self.device_cache.get(name, key)
                self.stats.device_hits += fut is None
                self.stats.device_misses += fut is not None
            if weights is None:  # evicted or replaced while we waited: load it again, now
                fut = self._future(name)
                if fut is not None:
                    fut.result(timeout=timeout)
                with self._lock:
                    weights = self.device_cache.get(name, key)
                if weights is None:
                    raise LoraError(f"lora {name!r}: changed on disk while loading; retry the request")
            out.append(weights)
        if waited:
            with self._lock:
                self.stats.wait_seconds += time.perf_counter() - start
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

"""Gauges every model process publishes (Triton custom metrics): GPU memory and CUDA-graph use;
the process's garbage-collection pauses (:class:`GcPauses`)."""

from __future__ import annotations

import gc
import time

import torch


def memory_gauges(device: str) -> list[tuple[str, str, dict, float]]:
    """The process's CUDA memory on ``device`` as Triton gauges ``(name, description, labels, value)``:
    torch's caching allocator, ``allocated`` (in tensors) and ``reserved`` (held from the driver; what
    nvidia-smi shows, less the CUDA context). Empty on the CPU."""
    if not str(device).startswith("cuda") or not torch.cuda.is_initialized():
        return []
    description = "GPU memory of this model's process, torch's caching allocator (bytes)"
    return [
        ("katz_gpu_memory_bytes", description, {"kind": "allocated"}, float(torch.cuda.memory_allocated(device))),
        ("katz_gpu_memory_bytes", description, {"kind": "reserved"}, float(torch.cuda.memory_reserved(device))),
    ]


def graph_metrics(engine) -> list[tuple[str, str, dict, float]]:
    """CUDA-graph replays and eager fallbacks (calls of a shape not captured at load) per graph."""
    out = []
    for graph in getattr(engine, "graphs", {}).values():
        if hasattr(graph, "replays"):
            out.append(("katz_cuda_graph_replays_total", "steps replayed as CUDA graphs", {"graph": graph.name},
                        graph.replays))
            out.append(("katz_cuda_graph_eager_calls_total", "calls of a shape with no captured graph (run eagerly)",
                        {"graph": graph.name}, graph.eager_calls))
    return out


class GcPauses:
    """The process's Python garbage collections, timed through ``gc.callbacks``: a collection stops
    every thread of the process (the denoising loop, a LoRA switch), so a long one shows up as a
    slow step or switch. Counters per generation and the longest pause (Triton metrics)."""

    _instance: "GcPauses | None" = None

    def __init__(self):
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = 0.0  # since the model was loaded
        self.at_load = 0.0  # the full collection of everything loading made (freeze_after_load)
        self._start: float | None = None
        gc.callbacks.append(self._callback)

    @classmethod
    def watch(cls) -> "GcPauses":
        """The process's one watcher (made on first use)."""
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            dt = time.perf_counter() - self._start
            self._start = None
            g = min(int(info.get("generation", 2)), 2)
            self.collections[g] += 1
            self.seconds[g] += dt
            self.longest = max(self.longest, dt)

    def metrics(self) -> list[tuple[str, str, dict, float]]:
        out = []
        for g in range(3):
            out.append(("katz_gc_collections_total", "Python garbage collections in this process, by generation",
                        {"generation": str(g)}, self.collections[g]))
            out.append(("katz_gc_seconds_total", "time in Python garbage collections (all threads stopped; s)",
                        {"generation": str(g)}, self.seconds[g]))
        return out

    def gauges(self) -> list[tuple[str, str, dict, float]]:
        return [
            ("katz_gc_longest_pause_seconds", "the longest Python garbage collection since the model was loaded (s)",
             {}, self.longest),
            ("katz_gc_load_collection_seconds", "a full Python garbage collection of what loading made, once, before "
             "it was frozen out of the collector's sight (what a full collection would have cost a request; s)", {},
             self.at_load),
        ]


def freeze_after_load() -> float:
    """Move everything loading made (modules, compiled code, captured graphs: millions of objects
    after torch.compile) out of the garbage collector's sight: it lives as long as the model, and a
    full collection during a request (which Python starts on its own once enough objects survived)
    would otherwise scan all of it with every thread stopped. Returns the seconds the full
    collection before the freeze took (kept as :attr:`GcPauses.at_load`)."""
    watch = GcPauses.watch()
    t0 = time.perf_counter()
    gc.collect()
    seconds = time.perf_counter() - t0
    gc.freeze()
    watch.at_load, watch.longest = seconds, 0.0
    return seconds

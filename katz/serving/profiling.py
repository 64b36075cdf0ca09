"""Python profiles of the Katz models inside a running server (``KATZ_PROFILE_DIR``).

With ``KATZ_PROFILE_DIR=<folder>`` in the environment ``tritonserver`` starts in
(``KATZ_PROFILE_DIR=/tmp/prof katz serve ...``), every model instance profiles its
``execute()`` calls with :mod:`cProfile` and keeps the cumulative statistics in
``<folder>/<model>.<pid>.prof`` (:mod:`pstats` format), rewritten at most once a
``every_s`` seconds, after an ``execute()``. Up to Python 3.11 only the executing
thread is profiled (the denoising loop, a UNet step); from 3.12 cProfile sits on
``sys.monitoring`` and sees every thread of the process while an ``execute()`` runs
(the LoRA loader, ControlNet calls), with their time mixed into the callers'. cProfile
slows Python-heavy code down, so read shares of the time, not absolute figures.

    python -m katz.serving.profiling /tmp/prof/katz_pipeline.*.prof   # the top functions by own time

``KATZ_TRACE_DIR=<folder>`` (with ``KATZ_TRACE_AT``) instead records a :mod:`torch.profiler` trace
of chosen ``execute()`` calls and lists the GPU's idle gaps in them with the host ops across each
(:class:`ExecuteTrace`): the tool for time the GPU spends waiting inside the denoising loop.
"""

from __future__ import annotations

import cProfile
import gzip
import json
import os
import pstats
import sys
import time
from pathlib import Path

ENV = "KATZ_PROFILE_DIR"


class ExecuteProfiler:
    """Accumulates a cProfile of the calls it wraps; saves it to ``path`` now and then."""

    def __init__(self, path: Path, every_s: float = 1.0):
        self.path, self.every_s = Path(path), every_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.profile = cProfile.Profile()
        self._saved: float | None = None  # monotonic time of the last save; None: never (save after the first call)

    @classmethod
    def from_env(cls, model_name: str) -> "ExecuteProfiler | None":
        folder = os.environ.get(ENV)
        return cls(Path(folder) / f"{model_name}.{os.getpid()}.prof") if folder else None

    def run(self, fn, *args):
        self.profile.enable()
        try:
            return fn(*args)
        finally:
            self.profile.disable()
            if self._saved is None or time.monotonic() - self._saved >= self.every_s:
                self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        self.profile.dump_stats(str(tmp))
        os.replace(tmp, self.path)  # readers never see half a file
        self._saved = time.monotonic()


TRACE_ENV, TRACE_AT_ENV = "KATZ_TRACE_DIR", "KATZ_TRACE_AT"


class ExecuteTrace:
    """A :mod:`torch.profiler` trace (CPU ops, CUDA runtime calls and kernels) of chosen
    ``execute()`` calls of one model instance: where the GPU waits for the host.

    With ``KATZ_TRACE_DIR=<folder>`` (and ``KATZ_TRACE_AT=3,5``: which calls, counted from 1 per
    instance; default 3, past a warm-up request) in the server's environment, each traced call writes
    ``<folder>/<model>.<pid>.call<n>.json.gz`` (Chrome trace: Perfetto, chrome://tracing) and
    ``....gaps.txt``: the GPU's idle gaps of at least ``min_gap_us`` during the call, each with the
    host ops that ran across it (:func:`gpu_gaps`). A traced call is slower (the profiler's own
    cost) and ends with a device synchronisation, so a benchmark traces a request it does not time.
    """

    def __init__(self, folder: Path, model_name: str, at: set[int], min_gap_us: float = 100.0):
        self.folder, self.model_name, self.at, self.min_gap_us = Path(folder), model_name, set(at), min_gap_us
        self.folder.mkdir(parents=True, exist_ok=True)
        self.calls = 0

    @classmethod
    def from_env(cls, model_name: str) -> "ExecuteTrace | None":
        folder = os.environ.get(TRACE_ENV)
        if not folder:
            return None
        at = {int(n) for n in os.environ.get(TRACE_AT_ENV, "3").split(",") if n.strip()}
        return cls(Path(folder), model_name, at)

    def run(self, fn, *args):
        self.calls += 1
        if self.calls not in self.at:
            return fn(*args)
        import torch
        from torch.profiler import ProfilerActivity, profile

        cuda = torch.cuda.is_initialized()  # a host-only model gets no CUDA context from being traced
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, with_stack=True) as prof:
            out = fn(*args)
            if cuda:
                torch.cuda.synchronize()
        try:
            self.save(prof, self.calls)
        except Exception as exc:  # a diagnostic never fails the request (torch's profiler can fail to read its events)
            stem = self.folder / f"{self.model_name}.{os.getpid()}.call{self.calls}"
            Path(f"{stem}.gaps.txt").write_text(f"no trace: the profiler failed ({type(exc).__name__}: {exc})\n")
            print(f"katz: trace of {self.model_name} call {self.calls} failed: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
        return out

    def save(self, prof, call: int) -> Path:
        stem = self.folder / f"{self.model_name}.{os.getpid()}.call{call}"
        prof.export_chrome_trace(f"{stem}.json.gz")  # torch gzips a .gz path itself
        kernels, names, host = [], [], []
        for evt in prof.events():
            span = (evt.time_range.start, evt.time_range.end)
            if str(evt.device_type).endswith("CUDA"):
                kernels.append(span)
                names.append(evt.name)
            else:
                host.append((*span, evt.name, katz_frames(getattr(evt, "stack", None) or [])))
        gaps = gpu_gaps(kernels, host, self.min_gap_us)
        path = Path(f"{stem}.gaps.txt")
        with gzip.open(f"{stem}.json.gz", "rt") as f:
            launches = launch_summary(json.load(f))
        path.write_text(format_gaps(gaps, kernels) + format_kernels(kernels, names) + launches)
        return path


def katz_frames(stack: list[str], limit: int = 3) -> str:
    """The first ``limit`` frames of ``stack`` (``"/path/file.py(line): function"``, innermost first,
    as torch.profiler lists them) in katz or diffusers, as ``file.py(line): function <- ...``."""
    frames = [Path(f).name for f in stack if "/katz/" in f or "/diffusers/" in f]
    return " <- ".join(frames[:limit])


def gpu_gaps(kernels, host, min_us: float = 100.0) -> list[dict]:
    """The GPU's idle gaps between ``kernels`` (``(start_us, end_us)`` in any order) of at least
    ``min_us``, each as ``{"start_us", "us", "host"}``: the ``host`` ops (``(start_us, end_us, name,
    where)``) that overlap the gap, longest overlap first (``[(name, where, overlap_us), ...]``)."""
    if not kernels:
        return []
    spans = sorted(kernels)
    gaps, busy_until = [], spans[0][1]
    for start, end in spans[1:]:
        if start - busy_until >= min_us:
            gaps.append((busy_until, start))
        busy_until = max(busy_until, end)
    out = []
    for g0, g1 in gaps:
        ops = [(name, where, min(e, g1) - max(s, g0)) for s, e, name, where in host if s < g1 and e > g0]
        ops.sort(key=lambda o: -o[2])
        out.append({"start_us": g0 - spans[0][0], "us": g1 - g0, "host": ops})
    return out


def format_gaps(gaps: list[dict], kernels, limit: int = 40) -> str:
    """:func:`gpu_gaps` as text: totals, then the ``limit`` longest gaps with their host ops."""
    if not kernels:
        return "no GPU kernels in this call\n"
    span = max(e for _, e in kernels) - min(s for s, _ in kernels)
    idle = sum(g["us"] for g in gaps)
    lines = [f"GPU span {span / 1e3:.1f} ms, {len(gaps)} idle gaps, {idle / 1e3:.1f} ms idle in all"]
    for g in sorted(gaps, key=lambda g: -g["us"])[:limit]:
        lines.append(f"{g['us'] / 1e3:8.3f} ms idle at +{g['start_us'] / 1e3:.1f} ms:")
        for name, where, us in g["host"][:6]:
            lines.append(f"      {us / 1e3:8.3f} ms  {name}  {where}")
    return "\n".join(lines) + "\n"


def format_kernels(kernels, names, limit: int = 25) -> str:
    """The GPU's busy time by kernel name (``kernels``: ``(start_us, end_us)``, ``names`` alike), as
    text: where the GPU time of a call goes, graph-replayed kernels included."""
    if not kernels:
        return ""
    totals: dict[str, list[float]] = {}
    for (start, end), name in zip(kernels, names):
        row = totals.setdefault(name, [0.0, 0])
        row[0] += end - start
        row[1] += 1
    busy = sum(t for t, _ in totals.values())
    lines = [f"GPU busy {busy / 1e3:.1f} ms in {len(kernels)} kernels; by kernel (ms, count):"]
    for name, (us, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:limit]:
        lines.append(f"  {us / 1e3:9.2f} {n:6d}  {name[:110]}")
    return "\n".join(lines) + "\n"


GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def _enclosing(spans: list[tuple[float, float, str]], points: list[float]) -> list[str | None]:
    """For each time in ``points`` (sorted), the innermost of ``spans`` (``(start, end, name)``, one
    thread's nested ranges) that contains it, or None."""
    spans = sorted(spans, key=lambda s: (s[0], -s[1]))
    out, stack, i = [], [], 0
    for t in points:
        while i < len(spans) and spans[i][0] <= t:
            stack.append(spans[i])
            i += 1
        while stack and stack[-1][1] < t:
            stack.pop()
        inner = [s for s in stack if s[0] <= t <= s[1]]
        out.append(inner[-1][2] if inner else None)
    return out


def launch_summary(trace: dict, limit: int = 20) -> str:
    """Where a Chrome trace's GPU time was launched from, as text: the GPU time of work replayed
    from CUDA graphs (``cudaGraphLaunch``) against work launched one by one, and for the latter the
    ``limit`` biggest sources by (innermost Katz / diffusers frame, innermost op). ``trace``: a
    :mod:`torch.profiler` Chrome trace (``{"traceEvents": [...]}``) with CUDA activity."""
    events = trace.get("traceEvents", [])
    runtime = {e["args"]["correlation"]: e for e in events
               if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    gpu = [e for e in events if e.get("cat") in GPU_CATS and "dur" in e]
    if not gpu:
        return ""
    by_thread: dict = {}
    for e in events:
        if e.get("cat") in ("cpu_op", "python_function") and "dur" in e:
            name = e["name"] if e["cat"] == "cpu_op" else katz_frames([e["name"]], limit=1)
            if name:
                by_thread.setdefault((e["pid"], e["tid"], e["cat"]), []).append((e["ts"], e["ts"] + e["dur"], name))
    graph_us, direct = 0.0, {}
    launches: dict = {}  # (pid, tid) -> [(ts, gpu_us)]
    for e in gpu:
        launch = runtime.get(e.get("args", {}).get("correlation"))
        if launch is not None and "GraphLaunch" in launch["name"]:
            graph_us += e["dur"]
            continue
        key = (launch["pid"], launch["tid"]) if launch is not None else None
        launches.setdefault(key, []).append((launch["ts"] if launch is not None else 0.0, e["dur"]))
    for key, items in launches.items():
        items.sort()
        points = [t for t, _ in items]
        ops = _enclosing(by_thread.get((*key, "cpu_op"), []), points) if key else [None] * len(items)
        frames = _enclosing(by_thread.get((*key, "python_function"), []), points) if key else [None] * len(items)
        for (_, us), op, frame in zip(items, ops, frames):
            row = direct.setdefault((frame or "-", op or "-"), [0.0, 0])
            row[0] += us
            row[1] += 1
    direct_us = sum(v[0] for v in direct.values())
    lines = [f"GPU time replayed from CUDA graphs {graph_us / 1e3:.1f} ms; launched one by one "
             f"{direct_us / 1e3:.1f} ms, by source (ms, count, frame, op):"]
    for (frame, op), (us, n) in sorted(direct.items(), key=lambda kv: -kv[1][0])[:limit]:
        lines.append(f"  {us / 1e3:9.2f} {n:6d}  {frame}  {op}")
    return "\n".join(lines) + "\n"


def top(paths, limit: int = 20, sort: str = "tottime") -> str:
    """The ``limit`` functions with the most ``sort`` time in the profiles at ``paths``, as text."""
    import io

    out = io.StringIO()
    stats = pstats.Stats(*[str(p) for p in paths], stream=out)
    stats.strip_dirs().sort_stats(sort).print_stats(limit)
    return out.getvalue()


if __name__ == "__main__":
    print(top(sys.argv[1:]))

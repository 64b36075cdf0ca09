"""Where a model process's GPU memory goes after load, on a GPU host.

Builds one model (``--model``: ``unet``, ``vae_decoder``, ``text_encoder``) as ``katz serve`` does
(:func:`katz.serving.factory.create_model`: weights, the ControlNets of local mode, CUDA graphs
captured at load), in this process, with torch's memory history on, and prints:

* per graph capture (:meth:`katz.engines.torch.cuda_graphs.CudaGraphs.capture`): the bytes it added to
  the reserved and the allocated memory, and its peak above the allocated bytes before it;
* per memory pool after load (torch's default pool and each CUDA-graph pool): reserved bytes, the
  bytes held by live tensors (active) and the free blocks the pool keeps (a graph pool's free blocks
  are its replays' scratch);
* the largest allocations made inside graph pools, with the Katz / diffusers frames that made them.

    python bench/model_memory.py [--model unet] [--controlnet-mode local] [--compile] [--out memory.json]

``--pool-per-engine`` gives each engine a graph pool of its own, as Katz did before
:func:`katz.engines.torch.cuda_graphs.process_pool` (the comparison for the ControlNets of local mode).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GB = 1e9


def pools(snapshot: dict) -> dict[str, dict[str, float]]:
    """Reserved / active / free bytes per memory pool of a ``torch.cuda.memory._snapshot()``."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"reserved": 0.0, "active": 0.0, "free": 0.0})
    for seg in snapshot["segments"]:
        pool_id = tuple(seg.get("segment_pool_id", (0, 0)))
        name = "default" if pool_id == (0, 0) else f"graph pool {pool_id[0]}.{pool_id[1]}"
        row = out[name]
        row["reserved"] += seg["total_size"]
        row["active"] += seg["active_size"]
        row["free"] += seg["total_size"] - seg["active_size"]
    return dict(out)


def largest_graph_allocations(snapshot: dict, top: int) -> list[dict]:
    """The ``top`` largest allocations in segments of graph pools, with their frames."""
    from katz.serving.profiling import katz_frames

    private = set()
    for seg in snapshot["segments"]:
        if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0):
            private.add((seg["address"], seg["address"] + seg["total_size"]))
    events = []
    for trace in snapshot.get("device_traces", []):
        for ev in trace:
            if ev["action"] != "alloc" or not any(a <= ev["addr"] < b for a, b in private):
                continue
            stack = [f"{f['filename']}({f['line']}): {f['name']}" for f in ev.get("frames", [])]
            events.append({"mb": ev["size"] / 1e6, "where": katz_frames(stack, limit=4) or "(no Python frame)"})
    events.sort(key=lambda e: -e["mb"])
    return events[:top]


def modules(obj, depth: int = 6, seen: set | None = None) -> list[torch.nn.Module]:
    """The distinct torch modules a Katz model holds through its engines (the UNet, ControlNets,
    VAE, text encoders), found through attributes and dicts up to ``depth`` objects deep."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth < 0:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else vars(obj).values() if hasattr(obj, "__dict__") else ()
    return [m for v in values if not isinstance(v, (torch.Tensor, str, bytes, int, float))
            for m in modules(v, depth - 1, seen)]


def weight_bytes(model) -> int:
    """Bytes of the distinct parameters of the modules :func:`modules` finds."""
    params = {id(p): p for m in modules(model) for p in m.parameters()}
    return sum(p.numel() * p.element_size() for p in params.values())


def pinned_free(snapshot: dict, top: int) -> list[dict]:
    """Segments of the default pool with the most free bytes: torch's ``empty_cache`` returns only
    whole free segments, so the live blocks in each (their frames) keep the free rest reserved."""
    from katz.serving.profiling import katz_frames

    out = []
    for seg in snapshot["segments"]:
        if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0):
            continue
        live = [b for b in seg["blocks"] if b["state"] == "active_allocated"]
        where = sorted({katz_frames([f"{f['filename']}({f['line']}): {f['name']}" for f in b.get("frames", [])],
                                    limit=3) or "(no Python frame)" for b in live})
        out.append({"segment_mb": seg["total_size"] / 1e6, "free_mb": (seg["total_size"] - seg["active_size"]) / 1e6,
                    "live_blocks": len(live), "live_mb": seg["active_size"] / 1e6, "where": where[:3]})
    out.sort(key=lambda r: -r["free_mb"])
    return out[:top]


def free_states(snapshot: dict) -> dict[str, float]:
    """GB of the default pool's blocks that hold no live tensor, by allocator state (``inactive``:
    free; ``active_pending_free``: freed, waiting for a stream event before it can be reused)."""
    out: dict[str, float] = defaultdict(float)
    for seg in snapshot["segments"]:
        if tuple(seg.get("segment_pool_id", (0, 0))) == (0, 0):
            for b in seg["blocks"]:
                if b["state"] != "active_allocated":
                    out[b["state"]] += b["size"] / GB
    return dict(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/sdxl-random"))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--controlnet-mode", default="local", choices=("inline", "local", "service"))
    p.add_argument("--compile", action="store_true", help="torch.compile before capture, as katz serve --compile")
    p.add_argument("--model", default="unet", choices=("unet", "vae_decoder", "text_encoder"))
    p.add_argument("--pool-per-engine", action="store_true", help="one graph pool per engine (the old layout)")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("model_memory.py needs a CUDA device")

    from bench.sdxl_random import build
    from katz.engines.torch import cuda_graphs
    from katz.models.folder import ModelFolder, discover_controlnets
    from katz.request import Limits
    from katz.serving.factory import create_model
    from katz.deployment import Deployment

    path = build(args.model_dir)
    folder = ModelFolder(path, discover_controlnets(path / "controlnets"))
    dep = Deployment(folder.path, folder.controlnets, None, Limits(default_width=args.size, default_height=args.size),
                     device="cuda", dtype="float16", controlnet_mode=args.controlnet_mode, compile=args.compile,
                     compile_cache=Path("/tmp/katz-inductor"), graph_sizes=[(args.size, args.size)])

    captures = []
    capture = cuda_graphs.CudaGraphs.capture

    def measured_capture(self, *a, **kw):
        torch.cuda.synchronize()
        reserved, allocated = torch.cuda.memory_reserved(), torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        seconds = capture(self, *a, **kw)
        batch = next(x.shape[0] for x in a if isinstance(x, torch.Tensor))
        captures.append({"graph": self.name, "batch": batch, "s": round(seconds, 1),
                         "reserved_gb": (torch.cuda.memory_reserved() - reserved) / GB,
                         "allocated_gb": (torch.cuda.memory_allocated() - allocated) / GB,
                         "peak_gb": (torch.cuda.max_memory_allocated() - allocated) / GB})
        return seconds

    cuda_graphs.CudaGraphs.capture = measured_capture
    if args.pool_per_engine:
        import threading

        from katz.engines.torch import controlnet, unet, vae

        for engines in (unet, controlnet, vae):  # each engine module took the name at import
            engines.process_pool = lambda device: (torch.cuda.graph_pool_handle(), threading.Lock())
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    t0 = time.perf_counter()
    model = create_model(args.model, dep.to_parameters(), "cuda")
    load_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)

    res = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
        "controlnet_mode": args.controlnet_mode, "compile": args.compile, "pool_per_engine": args.pool_per_engine,
        "load_s": load_s, "weights_gb": weight_bytes(model) / GB,
        "allocated_gb": torch.cuda.memory_allocated() / GB, "reserved_gb": torch.cuda.memory_reserved() / GB,
        "captures": captures, "pools_gb": {k: {m: v / GB for m, v in row.items()} for k, row in pools(snapshot).items()},
        "largest_graph_allocations": largest_graph_allocations(snapshot, args.top),
        "pinned_free": pinned_free(snapshot, args.top),
        "free_blocks_by_state_gb": free_states(snapshot),
    }
    torch.cuda.empty_cache()
    res["reserved_after_empty_cache_gb"] = torch.cuda.memory_reserved() / GB
    print(f"{res['device']}: {args.model} ({args.controlnet_mode}, compile={args.compile}, pool per engine="
          f"{args.pool_per_engine}) loaded in {load_s:.0f} s; allocated {res['allocated_gb']:.2f} GB, reserved "
          f"{res['reserved_gb']:.2f} GB, weights {res['weights_gb']:.2f} GB")
    print(f"{'capture':<22}{'batch':>6}{'s':>7}{'+reserved':>11}{'+allocated':>12}{'peak':>8}  (GB)")
    for c in captures:
        print(f"{c['graph']:<22}{c['batch']:>6}{c['s']:>7}{c['reserved_gb']:>11.2f}{c['allocated_gb']:>12.2f}"
              f"{c['peak_gb']:>8.2f}")
    print(f"{'pool':<22}{'reserved':>10}{'active':>10}{'free':>10}  (GB)")
    for name, row in res["pools_gb"].items():
        print(f"{name:<22}{row['reserved']:>10.2f}{row['active']:>10.2f}{row['free']:>10.2f}")
    print("largest allocations in graph pools:")
    for a in res["largest_graph_allocations"]:
        print(f"  {a['mb']:>8.1f} MB  {a['where']}")
    print(f"default pool's non-live blocks by state (GB): {res['free_blocks_by_state_gb']}; reserved after one more "
          f"empty_cache: {res['reserved_after_empty_cache_gb']:.2f} GB")
    print("default-pool segments with the most free bytes (kept by their live blocks):")
    for r in res["pinned_free"]:
        print(f"  {r['segment_mb']:>8.1f} MB segment, {r['free_mb']:>8.1f} MB free, {r['live_blocks']} live blocks "
              f"({r['live_mb']:.1f} MB): {'; '.join(r['where'])}")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

"""What switching LoRA sets costs in the UNet process: merge, switch, restore, in-process.

    python bench/lora_switch.py                   # GPU host: full-size SDXL UNet, fp16, rank-64 LoRAs
    python bench/lora_switch.py --preset tiny-sdxl --repeats 2   # CPU smoke run (no figures)

Two LoRAs of :func:`bench.sdxl_random.write_lora`'s kind (every attention projection) are loaded
through :class:`katz.lora.manager.LoraManager` as the server loads them, then
:class:`katz.lora.patch.LoraPatcher` switches base -> A, A -> B, B -> base ``--repeats`` times. For each
switch: the host time until ``apply`` returns (what the denoising loop waits for) and until the GPU
has finished it, and one switch under the torch profiler (CUDA kernels launched, the top host ops).

Then the switch as the server meets it (``server_like``, A -> B each): the GPU still busy with
``--queued-ms`` of work the loop queued ahead (the merge's finiteness read at once, as before, or
deferred, as the server's switch does now); the first merge of a patcher, copying the pristine
weights inside the switch or after the loader made them (``LoraPatcher.prepare``); the switch
while the loader thread loads a third LoRA from a cold file (the two threads share the GIL); and a
request at k = 0 with a LoRA never seen: from asking for it until its merge is done, cold or from the
page cache, streamed or load-then-merge.
Prints a table and writes ``--out`` JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_bench import bench_device, sync  # noqa: E402
from bench.sdxl_random import lora_copy  # noqa: E402
from katz.lora.patch import LoraPatcher  # noqa: E402
from katz.lora.random import make_random_lora  # noqa: E402
from katz.lora.readahead import evict  # noqa: E402
from katz.lora.manager import LoraManager  # noqa: E402
from katz.lora.store import LoraStore  # noqa: E402


def build_unet(preset: str | None, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    if preset:
        from katz.models.folder import ModelFolder
        from katz.models.presets import ensure_preset

        return ModelFolder(ensure_preset(preset)).load_unet(device, dtype)
    from bench.sdxl_random import UNET

    with torch.device(device):
        return UNet2DConditionModel(**UNET).to(dtype)  # random init: values do not matter here


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", help="a tiny preset instead of the full-size SDXL UNet (CPU smoke run)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--queued-ms", type=float, default=33.0,
                   help="GPU work queued before each server-like switch (a step the loop launched ahead)")
    p.add_argument("--out", type=Path)
    p.add_argument("--trace", type=Path, help="Chrome trace of one streamed page-cache load + merge (torch profiler)")
    args = p.parse_args()
    kind, dtype = bench_device()
    device, cuda = torch.device(kind), kind == "cuda"
    unet = build_unet(args.preset, str(device), dtype)
    patcher = LoraPatcher(unet, "unet")
    lora_dir = Path(tempfile.mkdtemp(prefix="katz-lora-switch-"))
    for seed, name in ((1, "a"), (2, "b"), (3, "c")):
        make_random_lora(lora_dir / f"{name}.safetensors", unet, {}, rank=args.rank, seed=seed, fmt="peft",
                         dtype=dtype)
    manager = LoraManager(LoraStore(lora_dir, "sdxl"), [patcher], device, device_budget_bytes=4 << 30)
    a, b = manager.get(["a"]), manager.get(["b"])
    layers = len(a[0].layers["unet"])
    res: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                 "layers": layers, "rank": args.rank, "dtype": str(dtype)}
    steps = {"base_to_a": a, "a_to_b": b, "b_to_base": []}
    times: dict[str, dict[str, list[float]]] = {k: {"returned_ms": [], "done_ms": []} for k in steps}
    patcher.apply([])
    for _ in range(args.repeats + 1):  # the first round warms caches up (plans, views, pristine copies)
        for key, loras in steps.items():
            sync()
            t0 = time.perf_counter()
            patcher.apply([(w, 1.0) for w in loras])
            t1 = time.perf_counter()
            sync()
            t2 = time.perf_counter()
            times[key]["returned_ms"].append((t1 - t0) * 1e3)
            times[key]["done_ms"].append((t2 - t0) * 1e3)
    for key, t in times.items():
        res[key] = {k: statistics.median(v[1:]) for k, v in t.items()}

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    patcher.apply([(w, 1.0) for w in a])
    sync()
    with profile(activities=activities) as prof:
        patcher.apply([(w, 1.0) for w in b])
        sync()
    events = prof.key_averages()
    res["a_to_b_cuda_kernels"] = sum(e.count for e in events if getattr(e, "device_type", None) is not None
                                     and str(e.device_type).endswith("CUDA"))
    res["a_to_b_top_host_ops"] = [
        (e.key, e.count, round(e.self_cpu_time_total / 1e3, 2))
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
    ]
    patcher.apply([])
    res["server_like"] = server_like(args, unet, patcher, manager, a, b, lora_dir, device, cuda)
    manager.close()

    print(f"{res['device']}, UNet {'preset ' + args.preset if args.preset else 'SDXL (full size)'}, {dtype}, "
          f"{layers} LoRA layers of rank {args.rank}; medians of {args.repeats}")
    print(f"{'switch':12} {'apply returned ms':>18} {'GPU done ms':>12}")
    for key in steps:
        print(f"{key:12} {res[key]['returned_ms']:18.2f} {res[key]['done_ms']:12.2f}")
    print(f"A -> B under the profiler: {res['a_to_b_cuda_kernels']} CUDA kernels; top host ops (name, calls, "
          f"self ms): {res['a_to_b_top_host_ops']}")
    for key, value in res["server_like"].items():
        print(f"server-like {key:34} {value:8.2f} ms")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))


def server_like(args, unet, patcher, manager, a, b, lora_dir, device, cuda) -> dict:
    """Median host ms of A -> B switches in the conditions the UNet process meets (module docstring)."""
    x = torch.randn(4096, 4096, device=device, dtype=torch.float16) if cuda else None

    def queue_work() -> None:
        """About ``--queued-ms`` of GPU work, not waited for (none on the CPU: it has no queue)."""
        if x is None:
            return
        t0 = time.perf_counter()
        y = x @ x
        sync()
        per = max(time.perf_counter() - t0, 1e-4)
        for _ in range(max(1, int(args.queued_ms / 1e3 / per))):
            y = x @ x
        del y

    def switch(apply, before=lambda: None) -> list[float]:
        times = []
        for _ in range(args.repeats):
            patcher.apply([(w, 1.0) for w in a])
            sync()
            before()
            t0 = time.perf_counter()
            apply()
            times.append((time.perf_counter() - t0) * 1e3)
            patcher.settle()
            sync()
        return times

    out = {
        "a_to_b_gpu_queued_check_now": switch(lambda: patcher.apply([(w, 1.0) for w in b]), queue_work),
        "a_to_b_gpu_queued_check_deferred": switch(lambda: patcher.apply([(w, 1.0) for w in b], defer_check=True),
                                                   queue_work),
    }

    def during_load() -> None:  # a third LoRA, cold, loading on the loader thread meanwhile
        manager.clear_caches()
        evict(lora_dir / "c.safetensors")
        manager.prefetch(["c"])
        time.sleep(0.02)  # the loader is into the file (reading, parsing) when the switch starts

    out["a_to_b_while_loading_check_deferred"] = switch(
        lambda: patcher.apply([(w, 1.0) for w in b], defer_check=True), during_load)
    manager.wait_idle()
    patcher.apply([])
    sync()
    first, prepared = [], []
    for _ in range(max(1, min(args.repeats, 3))):  # a new patcher: no pristine copies yet
        for times, prepare in ((first, False), (prepared, True)):
            fresh = LoraPatcher(unet, "unet")
            if prepare:
                fresh.prepare(b[0])
                sync()
            t0 = time.perf_counter()
            fresh.apply([(w, 1.0) for w in b])
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
            fresh.restore()
            sync()
            del fresh
    out["first_merge_copying_pristine"] = first
    out["first_merge_after_prepare"] = prepared
    out.update(load_then_merge(args, patcher, manager, lora_dir, cuda))
    return {k: statistics.median(v) for k, v in out.items()}


def load_then_merge(args, patcher, manager, lora_dir, cuda) -> dict[str, list[float]]:
    """A request at the bound k = 0 with a LoRA the server has not seen: from asking for it until its
    merge has run on the GPU (the request's critical path before its first step), its file cold or in
    the page cache; streamed (the merge follows the bytes, as the server's switch does) and in two
    parts (the whole load, then the merge), and the load alone. Each case a fresh copy of ``a``."""
    out: dict[str, list[float]] = {}
    n = 0

    def fresh(where: str) -> str:
        nonlocal n
        n += 1
        name = f"{where}{n}"
        lora_copy(lora_dir / "a.safetensors", lora_dir / f"{name}.safetensors", where)
        return name

    for where in ("page_cache", "cold"):
        for how in ("streamed", "load_then_merge", "load_only"):
            times = out.setdefault(f"k0_{where}_{how}", [])
            for _ in range(args.repeats):
                patcher.apply([])
                sync()
                name = fresh(where)
                parsed = manager.stats.parse_seconds
                t0 = time.perf_counter()
                if how == "streamed":
                    loaded, arrival = manager.stream([name])
                    patcher.apply([(w, 1.0) for w in loaded], arrival=arrival, defer_check=True)
                else:
                    loaded = manager.get([name])
                    if how == "load_then_merge":
                        patcher.apply([(w, 1.0) for w in loaded], defer_check=True)
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
                patcher.settle()
                manager.wait_idle()
                # parsing and validating the header's tensors: on the critical path, before any merge
                out.setdefault(f"k0_{where}_parse", []).append((manager.stats.parse_seconds - parsed) * 1e3)
                manager.clear_caches()
                (lora_dir / f"{name}.safetensors").unlink()
    if args.trace:  # one streamed page-cache case under the torch profiler: both threads, the GPU
        from torch.profiler import ProfilerActivity, profile

        patcher.apply([])
        sync()
        name = fresh("page_cache")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, with_stack=False) as prof:
            loaded, arrival = manager.stream([name])
            patcher.apply([(w, 1.0) for w in loaded], arrival=arrival, defer_check=True)
            sync()
            manager.wait_idle()
        prof.export_chrome_trace(str(args.trace))
        patcher.settle()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return out


if __name__ == "__main__":
    main()

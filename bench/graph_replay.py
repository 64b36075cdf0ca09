"""Does replaying one CUDA graph step after step leave the GPU idle between the replays?

The denoising loop replays the UNet step's graph once per step with a few small kernels (CFG,
scheduler) between replays. This measures, on a stand-in step of ``--kernels`` kernels
(matmuls of side ``--width`` and GELUs), over ``--steps`` steps:

* ``one``: the same graph replayed every step (as the engine does);
* ``two``: two graphs of the same step, captured into one memory pool, replayed in turn.

For each: the host time of a ``replay()`` call (median, max), the loop's wall time against the
steps' GPU time (``idle``: what the GPU waited for the host), on the GPU host only.

    python bench/graph_replay.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def stand_in_step(width: int, kernels: int):
    weight = torch.randn(width, width, device="cuda", dtype=torch.float16) / width**0.5

    def step(x: torch.Tensor) -> torch.Tensor:
        for _ in range(kernels // 2):
            x = torch.nn.functional.gelu(x @ weight)  # two kernels
        return x

    return step


def capture(step, x, pool=None):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step(x)
    return graph, out


def loop(graphs, x, steps: int) -> dict:
    torch.cuda.synchronize()
    launch = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for i in range(steps):
        graph, out = graphs[i % len(graphs)]
        t = time.perf_counter()
        graph.replay()
        launch.append(time.perf_counter() - t)
        x.copy_(out * 0.5 + x * 0.5)  # the scheduler's small kernels between steps
    host = time.perf_counter() - t0
    end.record()
    torch.cuda.synchronize()
    return {"host_s": host, "wall_s": time.perf_counter() - t0, "gpu_s": start.elapsed_time(end) / 1e3,
            "replay_median_ms": statistics.median(launch) * 1e3, "replay_max_ms": max(launch) * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--kernels", type=int, default=2000, help="kernels in the stand-in step")
    p.add_argument("--width", type=int, default=1536, help="matrix side of the stand-in step's matmuls")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("graph_replay.py needs a CUDA device")
    step = stand_in_step(args.width, args.kernels)
    x = torch.randn(args.width, args.width, device="cuda", dtype=torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(x)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    first = capture(step, x)
    second = capture(step, x, pool=first[0].pool())
    loop([first, second], x, 3)  # the first replays of a graph upload it
    single = statistics.median(loop([first], x, 1)["gpu_s"] for _ in range(5))
    print(f"stand-in step: {args.kernels} kernels, {single * 1e3:.1f} ms on the GPU", flush=True)
    for name, graphs in (("one", [first]), ("two", [first, second]), ("one", [first]), ("two", [first, second])):
        r = loop(graphs, x, args.steps)
        idle = r["gpu_s"] - args.steps * single
        print(f"{name} graph(s): loop {r['wall_s'] * 1e3:.1f} ms for {args.steps} steps, host done after "
              f"{r['host_s'] * 1e3:.1f} ms; replay() median {r['replay_median_ms']:.2f} ms, max "
              f"{r['replay_max_ms']:.2f} ms; GPU span over the steps' time {idle * 1e3:+.1f} ms "
              f"({idle / args.steps * 1e3:+.2f} ms/step)", flush=True)


if __name__ == "__main__":
    main()

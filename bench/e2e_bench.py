"""Katz end to end through a live Triton server vs stock diffusers, on one GPU, in one run.

    python bench/e2e_bench.py --out /tmp/e2e.json        # on the GPU host; bench/README.md says what to carry
    python bench/e2e_bench.py --preset tiny-sdxl --steps 2 --repeats 1   # CPU smoke run (no figures)

1. Stock diffusers in this process (:func:`bench.gpu_bench.diffusers_baseline`): plain request,
   with the ControlNet, with a cold LoRA loaded and fused per request, with both; GPU memory freed after.
2. ``katz serve --model-dir ...`` in a subprocess: tritonserver with the Katz models on GPU 0.
3. A gRPC client (:mod:`katz.client`, as a user would) sends requests one at a time: plain, then
   ``--cases``: with the ControlNet, with a cold LoRA (a fresh file name per request, evicted from
   the page cache) at the server's default bound k and at k = 0, with a page-cache LoRA (a fresh
   file name per request, its pages in the OS page cache) at the default bound and at k = 0, and
   with both the ControlNet and a cold LoRA. Latency p50/p90 per case, ratios to diffusers. The
   client asks for the pixels only, as diffusers returns them (``--png``: the PNG too).
   Per LoRA request: the step its LoRAs went in at (the response's ``lora_applied_step``), the
   step the server predicted at its first step, the tier its LoRA loaded from, the load, the wait
   and the weight switches; over the run: every switch's time (the merge in, the restore in the
   plain request after it), the longest, and how many took over 100 ms.
4. ``--resume``: a run cut off (the JSON is rewritten after every request) goes on from where
   its ``--out`` stops: finished cases are kept, a case cut off gets its missing requests.
5. Orchestration overhead per step from the server's counters: the denoising loop's execute time
   (Triton's ``katz_pipeline`` compute time) minus the ``unet`` model's device time
   (``katz_unet_run_seconds_total``, CUDA events), per step, against the UNet step itself, and that
   step's wall time split into the loop's own work, the BLS transport and the ``unet`` model's
   Triton phases (:func:`loop_overhead`).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_bench import bench_device, diffusers_baseline, prepare  # noqa: E402
from bench.sdxl_random import lora_copy  # noqa: E402
from katz.deploy.repository import QUEUED_MODELS  # noqa: E402


def metrics(port: int) -> dict[tuple[str, str], float]:
    """Triton's Prometheus metrics: ``(name[other label values], model label) -> value``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r'^(\w+)(\{[^}]*\})?\s+([-+0-9.eE]+|nan|NaN)$', line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        model = labels.pop("model", "")
        labels.pop("version", None)  # Triton's own metrics: one model version here
        # the other labels' values, e.g. katz_lora_load_phase_seconds_total[read], katz_lora_cache_bytes[host,used]
        key = (m.group(1) + (f"[{','.join(labels.values())}]" if labels else ""), model)
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def gpu_memory_used_gb() -> float:
    """GPU 0's memory in use now, all processes (CUDA contexts included), from nvidia-smi."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[0]) * 1024**2 / 1e9


def memory_by_model(apps_csv: str, cmdlines: dict[int, str]) -> dict[str, float]:
    """GB of GPU memory per Katz model from ``nvidia-smi --query-compute-apps=pid,used_memory
    --format=csv,noheader,nounits`` output and the processes' command lines (``pid -> cmdline``):
    a Python backend stub names its model's folder (``.../<model>/1/model.py``); this benchmark's own
    process (diffusers, the client) counts as ``bench``, other processes as ``other:<executable>``."""
    out: dict[str, float] = {}
    for line in apps_csv.strip().splitlines():
        pid_s, mib = (x.strip() for x in line.split(",")[:2])
        cmd = cmdlines.get(int(pid_s), "")
        m = re.search(r"([^/\s]+)/\d+/model\.py", cmd)
        name = m.group(1) if m else "other:" + (Path(cmd.split()[0]).name if cmd else pid_s)
        name = "bench" if int(pid_s) == os.getpid() else name
        out[name] = out.get(name, 0.0) + float(mib) * 1024**2 / 1e9
    return out


def gpu_memory_by_model() -> dict[str, float]:
    """:func:`memory_by_model` for GPU 0's processes now (empty without nvidia-smi)."""
    try:
        csv = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits",
                              "-i", "0"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    cmdlines = {}
    for line in csv.strip().splitlines():
        pid = int(line.split(",")[0])
        try:
            cmdlines[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
    return memory_by_model(csv, cmdlines)


def torch_memory(counters: dict) -> dict[str, dict[str, float]]:
    """GB per model from the server's memory gauges: torch's ``allocated`` / ``reserved`` per model
    process (``katz_gpu_memory_bytes``) and the UNet's parts (``katz_unet_memory_bytes``)."""
    out: dict[str, dict[str, float]] = {}
    for (name, model), value in counters.items():
        for prefix in ("katz_gpu_memory_bytes[", "katz_unet_memory_bytes["):
            if name.startswith(prefix):
                out.setdefault(model, {})[name[len(prefix):-1]] = value / 1e9
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


CASES = ["controlnet", "cold_lora_bal", "cold_lora_k0", "controlnet_cold_lora"]
# the cases with a LoRA: a cold file (evicted from the page cache) or one in the page cache; ``bal``
# at the bound --bal-k (denoising starts while the LoRA loads), ``k0`` at k = 0 (loaded before the
# first step, the server's default bound), ``controlnet_cold_lora`` at the server's default
BAL = "bal"
LORA_CASES = {"cold_lora_bal": ("cold", BAL), "cold_lora_k0": ("cold", 0), "controlnet_cold_lora": ("cold", None),
              "page_cache_lora_bal": ("page_cache", BAL), "page_cache_lora_k0": ("page_cache", 0)}
ALL_CASES = ["controlnet", *LORA_CASES]


def lora_metrics(counters: dict) -> dict[str, float]:
    """The ``katz_lora_*`` counters of a :func:`metrics` snapshot, by name."""
    return {k[0]: v for k, v in counters.items() if k[0].startswith("katz_lora")}


# counters summed over each measured request of a case (paired plain requests excluded)
CASE_COUNTERS = {
    "loop_ms": ("nv_inference_compute_infer_duration_us", "katz_pipeline", 1e-3),
    "unet_device_ms": ("katz_unet_run_seconds_total", "unet", 1e3),
    "unet_runs": ("katz_unet_runs_total", "unet", 1.0),
    "lora_wait_ms": ("katz_lora_wait_seconds_total", "unet", 1e3),
    "lora_switch_ms": ("katz_lora_switch_seconds_total", "unet", 1e3),
    "lora_switches": ("katz_lora_switch_count_total", "unet", 1.0),
    "lora_slow_switches": ("katz_lora_slow_switches_total", "unet", 1.0),
    "lora_switch_wait_ms": ("katz_lora_switch_wait_seconds_total", "unet", 1e3),
    "lora_load_ms": ("katz_lora_load_seconds_total", "unet", 1e3),
    "lora_predicted_step": ("katz_lora_predicted_step_total", "unet", 1.0),
    "lora_predicted_ready_ms": ("katz_lora_predicted_ready_seconds_total", "unet", 1e3),
    "lora_ready_ms": ("katz_lora_ready_seconds_total", "unet", 1e3),
    "lora_hot": ("katz_lora_bal_requests_total[hot]", "unet", 1.0),
    "lora_loads_disk": ("katz_lora_tier_loads_total[disk]", "unet", 1.0),
    "lora_loads_page_cache": ("katz_lora_tier_loads_total[page_cache]", "unet", 1.0),
    "lora_loads_host": ("katz_lora_tier_loads_total[host]", "unet", 1.0),
    "gc_ms": ("katz_gc_seconds_total[2]", "unet", 1e3),
}


def case_counters(before: dict, after: dict, into: dict) -> None:
    """Add one request's :data:`CASE_COUNTERS` deltas (``after`` minus ``before``) to ``into``."""
    for key, (name, model, unit) in CASE_COUNTERS.items():
        into[key] = into.get(key, 0.0) + (after.get((name, model), 0.0) - before.get((name, model), 0.0)) * unit


def case_breakdown(sums: dict, requests: int) -> dict:
    """Per request of a case: the loop's time, the UNet's GPU time and its per-step mean (a step slower
    than the plain request's means the GPU was shared, e.g. with a LoRA upload), the LoRA wait at
    step k, the weight switches and the LoRA load (which runs beside the loop)."""
    out = {k: v / requests for k, v in sums.items() if k != "unet_runs"}
    out["lora_switch_ms_per_switch"] = sums["lora_switch_ms"] / sums["lora_switches"] if sums.get("lora_switches") \
        else float("nan")
    out["unet_step_ms"] = sums["unet_device_ms"] / sums["unet_runs"] if sums.get("unet_runs") else float("nan")
    out["loop_minus_unet_ms"] = out["loop_ms"] - out["unet_device_ms"]
    return out


def switch_summary(records: list[dict]) -> dict:
    """Weight switches over the requests ``records`` (each a :func:`case_counters` dict): how many, their
    mean, the longest request's switch time (a request switches once: its set in, or the base back),
    and how many took over 100 ms (the server's count)."""
    switches = sum(r.get("lora_switches", 0) for r in records)
    total = sum(r.get("lora_switch_ms", 0.0) for r in records)
    return {
        "requests": len(records),
        "switches": switches,
        "mean_ms": total / switches if switches else float("nan"),
        "max_request_ms": max((r.get("lora_switch_ms", 0.0) for r in records), default=float("nan")),
        "over_100ms": sum(r.get("lora_slow_switches", 0) for r in records),
        "wait_ms": sum(r.get("lora_switch_wait_ms", 0.0) for r in records),
    }


def loop_overhead(before: dict, after: dict, requests: int, steps: int) -> dict:
    """The denoising loop's cost beyond the UNet, per step, from the counters around ``requests``
    plain requests of ``steps`` steps each: ``katz_pipeline`` execute time minus ``unet`` device time,
    and where a step's wall time goes (``katz_e2e_step_breakdown_ms``, ms per step):

    - ``pipeline_own``: the loop's own work between UNet calls (scheduler, CFG, building requests);
    - ``bls_transport``: the pipeline's wait for a UNet call minus the ``unet`` model's Triton request
      time (moving the request and the response between the processes);
    - ``unet_queue`` / ``unet_input`` / ``unet_execute`` / ``unet_output``: the ``unet`` model's Triton
      phases (queue, input collection, ``execute()``, output handling; GPU outputs are copied out there);
    - ``unet_device``: the UNet on the GPU (CUDA events), overlapping the phases above.

    With the loop in the UNet's process (``--loop unet``, the default) there is one UNet call per
    request: ``unet_execute`` then holds the whole loop and the per-request phases are spread over
    the steps; ``katz_e2e_overhead_per_step_ms`` is what the loop adds to the UNet's GPU time.
    """

    def delta(name: str, model: str) -> float:
        return after.get((name, model), 0.0) - before.get((name, model), 0.0)

    n = requests * steps
    pipe_us = delta("nv_inference_compute_infer_duration_us", "katz_pipeline")
    unet_us = delta("katz_unet_run_seconds_total", "unet") * 1e6  # device time (CUDA events)
    call_us = delta("katz_pipeline_unet_call_seconds_total", "katz_pipeline") * 1e6
    unet_request_us = delta("nv_inference_request_duration_us", "unet")
    per_step = {
        "pipeline_own": pipe_us - call_us,
        "bls_transport": call_us - unet_request_us,
        "unet_queue": delta("nv_inference_queue_duration_us", "unet"),
        "unet_input": delta("nv_inference_compute_input_duration_us", "unet"),
        "unet_execute": delta("nv_inference_compute_infer_duration_us", "unet"),
        "unet_output": delta("nv_inference_compute_output_duration_us", "unet"),
        "unet_device": unet_us,
    }
    return {
        "katz_e2e_unet_runs": delta("katz_unet_runs_total", "unet"),
        "katz_e2e_unet_step_ms": unet_us / n / 1e3,
        "katz_e2e_overhead_per_step_ms": (pipe_us - unet_us) / n / 1e3,
        "katz_e2e_step_breakdown_ms": {k: v / n / 1e3 for k, v in per_step.items()},
        "katz_e2e_stage_ms_per_request": {
            m: delta("nv_inference_compute_infer_duration_us", m) / requests / 1e3
            for m in (*QUEUED_MODELS, "unet")  # the ensemble's steps and the UNet the loop calls
        },
    }


def save_profiles(live: Path, dest: Path, models=("katz_pipeline", "unet"), what="the plain requests") -> None:
    """Copy the models' profiles as they are now into ``dest`` and print the ``models``' top functions
    by cumulative and by own time (cProfile inflates Python-heavy code: read the shares)."""
    from katz.serving.profiling import top

    dest.mkdir(parents=True, exist_ok=True)
    for f in live.glob("*.prof"):
        shutil.copy(f, dest / f.name)
    for model in models:
        files = sorted(dest.glob(f"{model}.*.prof"))
        if files:
            text = top(files, limit=30, sort="cumulative") + top(files, limit=20, sort="tottime")
            (dest / f"{model}.txt").write_text(text)
            print(f"--- {model}: Python profile of execute() over {what}\n{text}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/sdxl-random"))
    p.add_argument("--preset", help="a tiny preset (e.g. tiny-sdxl) instead of --model-dir: the CPU smoke run")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--size", type=int, default=None, help="image side (default: 1024; a preset's own size)")
    p.add_argument("--repeats", type=int, default=5, help="requests per case")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--lora-dtype", default="float16", choices=["float16", "float32"],
                   help="the benchmark LoRA's weights: 186 MB (float16) or 372 MB (float32) at rank 64")
    p.add_argument("--bal-k", type=int, default=2,
                   help="the bound of the *_bal cases (the server's default bound is k = 0: quality, docs/techniques.md)")
    p.add_argument("--controlnet-mode", default="service", choices=("inline", "service", "local"))
    p.add_argument("--skip-diffusers", action="store_true")
    p.add_argument("--cases", type=lambda v: v.split(","), default=CASES,
                   help=f"cases after the plain request, in order (default: {','.join(CASES)}; "
                        f"all: {','.join(ALL_CASES)})")
    p.add_argument("--serve-args", default="", help="more `katz serve` flags, e.g. '--no-cuda-graphs'")
    p.add_argument("--paired", action="store_true",
                   help="send a plain request before each request of the other cases and report each case's "
                        "median ratio to the plain request just before it (resolves a few %% despite drift)")
    p.add_argument("--profile", type=Path,
                   help="folder for Python profiles of the server's models over the plain requests "
                        "(KATZ_PROFILE_DIR, katz/serving/profiling.py); prints the loop's and the UNet's top functions")
    p.add_argument("--trace", type=Path,
                   help="folder for torch.profiler traces of one extra plain request and one with a LoRA never seen "
                        "(page cache, k = 0), untimed, in every model "
                        "(KATZ_TRACE_DIR, katz/serving/profiling.py): Chrome traces and the GPU's idle gaps with the host "
                        "ops across each")
    p.add_argument("--png", action="store_true",
                   help="request the PNG too (default: the pixels only, as diffusers' baseline returns them; "
                        "the PNG encode of a random-weight, noise-like 1024² image takes ~0.27 s)")
    p.add_argument("--out", type=Path)
    p.add_argument("--resume", action="store_true",
                   help="go on from --out: keep its finished cases (and diffusers' figures), run the requests its "
                        "cut-off case and the cases after it still need")
    args = p.parse_args()
    unknown = [c for c in args.cases if c not in ALL_CASES]
    if unknown:
        p.error(f"unknown --cases {', '.join(unknown)} (known: {', '.join(ALL_CASES)})")

    folder, lora_dir, control, prompt, res = prepare(args)
    lat: dict[str, list[float]] = {}
    if args.resume and args.out and args.out.exists():
        before_run = json.loads(args.out.read_text())
        lat = before_run.pop("katz_e2e_latencies_s", None)
        if lat is None:  # a finished run's JSON: the latencies are in its per-case lists
            lat = {k[len("katz_e2e_"):-len("_all_s")]: v for k, v in before_run.items()
                   if k.startswith("katz_e2e_") and k.endswith("_all_s")}
        res = {**before_run, **{k: v for k, v in res.items() if k not in before_run}}
        print(f"resuming {args.out}: {', '.join(f'{c} {len(x)}' for c, x in lat.items()) or 'no requests yet'}",
              flush=True)

    def checkpoint() -> None:  # what is measured so far, in case the run is cut off
        if args.out:
            args.out.write_text(json.dumps({**res, "katz_e2e_latencies_s": lat}, indent=2))

    if not args.skip_diffusers and "diffusers_plain_s" not in res:
        diffusers_baseline(folder, lora_dir, args, control, prompt, res)
        checkpoint()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # ------------------------------------------------------------ the server
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    log = open("/tmp/katz-e2e-server.log", "w")
    on_gpu = bench_device()[0] == "cuda"
    cmd = [sys.executable, "-m", "katz.cli", "serve", "--model-dir", str(folder), "--lora-dir", str(lora_dir),
           "--controlnet-mode", args.controlnet_mode,
           *(["--gpus", "0", "--graph-sizes", f"{args.size}x{args.size}"] if on_gpu else ["--device", "cpu"]),
           "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
           "--metrics-port", str(ports["metrics"]), *args.serve_args.split()]
    t0 = time.perf_counter()
    from katz.client import Generation, infer, make_client

    client = make_client(f"127.0.0.1:{ports['grpc']}", "grpc")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    live_profiles = None
    if args.profile:
        live_profiles = Path(tempfile.mkdtemp(prefix="katz-prof-"))
        env["KATZ_PROFILE_DIR"] = str(live_profiles)
    if args.trace:  # each model's call of the request after the warm-up and the plain ones
        env["KATZ_TRACE_DIR"] = str(args.trace.resolve())
        env["KATZ_TRACE_AT"] = f"{args.repeats + 2},{args.repeats + 3}"  # a plain request, then one with a LoRA
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"katz serve exited with {server.returncode}; see /tmp/katz-e2e-server.log")
            try:
                if client.is_server_ready():
                    break
            except Exception:
                pass
            if time.perf_counter() - t0 > 480:
                raise SystemExit("katz serve was not ready in 480 s")
            time.sleep(1)
        res["katz_server_start_s"] = time.perf_counter() - t0
        print(f"katz serve ready in {res['katz_server_start_s']:.0f}s", flush=True)
        checkpoint()

        buf = io.BytesIO()
        control.save(buf, "PNG")
        base = Generation(prompt=prompt, seed=1, steps=args.steps, width=args.size, height=args.size)

        applied_step = [-1]  # of the last request

        def timed(request: Generation) -> float:
            t = time.perf_counter()
            result = infer(client, request, "grpc", png=args.png)
            seconds = time.perf_counter() - t
            assert result.image.shape == (request.height, request.width, 3), "no image"
            assert result.png or not args.png, "no PNG"
            applied_step[0] = result.lora_applied_step
            return seconds

        def counted(run) -> tuple[float, dict]:
            """``run()``'s seconds and the server's counters over it (:data:`CASE_COUNTERS`)."""
            start = metrics(ports["metrics"])
            seconds = run()
            one: dict = {}
            case_counters(start, metrics(ports["metrics"]), one)
            return seconds, one

        def run_switches(start: dict, now: dict) -> None:
            """Every weight switch of this run after the warm-up (``katz_e2e_switches``): count, mean, the
            longest (the server's gauge: since it started), over 100 ms."""
            def delta(name: str) -> float:
                return now.get((name, "unet"), 0.0) - start.get((name, "unet"), 0.0)

            n = delta("katz_lora_switch_count_total")
            res["katz_e2e_switches"] = {
                "switches": n,
                "mean_ms": delta("katz_lora_switch_seconds_total") * 1e3 / n if n else float("nan"),
                "max_ms": now.get(("katz_lora_switch_max_seconds", "unet"), float("nan")) * 1e3,
                "over_100ms": delta("katz_lora_slow_switches_total"),
                "gc_during_switches": delta("katz_lora_switch_gc_total"),
                "gc_longest_pause_ms": now.get(("katz_gc_longest_pause_seconds", "unet"), float("nan")) * 1e3,
                # what one full collection cost the UNet's process after loading (frozen since)
                "gc_load_collection_ms": now.get(("katz_gc_load_collection_seconds", "unet"), float("nan")) * 1e3,
            }

        def measure(case: str, run) -> None:
            paired = args.paired and case != "plain"
            lat.setdefault(case, [])
            if paired:
                lat.setdefault(f"{case}_plain", [])
            each = res.setdefault(f"katz_e2e_{case}_each_request_ms", [])  # the counters, request by request
            raw = res.setdefault(f"katz_e2e_{case}_counters", [])  # the same, unscaled (switch counts)
            plain_raw = res.setdefault(f"katz_e2e_{case}_plain_counters", [])  # of the paired plain requests
            applied = res.setdefault(f"katz_e2e_{case}_applied_steps", [])
            for _ in range(len(lat[case]), args.repeats):
                if paired:  # a plain request just before each one: drift cancels in the pair's ratio
                    seconds, one = counted(lambda: timed(base))
                    lat[f"{case}_plain"].append(seconds)
                    plain_raw.append(one)
                seconds, one = counted(run)
                lat[case].append(seconds)
                raw.append(one)
                applied.append(applied_step[0])
                each.append(case_breakdown(one, 1))
                checkpoint()
            sums: dict = {}
            for one in raw:
                for key, value in one.items():
                    sums[key] = sums.get(key, 0.0) + value
            res[f"katz_e2e_{case}_per_request_ms"] = case_breakdown(sums, len(raw))
            res[f"katz_e2e_{case}_switches"] = switch_summary(raw)
            if paired:
                res[f"katz_e2e_{case}_plain_switches"] = switch_summary(plain_raw)
            print(f"katz {case}: {', '.join(f'{x:.2f}' for x in lat[case])} s; per request, ms: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in res[f"katz_e2e_{case}_per_request_ms"].items()),
                  flush=True)
            if case in LORA_CASES:  # when each request's LoRA came in, as predicted, and what it cost
                def row(key: str, fmt: str = ".0f") -> str:
                    return ", ".join(format(r.get(key, float("nan")), fmt) for r in raw)

                print(f"katz {case}, each request: applied step {applied}; predicted step {row('lora_predicted_step')}; "
                      f"predicted ready ms {row('lora_predicted_ready_ms')}; ready ms {row('lora_ready_ms')}; "
                      f"lora_load_ms {row('lora_load_ms')}; lora_wait_ms {row('lora_wait_ms')}; "
                      f"switch ms {row('lora_switch_ms', '.1f')}; loads from disk/page cache/host "
                      f"{row('lora_loads_disk')} / {row('lora_loads_page_cache')} / {row('lora_loads_host')}",
                      flush=True)
                sw = res[f"katz_e2e_{case}_switches"]
                print(f"katz {case}, switches: {sw['switches']:.0f} in {sw['requests']} requests, mean "
                      f"{sw['mean_ms']:.1f} ms, longest request {sw['max_request_ms']:.1f} ms, over 100 ms "
                      f"{sw['over_100ms']:.0f}" + (f"; the restores in the plain requests before them: mean "
                      f"{res[f'katz_e2e_{case}_plain_switches']['mean_ms']:.1f} ms" if paired else ""), flush=True)
            if paired:
                ratios = [x / y for x, y in zip(lat[case], lat[f"{case}_plain"])]
                res[f"katz_e2e_{case}_paired_ratio"] = statistics.median(ratios)
                print(f"katz {case} / the plain request before it: {', '.join(f'{r:.3f}' for r in ratios)} "
                      f"(median {statistics.median(ratios):.3f})", flush=True)

        timed(Generation(prompt=prompt, seed=1, steps=2, width=args.size, height=args.size))  # warm-up
        run_start = before = metrics(ports["metrics"])
        plain_done = len(lat.get("plain", []))
        measure("plain", lambda: timed(base))
        after = metrics(ports["metrics"])
        if plain_done < args.repeats:  # a resumed run keeps the overhead its plain requests measured
            res.update(loop_overhead(before, after, args.repeats - plain_done, args.steps))
        if live_profiles is not None:  # the warm-up and the plain requests (profiles are saved after execute)
            save_profiles(live_profiles, args.profile)
        if args.trace:
            timed(base)  # traced in every model (KATZ_TRACE_AT), not timed
            for gaps in sorted(args.trace.glob("*.gaps.txt")):
                print(f"--- {gaps.name}: {gaps.read_text().splitlines()[0]}", flush=True)
        checkpoint()
        cn = Generation(**{**vars(base), "controlnets": ["canny"], "control_images": [buf.getvalue()]})
        n_copies = 0

        def with_lora(request: Generation, where: str, k: int | str | None) -> float:
            """``request`` with a fresh copy of the LoRA (a name the server has not seen): evicted from
            the page cache (``cold``) or with its pages in it (``page_cache``); the copy is deleted after."""
            nonlocal n_copies
            n_copies += 1
            name = f"{where}{os.getpid()}_{n_copies}"
            path = lora_copy(lora_dir / "style.safetensors", lora_dir / f"{name}.safetensors", where)
            try:
                return timed(Generation(**{**vars(request), "loras": [name],
                                           "lora_k": min(args.bal_k, args.steps - 1) if k == BAL else k}))
            finally:
                path.unlink()

        if args.trace:  # a LoRA never seen, from the page cache, at k = 0: the load and merge in the trace
            before_trace = set(args.trace.glob("*.gaps.txt"))
            with_lora(base, "page_cache", 0)
            for gaps in sorted(set(args.trace.glob("*.gaps.txt")) - before_trace):
                print(f"--- {gaps.name} (LoRA request): {gaps.read_text().splitlines()[0]}", flush=True)
        runs = {"controlnet": lambda: timed(cn)}
        for case, (where, k) in LORA_CASES.items():
            runs[case] = lambda where=where, k=k, req=(cn if case.startswith("controlnet") else base): \
                with_lora(req, where, k)
        end = after
        for case in args.cases:
            measure(case, runs[case])
            end = metrics(ports["metrics"])  # after each case, in case the run is cut off
            res["katz_e2e_lora_metrics"] = lora_metrics(end)
            run_switches(run_start, end)
            checkpoint()
        if not args.cases:
            run_switches(run_start, end)
        if live_profiles is not None and args.cases:  # the UNet switching LoRA sets, among the rest
            save_profiles(live_profiles, args.profile / "all_cases", ("unet",), "all cases")
        res["katz_e2e_gpu_memory_used_gb"] = gpu_memory_used_gb() if on_gpu else float("nan")
        res["katz_e2e_gpu_memory_by_model_gb"] = gpu_memory_by_model() if on_gpu else {}
        res["katz_e2e_server_gpu_memory_gb"] = sum(  # the server's processes (nvidia-smi), without this one
            v for k, v in res["katz_e2e_gpu_memory_by_model_gb"].items() if k != "bench")
        res["katz_e2e_torch_memory_gb"] = torch_memory(metrics(ports["metrics"]))
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    for case, xs in lat.items():
        res[f"katz_e2e_{case}_p50_s"] = statistics.median(xs)
        res[f"katz_e2e_{case}_p90_s"] = percentile(xs, 0.9)
        res[f"katz_e2e_{case}_all_s"] = xs

    res["katz_e2e_lora_metrics"] = lora_metrics(end)
    res["katz_e2e_graph_metrics"] = {f"{k[0]}": v for k, v in end.items() if "cuda_graph" in k[0]}

    model = f"preset {args.preset} (CPU smoke run, not a figure)" if args.preset else "SDXL architecture (random weights)"
    print(f"\n{res['device']}, {model}, {args.size}², {args.steps} steps, CFG, {'fp16' if on_gpu else 'fp32'}; "
          f"Katz through tritonserver (gRPC client, ControlNet {args.controlnet_mode}), {args.repeats} requests/case")
    rows = [("plain", "diffusers_plain_s"), ("controlnet", "diffusers_controlnet_s"),
            ("page_cache_lora_bal", "diffusers_cold_lora_s"), ("page_cache_lora_k0", "diffusers_cold_lora_s"),
            ("cold_lora_bal", "diffusers_cold_lora_s"), ("cold_lora_k0", "diffusers_cold_lora_s"),
            ("controlnet_cold_lora", "diffusers_controlnet_cold_lora_s")]
    rows = [(case, dkey) for case, dkey in rows if f"katz_e2e_{case}_p50_s" in res]
    print(f"{'case':20} {'diffusers s':>11} {'Katz p50 s':>10} {'p90 s':>7} {'Katz/diff':>9} {'vs plain':>8}"
          + (f" {'paired':>7}" if args.paired else ""))
    for case, dkey in rows:
        d = res.get(dkey, float("nan"))
        k50 = res[f"katz_e2e_{case}_p50_s"]
        paired = f" {res.get(f'katz_e2e_{case}_paired_ratio', 1.0):7.3f}" if args.paired else ""
        print(f"{case:20} {d:11.2f} {k50:10.2f} {res[f'katz_e2e_{case}_p90_s']:7.2f} {k50 / d:9.2f} "
              f"{k50 / res['katz_e2e_plain_p50_s']:8.3f}{paired}")
    print(f"per-model ms per plain request: { {k: round(v, 1) for k, v in res['katz_e2e_stage_ms_per_request'].items()} }")
    print(f"UNet step (device time in the server) {res['katz_e2e_unet_step_ms']:.1f} ms; loop orchestration overhead "
          f"{res['katz_e2e_overhead_per_step_ms']:.2f} ms/step "
          f"({100 * res['katz_e2e_overhead_per_step_ms'] / res['katz_e2e_unet_step_ms']:.1f}% of the step)")
    print(f"a step's time, ms: { {k: round(v, 2) for k, v in res['katz_e2e_step_breakdown_ms'].items()} }")
    server_gb = res.get("katz_e2e_server_gpu_memory_gb", float("nan"))
    print(f"GPU memory in use with the server loaded (nvidia-smi, all processes): "
          f"{res['katz_e2e_gpu_memory_used_gb']:.1f} GB, the server's processes {server_gb:.1f} GB; "
          f"diffusers' peak allocation {res.get('diffusers_peak_gb', float('nan')):.1f} GB, "
          f"reserved {res.get('diffusers_peak_reserved_gb', float('nan')):.1f} GB (+ its CUDA context)")
    if res["katz_e2e_gpu_memory_by_model_gb"]:
        print(f"  by process: { {k: round(v, 2) for k, v in sorted(res['katz_e2e_gpu_memory_by_model_gb'].items())} }")
    if res.get("katz_e2e_torch_memory_gb"):
        print("  torch's allocator per model, GB: "
              + "; ".join(f"{m} " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(parts.items()))
                          for m, parts in sorted(res["katz_e2e_torch_memory_gb"].items())))
    print("LoRA:", res["katz_e2e_lora_metrics"])
    if res.get("katz_e2e_switches"):
        sw = res["katz_e2e_switches"]
        print(f"weight switches this run: {sw['switches']:.0f}, mean {sw['mean_ms']:.1f} ms, longest since start "
              f"{sw['max_ms']:.1f} ms, over 100 ms {sw['over_100ms']:.0f}, GC collections during them "
              f"{sw['gc_during_switches']:.0f} (longest GC pause {sw['gc_longest_pause_ms']:.1f} ms; a full collection "
              f"of what loading made took {sw['gc_load_collection_ms']:.0f} ms, frozen since)")
    ratio = {c: res.get(f"katz_e2e_{c}_paired_ratio") for c in LORA_CASES}
    if ratio.get("cold_lora_bal") is not None and ratio.get("cold_lora_k0") is not None:
        print(f"cold LoRA, paired: BAL (k = {args.bal_k}) {ratio['cold_lora_bal']:.3f} vs k = 0 {ratio['cold_lora_k0']:.3f} "
              f"(BAL {'faster' if ratio['cold_lora_bal'] < ratio['cold_lora_k0'] else 'NOT faster'})")
    if ratio.get("page_cache_lora_bal") is not None and ratio.get("page_cache_lora_k0") is not None:
        print(f"page-cache LoRA, paired: BAL {ratio['page_cache_lora_bal']:.3f} vs k = 0 "
              f"{ratio['page_cache_lora_k0']:.3f}")
    print("CUDA graphs:", res["katz_e2e_graph_metrics"])
    if args.out:
        args.out.write_text(json.dumps({**res, "katz_e2e_latencies_s": lat}, indent=2))


if __name__ == "__main__":
    main()

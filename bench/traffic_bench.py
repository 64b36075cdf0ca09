"""Production-like traffic on one GPU: Katz against the diffusers peer, both behind tritonserver (issue #23).

    # GPU host (bench/README.md: the carry, `PY=$(bash bench/gpu_host_setup.sh)`, the two-call plan)
    $PY bench/traffic_bench.py --out /tmp/traffic --only katz --deadline-s 540
    $PY bench/traffic_bench.py --out /tmp/traffic --only peer --deadline-s 540   # same --out: resumes
    # CPU smoke run (CI: tests/test_bench.py): tiny preset, a few requests per server, both servers started
    python bench/traffic_bench.py --preset tiny-sdxl --out /tmp/traffic-smoke

Phases, each timed and printed:

1. **Traces** with ``katz trace synth`` (its own parser and code, in-process), one per arrival rate
   (``--rates``): ``--requests`` requests, Gamma arrivals of coefficient of variation ``--cv``
   scaled to offer exactly the rate (``--exact-rate``: a few bursty requests otherwise span
   anything), LoRAs by Zipf(``--zipf``) popularity over the library (``--loras-per-request``),
   ControlNets on a ``--controlnet-share`` of them (1..3 of the three), ``--resolutions``,
   ``--steps``. A rate's trace has the seed ``--trace-seed`` + the rate in thousandths, so it is the
   same whatever else runs; both servers replay the same files. The LoRA-free variant is the same
   file with every LoRA removed (same arrivals, sizes and ControlNets). When every (run, rate) is
   measured already, nothing below runs.
2. **Models** (in a child process, so that this process never holds a CUDA context nvidia-smi would
   count): the full-size random-weight SDXL folder (:mod:`bench.sdxl_random`) or a tiny preset, and
   the registered ControlNets (``--controlnets``, default ``canny,depth,pose``): the folder's own,
   and the others made once from its UNet with seeded random weights.
3. **LoRA library** (:mod:`bench.lora_library`, a child process running while the first server
   starts): ``--num-loras`` files with the UNet's real attention shapes, ranks from
   ``--lora-ranks``, fp16, half kohya and half diffusers/peft names; files already there are kept.
4. **Per server** (``katz``, then ``peer``; ``--only`` picks one): start it (``katz serve``, or
   tritonserver over the rendered peer repository, :func:`render_peer_repository`); warm it up
   (:func:`warm_up`: 2-step requests with all ControlNets, with and without the ``warmup`` LoRA that
   no trace uses, then at each other resolution; their images are compared between the servers);
   probe it with bad requests (both must answer ``INVALID_ARG`` naming the field); then for each
   rate not measured yet: evict every library file from the page cache (``POSIX_FADV_DONTNEED``,
   as e2e_bench does), replay the trace open-loop (:mod:`katz.tools.traces.replay`, the code of ``katz
   trace replay``), scrape the server's metrics before and after (Katz: ``katz_lora_*``; the peer:
   ``peer_lora_*``; both: Triton's ``nv_inference_*``), summarise (:mod:`katz.tools.traces.report`:
   throughput, p50/p90/p99, SLO attainment and goodput for each of ``--slos``, errors) and rewrite
   ``results.json``. Katz then replays the LoRA-free traces (``katz-no-lora``). After its last
   replay: GPU memory of all processes (nvidia-smi) and the server's memory gauges; stop it.
5. **Report**: per rate, ``katz trace report``'s three plots with every run at that rate (small
   PNGs in ``plots/r<rate>/``); a table per run and rate; and one line per run,
   ``goodput <name> <requests/s> at slo <s>``: the highest goodput at the headline SLO (``--slo``)
   over the rates measured completely, i.e. the most requests per second the server answered in time.

Resumable: ``--out`` keeps ``results.json``, the traces, the replay logs (``logs/``) and server logs.
A rerun with the same ``--out`` skips every (run, rate) measured completely on the same trace file
(by its SHA-1) and measures the rest; ``--rates`` / ``--only`` narrow it. A run cut off
(``--deadline-s``, SIGTERM from ``timeout``, Ctrl-C) stops the replay in flight, records what it
measured as incomplete (measured again next time), stops the server and still prints the report;
``--deadline-s`` also keeps a replay from starting when its trace would not end in time. Server
caches persist across the rates of one server start (as in a server that runs on while the load
changes); each run records whether it was the first after a start (``first_after_start``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEER_REPOSITORY = Path(__file__).resolve().parent / "peer"
RUNS = ("katz", "katz-no-lora", "peer")
SERVER_OF = {"katz": "katz", "katz-no-lora": "katz", "peer": "peer"}
# Katz on one GPU: the ControlNets in the UNet's process (the fastest one-GPU mode without
# --compile, bench/RESULTS.md); --serve-args adds to or overrides it.
KATZ_GPU_ARGS = ("--controlnet-mode", "local")
# On the CPU smoke run: one model process fewer and one thread each, to start fast on 2 cores.
KATZ_CPU_ARGS = ("--device", "cpu", "--controlnet-mode", "local", "--torch-threads", "1", "--pipeline-instances", "1")
WARMUP_LORA = "warmup"
METRIC_PREFIXES = ("katz_lora_", "peer_", "nv_inference_", "katz_gpu_memory_bytes", "katz_unet_memory_bytes")
GAUGES = ("katz_gpu_memory_bytes", "katz_unet_memory_bytes", "peer_gpu_memory_bytes", "nv_inference_pending")


class Interrupted(KeyboardInterrupt):
    """The run must stop now (deadline, SIGTERM): a KeyboardInterrupt so asyncio lets it through."""


class Done(Exception):
    """Nothing left to measure: straight to the report."""


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------- phase 1: models
def _make_controlnets(model_dir: Path, names: list[str], root: Path, device: str) -> None:
    """Write ControlNets ``root/<name>`` shaped like the model's UNet (``ControlNetModel.from_unet``,
    the folder's first ControlNet's conditioning channels) with seeded random weights scaled as
    :func:`bench.sdxl_random._small_init_` scales them; each folder gets ``.complete`` last."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from bench.sdxl_random import _small_init_

    dtype = torch.float16 if device == "cuda" else torch.float32
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", torch_dtype=dtype).to(device)
    extra = {}
    existing = sorted((model_dir / "controlnets").glob("*/config.json"))
    if existing:
        cfg = json.loads(existing[0].read_text())
        if "conditioning_embedding_out_channels" in cfg:
            extra["conditioning_embedding_out_channels"] = tuple(cfg["conditioning_embedding_out_channels"])
    for name in names:
        with torch.device(device):  # built on the GPU: a full-size ControlNet initialised on the CPU takes long
            net = ControlNetModel.from_unet(unet, **extra).to(dtype)
        _small_init_(net, torch.Generator(device).manual_seed(zlib.crc32(name.encode())))
        out = root / name
        if out.exists():
            shutil.rmtree(out)
        net.save_pretrained(out, safe_serialization=True)
        (out / ".complete").write_text("ok\n")
        del net
    del unet


def setup_models(spec: dict) -> dict:
    """Phase 1, run in a child process (:func:`run_setup_child`): the model folder, the ControlNets
    and the warm-up LoRA."""
    import torch
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()  # "modules that should be kept in float32: []" for every ControlNet made

    device = "cuda" if torch.cuda.is_available() and not spec["preset"] else "cpu"
    t0 = time.perf_counter()
    if spec["preset"]:
        from katz.models.presets import ensure_preset

        model_dir = ensure_preset(spec["preset"])
    else:
        from bench.sdxl_random import build

        model_dir = build(Path(spec["model_dir"]), device=device)
    model_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    root = Path(spec["work"]) / "controlnets"
    dirs, missing = {}, []
    for name in spec["controlnets"]:
        own, made = model_dir / "controlnets" / name, root / name
        if (own / "config.json").exists():
            dirs[name] = str(own)
        else:
            dirs[name] = str(made)
            if not (made / ".complete").exists():
                missing.append(name)
    if missing:
        _make_controlnets(model_dir, missing, root, device)
    controlnets_s = time.perf_counter() - t0
    _write_warmup_lora(Path(spec["lora_dir"]), model_dir)
    return {"model_dir": str(model_dir), "controlnets": dirs, "device": device, "model_s": model_s,
            "controlnets_s": controlnets_s, "controlnets_made": missing,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"}


def run_setup_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_setup", json.dumps(spec)],
                          cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"model set-up failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Library:
    """Phase 2 in the background: ``bench/lora_library.py`` in a child process, started once the
    model folder is there and running while the first server starts (the server reads no LoRA
    before the first replay; both are minutes of device time on a fresh GPU host). :meth:`wait`
    before the first replay."""

    def __init__(self, args, model_dir: Path):
        self.manifest_path = Path(args.lora_dir) / "library.json"
        cmd = [sys.executable, str(Path(__file__).resolve().parent / "lora_library.py"), "--model-dir", str(model_dir),
               "--out", str(args.lora_dir), "--count", str(args.num_loras),
               "--ranks", ",".join(map(str, args.lora_ranks)), "--prefix", args.lora_prefix,
               "--seed", str(args.lora_seed), "--threads", str(args.lora_threads)]
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        self.manifest: dict | None = None
        self.waited_s = 0.0

    def wait(self) -> dict:
        if self.manifest is None:
            t0 = time.perf_counter()
            out, _ = self.proc.communicate()
            self.waited_s = time.perf_counter() - t0
            for line in out.splitlines():
                log(f"[library] {line}")
            if self.proc.returncode != 0:
                raise SystemExit(f"the LoRA library failed (exit {self.proc.returncode})")
            self.manifest = json.loads(self.manifest_path.read_text())
            self.manifest["_waited_s"] = self.waited_s
            log(f"[library] ready {time.perf_counter() - self.t0:.1f}s after it started; waited {self.waited_s:.1f}s")
        return self.manifest

    def stop(self) -> None:
        """On an interrupt: files are renamed into place only when complete, so killing is safe."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------- phase 3: traces
def synth_command(path: Path, rate: float, args) -> list[str]:
    """The ``katz trace synth`` arguments of the trace at ``rate``."""
    return ["synth", "--out", str(path), "--requests", str(args.requests), "--rate", f"{rate:g}",
            "--arrivals", "gamma", "--cv", f"{args.cv:g}", "--exact-rate", "--num-loras", str(args.num_loras),
            "--lora-prefix", args.lora_prefix, "--zipf", f"{args.zipf:g}",
            "--loras-per-request", args.loras_per_request, "--lora-scale", args.lora_scale,
            "--controlnets", ",".join(args.controlnets), "--controlnet-share", f"{args.controlnet_share:g}",
            "--max-controlnets", str(args.max_controlnets), "--resolutions", args.resolutions,
            "--steps", args.steps, "--seed", str(trace_seed(args.trace_seed, rate))]


def trace_seed(base: int, rate: float) -> int:
    return base + int(round(rate * 1000))


def write_traces(args, out: Path) -> dict:
    """Each rate's trace through ``katz trace synth``'s own parser and code, and its LoRA-free copy."""
    from katz.tools.traces import synth
    from katz.tools.traces.trace import read_trace, write_trace

    parser = argparse.ArgumentParser(prog="katz trace")
    synth.add_parser(parser.add_subparsers(dest="trace_command"))
    traces = {}
    for rate in args.rates:
        key = f"{rate:g}"
        path = out / "traces" / f"r{key}.csv"
        argv = synth_command(path, rate, args)
        synth_args = parser.parse_args(argv)
        rows = synth.synthesize(synth_args)
        write_trace(path, rows)
        rows, _ = read_trace(path, strict=True)
        with_loras = sum(1 for r in rows if r.loras)
        bare = out / "traces" / f"r{key}-no-lora.csv"
        for row in rows:
            row.loras = []
        write_trace(bare, rows)
        traces[key] = {
            "rate": rate, "path": str(path.relative_to(out)), "no_lora_path": str(bare.relative_to(out)),
            "sha1": _sha1(path), "no_lora_sha1": _sha1(bare), "requests": len(rows),
            "span_s": rows[-1].arrival_s if rows else 0.0,
            "command": "katz trace " + shlex.join(argv),
            "with_loras": with_loras,
            "with_controlnets": sum(1 for r in rows if r.controlnets),
        }
    return traces


def _sha1(path: Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def trace_sizes(resolutions: str) -> list[tuple[int, int]]:
    """``(width, height)`` of ``--resolutions`` (``WxH:weight,...``), in order."""
    out = []
    for item in resolutions.split(","):
        size = item.strip().rpartition(":")[0] if ":" in item else item.strip()
        if size:
            w, _, h = size.lower().partition("x")
            out.append((int(w), int(h)))
    return out


# ---------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_peer_repository(out: Path, *, model_dir: Path, controlnets: dict[str, str], lora_dir: Path, gpu: int | None,
                           dtype: str, max_adapters: int, lora_mode: str, torch_threads: int = 0) -> Path:
    """A copy of ``bench/peer`` with this run's folders and device: the checked-in config.pbtxt's
    parameters and instance group replaced (``gpu`` None: ``KIND_CPU``). Returns the repository."""
    text = (PEER_REPOSITORY / "katz" / "config.pbtxt").read_text()
    values = {
        "model_dir": str(model_dir), "lora_dir": str(lora_dir), "dtype": dtype, "max_adapters": str(max_adapters),
        "lora_mode": lora_mode, "torch_threads": str(torch_threads),
        "controlnets": ",".join(f"{n}={d}" for n, d in controlnets.items()),
    }
    for key, value in values.items():
        if '"' in value or "\\" in value:
            raise ValueError(f"peer parameter {key}: {value!r} cannot go into config.pbtxt")
        text, n = re.subn(rf'(parameters {{ key: "{key}" value {{ string_value: )"[^"]*"',
                          lambda m: f'{m.group(1)}"{value}"', text)
        if n != 1:
            raise ValueError(f"bench/peer/katz/config.pbtxt has no parameter {key!r}")
    group = ("instance_group [ { kind: KIND_CPU count: 1 } ]" if gpu is None
             else f"instance_group [ {{ kind: KIND_GPU count: 1 gpus: [ {gpu} ] }} ]")
    text, n = re.subn(r"^instance_group \[.*\]$", group, text, flags=re.M)
    if n != 1:
        raise ValueError("bench/peer/katz/config.pbtxt has no instance_group line")
    repo = Path(out)
    if repo.exists():
        shutil.rmtree(repo)
    (repo / "katz" / "1").mkdir(parents=True)
    (repo / "katz" / "config.pbtxt").write_text(text)
    shutil.copy2(PEER_REPOSITORY / "katz" / "1" / "model.py", repo / "katz" / "1" / "model.py")
    return repo


class Server:
    """One server process (``katz serve``, or tritonserver for the peer) with its ports and log."""

    def __init__(self, name: str, cmd: list[str], env: dict, ports: dict, log_path: Path, repository: Path):
        self.name, self.cmd, self.env, self.ports, self.log_path = name, cmd, env, ports, log_path
        self.repository = repository  # the tritonserver serving it is found by this path if it must be killed
        self.proc: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def start(self, timeout: float) -> float:
        """Start and wait until ready; seconds taken. Raises RuntimeError if it exits or times out."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        t0 = time.perf_counter()
        # own session: stopping it (and, for the peer, its stubs) never touches this process
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=ROOT, start_new_session=True)
        url = f"http://127.0.0.1:{self.ports['http']}/v2/health/ready"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"{self.name} server not ready in {timeout:.0f}s; see {self.log_path}")
            time.sleep(0.5)

    def metrics(self) -> dict[str, float]:
        """Triton's Prometheus metrics: ``'name{labels}' -> value`` for :data:`METRIC_PREFIXES`
        (summaries' quantile series left out)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=10).read().decode()
        return parse_metrics(text)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # katz serve stops its tritonserver; tritonserver its stubs
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        # katz serve runs tritonserver in a session of its own: if katz serve was killed, that one
        # (and its model processes) would stay and hold the GPU for the next server
        for pid in _pids_with(f"--model-repository={self.repository}"):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


def _pids_with(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (here: a repository path only this run uses)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r"^(\w+)(\{[^}]*\})?\s+(\S+)$", line)
        if not m or not m.group(1).startswith(METRIC_PREFIXES) or "quantile=" in (m.group(2) or ""):
            continue
        try:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        except ValueError:
            continue
    return out


def metric_delta(before: dict, after: dict) -> dict[str, float]:
    """Counters' increase between two scrapes; gauges (:data:`GAUGES`) as they are after."""
    out = {}
    for key, value in after.items():
        name = key.split("{", 1)[0]
        out[key] = value if name in GAUGES else value - before.get(key, 0.0)
    return {k: v for k, v in out.items() if v}


def _sum(metrics: dict, name: str, **labels) -> float:
    total = 0.0
    for key, value in metrics.items():
        if key.split("{", 1)[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += value
    return total


def lora_figures(delta: dict, server: str) -> dict[str, float]:
    """The LoRA figures of one replay from its metric deltas, in one schema for both servers:
    loads (files read), load time, cache hits/misses by tier (Katz: host LRU and device LRU; the
    peer: its set of loaded adapters, the device tier), time requests waited for a LoRA (Katz: at
    the bound k; the peer loads before the pipeline runs, so its whole load time is waited) and time
    switching weights (Katz: merge/restore; the peer: set_adapters + fuse + unfuse)."""
    if server == "katz":
        return {
            "loads": _sum(delta, "katz_lora_loads_total"),
            "load_s": _sum(delta, "katz_lora_load_seconds_total"),
            "host_hits": _sum(delta, "katz_lora_cache_hits_total", tier="host"),
            "host_misses": _sum(delta, "katz_lora_cache_misses_total", tier="host"),
            "device_hits": _sum(delta, "katz_lora_cache_hits_total", tier="device"),
            "device_misses": _sum(delta, "katz_lora_cache_misses_total", tier="device"),
            "wait_s": _sum(delta, "katz_lora_wait_seconds_total"),
            "switch_s": _sum(delta, "katz_lora_switch_seconds_total"),
            "load_failures": _sum(delta, "katz_lora_load_failures_total"),
        }
    return {
        "loads": _sum(delta, "peer_lora_loads_total"),
        "load_s": _sum(delta, "peer_lora_load_seconds_total"),
        "device_hits": _sum(delta, "peer_lora_cache_hits_total", tier="device"),
        "device_misses": _sum(delta, "peer_lora_cache_misses_total", tier="device"),
        "evictions": _sum(delta, "peer_lora_evictions_total"),
        "wait_s": _sum(delta, "peer_lora_load_seconds_total"),
        "switch_s": _sum(delta, "peer_lora_switch_seconds_total"),
    }


def gpu_memory() -> dict | None:
    """nvidia-smi after the run: GPU 0's memory in use (all processes) and per process (GB)."""
    if not shutil.which("nvidia-smi"):
        return None
    from bench.e2e_bench import gpu_memory_by_model, gpu_memory_used_gb

    try:
        return {"used_gb": gpu_memory_used_gb(), "by_process_gb": gpu_memory_by_model()}
    except (OSError, subprocess.CalledProcessError) as exc:
        return {"error": str(exc)}


def make_server(name: str, args, setup: dict, out: Path, start_index: int) -> Server:
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    log_path = out / "logs" / f"{name}-server-{start_index}.log"
    on_gpu = setup["device"] == "cuda"
    work = Path(args.work)
    model_dir = Path(setup["model_dir"])
    if name == "katz":
        own = {p.name for p in (model_dir / "controlnets").glob("*")}
        extra = [f"--controlnet={n}={d}" for n, d in setup["controlnets"].items() if n not in own]
        sizes = ",".join(f"{h}x{w}" for w, h in trace_sizes(args.resolutions))  # katz takes HxW
        cmd = [sys.executable, "-m", "katz.cli", "serve", "--model-dir", str(model_dir), "--lora-dir",
               str(args.lora_dir), *extra,
               *((*KATZ_GPU_ARGS, "--gpus", "0", "--graph-sizes", sizes) if on_gpu else KATZ_CPU_ARGS),
               "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
               "--metrics-port", str(ports["metrics"]), "--workdir", str(work / "katz-serve"),
               "--exit-timeout", "15", *shlex.split(args.serve_args)]
        return Server(name, cmd, dict(os.environ, PYTHONUNBUFFERED="1"), ports, log_path,
                      work / "katz-serve" / "model_repository")
    from katz.deploy import server as triton

    repo = render_peer_repository(
        work / "peer-repository", model_dir=model_dir, controlnets=setup["controlnets"], lora_dir=args.lora_dir,
        gpu=0 if on_gpu else None, dtype="float16" if on_gpu else "float32", max_adapters=args.peer_max_adapters,
        lora_mode=args.peer_lora_mode, torch_threads=0 if on_gpu else 1)
    install = triton.TritonInstall.find()
    backends = triton.prepare_backends(install, work / "peer-backends")
    opts = triton.ServerOptions(http_port=ports["http"], grpc_port=ports["grpc"], metrics_port=ports["metrics"],
                                gpus=(0,) if on_gpu else (), watchdog=False, exit_timeout=15,
                                cuda_pool_bytes=64 << 20)  # no GPU tensors cross processes: Triton's default
    cmd = triton.command(install, repo, backends, opts)
    return Server(name, cmd, triton.server_env(install), ports, log_path, repo)


def warm_up(server: Server, args, setup: dict, control: dict, image_dir: Path) -> float:
    """Requests before the measured ones, 2 steps each, all ControlNets: at the first trace resolution
    with the warm-up LoRA (in from step 0: ``lora_k`` 0), then the same without it (the base weights
    must be back), then one at each other resolution. The first two images' central pixels are kept
    in ``image_dir/<server>-{lora,base}.npy`` to compare the servers (:func:`compare_images`)."""
    import numpy as np

    from katz.client import Generation, infer, make_client

    sizes = trace_sizes(args.resolutions)
    names = list(setup["controlnets"])
    requests = [(sizes[0], [WARMUP_LORA], "lora"), (sizes[0], [], "base"), *((size, [], None) for size in sizes[1:])]
    client = make_client(server.grpc_url, "grpc")
    t0 = time.perf_counter()
    try:
        for (w, h), loras, keep in requests:
            gen = Generation(prompt="warm-up", seed=0, steps=2, width=w, height=h, controlnets=names,
                             control_images=[control[(w, h)]] * len(names), loras=loras, lora_k=0 if loras else None)
            result = infer(client, gen, "grpc", timeout=args.timeout, png=False)
            if keep:  # the central 256x256 at most: 196 KB, not 3 MB, in an --out that travels
                img = result.image
                top, left = max(0, (img.shape[0] - 256) // 2), max(0, (img.shape[1] - 256) // 2)
                crop = np.ascontiguousarray(img[top:top + 256, left:left + 256])
                np.save(image_dir / f"{server.name}-{keep}.npy", crop)
    finally:
        client.close()
    return time.perf_counter() - t0


# Requests both servers must reject before any compute, with INVALID_ARG naming the field.
PROBES = {"steps": {"steps": 0}, "loras": {"loras": ["no-such-lora"]}, "controlnets": {"controlnets": ["nope"],
                                                                                      "control_images": [b"x"]}}


def probe_validation(server: Server) -> dict[str, str]:
    """Send each bad request of :data:`PROBES`; the error each got (``ok`` if none: a failure)."""
    from tritonclient.utils import InferenceServerException

    from katz.client import Generation, infer, make_client

    client = make_client(server.grpc_url, "grpc")
    out = {}
    try:
        for name, fields in PROBES.items():
            try:
                infer(client, Generation(prompt="probe", seed=0, **fields), "grpc", timeout=60, png=False)
                out[name] = "ok"
            except InferenceServerException as exc:
                out[name] = f"{exc.status()}: {exc.message()}"
    finally:
        client.close()
    return out


def compare_images(image_dir: Path) -> dict | None:
    """The warm-up images (:func:`warm_up`): per case (``lora``, ``base``) the largest and mean absolute
    difference in uint8 levels between Katz and the peer (the same request); and per server between
    its two images (what the LoRA changed: 0 would mean it was not applied). None until both exist."""
    import numpy as np

    cases = {(name, case): image_dir / f"{name}-{case}.npy" for name in ("katz", "peer") for case in ("lora", "base")}
    if not all(p.exists() for p in cases.values()):
        return None
    img = {k: np.load(p).astype(np.int16) for k, p in cases.items()}

    def diff(a, b) -> dict:
        if a.shape != b.shape:
            return {"error": f"shapes differ: {a.shape} vs {b.shape}"}
        d = np.abs(a - b)
        return {"max_abs": int(d.max()), "mean_abs": float(d.mean())}

    return {
        "katz_vs_peer": {case: diff(img["katz", case], img["peer", case]) for case in ("lora", "base")},
        "lora_vs_base": {name: diff(img[name, "lora"], img[name, "base"]) for name in ("katz", "peer")},
        "shape": list(img["katz", "lora"].shape),
    }


def record_library(results: Results, manifest: dict, args) -> None:
    lib = {k: v for k, v in manifest.items() if k not in ("files", "_waited_s")}
    lib["waited_s"] = manifest.get("_waited_s", 0.0)  # what the first replay waited for it
    lib["rank_counts"] = {str(r): sum(1 for f in manifest["files"] if f["rank"] == r) for r in manifest["ranks"]}
    lib["format_counts"] = {f: sum(1 for e in manifest["files"] if e["format"] == f) for f in ("peft", "kohya")}
    lib["filesystem"] = filesystem(args.lora_dir)
    if lib["filesystem"] == "tmpfs":
        log(f"[library] WARNING: {args.lora_dir} is on tmpfs: its pages cannot be evicted, LoRA reads are warm")
    results.data["library"] = lib
    if results.data.get("setups"):
        results.data["setups"][-1]["library"] = lib
    results.save()


def evict_library(lora_dir: Path) -> tuple[float, float]:
    """Drop every library file from the page cache; seconds taken (the first time, the fsync also
    writes the freshly written library out) and the share of the pages still resident afterwards
    (~0; 1.0 on a tmpfs, where nothing can be evicted and every LoRA read is warm)."""
    from katz.lora.readahead import evict, resident_pages

    t0 = time.perf_counter()
    paths = sorted(Path(lora_dir).glob("*.safetensors"))
    for path in paths:
        evict(path)
    took = time.perf_counter() - t0
    resident = total = 0
    for path in paths[:20]:
        fd = os.open(path, os.O_RDONLY)
        try:
            pages = resident_pages(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        if pages is not None:
            resident += sum(p & 1 for p in pages)
            total += len(pages)
    return took, (resident / total if total else float("nan"))


def filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/mounts; '' if unknown)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return ""
    path = str(Path(path).resolve())
    best = ("", "")
    for mount, kind in mounts:
        if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best[0]):
            best = (mount, kind)
    return best[1]


# ---------------------------------------------------------------------------- results
class Results:
    """``results.json`` in ``--out``, rewritten (atomically) after every change."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}
        self.data.setdefault("runs", {})
        self.data.setdefault("servers", {})

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=float))
        tmp.replace(self.path)

    def done(self, run: str, rate: str, sha1: str) -> bool:
        rec = self.data["runs"].get(run, {}).get(rate)
        return bool(rec and rec.get("complete") and rec.get("trace_sha1") == sha1)


def summarize_log(log_path: Path, label: str, slos: list[float]) -> dict:
    from katz.tools.traces import report

    run = report.load_log(log_path, label)
    summary = report.summarize(run, slos)
    errors: dict[str, int] = {}
    for e in run.errors:
        errors[(e or "unknown")[:120]] = errors.get((e or "unknown")[:120], 0) + 1
    summary["errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5])
    return summary


def replay_one(server: Server, run: str, rate: str, trace: dict, args, out: Path, results: Results,
               first: bool) -> None:
    """Evict the library, replay one trace, record its summary, metrics and LoRA figures."""
    from katz.tools.traces.replay import replay
    from katz.tools.traces.trace import read_trace

    path = out / (trace["no_lora_path"] if run == "katz-no-lora" else trace["path"])
    sha1 = trace["no_lora_sha1"] if run == "katz-no-lora" else trace["sha1"]
    rows, _ = read_trace(path, strict=True)
    log_path = out / "logs" / f"{run}-r{rate}.csv"
    rec = {"rate": float(rate), "trace": str(path.relative_to(out)), "trace_sha1": sha1, "complete": False,
           "first_after_start": first, "log": str(log_path.relative_to(out)), "server_log": server.log_path.name,
           "settings": ({"serve_args": args.serve_args} if SERVER_OF[run] == "katz" else
                        {"max_adapters": args.peer_max_adapters, "lora_mode": args.peer_lora_mode})}
    results.data["runs"].setdefault(run, {})[rate] = rec
    rec["evict_s"], rec["resident_after_evict"] = evict_library(args.lora_dir)
    before = server.metrics()
    t0 = time.perf_counter()
    interrupted = None
    try:
        replay(server.grpc_url, rows, log_path, timeout=args.timeout, quiet=not args.verbose)
    except Interrupted as exc:
        interrupted = exc
    rec["wall_s"] = time.perf_counter() - t0
    try:
        delta = metric_delta(before, server.metrics())
        rec["metrics"] = delta
        rec["lora"] = lora_figures(delta, SERVER_OF[run])
    except OSError as exc:
        rec["metrics_error"] = str(exc)
    if log_path.exists():
        rec["summary"] = summarize_log(log_path, run, args.slos)
    rec["complete"] = interrupted is None and rec.get("summary", {}).get("requests") == len(rows)
    results.save()
    s = rec.get("summary", {})
    log(f"[{run} r={rate}] {s.get('ok', 0)}/{len(rows)} ok in {rec['wall_s']:.1f}s"
        + ("" if rec["complete"] else " (cut off: measured again next time)")
        + f"; p50 {s.get('p50_s', float('nan')):.2f}s p90 {s.get('p90_s', float('nan')):.2f}s; "
        + "; ".join(f"goodput@{k}s {v['goodput_rps']:.3f}/s" for k, v in s.get("slos", {}).items())
        + f"; evict {rec['evict_s']:.1f}s ({rec['resident_after_evict']:.0%} still resident)")
    if interrupted is not None:
        raise interrupted


def run_server(name: str, todo: list[tuple[str, str]], args, setup: dict, traces: dict, out: Path,
               results: Results, control: dict, deadline: float | None, library: Library) -> None:
    info = results.data["servers"].setdefault(name, {"starts": []})
    server = make_server(name, args, setup, out, len(info["starts"]) + 1)
    start = {"log": server.log_path.name, "command": shlex.join(server.cmd)}
    info["starts"].append(start)
    try:
        try:
            start["start_s"] = server.start(args.server_start_timeout)
            log(f"[{name}] server ready in {start['start_s']:.1f}s (log {server.log_path})")
            (out / "warmup").mkdir(parents=True, exist_ok=True)
            start["warmup_s"] = warm_up(server, args, setup, control, out / "warmup")
            start["validation"] = probe_validation(server)
            log(f"[{name}] warm-up in {start['warmup_s']:.1f}s; bad requests: "
                + "; ".join(f"{k}: {v[:90]}" for k, v in start["validation"].items()))
        except (RuntimeError, OSError) as exc:
            start["error"] = str(exc)
            results.save()
            log(f"[{name}] FAILED to start: {exc}")
            tail = server.log_path.read_text(errors="replace")[-3000:] if server.log_path.exists() else ""
            print(tail, file=sys.stderr, flush=True)
            return
        except Exception as exc:  # the warm-up request failed (tritonclient's error)
            start["error"] = f"warm-up: {exc}"
            results.save()
            log(f"[{name}] warm-up FAILED: {exc}")
            return
        record_library(results, library.wait(), args)
        first = True
        for run, rate in todo:
            trace = traces[rate]
            if deadline is not None and time.time() + trace["span_s"] + 30 > deadline:
                log(f"[{run} r={rate}] not started: its trace ({trace['span_s']:.0f}s of arrivals) would not end "
                    f"before the deadline")
                results.data["runs"].setdefault(run, {}).setdefault(rate, {"rate": float(rate), "complete": False,
                                                                            "skipped": "deadline"})
                continue
            replay_one(server, run, rate, trace, args, out, results, first)
            first = False
        start["gpu_memory_after"] = info["gpu_memory_after"] = gpu_memory()
        try:
            info["memory_gauges"] = {k: v for k, v in server.metrics().items()
                                     if k.split("{", 1)[0] in ("katz_gpu_memory_bytes", "katz_unet_memory_bytes",
                                                               "peer_gpu_memory_bytes")}
        except OSError:
            pass
        results.save()
    finally:
        t0 = time.perf_counter()
        server.stop()
        start["stop_s"] = time.perf_counter() - t0
        log(f"[{name}] stopped in {start['stop_s']:.1f}s")
        results.save()


# ---------------------------------------------------------------------------- report
def plots(out: Path, results: Results, slo: float) -> list[Path]:
    from katz.tools.traces import report

    made = []
    rates = sorted({r for runs in results.data["runs"].values() for r in runs}, key=float)
    for rate in rates:
        runs = []
        for name in RUNS:
            rec = results.data["runs"].get(name, {}).get(rate)
            if rec and rec.get("log") and (out / rec["log"]).exists():
                runs.append(report.load_log(out / rec["log"], name))
        if runs:
            made += report.plot(runs, slo, out / "plots" / f"r{rate}", dpi=60, size=(6, 3.6))
    return made


def print_report(results: Results, slos: list[float], headline: float) -> list[str]:
    """The table per run and rate, then one line per run: ``goodput <name> <requests/s> at slo <s>``,
    the highest goodput at the headline SLO over the rates measured completely (over the cut-off
    ones only when none is complete)."""
    keys = [f"{s:g}" for s in slos]
    head = (f"{'run':13} {'rate':>6} {'n':>4} {'ok':>4} {'err':>4} {'thru/s':>7} {'p50 s':>7} {'p90 s':>7} "
            f"{'p99 s':>7} " + " ".join(f"{'att@' + k:>7} {'good@' + k:>8}" for k in keys)
            + f" {'loads':>6} {'wait s':>7} {'switch s':>8} {'hits h/d':>9}")
    print("\n" + head)
    lines = []
    for name in RUNS:
        best = None  # (complete, goodput, rate): a complete run beats a cut-off one
        for rate, rec in sorted(results.data["runs"].get(name, {}).items(), key=lambda kv: float(kv[0])):
            s = rec.get("summary")
            if not s:
                print(f"{name:13} {rate:>6}  not measured ({rec.get('skipped', 'cut off before any answer')})")
                continue
            lo = rec.get("lora", {})
            hits = f"{lo.get('host_hits', 0):.0f}/{lo.get('device_hits', 0):.0f}" if lo else "-"
            row = (f"{name:13} {rate:>6} {s['requests']:4d} {s['ok']:4d} {s['failed']:4d} {s['throughput_rps']:7.3f} "
                   f"{s['p50_s']:7.2f} {s['p90_s']:7.2f} {s['p99_s']:7.2f} "
                   + " ".join(f"{s['slos'][k]['attainment']:7.1%} {s['slos'][k]['goodput_rps']:8.3f}"
                              if k in s["slos"] else f"{'-':>7} {'-':>8}" for k in keys)
                   + f" {lo.get('loads', 0):6.0f} {lo.get('wait_s', 0):7.2f} {lo.get('switch_s', 0):8.2f} {hits:>9}"
                   + ("" if rec.get("complete") else "  (incomplete)"))
            print(row)
            g = s["slos"].get(f"{headline:g}", {}).get("goodput_rps")
            if g is not None and g == g and (best is None or (bool(rec.get("complete")), g) > best[:2]):
                best = (bool(rec.get("complete")), g, rate)
        if best is not None:
            lines.append((f"goodput {name} {best[1]:.3f} at slo {headline:g}",
                          best[2] + ("" if best[0] else ", cut off")))
    for name, info in results.data.get("servers", {}).items():
        mem = info.get("gpu_memory_after")
        if mem and "used_gb" in mem:
            procs = ", ".join(f"{k} {v:.1f}" for k, v in sorted(mem.get("by_process_gb", {}).items()))
            print(f"GPU memory after the {name} run (nvidia-smi, all processes): {mem['used_gb']:.1f} GB ({procs})")
    if lines:
        print(f"\nBest goodput over the measured rates (requests answered OK within {headline:g} s, per second): "
              + ", ".join(f"{line.split()[1]} at {rate} req/s offered" for line, rate in lines))
        for line, _ in lines:
            print(line)
    return [line for line, _ in lines]


# ---------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="tiny preset (tiny-sdxl): the CPU smoke run, fp32, no figures")
    src.add_argument("--model-dir", type=Path, default=Path("/tmp/sdxl-random"),
                     help="random-weight SDXL folder, built there if absent (bench/sdxl_random.py)")
    p.add_argument("--out", type=Path, required=True, help="results.json, traces, logs, plots; reuse to resume")
    p.add_argument("--work", type=Path, help="LoRA library, made ControlNets, rendered repositories "
                   "(default /tmp/katz-traffic; with --preset <out>/work)")
    p.add_argument("--lora-dir", type=Path, help="the LoRA library (default <work>/loras)")
    p.add_argument("--only", choices=("katz", "peer"), help="one server only (default: katz, then the peer)")
    p.add_argument("--rates", type=lambda v: [float(x) for x in v.split(",") if x],
                   help="arrival rates, req/s, measured in this order (default 0.1,0.2,0.4,0.6; preset 2)")
    p.add_argument("--no-lora-rates", type=lambda v: [float(x) for x in v.split(",") if x],
                   help="rates of the LoRA-free Katz run, from --rates (default: the second and the last of "
                        "--rates: below and past Katz's saturation; '' for none)")
    p.add_argument("--requests", type=int, help="requests per rate (default 10; preset 3)")
    p.add_argument("--steps", help="katz trace synth --steps (default 30; preset 2)")
    p.add_argument("--resolutions", help="WxH:weight,... (default 1024x1024:0.9,1216x832:0.1; preset 64x64)")
    p.add_argument("--cv", type=float, default=2.5, help="coefficient of variation of the Gamma arrival gaps")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--loras-per-request", default="0:0.05,1:0.5,2:0.3,3:0.15")
    p.add_argument("--lora-scale", default="0.5:1.0")
    p.add_argument("--controlnets", type=lambda v: [x for x in v.split(",") if x], default=["canny", "depth", "pose"])
    p.add_argument("--controlnet-share", type=float, default=0.98)
    p.add_argument("--max-controlnets", type=int, default=3)
    p.add_argument("--trace-seed", type=int, default=0)
    p.add_argument("--num-loras", type=int, help="LoRA library size (default 200; preset 8)")
    p.add_argument("--lora-ranks", help="ranks drawn per file (default 8,16,32,64,128; preset 4,8)")
    p.add_argument("--lora-prefix", default="lora-")
    p.add_argument("--lora-seed", type=int, default=0)
    p.add_argument("--lora-threads", type=int, default=4)
    p.add_argument("--slos", type=lambda v: [float(x) for x in v.split(",") if x], default=[5.0, 10.0],
                   help="SLOs (s) for attainment and goodput (default 5,10)")
    p.add_argument("--slo", type=float, help="headline SLO of the goodput lines (default: the largest of --slos)")
    p.add_argument("--serve-args", default="", help="more `katz serve` flags (write --serve-args='--compile ...')")
    p.add_argument("--peer-max-adapters", type=int, default=8, help="the peer's bound on loaded adapters")
    p.add_argument("--peer-lora-mode", choices=("fuse", "unfused"), default="fuse")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--server-start-timeout", type=float, default=600.0)
    p.add_argument("--deadline-s", type=float, help="finish within this many seconds of the start: no replay starts "
                   "that would not end in time, the one in flight is cut off, servers stopped, report printed")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--verbose", action="store_true", help="a line per request")
    args = p.parse_args(argv)
    tiny = bool(args.preset)
    args.rates = args.rates or ([2.0] if tiny else [0.1, 0.2, 0.4, 0.6])
    if args.no_lora_rates is None:
        args.no_lora_rates = [args.rates[1], args.rates[-1]] if len(args.rates) > 2 else list(args.rates)
    unknown = [r for r in args.no_lora_rates if r not in args.rates]
    if unknown:
        p.error(f"--no-lora-rates {unknown} are not in --rates")
    args.requests = args.requests or (3 if tiny else 10)
    args.steps = args.steps or ("2" if tiny else "30")
    args.resolutions = args.resolutions or ("64x64" if tiny else "1024x1024:0.9,1216x832:0.1")
    args.num_loras = args.num_loras or (8 if tiny else 200)
    args.lora_ranks = tuple(int(r) for r in (args.lora_ranks or ("4,8" if tiny else "8,16,32,64,128")).split(","))
    # absolute: the servers run in the repository root
    args.out = args.out.resolve()
    args.work = (args.work or (args.out / "work" if tiny else Path("/tmp/katz-traffic"))).resolve()
    args.lora_dir = (args.lora_dir or args.work / "loras").resolve()
    args.model_dir = args.model_dir.resolve()
    args.slo = args.slo or max(args.slos)
    if args.slo not in args.slos:
        args.slos = [*args.slos, args.slo]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    begin = time.time()
    # the last 45 s are for stopping the server and the report: replays end by then
    deadline = begin + args.deadline_s - 45 if args.deadline_s else None
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results = Results(out / "results.json")

    def stop_now(signum, frame):
        for s in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)  # the clean-up below must not be cut off in turn
        raise Interrupted(f"signal {signal.Signals(signum).name}")

    for s in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT):
        signal.signal(s, stop_now)
    if deadline is not None:
        signal.alarm(max(1, int(deadline - begin)))

    interrupted = False
    try:
        t0 = time.perf_counter()
        traces = write_traces(args, out)  # first: with nothing left to measure, no set-up at all
        traces_s = time.perf_counter() - t0
        log(f"[traces] {len(traces)} rates in {traces_s:.1f}s")
        for key, tr in traces.items():
            log(f"[traces] r={key}: {tr['requests']} requests over {tr['span_s']:.0f}s, {tr['with_loras']} with LoRAs, "
                f"{tr['with_controlnets']} with ControlNets: {tr['command']}")
        todos = {}
        for name in [args.only] if args.only else ["katz", "peer"]:
            todo = [(name, f"{r:g}") for r in args.rates]
            if name == "katz":
                todo += [("katz-no-lora", f"{r:g}") for r in args.no_lora_rates]
            todos[name] = [(run, rate) for run, rate in todo if not results.done(
                run, rate, traces[rate]["no_lora_sha1" if run == "katz-no-lora" else "sha1"])]
            if not todos[name]:
                log(f"[{name}] every rate already measured in {out}")
        results.data.update({
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "traces": traces})
        if not any(todos.values()):
            raise Done
        t0 = time.perf_counter()
        setup = run_setup_child({"preset": args.preset, "model_dir": str(args.model_dir), "work": str(args.work),
                                 "controlnets": args.controlnets, "lora_dir": str(args.lora_dir)})
        library = Library(args, Path(setup["model_dir"]))
        log(f"[setup] model folder {setup['model_dir']} in {setup['model_s']:.1f}s; ControlNets "
            f"{', '.join(setup['controlnets'])} in {setup['controlnets_s']:.1f}s"
            + (f" (made {', '.join(setup['controlnets_made'])})" if setup["controlnets_made"] else "")
            + f"; {setup['gpu']} (set-up process {time.perf_counter() - t0:.1f}s)")
        results.data["device"] = setup["gpu"]
        # one entry per invocation (each GPU call builds everything again): its phases' times
        results.data.setdefault("setups", []).append(
            {**setup, "traces_s": traces_s, "only": args.only, "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        results.save()
        control = _control_images(args)
        try:
            for name, todo in todos.items():
                if todo:
                    log(f"[{name}] to measure: {', '.join(f'{r}@{q}' for r, q in todo)}")
                    run_server(name, todo, args, setup, traces, out, results, control, deadline, library)
        finally:
            library.stop()
    except Done:
        pass
    except Interrupted as exc:
        interrupted = True
        log(f"interrupted ({exc}): what was measured is in {out / 'results.json'}")
    finally:
        signal.alarm(0)
    for s in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    if not args.no_plots:
        try:
            made = plots(out, results, args.slo)
            if made:
                log(f"[report] {len(made)} plots in {out / 'plots'}")
        except Exception as exc:  # a plot must not lose the table
            log(f"[report] plots failed: {type(exc).__name__}: {exc}")
    lines = print_report(results, args.slos, args.slo)
    diff = compare_images(out / "warmup")
    if diff is not None:
        results.data["warmup_image_diff"] = diff
        log(f"warm-up images (2 steps, all ControlNets; uint8 levels): Katz against the peer, with the LoRA "
            f"{diff['katz_vs_peer']['lora']}, without {diff['katz_vs_peer']['base']}; the LoRA's effect: "
            f"Katz {diff['lora_vs_base']['katz']}, the peer {diff['lora_vs_base']['peer']}")
    results.data["goodput_lines"] = lines
    results.data["elapsed_s"] = time.time() - begin
    results.save()
    log(f"total {time.time() - begin:.0f}s; results {out / 'results.json'}")
    return 3 if interrupted else 0


def _write_warmup_lora(lora_dir: Path, model_dir: Path) -> None:
    """``warmup.safetensors``: a rank-8 peft LoRA (library layout) that only the warm-up requests use."""
    from bench.lora_library import Entry, Pools, unet_targets, write_file

    path = Path(lora_dir) / f"{WARMUP_LORA}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        targets, layers = unet_targets(model_dir)
        write_file(path, Entry(WARMUP_LORA, 10**6, 8, "peft"), targets, layers, Pools(1, 1 << 20), 1)


def _control_images(args) -> dict:
    """One control PNG per trace resolution (the replay's own, :func:`katz.tools.perf.control_image_png`)."""
    from katz.tools.perf import control_image_png

    return {(w, h): control_image_png(w, h) for w, h in trace_sizes(args.resolutions)}


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_setup":  # phase 1 in a child process (run_setup_child)
        print(json.dumps(setup_models(json.loads(sys.argv[2]))), flush=True)
        sys.exit(0)
    sys.exit(main())

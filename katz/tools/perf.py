"""``katz perf``: a perf_analyzer sweep against a live Katz server.

It finds (or, with ``--install``, installs) NVIDIA's ``perf_analyzer``, writes
an ``--input-data`` JSON of real requests for the ``katz`` ensemble (prompts,
seeds, a control image, LoRA names and scales), runs a concurrency or
request-rate sweep and prints throughput and p50/p90/p99 latency per point.

Where perf_analyzer comes from, first match wins:

1. ``$KATZ_PERF_ANALYZER`` or ``perf_analyzer`` on ``PATH`` (the NGC
   ``tritonserver:<yy.mm>-py3-sdk`` image has it);
2. ``<venv>/perf_analyzer/bin/perf_analyzer`` (``$KATZ_PERF_TOOLS`` instead of
   ``<venv>/perf_analyzer`` where set), put there by ``katz perf --install``
   (or ``make perf-tools``): the binary shipped inside the ``tritonclient`` 2.44
   wheel (the last wheel that carries it; it is unpacked there, not installed
   over the venv's newer tritonclient), plus what it links against — Debian's
   ``libb64-0d`` (apt-get, as root) and ``libcudart.so.12`` from the
   ``nvidia-cuda-runtime-cu12`` wheel (no GPU or driver needed).
"""

from __future__ import annotations

import argparse
import base64
import csv
import ctypes
import io
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

PA_WHEEL_VERSION = "2.44.0"
TOOLS_DIR = Path(os.environ.get("KATZ_PERF_TOOLS") or Path(sys.prefix) / "perf_analyzer")
CUDA_LIB = Path("nvidia") / "cuda_runtime" / "lib"

INSTALL_HINT = (
    "perf_analyzer was not found. Install it with `katz perf --install` (or `make perf-tools`): it unpacks the "
    f"binary from the tritonclient=={PA_WHEEL_VERSION} wheel into {TOOLS_DIR}, installs Debian's libb64-0d "
    "(apt-get; needs root, else run `sudo apt-get install libb64-0d`) and the nvidia-cuda-runtime-cu12 wheel. "
    "Or put perf_analyzer on PATH (NGC image nvcr.io/nvidia/tritonserver:<yy.mm>-py3-sdk), "
    "or point $KATZ_PERF_ANALYZER at it."
)


class PerfError(RuntimeError):
    pass


# ----------------------------------------------------------------- find/install
@dataclass
class PerfAnalyzer:
    binary: Path
    env: dict[str, str]

    def version(self) -> str:
        proc = subprocess.run([str(self.binary), "--version"], env=self.env, capture_output=True, text=True,
                              timeout=60)
        if proc.returncode != 0:
            raise PerfError(f"{self.binary} does not run: {(proc.stderr or proc.stdout).strip()[-500:]}")
        text = (proc.stdout + proc.stderr).strip()
        return text.splitlines()[-1] if text else "perf_analyzer"


def _env_with_libs(lib_dirs: list[Path]) -> dict[str, str]:
    env = dict(os.environ)
    dirs = [str(d) for d in lib_dirs if d.is_dir()]
    if env.get("LD_LIBRARY_PATH"):
        dirs.append(env["LD_LIBRARY_PATH"])
    if dirs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(dirs)
    return env


def find_perf_analyzer(tools_dir: Path = TOOLS_DIR) -> PerfAnalyzer | None:
    explicit = os.environ.get("KATZ_PERF_ANALYZER")
    if explicit:
        if not Path(explicit).is_file():
            raise PerfError(f"$KATZ_PERF_ANALYZER={explicit} is not a file")
        return PerfAnalyzer(Path(explicit), _env_with_libs([tools_dir / "cuda" / CUDA_LIB]))
    on_path = shutil.which("perf_analyzer")
    if on_path:
        return PerfAnalyzer(Path(on_path), dict(os.environ))
    local = tools_dir / "bin" / "perf_analyzer"
    if local.is_file():
        return PerfAnalyzer(local, _env_with_libs([tools_dir / "cuda" / CUDA_LIB]))
    return None


def _have_libb64() -> bool:
    try:
        ctypes.CDLL("libb64.so.0d")
        return True
    except OSError:
        return False


def _run(cmd: list[str], what: str, env: dict | None = None) -> None:
    print(f"katz perf: {what}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PerfError(f"{what} failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}")


def install_perf_analyzer(tools_dir: Path = TOOLS_DIR) -> PerfAnalyzer:
    """Put a runnable perf_analyzer into ``tools_dir`` (idempotent)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        raise PerfError(f"no perf_analyzer wheel for {platform.system()} {platform.machine()}")
    # 1. libb64 (a system library; Debian/Ubuntu package libb64-0d)
    if not _have_libb64():
        apt = shutil.which("apt-get")
        if apt is None or os.geteuid() != 0:
            raise PerfError("perf_analyzer needs libb64.so.0d: run `sudo apt-get install libb64-0d`, "
                            "then `katz perf --install` again")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        _run([apt, "update", "-qq"], "apt-get update", env)
        _run([apt, "install", "-y", "-qq", "--no-install-recommends", "libb64-0d"], "apt-get install", env)
    # 2. the binary, from the tritonclient wheel
    binary = tools_dir / "bin" / "perf_analyzer"
    if not binary.is_file():
        plat = "manylinux1_x86_64" if platform.machine() == "x86_64" else "manylinux2014_aarch64"
        with tempfile.TemporaryDirectory() as tmp:
            _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                  "--platform", plat, "-d", tmp, f"tritonclient=={PA_WHEEL_VERSION}"], "download perf_analyzer")
            wheel = next(Path(tmp).glob("tritonclient-*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                member = next(n for n in zf.namelist() if n.endswith("/bin/perf_analyzer"))
                binary.parent.mkdir(parents=True, exist_ok=True)
                partial = binary.with_suffix(".part")
                partial.write_bytes(zf.read(member))
                partial.chmod(0o755)
                partial.rename(binary)
    # 3. libcudart.so.12 (dlopen'ed at start even without a GPU)
    if not (tools_dir / "cuda" / CUDA_LIB / "libcudart.so.12").is_file():
        _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target",
              str(tools_dir / "cuda"), "nvidia-cuda-runtime-cu12"], "install libcudart")
    pa = PerfAnalyzer(binary, _env_with_libs([tools_dir / "cuda" / CUDA_LIB]))
    print(f"katz perf: {pa.version()} at {binary}", file=sys.stderr)
    return pa


# ------------------------------------------------------------------ input data
PROMPTS = [
    "a photo of a red house on a mountain",
    "a watercolor painting of a fox in the snow",
    "a futuristic city at night, neon lights, rain",
    "a bowl of ramen on a wooden table, studio lighting",
    "portrait of an old sailor, dramatic light",
    "a castle on a cliff above the sea at sunset",
    "an astronaut riding a horse on the moon",
    "a cozy reading nook with plants and warm light",
]


def control_image_png(width: int = 512, height: int = 512) -> bytes:
    """Concentric rings, as a Canny edge map of a simple scene would look."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[:height, :width]
    rings = ((np.hypot(x - width / 2, y - height / 2) // max(width // 24, 2)) % 2 * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.stack([rings] * 3, -1)).save(buf, "PNG")
    return buf.getvalue()


def _bytes_b64(items: list[bytes]) -> dict:
    """A BYTES tensor for perf_analyzer's JSON: Triton's serialization (4-byte little-endian
    length, then the bytes, per element), base64-encoded."""
    raw = b"".join(struct.pack("<I", len(b)) + b for b in items)
    return {"b64": base64.b64encode(raw).decode()}


def input_data(
    count: int = 8,
    steps: int | None = None,
    width: int | None = None,
    height: int | None = None,
    controlnets: list[str] = (),
    control_image: bytes | None = None,
    loras: list[tuple[str, float]] = (),
    seed: int = 0,
) -> dict:
    """perf_analyzer ``--input-data`` JSON: ``count`` requests (cycled), each with its prompt and seed;
    all carry the same inputs, so every request of the sweep is one full workflow."""
    entries = []
    for i in range(count):
        e: dict = {
            "prompt": {"content": [PROMPTS[i % len(PROMPTS)]], "shape": [1]},
            "seed": {"content": [seed + i], "shape": [1]},
        }
        for name, value in (("steps", steps), ("width", width), ("height", height)):
            if value is not None:
                e[name] = {"content": [int(value)], "shape": [1]}
        if controlnets:
            image = control_image or control_image_png(width or 512, height or 512)
            e["controlnets"] = {"content": list(controlnets), "shape": [len(controlnets)]}
            e["control_images"] = {**_bytes_b64([image] * len(controlnets)), "shape": [len(controlnets)]}
        if loras:
            e["loras"] = {"content": [n for n, _ in loras], "shape": [len(loras)]}
            e["lora_scales"] = {"content": [float(s) for _, s in loras], "shape": [len(loras)]}
        entries.append(e)
    return {"data": entries}


# ----------------------------------------------------------------------- sweep
@dataclass
class Point:
    load: float  # concurrency or request rate
    throughput: float  # inferences / s
    p50_ms: float
    p90_ms: float
    p99_ms: float
    avg_ms: float


AVG_PARTS = ("Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input",
             "Server Compute Infer", "Server Compute Output", "Client Recv")


def _avg_us(row: dict) -> float:
    """The mean latency: its own column where there is one, else the sum of the mean components."""
    if row.get("Avg latency"):
        return float(row["Avg latency"])
    return sum(float(row.get(k) or 0) for k in AVG_PARTS)


def parse_report(path: Path) -> list[Point]:
    """perf_analyzer's ``-f`` CSV (latencies in microseconds)."""
    points = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            load = row.get("Concurrency") or row.get("Request Rate")
            if load is None:
                continue
            points.append(Point(
                load=float(load),
                throughput=float(row["Inferences/Second"]),
                p50_ms=float(row["p50 latency"]) / 1000,
                p90_ms=float(row["p90 latency"]) / 1000,
                p99_ms=float(row["p99 latency"]) / 1000,
                avg_ms=_avg_us(row) / 1000,
            ))
    return sorted(points, key=lambda p: p.load)


def command(pa: PerfAnalyzer, args, data_file: Path, report: Path) -> list[str]:
    cmd = [
        str(pa.binary), "-m", args.model, "-u", args.url, "-i", args.protocol,
        "--input-data", str(data_file), "-f", str(report),
        "--max-trials", str(args.max_trials),
        "--stability-percentage", str(args.stability),
    ]
    if args.request_rate:
        cmd += ["--request-rate-range", args.request_rate, "--request-distribution", args.distribution]
    else:
        cmd += ["--concurrency-range", args.concurrency]
    if args.measurement_requests:
        cmd += ["--measurement-mode", "count_windows", "--measurement-request-count", str(args.measurement_requests)]
    else:
        cmd += ["--measurement-interval", str(args.measurement_ms)]
    if args.model == "katz_stream":
        cmd.append("--streaming")
    return cmd + list(args.extra or [])


def format_table(points: list[Point], kind: str) -> str:
    head = f"{kind:>12} {'infer/s':>9} {'p50 ms':>10} {'p90 ms':>10} {'p99 ms':>10} {'avg ms':>10}"
    lines = [head, "-" * len(head)]
    for p in points:
        lines.append(f"{p.load:>12g} {p.throughput:>9.3f} {p.p50_ms:>10.1f} {p.p90_ms:>10.1f} "
                     f"{p.p99_ms:>10.1f} {p.avg_ms:>10.1f}")
    return "\n".join(lines)


def _parse_lora(spec: str) -> tuple[str, float]:
    name, sep, scale = spec.rpartition(":")
    if not sep:
        return spec, 1.0
    try:
        return name, float(scale)
    except ValueError:
        raise SystemExit(f"katz perf: --lora expects NAME[:SCALE], got {spec!r}") from None


def cmd_perf(args) -> int:
    try:
        if args.install:
            pa = install_perf_analyzer()
            if args.url is None:
                return 0
        else:
            pa = find_perf_analyzer()
    except PerfError as exc:
        print(f"katz perf: {exc}", file=sys.stderr)
        return 2
    if pa is None:
        print(f"katz perf: {INSTALL_HINT}", file=sys.stderr)
        return 2
    if args.url is None:
        print("katz perf: --url HOST:PORT is required (or only --install)", file=sys.stderr)
        return 2
    if args.model == "katz_stream" and args.protocol != "grpc":
        print("katz perf: katz_stream streams over gRPC only: add --protocol grpc", file=sys.stderr)
        return 2
    out = Path(args.out_dir or tempfile.mkdtemp(prefix="katz-perf-"))
    out.mkdir(parents=True, exist_ok=True)
    control = args.control_image.read_bytes() if args.control_image else None
    data = input_data(args.prompts, args.steps, args.width, args.height, args.controlnet, control,
                      [_parse_lora(s) for s in args.lora], args.seed)
    data_file, report = out / "input_data.json", out / "perf.csv"
    data_file.write_text(json.dumps(data))
    cmd = command(pa, args, data_file, report)
    print(f"katz perf: {' '.join(cmd)}", file=sys.stderr, flush=True)
    log = out / "perf_analyzer.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=pa.env, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout)
    text = log.read_text()
    if proc.returncode != 0 or not report.exists():
        print(f"katz perf: perf_analyzer failed ({proc.returncode}); its output ({log}):\n{text[-3000:]}",
              file=sys.stderr)
        return 1
    points = parse_report(report)
    kind = "req/s" if args.request_rate else "concurrency"
    print(f"perf_analyzer against {args.model} at {args.url} ({args.protocol}); report {report}")
    print(format_table(points, kind))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("perf", help="perf_analyzer sweep against a live server (throughput, p50/p90/p99)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="HOST:PORT of the server's HTTP or gRPC endpoint")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--install", action="store_true", help=f"install perf_analyzer into {TOOLS_DIR} first")
    p.add_argument("--model", default="katz", choices=("katz", "katz_stream"))
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", default="1:4:1", metavar="START:END:STEP",
                      help="concurrency sweep (default 1:4:1)")
    load.add_argument("--request-rate", metavar="START:END:STEP", help="request-rate sweep (req/s) instead")
    p.add_argument("--distribution", choices=("poisson", "constant"), default="poisson",
                   help="request-rate arrivals")
    p.add_argument("--measurement-ms", type=int, default=20000, help="time window per measurement")
    p.add_argument("--measurement-requests", type=int, default=0,
                   help="count windows of this many requests instead of time windows")
    p.add_argument("--max-trials", type=int, default=10)
    p.add_argument("--stability", type=float, default=10.0, help="allowed variation between windows, %%")
    p.add_argument("--prompts", type=int, default=8, help="distinct requests (prompts/seeds), cycled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--controlnet", action="append", default=[], help="ControlNet name (repeatable)")
    p.add_argument("--control-image", type=Path, help="PNG/JPEG for the ControlNets (default: generated rings)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:SCALE]")
    p.add_argument("--out-dir", type=Path, help="where input_data.json, perf.csv and the log go")
    p.add_argument("--timeout", type=float, default=3600, help="seconds for the whole sweep")
    p.add_argument("extra", nargs="*", help="after --: more perf_analyzer options")
    p.set_defaults(func=cmd_perf)

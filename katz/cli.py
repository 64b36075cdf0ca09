"""The ``katz`` command: ``serve``, ``render``, ``convert`` and ``generate``."""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

from katz.deployment import CONTROLNET_MODES, ENGINES, LOOPS, Deployment, DeploymentError
from katz.request import Limits

DEFAULT_GUIDANCE = {"sdxl": 5.0, "sd15": 7.5, "flux": 3.5}  # diffusers' pipeline defaults
# Deployment fields whose flag is not --<field with dashes>
FLAGS = {"latent_overlap": "--tile-overlap", "controlnet_timeout_s": "--controlnet-timeout", "fp8": "--experimental-fp8",
         "lora_host_cache_bytes": "--lora-host-cache-mb", "lora_device_cache_bytes": "--lora-device-cache-mb",
         "controlnet_cache_bytes": "--controlnet-cache-mb", "feature_cache_bytes": "--feature-cache-mb",
         "controlnet_resident": "--resident-controlnets", "lora_load_delay_s": "--lora-load-delay"}


def _deployment_default(name: str):
    return Deployment.default(name)


def _mb_or_auto(value: str) -> int | str:
    """A size in MiB (an int >= 0) or ``auto``."""
    if value == "auto":
        return value
    try:
        mb = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of MiB or 'auto', not {value!r}") from None
    if mb < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 MiB, not {mb}")
    return mb


def flag_of(field: str) -> str:
    """The ``katz serve`` flag that sets the deployment setting ``field``."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


# ------------------------------------------------------------------ deployment
def _add_model_args(p: argparse.ArgumentParser) -> None:
    from katz.models.folder import add_model_arguments

    add_model_arguments(p, "register a ControlNet: a diffusers folder or a single SD 1.5 / SDXL .safetensors file "
                           "(repeatable)")
    p.add_argument("--lora-dir", type=Path, help="folder of .safetensors LoRAs (default: <model>/loras)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when a GPU is visible")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="default: float16 on cuda (FLUX models: bfloat16), float32 on cpu")
    p.add_argument("--gpus", default="0", help="GPU ids for the network models, comma-separated (cuda only)")
    D = _deployment_default
    p.add_argument("--pipeline-instances", type=int, default=2, help="concurrent denoising loops")
    p.add_argument("--stream-instances", type=int, default=1,
                   help="concurrent denoising loops of katz_stream (gRPC streaming with progress)")
    p.add_argument("--max-size", type=int, default=2048, help="largest width/height accepted")
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--default-steps", type=int, default=30)
    p.add_argument("--torch-threads", type=int, default=D("torch_threads"), help="torch threads per model process (0: torch's default)")
    p.add_argument("--unet-gpus", default=None,
                   help="latent parallelism: one UNet shard per listed GPU (e.g. 0,1 or 0,1,2,3); as many shards "
                        "as CFG halves take one half each, more cut the latent into overlapping bands; "
                        "default: one UNet on --gpus")
    p.add_argument("--unet-shards", type=int, default=None,
                   help="number of UNet shards (CPU hosts, tests); on GPUs use --unet-gpus")
    p.add_argument("--tile-overlap", type=int, default=D("latent_overlap"),
                   help="latent parallelism with bands: least overlap of neighbouring bands in latent pixels "
                        "(x8 image pixels; rounded up to the UNet's downsampling factor)")
    p.add_argument("--loop", choices=LOOPS, default=D("loop"),
                   help="where the denoising loop runs: unet (in the UNet model's process, one BLS call per "
                        "request: the GPU is not idle between steps), pipeline (katz_pipeline calls the UNet over "
                        "BLS every step); auto: unet with one UNet shard, pipeline with latent parallelism. "
                        "katz_stream's requests run where the loop runs and report every step")
    p.add_argument("--controlnet-mode", choices=CONTROLNET_MODES, default=None,
                   help=f"inline: ControlNets run serially in the loop (baseline); service: on their own instances, "
                        "beside the UNet's down path; local: in each UNet instance's process, on its GPU and CUDA "
                        "stream (no controlnet model; --controlnet-gpus/--controlnet-instances do not apply); "
                        f"remote: on another server (--controlnet-url). Default: {D('controlnet_mode')} "
                        "(FLUX models: inline, measured faster than local on one GPU; local runs the ControlNet beside "
                        "the transformer's blocks, service streams each block's residual back)")
    p.add_argument("--controlnet-url", default="", help="remote mode: HOST:PORT of the ControlNet server (gRPC)")
    p.add_argument("--controlnet-timeout", type=float, default=D("controlnet_timeout_s"), help="remote mode: seconds per call")
    p.add_argument("--controlnet-gpus", default=None, help="GPU ids of the ControlNet instances (default: --gpus)")
    p.add_argument("--controlnet-instances", type=int, default=1)
    p.add_argument("--resident-controlnets", default=None,
                   help="comma-separated ControlNets kept loaded (default: all); others load on demand into an LRU")
    p.add_argument("--controlnet-cache-mb", type=int, default=D("controlnet_cache_bytes") >> 20)
    p.add_argument("--feature-cache-mb", type=int, default=D("feature_cache_bytes") >> 20, help="control-image feature cache")
    p.add_argument("--lora-k", type=int, default=Limits.default_lora_k,
                   help="BAL bound: LoRAs are patched in by this step at the latest (0: before the first step)")
    p.add_argument("--lora-host-cache-mb", type=_mb_or_auto, default="auto",
                   help="LoRA file bytes kept in host memory (the host tier; popular LoRAs first); default auto: "
                        "a quarter of the memory free at start, at most 16 GiB")
    p.add_argument("--lora-device-cache-mb", type=int, default=D("lora_device_cache_bytes") >> 20, help="LoRAs kept on the device")
    p.add_argument("--no-lora-readahead", dest="lora_readahead", action="store_false",
                   help="do not read arriving requests' LoRA files into the page cache ahead of the UNet")
    p.add_argument("--no-lora-hints", dest="lora_hints", action="store_false",
                   help="do not start the UNets' LoRA loads when a request arrives (only at its first step)")
    p.add_argument("--max-queue-size", type=int, default=32,
                   help="requests that may wait at each step of the ensemble; more fail at once with UNAVAILABLE "
                        "(HTTP 503 'Exceeds maximum queue size'); 0: unbounded")
    p.add_argument("--queue-timeout", type=float, default=60.0,
                   help="seconds a request may wait in a step's queue before it fails with UNAVAILABLE "
                        "('Request timeout expired'); 0: no limit")
    p.add_argument("--max-prompt-bytes", type=int, default=4096, help="longest prompt / negative prompt (UTF-8 bytes)")
    p.add_argument("--max-image-bytes", type=int, default=32 << 20, help="largest control image file (bytes)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="largest control image (width x height)")
    p.add_argument("--lora-load-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # simulated slow storage
    p.add_argument("--engine", choices=ENGINES, default=D("engine"),
                   help="run the UNet, ControlNets and VAE decoder with PyTorch (default) or TensorRT engines")
    p.add_argument("--engine-dir", type=Path, help="--engine tensorrt: the folder `katz build-engines --out` wrote")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="torch engines on GPUs: run every step eagerly (default: replay CUDA graphs captured at load)")
    p.add_argument("--compile", action="store_true",
                   help="torch engines on GPUs: torch.compile the UNet and ControlNets (FLUX: their blocks) at load, before graph capture "
                        "(minutes on the first start; kernels cached in --compile-cache)")
    p.add_argument("--no-compile-vae", dest="compile_vae", action="store_false",
                   help="torch engines on GPUs: run the VAE decoder eagerly instead of compiling it at load "
                        "(SDXL 1024² on an H200: 22 s at load, decode 86 -> 36 ms)")
    p.add_argument("--compile-cache", type=Path, default=None,
                   help="folder for compiled kernels kept between starts (default: torch's)")
    p.add_argument("--channels-last", action="store_true",
                   help="torch engines on GPUs: UNet and ControlNet weights in channels-last layout")
    p.add_argument("--graph-sizes", default=None,
                   help="image sizes HxW captured as CUDA graphs at load, comma-separated (default: the model's "
                        "default size); other sizes run eagerly")
    experimental = p.add_argument_group(
        "experimental", "for measurement; not faster than the defaults where measured (docs/serving.md, Experimental)")
    experimental.add_argument(
        "--experimental-fp8", dest="fp8", action="store_true",
        help="torch engines on GPUs of compute capability 8.9+ (Ada, Hopper): the UNet's (FLUX: transformer's) and ControlNets' transformer "
             "linears multiply in float8 e4m3 with per-tensor scales; measured no faster than float16 with --compile "
             "on an H200, image PSNR ~31 dB to float16 (bench/RESULTS.md, sixth session)")


def build_deployment(args):
    """Map the flags onto a :class:`Deployment` and check it, with the model folder, ControlNets, LoRA
    store and GPUs, before any server starts (``SystemExit`` naming the flag)."""
    import torch

    from katz.models.folder import open_model
    from katz.request import Limits

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("float16" if device == "cuda" else "float32")
    # ModelFolderError listing every problem of the model, its ControlNets and their weight files
    folder = open_model(args.model_dir, args.checkpoint, args.controlnet, args.variant, dtype, args.preset)
    if folder.family == "flux" and args.dtype is None and device.startswith("cuda"):
        # FLUX.1's activations overflow float16 (diffusers runs it in bfloat16); the variant files follow the dtype
        dtype = "bfloat16"
        folder = open_model(args.model_dir, args.checkpoint, args.controlnet, args.variant, dtype, args.preset)
    folder.check_weights()
    if args.controlnet_mode is None:
        # FLUX on one GPU: a step is compute-bound, and the ControlNet beside it (local) measured slower than
        # before it (inline) on an H100 (bench/RESULTS.md, eleventh session)
        args.controlnet_mode = "inline" if folder.family == "flux" else _deployment_default("controlnet_mode")
    # a checkpoint's config folder may be a preset's, whose LoRAs are not the checkpoint's
    lora_dir = args.lora_dir or (None if folder.checkpoint else folder.path / "loras")
    if getattr(args, "only", None) == "controlnet" and args.controlnet_mode == "local":
        raise SystemExit("katz: --only controlnet serves the controlnet model, which --controlnet-mode local has not")
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise SystemExit(f"katz: --lora-dir {args.lora_dir} is not a folder")
    unet_shards = 1 if args.unet_shards is None else args.unet_shards
    if args.unet_gpus:
        wanted = [int(g) for g in args.unet_gpus.split(",") if g.strip()]
        unet_shards = len(wanted)
        if device == "cuda":
            for g in wanted + [int(g) for g in args.gpus.split(",") if g.strip()]:
                if g >= torch.cuda.device_count():
                    raise SystemExit(f"katz: GPU {g} is not on this host ({torch.cuda.device_count()} visible); "
                                     "fix --unet-gpus / --gpus")
    size = folder.default_size
    if args.max_size < folder.min_image_size:  # every request would be refused
        raise SystemExit(f"katz: --max-size {args.max_size} is below {folder.min_image_size}, the smallest size "
                         "this model folder's networks run")
    limits = Limits(
        max_steps=args.max_steps,
        max_width=args.max_size,
        max_height=args.max_size,
        default_steps=min(args.default_steps, args.max_steps),
        default_guidance=DEFAULT_GUIDANCE[folder.family],
        default_width=min(size, args.max_size),
        default_height=min(size, args.max_size),
        default_lora_k=args.lora_k,
        max_prompt_bytes=args.max_prompt_bytes,
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
    )
    deployment = Deployment(
        model_dir=folder.path,
        checkpoint=folder.checkpoint,
        variant=args.variant or "",
        controlnets=folder.controlnets,
        lora_dir=Path(lora_dir).resolve() if lora_dir is not None and Path(lora_dir).is_dir() else None,
        limits=limits,
        device=device,
        dtype=dtype,
        torch_threads=args.torch_threads,
        lora_host_cache_bytes=-1 if args.lora_host_cache_mb == "auto" else args.lora_host_cache_mb << 20,
        lora_device_cache_bytes=args.lora_device_cache_mb << 20,
        lora_load_delay_s=args.lora_load_delay,
        lora_readahead=args.lora_readahead,
        # one channel per rendered repository: this server's preprocessing -> its UNets (katz.lora.hints)
        lora_hints=secrets.token_hex(8) if args.lora_hints else "",
        unet_shards=unet_shards,
        latent_overlap=args.tile_overlap,
        loop=args.loop,
        controlnet_mode=args.controlnet_mode,
        controlnet_url=args.controlnet_url,
        controlnet_timeout_s=args.controlnet_timeout,
        controlnet_resident=(
            None if args.resident_controlnets is None
            else [n for n in args.resident_controlnets.split(",") if n]
        ),
        controlnet_cache_bytes=args.controlnet_cache_mb << 20,
        feature_cache_bytes=args.feature_cache_mb << 20,
        engine=args.engine,
        engine_dir=args.engine_dir.resolve() if args.engine_dir else None,
        cuda_graphs=args.cuda_graphs,
        compile=args.compile,
        compile_vae=args.compile_vae,
        channels_last=args.channels_last,
        fp8=args.fp8,
        compile_cache=args.compile_cache.resolve() if args.compile_cache else None,
        graph_sizes=parse_sizes(args.graph_sizes, 8) if args.graph_sizes else None,
    )
    try:
        deployment.validate()
    except DeploymentError as exc:
        raise SystemExit(f"katz: {flag_of(exc.field)} {exc.reason}") from None
    if args.fp8:  # the one check that needs the GPUs themselves
        from katz.engines.torch.experimental.fp8 import fp8_capable

        gpus = {int(g) for spec in (args.gpus, args.unet_gpus or "", getattr(args, "controlnet_gpus", None) or "")
                for g in spec.split(",") if g.strip()} or {0}
        if device != "cuda" or not all(fp8_capable(f"cuda:{g}") for g in gpus):
            raise SystemExit("katz: --experimental-fp8 needs GPUs with float8 tensor cores (CUDA compute capability "
                             "8.9+: Ada, Hopper or newer)")
    return deployment


def parse_sizes(spec: str, multiple: int) -> list[tuple[int, int]]:
    """``"1024x1024,768x1344"`` -> ``[(1024, 1024), (768, 1344)]`` (height x width, pixels)."""
    sizes = []
    for item in spec.split(","):
        h, sep, w = item.strip().lower().partition("x")
        if not sep or not h.isdigit() or not w.isdigit():
            raise SystemExit(f"katz: --graph-sizes expects HxW[,HxW...], got {item!r}")
        if int(h) % multiple or int(w) % multiple:
            raise SystemExit(f"katz: --graph-sizes {item}: height and width must be multiples of {multiple}")
        sizes.append((int(h), int(w)))
    return sizes


def _placement(args, deployment):
    from katz.deploy.repository import Placement

    def ids(spec):
        return [int(g) for g in spec.split(",") if g.strip()] if deployment.device == "cuda" else []

    gpus = ids(args.gpus)
    placement_gpus = {m: gpus for m in ("text_encoder", "katz_pipeline", "katz_stream", "unet", "vae_decoder")}
    placement_gpus["controlnet"] = ids(args.controlnet_gpus) if args.controlnet_gpus else gpus
    if args.unet_gpus:  # one shard per GPU: unet on the first, unet_1 on the second, ...
        from katz.parallel.shards import unet_model_names

        for name, gpu in zip(unet_model_names(deployment.unet_shards), ids(args.unet_gpus)):
            placement_gpus[name] = [gpu]
    return Placement(
        device=deployment.device,
        counts={"katz_pipeline": args.pipeline_instances, "controlnet": args.controlnet_instances,
                "katz_stream": args.stream_instances},
        gpus=placement_gpus,
        max_queue_size=args.max_queue_size,
        queue_timeout_s=args.queue_timeout,
    )


def _deployment_or_exit(args):
    """:func:`build_deployment`, with a model that cannot be served reported as ``katz: ...`` (exit 2)."""
    from katz.models.folder import ModelFolderError
    from katz.models.presets import PresetCacheError

    try:
        return build_deployment(args)
    except (ModelFolderError, PresetCacheError) as exc:
        print(f"katz: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_render(args) -> int:
    from katz.deploy.repository import render_repository

    deployment = _deployment_or_exit(args)
    out = render_repository(deployment, args.out, _placement(args, deployment))
    print(out)
    return 0


def cmd_serve(args) -> int:
    from katz.deploy import server
    from katz.deploy.repository import MODELS, render_repository
    deployment = _deployment_or_exit(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="katz-serve-"))
    placement = _placement(args, deployment)
    models = ("controlnet",) if args.only == "controlnet" else MODELS
    repo = render_repository(deployment, workdir / "model_repository", placement, models)
    install = server.TritonInstall.find()
    backends = server.prepare_backends(install, workdir / "backends")
    opts = server.ServerOptions(
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        exit_timeout=args.exit_timeout,
        gpus=tuple(sorted({g for gs in placement.gpus.values() for g in gs})),
        watchdog=not args.no_watchdog,
        cuda_pool_bytes=server.cuda_pool_bytes(deployment.controlnet_mode),
    )
    cmd = server.command(install, repo, backends, opts)
    print(
        f"katz: serving {deployment.checkpoint or deployment.model_dir} ({deployment.folder.family}, {deployment.device}, {deployment.dtype}); "
        f"HTTP {args.host}:{args.http_port}, gRPC {args.host}:{args.grpc_port}",
        file=sys.stderr,
        flush=True,
    )
    return server.run_foreground(cmd, server.server_env(install), opts)


def cmd_convert(args) -> int:
    import torch

    from katz.models.checkpoint import CheckpointError, convert_checkpoint

    try:
        out = convert_checkpoint(args.file, args.out, getattr(torch, args.dtype) if args.dtype else None,
                                 log=lambda m: print(f"converting {m}", file=sys.stderr, flush=True))
    except CheckpointError as exc:
        print(f"katz: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


# -------------------------------------------------------------------- generate
def _parse_lora(spec: str) -> tuple[str, float | None]:
    name, sep, scale = spec.rpartition(":")
    if not sep:
        return spec, None
    try:
        return name, float(scale)
    except ValueError:
        raise SystemExit(f"katz: --lora expects NAME[:SCALE], got {spec!r}") from None


def build_generation(args):
    from katz.client import Generation

    if len(args.control_image) != len(args.controlnet):
        raise SystemExit("katz: give one --control-image per --controlnet")
    if args.controlnet_scale and len(args.controlnet_scale) != len(args.controlnet):
        raise SystemExit("katz: give one --controlnet-scale per --controlnet, or none")
    loras = [_parse_lora(s) for s in args.lora]
    lora_scales = None
    if any(s is not None for _, s in loras):
        lora_scales = [1.0 if s is None else s for _, s in loras]
    return Generation(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        width=args.width,
        height=args.height,
        scheduler=args.scheduler,
        controlnets=list(args.controlnet),
        control_images=[Path(p).read_bytes() for p in args.control_image],
        controlnet_scales=args.controlnet_scale or None,
        loras=[n for n, _ in loras],
        lora_scales=lora_scales,
        lora_k=args.lora_k,
    )


class _Progress:
    """A one-line elapsed-time indicator on stderr while a request runs."""

    def __init__(self, label: str):
        self.label, self.done = label, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        start, frames, i = time.monotonic(), "|/-\\", 0
        while not self.done.wait(0.2):
            print(f"\r{frames[i % 4]} {self.label} {time.monotonic() - start:5.1f}s", end="", file=sys.stderr, flush=True)
            i += 1
        print(f"\r  {self.label} {time.monotonic() - start:5.1f}s", file=sys.stderr, flush=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def cmd_generate(args) -> int:
    from tritonclient.utils import InferenceServerException

    from katz.client import infer, make_client

    request = build_generation(args)
    client = make_client(args.url, args.protocol, args.timeout)
    try:
        if args.protocol == "grpc" and args.stream:  # per-step progress bar from katz_stream
            from katz.client.streaming import ProgressBar, stream_generate

            bar = ProgressBar(f"generating on {args.url} ")
            try:
                result = stream_generate(args.url, request, bar, args.timeout, client=client)
            finally:
                bar.close()
        else:
            with _Progress(f"generating on {args.url} ({args.protocol})"):
                result = infer(client, request, args.protocol, args.timeout)
    except KeyboardInterrupt:
        print("\nkatz: cancelled", file=sys.stderr)
        return 130
    except InferenceServerException as exc:
        print(f"katz: request failed: {exc.message() if hasattr(exc, 'message') else exc}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(result.png)
    h, w = result.image.shape[:2]
    lora = f", LoRAs in from step {result.lora_applied_step}" if result.lora_applied_step >= 0 else ""
    print(f"wrote {args.out} ({w}x{h}, seed {result.seed}{lora})")
    return 0


# ------------------------------------------------------------------------ main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="katz", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="render the model repository and run tritonserver in the foreground")
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--only", choices=("controlnet",),
                       help="serve only the ControlNet model: a ControlNet server for --controlnet-mode remote")
    serve.add_argument("--no-watchdog", action="store_true",
                       help="do not reload models whose instance process died (katz.deploy.watchdog)")
    serve.add_argument("--exit-timeout", type=int, default=30,
                       help="seconds to let in-flight requests finish on shutdown")
    serve.add_argument("--workdir", type=Path, help="where the repository is rendered (default: a temp folder)")
    serve.set_defaults(func=cmd_serve)

    render = sub.add_parser("render", help="only render the Triton model repository")
    _add_model_args(render)
    render.add_argument("--out", type=Path, required=True)
    render.set_defaults(func=cmd_render)

    convert = sub.add_parser("convert", help="write a single-file checkpoint or ControlNet as a diffusers folder "
                             "(faster starts than serving the file)")
    convert.add_argument("file", type=Path, metavar="FILE.safetensors",
                         help="SD 1.5 / SDXL checkpoint or ControlNet in the original (A1111 / ComfyUI) layout")
    convert.add_argument("--out", type=Path, required=True, help="new folder for the diffusers files")
    convert.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                         help="dtype of the written weights (default: as stored in the file)")
    convert.set_defaults(func=cmd_convert)

    gen = sub.add_parser("generate", help="request one image from a running server")
    gen.add_argument("--url", default="localhost:8000", help="HOST:PORT of the server")
    gen.add_argument("--protocol", choices=("http", "grpc"), default="http")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance-scale", type=float)
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--scheduler")
    gen.add_argument("--controlnet", action="append", default=[], help="ControlNet name (repeatable)")
    gen.add_argument("--control-image", action="append", default=[], type=Path, help="image for each --controlnet")
    gen.add_argument("--controlnet-scale", action="append", default=[], type=float)
    gen.add_argument("--lora", action="append", default=[], metavar="NAME[:SCALE]")
    gen.add_argument("--lora-k", type=int, help="patch LoRAs in by this step at the latest (0: synchronous)")
    gen.add_argument("--timeout", type=float, default=600.0, help="seconds")
    gen.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                     help="with --protocol grpc: stream per-step progress from katz_stream (default); "
                          "--no-stream sends one request to the katz ensemble")
    gen.add_argument("--out", type=Path, required=True, help="PNG file to write")
    gen.set_defaults(func=cmd_generate)
    from katz.tools import perf, traces  # `katz perf`, `katz trace`

    perf.add_parsers(sub)
    traces.add_parsers(sub)
    from katz.export.cli import add_parsers as add_export_parsers  # `katz export`, `katz build-engines`

    add_export_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

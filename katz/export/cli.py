"""``katz export`` and ``katz build-engines``.

    katz export --preset tiny-sdxl --out onnx/ --dtype float32 --check
    katz export --model-dir /models/sdxl --out /engines/onnx          # float16, for engines
    katz build-engines --onnx /engines/onnx --out /engines            # needs TensorRT and a GPU
    katz serve --model-dir /models/sdxl --device cuda --engine tensorrt --engine-dir /engines
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_range_args(p: argparse.ArgumentParser, defaults_from: str) -> None:
    g = p.add_argument_group("shape ranges (TensorRT optimization profiles)")
    g.add_argument("--min-size", type=int, help=f"smallest image side in pixels (default: {defaults_from})")
    g.add_argument("--opt-size", type=int, help=f"image side tuned for (default: {defaults_from})")
    g.add_argument("--max-size", type=int, help=f"largest image side in pixels (default: {defaults_from})")
    g.add_argument("--max-batch", type=int, help="largest UNet/ControlNet batch (default 2: one CFG pair)")


def add_parsers(sub) -> None:
    """Register ``export`` and ``build-engines`` on the ``katz`` command's subparsers."""
    from katz.models.folder import add_model_arguments

    exp = sub.add_parser("export", help="export the UNet, ControlNets, VAE decoder and text encoders to ONNX")
    add_model_arguments(exp, "also export this ControlNet: a diffusers folder or a single file (repeatable)")
    exp.add_argument("--out", type=Path, required=True, help="folder for the .onnx files and export.json")
    exp.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                     help="float16 for engines (default), float32 for the onnxruntime check")
    exp.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17; default 17)")
    exp.add_argument("--components", default="unet,controlnet,vae_decoder,text_encoder",
                     help="comma-separated subset of unet,controlnet,vae_decoder,text_encoder")
    exp.add_argument("--unet-split", action="store_true",
                     help="also export unet_down/unet_up (the UNet halves run around the ControlNets)")
    exp.add_argument("--check", action="store_true",
                     help="run every graph with onnxruntime and compare with PyTorch (relative L2)")
    exp.add_argument("--tolerance", type=float, help="--check bound (default 1e-3 for float32, 2e-2 for float16)")
    _add_range_args(exp, "from the model's native size")
    exp.set_defaults(func=cmd_export)

    build = sub.add_parser("build-engines", help="build TensorRT engines from a `katz export` folder")
    build.add_argument("--onnx", type=Path, required=True, help="the folder `katz export --out` wrote")
    build.add_argument("--out", type=Path, required=True, help="engine folder (Triton model repository layout)")
    build.add_argument("--precision", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                       help="auto: as exported (float16 exports build strongly typed fp16 engines); fp16/bf16 on a "
                            "float32 export use TensorRT 10's precision flags")
    build.add_argument("--no-refit", dest="refit", action="store_false",
                       help="UNet/ControlNet engines without REFIT (then they take no LoRAs)")
    build.add_argument("--strip-weights", action="store_true",
                       help="weight-stripped UNet/ControlNet plans, refitted from the ONNX weights at load")
    build.add_argument("--only", default="",
                       help="comma-separated graphs or Triton models to build (default: unet, controlnet, vae_decoder)")
    build.add_argument("--timing-cache", type=Path, help="TensorRT timing cache (default: <out>/timing.cache)")
    build.add_argument("--workspace-gb", type=float, help="builder workspace limit")
    build.add_argument("--optimization-level", type=int, choices=range(6), help="builder optimization level")
    build.add_argument("--hardware-compatible", action="store_true",
                       help="engines that run on any Ampere or newer GPU (slower)")
    build.add_argument("--reuse", action="store_true",
                       help="keep engines already in --out that were built from the same ONNX for this GPU, "
                            "TensorRT version and shape ranges (for container start-up)")
    _add_range_args(build, "the export's")
    build.set_defaults(func=cmd_build_engines)


def _folder(args):
    from katz.models.folder import ModelFolderError, open_model

    folder = open_model(args.model_dir, args.checkpoint, args.controlnet, args.variant, args.dtype, args.preset)
    if folder.family == "flux":  # the graphs exported are a UNet's, its ControlNets' and CLIP encoders'
        raise ModelFolderError(f"{folder.path} is a FLUX.1 model; katz export writes SD 1.5 / SDXL graphs only "
                               "(FLUX.1 is served by the PyTorch engines, --engine torch)")
    folder.check_weights()
    return folder


def _ranges(args, base):
    from katz.models.shapes import ShapeRanges

    if not any(getattr(args, k) for k in ("min_size", "opt_size", "max_size", "max_batch")):
        return None
    max_batch = args.max_batch or base.max_batch
    opt = args.opt_size or base.opt_size
    lo = args.min_size or min(base.min_size, opt)
    hi = args.max_size or max(base.max_size, opt)
    return ShapeRanges(min_batch=1, opt_batch=min(2, max_batch), max_batch=max_batch,
                       min_size=min(lo, opt), opt_size=opt, max_size=max(hi, opt))


def _fail(exc: BaseException) -> int:
    print(f"katz: {exc}", file=sys.stderr)
    return 2


def cmd_export(args) -> int:
    from katz.errors import ExportError
    from katz.export.manifest import export_folder
    from katz.export.onnx_check import ParityError, check_export
    from katz.models.folder import ModelFolderError
    from katz.models.shapes import ShapeRanges

    try:
        folder = _folder(args)
        ranges = _ranges(args, ShapeRanges.for_folder(folder)) or ShapeRanges.for_folder(folder)
        components = [c.strip() for c in args.components.split(",") if c.strip()]
        export_folder(folder, args.out, dtype=args.dtype, ranges=ranges, opset=args.opset, components=components,
                      unet_split=args.unet_split, log=lambda m: print(m, flush=True))
        if args.check:
            results = check_export(args.out, folder, args.tolerance, log=lambda m: print(m, flush=True))
            worst = max((r.rel_l2 for r in results), default=0.0)
            print(f"onnxruntime parity: {len(results)} outputs, worst relative L2 {worst:.2e}")
    except (ExportError, ModelFolderError, ValueError, ParityError) as exc:
        return _fail(exc)
    print(args.out)
    return 0


def cmd_build_engines(args) -> int:
    from katz.engines.tensorrt.manifest import EngineMismatch, TensorRTUnavailable
    from katz.errors import ExportError
    from katz.export.manifest import ExportManifest
    from katz.export.tensorrt_build import BuildOptions, build_engines

    try:
        export = ExportManifest.load(args.onnx)
        options = BuildOptions(
            precision=args.precision,
            refit=args.refit,
            strip_weights=args.strip_weights,
            ranges=_ranges(args, export.ranges),
            only=tuple(s.strip() for s in args.only.split(",") if s.strip()),
            timing_cache=args.timing_cache,
            workspace_gb=args.workspace_gb,
            optimization_level=args.optimization_level,
            hardware_compatible=args.hardware_compatible,
            reuse=args.reuse,
        )
        manifest = build_engines(args.onnx, args.out, options, log=lambda m: print(m, flush=True))
    except (ExportError, TensorRTUnavailable, EngineMismatch, ValueError) as exc:
        return _fail(exc)
    print(f"{args.out}: {len(manifest.engines)} engine(s) for {manifest.gpu_name}, TensorRT {manifest.tensorrt}")
    return 0

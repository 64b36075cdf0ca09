"""Building TensorRT engines from an export folder, and the engine folder's manifest.

``katz build-engines --onnx EXPORT --out ENGINES`` writes the engines in the Triton model
repository layout::

    ENGINES/engines.json                    # what was built, for which GPU / TensorRT / shapes
    ENGINES/timing.cache                    # TensorRT timing cache, reused by later builds
    ENGINES/unet/1/unet.plan                # loaded by the Python backend (it owns the refitter)
    ENGINES/unet/1/unet.refit.json          # LoRA refit map (katz.lora.refit_map)
    ENGINES/controlnet/1/<name>.plan        # one per ControlNet (+ <name>.refit.json)
    ENGINES/vae_decoder/1/model.plan        # a plain ``tensorrt_plan`` model

Written against the TensorRT 10 Python API (``tensorrt`` is imported only here and in
:mod:`katz.engines.tensorrt.engine`, lazily). Float16 exports are built as strongly typed
networks (precision follows the ONNX types; also what TensorRT 11 requires); float32 exports
can be built with the FP16 / BF16 builder flags where TensorRT still has them (10.x). The UNet
and ControlNet engines are weights-refittable (``BuilderFlag.REFIT``) unless ``--no-refit``, and
``--strip-weights`` writes weight-stripped plans (``STRIP_PLAN``) that are refitted from the
ONNX weights at load.

The compatibility checks (:func:`compatibility_problems`) are plain Python so they are tested
everywhere; building needs TensorRT and a GPU.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from katz.engines.tensorrt.manifest import (
    ENGINE_MANIFEST,
    SERVED_MODELS,
    TIMING_CACHE,
    EngineManifest,
    EngineRecord,
    RuntimeInfo,
    compatibility_problems,
    engine_path,
    import_tensorrt,
)
from katz.errors import ExportError
from katz.models.shapes import ShapeRanges


@dataclass
class BuildOptions:
    precision: str = "auto"  # auto | fp16 | bf16 | fp32
    refit: bool = True  # weights-refittable UNet / ControlNet engines
    strip_weights: bool = False  # weight-stripped plans for the refittable engines
    ranges: ShapeRanges | None = None  # None: the export's
    only: tuple[str, ...] = ()  # graph names or Triton model names; () = SERVED_MODELS
    timing_cache: Path | None = None  # None: <out>/timing.cache
    workspace_gb: float | None = None
    optimization_level: int | None = None  # builder optimization level 0..5 (TensorRT's default 3)
    hardware_compatible: bool = False  # Ampere+ hardware compatibility (slightly slower engines)
    reuse: bool = False  # keep engines already built from the same ONNX for this GPU/TensorRT/ranges


def _selected(manifest, only) -> list:
    """The graphs to build: ``only`` names graphs (``unet``, ``controlnet_canny``) or, where no graph
    has the name, Triton models (``controlnet``: every ControlNet); empty: all that serving loads."""
    if not only:
        return [g for g in manifest.graphs.values() if g.model in SERVED_MODELS]
    names = set(manifest.graphs)
    picked = [g for g in manifest.graphs.values() if g.name in only or (g.model in only and g.model not in names)]
    unknown = set(only) - {g.name for g in picked} - {g.model for g in picked}
    if unknown:
        raise ExportError(f"--only {', '.join(sorted(unknown))}: no such graph in the export "
                          f"(it has {', '.join(manifest.graphs)})")
    return picked


def _profiles(export_manifest, ranges: ShapeRanges | None) -> dict[str, dict]:
    """Per graph: input -> [min, opt, max] shapes, for ``ranges`` (None: the export's own)."""
    if ranges is None or ranges == export_manifest.ranges:
        return {name: g.profile for name, g in export_manifest.graphs.items()}
    from katz.export.manifest import graphs_for

    folder = export_manifest.folder()
    graphs = {g.name: g for g in graphs_for(folder, unet_split=True)}
    out = {}
    for name in export_manifest.graphs:
        if name in graphs:
            out[name] = {k: [list(s) for s in v] for k, v in graphs[name].profile(ranges).items()}
    return out


def build_engines(
    onnx_dir: Path,
    out_dir: Path,
    options: BuildOptions | None = None,
    log: Callable[[str], None] = print,
) -> EngineManifest:
    """Build the engines of export folder ``onnx_dir`` into ``out_dir`` (repository layout)."""
    from katz.export.manifest import ExportManifest

    options = options or BuildOptions()
    onnx_dir, out_dir = Path(onnx_dir).resolve(), Path(out_dir).resolve()
    export = ExportManifest.load(onnx_dir)
    trt = import_tensorrt()
    runtime = RuntimeInfo.current()
    ranges = options.ranges or export.ranges
    profiles = _profiles(export, options.ranges)
    graphs = _selected(export, options.only)

    old = None
    if options.reuse and (out_dir / ENGINE_MANIFEST).exists():
        try:
            old = EngineManifest.load(out_dir)
            if compatibility_problems(old, runtime) or old.ranges != ranges:
                old = None
        except Exception:
            old = None
    manifest = EngineManifest(
        tensorrt=runtime.tensorrt,
        gpu_name=runtime.gpu_name,
        compute_capability=runtime.compute_capability,
        hardware_compatible=options.hardware_compatible,
        ranges=ranges,
        export_dir=str(onnx_dir),
        model_dir=export.model_dir,
        family=export.family,
        created=time.time(),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path = Path(options.timing_cache) if options.timing_cache else out_dir / TIMING_CACHE
    logger = trt.Logger(trt.Logger.WARNING)
    for g in graphs:
        refit = bool(g.refit and options.refit and g.model != "vae_decoder")
        strip = bool(refit and options.strip_weights)
        precision, strongly_typed = _precision(trt, options.precision, g.dtype)
        rel = engine_path(g.name, g.model)
        record = EngineRecord(
            name=g.name, model=g.model, file=rel, onnx=str(onnx_dir / g.file), onnx_sha256=g.sha256,
            precision=precision, io_dtype=g.dtype, refit=refit, weight_stripped=strip,
            profile=profiles[g.name], inputs=g.inputs, outputs=g.outputs,
        )
        prev = old.engines.get(g.name) if old else None
        if prev and (out_dir / prev.file).exists() and _same_build(prev, record):
            manifest.engines[g.name] = prev
            log(f"kept {prev.file} (built from the same ONNX for this GPU and TensorRT {runtime.tensorrt})")
            continue
        start = time.perf_counter()
        plan = build_plan(
            trt, logger, onnx_dir / g.file, record.profile, precision=precision, strongly_typed=strongly_typed,
            refit=refit, strip=strip, timing_cache=cache_path, workspace_gb=options.workspace_gb,
            optimization_level=options.optimization_level, hardware_compatible=options.hardware_compatible,
        )
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(plan)
        tmp.replace(target)
        refit_map = g.extra.get("refit_map")
        if refit and refit_map:
            shutil.copyfile(onnx_dir / refit_map, target.parent / refit_map)
            record.refit_map = str(Path(rel).parent / refit_map)
        record.build_seconds = round(time.perf_counter() - start, 1)
        manifest.engines[g.name] = record
        log(f"built {rel} ({precision}{', refittable' if refit else ''}{', weight-stripped' if strip else ''}; "
            f"{record.build_seconds}s)")
        manifest.save(out_dir)  # progress survives an interrupted build
    manifest.save(out_dir)
    return manifest


def _same_build(prev: EngineRecord, new: EngineRecord) -> bool:
    keys = ("onnx_sha256", "precision", "io_dtype", "refit", "weight_stripped", "profile", "file")
    return all(getattr(prev, k) == getattr(new, k) for k in keys)


def _precision(trt, precision: str, onnx_dtype: str) -> tuple[str, bool]:
    """(precision label, strongly typed?) for a graph exported in ``onnx_dtype``."""
    if precision not in ("auto", "fp16", "bf16", "fp32"):
        raise ExportError(f"unknown precision {precision!r}; choose auto, fp16, bf16 or fp32")
    if onnx_dtype == "float16":
        if precision in ("bf16", "fp32"):
            raise ExportError(f"--precision {precision} needs a float32 export (this one is float16)")
        return "fp16", True
    if precision in ("auto", "fp32"):
        return "fp32", True
    flag = {"fp16": "FP16", "bf16": "BF16"}[precision]
    if not hasattr(trt.BuilderFlag, flag):
        raise ExportError(
            f"TensorRT {trt.__version__} has no weakly typed {precision} builds; export with --dtype float16 instead"
        )
    return precision, False


def build_plan(
    trt,
    logger,
    onnx_path: Path,
    profile: dict[str, list[list[int]]],
    precision: str = "fp16",
    strongly_typed: bool = True,
    refit: bool = False,
    strip: bool = False,
    timing_cache: Path | None = None,
    workspace_gb: float | None = None,
    optimization_level: int | None = None,
    hardware_compatible: bool = False,
) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine (TensorRT 10 API)."""
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not strongly_typed:
        config.set_flag(getattr(trt.BuilderFlag, {"fp16": "FP16", "bf16": "BF16"}[precision]))
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
        if strip:
            config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    if optimization_level is not None:
        config.builder_optimization_level = int(optimization_level)
    if hardware_compatible:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    opt = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if any(d < 0 for d in tensor.shape):
            if tensor.name not in profile:
                raise ExportError(f"{onnx_path.name}: no shape range for dynamic input {tensor.name}")
            lo, mid, hi = (tuple(int(d) for d in s) for s in profile[tensor.name])
            opt.set_shape(tensor.name, lo, mid, hi)
    config.add_optimization_profile(opt)
    cache = None
    if timing_cache is not None:
        data = Path(timing_cache).read_bytes() if Path(timing_cache).exists() else b""
        cache = config.create_timing_cache(data)
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path} (see the log above)")
    if cache is not None:
        updated = config.get_timing_cache()
        Path(timing_cache).write_bytes(bytes(updated.serialize()))
    return bytes(plan)

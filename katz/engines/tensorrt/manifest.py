"""The engine folder's manifest (``engines.json``) and whether its engines fit this host and deployment.

Written by ``katz build-engines`` (:mod:`katz.export.tensorrt_build`) and read at serving start by the
TensorRT engines and the Triton config rendering. The compatibility checks
(:func:`compatibility_problems`) are plain Python, so they are tested everywhere.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from katz.models.shapes import ShapeRanges

ENGINE_MANIFEST = "engines.json"
ENGINE_MANIFEST_VERSION = 1
TIMING_CACHE = "timing.cache"
# graphs that serving loads; text encoders only on request (--only)
SERVED_MODELS = ("unet", "controlnet", "vae_decoder")


class TensorRTUnavailable(ImportError):
    """TensorRT (the ``tensorrt`` Python package) cannot be imported."""


class EngineMismatch(RuntimeError):
    """An engine does not fit this host or deployment; the message says which and how to rebuild."""


def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415
    except Exception as exc:  # ImportError, or a stub package failing on import
        raise TensorRTUnavailable(
            f"TensorRT cannot be imported ({type(exc).__name__}: {exc}); it ships in NVIDIA's "
            "tritonserver / TensorRT containers, or install it with `pip install 'katz[tensorrt]'` on a CUDA host"
        ) from exc
    major = int(str(trt.__version__).split(".")[0])
    if major < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old; Katz needs TensorRT 10 or newer")
    return trt


# --------------------------------------------------------------------------- #
# Engine manifest
# --------------------------------------------------------------------------- #
def engine_path(name: str, model: str) -> str:
    """Where graph ``name`` of Triton model ``model`` goes in the repository layout."""
    if model == "vae_decoder":
        return "vae_decoder/1/model.plan"
    if model == "controlnet":
        return f"controlnet/1/{name[len('controlnet_'):]}.plan"
    return f"{model}/1/{name}.plan"


@dataclass
class EngineRecord:
    name: str
    model: str
    file: str  # relative to the engine folder
    onnx: str  # absolute path of the ONNX it was built from (weights for stripped plans)
    onnx_sha256: str
    precision: str  # fp16 | bf16 | fp32 | strongly-typed
    io_dtype: str  # float16 | float32: the engine's float inputs/outputs
    refit: bool
    weight_stripped: bool
    profile: dict[str, list[list[int]]]
    inputs: list[dict]
    outputs: list[dict]
    refit_map: str = ""  # relative to the engine folder
    build_seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "EngineRecord":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class EngineManifest:
    tensorrt: str
    gpu_name: str
    compute_capability: str  # "9.0"
    hardware_compatible: bool  # built for Ampere and newer (any GPU of compute capability >= 8.0)
    ranges: ShapeRanges
    export_dir: str
    model_dir: str
    family: str
    engines: dict[str, EngineRecord] = field(default_factory=dict)
    created: float = 0.0
    version: int = ENGINE_MANIFEST_VERSION

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "tensorrt": self.tensorrt,
            "gpu_name": self.gpu_name,
            "compute_capability": self.compute_capability,
            "hardware_compatible": self.hardware_compatible,
            "ranges": self.ranges.to_json(),
            "export_dir": self.export_dir,
            "model_dir": self.model_dir,
            "family": self.family,
            "created": self.created,
            "engines": {k: e.to_json() for k, e in self.engines.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> "EngineManifest":
        if data.get("version") != ENGINE_MANIFEST_VERSION:
            raise EngineMismatch(
                f"engine manifest version {data.get('version')} is not {ENGINE_MANIFEST_VERSION}; "
                "rebuild with `katz build-engines`"
            )
        return cls(
            tensorrt=data["tensorrt"],
            gpu_name=data["gpu_name"],
            compute_capability=data["compute_capability"],
            hardware_compatible=bool(data.get("hardware_compatible", False)),
            ranges=ShapeRanges.from_json(data["ranges"]),
            export_dir=data["export_dir"],
            model_dir=data["model_dir"],
            family=data["family"],
            engines={k: EngineRecord.from_json(v) for k, v in data["engines"].items()},
            created=float(data.get("created", 0.0)),
        )

    def save(self, out_dir: Path) -> Path:
        path = Path(out_dir) / ENGINE_MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, engine_dir: Path) -> "EngineManifest":
        path = Path(engine_dir) / ENGINE_MANIFEST
        if not path.exists():
            raise EngineMismatch(
                f"{engine_dir} holds no TensorRT engines ({ENGINE_MANIFEST} is missing); build them with "
                f"`katz export --model-dir MODEL --out ONNX && katz build-engines --onnx ONNX --out {engine_dir}`"
            )
        return cls.from_json(json.loads(path.read_text()))

    def rebuild_hint(self, engine_dir: Path | str, ranges: ShapeRanges | None = None) -> str:
        r = ranges or self.ranges
        return (
            f"rebuild with `katz build-engines --onnx {self.export_dir} --out {engine_dir} "
            f"--min-size {r.min_size} --opt-size {r.opt_size} --max-size {r.max_size} --max-batch {r.max_batch}`"
        )


@dataclass(frozen=True)
class RuntimeInfo:
    """What this host offers: TensorRT version and GPU."""

    tensorrt: str
    gpu_name: str
    compute_capability: str

    @classmethod
    def current(cls, device: int | str = 0) -> "RuntimeInfo":
        import torch

        trt = import_tensorrt()
        dev = torch.device(device if not isinstance(device, int) else f"cuda:{device}")
        major, minor = torch.cuda.get_device_capability(dev)
        return cls(str(trt.__version__), torch.cuda.get_device_name(dev), f"{major}.{minor}")


def compatibility_problems(
    manifest: EngineManifest, runtime: RuntimeInfo, required: ShapeRanges | None = None
) -> list[str]:
    """Why the engines of ``manifest`` cannot serve on ``runtime`` for ``required`` shapes (empty: they can)."""
    problems = []
    if manifest.tensorrt != runtime.tensorrt:
        problems.append(f"they were built with TensorRT {manifest.tensorrt}, this host has TensorRT {runtime.tensorrt}")
    if manifest.hardware_compatible:
        if tuple(int(x) for x in runtime.compute_capability.split(".")) < (8, 0):
            problems.append(
                f"they were built hardware-compatible for Ampere and newer, this GPU ({runtime.gpu_name}) is "
                f"compute capability {runtime.compute_capability}"
            )
    elif manifest.compute_capability != runtime.compute_capability:
        problems.append(
            f"they were built for {manifest.gpu_name} (compute capability {manifest.compute_capability}), "
            f"this GPU is {runtime.gpu_name} (compute capability {runtime.compute_capability})"
        )
    if required is not None:
        for what in required.missing_from(manifest.ranges):
            problems.append(f"the deployment needs {what}")
    return problems


def required_ranges(limits, engine_ranges: ShapeRanges, max_batch: int = 2) -> ShapeRanges:
    """The shapes a deployment with ``limits`` (katz.request.Limits) will send: up to its largest
    width/height, its default size, batch 1..2. Sizes below the engine's minimum are rejected
    per request instead (INVALID_ARG), so the minimum is the engine's own."""
    default = max(limits.default_width, limits.default_height)
    biggest = max(limits.max_width, limits.max_height)
    lo = min(engine_ranges.min_size, default)
    return ShapeRanges(min_batch=1, opt_batch=min(2, max_batch), max_batch=max_batch, min_size=lo,
                       opt_size=max(lo, default), max_size=max(default, biggest))


# --------------------------------------------------------------------------- #
# Building
# --------------------------------------------------------------------------- #

"""One TensorRT engine (:class:`TrtEngine`): load a plan, bind tensors, run on a stream.

The component engines (:mod:`katz.engines.tensorrt.components`) and the LoRA refitter
(:mod:`katz.engines.tensorrt.refit`) build on it. ``tensorrt`` is imported when an engine is
constructed, never at import time.


An engine built for another TensorRT version, GPU or shape range is refused at load
(:class:`katz.engines.tensorrt.manifest.EngineMismatch`, saying which and how to rebuild).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from katz.engines.tensorrt.manifest import (
    EngineManifest,
    EngineMismatch,
    EngineRecord,
    RuntimeInfo,
    compatibility_problems,
    import_tensorrt,
    required_ranges,
)
from katz.errors import InvalidArgument


def torch_dtype(trt, dtype) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.BOOL: torch.bool,
        trt.DataType.INT8: torch.int8,
    }
    for name, t in (("BF16", torch.bfloat16), ("INT64", torch.int64), ("UINT8", torch.uint8)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = t
    return table[dtype]


def trt_dtype(trt, dtype: torch.dtype):
    return {
        torch.float32: trt.DataType.FLOAT,
        torch.float16: trt.DataType.HALF,
        torch.bfloat16: getattr(trt.DataType, "BF16", None),
    }[dtype]


class _Logger:
    _lock = threading.Lock()
    _logger = None

    @classmethod
    def get(cls, trt):
        with cls._lock:
            if cls._logger is None:
                cls._logger = trt.Logger(trt.Logger.WARNING)
            return cls._logger


def load_manifest(engine_dir: Path, device: str, limits=None) -> EngineManifest:
    """The engine folder's manifest, after checking it fits this host and the deployment's limits."""
    manifest = EngineManifest.load(engine_dir)
    dev = torch.device(device)
    if dev.type != "cuda":
        raise EngineMismatch(f"TensorRT engines run on CUDA devices, not {device!r}; serve with --device cuda")
    runtime = RuntimeInfo.current(dev)
    required = required_ranges(limits, manifest.ranges) if limits is not None else None
    problems = compatibility_problems(manifest, runtime, required)
    if problems:
        raise EngineMismatch(
            f"the TensorRT engines in {engine_dir} cannot be used: " + "; ".join(problems) + ". "
            + manifest.rebuild_hint(engine_dir, required if required is not None else None)
            + (f" (or serve with --max-size {manifest.ranges.max_size})" if required is not None
               and required.max_size > manifest.ranges.max_size else "")
        )
    return manifest


class TrtEngine:
    """One deserialized plan with its execution context; runs on the current torch stream."""

    def __init__(self, engine_dir: Path, record: EngineRecord, manifest: EngineManifest, device: str):
        self.trt = trt = import_tensorrt()
        self.engine_dir, self.record, self.manifest = Path(engine_dir), record, manifest
        self.name = record.name
        self.device = torch.device(device)
        self.logger = _Logger.get(trt)
        path = self.engine_dir / record.file
        if not path.exists():
            raise EngineMismatch(f"engine file {path} is missing; {manifest.rebuild_hint(engine_dir)}")
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(self.device):
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineMismatch(
                f"TensorRT {trt.__version__} could not load {path} (built with TensorRT {manifest.tensorrt} for "
                f"{manifest.gpu_name}, compute capability {manifest.compute_capability}); "
                + manifest.rebuild_hint(engine_dir)
            )
        self.refitter = None
        if record.refit:
            self.refitter = trt.Refitter(self.engine, self.logger)
            if record.weight_stripped:
                self._refit_from_onnx(Path(record.onnx))
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {path} (out of GPU memory?)")
        self.inputs, self.outputs, self.dtypes, self.ranges = [], [], {}, {}
        for i in range(self.engine.num_io_tensors):
            n = self.engine.get_tensor_name(i)
            self.dtypes[n] = torch_dtype(trt, self.engine.get_tensor_dtype(n))
            if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT:
                self.inputs.append(n)
                static = tuple(self.engine.get_tensor_shape(n))
                if all(d >= 0 for d in static):
                    self.ranges[n] = (static, static, static)
                else:
                    self.ranges[n] = tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, 0))
            else:
                self.outputs.append(n)
        self.lock = threading.RLock()

    def _refit_from_onnx(self, onnx_path: Path) -> None:
        trt = self.trt
        if not onnx_path.exists():
            raise EngineMismatch(
                f"{self.record.file} is weight-stripped and its weights file {onnx_path} is missing; "
                + self.manifest.rebuild_hint(self.engine_dir)
            )
        parser_refitter = trt.OnnxParserRefitter(self.refitter, self.logger)
        if not parser_refitter.refit_from_file(str(onnx_path)):
            errors = "; ".join(str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors))
            raise EngineMismatch(f"could not refit {self.record.file} from {onnx_path}: {errors}")
        if not self.refitter.refit_cuda_engine():
            raise EngineMismatch(f"refitting {self.record.file} from {onnx_path} failed")

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """InvalidArgument (naming height/width where those are the cause) unless ``shape`` is in the profile."""
        lo, _opt, hi = self.ranges[name]
        if len(shape) == len(lo) and all(a <= s <= b for s, a, b in zip(shape, lo, hi)):
            return
        bad = next((i for i, (s, a, b) in enumerate(zip(shape, lo, hi)) if not a <= s <= b), 0)
        field = {2: "height", 3: "width"}.get(bad, "request") if len(shape) == 4 else "request"
        r = self.manifest.ranges
        raise InvalidArgument(
            field,
            f"tensor {name} of shape {list(shape)} is outside the TensorRT engine {self.record.file}'s range "
            f"{list(lo)}..{list(hi)} (images {r.min_size}..{r.max_size} px, batch {r.min_batch}..{r.max_batch}); "
            + self.manifest.rebuild_hint(self.engine_dir),
        )

    @torch.no_grad()
    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self.lock:
            keep = []
            ctx = self.context
            for name in self.inputs:
                t = feeds[name]
                t = t.to(device=self.device, dtype=self.dtypes[name]).contiguous()
                self.check_shape(name, tuple(t.shape))
                keep.append(t)
                ctx.set_input_shape(name, tuple(t.shape))
                ctx.set_tensor_address(name, t.data_ptr())
            out = {}
            for name in self.outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                t = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                ctx.set_tensor_address(name, t.data_ptr())
                out[name] = t
            # everything runs on the current stream: inputs freed after this return are reused by
            # the caching allocator only for work queued behind the engine's kernels
            stream = torch.cuda.current_stream(self.device)
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"TensorRT failed to run {self.record.file}")
            del keep
            return out


# --------------------------------------------------------------------------- #
# LoRA refit
# --------------------------------------------------------------------------- #
class OnnxInitializers:
    """Reads single ONNX initializers (the base weights) on demand, without loading the model's data."""

    def __init__(self, onnx_path: Path):
        import onnx

        self.path = Path(onnx_path)
        self.model = onnx.load(str(self.path), load_external_data=False)
        self.tensors = {t.name: t for t in self.model.graph.initializer}

    def get(self, name: str) -> torch.Tensor:
        import onnx
        from onnx import numpy_helper

        proto = onnx.TensorProto()
        proto.CopyFrom(self.tensors[name])
        return torch.from_numpy(numpy_helper.to_array(proto, base_dir=str(self.path.parent)).copy())

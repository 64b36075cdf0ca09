"""TensorRT engines for the UNet (LoRAs by refit), the ControlNets and the VAE decoder.

Same call signatures as :mod:`katz.engines.torch.engines`; the constructors take the engine
folder written by ``katz build-engines`` (see :mod:`katz.export.tensorrt_build`). ``tensorrt``
is imported when an engine is constructed, never at import time.

LoRAs (:class:`TrtLoraRefitter`, the UNet engine's ``lora``): the merged weights
``base + sum(scale * alpha / r * up @ down)`` are computed on the GPU in the engine's layout
(:class:`katz.lora.refit_map.RefitMap`), handed to ``IRefitter.set_named_weights`` as device
memory and applied with ``refit_cuda_engine_async`` on the engine's stream. The base weights are
read from the ONNX initializers the engine was built from and refitted back exactly when a LoRA
goes. A LoRA target that the engine cannot refit fails with :class:`katz.lora.weights.LoraError`
(INVALID_ARG) naming it.

An engine built for another TensorRT version, GPU or shape range is refused at load
(:class:`katz.export.tensorrt_build.EngineMismatch`, saying which and how to rebuild).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import torch

from katz.lora.refit_map import RefitEntry, RefitMap, plan_lora
from katz.export.tensorrt_build import (
    EngineManifest,
    EngineMismatch,
    EngineRecord,
    RuntimeInfo,
    compatibility_problems,
    import_tensorrt,
    required_ranges,
)
from katz.lora.weights import LoraError, LoraLayer, LoraWeights
from katz.request import InvalidArgument


def _torch_dtype(trt, dtype) -> torch.dtype:
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


def _trt_dtype(trt, dtype: torch.dtype):
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
            self.dtypes[n] = _torch_dtype(trt, self.engine.get_tensor_dtype(n))
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
class _Initializers:
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


class _RefitPart:
    """One refittable engine of a component, its refit map and base weights."""

    def __init__(self, engine: TrtEngine, refit_map: RefitMap):
        self.engine, self.map = engine, refit_map
        self.refittable = set(engine.refitter.get_all_weights()) if engine.refitter is not None else set()
        onnx_path = Path(engine.record.onnx)
        if not onnx_path.exists():
            raise EngineMismatch(
                f"{engine.record.file}: LoRA refits read the base weights from {onnx_path}, which is missing; "
                "keep the `katz export` folder next to the engines, or "
                + engine.manifest.rebuild_hint(engine.engine_dir)
            )
        self.inits = _Initializers(onnx_path)
        self.pristine: dict[str, torch.Tensor] = {}  # engine weight name -> base value on the device
        self.prototypes: dict[str, tuple] = {}

    def base(self, name: str) -> torch.Tensor:
        t = self.pristine.get(name)
        if t is None:
            value = self.inits.get(name)
            proto = self.engine.refitter.get_weights_prototype(name)
            dtype = _torch_dtype(self.engine.trt, proto.dtype)
            if value.numel() != proto.size:
                raise EngineMismatch(
                    f"{self.engine.record.file}: weight {name} has {proto.size} values in the engine but "
                    f"{value.numel()} in {self.inits.path}; {self.engine.manifest.rebuild_hint(self.engine.engine_dir)}"
                )
            t = self.pristine[name] = value.to(device=self.engine.device, dtype=dtype).contiguous()
        return t


class TrtLoraRefitter:
    """LoRA merge/restore for a component's TensorRT engines through IRefitter.

    The counterpart of :class:`katz.lora.weights.LoraPatcher` (same ``component``, ``applied``,
    ``validate``, ``apply``, ``restore``), so :class:`katz.lora.manager.LoraManager` drives either.
    """

    def __init__(self, parts: Sequence[_RefitPart], component: str, rebuild_hint: str = ""):
        self.parts = list(parts)
        self.component = component
        self.rebuild_hint = rebuild_hint
        self._current: tuple[tuple[LoraWeights, float], ...] = ()
        self._touched: list[set[str]] = [set() for _ in self.parts]  # weights now off their base value
        self._lock = threading.RLock()

    @property
    def applied(self) -> tuple[tuple[str, float], ...]:
        return tuple((w.name, s) for w, s in self._current)

    def _plans(self, lora: LoraWeights) -> list[list[tuple[RefitEntry, LoraLayer]]]:
        """Per engine, the (entry, layer) pairs; LoraError naming targets no engine can refit."""
        if not self.parts:
            if lora.layers.get(self.component):
                raise LoraError(
                    f"lora {lora.name!r}: the TensorRT {self.component} engine was built without REFIT and takes no "
                    f"LoRAs; {self.rebuild_hint} (REFIT is the default)"
                )
            return []
        files = ", ".join(p.engine.record.file for p in self.parts)
        return plan_lora([(p.map, p.refittable) for p in self.parts], lora, f"TensorRT engine ({files})")

    def validate(self, lora: LoraWeights, check_values: bool = True) -> None:
        """Raise :class:`LoraError` unless every layer maps to a refittable weight (values are not read
        here; :class:`katz.lora.manager.LoraManager` checks them on the device)."""
        self._plans(lora)

    def apply(self, loras: Sequence[tuple[LoraWeights, float]]) -> None:
        entries = tuple((w, float(s)) for w, s in loras if self.component in w.layers)
        with self._lock:
            if len(entries) == len(self._current) and all(
                a is b and sa == sb for (a, sa), (b, sb) in zip(entries, self._current)
            ):
                return
            try:
                per_part: list[dict[str, tuple[RefitEntry, list, set]]] = [{} for _ in self.parts]
                for w, s in entries:
                    if not math.isfinite(s):
                        raise LoraError(f"lora {w.name!r}: scale {s} is not finite")
                    for i, plan in enumerate(self._plans(w)):
                        for entry, layer in plan:
                            slot = per_part[i].setdefault(entry.onnx_name, (entry, [], set()))
                            slot[1].append((s, layer))
                            slot[2].add(w.name)
                self._refit(per_part)
            except BaseException:
                self.restore()
                raise
            self._current = entries

    def _set(self, part: "_RefitPart", name: str, value: torch.Tensor) -> bool:
        trt = part.engine.trt
        w = trt.Weights(_trt_dtype(trt, value.dtype), value.data_ptr(), value.numel())
        return part.engine.refitter.set_named_weights(name, w, trt.TensorLocation.DEVICE)

    @torch.no_grad()
    def _refit(self, per_part: list[dict[str, tuple[RefitEntry, list, set]]]) -> None:
        if not self.parts:
            return
        stream = torch.cuda.current_stream(self.parts[0].engine.device)
        for i, part in enumerate(self.parts):
            wanted = per_part[i]
            if not wanted and not self._touched[i]:
                continue
            values: dict[str, torch.Tensor] = {}
            all_finite = None
            for name, (entry, items, _names) in wanted.items():
                merged = values[name] = RefitMap.merged_weight(entry, part.base(name), items)
                finite = torch.isfinite(merged).all()
                all_finite = finite if all_finite is None else all_finite & finite
            if all_finite is not None and not bool(all_finite):  # one host sync for the whole merge
                for name, (entry, _items, names) in wanted.items():
                    if not bool(torch.isfinite(values[name]).all()):
                        raise LoraError(
                            f"lora {', '.join(sorted(names))!r}: merged weight of {self.component} module "
                            f"{entry.module!r} is not finite in {values[name].dtype} (scale too large?)"
                        )
            for name in self._touched[i] - set(wanted):
                values[name] = part.base(name)  # back to base
            with part.engine.lock:
                accepted = set()
                try:
                    rejected = []
                    for name, value in values.items():
                        (accepted.add if self._set(part, name, value) else rejected.append)(name)
                    if rejected:
                        by_name = part.map.weight_names
                        mods = ", ".join(sorted(by_name[n].module if n in by_name else n for n in rejected))
                        raise LoraError(
                            f"lora {', '.join(sorted({n for _, _, ns in wanted.values() for n in ns}))!r}: the "
                            f"TensorRT engine {part.engine.record.file} refused new weights for {mods}"
                        )
                    # weights fused with the changed ones must be given too: their current (base) values
                    missing = list(part.engine.refitter.get_missing_weights())
                    for name in missing:
                        values[name] = part.base(name)
                        if self._set(part, name, values[name]):
                            accepted.add(name)
                    if not part.engine.refitter.refit_cuda_engine_async(stream.cuda_stream):
                        raise RuntimeError(f"TensorRT refit of {part.engine.record.file} failed")
                    stream.synchronize()  # the weight buffers may be freed after this
                except BaseException:
                    # whatever the refitter took is put back to base by restore(), so nothing it
                    # holds points at buffers freed after this
                    self._touched[i] |= accepted
                    raise
            self._touched[i] = set(wanted)

    def restore(self) -> None:
        """Refit every weight changed by a LoRA back to its base value (bit-identical)."""
        with self._lock:
            try:
                self._refit([{} for _ in self.parts])
            finally:
                self._current = ()


# --------------------------------------------------------------------------- #
# Engines
# --------------------------------------------------------------------------- #
class _TrtComponent:
    def __init__(self, engine_dir, device, dtype, limits):
        if engine_dir is None:
            raise EngineMismatch("engine: tensorrt needs an engine folder (katz serve --engine-dir DIR)")
        self.engine_dir = Path(engine_dir)
        self.device, self.dtype = torch.device(device), dtype
        self.manifest = load_manifest(self.engine_dir, device, limits)

    def _engine(self, name: str) -> TrtEngine:
        record = self.manifest.engines.get(name)
        if record is None:
            raise EngineMismatch(
                f"{self.engine_dir} has no TensorRT engine {name!r} "
                f"(it has {', '.join(self.manifest.engines) or 'none'}); "
                + self.manifest.rebuild_hint(self.engine_dir)
            )
        return TrtEngine(self.engine_dir, record, self.manifest, str(self.device))

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.dtype == self.dtype else t.to(self.dtype)


class UNetEngine(_TrtComponent):
    """The UNet on TensorRT. Uses the ``unet_down`` + ``unet_up`` engines when they were built
    (ControlNet parallelism: :meth:`down` runs while the ControlNets do), else ``unet``."""

    def __init__(self, folder, device: str = "cuda", dtype: torch.dtype = torch.float16,
                 engine_dir: Path | None = None, limits=None):
        super().__init__(engine_dir, device, dtype, limits)
        from katz.export.unet import UNetLayout

        self.folder = folder
        self.num_residuals = folder.num_down_residuals
        self.layout = UNetLayout(folder)
        self.split = "unet_down" in self.manifest.engines and "unet_up" in self.manifest.engines
        names = ("unet_down", "unet_up") if self.split else ("unet",)
        self.engines = {n: self._engine(n) for n in names}
        parts = []
        for n, eng in self.engines.items():
            if eng.record.refit and eng.record.refit_map:
                parts.append(_RefitPart(eng, RefitMap.load(self.engine_dir / eng.record.refit_map)))
        self.lora = TrtLoraRefitter(parts, "unet", self.manifest.rebuild_hint(self.engine_dir))
        self._zeros: dict[tuple, list[torch.Tensor]] = {}

    def set_loras(self, loras: Sequence[tuple[LoraWeights, float]]) -> None:
        """Make the weights base + exactly these LoRAs (an empty list restores the base)."""
        self.lora.apply(loras)

    def _cond(self, sample, timestep, encoder_hidden_states, added_cond) -> dict[str, torch.Tensor]:
        b = sample.shape[0]
        t = timestep.reshape(-1).to(device=self.device, dtype=torch.float32)
        feeds = {
            "sample": sample,
            "timestep": t.expand(b).contiguous() if t.numel() == 1 else t,
            "encoder_hidden_states": encoder_hidden_states,
        }
        if added_cond is not None:
            feeds.update(text_embeds=added_cond["text_embeds"], time_ids=added_cond["time_ids"])
        return feeds

    def _residuals(self, state_shapes: list[tuple], like: torch.Tensor, down, mid) -> dict[str, torch.Tensor]:
        if down is None or mid is None:
            key = (tuple(state_shapes), like.dtype, like.device)
            zeros = self._zeros.get(key)
            if zeros is None:
                zeros = self._zeros[key] = [torch.zeros(s, dtype=like.dtype, device=like.device) for s in state_shapes]
            down, mid = zeros[:-1], zeros[-1]
        feeds = {f"down_residual_{i}": r for i, r in enumerate(down)}
        feeds["mid_residual"] = mid
        return feeds

    def _full_residual_shapes(self, sample) -> list[tuple]:
        b, _, h, w = sample.shape
        shapes = self.layout.residual_shapes("r", "mid", b, h, w)
        return [shapes[f"r{i}"] for i in range(self.num_residuals)] + [shapes["mid"]]

    @torch.no_grad()
    def __call__(self, sample, timestep, encoder_hidden_states, added_cond=None, down_residuals=None,
                 mid_residual=None) -> torch.Tensor:
        if self.split:
            return self.up(self.down(sample, timestep, encoder_hidden_states, added_cond), down_residuals, mid_residual)
        feeds = self._cond(sample, timestep, encoder_hidden_states, added_cond)
        feeds.update(self._residuals(self._full_residual_shapes(sample), sample, down_residuals, mid_residual))
        return self._out(self.engines["unet"].run(feeds)["noise_pred"])

    @torch.no_grad()
    def down(self, sample, timestep, encoder_hidden_states, added_cond=None) -> dict:
        """The down and mid blocks (``unet_down``); returns the state :meth:`up` needs."""
        feeds = self._cond(sample, timestep, encoder_hidden_states, added_cond)
        if not self.split:
            return {"feeds": feeds}
        out = self.engines["unet_down"].run(feeds)
        out["encoder_hidden_states"] = encoder_hidden_states
        return {"outputs": out}

    @torch.no_grad()
    def up(self, state: dict, down_residuals=None, mid_residual=None) -> torch.Tensor:
        """Add the ControlNet residuals (zeros if none) and run the up path."""
        if "feeds" in state:  # no split engines: the full UNet, now that the residuals are known
            feeds = dict(state["feeds"])
            feeds.update(self._residuals(self._full_residual_shapes(feeds["sample"]), feeds["sample"],
                                         down_residuals, mid_residual))
            return self._out(self.engines["unet"].run(feeds)["noise_pred"])
        feeds = dict(state["outputs"])
        skips = [feeds[f"skip_{i}"] for i in range(self.num_residuals)] + [feeds["mid_sample"]]
        feeds.update(self._residuals([tuple(s.shape) for s in skips], skips[0], down_residuals, mid_residual))
        return self._out(self.engines["unet_up"].run(feeds)["noise_pred"])


class ControlNetEngine(_TrtComponent):
    """The registered ControlNets on TensorRT, one engine each, all resident. ``cond_key`` is
    accepted for interface parity; the conditioning embedding is part of each engine."""

    def __init__(self, folder, device: str = "cuda", dtype: torch.dtype = torch.float16,
                 engine_dir: Path | None = None, limits=None, **_ignored):
        super().__init__(engine_dir, device, dtype, limits)
        self.names = set(folder.controlnets)
        self.nets = {name: self._engine(f"controlnet_{name}") for name in sorted(self.names)}
        self.loads = len(self.nets)
        self.features = SimpleNamespace(hits=0, misses=0)  # no feature cache: the embedding is in the engine

    @torch.no_grad()
    def __call__(self, name, sample, timestep, encoder_hidden_states, added_cond, cond_image, scale,
                 cond_key=None) -> tuple[list[torch.Tensor], torch.Tensor]:
        b = sample.shape[0]
        t = timestep.reshape(-1).to(device=self.device, dtype=torch.float32)
        feeds = {
            "sample": sample,
            "timestep": t.expand(b).contiguous() if t.numel() == 1 else t,
            "encoder_hidden_states": encoder_hidden_states,
            "controlnet_cond": cond_image,
            "conditioning_scale": torch.tensor([float(scale)], dtype=torch.float32, device=self.device),
        }
        if added_cond is not None:
            feeds.update(text_embeds=added_cond["text_embeds"], time_ids=added_cond["time_ids"])
        out = self.nets[name].run(feeds)
        n = len(out) - 1
        return [self._out(out[f"down_residual_{i}"]) for i in range(n)], self._out(out["mid_residual"])


class VaeDecoderEngine(_TrtComponent):
    """VAE decoder on TensorRT: scaled latents ``[B, 4, h, w]`` -> image ``[B, 3, H, W]`` in ``[-1, 1]``
    (the unscaling is inside the engine)."""

    def __init__(self, folder, device: str = "cuda", dtype: torch.dtype = torch.float16,
                 engine_dir: Path | None = None, limits=None):
        super().__init__(engine_dir, device, dtype, limits)
        self.engine = self._engine("vae_decoder")

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self._out(self.engine.run({"latents": latents})["image"])

"""LoRAs on a TensorRT UNet by weight refit (:class:`TrtLoraRefitter`, the TensorRT UNet engine's ``lora``).

The merged weights ``base + sum(scale * alpha / r * up @ down)`` are computed on the GPU in the
engine's layout (:class:`katz.lora.refit_map.RefitMap`), handed to ``IRefitter.set_named_weights`` as
device memory and applied with ``refit_cuda_engine_async`` on the engine's stream. The base weights are
read from the ONNX initializers the engine was built from and refitted back exactly when a LoRA goes.
A LoRA target that the engine cannot refit fails with :class:`katz.errors.LoraError` (INVALID_ARG).
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Sequence

import torch

from katz.engines.tensorrt.engine import OnnxInitializers, TrtEngine, torch_dtype, trt_dtype
from katz.engines.tensorrt.manifest import (
    EngineMismatch,
)
from katz.errors import LoraError
from katz.lora.refit_map import RefitEntry, RefitMap, plan_lora
from katz.lora.weights import LoraLayer, LoraWeights


class RefitPart:
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
        self.inits = OnnxInitializers(onnx_path)
        self.pristine: dict[str, torch.Tensor] = {}  # engine weight name -> base value on the device
        self.prototypes: dict[str, tuple] = {}

    def base(self, name: str) -> torch.Tensor:
        t = self.pristine.get(name)
        if t is None:
            value = self.inits.get(name)
            proto = self.engine.refitter.get_weights_prototype(name)
            dtype = torch_dtype(self.engine.trt, proto.dtype)
            if value.numel() != proto.size:
                raise EngineMismatch(
                    f"{self.engine.record.file}: weight {name} has {proto.size} values in the engine but "
                    f"{value.numel()} in {self.inits.path}; {self.engine.manifest.rebuild_hint(self.engine.engine_dir)}"
                )
            t = self.pristine[name] = value.to(device=self.engine.device, dtype=dtype).contiguous()
        return t


class TrtLoraRefitter:
    """LoRA merge/restore for a component's TensorRT engines through IRefitter.

    The counterpart of :class:`katz.lora.patch.LoraPatcher` (same ``component``, ``applied``,
    ``validate``, ``apply``, ``restore``), so :class:`katz.lora.manager.LoraManager` drives either.
    """

    def __init__(self, parts: Sequence[RefitPart], component: str, rebuild_hint: str = ""):
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

    def _set(self, part: "RefitPart", name: str, value: torch.Tensor) -> bool:
        trt = part.engine.trt
        w = trt.Weights(trt_dtype(trt, value.dtype), value.data_ptr(), value.numel())
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

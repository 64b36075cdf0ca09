"""What every Triton model of a deployment knows: the model folder, limits, LoRA store, device.

It travels as string parameters in each model's ``config.pbtxt`` (rendered by
:mod:`katz.repository`) and is parsed back here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch

from katz.lora_store import LoraStore
from katz.model_folder import ModelFolder
from katz.request import Limits


@dataclass
class Deployment:
    model_dir: Path
    controlnets: dict[str, Path]
    lora_dir: Path | None
    limits: Limits
    device: str = "cpu"
    dtype: str = "float32"
    torch_threads: int = 0
    lora_host_cache_bytes: int = 2 << 30
    lora_device_cache_bytes: int = 1 << 30
    lora_load_delay_s: float = 0.0  # simulated slow storage, for tests and benchmarks

    # ------------------------------------------------------------ parameters
    def to_parameters(self) -> dict[str, str]:
        return {
            "model_dir": str(self.model_dir),
            "controlnets": json.dumps({k: str(v) for k, v in self.controlnets.items()}),
            "lora_dir": str(self.lora_dir or ""),
            "limits": json.dumps(asdict(self.limits)),
            "dtype": self.dtype,
            "torch_threads": str(self.torch_threads),
            "lora_host_cache_bytes": str(self.lora_host_cache_bytes),
            "lora_device_cache_bytes": str(self.lora_device_cache_bytes),
            "lora_load_delay_s": str(self.lora_load_delay_s),
        }

    @classmethod
    def from_parameters(cls, params: dict[str, str], device: str) -> "Deployment":
        dep = cls(
            model_dir=Path(params["model_dir"]),
            controlnets={k: Path(v) for k, v in json.loads(params.get("controlnets", "{}")).items()},
            lora_dir=Path(params["lora_dir"]) if params.get("lora_dir") else None,
            limits=Limits(**json.loads(params.get("limits", "{}"))),
            device=device,
            dtype=params.get("dtype", "float32"),
            torch_threads=int(params.get("torch_threads", "0")),
            lora_host_cache_bytes=int(params.get("lora_host_cache_bytes", 2 << 30)),
            lora_device_cache_bytes=int(params.get("lora_device_cache_bytes", 1 << 30)),
            lora_load_delay_s=float(params.get("lora_load_delay_s", 0.0)),
        )
        if dep.torch_threads > 0:
            torch.set_num_threads(dep.torch_threads)
        return dep

    # --------------------------------------------------------------- derived
    @cached_property
    def folder(self) -> ModelFolder:
        return ModelFolder(self.model_dir, self.controlnets)

    @cached_property
    def loras(self) -> LoraStore:
        return LoraStore(self.lora_dir, self.folder.family)

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.dtype]

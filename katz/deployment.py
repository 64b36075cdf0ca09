"""What every Triton model of a deployment knows: the model folder, limits, LoRA store, device.

It travels as string parameters in each model's ``config.pbtxt`` (rendered by
:mod:`katz.deploy.repository`) and is parsed back here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from katz.diffusion.loop import loop_place
from katz.lora.store import LoraStore
from katz.models.folder import ModelFolder
from katz.request import Limits

# where the ControlNets run: inline (the controlnet model, called serially before each UNet step),
# service (the controlnet model, beside the UNet's down path), local (in the UNet's process), remote
# (the controlnet model of another server)
CONTROLNET_MODES = ("inline", "service", "local", "remote")


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
    lora_readahead: bool = True  # preprocessing reads arriving requests' LoRA files into the page cache
    lora_hints: str = ""  # channel on which preprocessing tells the UNets' loaders arriving LoRAs ("": off)
    unet_shards: int = 1  # latent parallelism: CFG halves and/or latent bands on this many UNet models
    latent_overlap: int = 16  # spatial sharding: least overlap of two neighbouring latent bands (latent px)
    loop: str = "auto"  # where katz_pipeline's loop runs: unet | pipeline | auto (katz.diffusion.loop)
    controlnet_mode: str = "inline"  # inline | service | local | remote (katz.controlnet.transports)
    controlnet_url: str = ""  # remote: HOST:PORT of the ControlNet server's gRPC endpoint
    controlnet_timeout_s: float = 30.0
    controlnet_resident: list[str] | None = None  # None: all registered ControlNets stay loaded
    controlnet_cache_bytes: int = 8 << 30
    feature_cache_bytes: int = 1 << 30
    engine: str = "torch"  # torch | tensorrt (UNet, ControlNets, VAE decoder; see katz.engines)
    engine_dir: Path | None = None  # tensorrt: the folder `katz build-engines --out` wrote
    cuda_graphs: bool = True  # torch engines on GPUs: replay steps as CUDA graphs captured at load
    compile: bool = False  # torch engines on GPUs: torch.compile before capture (slow first start)
    compile_vae: bool = True  # torch engines on GPUs: the VAE decoder compiled at load (~22 s for SDXL)
    compile_cache: Path | None = None  # where compiled kernels are kept between starts
    graph_sizes: list[tuple[int, int]] | None = None  # (height, width) captured at load; None: default size
    channels_last: bool = False  # torch engines on GPUs: UNet/ControlNet weights in channels-last layout
    fp8: bool = False  # torch engines on GPUs (8.9+): UNet/ControlNet transformer linears in float8 (engines.fp8)

    @property
    def compile_batches(self) -> tuple[int, ...]:
        """The batch size whose UNet and ControlNet graphs are compiled when ``compile`` is on: 2 (the CFG
    batch), or 1 where latent parallelism runs each CFG half on its own shard. Batch 1 of a single
    shard (guidance scale 1) is captured uncompiled, which halves the compile time at load."""
        return (1,) if self.unet_shards > 1 else (2,)

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
            "lora_readahead": "1" if self.lora_readahead else "0",
            "lora_hints": self.lora_hints,
            "unet_shards": str(self.unet_shards),
            "latent_overlap": str(self.latent_overlap),
            "loop": self.loop,
            "controlnet_mode": self.controlnet_mode,
            "controlnet_url": self.controlnet_url,
            "controlnet_timeout_s": str(self.controlnet_timeout_s),
            "controlnet_resident": json.dumps(self.controlnet_resident),
            "controlnet_cache_bytes": str(self.controlnet_cache_bytes),
            "feature_cache_bytes": str(self.feature_cache_bytes),
            "engine": self.engine,
            "engine_dir": str(self.engine_dir or ""),
            "cuda_graphs": "1" if self.cuda_graphs else "0",
            "compile": "1" if self.compile else "0",
            "compile_vae": "1" if self.compile_vae else "0",
            "compile_cache": str(self.compile_cache or ""),
            "graph_sizes": json.dumps(self.graph_sizes),
            "channels_last": "1" if self.channels_last else "0",
            "fp8": "1" if self.fp8 else "0",
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
            lora_readahead=params.get("lora_readahead", "1") == "1",
            lora_hints=params.get("lora_hints", ""),
            unet_shards=int(params.get("unet_shards", "1")),
            latent_overlap=int(params.get("latent_overlap", "16")),
            loop=params.get("loop", "auto"),
            controlnet_mode=params.get("controlnet_mode", "inline"),
            controlnet_url=params.get("controlnet_url", ""),
            controlnet_timeout_s=float(params.get("controlnet_timeout_s", 30.0)),
            controlnet_resident=json.loads(params.get("controlnet_resident", "null")),
            controlnet_cache_bytes=int(params.get("controlnet_cache_bytes", 8 << 30)),
            feature_cache_bytes=int(params.get("feature_cache_bytes", 1 << 30)),
            engine=params.get("engine", "torch"),
            engine_dir=Path(params["engine_dir"]) if params.get("engine_dir") else None,
            cuda_graphs=params.get("cuda_graphs", "1") == "1",
            compile=params.get("compile", "0") == "1",
            compile_vae=params.get("compile_vae", "1") == "1",
            compile_cache=Path(params["compile_cache"]) if params.get("compile_cache") else None,
            graph_sizes=[tuple(x) for x in json.loads(params.get("graph_sizes", "null"))]
            if json.loads(params.get("graph_sizes", "null")) else None,
            channels_last=params.get("channels_last", "0") == "1",
            fp8=params.get("fp8", "0") == "1",
        )
        if dep.unet_shards < 1:
            raise ValueError(f"unet_shards must be >= 1, not {dep.unet_shards}")
        if dep.latent_overlap < 0:
            raise ValueError(f"latent_overlap must be >= 0 latent pixels, not {dep.latent_overlap}")
        loop_place(dep.loop, dep.unet_shards)  # raises for an unknown or impossible place
        if dep.controlnet_mode not in CONTROLNET_MODES:
            raise ValueError(f"controlnet_mode must be one of {', '.join(CONTROLNET_MODES)}, "
                             f"not {dep.controlnet_mode!r}")
        if dep.controlnet_mode == "remote" and not dep.controlnet_url:
            raise ValueError("controlnet_mode remote needs controlnet_url")
        if dep.engine not in ("torch", "tensorrt"):
            raise ValueError(f"engine must be torch or tensorrt, not {dep.engine!r}")
        if dep.engine == "tensorrt" and dep.engine_dir is None:
            raise ValueError("engine tensorrt needs engine_dir (the folder `katz build-engines --out` wrote)")
        if dep.fp8 and dep.engine != "torch":
            raise ValueError("fp8 is for the torch engines, not engine tensorrt")
        if dep.torch_threads > 0:
            torch.set_num_threads(dep.torch_threads)
        return dep

    # --------------------------------------------------------------- derived
    @cached_property
    def folder(self) -> ModelFolder:
        return ModelFolder(self.model_dir, self.controlnets)

    @cached_property
    def request_limits(self) -> Limits:
        """``limits`` with the minimum size raised to the folder's (:attr:`ModelFolder.min_image_size`),
        so however the deployment was made, a request its networks cannot run is a 400, not a 500."""
        low = self.folder.min_image_size
        return replace(self.limits, min_width=max(self.limits.min_width, low),
                       min_height=max(self.limits.min_height, low))

    @cached_property
    def loras(self) -> LoraStore:
        return LoraStore(self.lora_dir, self.folder.family)

    @cached_property
    def accel(self):
        """How the torch engines run on GPUs (:class:`katz.engines.torch.cuda_graphs.Acceleration`)."""
        from katz.engines.torch.cuda_graphs import Acceleration

        return Acceleration(
            cuda_graphs=self.cuda_graphs, compile=self.compile, compile_vae=self.compile_vae,
            compile_cache=self.compile_cache,
            sizes=self.graph_sizes or [(self.folder.default_size, self.folder.default_size)],
            channels_last=self.channels_last, fp8=self.fp8,
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.dtype]

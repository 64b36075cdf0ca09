"""A deployment: what every Triton model of a Katz server knows, every default and every check, once.

The ``katz`` command maps its flags onto :class:`Deployment` (:func:`katz.cli.build_deployment`); the
deployment travels as string parameters in each model's ``config.pbtxt`` (rendered by
:mod:`katz.deploy.repository`) and is parsed back here in every model process.
"""

from __future__ import annotations

import json
import typing
from dataclasses import MISSING, asdict, dataclass, fields, replace
from functools import cached_property
from pathlib import Path

from katz.request import Limits, inapplicable_fields

# where the ControlNets run: inline (the controlnet model, called serially before each UNet step),
# service (the controlnet model, beside the UNet's down path), local (in the UNet's process), remote
# (the controlnet model of another server)
CONTROLNET_MODES = ("inline", "service", "local", "remote")
ENGINES = ("torch", "tensorrt")
DTYPES = ("float32", "float16", "bfloat16")
LOOPS = ("auto", "unet", "pipeline")


def loop_place(loop: str, unet_shards: int) -> str:
    """Where ``katz_pipeline``'s loop runs for the deployment setting ``loop``: ``auto`` is ``unet``
    with one UNet shard and ``pipeline`` with several (each step is split over the shards)."""
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {', '.join(LOOPS)}, not {loop!r}")
    if loop == "auto":
        return "unet" if unet_shards == 1 else "pipeline"
    if loop == "unet" and unet_shards > 1:
        raise ValueError("loop unet needs one UNet shard: latent parallelism splits every step over the shards")
    return loop


class DeploymentError(ValueError):
    """A deployment setting is invalid; ``field`` names it (the ``katz`` command names its flag)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field} {reason}")
        self.field, self.reason = field, reason


@dataclass
class Deployment:
    model_dir: Path  # the diffusers folder; with a checkpoint, the config folder of its architecture
    controlnets: dict[str, Path]  # name -> ControlNet folder or single file
    lora_dir: Path | None
    limits: Limits
    device: str = "cpu"
    dtype: str = "float32"
    checkpoint: Path | None = None  # a single-file model (katz.models.checkpoint): the weights come from it
    variant: str = ""  # weight files to read ("fp16": *.fp16.safetensors); "": the dtype's where present
    torch_threads: int = 0
    # the LoRA manager's host tier; -1: a quarter of the memory free at start, at most 16 GiB
    # (katz.lora.manager.default_host_budget)
    lora_host_cache_bytes: int = -1
    lora_device_cache_bytes: int = 1 << 30
    lora_load_delay_s: float = 0.0  # simulated slow storage, for tests and benchmarks
    lora_readahead: bool = True  # preprocessing reads arriving requests' LoRA files into the page cache
    lora_hints: str = ""  # channel on which preprocessing tells the UNets' loaders arriving LoRAs ("": off)
    unet_shards: int = 1  # latent parallelism: CFG halves and/or latent bands on this many UNet models
    latent_overlap: int = 16  # spatial sharding: least overlap of two neighbouring latent bands (latent px)
    loop: str = "auto"  # where katz_pipeline's loop runs: unet | pipeline | auto (katz.diffusion.loop)
    controlnet_mode: str = "service"  # inline | service | local | remote (katz.controlnet.transports)
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
    # experimental (measured no faster for SDXL, docs/serving.md): torch engines on GPUs of compute capability
    # 8.9+, the UNet's, FLUX transformer's and ControlNets' transformer linears in float8
    # (katz.engines.torch.experimental.fp8)
    fp8: bool = False

    @property
    def compile_batches(self) -> tuple[int, ...]:
        """The batch size whose UNet and ControlNet graphs are compiled when ``compile`` is on: 2 (the CFG
    batch), or 1 where latent parallelism runs each CFG half on its own shard. Batch 1 of a single
    shard (guidance scale 1) is captured uncompiled, which halves the compile time at load."""
        return (1,) if self.unet_shards > 1 else (2,)

    @classmethod
    def default(cls, name: str):
        """The default of the setting ``name`` (the ``katz`` command's flags take theirs from here)."""
        f = next(f for f in fields(cls) if f.name == name)
        return f.default if f.default is not MISSING else f.default_factory()

    def validate(self) -> "Deployment":
        """Raise :class:`DeploymentError` naming the first invalid setting; returns the deployment."""
        if self.dtype not in DTYPES:
            raise DeploymentError("dtype", f"must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.unet_shards < 1:
            raise DeploymentError("unet_shards", f"must be >= 1, not {self.unet_shards}")
        if self.latent_overlap < 0:
            raise DeploymentError("latent_overlap", f"must be >= 0 latent pixels, not {self.latent_overlap}")
        try:
            loop_place(self.loop, self.unet_shards)  # an unknown or impossible place
        except ValueError as exc:
            raise DeploymentError("loop", str(exc).removeprefix("loop ")) from None
        if self.controlnet_mode not in CONTROLNET_MODES:
            raise DeploymentError("controlnet_mode", f"must be one of {', '.join(CONTROLNET_MODES)}, "
                                  f"not {self.controlnet_mode!r}")
        if self.controlnet_mode == "remote" and not self.controlnet_url:
            raise DeploymentError("controlnet_url", "is needed by controlnet_mode remote (HOST:PORT of the "
                                  "ControlNet server's gRPC endpoint)")
        if self.controlnet_timeout_s <= 0:
            raise DeploymentError("controlnet_timeout_s", f"must be > 0 s, not {self.controlnet_timeout_s}")
        if self.engine not in ENGINES:
            raise DeploymentError("engine", f"must be one of {', '.join(ENGINES)}, not {self.engine!r}")
        if self.engine == "tensorrt" and self.engine_dir is None:
            raise DeploymentError("engine_dir", "is needed by engine tensorrt (the folder `katz build-engines "
                                  "--out` wrote)")
        if self.fp8 and self.engine != "torch":
            raise DeploymentError("fp8", "is for the torch engines, not engine tensorrt (a TensorRT engine's "
                                  "precision is set when it is built)")
        if self.lora_host_cache_bytes < -1:
            raise DeploymentError("lora_host_cache_bytes", f"must be >= 0 (or -1: sized from the free memory), "
                                  f"not {self.lora_host_cache_bytes}")
        for name in ("lora_device_cache_bytes", "controlnet_cache_bytes",
                     "feature_cache_bytes", "torch_threads"):
            if getattr(self, name) < 0:
                raise DeploymentError(name, f"must be >= 0, not {getattr(self, name)}")
        from katz.models.folder import is_flux_folder

        if is_flux_folder(self.model_dir):  # settings alone: the folder's own checks come when it is loaded
            self._check_flux()
        return self

    def _check_flux(self) -> None:
        """What a FLUX.1 deployment runs so far: the loop in the transformer's process (``unet``
        model), one shard, ControlNets in that process (``local``; ``inline``, the baseline) or in the
        ``controlnet`` model streaming residuals back (``service``), PyTorch engines (on GPUs: blocks
        compiled with ``compile``, float8 block linears with ``fp8``; no CUDA graphs)."""
        if self.unet_shards != 1:
            raise DeploymentError("unet_shards", "must be 1 for FLUX models: their latent parallelism (sequence "
                                  "parallelism, docs/techniques.md) runs in one process only; serving it over "
                                  "several shards is not built yet")
        if self.loop_place != "unet":
            raise DeploymentError("loop", "must be unet (or auto) for FLUX models: their loop runs in the "
                                  "transformer's process")
        if self.controlnet_mode == "remote":
            raise DeploymentError("controlnet_mode", "must be local, service or inline for FLUX models, not "
                                  "'remote': ControlNets on another server are not built for a transformer yet")
        if self.engine != "torch":
            raise DeploymentError("engine", "must be torch for FLUX models")

    # ------------------------------------------------------------ parameters
    def to_parameters(self) -> dict[str, str]:
        """Every setting as a config.pbtxt string parameter (``device`` comes from the instance)."""
        return {f.name: _encode(getattr(self, f.name)) for f in fields(self) if f.name != "device"}

    @classmethod
    def from_parameters(cls, params: dict[str, str], device: str) -> "Deployment":
        """The deployment :meth:`to_parameters` wrote, on ``device`` (the model instance's); validated.
        A parameter that is absent takes its default (``controlnets``: none, ``limits``: the defaults)."""
        hints = typing.get_type_hints(cls)
        values = {"model_dir": Path(params["model_dir"])}
        for f in fields(cls):
            if f.name in ("model_dir", "device"):
                continue
            if f.name in params or (f.default is MISSING and f.default_factory is MISSING):
                values[f.name] = _decode(params.get(f.name, ""), hints[f.name])
        dep = cls(device=device, **values).validate()
        if dep.torch_threads > 0:
            import torch

            torch.set_num_threads(dep.torch_threads)
        return dep

    # --------------------------------------------------------------- derived
    @cached_property
    def folder(self):
        """The model folder (:class:`katz.models.folder.ModelFolder`)."""
        from katz.models.folder import ModelFolder

        return ModelFolder(self.model_dir, self.controlnets, self.variant or None, self.dtype, self.checkpoint)

    @cached_property
    def request_limits(self) -> Limits:
        """``limits`` with the minimum size raised to the folder's (:attr:`ModelFolder.min_image_size`),
        so however the deployment was made, a request its networks cannot run is a 400, not a 500."""
        folder = self.folder
        low = folder.min_image_size
        refused = inapplicable_fields(folder.family, folder.guidance_embeds)
        multiple = 2 * folder.vae_scale_factor if folder.family == "flux" else 8
        return replace(self.limits, min_width=max(self.limits.min_width, low),
                       min_height=max(self.limits.min_height, low),
                       size_multiple=max(self.limits.size_multiple, multiple),
                       refused_fields=tuple(map(tuple, self.limits.refused_fields)) + refused)

    @cached_property
    def loras(self):
        """The LoRA store (:class:`katz.lora.store.LoraStore`)."""
        from katz.lora.store import LoraStore

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
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def loop_place(self) -> str:
        """Where ``katz_pipeline``'s denoising loop runs: ``unet`` or ``pipeline`` (:func:`loop_place`)."""
        return loop_place(self.loop, self.unet_shards)


def _encode(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (str, int, float, Path)):
        return str(value)
    if isinstance(value, Limits):
        return json.dumps(asdict(value))
    if isinstance(value, dict):
        return json.dumps({k: str(v) for k, v in value.items()})
    return json.dumps(value)  # lists


def _decode(text: str, kind):
    """``text`` (from :func:`_encode`) as a value of the field type ``kind``."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    optional = type(None) in typing.get_args(kind)
    if optional and text in ("", "null"):
        return None
    if optional and len(args) == 1:
        kind = args[0]
    origin = typing.get_origin(kind)
    if kind is bool:
        return text == "1"
    if kind in (int, float, str):
        return kind(text)
    if kind is Path:
        return Path(text)
    if kind is Limits:
        return Limits(**json.loads(text or "{}"))
    if origin is dict:
        return {k: Path(v) for k, v in json.loads(text or "{}").items()}
    if origin is list:
        items = json.loads(text)
        inner = typing.get_args(kind)[0]
        return [tuple(x) for x in items] if typing.get_origin(inner) is tuple else list(items)
    raise TypeError(f"no parameter decoding for {kind!r}")

"""A model: a diffusers-format folder or a single-file checkpoint; what it holds, whether it is complete, how to load it.

Real weights and the built-in presets go through this one class. A folder holds
``unet/``, ``vae/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/`` and, for
SDXL, ``text_encoder_2/`` and ``tokenizer_2/``. A FLUX.1 folder holds ``transformer/``
instead of ``unet/`` and a T5 encoder as ``text_encoder_2/`` (``tokenizer_2/``). ControlNets are
separate diffusers-format folders (``config.json`` + weights) or single files, registered by name.

Weights are read from safetensors only (``use_safetensors=True`` on every load): a pickle can run
code when it is loaded. A component's weights may be a variant (``model.fp16.safetensors``, as a
download of only the fp16 files leaves them): :func:`resolve_variant` picks the file each component
loads, and the folder's checks look for exactly those files, reporting every problem at once. FLUX.1
folders go through the same loading and checks, component for component.

A single-file checkpoint (:mod:`katz.models.checkpoint`) is served through the same class: its
configs, scheduler and tokenizers come from the config folder shipped for its architecture
(``path``), its weights from the file (``checkpoint``). Checkpoints are SD 1.5 and SDXL only; a
FLUX.1 model is served from its diffusers folder.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

# diffusers' and transformers' weight file names: <stem>[.<variant>].<format>, sharded ones with an index
_WEIGHT_RE = re.compile(r"^(diffusion_pytorch_model|model|pytorch_model)(?:\.([A-Za-z0-9_-]+))?\.(safetensors|bin)$")
_INDEX_RE = re.compile(
    r"^(diffusion_pytorch_model|model|pytorch_model)\.(safetensors|bin)\.index(?:\.([A-Za-z0-9_-]+))?\.json$")
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# the variant a deployment's dtype reads by default where a folder has it (half the bytes of float32)
DTYPE_VARIANTS = {"float16": "fp16", "bfloat16": "bf16"}
# the class each weighted component loads with (library, name): the loaders take it from here, and the
# conversion advice for pickle-only folders names it
_CLASSES = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
            "controlnet": ("diffusers", "ControlNetModel"), "text_encoder": ("transformers", "CLIPTextModel"),
            "text_encoder_2": ("transformers", "CLIPTextModelWithProjection")}
# FLUX.1's: a transformer instead of the UNet, a T5 second encoder, FLUX ControlNets
_FLUX_CLASSES = {"transformer": ("diffusers", "FluxTransformer2DModel"), "vae": _CLASSES["vae"],
                 "controlnet": ("diffusers", "FluxControlNetModel"), "text_encoder": _CLASSES["text_encoder"],
                 "text_encoder_2": ("transformers", "T5EncoderModel")}


def component_classes(family: str) -> dict[str, tuple[str, str]]:
    """Each weighted component of a ``family`` model (``unet`` or ``transformer``, ``vae``, the text
    encoders, ``controlnet``) and the (library, class name) that loads it."""
    return _FLUX_CLASSES if family == "flux" else _CLASSES


@dataclass(frozen=True)
class WeightFiles:
    """The weight files in one component folder: safetensors by variant (``None``: the plain name; a
    sharded checkpoint counts by its index file) and any pickles."""

    safetensors: dict
    pickles: tuple[str, ...]

    @classmethod
    def scan(cls, folder: Path) -> "WeightFiles":
        safetensors: dict = {}
        pickles = []
        for f in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else ():
            weight, index = _WEIGHT_RE.match(f.name), _INDEX_RE.match(f.name)
            if weight and weight.group(3) == "safetensors":
                safetensors.setdefault(weight.group(2), f.name)
            elif index and index.group(2) == "safetensors":
                safetensors[index.group(3)] = f.name
            elif f.suffix in _PICKLE_SUFFIXES and f.is_file() and not re.search(r"-\d+-of-\d+", f.name):
                pickles.append(f.name)
        return cls(safetensors, tuple(pickles))


def resolve_variant(files: WeightFiles, requested: str | None, preferred: str | None) -> str | None:
    """The variant a component loads (``None``: the plain file), or ``ValueError`` saying why none fits.

    ``requested`` (``--variant``) is taken where the component has it, else its plain file (as diffusers'
    pipelines fall back per component). Otherwise ``preferred`` (the deployment dtype's, e.g. ``fp16``) where
    present, else the plain file, else the only variant there is; several variants and no plain file need
    ``--variant``."""
    have = files.safetensors
    if requested:
        if requested in have:
            return requested
        if None in have:
            return None
    elif preferred in have and preferred is not None:
        return preferred
    elif None in have:
        return None
    elif len(have) == 1:
        return next(iter(have))
    variants = ", ".join(sorted(v for v in have if v))
    if requested and have:
        raise ValueError(f"has no {requested} weights (it has {variants}); choose one with --variant")
    if have:
        raise ValueError(f"has several weight variants ({variants}) and no plain file; choose one with --variant")
    if files.pickles:
        raise ValueError(f"has only pickle weights ({', '.join(files.pickles)}); Katz reads safetensors only, since "
                         "loading a pickle can run code")
    raise ValueError("has no weights (*.safetensors)")


def _pickle_advice(kind: str, family: str, folder: Path) -> str:
    lib, cls = component_classes(family)[kind]
    return (f"convert them once, where you trust the files: python -c \"from {lib} import {cls}; "
            f"{cls}.from_pretrained('{folder}', use_safetensors=False).save_pretrained('{folder}')\"")


def _deepest_side(channels: int, groups: int) -> int:
    """Latent pixels a feature map needs on each side where ``channels`` meet a GroupNorm of
    ``groups``: it normalises each group over the map, so a group must hold two values; with one
    channel per group a 1x1 map leaves one (PyTorch refuses it for a batch of one, and for two it
    normalises every value to the bias)."""
    return 1 if channels // groups >= 2 else 2


def is_flux_folder(path: Path) -> bool:
    """Whether the model folder ``path`` is FLUX.1's (it has a ``transformer/``), read without
    checking the rest of it."""
    return (Path(path) / "transformer").is_dir()


def min_flux_image_size(vae_config: dict) -> int:
    """The smallest width/height of a FLUX folder: the VAE's deepest map (as for the UNet families),
    on whole 2x2 latent patches (the transformer's tokens)."""
    vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    need = vae_scale * _deepest_side(vae_config["block_out_channels"][-1], int(vae_config.get("norm_num_groups", 32)))
    patch = 2 * vae_scale
    return -(-need // patch) * patch


def min_image_size(unet_config: dict, vae_config: dict, controlnet_configs=()) -> int:
    """The smallest width/height in pixels that every network of a folder runs.

    The UNet and each ControlNet shrink the latent by ``2 ** (down blocks - 1)``; their deepest
    map must be one latent pixel (two where the channels entering the last down block are one per
    GroupNorm group), and the VAE decoder's deepest map is the latent itself. The size is that
    many latent pixels times the VAE's scale factor, the largest over the networks.
    """
    vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    need = vae_scale * _deepest_side(vae_config["block_out_channels"][-1], int(vae_config.get("norm_num_groups", 32)))
    for cfg in (unet_config, *controlnet_configs):
        factor = 2 ** (len(cfg["down_block_types"]) - 1)
        # the last down block takes the previous block's channels and makes its own
        channels = min(cfg["block_out_channels"][-2:])
        need = max(need, vae_scale * factor * _deepest_side(channels, int(cfg.get("norm_num_groups", 32))))
    return -(-need // 8) * 8  # request sizes are multiples of 8


def _a(family: str) -> str:
    """``family`` with its article, as the messages say it: an sd15, an sdxl, a flux."""
    return f"a {family}" if family == "flux" else f"an {family}"


def _family(unet_or_controlnet_config: dict) -> str:
    """FLUX.1's transformers and ControlNets have single-stream blocks (``num_single_layers``); SDXL's
    UNets and ControlNets take ``text_time`` added conditioning; SD 1.5's take none."""
    if "num_single_layers" in unet_or_controlnet_config:
        return "flux"
    return "sdxl" if unet_or_controlnet_config.get("addition_embed_type") == "text_time" else "sd15"


_PROVIDED: dict[str, torch.nn.Module] = {}
_PROVIDED_LOCK = threading.Lock()


@contextlib.contextmanager
def provided_modules(modules: dict[str, torch.nn.Module]):
    """Within this context every folder's load of a part named in ``modules`` (``transformer``, ``vae``,
    ``text_encoder_2``, ...; ``controlnet`` for any ControlNet) returns that module, already on its device
    and in its dtype, instead of reading weights: one process can run diffusers and Katz on the same
    module objects (a 12 B FLUX transformer fits one GPU once, not twice; ``bench/flux_bench.py``)."""
    with _PROVIDED_LOCK:
        if _PROVIDED:
            raise RuntimeError("provided_modules does not nest")
        _PROVIDED.update(modules)
    try:
        yield
    finally:
        with _PROVIDED_LOCK:
            _PROVIDED.clear()


class ModelFolderError(ValueError):
    """A model or ControlNet folder or file cannot be served: each line of the message names one problem."""


def _check_component(folder: Path, part: str, family: str, problems: list[str], weights: tuple | None) -> str | None:
    """Append the problems of ``part`` of a ``family`` model; with ``weights`` = (requested, preferred
    variant), resolve and return the variant its weights load from."""
    sub = folder / part
    if not sub.is_dir():
        problems.append(f"{part}/ is missing")
        return None
    if part.startswith("tokenizer"):
        # FLUX.1's second tokenizer is T5's (SentencePiece), the others CLIP's (BPE); a fast
        # tokenizer's tokenizer.json serves either
        if family == "flux" and part == "tokenizer_2":
            need, missing = ("spiece.model",), "tokenizer.json or spiece.model"
        else:
            need, missing = ("vocab.json", "merges.txt"), "vocab.json + merges.txt"
        if not (sub / "tokenizer.json").exists() and not all((sub / f).exists() for f in need):
            problems.append(f"{part}/ is missing {missing}")
        return None
    config = "scheduler_config.json" if part == "scheduler" else "config.json"
    if not (sub / config).exists():
        problems.append(f"{part}/ is missing {config}")
    if weights is None:
        return None
    return _resolve(sub, part, part, family, weights, problems)


def _resolve(folder: Path, label: str, kind: str, family: str, weights: tuple, problems: list[str]) -> str | None:
    files = WeightFiles.scan(folder)
    try:
        return resolve_variant(files, *weights)
    except ValueError as exc:
        advice = f"; {_pickle_advice(kind, family, folder)}" if files.pickles and not files.safetensors else ""
        problems.append(f"{label}/ {exc}{advice}")
        return None


@dataclass
class ModelFolder:
    """A validated SD 1.5, SDXL or FLUX.1 model: a diffusers-format folder, or a single-file SD 1.5 / SDXL
    ``checkpoint`` served with the config folder ``path`` of its architecture.

    ``family`` is ``"flux"`` when the folder has a ``transformer/``, ``"sdxl"`` when the UNet takes
    ``text_time`` added conditioning (and there is a second text encoder), else ``"sd15"``. ``variant``
    (``--variant``) and ``dtype`` (the deployment's) pick the weight files each component loads
    (:func:`resolve_variant`), a FLUX transformer and T5 encoder as the others. ``controlnets`` maps names
    to ControlNet folders or single files (single files: SD 1.5 / SDXL ControlNets).
    """

    path: Path
    controlnets: dict[str, Path] = field(default_factory=dict)
    variant: str | None = None
    dtype: str = "float32"
    checkpoint: Path | None = None

    def __post_init__(self) -> None:
        from katz.models.checkpoint import CheckpointError, inspect_checkpoint

        self.path = Path(self.path)
        self.variant = self.variant or None
        if not self.path.is_dir():
            raise ModelFolderError(f"model folder {self.path} does not exist")
        problems: list[str] = []
        self._checkpoint = None
        if self.checkpoint is not None:
            self.checkpoint = Path(self.checkpoint)
            try:
                self._checkpoint = inspect_checkpoint(self.checkpoint)
            except CheckpointError as exc:
                raise ModelFolderError(str(exc)) from None
            if self._checkpoint.kind != "model":
                raise ModelFolderError(f"checkpoint {self.checkpoint} is a ControlNet, not a model; register it with "
                                       "--controlnet NAME=FILE")
        weights = None if self.checkpoint else (self.variant, DTYPE_VARIANTS.get(self.dtype))
        weighted = component_classes(self.family)
        parts = ["transformer" if self.family == "flux" else "unet", "vae", "scheduler", "text_encoder", "tokenizer"]
        if self.family in ("sdxl", "flux"):
            parts += ["text_encoder_2", "tokenizer_2"]
        self._variants = {}
        for part in parts:
            self._variants[part] = _check_component(self.path, part, self.family, problems,
                                                    weights if part in weighted else None)
        self._controlnet_files = {}
        self.controlnets = {name: Path(cn) for name, cn in self.controlnets.items()}
        for name, cn in self.controlnets.items():
            label = f"ControlNet {name!r} ({cn})"
            if cn.is_file():
                try:
                    info = inspect_checkpoint(cn)
                except CheckpointError as exc:
                    problems.append(f"ControlNet {name!r}: {exc}")
                    continue
                if info.kind != "controlnet":
                    problems.append(f"{label} is a whole model, not a ControlNet")
                elif info.family != self.family:
                    problems.append(f"{label} is {_a(info.family)} ControlNet; this model is {self.family}")
                else:
                    self._controlnet_files[name] = info
            elif not cn.is_dir():
                problems.append(f"{label} does not exist")
            else:
                if not (cn / "config.json").exists():
                    problems.append(f"{label} is missing config.json")
                elif (family := _family(json.loads((cn / "config.json").read_text()))) != self.family:
                    problems.append(f"{label} is {_a(family)} ControlNet; this model is {self.family}")
                self._variants[f"controlnet:{name}"] = _resolve(
                    cn, label, "controlnet", self.family, (self.variant, DTYPE_VARIANTS.get(self.dtype)), problems)
        if problems:
            what = f"checkpoint {self.checkpoint}" if self.checkpoint else f"model folder {self.path}"
            raise ModelFolderError(f"{what} cannot be served:\n  - " + "\n  - ".join(problems))

    @classmethod
    def from_checkpoint(cls, checkpoint: Path, controlnets: dict | None = None, variant: str | None = None,
                        dtype: str = "float32", root: Path | None = None) -> "ModelFolder":
        """The model of a single-file checkpoint, with the config folder of the architecture its keys show."""
        from katz.models.checkpoint import CheckpointError, config_folder, inspect_checkpoint

        try:
            info = inspect_checkpoint(checkpoint)
        except CheckpointError as exc:
            raise ModelFolderError(str(exc)) from None
        return cls(config_folder(info.architecture, root), controlnets or {}, variant, dtype, Path(checkpoint))

    def check_weights(self) -> None:
        """The deeper check of single files (the checkpoint and ControlNet files): every weight its networks
        need is there, in the right shape (compared on PyTorch's meta device; nothing is read). Folders'
        weight files were checked on construction. Raises :class:`ModelFolderError` listing every problem."""
        from katz.models.checkpoint import check_checkpoint, controlnet_config_folder

        problems = []
        if self._checkpoint is not None:
            problems += [f"{self.checkpoint}: {p}" for p in check_checkpoint(self._checkpoint, self.path)]
        for name, info in self._controlnet_files.items():
            problems += [f"ControlNet {name!r} ({info.path}): {p}"
                         for p in check_checkpoint(info, controlnet_config_folder(info.architecture))]
        if problems:
            raise ModelFolderError("the weights do not fit their configs:\n  - " + "\n  - ".join(problems))

    def weight_variant(self, part: str) -> str | None:
        """The variant ``part`` (``unet``, ..., ``controlnet:<name>``) loads; None: its plain file."""
        return self._variants.get(part)

    # ------------------------------------------------------------------ facts
    @cached_property
    def family(self) -> str:
        if is_flux_folder(self.path):
            return "flux"
        unet_cfg = self.path / "unet" / "config.json"
        if unet_cfg.exists():
            return _family(json.loads(unet_cfg.read_text()))
        return "sdxl" if (self.path / "text_encoder_2").exists() else "sd15"

    @cached_property
    def unet_config(self) -> dict:
        return json.loads((self.path / "unet" / "config.json").read_text())

    @cached_property
    def transformer_config(self) -> dict:
        """A FLUX folder's ``FluxTransformer2DModel`` config."""
        return json.loads((self.path / "transformer" / "config.json").read_text())

    @property
    def guidance_embeds(self) -> bool:
        """FLUX: the transformer takes the guidance scale as an input (dev; schnell does not)."""
        return self.family == "flux" and bool(self.transformer_config.get("guidance_embeds", False))

    @property
    def classifier_free_guidance(self) -> bool:
        """Whether a guidance scale above 1 runs the denoiser on a negative and a positive row (SD
        1.5, SDXL); FLUX runs one row, its guidance (dev) an input of the transformer."""
        return self.family != "flux"

    @property
    def latent_channels(self) -> int:
        """Channels of the (unpacked) latent the denoiser works on."""
        if self.family == "flux":
            return int(self.transformer_config["in_channels"]) // 4
        return int(self.unet_config["in_channels"])

    @cached_property
    def vae_config(self) -> dict:
        return json.loads((self.path / "vae" / "config.json").read_text())

    @cached_property
    def scheduler_config(self) -> dict:
        return json.loads((self.path / "scheduler" / "scheduler_config.json").read_text())

    @cached_property
    def model_index(self) -> dict:
        index = self.path / "model_index.json"
        return json.loads(index.read_text()) if index.exists() else {}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def default_size(self) -> int:
        """Default image side in pixels (diffusers: ``unet.sample_size * vae_scale_factor``; FLUX:
        ``128 * vae_scale_factor``, as FluxPipeline's default)."""
        if self.family == "flux":
            return 128 * self.vae_scale_factor
        return int(self.unet_config["sample_size"]) * self.vae_scale_factor

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """SDXL: an absent negative prompt means zero embeddings (diffusers' default True)."""
        return self.family == "sdxl" and bool(self.model_index.get("force_zeros_for_empty_prompt", True))

    @property
    def text_encoder_parts(self) -> tuple[str, ...]:
        return ("text_encoder", "text_encoder_2") if self.family in ("sdxl", "flux") else ("text_encoder",)

    @property
    def tokenizer_parts(self) -> tuple[str, ...]:
        return ("tokenizer", "tokenizer_2") if self.family in ("sdxl", "flux") else ("tokenizer",)

    @property
    def num_down_residuals(self) -> int:
        """How many ControlNet down-block residuals the UNet takes (conv_in + each resnet + each downsampler)."""
        blocks = self.unet_config["down_block_types"]
        layers = self.unet_config.get("layers_per_block", 2)
        per_block = layers if isinstance(layers, list) else [layers] * len(blocks)
        return 1 + sum(per_block) + (len(blocks) - 1)

    @property
    def residual_names(self) -> list[str]:
        """The ControlNet residual tensors' names, as the models pass them: ``down_residual_0`` ..
        ``down_residual_{n-1}``, then ``mid_residual``."""
        return [f"down_residual_{i}" for i in range(self.num_down_residuals)] + ["mid_residual"]

    @property
    def unet_downsampling_factor(self) -> int:
        """How much the UNet shrinks its input at the bottom: ``2 ** (down blocks - 1)``
        (latent bands of spatial sharding start and end on multiples of it)."""
        return 2 ** (len(self.unet_config["down_block_types"]) - 1)

    @cached_property
    def min_image_size(self) -> int:
        """The smallest width/height every network here runs, ControlNets included (:func:`min_image_size`):
        32 for SDXL and the tiny presets, 64 for SD 1.5; FLUX: :func:`min_flux_image_size` (16 for the tiny
        FLUX presets)."""
        if self.family == "flux":
            return min_flux_image_size(self.vae_config)
        controlnets = [self.controlnet_config(name) for name in self.controlnets]
        return min_image_size(self.unet_config, self.vae_config, controlnets)

    # ---------------------------------------------------------------- loading
    def _load(self, part: str, dtype: torch.dtype, **extra):
        """``part`` (``unet``, ``transformer``, ``vae``, a text encoder, or ``controlnet:<name>`` of a ControlNet
        folder) with the class its family loads it with (:func:`component_classes`): from the checkpoint where
        that holds it, else from its folder, safetensors only, in the variant the checks resolved (or the
        module :func:`provided_modules` gives for it)."""
        provided = _PROVIDED.get(part.partition(":")[0])
        if provided is not None:
            return provided
        if self._checkpoint is not None and part in self._checkpoint.parts:
            from katz.models.checkpoint import load_part

            return load_part(self._checkpoint, part, dtype, self.path)
        kind, _, name = part.partition(":")
        lib, cls = component_classes(self.family)[kind]
        folder = self.controlnets[name] if name else self.path / part
        return getattr(importlib.import_module(lib), cls).from_pretrained(
            folder, torch_dtype=dtype, variant=self._variants.get(part), use_safetensors=True, **extra)

    def load_unet(self, device: str = "cpu", dtype: torch.dtype = torch.float32):
        return self._load("unet", dtype).to(device).eval()

    def load_transformer(self, device: str = "cpu", dtype: torch.dtype = torch.float32):
        """A FLUX folder's ``FluxTransformer2DModel``."""
        return self._load("transformer", dtype).to(device).eval()

    def load_vae(self, device: str = "cpu", dtype: torch.dtype = torch.float32):
        return self._load("vae", dtype).to(device).eval()

    def load_text_encoder(self, part: str, dtype: torch.dtype = torch.float32, **extra):
        """One text encoder (``text_encoder``: CLIP; ``text_encoder_2``: SDXL's second CLIP or FLUX's T5) on
        the CPU; ``extra`` goes to ``from_pretrained`` (a checkpoint's take none)."""
        model = self._load(part, dtype, **extra)
        if self._checkpoint is not None and extra.get("attn_implementation"):
            model.set_attn_implementation(extra["attn_implementation"])
        return model.eval()

    def load_text_encoders(self, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
        return {part: self.load_text_encoder(part, dtype).to(device).eval() for part in self.text_encoder_parts}

    def load_tokenizers(self) -> dict:
        from transformers import CLIPTokenizer

        out = {part: CLIPTokenizer.from_pretrained(self.path / part) for part in self.tokenizer_parts
               if not (self.family == "flux" and part == "tokenizer_2")}
        if self.family == "flux":
            from transformers import T5TokenizerFast

            out["tokenizer_2"] = T5TokenizerFast.from_pretrained(self.path / "tokenizer_2")
        return out

    def controlnet_config(self, name: str) -> dict:
        if name in self._controlnet_files:
            from katz.models.checkpoint import controlnet_config_folder

            return json.loads((controlnet_config_folder(self._controlnet_files[name].architecture) / "config.json").read_text())
        return json.loads((self.controlnets[name] / "config.json").read_text())

    def load_controlnet(self, name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
        if name not in self.controlnets:
            raise KeyError(name)
        if name in self._controlnet_files:
            from katz.models.checkpoint import controlnet_config_folder, load_part

            info = self._controlnet_files[name]
            net = load_part(info, "controlnet", dtype, controlnet_config_folder(info.architecture))
        else:
            net = self._load(f"controlnet:{name}", dtype)
        return net.to(device).eval()


def discover_controlnets(folder: Path) -> dict[str, Path]:
    """Each sub-folder of ``folder`` holding a ``config.json`` is a ControlNet named after it, and so is
    each single-file ControlNet (``<name>.safetensors``) there."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = {p.name: p for p in sorted(folder.iterdir()) if (p / "config.json").exists()}
    for p in sorted(folder.glob("*.safetensors")):
        found.setdefault(p.stem, p)
    return found


def add_model_arguments(parser, controlnet_help: str) -> None:
    """The flags that name a model, as :func:`open_model` takes them (``katz serve``, ``render``, ``export``)."""
    from katz.models.presets import DEFAULT_PRESET, PRESETS

    src = parser.add_mutually_exclusive_group()
    src.add_argument("--preset", help=f"built-in model ({', '.join(PRESETS)}); default {DEFAULT_PRESET}")
    src.add_argument("--model-dir", type=Path, help="local diffusers-format SD 1.5 / SDXL / FLUX.1 folder")
    src.add_argument("--checkpoint", type=Path, metavar="FILE.safetensors",
                     help="single-file SD 1.5 / SDXL checkpoint in the original (A1111 / ComfyUI) layout "
                          "(FLUX.1: serve its diffusers folder with --model-dir)")
    parser.add_argument("--variant", help="weight files to read where a folder has several (e.g. fp16: "
                        "model.fp16.safetensors); default: the one matching --dtype where present, else the plain files")
    parser.add_argument("--controlnet", action="append", default=[], metavar="NAME=DIR|FILE", help=controlnet_help)


def open_model(model_dir: Path | None = None, checkpoint: Path | None = None, controlnets=(),
               variant: str | None = None, dtype: str = "float32", preset: str | None = None) -> ModelFolder:
    """The model the ``katz`` commands name: ``--model-dir`` (its ``controlnets/`` registered), ``--checkpoint``
    or ``--preset`` (default: the default preset), plus ``--controlnet NAME=DIR|FILE`` specs. Raises
    :class:`ModelFolderError` listing every problem, or naming a malformed ``--controlnet`` spec."""
    from katz.models.presets import DEFAULT_PRESET, ensure_preset

    registered: dict[str, Path] = {}
    if checkpoint is None:
        model_dir = Path(model_dir or ensure_preset(preset or DEFAULT_PRESET)).resolve()
        registered = discover_controlnets(model_dir / "controlnets")
    for spec in controlnets:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ModelFolderError(f"--controlnet expects NAME=DIR or NAME=FILE, got {spec!r}")
        registered[name] = Path(path).resolve()
    if checkpoint is not None:
        return ModelFolder.from_checkpoint(Path(checkpoint).resolve(), registered, variant, dtype)
    return ModelFolder(model_dir, registered, variant, dtype)

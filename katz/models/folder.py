"""A diffusers-format model folder: what it holds, whether it is complete, how to load it.

Real weights and the built-in presets go through this one class. A folder holds
``unet/``, ``vae/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/`` and, for
SDXL, ``text_encoder_2/`` and ``tokenizer_2/``. A FLUX.1 folder holds ``transformer/``
instead of ``unet/`` and a T5 encoder as ``text_encoder_2/`` (``tokenizer_2/``). ControlNets
are separate diffusers-format folders (``config.json`` + weights), registered by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
)


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


class ModelFolderError(ValueError):
    """A model or ControlNet folder is missing parts or is not diffusers format."""


def _check_component(folder: Path, part: str, needs_weights: bool, missing: list[str]) -> None:
    sub = folder / part
    if not sub.is_dir():
        missing.append(f"{part}/")
        return
    config = "scheduler_config.json" if part == "scheduler" else "config.json"
    if part.startswith("tokenizer"):
        if not ((sub / "vocab.json").exists() and (sub / "merges.txt").exists()) and not (
            sub / "tokenizer.json"
        ).exists():
            missing.append(f"{part}/vocab.json+merges.txt")
        return
    if not (sub / config).exists():
        missing.append(f"{part}/{config}")
    if needs_weights and not any((sub / w).exists() for w in _WEIGHT_FILES):
        missing.append(f"{part}/<weights>.safetensors")


def check_controlnet_folder(path: Path) -> None:
    """Raise :class:`ModelFolderError` unless ``path`` is a diffusers ControlNet folder."""
    missing: list[str] = []
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(f"ControlNet folder {path} does not exist")
    if not (path / "config.json").exists():
        missing.append("config.json")
    if not any((path / w).exists() for w in _WEIGHT_FILES):
        missing.append("<weights>.safetensors")
    if missing:
        raise ModelFolderError(f"ControlNet folder {path} is missing: {', '.join(missing)}")


@dataclass
class ModelFolder:
    """A validated diffusers-format SD 1.5, SDXL or FLUX.1 folder.

    ``family`` is ``"flux"`` when the folder has a ``transformer/``, ``"sdxl"`` when the UNet
    takes ``text_time`` added conditioning (a second text encoder), else ``"sd15"``.
    """

    path: Path
    controlnets: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.path.is_dir():
            raise ModelFolderError(f"model folder {self.path} does not exist")
        missing: list[str] = []
        parts = ["transformer" if self.family == "flux" else "unet", "vae", "scheduler", "text_encoder", "tokenizer"]
        if self.family in ("sdxl", "flux"):
            parts += ["text_encoder_2", "tokenizer_2"]
        for part in parts:
            _check_component(self.path, part, part not in ("scheduler",), missing)
        if missing:
            raise ModelFolderError(f"model folder {self.path} is missing: {', '.join(missing)}")
        for name, cn in self.controlnets.items():
            check_controlnet_folder(cn)

    # ------------------------------------------------------------------ facts
    @cached_property
    def family(self) -> str:
        if is_flux_folder(self.path):
            return "flux"
        unet_cfg = self.path / "unet" / "config.json"
        if unet_cfg.exists():
            cfg = json.loads(unet_cfg.read_text())
            return "sdxl" if cfg.get("addition_embed_type") == "text_time" else "sd15"
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
        32 for SDXL and the tiny presets, 64 for SD 1.5."""
        if self.family == "flux":
            return min_flux_image_size(self.vae_config)
        controlnets = [json.loads((p / "config.json").read_text()) for p in self.controlnets.values()]
        return min_image_size(self.unet_config, self.vae_config, controlnets)

    # ---------------------------------------------------------------- loading
    def load_unet(self, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(self.path / "unet", torch_dtype=dtype).to(device).eval()

    def load_transformer(self, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel.from_pretrained(self.path / "transformer", torch_dtype=dtype).to(device).eval()

    def load_vae(self, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(self.path / "vae", torch_dtype=dtype).to(device).eval()

    def load_text_encoders(self, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        out = {"text_encoder": CLIPTextModel.from_pretrained(self.path / "text_encoder", torch_dtype=dtype)}
        if self.family == "flux":
            from transformers import T5EncoderModel

            out["text_encoder_2"] = T5EncoderModel.from_pretrained(self.path / "text_encoder_2", torch_dtype=dtype)
        elif self.family == "sdxl":
            out["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                self.path / "text_encoder_2", torch_dtype=dtype
            )
        return {k: v.to(device).eval() for k, v in out.items()}

    def load_tokenizers(self) -> dict:
        from transformers import CLIPTokenizer

        out = {part: CLIPTokenizer.from_pretrained(self.path / part) for part in self.tokenizer_parts
               if not (self.family == "flux" and part == "tokenizer_2")}
        if self.family == "flux":
            from transformers import T5TokenizerFast

            out["tokenizer_2"] = T5TokenizerFast.from_pretrained(self.path / "tokenizer_2")
        return out

    def load_controlnet(self, name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from diffusers import ControlNetModel, FluxControlNetModel

        if name not in self.controlnets:
            raise KeyError(name)
        cls = FluxControlNetModel if self.family == "flux" else ControlNetModel
        return cls.from_pretrained(self.controlnets[name], torch_dtype=dtype).to(device).eval()


def discover_controlnets(folder: Path) -> dict[str, Path]:
    """Each sub-folder of ``folder`` holding a ``config.json`` is a ControlNet named after it."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir()) if (p / "config.json").exists()}

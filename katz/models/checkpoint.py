"""Single-file checkpoints: one ``.safetensors`` holding a whole SD 1.5 / SDXL model in the original layout.

A1111, ComfyUI and most community fine-tunes publish models this way: the UNet under
``model.diffusion_model.``, the VAE under ``first_stage_model.``, the text encoders under
``cond_stage_model.transformer.`` (SD 1.5) or ``conditioner.embedders.0.transformer.`` and
``conditioner.embedders.1.model.`` (SDXL, the second one in OpenCLIP's layout). ControlNets come as
one file too, in the original layout (``input_hint_block``, ``zero_convs``, optionally under
``control_model.``) or with diffusers' names. FLUX.1 files are recognised and refused by name: FLUX.1 is
served from diffusers-format folders.

The file carries weights but no configuration, so each architecture's diffusers configs ship with
Katz (``configs/sdxl``, ``configs/sd15``; the tiny presets' are the preset folders) and the
architecture is recognised from the file's keys and shapes (:func:`inspect_checkpoint`). Components are
loaded with diffusers' single-file conversion against those local configs: nothing is downloaded.
Only the tensors of the component being loaded are read, so each Triton model process reads its own
part of the file.
"""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from katz.models.presets import build_once, cache_dir, ensure_preset, write_clip_tokenizer

CONFIGS = Path(__file__).parent / "configs"
# the CLIP BPE merges (openai/CLIP, MIT licence: configs/CLIP-LICENSE) from which the tokenizers of
# the real architectures are written: every SD 1.5 / SDXL model uses this vocabulary
CLIP_BPE = CONFIGS / "bpe_simple_vocab_16e6.txt.gz"
# Bump when the shipped configs change, so materialised config folders are rewritten.
CONFIG_VERSION = 1

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
PREFIXES = {
    "sd15": {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": "cond_stage_model.transformer."},
    "sdxl": {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": "conditioner.embedders.0.transformer.",
             "text_encoder_2": "conditioner.embedders.1.model."},
}
CONTROLNET_PREFIX = "control_model."
# FLUX.1's transformer blocks, in BFL's original names (ComfyUI's under UNET_PREFIX) and diffusers', and the
# control-image embedding of diffusers' FluxControlNetModel: Katz serves FLUX.1 from folders only
FLUX_KEYS = ("double_blocks.", "single_blocks.", "single_transformer_blocks.", "controlnet_x_embedder.")


@dataclass(frozen=True)
class Signature:
    """What tells the architectures apart in a file: the UNet's first width, its cross-attention
    width and (ControlNets) the first width of the control-image embedding."""

    family: str
    width: int
    context: int
    hint: int


# each architecture Katz has configs for, recognised by its signature
ARCHITECTURES = {
    "sdxl": Signature("sdxl", 320, 2048, 16),
    "sd15": Signature("sd15", 320, 768, 16),
    "tiny-sdxl": Signature("sdxl", 32, 64, 8),
    "tiny-sd15": Signature("sd15", 32, 32, 8),
}


class CheckpointError(ValueError):
    """A single-file checkpoint cannot be read, is not an SD 1.5 / SDXL model, or does not fit its configs."""


@dataclass
class CheckpointInfo:
    """What :func:`inspect_checkpoint` found in a file."""

    path: Path
    kind: str  # "model" | "controlnet"
    architecture: str  # a key of ARCHITECTURES
    layout: str  # "original" | "diffusers" (ControlNets only; models are always original)
    dtype: torch.dtype  # the UNet's / ControlNet's stored floating dtype
    shapes: dict[str, tuple[int, ...]] = field(repr=False, default_factory=dict)

    @property
    def family(self) -> str:
        return ARCHITECTURES[self.architecture].family

    @property
    def parts(self) -> tuple[str, ...]:
        return ("controlnet",) if self.kind == "controlnet" else tuple(PREFIXES[self.family])


def _read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"checkpoint {path}: only .safetensors files are read ({path.suffix or 'no suffix'} files may be pickles, "
            "which can run code when loaded); convert it where you trust the file, e.g. with "
            "safetensors.torch.save_file(torch.load(FILE, weights_only=True)['state_dict'], 'model.safetensors')"
        )
    try:
        with safe_open(str(path), "pt") as f:
            shapes, dtypes = {}, {}
            for key in f.keys():
                s = f.get_slice(key)
                shapes[key], dtypes[key] = tuple(s.get_shape()), s.get_dtype()
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {exc}") from None
    return shapes, dtypes


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def _context_width(shapes: dict, prefix: str) -> int | None:
    for key, shape in shapes.items():
        if key.startswith(prefix) and key.endswith("attn2.to_k.weight") and len(shape) == 2:
            return shape[1]
    return None


def _match(path: Path, kind: str, family: str, width: int, context: int | None, hint: int | None) -> str:
    for name, sig in ARCHITECTURES.items():
        if (sig.family, sig.width) == (family, width) and context in (None, sig.context) and hint in (None, sig.hint):
            return name
    known = ", ".join(f"{n} (width {s.width}, context {s.context})" for n, s in ARCHITECTURES.items() if s.family == family)
    raise CheckpointError(
        f"checkpoint {path}: a {family} {kind} of width {width}, context {context}, which is none of the "
        f"architectures Katz has configs for ({known}); convert it to a diffusers folder where its configs are "
        "at hand and serve that with --model-dir"
    )


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Recognise a single-file model or ControlNet from its keys and shapes (reads the header only)."""
    path = Path(path)
    return recognise(path, *_read_header(path))


def recognise(path: Path, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> CheckpointInfo:
    """:func:`inspect_checkpoint` on a file's tensor names, shapes and safetensors dtypes (``F16``, ...)."""
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None:
        if any(k.startswith(CONTROLNET_PREFIX) for k in shapes):
            raise CheckpointError(f"checkpoint {path} holds a model with a ControlNet merged in; Katz serves "
                                  "ControlNets as files of their own (--controlnet NAME=FILE)")
        if any(k.startswith("cond_stage_model.model.") for k in shapes):
            raise CheckpointError(f"checkpoint {path} is a Stable Diffusion 2.x model (OpenCLIP text encoder "
                                  "under cond_stage_model.model.); Katz serves SD 1.5 and SDXL")
        if any(k.startswith("conditioner.embedders.1.") for k in shapes):
            family = "sdxl"
        elif any(k.startswith("conditioner.embedders.0.model.") for k in shapes):
            raise CheckpointError(f"checkpoint {path} is an SDXL refiner (one OpenCLIP text encoder); Katz serves "
                                  "SDXL base models and SD 1.5")
        elif any(k.startswith(PREFIXES["sd15"]["text_encoder"]) for k in shapes):
            family = "sd15"
        else:
            raise CheckpointError(f"checkpoint {path} has a UNet but no text encoder Katz knows "
                                  "(cond_stage_model.transformer. or conditioner.embedders.); is it a UNet-only file?")
        if conv_in[1] != 4:
            raise CheckpointError(f"checkpoint {path}: its UNet takes {conv_in[1]} input channels; Katz serves "
                                  "text-to-image models (4), not inpainting (9) or other variants")
        arch = _match(path, "model", family, conv_in[0], _context_width(shapes, UNET_PREFIX), None)
        return CheckpointInfo(path, "model", arch, "original", _DTYPES.get(dtypes[UNET_PREFIX + "input_blocks.0.0.weight"],
                                                                            torch.float32), shapes)
    for layout, prefix, conv, hint, sdxl_key in (
        ("original", CONTROLNET_PREFIX, "input_blocks.0.0.weight", "input_hint_block.0.weight", "label_emb.0.0.weight"),
        ("original", "", "input_blocks.0.0.weight", "input_hint_block.0.weight", "label_emb.0.0.weight"),
        ("diffusers", "", "conv_in.weight", "controlnet_cond_embedding.conv_in.weight", "add_embedding.linear_1.weight"),
    ):
        if prefix + conv in shapes and prefix + hint in shapes:
            family = "sdxl" if prefix + sdxl_key in shapes else "sd15"
            arch = _match(path, "ControlNet", family, shapes[prefix + conv][0], _context_width(shapes, prefix),
                          shapes[prefix + hint][0])
            return CheckpointInfo(path, "controlnet", arch, layout, _DTYPES.get(dtypes[prefix + conv], torch.float32),
                                  shapes)
    if any(k.removeprefix(UNET_PREFIX).startswith(FLUX_KEYS) for k in shapes):
        # refused by name: the configs shipped here are SD 1.5 / SDXL's, and a FLUX file is none of them
        what = "ControlNet" if any(k.startswith(("controlnet", "input_hint_block")) for k in shapes) else "model"
        raise CheckpointError(f"checkpoint {path} is a FLUX.1 {what}; single files are read for SD 1.5 and SDXL "
                              "only: serve FLUX.1 from its diffusers-format folder (--model-dir; ControlNets as "
                              "folders, --controlnet NAME=DIR)")
    raise CheckpointError(f"checkpoint {path} is neither an SD 1.5 / SDXL model (no {UNET_PREFIX}input_blocks) nor "
                          "a ControlNet (no input_hint_block / controlnet_cond_embedding)")


# ----------------------------------------------------------------- configs
def write_clip_tokenizer_files(folder: Path) -> None:
    """``vocab.json`` and ``merges.txt`` of the CLIP tokenizer every SD 1.5 / SDXL model uses, written from
    the BPE merges shipped with Katz exactly as CLIP builds its vocabulary (bytes, bytes + ``</w>``, one
    token per merge, then the two special tokens: 49408 ids)."""
    with gzip.open(CLIP_BPE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    write_clip_tokenizer(folder, lines[1 : 49152 - 256 - 2 + 1])


def config_folder(architecture: str, root: Path | None = None) -> Path:
    """A diffusers-format folder without weights (configs, scheduler, tokenizers) for ``architecture``,
    written once under the cache (``root``: the presets' cache root). The tiny presets' are their folders."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}")
    if architecture.startswith("tiny-"):
        return ensure_preset(architecture, root)
    root = Path(root) if root is not None else cache_dir()

    def build(out: Path) -> None:
        shutil.copytree(CONFIGS / architecture, out, dirs_exist_ok=True)
        for tok in ("tokenizer", "tokenizer_2"):
            if (out / tok).is_dir():
                write_clip_tokenizer_files(out / tok)

    return build_once(root, f"{architecture}-config-v{CONFIG_VERSION}", build)


def controlnet_config_folder(architecture: str, root: Path | None = None) -> Path:
    """The folder holding the ControlNet ``config.json`` of ``architecture``."""
    if architecture.startswith("tiny-"):
        return ensure_preset(architecture, root) / "controlnets" / "canny"
    return config_folder(architecture, root) / "controlnet"


# ----------------------------------------------------------------- loading
def _component_classes(part: str):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "controlnet": ControlNetModel,
            "text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}[part]


def _prefix(info: CheckpointInfo, part: str) -> str:
    if part == "controlnet":
        return CONTROLNET_PREFIX if any(k.startswith(CONTROLNET_PREFIX) for k in info.shapes) else ""
    return PREFIXES[info.family][part]


def _to_diffusers(info: CheckpointInfo, part: str, tensors: dict, model, config: dict) -> dict:
    """``tensors`` (the part's, original names) under the names of ``model`` (diffusers / transformers)."""
    from diffusers.loaders import single_file_utils as sfu

    if part == "unet":
        return sfu.convert_ldm_unet_checkpoint(tensors, config)
    if part == "vae":
        return sfu.convert_ldm_vae_checkpoint(tensors, config)
    if part == "controlnet":
        if info.layout == "diffusers":
            return dict(tensors)
        prefix = _prefix(info, part)
        out = sfu.convert_controlnet_checkpoint(tensors, config)
        # diffusers maps SDXL's label_emb for UNets but not for ControlNets
        for i, j in ((0, 1), (2, 2)):
            for p in ("weight", "bias"):
                key = f"{prefix}label_emb.0.{i}.{p}"
                if key in tensors:
                    out[f"add_embedding.linear_{j}.{p}"] = tensors[key]
        return out
    prefix = _prefix(info, part)
    if part == "text_encoder":
        out = sfu.convert_ldm_clip_checkpoint(tensors)
    else:
        out = sfu.convert_open_clip_checkpoint(model, tensors, prefix=prefix)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        out = {k.removeprefix("text_model."): v for k, v in out.items()}
    return out


def _empty_model(part: str, config_dir: Path):
    from accelerate import init_empty_weights

    cls = _component_classes(part)
    with init_empty_weights():
        if part.startswith("text_encoder"):
            return cls(cls.config_class.from_pretrained(config_dir, local_files_only=True)), None
        config = cls.load_config(config_dir, local_files_only=True)
        return cls.from_config(config), dict(config)


def _config_dir(part: str, configs: Path) -> Path:
    return Path(configs) if part == "controlnet" else Path(configs) / part


def configs_for(info: CheckpointInfo, root: Path | None = None) -> Path:
    """The config folder of the file's architecture: the model's (its parts in sub-folders) or the ControlNet's."""
    if info.kind == "controlnet":
        return controlnet_config_folder(info.architecture, root)
    return config_folder(info.architecture, root)


def check_checkpoint(info: CheckpointInfo, configs: Path) -> list[str]:
    """Every way the file does not fit its architecture's configs, as lines naming the part and keys;
    found by converting the file's key names and shapes (no weights read) and comparing with the networks
    the configs build, on PyTorch's meta device."""
    problems = []
    for part in info.parts:
        prefix = _prefix(info, part)
        if not any(k.startswith(prefix) for k in info.shapes):
            problems.append(f"{part}: no tensors under {prefix!r}")
            continue
        model, config = _empty_model(part, _config_dir(part, configs))
        meta = {k: torch.empty(s, device="meta") for k, s in info.shapes.items() if k.startswith(prefix)}
        try:
            got = {k: tuple(v.shape) for k, v in _to_diffusers(info, part, meta, model, config).items() if v is not None}
        except Exception as exc:  # diffusers' converters index keys they expect
            problems.append(f"{part}: its keys do not convert ({type(exc).__name__}: {exc})")
            continue
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        missing = sorted(set(want) - set(got))
        wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        if missing:
            problems.append(f"{part}: {len(missing)} weights missing, e.g. {', '.join(missing[:3])}")
        if wrong:
            problems.append(f"{part}: {len(wrong)} weights of the wrong shape, e.g. "
                            + ", ".join(f"{k} {got[k]} (expected {want[k]})" for k in wrong[:3]))
    return problems


def read_part(info: CheckpointInfo, part: str) -> dict[str, torch.Tensor]:
    """The tensors of one part, under their original names (the rest of the file is not read)."""
    from safetensors import safe_open

    prefix = _prefix(info, part)
    with safe_open(str(info.path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def load_part(info: CheckpointInfo, part: str, dtype: torch.dtype | None, configs: Path):
    """One network of the checkpoint (``unet``, ``vae``, ``text_encoder[_2]``, ``controlnet``) as its
    diffusers / transformers model in ``dtype`` (None: as stored), in eval mode, on the CPU; ``configs``:
    :func:`configs_for`."""
    from diffusers.models.model_loading_utils import load_model_dict_into_meta

    model, config = _empty_model(part, _config_dir(part, configs))
    state = _to_diffusers(info, part, read_part(info, part), model, config)
    want = model.state_dict().keys()
    missing = [k for k in want if k not in state]
    if missing:  # check_checkpoint reports this before a server starts; a load must not leave meta tensors
        raise CheckpointError(f"checkpoint {info.path}: {part} lacks {len(missing)} weights, e.g. {missing[:3]}")
    load_model_dict_into_meta(model, {k: state[k] for k in want}, dtype=dtype or info.dtype)
    return model.eval()


def convert_checkpoint(path: Path, out: Path, dtype: torch.dtype | None = None, root: Path | None = None,
                       log=lambda msg: None) -> Path:
    """Write the diffusers folder of a single-file model (configs, scheduler, tokenizers, safetensors
    weights) or ControlNet (``config.json`` + weights) to ``out``, in ``dtype`` (None: as stored)."""
    info = inspect_checkpoint(path)
    configs = configs_for(info, root)
    problems = check_checkpoint(info, configs)
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit the {info.architecture} configs:\n  " + "\n  ".join(problems))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"--out {out} is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    if info.kind == "controlnet":
        log(f"controlnet ({info.architecture})")
        load_part(info, "controlnet", dtype, configs).save_pretrained(out, safe_serialization=True)
        return out
    for part in ("scheduler", "tokenizer", "tokenizer_2"):
        if (configs / part).is_dir():
            shutil.copytree(configs / part, out / part)
    index = json.loads((configs / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    for part in info.parts:
        log(f"{part} ({info.architecture})")
        load_part(info, part, dtype, configs).save_pretrained(out / part, safe_serialization=True)
    return out

"""Built-in model presets: the real SDXL / SD 1.5 / FLUX.1 architectures at tiny width.

A preset is written once as an ordinary diffusers-format folder (``unet/``,
``vae/``, ``text_encoder/``, ``tokenizer/``, ... plus ``controlnets/`` and
``loras/``) under the cache directory, and then loaded through the same code
as real weights (:mod:`katz.models.folder`). Weights are seeded random numbers,
so every machine builds bit-identical files.

Layout of a preset folder::

    <cache>/<preset>/
        model_index.json, unet/, vae/, scheduler/, text_encoder[_2]/, tokenizer[_2]/
        controlnets/canny/           # one tiny ControlNet (diffusers format)
        loras/style.safetensors      # UNet-only LoRA (diffusers/peft names)
        loras/detail.safetensors     # UNet + text-encoder LoRA (kohya names)

The FLUX.1 presets hold ``transformer/`` instead of ``unet/`` and a T5 encoder as
``text_encoder_2/`` (its tokenizer a small unigram vocabulary built here, as the CLIP one
is). ``tiny-flux`` is the dev flavour (guidance embedding, resolution-dependent shift of
the flow-match schedule); ``tiny-flux-schnell`` the schnell one (neither). Its
``controlnets/canny/`` is a ``FluxControlNetModel``; ``loras/style`` has diffusers/peft
names, ``loras/detail`` the kohya names of the original FLUX layout (fused ``qkv``,
``linear1``), also on the CLIP text encoder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

PRESETS = ("tiny-sdxl", "tiny-sd15", "tiny-flux", "tiny-flux-schnell")
DEFAULT_PRESET = "tiny-sdxl"
# Bump when the generated files change, so stale caches are rebuilt.
PRESET_VERSION = 2

_TEXT_HIDDEN = 32
_VOCAB_SIZE = 1000
_T5_VOCAB_SIZE = 256
_T5_MAX_LENGTH = 512  # what FluxPipeline pads T5 prompts to (max_sequence_length)


def cache_dir() -> Path:
    """Root folder of generated presets (``$KATZ_CACHE`` or ``~/.cache/katz``)."""
    root = os.environ.get("KATZ_CACHE") or os.path.join(Path.home(), ".cache", "katz")
    return Path(root) / "presets"


class PresetCacheError(RuntimeError):
    """The preset cache folder cannot be written (and the preset is not there yet)."""


def ensure_preset(name: str, root: Path | None = None) -> Path:
    """Return the folder of preset ``name``, generating it on first use.

    A complete preset is only read, so a read-only cache works once filled; a
    missing preset in a folder that cannot be written raises :class:`PresetCacheError`.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return build_once(Path(root) if root is not None else cache_dir(), f"{name}-v{PRESET_VERSION}",
                      lambda out: _build_preset(name, out), what=f"preset {name!r}")


def build_once(root: Path, name: str, build, what: str | None = None) -> Path:
    """``root / name``, written by ``build(folder)`` the first time (into a temporary folder renamed into
    place, so concurrent processes and interrupted builds never leave a half-written one)."""
    target = root / name
    if (target / ".complete").exists():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    except OSError as exc:
        raise PresetCacheError(
            f"cannot write the model cache {root} to build {what or name} ({exc.strerror or exc}); "
            "make it writable or point $KATZ_CACHE at a writable folder"
        ) from None
    try:
        build(tmp)
        (tmp / ".complete").write_text("ok\n")
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished first: keep its copy.
            if not (target / ".complete").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_WORDS = (
    "a photo of the cat dog on in with red blue green house tree sky "
    "portrait landscape painting city night light water mountain style"
).split()


def write_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """Write a small CLIP BPE tokenizer (byte alphabet + common English merges)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for w in _WORDS:
        # merge left to right: t h -> th, th e</w> -> the</w>, ...
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            merged = pair[0] + pair[1]
            if f"{pair[0]} {pair[1]}" not in merges:
                merges.append(f"{pair[0]} {pair[1]}")
            if merged not in vocab:
                vocab[merged] = len(vocab)
            parts = [merged] + parts[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    assert len(vocab) <= _VOCAB_SIZE, len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "pad_token": pad_token, "tokenizer_class": "CLIPTokenizer"})
    )
    # Round-trip through transformers so the folder also gets its own tokenizer files.
    CLIPTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))


def write_clip_tokenizer(folder: Path, merges: list[str]) -> None:
    """CLIP's ``vocab.json`` and ``merges.txt`` from its BPE ``merges`` (lines "a b"), built as CLIP builds
    them: the byte alphabet, the same with ``</w>``, one token per merge, then the two special tokens."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def write_t5_tokenizer(folder: Path) -> None:
    """Write a small T5 unigram tokenizer: T5's special ids (pad 0, eos 1, unk 2), every ASCII
    letter, digit and punctuation mark with and without the word-start mark, and whole words."""
    import string

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for c in string.ascii_letters + string.digits + string.punctuation:
        vocab += [(c, -5.0), ("\u2581" + c, -5.5)]
    vocab += [("\u2581" + w, -1.0) for w in _WORDS]
    assert len(vocab) <= _T5_VOCAB_SIZE, len(vocab)
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.model_max_length = _T5_MAX_LENGTH
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))


# --------------------------------------------------------------------------- #
# Components
# --------------------------------------------------------------------------- #
def _text_encoder(with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=_VOCAB_SIZE,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=_TEXT_HIDDEN,
        hidden_act="gelu",
        # As in the released SD/SDXL configs: eos id 2 makes CLIP pool at the
        # highest token id, which is our tokenizer's <|endoftext|>.
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _vae(seed: int, latent_channels: int = 4, scaling_factor: float = 0.13025, **flux):
    """The SD/SDXL autoencoder layout; ``flux`` holds FLUX's differences (:func:`_vae_flux`)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=scaling_factor,
        **flux,
    ).eval()


def _unet_sdxl(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=2 * _TEXT_HIDDEN,
        norm_num_groups=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + _TEXT_HIDDEN,
    ).eval()


def _unet_sd15(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=_TEXT_HIDDEN,
        norm_num_groups=32,
    ).eval()


def _controlnet(unet, seed: int):
    """A ControlNet shaped like ``unet`` with random (not zero) output convs."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    return _randomize(net, ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding"), seed)


def _randomize(net, prefixes: tuple[str, ...], seed: int):
    """``net`` with its parameters under ``prefixes`` (a ControlNet's zero-initialised output
    projections) drawn at random, so that its residuals change the image."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(prefixes):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return net.eval()


def _t5_encoder(seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=_T5_VOCAB_SIZE,
        d_model=_TEXT_HIDDEN,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's encoder
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _vae_flux(seed: int):
    """FLUX's autoencoder layout: 16 latent channels, no quant convs, a shift factor."""
    return _vae(seed, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)


def _transformer_flux(seed: int, guidance: bool):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=_TEXT_HIDDEN,  # T5 width
        pooled_projection_dim=_TEXT_HIDDEN,  # CLIP width
        guidance_embeds=guidance,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def _controlnet_flux(transformer, seed: int):
    """A FluxControlNetModel started from ``transformer`` (as diffusers trains them), its zero
    projections made random so its residuals change the image."""
    from diffusers import FluxControlNetModel

    net = FluxControlNetModel.from_transformer(
        transformer, num_layers=1, num_single_layers=1,
        attention_head_dim=transformer.config.attention_head_dim,
        num_attention_heads=transformer.config.num_attention_heads,
    )
    return _randomize(net, ("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder"), seed)


def _scheduler_flux(schnell: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if schnell:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )


def _build_flux(out: Path, schnell: bool) -> None:
    from katz.lora.random import make_random_flux_lora

    _vae_flux(seed=1).save_pretrained(out / "vae", safe_serialization=True)
    _scheduler_flux(schnell).save_pretrained(out / "scheduler")
    te = _text_encoder(with_projection=False, seed=2)
    te.save_pretrained(out / "text_encoder", safe_serialization=True)
    write_tokenizer(out / "tokenizer")
    _t5_encoder(seed=3).save_pretrained(out / "text_encoder_2", safe_serialization=True)
    write_t5_tokenizer(out / "tokenizer_2")
    transformer = _transformer_flux(seed=4, guidance=not schnell)
    transformer.save_pretrained(out / "transformer", safe_serialization=True)
    _controlnet_flux(transformer, seed=5).save_pretrained(out / "controlnets" / "canny", safe_serialization=True)
    index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": "0.30.0",
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "image_encoder": [None, None],
        "feature_extractor": [None, None],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    loras = out / "loras"
    loras.mkdir()
    make_random_flux_lora(loras / "style.safetensors", transformer, None, rank=4, seed=6, fmt="peft")
    make_random_flux_lora(loras / "detail.safetensors", transformer, te, rank=4, seed=7, fmt="kohya")


def _scheduler(family: str):
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    common = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
    )
    if family == "sdxl":
        return EulerDiscreteScheduler(timestep_spacing="leading", **common)
    return PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **common)


def _build_preset(name: str, out: Path) -> None:
    from katz.lora.random import make_random_lora

    if name.startswith("tiny-flux"):
        _build_flux(out, schnell=name == "tiny-flux-schnell")
        return
    family = "sdxl" if name == "tiny-sdxl" else "sd15"
    vae = _vae(seed=1)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    _scheduler(family).save_pretrained(out / "scheduler")
    te = _text_encoder(with_projection=False, seed=2)
    te.save_pretrained(out / "text_encoder", safe_serialization=True)
    write_tokenizer(out / "tokenizer")
    encoders = {"text_encoder": te}
    if family == "sdxl":
        te2 = _text_encoder(with_projection=True, seed=3)
        te2.save_pretrained(out / "text_encoder_2", safe_serialization=True)
        write_tokenizer(out / "tokenizer_2", pad_token="!")
        encoders["text_encoder_2"] = te2
        unet = _unet_sdxl(seed=4)
        pipeline_class = "StableDiffusionXLPipeline"
    else:
        unet = _unet_sd15(seed=4)
        pipeline_class = "StableDiffusionPipeline"
    unet.save_pretrained(out / "unet", safe_serialization=True)
    _controlnet(unet, seed=5).save_pretrained(out / "controlnets" / "canny", safe_serialization=True)

    index = {
        "_class_name": pipeline_class,
        "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", type(_scheduler(family)).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    if family == "sdxl":
        index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
        index["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
        index["force_zeros_for_empty_prompt"] = True
    else:
        index["safety_checker"] = [None, None]
        index["feature_extractor"] = [None, None]
        index["requires_safety_checker"] = False
    (out / "model_index.json").write_text(json.dumps(index, indent=2))

    loras = out / "loras"
    loras.mkdir()
    make_random_lora(loras / "style.safetensors", unet, {}, rank=4, seed=6, fmt="peft")
    make_random_lora(loras / "detail.safetensors", unet, encoders, rank=4, seed=7, fmt="kohya")

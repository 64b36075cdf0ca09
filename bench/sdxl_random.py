"""Full-size SDXL (and a ControlNet) with seeded random weights, for GPU benchmarks.

The architecture and sizes are SDXL base 1.0's (UNet 2.6 B parameters, CLIP
ViT-L + OpenCLIP bigG text encoders, the SDXL VAE), so every step costs what
the real model costs; only the values are random. Written as an ordinary
diffusers folder so Katz and diffusers load the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

UNET = dict(
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=False,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")


def _small_init_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Random weights scaled like a trained net's (std 1/sqrt(fan_in)), so activations stay finite in fp16."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).to(p) / fan_in**0.5)


def build(out: Path, device: str = "cuda", with_controlnet: bool = True) -> Path:
    """Write the folder (fp16 safetensors) and return it; reuse it if complete."""
    from diffusers import AutoencoderKL, ControlNetModel, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from katz.models.presets import write_tokenizer

    out = Path(out)
    if (out / ".complete").exists():
        return out
    gen = torch.Generator(device).manual_seed(0)
    dtype = torch.float16
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET).to(dtype)
        _small_init_(unet, gen)
        unet.save_pretrained(out / "unet", safe_serialization=True)
        if with_controlnet:
            cn = ControlNetModel.from_unet(unet).to(dtype)
            _small_init_(cn, gen)
            cn.save_pretrained(out / "controlnets" / "canny", safe_serialization=True)
            del cn
        del unet
        vae = AutoencoderKL(**VAE).to(dtype)
        _small_init_(vae, gen)
        vae.save_pretrained(out / "vae", safe_serialization=True)
        del vae
        common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2)
        te = CLIPTextModel(CLIPTextConfig(**CLIP_L, **common)).to(dtype)
        te.save_pretrained(out / "text_encoder", safe_serialization=True)
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G, **common)).to(dtype)
        te2.save_pretrained(out / "text_encoder_2", safe_serialization=True)
    write_tokenizer(out / "tokenizer")
    write_tokenizer(out / "tokenizer_2", pad_token="!")
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                           timestep_spacing="leading").save_pretrained(out / "scheduler")
    index = {
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True,
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    (out / ".complete").write_text("ok\n")
    return out


def write_lora(path: Path, rank: int = 64, dtype: str = "float16") -> Path:
    """Write the benchmark LoRA and return its path; reuse a file there of the same rank and dtype.

    Seeded random, peft format, rank ``rank`` on to_q/to_k/to_v/to_out.0 of every attention of the
    SDXL UNet (issue 3's case), down/up weights in ``dtype``: at rank 64, 186 MB in 'float16',
    372 MB in 'float32'. The UNet is built on the meta device (only its layer shapes are needed).
    """
    from diffusers import UNet2DConditionModel

    from katz.lora.random import make_random_lora
    from katz.lora.safetensors import read_header

    path = Path(path)
    want = getattr(torch, dtype)
    if path.exists():
        with path.open("rb") as f:
            header = read_header(f.fileno(), path.stat().st_size, path.name, path.stem)
        downs = [s for k, s in header.tensors.items() if k.endswith(".lora_A.weight")]
        if downs and all(s.dtype == want and s.shape[0] == rank for s in downs):
            return path
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_random_lora(path, unet, {}, rank=rank, seed=1, fmt="peft", dtype=want)
    return path


def lora_copy(src: Path, dst: Path, where: str) -> Path:
    """A copy of the LoRA ``src`` at ``dst`` (a name a server has not seen), ``cold`` (evicted from the
    page cache) or with every page in the ``page_cache``."""
    import shutil

    from katz.lora.readahead import evict

    shutil.copy(src, dst)
    if where == "cold":
        evict(dst)
    else:
        Path(dst).read_bytes()
    return Path(dst)

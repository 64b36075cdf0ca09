"""Seed parity with diffusers: the Katz models, wired in-process, give diffusers' image.

Same weights, prompt, scheduler, steps, guidance and seed; float32 on the CPU;
max difference on uint8 output <= 2/255.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import control_png

PROMPT = "a photo of a red house"
STEPS = 4
TOLERANCE = 2


def _deployment(folder_path):
    from katz.deployment import Deployment
    from katz.models.folder import ModelFolder, discover_controlnets
    from katz.request import Limits

    folder = ModelFolder(folder_path, discover_controlnets(folder_path / "controlnets"))
    guidance = 5.0 if folder.family == "sdxl" else 7.5
    limits = Limits(default_width=64, default_height=64, default_guidance=guidance)
    return Deployment(folder.path, folder.controlnets, folder_path / "loras", limits, controlnet_mode="inline")


@pytest.fixture(scope="module")
def ensembles(preset_dir):
    from katz.serving.local import LocalEnsemble

    cache = {}

    def get(preset):
        if preset not in cache:
            cache[preset] = LocalEnsemble(_deployment(preset_dir(preset)))
        return cache[preset]

    return get


def _request(scheduler="default", controlnet=False, loras=(), seed=42, negative=None, guidance=None):
    req = {
        "prompt": np.array([PROMPT.encode()], object),
        "seed": np.array([seed], np.int64),
        "steps": np.array([STEPS], np.int32),
        "scheduler": np.array([scheduler.encode()], object),
    }
    if negative is not None:
        req["negative_prompt"] = np.array([negative.encode()], object)
    if guidance is not None:
        req["guidance_scale"] = np.array([guidance], np.float32)
    if controlnet:
        req["controlnets"] = np.array([b"canny"], object)
        req["control_images"] = np.array([control_png()], object)
        req["controlnet_scales"] = np.array([0.9], np.float32)
    if loras:
        req["loras"] = np.array([n.encode() for n, _ in loras], object)
        req["lora_scales"] = np.array([s for _, s in loras], np.float32)
        req["lora_k"] = np.array([0], np.int32)  # synchronous: patched before the first step, as diffusers fuses
    return req


def _diffusers_image(folder_path, scheduler, controlnet=False, loras=(), seed=42, negative=None, guidance=None):
    import diffusers

    from katz.diffusion.schedulers import make_scheduler
    from katz.models.folder import ModelFolder

    folder = ModelFolder(folder_path)
    kwargs = {}
    if folder.family == "sdxl":
        cls = diffusers.StableDiffusionXLControlNetPipeline if controlnet else diffusers.StableDiffusionXLPipeline
        kwargs["add_watermarker"] = False
    else:
        cls = diffusers.StableDiffusionControlNetPipeline if controlnet else diffusers.StableDiffusionPipeline
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    call = {}
    if controlnet:
        kwargs["controlnet"] = diffusers.ControlNetModel.from_pretrained(folder_path / "controlnets" / "canny")
        call["image"] = Image.open(io.BytesIO(control_png()))
        call["controlnet_conditioning_scale"] = 0.9
    pipe = cls.from_pretrained(folder_path, **kwargs)
    pipe.scheduler = make_scheduler(scheduler, folder.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    for name, _ in loras:
        pipe.load_lora_weights(folder_path / "loras", weight_name=f"{name}.safetensors", adapter_name=name)
    if loras:
        pipe.set_adapters([n for n, _ in loras], adapter_weights=[s for _, s in loras])
        pipe.fuse_lora(adapter_names=[n for n, _ in loras], lora_scale=1.0)
    out = pipe(
        PROMPT,
        negative_prompt=negative,
        num_inference_steps=STEPS,
        guidance_scale=guidance if guidance is not None else (5.0 if folder.family == "sdxl" else 7.5),
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **call,
    ).images[0]
    return (out * 255).round().astype(np.uint8)


def _max_diff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


CASES = [
    ("tiny-sdxl", dict(scheduler="default")),
    ("tiny-sdxl", dict(scheduler="euler_a", controlnet=True)),
    ("tiny-sdxl", dict(scheduler="dpmpp_2m", negative="blurry")),
    ("tiny-sdxl", dict(scheduler="ddim", guidance=1.0)),
    ("tiny-sdxl", dict(scheduler="euler", loras=(("style", 0.8), ("detail", 0.5)))),
    ("tiny-sdxl", dict(scheduler="euler", controlnet=True, loras=(("detail", 1.0),))),
    ("tiny-sd15", dict(scheduler="default")),
    ("tiny-sd15", dict(scheduler="ddim", controlnet=True)),
    ("tiny-sd15", dict(scheduler="euler_a", loras=(("style", 1.0), ("detail", 0.7)))),
]


@pytest.mark.parametrize("preset, case", CASES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(CASES)])
def test_matches_diffusers(preset, case, ensembles, preset_dir):
    ours = ensembles(preset).generate(_request(**case))
    ref = _diffusers_image(preset_dir(preset), **case)
    assert ours["image"].shape == (64, 64, 3)
    assert ours["image"].std() > 5, "image is flat: the test would not see a difference"
    assert _max_diff(ours["image"], ref) <= TOLERANCE
    assert int(ours["seed"][0]) == 42


def test_controlnet_and_lora_change_the_image_and_do_not_leak(ensembles):
    ens = ensembles("tiny-sdxl")
    plain = ens.generate(_request())["image"]
    with_cn = ens.generate(_request(controlnet=True))["image"]
    with_lora = ens.generate(_request(loras=(("style", 1.0),)))["image"]
    assert _max_diff(plain, with_cn) > 10
    assert _max_diff(plain, with_lora) > 10
    again = ens.generate(_request())["image"]
    assert np.array_equal(plain, again), "a LoRA or ControlNet request changed the next request's image"


def test_png_decodes_to_the_image(ensembles):
    out = ensembles("tiny-sd15").generate(_request(seed=3))
    decoded = np.asarray(Image.open(io.BytesIO(bytes(out["png"][0]))))
    assert np.array_equal(decoded, out["image"])


def test_vae_decodes_in_float32_where_the_model_asks_as_diffusers_does(preset_dir):
    """A float16 deployment decodes a ``force_upcast`` VAE (the SDXL VAE: its activations overflow
    float16) in float32 and returns the image in float16; a VAE fixed for float16 runs in float16."""
    from katz.engines.torch.vae import VaeDecoderEngine, vae_compute_dtype
    from katz.models.folder import ModelFolder

    assert vae_compute_dtype({"force_upcast": True}, torch.float16) == torch.float32
    assert vae_compute_dtype({"force_upcast": False}, torch.float16) == torch.float16
    assert vae_compute_dtype({}, torch.float16) == torch.float16
    assert vae_compute_dtype({"force_upcast": True}, torch.bfloat16) == torch.bfloat16
    folder = ModelFolder(preset_dir("tiny-sdxl"))
    assert folder.vae_config.get("force_upcast", False), "the tiny preset keeps diffusers' default"
    half = VaeDecoderEngine(folder, "cpu", torch.float16)
    assert {p.dtype for p in half.vae.parameters()} == {torch.float32}
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    image = half(latents.half())
    assert image.dtype == torch.float16
    full = VaeDecoderEngine(folder, "cpu", torch.float32)(latents.half().float())
    assert torch.equal(image, full.half())


def test_vae_decoder_load_survives_a_failed_compile(preset_dir):
    """Compiling the VAE needs a C compiler and Triton on the host; where it fails the decoder
    warns and decodes uncompiled instead of failing the model's load."""
    from katz.engines.torch.vae import VaeDecoderEngine
    from katz.models.folder import ModelFolder

    vae = VaeDecoderEngine(ModelFolder(preset_dir("tiny-sd15")), "cpu")

    def broken(latents):
        raise RuntimeError("no working C compiler found")

    vae.fast_decode, vae.compiled = broken, True  # as a compiled decode without CUDA graphs is set up
    with pytest.warns(RuntimeWarning, match="compiling the VAE decoder failed"):
        vae.warm_up([(64, 64)])
    assert vae.fast_decode is None and not vae.compiled
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(vae(latents), vae.eager_decode(latents))
    vae.fast_decode, vae.compiled = broken, False  # not compiled: a failure is the load's error
    with pytest.raises(RuntimeError, match="C compiler"):
        vae.warm_up([(64, 64)])

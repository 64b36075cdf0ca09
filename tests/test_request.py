"""Request validation: every bad field is named in the error, before any compute."""

from __future__ import annotations

import numpy as np
import pytest

from katz.errors import InvalidArgument
from katz.request import Limits, parse_request

from conftest import control_png

LIMITS = Limits(max_steps=50, max_width=256, max_height=256, default_width=64, default_height=64)


def b(*values: str) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=object)


def parse(**fields):
    base = {"prompt": b("a cat")}
    base.update(fields)
    return parse_request(base, LIMITS, frozenset({"canny"}), lambda name: name in ("style", "detail"))


def test_defaults_fill_in():
    req = parse()
    assert (req.steps, req.width, req.height, req.scheduler) == (30, 64, 64, "default")
    assert 0 <= req.seed < 2**63
    assert req.do_cfg and req.negative_prompt is None


def test_full_request_round_trips():
    req = parse(
        negative_prompt=b("blurry"), seed=np.array([5], np.int64), steps=np.array([4], np.int32),
        guidance_scale=np.array([1.0], np.float32), width=np.array([128], np.int32),
        height=np.array([64], np.int32), scheduler=b("euler_a"), controlnets=b("canny"),
        control_images=np.array([control_png()], dtype=object), controlnet_scales=np.array([0.5], np.float32),
        loras=b("style", "detail"), lora_scales=np.array([0.7, -1.0], np.float32),
    )
    assert (req.seed, req.steps, req.width, req.height, req.scheduler) == (5, 4, 128, 64, "euler_a")
    assert not req.do_cfg
    assert req.controlnet_scales == [0.5] and req.loras == ["style", "detail"] and req.lora_scales == pytest.approx([0.7, -1.0])


@pytest.mark.parametrize(
    "fields, field, words",
    [
        ({"prompt": None}, "prompt", "required"),
        ({"prompt": b("x" * 5000)}, "prompt", "longer"),
        ({"prompt": np.array([b"\xff\xfe"], dtype=object)}, "prompt", "UTF-8"),
        ({"steps": np.array([0], np.int32)}, "steps", "outside"),
        ({"steps": np.array([51], np.int32)}, "steps", "outside"),
        ({"steps": np.array([1, 2], np.int32)}, "steps", "one value"),
        ({"steps": np.array([2.5], np.float32)}, "steps", "integer"),
        ({"seed": np.array([-1], np.int64)}, "seed", "outside"),
        ({"width": np.array([100], np.int32)}, "width", "multiple of 8"),
        ({"height": np.array([0], np.int32)}, "height", "multiple of 8"),
        ({"width": np.array([512], np.int32)}, "width", "maximum"),
        ({"guidance_scale": np.array([np.nan], np.float32)}, "guidance_scale", "outside"),
        ({"guidance_scale": np.array([np.inf], np.float32)}, "guidance_scale", "outside"),
        ({"scheduler": b("lms_karras")}, "scheduler", "unknown scheduler"),
        ({"controlnets": b("depth"), "control_images": np.array([control_png()], object)}, "controlnets", "unknown"),
        ({"controlnets": b("canny")}, "control_images", "0 images"),
        ({"controlnets": b("canny"), "control_images": np.array([control_png()], object),
          "controlnet_scales": np.array([1.0, 2.0], np.float32)}, "controlnet_scales", "2 values"),
        ({"controlnets": b("canny"), "control_images": np.array([control_png()], object),
          "controlnet_scales": np.array([np.nan], np.float32)}, "controlnet_scales", "not finite"),
        ({"controlnets": b("canny"), "control_images": np.array([control_png()], object),
          "controlnet_scales": np.array([11.0], np.float32)}, "controlnet_scales", "outside"),
        ({"loras": b("nope")}, "loras", "unknown LoRA"),
        ({"loras": b("../etc/passwd")}, "loras", "invalid LoRA name"),
        ({"loras": b("a/b")}, "loras", "invalid LoRA name"),
        ({"loras": b("style", "style")}, "loras", "twice"),
        ({"loras": b("style"), "lora_scales": np.array([1.0, 1.0], np.float32)}, "lora_scales", "2 values"),
        ({"loras": b("style"), "lora_scales": np.array([np.inf], np.float32)}, "lora_scales", "not finite"),
        ({"loras": b("style"), "lora_scales": np.array([-10.5], np.float32)}, "lora_scales", "outside"),
        ({"bogus": b("x")}, "bogus", "not a known input"),
    ],
)
def test_bad_fields_name_the_field(fields, field, words):
    with pytest.raises(InvalidArgument) as info:
        parse(**fields)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")
    assert words in str(info.value)


@pytest.mark.parametrize(
    "data, words",
    [(b"", "empty"), (b"not an image", "cannot decode"), (control_png()[:40], "cannot decode")],
)
def test_undecodable_control_images(data, words):
    from katz.diffusion.images import decode_control_image

    with pytest.raises(InvalidArgument) as info:
        decode_control_image(data, 64, 64, max_pixels=1 << 20)
    assert info.value.field == "control_images" and words in str(info.value)


def test_control_image_pixel_limit():
    from katz.diffusion.images import decode_control_image

    with pytest.raises(InvalidArgument, match="pixel limit"):
        decode_control_image(control_png(size=64), 64, 64, max_pixels=1000)
    x = decode_control_image(control_png(size=48), 64, 32, max_pixels=1 << 20)
    assert x.shape == (1, 3, 32, 64) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_preprocessing_makes_the_control_image_processor_at_load(preset_dir):
    """diffusers' image processor (its import takes seconds) is made when the preprocessing model
    loads, not on the first ControlNet request."""
    from katz.deployment import Deployment
    from katz.diffusion.images import control_image_processor
    from katz.models.folder import ModelFolder, discover_controlnets
    from katz.serving.preprocessing import Preprocessing

    path = preset_dir("tiny-sdxl")
    folder = ModelFolder(path, discover_controlnets(path / "controlnets"))
    control_image_processor.cache_clear()
    Preprocessing(Deployment(folder.path, folder.controlnets, None, Limits(), controlnet_mode="inline"))
    assert control_image_processor.cache_info().currsize == 1


# ------------------------------------------------------------------ minimum size
# Architecture numbers of the public configs (diffusers' config.json of each model), only what
# min_image_size reads.
SD15_UNET = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "block_out_channels": [320, 640, 1280, 1280], "norm_num_groups": 32}
SDXL_UNET = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "block_out_channels": [320, 640, 1280], "norm_num_groups": 32}
SD_VAE = {"block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32}


def test_min_image_size_of_real_architectures():
    from katz.models.folder import min_image_size

    # one latent pixel at the UNet's deepest level: 8 (VAE) x 2**3 for SD 1.5, 8 x 2**2 for SDXL
    assert min_image_size(SD15_UNET, SD_VAE) == 64
    assert min_image_size(SDXL_UNET, SD_VAE, [SDXL_UNET]) == 32  # its ControlNets share the UNet's shape
    assert min_image_size(SDXL_UNET, SD_VAE, [SD15_UNET]) == 64  # a deeper ControlNet raises it
    # one channel per GroupNorm group entering the deepest level: that map must be 2x2
    assert min_image_size({**SDXL_UNET, "block_out_channels": [32, 32, 64]}, SD_VAE) == 64
    assert min_image_size(SDXL_UNET, {"block_out_channels": [32, 32, 32, 32], "norm_num_groups": 32}) == 32


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sd15"])
def test_min_image_size_of_the_presets_runs_and_below_it_fails(preset_dir, preset):
    """The minimum is what the networks need: at it the UNet and ControlNet run at batch 1 and 2;
    half of it (16 px: a 1x1 map with one channel per GroupNorm group) is the bug it prevents."""
    import torch

    from katz.models.folder import ModelFolder, discover_controlnets

    path = preset_dir(preset)
    folder = ModelFolder(path, discover_controlnets(path / "controlnets"))
    low = folder.min_image_size
    assert low == 32
    unet, cn, cfg = folder.load_unet(), folder.load_controlnet("canny"), folder.load_unet().config

    def step(size, batch):
        x = torch.randn(batch, 4, size // 8, size // 8)
        kw = {}
        if cfg.addition_embed_type == "text_time":
            extra = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, extra), "time_ids": torch.randn(batch, 6)}
        t, ctx = torch.tensor([10] * batch), torch.randn(batch, 77, cfg.cross_attention_dim)
        with torch.no_grad():
            down, mid = cn(x, t, ctx, controlnet_cond=torch.rand(batch, 3, size, size), return_dict=False, **kw)
            unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid, **kw)

    for batch in (1, 2):  # without and with CFG
        step(low, batch)
    with pytest.raises(ValueError, match="more than 1 value"):
        step(low // 2, 1)


def test_size_below_the_minimum_is_refused_naming_the_field():
    limits = Limits(min_width=64, min_height=64, max_width=2048, max_height=2048, default_width=64, default_height=64)
    for name in ("width", "height"):
        with pytest.raises(InvalidArgument) as info:
            parse_request({"prompt": b("a cat"), name: np.array([32], np.int32)}, limits, frozenset(), lambda n: True)
        assert info.value.field == name and str(info.value).startswith(f"{name}: 32 is below the minimum 64")
    for size in (64, 512, 1024):  # SD 1.5's minimum and native sizes, SDXL's native size
        req = parse_request({"prompt": b("a cat"), "width": np.array([size], np.int32),
                             "height": np.array([size], np.int32)}, limits, frozenset(), lambda n: True)
        assert (req.width, req.height) == (size, size)


def test_deployment_validates_against_its_folder_minimum(preset_dir):
    """Whatever limits a deployment was made with, requests are checked against the folder's minimum."""
    from katz.models.folder import ModelFolder, discover_controlnets
    from katz.deployment import Deployment

    path = preset_dir("tiny-sdxl")
    folder = ModelFolder(path, discover_controlnets(path / "controlnets"))
    dep = Deployment(folder.path, folder.controlnets, None, Limits(min_width=48), controlnet_mode="inline")
    assert (dep.request_limits.min_width, dep.request_limits.min_height) == (48, 32)  # a higher setting stays
    assert dep.request_limits.max_width == Limits().max_width


def test_serve_refuses_a_max_size_below_the_folder_minimum(preset_dir, tmp_path):
    """Every request would be refused: say so at start, naming the minimum."""
    from katz.cli import build_deployment, parser

    def deployment(*flags):
        args = parser().parse_args(["render", "--model-dir", str(preset_dir("tiny-sdxl")), "--out", str(tmp_path),
                                    "--device", "cpu", *flags])
        return build_deployment(args)

    with pytest.raises(SystemExit, match="--max-size 24 is below 32"):
        deployment("--max-size", "24")
    assert deployment("--max-size", "32").request_limits.min_width == 32

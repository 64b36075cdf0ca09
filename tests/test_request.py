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
    Preprocessing(Deployment(folder.path, folder.controlnets, None, Limits()))
    assert control_image_processor.cache_info().currsize == 1

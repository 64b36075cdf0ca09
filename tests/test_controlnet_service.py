"""ControlNet-as-a-Service, in-process: the split UNet, the feature cache, windows, multi-ControlNet.

The same image as the inline baseline and as diffusers' ControlNet pipelines.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import control_png

STEPS = 5


def _ensemble(preset_path, mode="inline", **kw):
    from katz.deployment import Deployment
    from katz.models.folder import ModelFolder, discover_controlnets
    from katz.request import Limits
    from katz.serving.local import LocalEnsemble

    folder = ModelFolder(preset_path, discover_controlnets(preset_path / "controlnets"))
    limits = Limits(default_width=64, default_height=64, default_guidance=5.0)
    dep = Deployment(folder.path, folder.controlnets, preset_path / "loras", limits, controlnet_mode=mode, **kw)
    return LocalEnsemble(dep)


def _req(n=1, starts=None, ends=None, scales=None, seed=3):
    r = {
        "prompt": np.array([b"a photo of a house"], object),
        "seed": np.array([seed], np.int64),
        "steps": np.array([STEPS], np.int32),
        "controlnets": np.array([b"canny"] * n, object),
        "control_images": np.array([control_png(i) for i in range(n)], object),
    }
    if scales is not None:
        r["controlnet_scales"] = np.array(scales, np.float32)
    if starts is not None:
        r["control_guidance_start"] = np.array(starts, np.float32)
    if ends is not None:
        r["control_guidance_end"] = np.array(ends, np.float32)
    return r


@pytest.fixture(scope="module")
def sdxl(preset_dir):
    return preset_dir("tiny-sdxl")


@pytest.fixture(scope="module")
def inline(sdxl):
    return _ensemble(sdxl, "inline")


@pytest.fixture(scope="module")
def service(sdxl):
    return _ensemble(sdxl, "service")


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sd15"])
def test_split_unet_equals_the_whole_forward(preset_dir, preset):
    from katz.engines.torch.unet import UNetEngine
    from katz.models.folder import ModelFolder

    folder = ModelFolder(preset_dir(preset))
    engine = UNetEngine(folder)
    sdxl = folder.family == "sdxl"
    x = torch.randn(2, 4, 9, 8)  # odd latent height: the forward_upsample_size path
    hidden = torch.randn(2, 77, 64 if sdxl else 32)
    cond = {"text_embeds": torch.randn(2, 32), "time_ids": torch.full((2, 6), 64.0)} if sdxl else None
    t = torch.tensor([321.0, 321.0])
    state = engine.down(x, t, hidden, cond)
    res = [torch.randn_like(s) for s in state["skips"]]
    mid = torch.randn_like(state["sample"])
    assert torch.equal(engine.up(state), engine(x, t, hidden, cond))
    assert torch.equal(engine.up(engine.down(x, t, hidden, cond), res, mid), engine(x, t, hidden, cond, res, mid))


@pytest.fixture(scope="module")
def local(sdxl):
    return _ensemble(sdxl, "local")


def test_service_and_local_equal_inline(inline, service, local):
    for req in (_req(), _req(n=2, scales=[0.7, 0.4])):
        a = inline.generate(req)["image"]
        for other in (service, local):
            b = other.generate(req)["image"]
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_local_controlnets_run_in_the_unets_process(local):
    """Mode local: the UNet model evaluates the ControlNets itself (no controlnet model call) and
    reports their feature cache."""
    calls = []
    original = local.models["controlnet"].execute
    local.models["controlnet"].execute = lambda inputs: (calls.append(1), original(inputs))[1]
    try:
        local.generate(_req(seed=11))
    finally:
        local.models["controlnet"].execute = original
    assert calls == []
    metrics = {name: total for name, _d, _l, total in local.models["unet"].metrics()}
    assert metrics["katz_controlnet_feature_cache_misses_total"] >= 1
    assert metrics["katz_controlnet_feature_cache_hits_total"] >= STEPS - 1


def test_feature_cache_hits_on_the_second_request(sdxl):
    ens = _ensemble(sdxl, "service")
    features = ens.models["controlnet"].engine.features
    first = ens.generate(_req())["image"]
    misses = features.misses
    assert misses == 1 and features.hits == STEPS - 1  # computed once per image, not once per step
    second = ens.generate(_req(seed=3))["image"]
    assert features.misses == misses and features.hits == 2 * STEPS - 1
    assert np.array_equal(first, second)
    ens.generate(_req(n=2))  # image 0 cached, image 1 new
    assert features.misses == misses + 1


def test_windows_skip_controlnets_outside_them(sdxl):
    ens = _ensemble(sdxl, "service")
    calls = []
    original = ens.models["controlnet"].execute
    ens.models["controlnet"].execute = lambda inputs: (calls.append(1), original(inputs))[1]
    ens.generate(_req(n=2, starts=[0.0, 0.6], ends=[0.4, 1.0]))
    # 5 steps: net 0 runs at steps 0-1 (i/5 >= 0, (i+1)/5 <= 0.4), net 1 at steps 3-4
    assert len(calls) == 4


@pytest.mark.parametrize("mode", ["inline", "service", "local"])
def test_multi_controlnet_with_windows_matches_diffusers(sdxl, mode, inline, service, local):
    import diffusers

    from katz.diffusion.schedulers import make_scheduler
    from katz.models.folder import ModelFolder

    ens = {"inline": inline, "service": service, "local": local}[mode]
    ours = ens.generate(_req(n=2, scales=[0.8, 0.5], starts=[0.0, 0.2], ends=[0.6, 1.0]))["image"]
    cn = diffusers.ControlNetModel.from_pretrained(sdxl / "controlnets" / "canny")
    pipe = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(
        sdxl, controlnet=[cn, cn], add_watermarker=False)
    pipe.scheduler = make_scheduler("default", ModelFolder(sdxl).scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    images = [Image.open(io.BytesIO(control_png(i))) for i in range(2)]
    ref = pipe("a photo of a house", image=images, num_inference_steps=STEPS, guidance_scale=5.0, height=64,
               width=64, controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.2],
               control_guidance_end=[0.6, 1.0], generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    ref = (ref * 255).round().astype(np.uint8)
    assert np.abs(ref.astype(int) - ours.astype(int)).max() <= 2


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"control_guidance_start": [0.5], "control_guidance_end": [0.2]}, "control_guidance_start"),
        ({"control_guidance_start": [-0.1]}, "control_guidance_start"),
        ({"control_guidance_end": [1.5]}, "control_guidance_end"),
        ({"control_guidance_end": [0.5, 0.6]}, "control_guidance_end"),
    ],
)
def test_bad_windows(fields, field):
    from katz.errors import InvalidArgument
    from katz.request import Limits, parse_request

    req = {"prompt": np.array([b"x"], object), "controlnets": np.array([b"canny"], object),
           "control_images": np.array([control_png()], object)}
    req.update({k: np.array(v, np.float32) for k, v in fields.items()})
    with pytest.raises(InvalidArgument) as info:
        parse_request(req, Limits(), frozenset({"canny"}), lambda n: True)
    assert info.value.field == field


def test_controlnet_model_cache_is_bounded(sdxl, tmp_path):
    """Non-resident ControlNets load on demand and are evicted beyond the byte budget."""
    import shutil

    from katz.engines.torch.controlnet import ControlNetEngine
    from katz.models.folder import ModelFolder

    for name in ("a", "b", "c"):
        shutil.copytree(sdxl / "controlnets" / "canny", tmp_path / name)
    folder = ModelFolder(sdxl, {n: tmp_path / n for n in ("a", "b", "c")})
    probe = ControlNetEngine(folder, resident=["a"])
    one = probe.model_bytes(probe.nets["a"])
    engine = ControlNetEngine(folder, resident=["a"], cache_bytes=int(2.5 * one))
    assert list(engine.nets) == ["a"]
    engine.get("b")
    engine.get("c")  # over budget: b (least recently used, not resident) goes
    assert set(engine.nets) == {"a", "c"} and engine.loads == 3

"""Where the denoising loop runs (``loop``: in the UNet model's process or in katz_pipeline) does not
change a request's result: the same images for plain, ControlNet (service, inline and local) and LoRA requests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from katz.deployment import Deployment, loop_place
from katz.diffusion.loop import loop_request, read_loop_request
from katz.errors import InvalidArgument
from katz.models.folder import ModelFolder, discover_controlnets
from katz.request import Limits, RequestParams
from katz.serving.local import LocalEnsemble

from conftest import control_png

STEPS = 4


def _ensemble(preset_path, loop, mode="service"):
    folder = ModelFolder(preset_path, discover_controlnets(preset_path / "controlnets"))
    limits = Limits(default_width=64, default_height=64, default_guidance=5.0)
    dep = Deployment(folder.path, folder.controlnets, preset_path / "loras", limits, controlnet_mode=mode, loop=loop)
    return LocalEnsemble(dep)


def _req(controlnet=False, loras=(), k=0, seed=5):
    r = {"prompt": np.array([b"a red house"], object), "seed": np.array([seed], np.int64),
         "steps": np.array([STEPS], np.int32)}
    if controlnet:
        r["controlnets"] = np.array([b"canny"], object)
        r["control_images"] = np.array([control_png(0)], object)
        r["control_guidance_end"] = np.array([0.5], np.float32)  # a window: the last steps run without it
    if loras:
        r["loras"] = np.array([n.encode() for n in loras], object)
        r["lora_k"] = np.array([k], np.int32)
    return r


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sd15"])
@pytest.mark.parametrize("mode", ["service", "inline", "local"])
def test_loop_in_the_unet_gives_the_pipeline_loops_images(preset_dir, preset, mode):
    path = preset_dir(preset)
    in_unet, in_pipeline = _ensemble(path, "unet", mode), _ensemble(path, "pipeline", mode)
    assert in_unet.models["katz_pipeline"].loop == "unet"
    for request in (_req(), _req(controlnet=True), _req(loras=["style"]), _req(controlnet=True, loras=["style"])):
        a, b = in_unet.generate(request), in_pipeline.generate(request)
        assert np.array_equal(a["image"], b["image"])
        assert int(a["lora_applied_step"][0]) == int(b["lora_applied_step"][0])
    # the UNet ran every step of the loop requests itself: one evaluation per step, as many as the
    # pipeline's loop asked for (SD 1.5's PNDM scheduler runs one step more than asked)
    runs = in_unet.models["unet"].runs
    assert runs == in_pipeline.models["unet"].runs >= 4 * STEPS
    counters = [{name: total for name, _d, _l, total in e.models["katz_pipeline"].metrics()}
                for e in (in_unet, in_pipeline)]
    assert counters[0]["katz_pipeline_steps_total"] == counters[1]["katz_pipeline_steps_total"] == runs


def test_a_lora_requests_weights_do_not_leak_into_the_next_loop_request(preset_dir):
    ens = _ensemble(preset_dir("tiny-sdxl"), "unet")
    unet = ens.models["unet"].engine.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    plain = ens.generate(_req())["image"]
    with_lora = ens.generate(_req(loras=["style", "detail"]))["image"]
    assert not np.array_equal(plain, with_lora)
    assert np.array_equal(ens.generate(_req())["image"], plain)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_loop_place():
    assert loop_place("auto", 1) == "unet" and loop_place("auto", 2) == "pipeline"
    assert loop_place("pipeline", 1) == "pipeline"
    with pytest.raises(ValueError, match="one UNet shard"):
        loop_place("unet", 2)
    with pytest.raises(ValueError, match="loop must be"):
        loop_place("gpu", 1)


PARAMS = {"scheduler": "euler", "seed": 1, "steps": 2, "guidance_scale": 5.0, "height": 64, "width": 64,
          "controlnets": [], "controlnet_scales": [], "loras": [], "lora_scales": []}


def test_loop_request_round_trip():
    inputs = {
        "params": np.array([json.dumps(PARAMS).encode()], object),
        "prompt_embeds": torch.randn(2, 77, 16),
        "pooled_prompt_embeds": torch.randn(2, 8),
        "control_images": torch.rand(0, 3, 64, 64),
    }
    request = loop_request(inputs)
    assert request["loop_prompt_embeds"].shape == (1, 2, 77, 16)
    assert request["loop_control_images"].shape == (1, 0, 3, 64, 64)
    params, embeds, pooled, images = read_loop_request(request, "cpu", torch.float32)
    assert params == RequestParams(**PARAMS)  # the typed record of the same JSON
    assert torch.equal(embeds, inputs["prompt_embeds"]) and torch.equal(pooled, inputs["pooled_prompt_embeds"])
    assert images.shape == (0, 3, 64, 64)
    bad = [
        ({"loop_prompt_embeds": torch.randn(2, 77, 16)}, "loop_prompt_embeds: must be"),
        ({"loop_control_images": None}, "loop_control_images: required"),
        ({"loop_control_images": torch.rand(1, 1, 3, 64, 64)}, "loop_control_images: has 1 images for 0"),
        ({"loop_params": np.array([[b"{"]], object)}, "loop_params: not the preprocessing params JSON"),
        ({"loop_params": np.array([[b'{"steps": 3}']], object)}, "loop_params: lacks scheduler"),
    ]
    for change, message in bad:
        with pytest.raises(InvalidArgument, match=message):
            read_loop_request({**request, **change}, "cpu", torch.float32)


def test_bad_calls_to_the_unet_model_are_invalid_arguments(preset_dir):
    """The unet model is internal, but a client can call it: a bad call fails alone, naming the input."""
    ens = _ensemble(preset_dir("tiny-sdxl"), "unet")
    unet = ens.models["unet"]
    good = loop_request({"params": np.array([json.dumps(PARAMS).encode()], object),
                         "prompt_embeds": torch.randn(2, 77, 64), "pooled_prompt_embeds": torch.randn(2, 32),
                         "control_images": torch.rand(0, 3, 64, 64)})
    results = unet.execute_batch([{"sample": torch.randn(2, 4, 8, 8)}, {**good, "loop_params": np.array([[b"x"]], object)},
                                  good])
    assert isinstance(results[0], InvalidArgument) and str(results[0]).startswith("timestep:")
    assert isinstance(results[1], InvalidArgument) and str(results[1]).startswith("loop_params:")
    assert results[2]["latents"].shape == (1, 4, 8, 8) and int(results[2]["lora_applied_step"][0, 0]) == -1


def test_tensors_cross_to_triton_in_c_order():
    """An empty tensor made from numpy (a request without ControlNets) has all strides 0; Triton's
    DLPack import rejects that for a GPU tensor, so the glue gives every tensor C-order strides."""
    from katz.serving.dlpack import c_order

    empty = torch.from_numpy(np.zeros((0, 3, 8, 8), np.float32)).unsqueeze(0)
    assert empty.stride() == (0, 0, 0, 0, 0) and empty.is_contiguous()
    fixed = c_order(empty)
    assert fixed.shape == empty.shape and fixed.stride()[1:] == (192, 64, 8, 1)
    dense = torch.randn(2, 77, 16)
    assert c_order(dense) is dense
    assert c_order(dense.transpose(1, 2)).stride() == (1232, 77, 1)


def test_memory_gauges(preset_dir):
    from katz.serving.metrics import memory_gauges

    assert memory_gauges("cpu") == []  # torch's CUDA allocator only
    ens = _ensemble(preset_dir("tiny-sdxl"), "unet")
    unet = ens.models["unet"]
    parts = {labels["part"]: value for name, _d, labels, value in unet.gauges() if name == "katz_unet_memory_bytes"}
    weights = sum(p.numel() * p.element_size() for p in unet.engine.unet.parameters())
    # the warm-up merge at load made the pristine copies of the attention projections already
    assert parts["weights"] == weights and 0 < parts["pristine"] < weights and parts["lora_cache"] == 0.0
    ens.generate(_req(loras=["style"]))
    parts = {labels["part"]: value for name, _d, labels, value in unet.gauges() if name == "katz_unet_memory_bytes"}
    assert 0 < parts["pristine"] < weights and parts["lora_cache"] > 0


def test_gc_after_load_is_frozen_and_pauses_are_counted():
    """What loading made is frozen out of the collector's sight (a full collection during a request
    would scan it all with every thread stopped); collections after are timed per generation."""
    import gc

    from katz.serving.metrics import GcPauses, freeze_after_load

    loaded = [[i] for i in range(100_000)]  # stands for a model's objects
    try:
        at_load = freeze_after_load()
        watch = GcPauses.watch()
        assert watch.at_load == at_load > 0
        before = list(watch.collections)
        gc.collect()
        assert watch.collections[2] == before[2] + 1 and 0 < watch.longest < at_load
        names = {(n, tuple(labels.items())) for n, _d, labels, _v in watch.metrics()}
        assert ("katz_gc_seconds_total", (("generation", "2"),)) in names
    finally:
        gc.unfreeze()
    assert len(loaded) == 100_000

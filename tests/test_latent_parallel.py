"""Latent parallelism: the CFG halves on two UNet shards give the image of one UNet."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import control_png

STEPS = 4


def _ensemble(preset_path, shards, mode="inline", delay=0.0):
    from katz.model_folder import ModelFolder, discover_controlnets
    from katz.request import Limits
    from katz.triton_models.deployment import Deployment
    from katz.triton_models.local import LocalEnsemble

    folder = ModelFolder(preset_path, discover_controlnets(preset_path / "controlnets"))
    dep = Deployment(folder.path, folder.controlnets, preset_path / "loras",
                     Limits(default_width=64, default_height=64), unet_shards=shards, controlnet_mode=mode,
                     lora_load_delay_s=delay)
    return LocalEnsemble(dep)


def _req(controlnet=False, loras=(), k=0, guidance=None, seed=5):
    r = {"prompt": np.array([b"a photo of a cat"], object), "seed": np.array([seed], np.int64),
         "steps": np.array([STEPS], np.int32)}
    if controlnet:
        r["controlnets"] = np.array([b"canny"], object)
        r["control_images"] = np.array([control_png()], object)
    if loras:
        r["loras"] = np.array([n.encode() for n in loras], object)
        r["lora_k"] = np.array([k], np.int32)
    if guidance is not None:
        r["guidance_scale"] = np.array([guidance], np.float32)
    return r


@pytest.fixture(scope="module")
def pair(preset_dir):
    path = preset_dir("tiny-sdxl")
    return _ensemble(path, 1, "service"), _ensemble(path, 2, "service")


@pytest.mark.parametrize(
    "req",
    [_req(), _req(controlnet=True), _req(loras=("style", "detail")), _req(controlnet=True, loras=("detail",)),
     _req(guidance=1.0)],
    ids=["plain", "controlnet", "loras", "controlnet+lora", "no-cfg"],
)
def test_two_shards_equal_one(pair, req):
    one, two = pair
    a, b = one.generate(req)["image"], two.generate(req)["image"]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_sharded_calls_go_to_both_shards(pair):
    _, two = pair
    seen = {"unet": 0, "unet_1": 0}
    for name in seen:
        model = two.models[name]
        original = model.execute

        def counting(inputs, _name=name, _run=original):
            seen[_name] += 1
            assert inputs["sample"].shape[0] == 1  # one CFG half each
            return _run(inputs)

        model.execute = counting
    two.generate(_req())
    assert seen == {"unet": STEPS, "unet_1": STEPS}


def test_bal_on_shards_switches_both_at_one_step(preset_dir):
    two = _ensemble(preset_dir("tiny-sdxl"), 2, delay=3.0)
    out = two.generate(_req(loras=("style",), k=2))
    assert int(out["lora_applied_step"][0]) == 2
    for name in ("unet", "unet_1"):
        assert two.models[name].loras.stats.steps_before_patch == 2


def test_shard_failure_fails_the_request_and_leaves_the_other_shard_working(preset_dir):
    two = _ensemble(preset_dir("tiny-sdxl"), 2)
    good = two.generate(_req())["image"]
    broken = two.models["unet_1"]
    original = broken.execute
    broken.execute = lambda inputs: (_ for _ in ()).throw(RuntimeError("shard 1 lost its GPU"))
    with pytest.raises(RuntimeError, match="shard 1"):
        two.generate(_req())
    broken.execute = original
    assert np.array_equal(two.generate(_req())["image"], good)


def test_repository_renders_one_model_per_shard(preset_dir, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from katz.model_folder import ModelFolder
    from katz.repository import Placement, render_repository
    from katz.request import Limits
    from katz.triton_models.deployment import Deployment

    folder = ModelFolder(preset_dir("tiny-sdxl"))
    dep = Deployment(folder.path, {}, None, Limits(), dtype="float16", unet_shards=2)
    repo = render_repository(dep, tmp_path / "r", Placement(device="cuda", gpus={"unet": [0], "unet_1": [1]}))
    for name, gpu in (("unet", 0), ("unet_1", 1)):
        cfg = model_config_pb2.ModelConfig()
        text_format.Parse((repo / name / "config.pbtxt").read_text(), cfg)
        assert cfg.name == name and list(cfg.instance_group[0].gpus) == [gpu]


@pytest.mark.integration
def test_server_with_two_unet_shards(start_server, preset_dir):
    from katz.client import Generation, infer, make_client

    server = start_server("tiny-sdxl", ["--unet-shards", "2"])
    client = make_client(server.http_url)
    assert client.is_model_ready("unet") and client.is_model_ready("unet_1")
    gen = Generation(prompt="a photo of a cat", seed=5, steps=STEPS, controlnets=["canny"],
                     control_images=[control_png()], loras=["detail"], lora_k=0)
    served = infer(client, gen).image
    local = _ensemble(preset_dir("tiny-sdxl"), 1, "inline").generate(gen.tensors())["image"]
    assert np.abs(served.astype(int) - local.astype(int)).max() <= 1

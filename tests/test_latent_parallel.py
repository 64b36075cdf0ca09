"""Latent parallelism: the CFG halves on two UNet shards give the image of one UNet;
latent bands on more shards than CFG halves give an image close to it (katz.parallel.tiling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import control_png

STEPS = 4


# ------------------------------------------------------------------ band geometry and blend (katz.parallel.tiling)
PLANS = [  # (latent height, width, bands asked for, overlap, alignment)
    (16, 16, 2, 8, 4), (32, 32, 2, 16, 4), (128, 128, 2, 16, 4), (128, 128, 4, 16, 4), (128, 96, 3, 16, 8),
    (64, 128, 4, 16, 8), (96, 160, 5, 12, 8), (32, 32, 2, 0, 4), (40, 32, 2, 6, 4), (128, 128, 8, 8, 8),
]


@pytest.mark.parametrize("h, w, count, overlap, align", PLANS)
def test_bands_cover_the_latent_aligned_with_the_overlap(h, w, count, overlap, align):
    from katz.parallel.tiling import plan_tiles

    tiles = plan_tiles(h, w, count, overlap, align)
    axis, length = (2, h) if h >= w else (3, w)
    assert 2 <= len(tiles) <= count
    assert all(t.axis == axis and t.length == length for t in tiles)
    assert tiles[0].start == 0 and tiles[-1].end == length
    assert all(t.start % align == 0 and t.size % align == 0 and t.size < length for t in tiles)
    need = -(-overlap // align) * align  # the overlap, rounded up to the alignment
    for a, b in zip(tiles, tiles[1:]):
        assert a.start < b.start and a.end - b.start >= need  # neighbours overlap by at least that much
    for a, c in zip(tiles, tiles[2:]):
        assert a.end <= c.start  # no position in three bands


@pytest.mark.parametrize("h, w, count, overlap, align", PLANS)
def test_blend_weights_are_a_partition_of_unity_with_linear_ramps(h, w, count, overlap, align):
    from katz.parallel.tiling import blend_weights, plan_tiles

    tiles = plan_tiles(h, w, count, overlap, align)
    weights = blend_weights(tiles)
    total = torch.zeros(tiles[0].length, dtype=torch.float64)
    for t, wt in zip(tiles, weights):
        assert wt.shape == (t.size,) and bool((wt > 0).all()) and bool((wt <= 1).all())
        total[t.start : t.end] += wt.double()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
    for i, (t, wt) in enumerate(zip(tiles, weights)):  # rising across the left overlap, falling across the right
        left = tiles[i - 1].end - t.start if i else 0
        right = t.end - tiles[i + 1].start if i + 1 < len(tiles) else 0
        if left:
            assert bool((wt[:left].diff() > 0).all())
        if right:
            assert bool((wt[t.size - right :].diff() < 0).all())
        assert bool((wt[left : t.size - right] == 1).all())


@pytest.mark.parametrize("h, w, count, overlap, align", PLANS)
def test_blending_the_crops_of_one_tensor_gives_it_back(h, w, count, overlap, align):
    from katz.parallel.tiling import blend, plan_tiles

    x = torch.randn(2, 4, h, w)
    tiles = plan_tiles(h, w, count, overlap, align)
    assert torch.allclose(blend([t.crop(x) for t in tiles], tiles), x, atol=1e-6)
    half = blend([t.crop(x).half() for t in tiles], tiles)
    assert half.dtype == torch.float16 and torch.allclose(half.float(), x, atol=1e-2)


def test_crops_follow_the_scale_of_residuals_and_control_images():
    from katz.parallel.tiling import plan_tiles

    tile = plan_tiles(32, 16, 2, 8, 4)[1]  # rows 12..31 of 32
    assert (tile.axis, tile.start, tile.size) == (2, 12, 20)
    residual = torch.arange(16 * 8).reshape(1, 1, 16, 8)  # one level down: rows 6..15
    assert torch.equal(tile.crop(residual), residual[:, :, 6:16])
    image = torch.rand(1, 3, 256, 128)  # pixels (vae_scale_factor 8): rows 96..255
    assert torch.equal(tile.crop(image), image[:, :, 96:256])
    with pytest.raises(ValueError, match="whole elements"):
        tile.crop(torch.zeros(1, 1, 3, 8))  # 12/32 of 3 rows: not on the grid
    assert tile.key == "h12+20/32" and tile.key != plan_tiles(32, 16, 2, 8, 4)[0].key


def test_a_latent_too_small_or_not_aligned_is_not_split_further():
    from katz.parallel.tiling import plan_tiles

    assert [(t.start, t.size) for t in plan_tiles(8, 8, 2, 16, 4)] == [(0, 8)]  # no two bands smaller than 8
    assert [(t.start, t.size) for t in plan_tiles(16, 16, 2, 16, 4)] == [(0, 16)]
    assert len(plan_tiles(16, 16, 4, 8, 4)) == 2  # fewer bands where four do not fit
    assert [(t.start, t.size) for t in plan_tiles(125, 64, 2, 8, 4)] == [(0, 125)]  # 125 is not a multiple of 4
    assert [(t.start, t.size) for t in plan_tiles(64, 64, 1, 8, 4)] == [(0, 64)]


@pytest.mark.parametrize("args, message", [((16, 16, 0, 8, 4), "count"), ((16, 16, 2, -1, 4), "overlap"),
                                           ((16, 16, 2, 8, 0), "alignment")])
def test_bad_band_arguments_are_refused(args, message):
    from katz.parallel.tiling import plan_tiles

    with pytest.raises(ValueError, match=message):
        plan_tiles(*args)


@pytest.mark.parametrize("preset", ["tiny-sdxl", "tiny-sd15"])
def test_alignment_is_the_unet_downsampling_factor(preset_dir, preset):
    from katz.models.folder import ModelFolder

    folder = ModelFolder(preset_dir(preset))
    assert folder.unet_downsampling_factor == 2 ** (len(folder.unet_config["down_block_types"]) - 1) == 4


def _ensemble(preset_path, shards, mode="inline", delay=0.0, size=64):
    from katz.deployment import Deployment
    from katz.models.folder import ModelFolder, discover_controlnets
    from katz.request import Limits
    from katz.serving.local import LocalEnsemble

    folder = ModelFolder(preset_path, discover_controlnets(preset_path / "controlnets"))
    dep = Deployment(folder.path, folder.controlnets, preset_path / "loras",
                     Limits(default_width=size, default_height=size), unet_shards=shards, controlnet_mode=mode,
                     lora_load_delay_s=delay)
    return LocalEnsemble(dep)


def _req(controlnet=False, loras=(), k=0, guidance=None, seed=5, size=64):
    r = {"prompt": np.array([b"a photo of a cat"], object), "seed": np.array([seed], np.int64),
         "steps": np.array([STEPS], np.int32)}
    if controlnet:
        r["controlnets"] = np.array([b"canny"], object)
        r["control_images"] = np.array([control_png(size=size)], object)
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


@pytest.mark.parametrize("shards", [2, 4])
def test_repository_renders_one_model_per_shard(preset_dir, tmp_path, shards):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from katz.deploy.repository import Placement, render_repository
    from katz.deployment import Deployment
    from katz.models.folder import ModelFolder
    from katz.request import Limits
    from katz.parallel.shards import unet_model_names

    folder = ModelFolder(preset_dir("tiny-sdxl"))
    dep = Deployment(folder.path, {}, None, Limits(), dtype="float16", unet_shards=shards, latent_overlap=8, controlnet_mode="inline")
    names = unet_model_names(shards)
    repo = render_repository(dep, tmp_path / "r", Placement(device="cuda", gpus={n: [g] for g, n in enumerate(names)}))
    assert sorted(p.name for p in repo.iterdir() if p.name.startswith("unet")) == sorted(names)
    for gpu, name in enumerate(names):
        cfg = model_config_pb2.ModelConfig()
        text_format.Parse((repo / name / "config.pbtxt").read_text(), cfg)
        assert cfg.name == name and list(cfg.instance_group[0].gpus) == [gpu]
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        assert params["unet_shards"] == str(shards) and params["latent_overlap"] == "8"


def _cli_deployment(preset_dir, tmp_path, *flags):
    from katz.cli import build_deployment, parser

    args = parser().parse_args(["render", "--model-dir", str(preset_dir("tiny-sdxl")), "--out", str(tmp_path), *flags])
    return build_deployment(args)


def test_cli_takes_any_shard_count_and_the_tile_overlap(preset_dir, tmp_path):
    dep = _cli_deployment(preset_dir, tmp_path, "--device", "cpu")
    assert (dep.unet_shards, dep.latent_overlap) == (1, 16)
    dep = _cli_deployment(preset_dir, tmp_path, "--device", "cpu", "--unet-shards", "4", "--tile-overlap", "8")
    assert (dep.unet_shards, dep.latent_overlap) == (4, 8)
    assert _cli_deployment(preset_dir, tmp_path, "--device", "cpu", "--unet-gpus", "0,1,2").unet_shards == 3


@pytest.mark.parametrize("flags, message", [
    (("--unet-shards", "0"), "--unet-shards must be >= 1"),
    (("--tile-overlap", "-8"), "--tile-overlap must be >= 0"),
    (("--device", "cuda", "--unet-gpus", "0,64"), r"GPU \d+ is not on this host \(\d+ visible\)"),
    (("--device", "cuda", "--unet-gpus", "0", "--gpus", "64"), r"GPU \d+ is not on this host \(\d+ visible\)"),
])
def test_cli_refuses_bad_shards_overlaps_and_gpus_the_host_lacks(preset_dir, tmp_path, flags, message):
    args = flags if "--device" in flags else ("--device", "cpu", *flags)
    with pytest.raises(SystemExit, match=message):
        _cli_deployment(preset_dir, tmp_path, *args)


@pytest.mark.integration
def test_server_with_two_unet_shards_cfg_halves_and_bands(start_server, preset_dir):
    from katz.client import Generation, infer, make_client

    server = start_server("tiny-sdxl", ["--unet-shards", "2"])
    client = make_client(server.http_url)
    assert client.is_model_ready("unet") and client.is_model_ready("unet_1")
    gen = Generation(prompt="a photo of a cat", seed=5, steps=STEPS, controlnets=["canny"],
                     control_images=[control_png()], loras=["detail"], lora_k=0)
    served = infer(client, gen).image
    local = _ensemble(preset_dir("tiny-sdxl"), 1, "inline").generate(gen.tensors())["image"]
    assert np.abs(served.astype(int) - local.astype(int)).max() <= 1
    # without CFG: two latent bands over BLS (cropped tensors, band cache keys), as in-process
    gen = Generation(prompt="a photo of a cat", seed=5, steps=STEPS, guidance_scale=1.0, width=SIZE, height=SIZE,
                     controlnets=["canny"], control_images=[control_png(size=SIZE)], loras=["detail"], lora_k=0)
    served = infer(client, gen).image
    local = _ensemble(preset_dir("tiny-sdxl"), 2, "service", size=SIZE).generate(gen.tensors())["image"]
    assert np.abs(served.astype(int) - local.astype(int)).max() <= 1


# ------------------------------------------------------------------ bands on UNet shards (spatial sharding)
SIZE = 256  # latent 32 x 32: two bands of 24 rows (overlap 16, the default) per row of the batch
# Tolerances against one shard (4 steps, PSNR of the uint8 images, largest pixel difference of 255):
# below what a correct blend measures on these seeds and above what a missing blend or a misaligned
# band gives, so both kinds of break fail (the measurements: bench/RESULTS.md, "Spatial sharding:
# the test bounds"). Guidance amplifies the bands' difference, hence the looser CFG bound.
NO_CFG_BOUND = (43.0, 24)
CFG_BOUND = (38.0, 32)


def _distance(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """PSNR (dB) and the largest difference of two uint8 images."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    mse = float(np.mean(diff**2))
    return (np.inf if mse == 0 else 10 * np.log10(255.0**2 / mse)), int(np.abs(diff).max())


def _within(distance, bound) -> bool:
    return distance[0] >= bound[0] and distance[1] <= bound[1]


@pytest.fixture(scope="module")
def ensembles(preset_dir):
    """``get(preset, shards, mode)``: one LocalEnsemble per configuration at SIZE, built once."""
    built = {}

    def get(preset, shards, mode="inline"):
        if (preset, shards, mode) not in built:
            built[preset, shards, mode] = _ensemble(preset_dir(preset), shards, mode, size=SIZE)
        return built[preset, shards, mode]

    return get


def _record_samples(ens) -> dict:
    """Wrap each UNet shard: the sample shapes it is called with, by shard."""
    seen = {}
    for name, model in ens.models.items():
        if name == "unet" or name.startswith("unet_"):
            seen[name] = []

            def recording(inputs, _name=name, _run=model.execute):
                seen[_name].append(tuple(inputs["sample"].shape))
                return _run(inputs)

            model.execute = recording
    return seen


def _assert_one_band_per_shard_per_step(seen: dict, shards: tuple) -> None:
    """Every shard ran one band of one batch row (24 of 32 latent rows) per UNet evaluation
    (>= STEPS: PNDM, tiny-sd15's scheduler, evaluates the UNet once more)."""
    assert set(seen) == set(shards)
    calls = len(seen["unet"])
    assert calls >= STEPS and all(seen[name] == [(1, 4, 24, 32)] * calls for name in shards)


def _spatial_req(**kw):
    return _req(size=SIZE, **kw)


@pytest.mark.parametrize("preset, mode, kw", [
    ("tiny-sdxl", "inline", {}),
    ("tiny-sdxl", "inline", {"controlnet": True}),
    ("tiny-sdxl", "service", {"controlnet": True}),
    ("tiny-sdxl", "inline", {"loras": ("style", "detail")}),
    ("tiny-sdxl", "service", {"controlnet": True, "loras": ("detail",)}),
    ("tiny-sd15", "inline", {}),
    ("tiny-sd15", "inline", {"controlnet": True}),
    ("tiny-sd15", "service", {"controlnet": True, "loras": ("style",)}),
], ids=["sdxl", "sdxl-controlnet-inline", "sdxl-controlnet-service", "sdxl-loras", "sdxl-controlnet-service+lora",
        "sd15", "sd15-controlnet-inline", "sd15-controlnet-service+lora"])
def test_two_bands_without_cfg_are_close_to_one_shard(ensembles, preset, mode, kw):
    one, two = ensembles(preset, 1, mode), ensembles(preset, 2, mode)
    req = _spatial_req(guidance=1.0, **kw)
    seen = _record_samples(two)
    distance = _distance(one.generate(req)["image"], two.generate(req)["image"])
    _assert_one_band_per_shard_per_step(seen, ("unet", "unet_1"))
    assert _within(distance, NO_CFG_BOUND), distance


@pytest.mark.parametrize("preset, mode, controlnet", [("tiny-sdxl", "inline", False), ("tiny-sd15", "inline", False),
                                                      ("tiny-sdxl", "service", True)])
def test_four_shards_with_cfg_run_each_half_as_two_bands(ensembles, preset, mode, controlnet):
    one, four = ensembles(preset, 1, mode), ensembles(preset, 4, mode)
    req = _spatial_req(guidance=5.0, controlnet=controlnet)
    seen = _record_samples(four)
    distance = _distance(one.generate(req)["image"], four.generate(req)["image"])
    _assert_one_band_per_shard_per_step(seen, ("unet", "unet_1", "unet_2", "unet_3"))
    assert _within(distance, CFG_BOUND), distance


def _last_band_wins(preds, tiles):
    """A blend gone wrong: each band overwrites the overlap instead of being weighted in."""
    out = preds[0].new_zeros(*preds[0].shape[:2], tiles[0].length, preds[0].shape[3])
    for pred, t in zip(preds, tiles):
        out.narrow(t.axis, t.start, t.size).copy_(pred)
    return out


@pytest.mark.parametrize("bug", ["no-blend", "offset"])
@pytest.mark.parametrize("shards, guidance, bound", [(2, 1.0, NO_CFG_BOUND), (4, 5.0, CFG_BOUND)],
                         ids=["no-cfg", "cfg"])
def test_the_tolerance_catches_a_broken_blend(ensembles, monkeypatch, bug, shards, guidance, bound):
    from dataclasses import replace

    import katz.parallel.shards as shards_mod

    if bug == "no-blend":
        monkeypatch.setattr(shards_mod, "blend", _last_band_wins)
    else:  # each band after the first gets the inputs of one alignment step further up
        good = shards_mod.shard_inputs
        monkeypatch.setattr(shards_mod, "shard_inputs", lambda tensors, row, tile: good(
            tensors, row, replace(tile, start=tile.start - 4) if tile is not None and tile.start else tile))
    req = _spatial_req(guidance=guidance)
    distance = _distance(ensembles("tiny-sdxl", 1).generate(req)["image"],
                         ensembles("tiny-sdxl", shards).generate(req)["image"])
    assert not _within(distance, bound), distance


@pytest.mark.parametrize("shards, guidance, calls", [
    (2, 1.0, {"unet": STEPS, "unet_1": 0}),  # latent 8 x 8: too small for two bands
    (3, 5.0, {"unet": STEPS, "unet_1": STEPS, "unet_2": 0}),  # 3 shards, 2 halves: the CFG split
    (4, 5.0, {"unet": STEPS, "unet_1": STEPS, "unet_2": 0, "unet_3": 0}),  # too small for bands: the CFG split
], ids=["no-cfg-2", "cfg-3", "cfg-4"])
def test_a_small_latent_runs_unsplit_and_equal_to_one_shard(preset_dir, shards, guidance, calls):
    path = preset_dir("tiny-sdxl")
    one, many = _ensemble(path, 1), _ensemble(path, shards)
    seen = _record_samples(many)
    a, b = one.generate(_req(guidance=guidance))["image"], many.generate(_req(guidance=guidance))["image"]
    assert {name: len(shapes) for name, shapes in seen.items()} == calls
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_service_mode_caches_control_features_per_band(preset_dir):
    two = _ensemble(preset_dir("tiny-sdxl"), 2, "service", size=SIZE)
    req = _spatial_req(guidance=1.0, controlnet=True)
    first = two.generate(req)["image"]
    keys = {key[1] for key in two.models["controlnet"].engine.features.items}
    assert len(keys) == 2 and {k.rsplit("@", 1)[1] for k in keys} == {"h0+24/32", "h8+24/32"}
    assert np.array_equal(two.generate(req)["image"], first)  # from the cached features of each band


def test_bal_on_bands_switches_every_shard_at_one_step(preset_dir):
    two = _ensemble(preset_dir("tiny-sdxl"), 2, delay=3.0, size=SIZE)
    out = two.generate(_spatial_req(guidance=1.0, loras=("style",), k=2))
    assert int(out["lora_applied_step"][0]) == 2
    for name in ("unet", "unet_1"):
        assert two.models[name].loras.stats.steps_before_patch == 2


def test_a_failing_band_shard_fails_the_request_and_leaves_the_other_working(ensembles):
    two = ensembles("tiny-sdxl", 2)
    req = _spatial_req(guidance=1.0)
    good = two.generate(req)["image"]
    broken = two.models["unet_1"]
    original = broken.execute
    broken.execute = lambda inputs: (_ for _ in ()).throw(RuntimeError("shard 1 lost its GPU"))
    try:
        with pytest.raises(RuntimeError, match="shard 1"):
            two.generate(req)
    finally:
        broken.execute = original
    assert np.array_equal(two.generate(req)["image"], good)

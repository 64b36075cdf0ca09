"""Bounded asynchronous LoRA loading: the loop starts at once and the LoRA is in by step k."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from katz.deployment import Deployment
from katz.errors import LoraError
from katz.request import Limits
from katz.serving.local import LocalEnsemble

STEPS = 6


def _ensemble(preset_path, lora_dir, delay=0.0, hints="", loop="auto"):
    from katz.models.folder import ModelFolder, discover_controlnets

    folder = ModelFolder(preset_path, discover_controlnets(preset_path / "controlnets"))
    limits = Limits(default_width=64, default_height=64)
    dep = Deployment(folder.path, folder.controlnets, lora_dir, limits, lora_load_delay_s=delay, lora_hints=hints,
                     loop=loop, controlnet_mode="inline")
    return LocalEnsemble(dep)


def _req(loras=(), k=None, seed=1):
    r = {"prompt": np.array([b"a cat"], object), "seed": np.array([seed], np.int64),
         "steps": np.array([STEPS], np.int32)}
    if loras:
        r["loras"] = np.array([n.encode() for n in loras], object)
    if k is not None:
        r["lora_k"] = np.array([k], np.int32)
    return r


def make_cold(unet):
    """Base weights in place and nothing on the device or in the host tier (a LoRA there is hot: in
    from step 0): the next LoRA request loads from the file."""
    unet.bal.switch_to(())
    unet.loras.clear_caches()


@pytest.fixture(scope="module")
def lora_dir(preset_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    for f in (preset_dir("tiny-sdxl") / "loras").iterdir():
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="module", params=["unet", "pipeline"])
def slow(request, preset_dir, lora_dir):
    """A loader that needs 3 s per LoRA: far longer than the tiny model's whole loop, even on a busy CI machine.
    BAL decides per step in the UNet model's loop (a loop request) and in katz_pipeline's (step calls)."""
    return _ensemble(preset_dir("tiny-sdxl"), lora_dir, delay=3.0, loop=request.param)


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_slow_loader_patches_at_step_k_exactly(slow, k):
    unet = slow.models["unet"]
    make_cold(unet)
    before = unet.loras.stats.steps_before_patch
    out = slow.generate(_req(["style"], k=k))
    assert int(out["lora_applied_step"][0]) == k
    assert unet.loras.stats.steps_before_patch - before == k
    if k:
        assert unet.loras.stats.wait_seconds > 0


def test_k0_equals_synchronous_and_hot_lora_is_in_from_step_0(slow):
    unet = slow.models["unet"]
    sync = slow.generate(_req(["style"], k=0))
    hot = slow.generate(_req(["style"], k=4))  # still on the device from the first request
    assert int(hot["lora_applied_step"][0]) == 0
    assert np.array_equal(sync["image"], hot["image"])
    # in the host tier only (the file would take 3 s): hot too, in from step 0 after a host-to-device copy
    unet.bal.switch_to(())
    unet.loras.wait_idle()
    unet.loras.device_cache.clear()
    hits = unet.loras.stats.host_hits
    from_host = slow.generate(_req(["style"], k=4))
    assert int(from_host["lora_applied_step"][0]) == 0 and unet.loras.stats.host_hits == hits + 1
    assert np.array_equal(sync["image"], from_host["image"])


def test_bal_image_differs_only_by_the_early_steps(slow):
    make_cold(slow.models["unet"])
    late = slow.generate(_req(["style"], k=2))
    sync = slow.generate(_req(["style"], k=0))
    base = slow.generate(_req())
    assert int(base["lora_applied_step"][0]) == -1
    d_late = np.abs(late["image"].astype(int) - sync["image"].astype(int)).mean()
    d_base = np.abs(base["image"].astype(int) - sync["image"].astype(int)).mean()
    assert 0 < d_late < d_base


def test_hint_from_preprocessing_loads_the_lora_before_the_first_step(preset_dir, lora_dir):
    """preprocessing names the request's LoRA to the UNet's loader (katz.lora.hints) as it arrives:
    a request that then waits (queue, text encoding) long enough gets its LoRA from step 0."""
    import secrets
    import time

    ens = _ensemble(preset_dir("tiny-sdxl"), lora_dir, delay=1.0, hints=secrets.token_hex(4))
    unet = ens.models["unet"]
    try:
        request = _req(["detail"], k=3)
        ens.models["preprocessing"].execute(request)  # the request arrives ...
        deadline = time.monotonic() + 30
        while not unet.loras.ready(["detail"]) and time.monotonic() < deadline:
            time.sleep(0.05)  # ... and waits in the queue meanwhile
        assert unet.hints.received >= 1 and unet.loras.ready(["detail"])
        out = ens.generate(request)
        assert int(out["lora_applied_step"][0]) == 0
    finally:
        unet.hints.close()


def test_fast_loader_patches_before_k(preset_dir, lora_dir):
    ens = _ensemble(preset_dir("tiny-sdxl"), lora_dir)
    out = ens.generate(_req(["style", "detail"], k=STEPS - 1))
    assert 0 <= int(out["lora_applied_step"][0]) <= STEPS - 1
    # the loop counts its steps and the time it waited for them (katz_pipeline_* metrics)
    counters = {name: total for name, _desc, _labels, total in ens.models["katz_pipeline"].metrics()}
    assert counters["katz_pipeline_steps_total"] == STEPS
    assert counters["katz_pipeline_unet_call_seconds_total"] >= ens.models["unet"].run_seconds > 0


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda sd: {k: v * float("nan") for k, v in sd.items()}, "NaN"),
        (lambda sd: {k.replace("to_q", "to_nowhere"): v for k, v in sd.items()}, "targets no module"),
        (lambda sd: {k: (v[:, :-1].contiguous() if "lora_A" in k else v) for k, v in sd.items()}, "shape"),
    ],
    ids=["nan", "no-target", "shape"],
)
def test_bad_lora_fails_during_denoising_with_weights_restored(preset_dir, lora_dir, tmp_path, mutate, words):
    d = tmp_path / "loras"
    shutil.copytree(lora_dir, d)
    src = load_file(str(d / "style.safetensors"))
    save_file(mutate(src), str(d / "bad.safetensors"))
    ens = _ensemble(preset_dir("tiny-sdxl"), d)
    base = ens.generate(_req())["image"]
    for k in (0, 3):
        with pytest.raises(LoraError) as info:
            ens.generate(_req(["style", "bad"], k=k))
        assert "'bad'" in str(info.value) and words in str(info.value)
        assert np.array_equal(ens.generate(_req())["image"], base), "base weights were not restored"


def test_deleted_and_replaced_files_are_reported_not_crashed_on(preset_dir, lora_dir, tmp_path):
    d = tmp_path / "loras"
    shutil.copytree(lora_dir, d)
    ens = _ensemble(preset_dir("tiny-sdxl"), d)
    first = ens.generate(_req(["style"], k=0))["image"]
    (d / "style.safetensors").unlink()
    from katz.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="unknown LoRA 'style'"):
        ens.generate(_req(["style"], k=0))
    data = (lora_dir / "style.safetensors").read_bytes()
    (d / "style.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(LoraError, match="style"):
        ens.generate(_req(["style"], k=0))
    (d / "style.safetensors").write_bytes(data)
    assert np.array_equal(ens.generate(_req(["style"], k=0))["image"], first)


def test_lora_k_must_be_below_steps():
    from katz.errors import InvalidArgument
    from katz.request import parse_request

    with pytest.raises(InvalidArgument, match="lora_k"):
        parse_request({"prompt": np.array([b"x"], object), "steps": np.array([4], np.int32),
                       "lora_k": np.array([4], np.int32)}, Limits(), frozenset(), lambda n: True)


def test_unet_orders_queued_calls_by_weight_set(preset_dir, lora_dir):
    """One execute() with interleaved LoRA sets switches weights once per set, in-place set first."""
    import torch

    ens = _ensemble(preset_dir("tiny-sdxl"), lora_dir)
    unet = ens.models["unet"]
    calls = []

    def call(names):
        inputs = {
            "sample": torch.randn(2, 4, 8, 8), "timestep": torch.full((2, 1), 500.0),
            "encoder_hidden_states": torch.randn(2, 77, 64), "text_embeds": torch.randn(2, 32),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
        }
        if names:
            inputs["loras"] = np.array([[n.encode() for n in names]] * 2, object)
            inputs["lora_wait"] = torch.ones(2, 1, dtype=torch.bool)
        calls.append(names)
        return inputs

    batch = [call(["style"]), call(["detail"]), call(["style"]), call([]), call(["detail"])]
    switches = []
    original = unet.bal.switch_to
    unet.bal.switch_to = lambda s: (switches.append(s), original(s))
    results = unet.execute_batch(batch)
    applied = [bool(r["lora_applied"][0]) for r in results]
    assert applied == [True, True, True, False, True]
    changed = [s for i, s in enumerate(switches) if i == 0 or s != switches[i - 1]]
    assert len(changed) == len(set(switches)) == 3


def test_slow_load_goes_in_at_the_first_step_after_it_is_ready(preset_dir, lora_dir):
    """A load that takes several steps (slow storage, 0.2 s) goes in at the first step that starts
    after it is on the device, well before the bound k; the request's prediction and the step it
    went in at are counted (katz_lora_* metrics)."""
    import time

    ens = _ensemble(preset_dir("tiny-sdxl"), lora_dir, delay=0.2, loop="unet")
    unet = ens.models["unet"]
    ens.generate(_req())  # the step time is known
    steps, k = 16, 15
    calls, ready_at = [], []
    choose, future = unet.bal.choose, unet.loras._future

    def timed_choose(*args, **kwargs):
        t0 = time.perf_counter()
        weights = choose(*args, **kwargs)
        calls.append((t0, time.perf_counter(), bool(weights)))
        return weights

    def watched_future(name):
        fut = future(name)
        if fut is not None and not fut.done():
            fut.add_done_callback(lambda f: ready_at.append(time.perf_counter()))  # runs as the load ends
        return fut

    unet.bal.choose, unet.loras._future = timed_choose, watched_future
    req = _req(["style"], k=k)
    req["steps"] = np.array([steps], np.int32)
    out = ens.generate(req)
    applied = int(out["lora_applied_step"][0])
    assert 0 < applied < k and [c[2] for c in calls] == [False] * applied + [True] * (steps - applied)
    assert calls[applied - 1][0] < ready_at[0] < calls[applied][1]  # the first step after the load
    s = unet.loras.stats
    assert s.requests == 1 and s.applied_step_sum == applied and s.steps_before_patch == applied
    assert s.waited_requests == 0 and 0 <= s.predicted_step_sum <= k and s.predicted_ready_seconds > 0
    counters = {(n, tuple(sorted(labels.items()))): v for n, _d, labels, v in unet.metrics()}
    assert counters[("katz_lora_applied_step_total", ())] == applied
    assert counters[("katz_lora_bal_requests_total", (("start", "cold"),))] == 1
    assert counters[("katz_lora_switches_total", (("le", "+Inf"),))] == s.switches >= 1

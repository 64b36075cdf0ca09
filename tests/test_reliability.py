"""Reliability under load and faults (issue 8): admission and backpressure, killed model instances,
LoRA files changing during a load, an unwritable model cache, out-of-memory, and state isolation.

Two servers: the shared ``hardened_server`` (tiny-sdxl, queue of 4 per step; admission and isolation)
and this module's ``fault_server`` (tiny-sd15 served from a read-only model cache, one denoising
loop, a 1 s queue timeout and 2 s simulated LoRA storage latency), whose processes get killed.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import RunningServer, control_png
from reliability_support import (
    MAX_QUEUE,
    Outcome,
    generation_tensors,
    http_json,
    inference_count,
    make_read_only,
    raw_infer,
    server_ready,
    snapshot,
    stubs,
    undo_read_only,
    wait_for,
)

pytestmark = pytest.mark.integration

LORA_DELAY_S = 2.0


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fault_server(preset_dir, tmp_path_factory):
    preset = preset_dir("tiny-sd15")
    cache = tmp_path_factory.mktemp("read-only-cache") / "presets"
    shutil.copytree(preset, cache / preset.name)
    loras = tmp_path_factory.mktemp("fault-loras")
    for f in (preset / "loras").iterdir():
        shutil.copy(f, loras / f.name)
    enforced = make_read_only(cache)
    before = snapshot(cache)
    server = RunningServer(
        "tiny-sd15", tmp_path_factory.mktemp("serve-faults"), cache,
        ["--pipeline-instances", "1", "--queue-timeout", "1", "--max-queue-size", "8",
         "--lora-dir", str(loras), "--lora-load-delay", str(LORA_DELAY_S), "--exit-timeout", "5"],
    )
    try:
        server.wait_ready()
        server.cache, server.cache_before, server.cache_enforced, server.lora_dir = cache, before, enforced, loras
        yield server
    finally:
        server.stop()
        undo_read_only(cache)


def _image(outcome: Outcome) -> np.ndarray:
    assert outcome.ok, f"{outcome.kind}: {outcome.message}"
    return outcome.result.as_numpy("image")


def _in_background(fn):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("value", fn()), daemon=True)
    thread.start()
    return thread, box


# ------------------------------------------------------------ admission
def test_queue_policy_is_rendered_for_every_ensemble_step(hardened_server):
    for model in ("preprocessing", "text_encoder", "katz_pipeline", "vae_decoder", "postprocessing", "png_encoder"):
        status, cfg = http_json(hardened_server, f"/v2/models/{model}/config")
        policy = cfg["dynamic_batching"]["default_queue_policy"]
        assert status == 200 and policy["max_queue_size"] == MAX_QUEUE and policy["timeout_action"] == "REJECT"
        assert int(policy["default_timeout_microseconds"]) == 30_000_000


def test_overload_is_rejected_with_unavailable_not_queued(hardened_server):
    """A burst far above capacity: every request gets an image or an immediate UNAVAILABLE."""
    n = 24
    tensors = generation_tensors(steps=4, width=128, height=128)
    with ThreadPoolExecutor(n) as pool:
        outcomes = list(pool.map(lambda i: raw_infer(hardened_server, tensors, "grpc" if i % 2 else "http"),
                                 range(n)))
    kinds = [o.kind for o in outcomes]
    rejected = [o for o in outcomes if o.kind == "unavailable"]
    assert set(kinds) <= {"ok", "unavailable"}, [(o.kind, o.message) for o in outcomes]
    assert rejected and kinds.count("ok") >= 2, kinds
    assert all("Exceeds maximum queue size" in o.message for o in rejected), rejected[0].message
    # shed at once, not after waiting their turn
    assert statistics.median(o.seconds for o in rejected) < statistics.median(o.seconds for o in outcomes if o.ok)
    assert server_ready(hardened_server)
    assert raw_infer(hardened_server, tensors).ok


def test_queue_timeout_rejects_requests_that_waited_too_long(fault_server):
    """One denoising loop busy for 2 s (a LoRA on slow storage): the next request waits in the
    queue past --queue-timeout 1 and fails with UNAVAILABLE instead of waiting on."""
    shutil.copy(fault_server.lora_dir / "style.safetensors", fault_server.lora_dir / "slow_a.safetensors")
    encoded = inference_count(fault_server, "text_encoder")
    thread, box = _in_background(
        lambda: raw_infer(fault_server, generation_tensors(loras=["slow_a"], lora_k=0, steps=2)))
    wait_for(lambda: inference_count(fault_server, "text_encoder") > encoded, 30, interval=0.02,
             what="the slow request to reach the denoising loop")
    time.sleep(0.3)
    late = raw_infer(fault_server, generation_tensors(steps=2, seed=3))
    thread.join(60)
    assert box["value"].ok, box["value"].message
    assert late.kind == "unavailable" and "timeout" in late.message.lower(), (late.kind, late.message)
    assert raw_infer(fault_server, generation_tensors(steps=2, seed=3)).ok


# ------------------------------------------------------------ killed instances
def _kill_mid_request(server, model: str, tensors: dict):
    (victim,) = stubs(server, model)
    # the unet model runs the whole loop in one call (--loop unet): its count moves when the loop is
    # over, so wait for the text encoder to finish (the loop starts next) and kill it during its steps
    counted = "text_encoder" if model == "unet" else model
    before = inference_count(server, counted)
    thread, box = _in_background(lambda: raw_infer(server, tensors))
    wait_for(lambda: inference_count(server, counted) > before, 60, interval=0.02, what=f"{counted} to run")
    if model == "unet":
        time.sleep(0.5)  # inside the 150-step loop (many seconds on this preset)
    os.kill(victim.pid, signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive(), "the request hung after its model instance was killed"
    return box["value"], victim


@pytest.mark.parametrize("model", ["unet", "controlnet"])
def test_killed_instance_fails_the_request_clearly_and_comes_back(fault_server, model):
    cn = dict(controlnets=["canny"], control_images=[control_png(3)]) if model == "controlnet" else {}
    probe = generation_tensors(seed=21, steps=2, **cn)
    reference = _image(raw_infer(fault_server, probe))

    outcome, victim = _kill_mid_request(fault_server, model, generation_tensors(steps=150, width=128, height=128, **cn))
    assert outcome.kind == "unavailable", (outcome.kind, outcome.message)
    assert model in outcome.message and "not healthy" in outcome.message, outcome.message

    def back():
        alive = [s for s in stubs(fault_server, model) if s.instance != victim.instance]
        return alive and raw_infer(fault_server, probe).ok

    wait_for(back, 180, interval=1.0, what=f"a fresh {model} instance (katz.deploy.watchdog)")
    assert server_ready(fault_server)
    for _ in range(3):  # later requests succeed, with the same image as before the crash
        assert np.array_equal(_image(raw_infer(fault_server, probe)), reference)
    log = fault_server.log_path.read_text()
    assert f"model '{model}': reloaded with fresh instances" in log


# ------------------------------------------------------------ LoRA files
@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_lora_file_deleted_or_truncated_during_its_load(fault_server, damage):
    store = fault_server.lora_dir
    name = f"victim_{damage}"
    good = (store / "style.safetensors").read_bytes()
    (store / f"{name}.safetensors").write_bytes(good)
    base = _image(raw_infer(fault_server, generation_tensors(seed=5, steps=4)))

    # lora_k=3: steps 0-2 run on base weights while the UNet's loader reads the file (2 s), step 3 waits;
    # the file is damaged once the request is past its text encoding (the loop runs, the load is under way)
    before = inference_count(fault_server, "text_encoder")
    thread, box = _in_background(
        lambda: raw_infer(fault_server, generation_tensors(seed=5, steps=4, loras=[name], lora_k=3)))
    wait_for(lambda: inference_count(fault_server, "text_encoder") > before, 30, interval=0.02,
             what="the text encoding")
    if damage == "delete":
        (store / f"{name}.safetensors").unlink()
    else:
        (store / f"{name}.safetensors").write_bytes(good[: len(good) // 3])
    thread.join(60)
    outcome = box["value"]
    assert outcome.kind == "invalid" and name in outcome.message, (outcome.kind, outcome.message)

    # the UNet is back on its base weights, the server serves on, and the restored file loads again
    assert np.array_equal(_image(raw_infer(fault_server, generation_tensors(seed=5, steps=4))), base)
    (store / f"{name}.safetensors").write_bytes(good)
    fixed = raw_infer(fault_server, generation_tensors(seed=5, steps=4, loras=[name], lora_k=0))
    reference = raw_infer(fault_server, generation_tensors(seed=5, steps=4, loras=["style"], lora_k=0))
    assert np.array_equal(_image(fixed), _image(reference))


# ------------------------------------------------------------ out of memory
def test_out_of_memory_fails_the_request_and_the_server_continues(fault_server):
    """A memory-limited host: the UNet process may grow by 64 MiB only (soft RLIMIT_AS); an
    oversized request fails with UNAVAILABLE 'out of memory', normal requests keep working."""
    (unet,) = stubs(fault_server, "unet")
    probe = generation_tensors(seed=8, steps=2)
    reference = _image(raw_infer(fault_server, probe))
    soft, hard = resource.prlimit(unet.pid, resource.RLIMIT_AS)
    with open(f"/proc/{unet.pid}/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.prlimit(unet.pid, resource.RLIMIT_AS, (vm + (64 << 20), hard))
    try:
        big = raw_infer(fault_server, generation_tensors(seed=8, steps=1, width=1024, height=1024))
        assert big.kind == "unavailable" and "out of memory" in big.message and "unet" in big.message, (
            big.kind, big.message)
        assert np.array_equal(_image(raw_infer(fault_server, probe)), reference)
    finally:
        resource.prlimit(unet.pid, resource.RLIMIT_AS, (soft, hard))
    assert [s.pid for s in stubs(fault_server, "unet")] == [unet.pid], "the UNet process was replaced"
    assert server_ready(fault_server)


# ------------------------------------------------------------ model cache
@pytest.mark.parametrize("how", ["read-only folder", "path blocked by a file"])
def test_unwritable_model_cache_fails_fast_and_clearly(tmp_path, how):
    if how == "read-only folder":
        cache = tmp_path / "cache"
        cache.mkdir()
        if not make_read_only(cache):
            undo_read_only(cache)
            pytest.skip("cannot make a folder read-only here (root without chattr)")
    else:
        (tmp_path / "blocker").write_text("a file, not a folder")
        cache = tmp_path / "blocker" / "cache"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "katz.cli", "serve", "--preset", "tiny-sd15", "--http-port", "1"],
            capture_output=True, text=True, timeout=180, env=dict(os.environ, KATZ_CACHE=str(cache)),
        )
    finally:
        if how == "read-only folder":
            undo_read_only(cache)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot write the model cache" in proc.stderr and "KATZ_CACHE" in proc.stderr
    assert "Traceback" not in proc.stderr and "tritonserver" not in proc.stderr.lower()


def test_read_only_model_cache_serves_and_is_never_written(fault_server):
    """The fault server runs from a filled, read-only cache (immutable under root): it served every
    test above, and nothing in the cache changed."""
    assert raw_infer(fault_server, generation_tensors(seed=1)).ok
    assert snapshot(fault_server.cache) == fault_server.cache_before
    if not fault_server.cache_enforced:
        pytest.skip("the cache could not be made read-only here; only checked that nothing was written")


# ------------------------------------------------------------ isolation
SPECS = [
    dict(seed=1),
    dict(seed=1, loras=["style"], lora_k=0),
    dict(seed=1, loras=["detail", "style"], lora_scales=[0.7, -0.4], lora_k=0),
    dict(seed=2, controlnets=["canny"], control_images=[control_png(1)]),
    dict(seed=2, controlnets=["canny"], control_images=[control_png(1)], controlnet_scales=[0.3]),
    dict(seed=2, controlnets=["canny"], control_images=[control_png(1)], width=128, height=128),
    dict(seed=2, controlnets=["canny"], control_images=[control_png(2)], loras=["detail"], lora_k=0),
    dict(seed=3, scheduler="euler_a", steps=3),
    dict(seed=3, scheduler="dpmpp_2m", steps=3, guidance_scale=1.0),
    dict(seed=3, scheduler="ddim", steps=3, negative_prompt="blurry", loras=["style"], lora_k=0),
    dict(seed=4, steps=3, loras=["detail"], lora_k=1),  # BAL: compared per reported patch step
]


@pytest.fixture(scope="module")
def references(hardened_server):
    return {}


def _run_spec(server, i: int, protocol: str):
    outcome = raw_infer(server, generation_tensors(**SPECS[i]), protocol)
    assert outcome.ok, (i, outcome.kind, outcome.message)
    res = outcome.result
    # BAL (lora_k > 0) may patch the LoRA in at any step up to k: the image depends on that step,
    # which the response reports, and on nothing else
    return (i, int(res.as_numpy("lora_applied_step").reshape(-1)[0]) if "loras" in SPECS[i] else -1), res.as_numpy(
        "image")


@settings(max_examples=int(os.environ.get("KATZ_ISOLATION_EXAMPLES", "4")), deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(order=st.permutations(range(len(SPECS))), workers=st.sampled_from([1, 3]), data=st.data())
def test_same_seed_same_image_in_any_order_and_concurrency(hardened_server, references, order, workers, data):
    if not references:
        for i in range(len(SPECS)):
            key, image = _run_spec(hardened_server, i, "http")
            references[key] = image
    protocols = [data.draw(st.sampled_from(["http", "grpc"])) for _ in order]
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda ip: _run_spec(hardened_server, *ip), zip(order, protocols)))
    for key, image in results:
        if key in references:
            assert np.array_equal(image, references[key]), f"request {SPECS[key[0]]} changed with order {order}"
        else:
            references[key] = image  # a BAL request that patched at another step: first sighting

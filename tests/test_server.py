"""Integration: a real tritonserver serving the katz ensemble, driven with tritonclient."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tritonclient.utils import InferenceServerException

from katz.client import Generation, infer, make_client

import tooling_support
from conftest import control_png

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sdxl(start_server):
    """The default tiny-sdxl server, shared with test_perf, test_stream and test_traces."""
    return tooling_support.tiny_server(start_server)


@pytest.fixture(scope="module")
def sd15(start_server, preset_dir, tmp_path_factory):
    """SD 1.5 with its own LoRA folder (the preset's LoRAs plus a corrupt file), its ControlNets in
    the UNet's process (``--controlnet-mode local``; the sdxl server runs the default service mode).
    It serves a copy of the preset holding only fp16-named weight files, as a download of only the
    fp16 files leaves a folder (the same weights: its images are checked against diffusers on the
    preset itself)."""
    from checkpoint_support import variant_only_copy

    model = variant_only_copy(preset_dir("tiny-sd15"), tmp_path_factory.mktemp("sd15") / "fp16-only")
    loras = tmp_path_factory.mktemp("loras")
    for f in (preset_dir("tiny-sd15") / "loras").iterdir():
        shutil.copy(f, loras / f.name)
    good = (loras / "style.safetensors").read_bytes()
    (loras / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    return start_server(None, ["--model-dir", str(model), "--lora-dir", str(loras), "--controlnet-mode", "local"])


def _gen(**kw) -> Generation:
    kw.setdefault("prompt", "a photo of a cat")
    kw.setdefault("seed", 11)
    kw.setdefault("steps", 3)
    return Generation(**kw)


def _png_pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_text_to_image_returns_png(sdxl, protocol):
    url = sdxl.http_url if protocol == "http" else sdxl.grpc_url
    result = infer(make_client(url, protocol), _gen(), protocol)
    assert result.image.shape == (64, 64, 3) and result.image.dtype == np.uint8
    assert result.png.startswith(b"\x89PNG")
    assert np.array_equal(_png_pixels(result.png), result.image)
    assert result.seed == 11
    pixels = infer(make_client(url, protocol), _gen(), protocol, png=False)  # the PNG encode skipped
    assert pixels.png == b"" and np.array_equal(pixels.image, result.image) and pixels.seed == 11


def test_http_and_grpc_agree_and_seed_is_returned(sdxl):
    a = infer(make_client(sdxl.http_url), _gen(seed=5))
    b = infer(make_client(sdxl.grpc_url, "grpc"), _gen(seed=5), "grpc")
    assert np.array_equal(a.image, b.image)
    r = infer(make_client(sdxl.http_url), Generation(prompt="a cat", steps=2))
    assert 0 <= r.seed < 2**63
    again = infer(make_client(sdxl.http_url), Generation(prompt="a cat", steps=2, seed=r.seed))
    assert np.array_equal(r.image, again.image)


def test_raw_request_without_seed_gets_a_random_seed_in_the_png(sdxl):
    import tritonclient.http as http

    client = http.InferenceServerClient(sdxl.http_url)
    prompt = http.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"a cat"], dtype=object))
    steps = http.InferInput("steps", [1], "INT32")
    steps.set_data_from_numpy(np.array([2], np.int32))
    res = client.infer("katz", [prompt, steps])
    png = Image.open(io.BytesIO(bytes(res.as_numpy("png")[0])))
    seed = int(png.text["katz:seed"])
    assert 0 <= seed < 2**63 and png.text["katz:steps"] == "2"
    again = infer(make_client(sdxl.http_url), Generation(prompt="a cat", steps=2, seed=seed))
    assert np.array_equal(res.as_numpy("image"), again.image)


def test_server_image_matches_diffusers(sdxl, preset_dir):
    from test_pipeline_parity import _diffusers_image, _max_diff

    ours = infer(make_client(sdxl.http_url), _gen(prompt="a photo of a red house", seed=42, steps=4,
                                                   controlnets=["canny"], control_images=[control_png()],
                                                   controlnet_scales=[0.9], loras=["detail"], lora_k=0))
    ref = _diffusers_image(preset_dir("tiny-sdxl"), "default", controlnet=True, loras=(("detail", 1.0),))
    assert _max_diff(ours.image, ref) <= 2


def test_controlnet_and_lora_requests(sdxl):
    client = make_client(sdxl.http_url)
    plain = infer(client, _gen()).image
    cn = infer(client, _gen(controlnets=["canny"], control_images=[control_png()])).image
    lora = infer(client, _gen(loras=["style", "detail"], lora_scales=[0.8, 0.5])).image
    assert not np.array_equal(plain, cn) and not np.array_equal(plain, lora)
    assert np.array_equal(infer(client, _gen()).image, plain), "state leaked into the next request"


def test_sd15_preset(sd15):
    client = make_client(sd15.grpc_url, "grpc")
    r = infer(client, _gen(controlnets=["canny"], control_images=[control_png()], loras=["detail"]), "grpc")
    assert r.image.shape == (64, 64, 3) and r.image.std() > 5


def test_local_controlnets_match_diffusers_without_a_controlnet_model(sd15, preset_dir):
    from test_pipeline_parity import _diffusers_image, _max_diff

    client = make_client(sd15.http_url)
    assert client.is_model_ready("unet") and not client.is_model_ready("controlnet")
    ours = infer(client, _gen(prompt="a photo of a red house", seed=42, steps=4, controlnets=["canny"],
                              control_images=[control_png()], controlnet_scales=[0.9]))
    ref = _diffusers_image(preset_dir("tiny-sd15"), "default", controlnet=True)
    assert _max_diff(ours.image, ref) <= 2


BAD = [
    (dict(prompt=None), "prompt"),
    (dict(steps=0), "steps"),
    (dict(steps=1000), "steps"),
    (dict(width=100), "width"),
    (dict(height=4096), "height"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(scheduler="nope"), "scheduler"),
    (dict(controlnets=["nope"], control_images=[control_png()]), "controlnets"),
    (dict(controlnets=["canny"], control_images=[]), "control_images"),
    (dict(controlnets=["canny"], control_images=[b"\x89PNG garbage"]), "control_images"),
    (dict(controlnets=["canny"], control_images=[control_png()], controlnet_scales=[float("inf")]),
     "controlnet_scales"),
    (dict(controlnets=["canny"], control_images=[control_png()], controlnet_scales=[1.0, 1.0]),
     "controlnet_scales"),
    (dict(loras=["nope"]), "loras"),
    (dict(loras=["../loras/style"]), "loras"),
    (dict(loras=["style"], lora_scales=[float("nan")]), "lora_scales"),
    (dict(loras=["style"], lora_scales=[1.0, 2.0]), "lora_scales"),
]


def _send_raw(client, protocol, gen: Generation, drop_prompt: bool):
    if not drop_prompt:
        return infer(client, gen, protocol)
    import tritonclient.http as http

    arr = np.array([3], np.int32)
    inp = http.InferInput("steps", [1], "INT32")
    inp.set_data_from_numpy(arr)
    return client.infer("katz", [inp])


@pytest.mark.parametrize("fields, field", BAD, ids=[f for _, f in BAD])
def test_bad_input_is_invalid_arg_naming_the_field(sdxl, fields, field):
    client = make_client(sdxl.http_url)
    drop = "prompt" in fields
    gen = _gen(**{k: v for k, v in fields.items() if k != "prompt"})
    with pytest.raises(InferenceServerException) as info:
        _send_raw(client, "http", gen, drop)
    assert info.value.status() == "400"
    assert field in info.value.message()
    assert client.is_server_ready()


def test_bad_input_over_grpc_is_invalid_argument(sdxl):
    client = make_client(sdxl.grpc_url, "grpc")
    with pytest.raises(InferenceServerException) as info:
        infer(client, _gen(steps=-3), "grpc")
    assert "INVALID_ARGUMENT" in str(info.value.status()) and "steps" in info.value.message()


def test_corrupt_lora_file_is_reported_and_weights_restored(sd15):
    client = make_client(sd15.http_url)
    before = infer(client, _gen()).image
    with pytest.raises(InferenceServerException) as info:
        infer(client, _gen(loras=["style", "truncated"]))
    assert info.value.status() == "400" and "truncated" in info.value.message()
    assert np.array_equal(infer(client, _gen()).image, before)


def test_concurrent_requests_match_sequential(sdxl):
    requests = [
        _gen(seed=100 + i, loras=[[], ["style"], ["detail"], ["style", "detail"]][i % 4], lora_k=0,
             controlnets=["canny"] if i % 3 == 0 else [], control_images=[control_png(i)] if i % 3 == 0 else [])
        for i in range(8)
    ]
    sequential = [infer(make_client(sdxl.http_url), r).image for r in requests]

    def run(i):
        protocol = "grpc" if i % 2 else "http"
        client = make_client(sdxl.grpc_url if protocol == "grpc" else sdxl.http_url, protocol)
        return infer(client, requests[i], protocol).image

    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(run, range(8)))
    for i, (a, b) in enumerate(zip(sequential, concurrent)):
        assert np.array_equal(a, b), f"request {i} differs when run concurrently"


def test_generate_cli_writes_png(sdxl, tmp_path):
    ctrl = tmp_path / "c.png"
    ctrl.write_bytes(control_png())
    out = tmp_path / "x.png"
    proc = subprocess.run(
        [sys.executable, "-m", "katz.cli", "generate", "--url", sdxl.grpc_url, "--protocol", "grpc",
         "--prompt", "a cat", "--seed", "3", "--steps", "2", "--controlnet", "canny", "--control-image", str(ctrl),
         "--lora", "style:0.5", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "seed 3" in proc.stdout and _png_pixels(out.read_bytes()).shape == (64, 64, 3)
    bad = subprocess.run(
        [sys.executable, "-m", "katz.cli", "generate", "--url", sdxl.http_url, "--prompt", "a cat",
         "--steps", "0", "--out", str(tmp_path / "y.png")],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 1 and "steps" in bad.stderr


def test_serve_rejects_incomplete_model_folder(tmp_path, preset_dir):
    broken = tmp_path / "model"
    shutil.copytree(preset_dir("tiny-sdxl"), broken)
    shutil.rmtree(broken / "vae")
    (broken / "text_encoder_2" / "model.safetensors").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "katz.cli", "serve", "--model-dir", str(broken), "--http-port", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "vae/ is missing" in proc.stderr and "text_encoder_2/ has no weights" in proc.stderr
    assert "tritonserver" not in proc.stderr.lower()


def test_serve_rejects_a_controlnet_server_without_its_controlnet_model(preset_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "katz.cli", "serve", "--model-dir", str(preset_dir("tiny-sdxl")), "--only",
         "controlnet", "--controlnet-mode", "local", "--http-port", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0 and "--controlnet-mode local" in proc.stderr


def test_sigterm_stops_the_server_cleanly(start_server):
    server = start_server("tiny-sd15")
    assert server.stop() == 0


def test_lora_metrics_are_exported(sdxl):
    import urllib.request

    infer(make_client(sdxl.http_url), _gen(loras=["style"], lora_k=0))
    text = urllib.request.urlopen(f"http://127.0.0.1:{sdxl.metrics_port}/metrics", timeout=10).read().decode()
    loads = [l for l in text.splitlines() if l.startswith("katz_lora_loads_total")]
    assert loads and float(loads[0].split()[-1]) >= 1
    assert 'katz_lora_cache_hits_total{model="unet",tier="device"}' in text
    # preprocessing read the file ahead (counted once its next request publishes the counters)
    infer(make_client(sdxl.http_url), _gen(loras=["style"], lora_k=0))
    text = urllib.request.urlopen(f"http://127.0.0.1:{sdxl.metrics_port}/metrics", timeout=10).read().decode()
    ahead = [l for l in text.splitlines() if l.startswith("katz_lora_readahead_files_total")]
    assert any('model="preprocessing"' in l for l in ahead)
    assert sum(float(l.split()[-1]) for l in ahead) >= 1
    # and named the LoRA to the UNet's loader as the requests arrived (katz.lora.hints)
    hints = [l for l in text.splitlines() if l.startswith('katz_lora_hints_total{model="unet"')]
    assert hints and float(hints[0].split()[-1]) >= 1, hints
    # gauges: where the UNet's memory goes (weights, pristine copies of the patched weights, LoRA cache)
    parts = {l.split('part="')[1].split('"')[0]: float(l.split()[-1])
             for l in text.splitlines() if l.startswith("katz_unet_memory_bytes")}
    assert parts["weights"] > parts["pristine"] > 0 and parts["lora_cache"] > 0, parts


def test_bal_reports_the_patch_step(sdxl):
    r = infer(make_client(sdxl.http_url), _gen(steps=4, loras=["detail"], lora_k=2))
    assert 0 <= r.lora_applied_step <= 2
    assert infer(make_client(sdxl.http_url), _gen()).lora_applied_step == -1


def _inference_count(server, model: str) -> float:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    lines = [l for l in text.splitlines() if l.startswith(f'nv_inference_count{{model="{model}"')]
    assert lines, f"no nv_inference_count for {model}"
    return sum(float(l.split()[-1]) for l in lines)


def test_png_is_encoded_only_when_requested(sdxl):
    """``png_encoder`` is its own ensemble step: a request for ``image`` alone does not run it."""
    import tritonclient.http as http

    client = http.InferenceServerClient(sdxl.http_url)
    inputs = []
    for name, value, dtype in (("prompt", np.array([b"a cat"], dtype=object), "BYTES"),
                               ("seed", np.array([4], np.int64), "INT64"),
                               ("steps", np.array([1], np.int32), "INT32")):
        inputs.append(http.InferInput(name, list(value.shape), dtype))
        inputs[-1].set_data_from_numpy(value)

    def run(*outputs):
        before = {m: _inference_count(sdxl, m) for m in ("postprocessing", "png_encoder")}
        requested = [http.InferRequestedOutput(n) for n in outputs] or None
        res = client.infer("katz", inputs, outputs=requested)
        ran = {m: _inference_count(sdxl, m) - before[m] for m in before}
        return res, ran

    try:
        image_only, ran = run("image")
        assert ran == {"postprocessing": 1, "png_encoder": 0}, ran
        assert image_only.as_numpy("png") is None and image_only.as_numpy("image").shape == (64, 64, 3)
        everything, ran = run()  # no outputs named: all of them
        assert ran == {"postprocessing": 1, "png_encoder": 1}, ran
        png_only, ran = run("png")
        assert ran == {"postprocessing": 1, "png_encoder": 1}, ran
        assert png_only.as_numpy("image") is None
    finally:
        client.close()
    pixels = image_only.as_numpy("image")
    assert np.array_equal(everything.as_numpy("image"), pixels)
    png = Image.open(io.BytesIO(bytes(png_only.as_numpy("png")[0])))
    assert np.array_equal(np.asarray(png.convert("RGB")), pixels)
    assert png.text["katz:seed"] == "4" and png.text["katz:steps"] == "1"
    assert bytes(everything.as_numpy("png")[0]) == bytes(png_only.as_numpy("png")[0])

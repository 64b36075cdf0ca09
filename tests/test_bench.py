"""The benchmark harness runs on the CPU with a tiny preset (a smoke run of the code, not a figure)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

CASES = ("plain", "controlnet", "cold_lora_bal", "cold_lora_k0", "controlnet_cold_lora")


@pytest.mark.integration
def test_e2e_bench_smoke_on_the_cpu(tmp_path, cache_root, preset_dir):
    preset_dir("tiny-sdxl")  # built here, not inside the benchmark
    out = tmp_path / "e2e.json"
    proc = subprocess.run(
        [sys.executable, "bench/e2e_bench.py", "--preset", "tiny-sdxl", "--steps", "2", "--repeats", "1",
         "--serve-args", "--torch-threads 1", "--profile", str(tmp_path / "prof"), "--trace", str(tmp_path / "trace"), "--paired", "--out", str(out)],
        cwd=ROOT, env=dict(os.environ, KATZ_CACHE=str(cache_root.parent)), capture_output=True, text=True,
        timeout=840,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for case in CASES:
        assert res[f"katz_e2e_{case}_p50_s"] > 0
        assert f"\n{case} " in proc.stdout  # its row in the table of ratios
    for key in ("diffusers_plain_s", "diffusers_controlnet_s", "diffusers_cold_lora_s",
                "diffusers_controlnet_cold_lora_s", "unet_step_ms"):
        assert res[key] > 0, key
    assert res["katz_e2e_unet_runs"] == 2  # 1 plain request x 2 steps, one batch-2 evaluation each
    assert res["katz_e2e_unet_step_ms"] > 0 and res["katz_e2e_overhead_per_step_ms"] >= 0
    step = res["katz_e2e_step_breakdown_ms"]  # the pipeline's own counters against the unet's Triton phases
    assert step["pipeline_own"] > 0 and step["unet_execute"] > 0 and step["bls_transport"] > 0, step
    assert step["unet_execute"] >= step["unet_device"], step  # on the CPU the engine runs inside execute()
    # --paired: a plain request before each other request, and each case's ratio to it
    for case in CASES[1:]:
        assert len(res[f"katz_e2e_{case}_plain_all_s"]) == 1 and res[f"katz_e2e_{case}_paired_ratio"] > 0
    # --profile: the loop's and the UNet's Python profiles, summarised (katz/serving/profiling.py); the loop
    # runs in the UNet's process (--loop unet, the default with one UNet shard)
    assert "_call" in (tmp_path / "prof" / "katz_pipeline.txt").read_text()
    unet_profile = (tmp_path / "prof" / "unet.txt").read_text()
    assert "execute_batch" in unet_profile and "denoise" in unet_profile
    # --trace: one untimed plain request traced in the models (one file each; no kernels on the CPU)
    unet_trace = list((tmp_path / "trace").glob("unet.*.call3.gaps.txt"))
    assert len(unet_trace) == 1 and unet_trace[0].read_text() == "no GPU kernels in this call\n"
    assert unet_trace[0].with_name(unet_trace[0].name.replace(".gaps.txt", ".json.gz")).stat().st_size > 0
    assert f"--- {unet_trace[0].name}" in proc.stdout
    # per case: the loop's time, the UNet's GPU time, the LoRA wait and switch per request
    per_request = res["katz_e2e_cold_lora_bal_per_request_ms"]
    assert per_request["loop_ms"] >= per_request["unet_device_ms"] > 0 and per_request["lora_switch_ms"] > 0
    lora = res["katz_e2e_lora_metrics"]
    assert lora["katz_lora_loads_total"] >= 3  # each cold LoRA is a new file
    assert lora["katz_lora_switch_seconds_total"] > 0


def test_gpu_memory_is_attributed_to_models_by_stub_command_line():
    from bench.e2e_bench import memory_by_model

    smi = "101, 2048\n102, 1024\n103, 512\n104, 256\n"
    stub = "/tmp/katz-serve-x/backends/python/triton_python_backend_stub /tmp/katz-serve-x/model_repository/{}/1/model.py shm"
    cmdlines = {101: stub.format("unet"), 102: stub.format("katz_pipeline"), 103: stub.format("katz_pipeline"),
                104: "/usr/bin/tritonserver --model-repository=/tmp/x"}
    got = memory_by_model(smi, cmdlines)
    mib = 1024**2 / 1e9
    assert got == {"unet": 2048 * mib, "katz_pipeline": 1536 * mib, "other:tritonserver": 256 * mib}
    assert memory_by_model("105, 64\n", {}) == {"other:105": 64 * mib}


# ---------------------------------------------------------------- traffic benchmark (issue 23)
def _io(config: str) -> dict:
    """``{(input|output, name): (data_type, dims, optional)}`` of a config.pbtxt's tensors."""
    import re

    out = {}
    for kind in ("input", "output"):
        block = re.search(rf"^{kind} \[(.*?)^\]", config, re.S | re.M).group(1)
        for m in re.finditer(r'name: "(\w+)" data_type: (\w+) dims: \[ ([^\]]*) \]( optional: true)?', block):
            out[(kind, m.group(1))] = (m.group(2), m.group(3).strip(), bool(m.group(4)))
    return out


def test_peer_takes_katz_request_tensors_and_renders_per_device(tmp_path):
    """The peer's model repository has the `katz` ensemble's inputs and outputs (so one client drives
    both servers), and renders with this run's folders for CPU or GPU."""
    from bench.traffic_bench import render_peer_repository

    peer = (ROOT / "bench" / "peer" / "katz" / "config.pbtxt").read_text()
    ensemble = (ROOT / "model_repository" / "katz" / "config.pbtxt").read_text()
    assert _io(peer) == _io(ensemble) and len(_io(peer)) == 20
    kw = dict(model_dir=tmp_path / "m", controlnets={"canny": "/c/canny", "depth": "/c/depth"}, lora_dir=tmp_path / "l",
              dtype="float32", max_adapters=3, lora_mode="unfused", torch_threads=1)
    repo = render_peer_repository(tmp_path / "cpu", gpu=None, **kw)
    text = (repo / "katz" / "config.pbtxt").read_text()
    assert "instance_group [ { kind: KIND_CPU count: 1 } ]" in text and "KIND_GPU" not in text
    for key, value in (("model_dir", tmp_path / "m"), ("controlnets", "canny=/c/canny,depth=/c/depth"),
                       ("lora_dir", tmp_path / "l"), ("dtype", "float32"), ("max_adapters", 3),
                       ("lora_mode", "unfused"), ("torch_threads", 1)):
        assert f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}' in text, key
    assert (repo / "katz" / "1" / "model.py").read_bytes() == (ROOT / "bench/peer/katz/1/model.py").read_bytes()
    gpu = (render_peer_repository(tmp_path / "gpu", gpu=1, **kw) / "katz" / "config.pbtxt").read_text()
    assert "instance_group [ { kind: KIND_GPU count: 1 gpus: [ 1 ] } ]" in gpu
    assert _io(gpu) == _io(peer)
    with pytest.raises(ValueError, match="cannot go into config.pbtxt"):
        render_peer_repository(tmp_path / "bad", gpu=None, **{**kw, "lora_dir": 'a"b'})


def test_lora_library_formats_merge_alike_in_katz_and_diffusers(preset_dir, tmp_path):
    """Library files of both formats (peft names; kohya names in SDXL's original block numbering) adapt
    every attention projection of the UNet, and Katz's merge equals diffusers' load_lora_weights +
    set_adapters + fuse_lora; the writer is deterministic and resumable."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import logging as dlogging

    from bench.lora_library import ensure_library
    from katz.lora.patch import LoraPatcher
    from katz.lora.safetensors import read_lora_file
    from katz.lora.weights import parse_lora

    dlogging.set_verbosity_error()
    folder = preset_dir("tiny-sdxl")
    lib = tmp_path / "lib"
    manifest = ensure_library(lib, folder, count=2, ranks=(4, 8), seed=0, log=lambda m: None)
    files = {f["name"]: f for f in manifest["files"]}
    assert [files[n]["format"] for n in ("lora-000", "lora-001")] == ["peft", "kohya"]
    assert all((lib / f"{n}.safetensors").stat().st_size == f["bytes"] for n, f in files.items())
    again = ensure_library(lib, folder, count=2, ranks=(4, 8), seed=0, log=lambda m: None)
    assert again["written_files"] == 0  # resumable: complete files are kept
    other = tmp_path / "other"
    ensure_library(other, folder, count=2, ranks=(4, 8), seed=0, log=lambda m: None)
    assert all((lib / f"{n}.safetensors").read_bytes() == (other / f"{n}.safetensors").read_bytes() for n in files)
    with open(other / "lora-001.safetensors", "r+b") as f:  # a truncated file is written again
        f.truncate(1000)
    assert ensure_library(other, folder, count=2, ranks=(4, 8), seed=0, log=lambda m: None)["written_files"] == 1

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    for name, entry in files.items():
        tensors = read_lora_file(lib / f"{name}.safetensors", name)
        if entry["format"] == "kohya":
            assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in tensors)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        weights = parse_lora(tensors, name, "sdxl", modules={"unet": unet})
        assert len(weights.layers["unet"]) == manifest["targets"]
        LoraPatcher(unet, "unet").apply([(weights, 0.7)])
        katz = unet.state_dict()
        adapter = name.replace("-", "_")
        pipe.load_lora_weights(str(lib), weight_name=f"{name}.safetensors", adapter_name=adapter)
        pipe.set_adapters([adapter], adapter_weights=[0.7])
        pipe.fuse_lora(components=["unet"], adapter_names=[adapter])
        fused = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
        changed = [k for k in katz if not torch.equal(katz[k], base[k])]
        assert len(changed) == manifest["targets"]  # one weight per adapted projection
        assert max((fused[k] - katz[k]).abs().max().item() for k in katz) < 1e-5, name
        pipe.unfuse_lora(components=["unet"])
        pipe.delete_adapters(adapter)


def test_traffic_metrics_keep_lora_tiers_apart():
    from bench.traffic_bench import lora_figures, metric_delta, parse_metrics

    def text(host_hits, device_hits, loads):
        return (f'# TYPE katz_lora_cache_hits_total counter\n'
                f'katz_lora_cache_hits_total{{model="unet",tier="host"}} {host_hits}\n'
                f'katz_lora_cache_hits_total{{model="unet",tier="device"}} {device_hits}\n'
                f'katz_lora_loads_total{{model="unet"}} {loads}\n'
                f'katz_gpu_memory_bytes{{model="unet",kind="reserved"}} 5e9\n'
                f'nv_inference_request_summary_us{{model="katz",quantile="0.5"}} 7\n'
                f'nv_cpu_utilization 0.5\n')

    before, after = parse_metrics(text(1, 2, 3)), parse_metrics(text(4, 10, 5))
    assert not any("quantile" in k or k.startswith("nv_cpu") for k in after)
    delta = metric_delta(before, after)
    assert delta['katz_gpu_memory_bytes{model="unet",kind="reserved"}'] == 5e9  # a gauge: its value, not a change
    figures = lora_figures(delta, "katz")
    assert (figures["host_hits"], figures["device_hits"], figures["loads"]) == (3, 8, 2)


@pytest.mark.integration
def test_traffic_bench_smoke_on_the_cpu(tmp_path, cache_root, preset_dir):
    """bench/traffic_bench.py --preset tiny-sdxl: both servers started, the same trace replayed on each
    (and LoRA-free on Katz), a goodput line per run, the results JSON; a rerun resumes (nothing left)."""
    import re
    import time

    preset_dir("tiny-sdxl")  # built here, not inside the benchmark
    out = tmp_path / "traffic"
    cmd = [sys.executable, "bench/traffic_bench.py", "--preset", "tiny-sdxl", "--out", str(out)]
    env = dict(os.environ, KATZ_CACHE=str(cache_root.parent))
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    goodput = dict(re.findall(r"^goodput (\S+) ([0-9.]+) at slo 10$", proc.stdout, re.M))
    assert set(goodput) == {"katz", "katz-no-lora", "peer"} and all(float(g) > 0 for g in goodput.values()), proc.stdout
    res = json.loads((out / "results.json").read_text())
    trace = res["traces"]["2"]
    for run in ("katz", "katz-no-lora", "peer"):
        rec = res["runs"][run]["2"]
        assert rec["complete"] and rec["first_after_start"] == (run != "katz-no-lora"), run
        s = rec["summary"]
        assert (s["requests"], s["ok"], s["failed"]) == (trace["requests"], trace["requests"], 0), run
        assert s["p50_s"] <= s["p90_s"] <= s["p99_s"] and set(s["slos"]) == {"5", "10"}
        assert rec["resident_after_evict"] == 0.0  # the library was cold before the replay
    assert res["runs"]["katz"]["2"]["trace_sha1"] == res["runs"]["peer"]["2"]["trace_sha1"] == trace["sha1"]
    assert res["runs"]["katz-no-lora"]["2"]["trace_sha1"] == trace["no_lora_sha1"] != trace["sha1"]
    # the LoRA figures from each server's own metrics
    with_loras = trace["with_loras"]
    assert with_loras > 0
    assert res["runs"]["katz"]["2"]["lora"]["loads"] >= 1 and res["runs"]["peer"]["2"]["lora"]["loads"] >= 1
    assert res["runs"]["katz-no-lora"]["2"]["lora"]["loads"] == 0
    assert res["runs"]["peer"]["2"]["metrics"]['peer_requests_total{model="katz"}'] == trace["requests"]
    # both servers reject bad fields alike, naming them; and give the same image for the same request
    for name in ("katz", "peer"):
        probes = res["servers"][name]["starts"][0]["validation"]
        assert "INVALID_ARGUMENT" in probes["steps"] and "steps: 0 is outside [1, 150]" in probes["steps"], probes
        assert "loras: unknown LoRA 'no-such-lora'" in probes["loras"], probes
        assert "controlnets: unknown ControlNet 'nope'" in probes["controlnets"], probes
    images = res["warmup_image_diff"]  # same request, fp32: the peer computes what Katz computes
    assert all(images["katz_vs_peer"][case]["max_abs"] <= 2 for case in ("lora", "base")), images
    for name in ("katz", "peer"):  # the LoRA was applied, then taken out again: far above the servers' difference
        assert images["lora_vs_base"][name]["mean_abs"] > 10 * images["katz_vs_peer"]["lora"]["mean_abs"] + 0.01, images
    library = json.loads((out / "work" / "loras" / "library.json").read_text())
    assert res["library"]["count"] == 8 and {f["format"] for f in library["files"]} == {"peft", "kohya"}
    for plot in ("latency_cdf.png", "latency_over_time.png", "queue_length.png"):
        assert (out / "plots" / "r2" / plot).read_bytes().startswith(b"\x89PNG")
    # a rerun with the same --out finds everything measured: no set-up, no server
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "every rate already measured" in again.stdout, again.stdout[-2000:]
    assert "server ready" not in again.stdout and "[setup]" not in again.stdout
    assert re.findall(r"^goodput .*$", again.stdout, re.M) == re.findall(r"^goodput .*$", proc.stdout, re.M)
    print(f"traffic_bench smoke run: {took:.1f}s")


def test_flux_bench_smoke_on_the_cpu(tmp_path, cache_root):
    """bench/flux_bench.py on the tiny-flux architecture: every phase's figures in the JSON and the ratio table
    (on the CPU the compiled and float8 variants run eagerly: the code path, not a figure)."""
    out = tmp_path / "flux.json"
    proc = subprocess.run(
        [sys.executable, "bench/flux_bench.py", "--preset", "tiny-flux", "--steps", "2", "--repeats", "1",
         "--compile", "--fp8", "--compile-cache", str(tmp_path / "inductor"), "--model-dir", str(tmp_path / "model"),
         "--out", str(out)],
        cwd=ROOT, env=dict(os.environ, KATZ_CACHE=str(cache_root.parent)), capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("diffusers_step_ms", "katz_step_eager_ms", "katz_step_compiled_ms", "katz_step_compiled_fp8_ms",
                "diffusers_plain_s", "katz_plain_s", "diffusers_controlnet_cold_lora_s",
                "katz_controlnet_cold_lora_k0_s", "katz_controlnet_cold_lora_bal_s", "katz_lora_load_s_mean",
                "diffusers_controlnet_s", "katz_controlnet_s"):
        assert res[key] > 0, key
    breakdown = res["katz_controlnet_breakdown"]  # where a request's time went, by model
    assert 0 < breakdown["unet_s"] <= breakdown["katz_pipeline_s"] < res["katz_controlnet_s"] * 1.5
    assert breakdown["transformer_step_ms"] > 0 and breakdown["vae_decoder_s"] > 0
    assert res["katz_step_eager_rel_err"] == 0 and res["katz_step_compiled_fp8_rel_err"] < 1e-5  # CPU: eager
    assert res["katz_bal_applied_steps"] in ([0], [1])  # the cold LoRA in by step k = 1 of 2
    assert set(res["phase_s"]) == {"build", "diffusers_step", "diffusers_request", "katz_step", "katz_request"}
    assert len(res["ratios"]) == 7 and all(r > 0 for r in res["ratios"].values())
    for row in ("transformer step, Katz compiled_fp8 (ms)", "request, plain (s)",
                "request + ControlNet + cold LoRA, Katz k = 0 (s)", "Katz/diff"):
        assert row in proc.stdout, row
    assert (tmp_path / "model" / "loras" / "style.safetensors").stat().st_size > 0

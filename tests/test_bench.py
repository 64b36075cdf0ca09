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

"""`katz perf`: perf_analyzer input data, its report, the missing-tool message, and a smoke
sweep against a live tiny-sdxl server over HTTP and gRPC."""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys

import pytest

from katz.tools import perf

import tooling_support

integration = pytest.mark.integration


def _katz(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "katz.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_input_data_is_a_full_workflow_per_request():
    png = perf.control_image_png(64, 64)
    data = perf.input_data(3, steps=2, width=64, height=64, controlnets=["canny"], control_image=png,
                           loras=[("style", 0.8), ("detail", 0.5)], seed=10)["data"]
    assert len(data) == 3
    assert [e["seed"]["content"] for e in data] == [[10], [11], [12]]
    assert len({e["prompt"]["content"][0] for e in data}) == 3
    e = data[0]
    assert e["steps"] == {"content": [2], "shape": [1]}
    assert e["loras"] == {"content": ["style", "detail"], "shape": [2]}
    assert e["lora_scales"] == {"content": [0.8, 0.5], "shape": [2]}
    raw = base64.b64decode(e["control_images"]["b64"])  # Triton's BYTES serialization
    assert struct.unpack("<I", raw[:4])[0] == len(png) and raw[4:] == png
    assert png.startswith(b"\x89PNG")


def test_parse_report(tmp_path):
    report = tmp_path / "perf.csv"
    report.write_text(
        "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
        "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
        "2,11.9,71,771,2,158,160581,2679,124,164018,223810,236894,242946\n"
        "1,8.6,72,0,2,177,110934,2231,21,114323,146006,152713,182087\n")
    points = perf.parse_report(report)
    assert [p.load for p in points] == [1, 2]
    assert points[0].throughput == pytest.approx(8.6) and points[0].p50_ms == pytest.approx(114.323)
    assert points[1].p99_ms == pytest.approx(242.946)
    assert points[0].avg_ms == pytest.approx((72 + 0 + 2 + 177 + 110934 + 2231 + 21) / 1000)
    assert "p90 ms" in perf.format_table(points, "concurrency")


def test_missing_perf_analyzer_says_how_to_install(tmp_path):
    env = {"KATZ_PERF_TOOLS": str(tmp_path / "none"), "PATH": "/usr/bin:/bin", "KATZ_PERF_ANALYZER": ""}
    proc = _katz("perf", "--url", "127.0.0.1:1", env=env, timeout=60)
    assert proc.returncode == 2
    assert "perf_analyzer was not found" in proc.stderr and "katz perf --install" in proc.stderr
    assert "libb64-0d" in proc.stderr


@pytest.fixture(scope="module")
def analyzer():
    found = perf.find_perf_analyzer()
    tooling_support.require(found, "perf_analyzer", "run `make perf-tools` (katz perf --install)")
    found.version()  # raises when it cannot start (libb64, libcudart)
    return found


@pytest.fixture(scope="module")
def server(start_server):
    return tooling_support.tiny_server(start_server)


SMOKE = ["--measurement-requests", "4", "--max-trials", "6", "--stability", "1000", "--prompts", "4",
         "--steps", "2", "--controlnet", "canny", "--lora", "style:0.8", "--lora", "detail:0.5"]


@integration
def test_perf_concurrency_sweep_over_http(server, analyzer, tmp_path):
    proc = _katz("perf", "--url", server.http_url, "--concurrency", "1:2:1", "--out-dir", str(tmp_path), *SMOKE)
    assert proc.returncode == 0, proc.stderr[-3000:] + tooling_support.diagnose(server)
    print(proc.stdout)
    points = perf.parse_report(tmp_path / "perf.csv")
    assert [p.load for p in points] == [1, 2]
    assert all(p.throughput > 0 and 0 < p.p50_ms <= p.p90_ms <= p.p99_ms for p in points)
    assert "p99 ms" in proc.stdout and "concurrency" in proc.stdout
    log = (tmp_path / "perf_analyzer.log").read_text()
    assert "Successful request count" in log and "katz_pipeline" in log  # the ensemble's models ran


@integration
def test_perf_request_rate_sweep_over_grpc(server, analyzer, tmp_path):
    proc = _katz("perf", "--url", server.grpc_url, "--protocol", "grpc", "--request-rate", "4:8:4",
                 "--out-dir", str(tmp_path), *SMOKE)
    assert proc.returncode == 0, proc.stderr[-3000:] + tooling_support.diagnose(server)
    print(proc.stdout)
    points = perf.parse_report(tmp_path / "perf.csv")
    assert [p.load for p in points] == [4, 8] and all(p.throughput > 0 for p in points)
    assert "req/s" in proc.stdout
    assert json.loads((tmp_path / "input_data.json").read_text())["data"][0]["controlnets"]["content"] == ["canny"]

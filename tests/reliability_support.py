"""Helpers for the reliability, fuzzing and soak tests (not a test module).

Raw requests with arbitrary tensors, outcomes normalized over HTTP and gRPC,
the server's process tree (memory, model instance processes) and read-only folders.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The shared "hardened" server (conftest.hardened_server): small admission and request limits.
MAX_QUEUE = 4
MAX_SIZE = 128
MIN_SIZE = 32  # not a flag: tiny-sdxl's own minimum (katz.models.folder.min_image_size)
MAX_STEPS = 4
MAX_PROMPT_BYTES = 1024
MAX_IMAGE_BYTES = 256 << 10
MAX_IMAGE_PIXELS = 1024 * 1024
HARDENED_ARGS = [
    "--max-queue-size", str(MAX_QUEUE), "--queue-timeout", "30", "--pipeline-instances", "2",
    "--max-size", str(MAX_SIZE), "--max-steps", str(MAX_STEPS), "--default-steps", "2",
    "--max-prompt-bytes", str(MAX_PROMPT_BYTES), "--max-image-bytes", str(MAX_IMAGE_BYTES),
    "--max-image-pixels", str(MAX_IMAGE_PIXELS),
]


# ------------------------------------------------------------------ requests
@dataclass
class Outcome:
    kind: str  # "ok", "invalid" (400 / INVALID_ARGUMENT), "unavailable" (503 / UNAVAILABLE), or the raw status
    message: str = ""
    result: object = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


def classify(status) -> str:
    s = str(status or "")
    if s == "400" or "INVALID_ARGUMENT" in s:
        return "invalid"
    if s == "503" or "UNAVAILABLE" in s:
        return "unavailable"
    return s or "no status"


def tensors_to_inputs(mod, tensors: dict[str, np.ndarray]):
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, arr in tensors.items():
        dtype = "BYTES" if arr.dtype == np.object_ else np_to_triton_dtype(arr.dtype)
        inp = mod.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def raw_infer(server, tensors: dict[str, np.ndarray], protocol: str = "http", timeout: float = 120.0) -> Outcome:
    """Send arbitrary tensors to the ``katz`` ensemble; never raises for server-side errors."""
    from tritonclient.utils import InferenceServerException

    if protocol == "http":
        import tritonclient.http as mod

        client = mod.InferenceServerClient(server.http_url, connection_timeout=timeout, network_timeout=timeout)
        kwargs = {}
    else:
        import tritonclient.grpc as mod

        client = mod.InferenceServerClient(server.grpc_url)
        kwargs = {"client_timeout": timeout}
    start = time.monotonic()
    try:
        outputs = [mod.InferRequestedOutput(n) for n in ("image", "png", "seed", "lora_applied_step")]
        res = client.infer("katz", tensors_to_inputs(mod, tensors), outputs=outputs, **kwargs)
        return Outcome("ok", result=res, seconds=time.monotonic() - start)
    except InferenceServerException as exc:
        return Outcome(classify(exc.status()), exc.message() or "", seconds=time.monotonic() - start)
    finally:
        client.close()


def generation_tensors(**fields) -> dict[str, np.ndarray]:
    from katz.client import Generation

    fields.setdefault("prompt", "a photo of a cat")
    fields.setdefault("seed", 7)
    fields.setdefault("steps", 2)
    return Generation(**fields).tensors()


def server_ready(server) -> bool:
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http_url, connection_timeout=10, network_timeout=10)
    try:
        return client.is_server_ready()
    except Exception:
        return False
    finally:
        client.close()


def http_json(server, path: str, body: dict | None = None, headers: dict | None = None, timeout: float = 30.0):
    """(status, parsed body) of an HTTP call to the server's REST API."""
    req = urllib.request.Request(
        f"http://{server.http_url}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers=headers or {},
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def inference_count(server, model: str) -> int:
    status, stats = http_json(server, f"/v2/models/{model}/stats")
    assert status == 200, stats
    return sum(int(m.get("inference_count", 0)) for m in stats["model_stats"])


# ------------------------------------------------------------- processes
def _stat(pid: int) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[0]
    except (OSError, IndexError, ValueError):
        return None


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st and st[0] == pid and st[1] not in ("Z", "X"):
                out.append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    todo, out = [pid], []
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def triton_pid(server) -> int:
    """The ``tritonserver`` process started by the server's ``katz serve``."""
    for pid in children(server.proc.pid):
        try:
            if Path(f"/proc/{pid}/exe").resolve().name == "tritonserver":
                return pid
        except OSError:
            continue
    raise RuntimeError("no tritonserver child of katz serve")


def stubs(server, model: str | None = None):
    from katz.deploy.watchdog import stub_processes

    return [s for s in stub_processes(triton_pid(server)) if model is None or s.model == model]


def tree_memory_bytes(server) -> int:
    """Proportional set size (PSS) of ``katz serve``, ``tritonserver`` and every model process."""
    total = 0
    for pid in descendants(server.proc.pid):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


# ---------------------------------------------------------- read-only paths
def make_read_only(path: Path) -> bool:
    """Make ``path`` (recursively) unwritable; as root also immutable (chattr +i), since root
    ignores permission bits. Returns True when writing into it now really fails."""
    for root, dirs, files in os.walk(path):
        for name in files:
            os.chmod(os.path.join(root, name), 0o444)
        os.chmod(root, 0o555)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-R", "+i", str(path)], capture_output=True, check=False)
    probe = path / ".write-probe"
    try:
        probe.write_text("x")
    except OSError:
        return True
    probe.unlink()
    return False


def undo_read_only(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-R", "-i", str(path)], capture_output=True, check=False)
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with its size and mtime (to prove nothing was written)."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
    return out

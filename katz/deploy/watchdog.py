"""Bring model instances back when their process dies.

Every instance of a Python-backend model is a ``triton_python_backend_stub``
process, a child of ``tritonserver``. Triton 2.51 does not restart a stub that
died (killed, out-of-memory killer, segfault in a native library): every later
request to that instance fails with ``Stub process '<instance>' is not
healthy.`` and the server still reports itself ready.

:class:`Watchdog` (started by ``katz serve``) watches the stubs of its server.
Once the server is ready it learns the live instances; when one disappears it
reloads that model through Triton's model-repository API (the server runs with
``--model-control-mode=explicit``) with the instance groups renamed, so Triton
builds fresh instances instead of reusing the dead one, then drops the old ones.
Requests that reached the dead instance in between fail (``UNAVAILABLE`` where
another model called it); the model's other instances keep serving.

The repository API is restricted to the header ``katz-admin`` with a token
only ``katz serve`` knows (:func:`katz.deploy.server.command`).
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

ADMIN_HEADER = "katz-admin"
STUB_NAME = "triton_python_backend_stub"


@dataclass(frozen=True)
class Stub:
    pid: int
    model: str
    instance: str


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), fields[0]
    except (OSError, IndexError, ValueError):
        return None


def stub_processes(server_pid: int) -> list[Stub]:
    """The live Python-backend stubs that are children of ``server_pid`` (a ``tritonserver``)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        info = _ppid_and_state(pid)
        if info is None or info[0] != server_pid or info[1] in ("Z", "X"):
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0")]
        except OSError:
            continue
        if not argv or not argv[0].endswith(STUB_NAME) or len(argv) < 9:
            continue
        # argv: stub, <repo>/<model>/<version>/model.py, shm region, sizes, parent pid, ..., instance name, ...
        parts = argv[1].split("/")
        model = parts[-3] if len(parts) >= 3 else ""
        instance = argv[8]
        if model and instance != model:  # the model-level stub (loading only) carries the model's name
            out.append(Stub(pid, model, instance))
    return out


class Watchdog(threading.Thread):
    def __init__(self, server_pid: int, http_url: str, admin_token: str, interval_s: float = 0.5,
                 ready_timeout_s: float = 3600.0):
        super().__init__(name="katz-watchdog", daemon=True)
        self.server_pid = server_pid
        self.base = f"http://{http_url}"
        self.admin_token = admin_token
        self.interval_s = interval_s
        self.ready_timeout_s = ready_timeout_s
        self.known: dict[str, Stub] = {}  # instance name -> last live stub
        self.generation = 0
        self.restarts = 0
        self._stop = threading.Event()
        self._retry_after: dict[str, float] = {}

    # ----------------------------------------------------------------- control
    def stop(self) -> None:
        self._stop.set()

    def log(self, message: str) -> None:
        print(f"katz: watchdog: {message}", file=sys.stderr, flush=True)

    # -------------------------------------------------------------------- HTTP
    def _request(self, path: str, body: dict | None = None, timeout: float = 10.0):
        headers = {ADMIN_HEADER: self.admin_token}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, headers=headers,
                                     method="POST" if body is not None else "GET")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def _ready(self) -> bool:
        try:
            self._request("/v2/health/ready", timeout=2.0)
            return True
        except (urllib.error.URLError, OSError, ValueError):
            return False

    # ------------------------------------------------------------------ checks
    def run(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._stop.is_set() and not self._ready():
            if time.monotonic() > deadline or _ppid_and_state(self.server_pid) is None:
                return
            self._stop.wait(1.0)
        while not self._stop.is_set():
            try:
                self.check()
            except Exception as exc:  # never take the server down with the watchdog
                self.log(f"check failed: {type(exc).__name__}: {exc}")
            self._stop.wait(self.interval_s)

    def check(self) -> list[str]:
        """One scan: learn live instances, reload the models that lost one; returns those models."""
        state = _ppid_and_state(self.server_pid)
        if state is None or state[1] in ("Z", "X"):
            self._stop.set()
            return []
        live = {s.instance: s for s in stub_processes(self.server_pid)}
        dead: dict[str, list[Stub]] = {}
        for name, stub in self.known.items():
            if name not in live:
                dead.setdefault(stub.model, []).append(stub)
        self.known.update(live)
        restarted = []
        for model, stubs in dead.items():
            if self._stop.is_set():
                break
            if time.monotonic() < self._retry_after.get(model, 0.0):
                continue
            lost = ", ".join(f"{s.instance} (pid {s.pid})" for s in stubs)
            self.log(f"model {model!r}: instance process gone: {lost}; reloading the model")
            if self.restart(model):
                restarted.append(model)
        return restarted

    def restart(self, model: str) -> bool:
        """Reload ``model`` with renamed instance groups (fresh instances); True on success."""
        start = time.monotonic()
        try:
            config = self._request(f"/v2/models/{model}/config")
            self.generation += 1
            for group in config.get("instance_group", []):
                base = re.sub(r"_r\d+$", "", group.get("name") or model)
                group["name"] = f"{base}_r{self.generation}"
            self._request(f"/v2/repository/models/{model}/load",
                          {"parameters": {"config": json.dumps(config)}}, timeout=3600.0)
        except Exception as exc:
            self._retry_after[model] = time.monotonic() + 5.0
            self.log(f"model {model!r}: reload failed ({type(exc).__name__}: {exc}); retrying in 5 s")
            return False
        for name in [n for n, s in self.known.items() if s.model == model]:
            del self.known[name]
        self.restarts += 1
        self.log(f"model {model!r}: reloaded with fresh instances in {time.monotonic() - start:.1f} s")
        return True

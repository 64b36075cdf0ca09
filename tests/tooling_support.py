"""Shared by test_perf, test_server, test_stream and test_traces: one tiny-sdxl server for
these modules (a server start costs ~30 s or more on 2 cores), and a TCP relay that can
make a server "go away" without stopping it."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest

_SERVERS: dict = {}


def tiny_server(start_server):
    """The shared tiny-sdxl server (default options: one katz_stream instance)."""
    server = _SERVERS.get("tiny")
    if server is None or server.proc.poll() is not None:
        server = _SERVERS["tiny"] = start_server("tiny-sdxl")
    return server


def diagnose(server, n: int = 2500) -> str:
    """For assertion messages: whether the server still runs, and its log's tail."""
    state = "running" if server.proc.poll() is None else f"exited with {server.proc.returncode}"
    try:
        tail = server.log_path.read_text()[-n:]
    except OSError:
        tail = ""
    return f"\n--- server {state}; log tail:\n{tail}"


def tool(name: str) -> str | None:
    """An executable from this venv's bin/ (where the [test] extra installs it) or PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.is_file() else shutil.which(name)


def require(found, what: str, install: str):
    """Skip when a tool is missing, except under CI (CI=true), where that is a failure."""
    if found:
        return found
    message = f"{what} not found: {install}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class Relay:
    """A loopback TCP relay to ``target`` (HOST:PORT); ``close()`` drops the listener and
    every connection at once, as a server that went away would."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.url = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.closed = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.closed.is_set():
                    client.close()
                    upstream.close()
                    return
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        with self.lock:
            self.closed.set()
            for stop in (lambda: self.listener.shutdown(socket.SHUT_RDWR), self.listener.close):
                try:  # shutdown wakes the blocked accept()
                    stop()
                except OSError:
                    pass
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass

"""Soak (issue 8): open-loop load below, far above, and again below capacity on the tiny preset (CPU).

Requests are sent on a fixed schedule whatever the answers (open loop, gRPC ``async_infer``):
``KATZ_SOAK_REQUESTS`` in all (default 1,000, the CI run; e.g. 20000 for a long run). Checked:
every request gets an image or UNAVAILABLE (admission control) and none is lost; the overload is
shed with UNAVAILABLE rather than queued without bound; the server's memory (PSS of ``katz serve``,
``tritonserver`` and every model process) after the run is within 10% of after warm-up; latency
after the overload is back near what it was before. The figures are printed (and written as JSON
to ``$KATZ_SOAK_REPORT`` when set).
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest

from conftest import control_png
from reliability_support import classify, generation_tensors, server_ready, tensors_to_inputs, tree_memory_bytes

pytestmark = pytest.mark.integration

REQUESTS = int(os.environ.get("KATZ_SOAK_REQUESTS", "1000"))
PHASES = (("below", 0.6, 0.30), ("overload", 3.0, 0.45), ("after", 0.6, 0.25))  # name, x capacity, share


def _mix() -> list[dict]:
    """The request mix: plain, LoRA, ControlNet, both (steps=1, 64x64)."""
    return [
        generation_tensors(seed=1, steps=1),
        generation_tensors(seed=2, steps=1),
        generation_tensors(seed=3, steps=1, loras=["style"], lora_k=0),
        generation_tensors(seed=4, steps=1, controlnets=["canny"], control_images=[control_png(1)]),
        generation_tensors(seed=5, steps=1),
        generation_tensors(seed=6, steps=1, loras=["detail"], lora_k=0),
        generation_tensors(seed=7, steps=1, controlnets=["canny"], control_images=[control_png(2)]),
        generation_tensors(seed=8, steps=1, loras=["style"], lora_k=0, controlnets=["canny"],
                           control_images=[control_png(1)]),
    ]


class OpenLoop:
    def __init__(self, server):
        import tritonclient.grpc as grpc

        self.grpc = grpc
        self.client = grpc.InferenceServerClient(server.grpc_url)
        self.inputs = [tensors_to_inputs(grpc, t) for t in _mix()]
        self.outputs = [grpc.InferRequestedOutput("image")]
        self.lock = threading.Lock()
        self.records: list[dict] = []
        self.done = threading.Condition(self.lock)
        self.received = 0

    def send(self, i: int, phase: str) -> None:
        rec = {"phase": phase, "sent": time.monotonic(), "kind": None}
        with self.lock:
            self.records.append(rec)

        def callback(result=None, error=None):
            end = time.monotonic()
            with self.lock:
                rec["seconds"] = end - rec["sent"]
                if error is None:
                    rec["kind"] = "ok" if result.as_numpy("image").shape == (64, 64, 3) else "bad image"
                else:
                    rec["kind"], rec["message"] = classify(error.status()), error.message()
                self.received += 1
                self.done.notify_all()

        self.client.async_infer("katz", self.inputs[i % len(self.inputs)], callback=callback,
                                outputs=self.outputs)

    def run_phase(self, name: str, rate: float, count: int, start_index: int) -> float:
        start = time.monotonic()
        for k in range(count):
            delay = start + k / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.send(start_index + k, name)
        return time.monotonic() - start

    def drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.received < len(self.records) and time.monotonic() < deadline:
                self.done.wait(deadline - time.monotonic())


def _closed_loop_capacity(loop: OpenLoop, n: int, concurrency: int) -> float:
    """Requests per second with ``concurrency`` requests always in flight (the server's throughput)."""
    sem = threading.Semaphore(concurrency)
    finished = threading.Event()
    count = {"done": 0}
    errors = []

    def callback(result=None, error=None):
        if error is not None:
            errors.append(error)
        count["done"] += 1
        sem.release()
        if count["done"] == n:
            finished.set()

    start = time.monotonic()
    for i in range(n):
        sem.acquire()
        loop.client.async_infer("katz", loop.inputs[i % len(loop.inputs)], callback=callback, outputs=loop.outputs)
    assert finished.wait(300), "closed-loop requests did not finish"
    assert not errors, errors[:3]
    return n / (time.monotonic() - start)


def _pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def test_soak_open_loop_below_and_above_capacity(hardened_server, capsys):
    server = hardened_server
    loop = OpenLoop(server)

    # warm-up: every request kind, sequentially and concurrently, so caches and pools are filled
    _closed_loop_capacity(loop, 3 * len(loop.inputs), 1)
    _closed_loop_capacity(loop, 3 * len(loop.inputs), 4)
    capacity = _closed_loop_capacity(loop, 48, 2)
    time.sleep(1.0)
    memory_warm = tree_memory_bytes(server)

    started = time.monotonic()
    index = 0
    phase_seconds = {}
    for name, factor, share in PHASES:
        count = max(1, round(REQUESTS * share))
        phase_seconds[name] = loop.run_phase(name, capacity * factor, count, index)
        index += count
    loop.drain(timeout=180)
    wall = time.monotonic() - started
    time.sleep(2.0)
    memory_after = tree_memory_bytes(server)

    recs = loop.records
    lost = sum(r["kind"] is None for r in recs)
    figures = {"requests": len(recs), "capacity_rps": round(capacity, 2), "wall_s": round(wall, 1), "lost": lost,
               "memory_after_warmup_mib": round(memory_warm / 2**20, 1),
               "memory_after_run_mib": round(memory_after / 2**20, 1),
               "memory_change_pct": round(100 * (memory_after - memory_warm) / memory_warm, 2), "phases": {}}
    for name, factor, _ in PHASES:
        mine = [r for r in recs if r["phase"] == name]
        ok = [r["seconds"] for r in mine if r["kind"] == "ok"]
        figures["phases"][name] = {
            "offered_rps": round(capacity * factor, 2), "sent": len(mine), "ok": len(ok),
            "unavailable": sum(r["kind"] == "unavailable" for r in mine),
            "other_errors": sum(r["kind"] not in ("ok", "unavailable", None) for r in mine),
            "ok_rps": round(len(ok) / max(phase_seconds[name], 1e-9), 2),
            "p50_ms": round(1000 * _pct(ok, 50), 1), "p95_ms": round(1000 * _pct(ok, 95), 1),
            "p99_ms": round(1000 * _pct(ok, 99), 1), "max_ms": round(1000 * max(ok, default=float("nan")), 1),
        }
    with capsys.disabled():
        print(f"\nsoak: {json.dumps(figures, indent=1)}")
    if os.environ.get("KATZ_SOAK_REPORT"):
        with open(os.environ["KATZ_SOAK_REPORT"], "w") as f:
            json.dump(figures, f, indent=1)

    others = [(r["kind"], r.get("message")) for r in recs if r["kind"] not in ("ok", "unavailable", None)]
    assert lost == 0, f"{lost} requests got no answer"
    assert not others, others[:5]
    unavailable = [r.get("message", "") for r in recs if r["kind"] == "unavailable"]
    assert all("Exceeds maximum queue size" in m or "timeout" in m.lower() for m in unavailable), unavailable[:3]
    phases = figures["phases"]
    assert phases["overload"]["unavailable"] > 0, "overload was queued, not shed"
    assert abs(figures["memory_change_pct"]) <= 10.0, figures
    before, after = phases["below"]["p50_ms"], phases["after"]["p50_ms"]
    assert after <= max(2.0 * before, before + 250.0), f"latency did not recover: p50 {before} -> {after} ms"
    assert phases["after"]["ok"] >= 0.95 * phases["after"]["sent"], phases["after"]
    assert server_ready(server)

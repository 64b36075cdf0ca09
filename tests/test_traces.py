"""`katz trace synth | replay | report`: the traffic model, malformed rows, the report and its
plots, a round trip against a live tiny-sdxl server, and a server that goes away mid-replay."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from katz.tools.traces import report, synth
from katz.tools.traces.trace import TraceError, read_trace

import tooling_support

integration = pytest.mark.integration


def _katz(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "katz.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def _synth_args(**kw) -> Namespace:
    defaults = dict(duration=60.0, requests=None, rate=1.0, arrivals="poisson", cv=3.0, num_loras=100,
                    lora_prefix="lora-", lora_names=None, zipf=1.1, loras_per_request="0:0.2,1:0.5,2:0.2,3:0.1",
                    lora_scale="0.5:1.0", controlnets="canny", controlnet_share=0.4, max_controlnets=1,
                    resolutions="1024x1024:0.6,832x1216:0.2,1216x832:0.2", steps="30:0.8,20:0.1,50:0.1", seed=0)
    defaults.update(kw)
    return Namespace(**defaults)


def test_poisson_and_gamma_arrivals():
    rows = synth.synthesize(_synth_args(requests=4000, rate=5.0))
    gaps = np.diff([r.arrival_s for r in rows])
    assert rows[0].arrival_s == 0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.2, rel=0.06)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.08)  # exponential: CV 1
    bursty = np.diff([r.arrival_s for r in synth.synthesize(_synth_args(requests=4000, rate=5.0,
                                                                        arrivals="gamma", cv=3.0))])
    assert bursty.mean() == pytest.approx(0.2, rel=0.2)
    assert bursty.std() / bursty.mean() == pytest.approx(3.0, rel=0.2)
    # --exact-rate: a short bursty trace offers exactly --rate (span (n - 1) / rate), its bursts
    # kept: the same draw scaled, the requests themselves unchanged
    kw = dict(requests=12, rate=0.05, arrivals="gamma", cv=2.5, seed=50)
    drawn, exact = synth.synthesize(_synth_args(**kw)), synth.synthesize(_synth_args(exact_rate=True, **kw))
    assert abs(drawn[-1].arrival_s - 11 / 0.05) > 100  # this draw spans 9 s, not 220 s
    assert exact[-1].arrival_s == pytest.approx(11 / 0.05)
    scale = exact[-1].arrival_s / drawn[-1].arrival_s
    assert [r.arrival_s for r in exact] == pytest.approx([r.arrival_s * scale for r in drawn])
    assert [(r.loras, r.controlnets, r.width) for r in exact] == [(r.loras, r.controlnets, r.width) for r in drawn]


def test_zipf_loras_controlnet_share_and_determinism(tmp_path):
    args = _synth_args(requests=3000, num_loras=20, controlnets="canny,depth", max_controlnets=2)
    rows = synth.synthesize(args)
    counts = {}
    for r in rows:
        names = [n for n, _ in r.loras]
        assert len(names) == len(set(names)) <= 3
        assert all(0.5 <= s <= 1.0 for _, s in r.loras)
        for n in names:
            counts[n] = counts.get(n, 0) + 1
    ranked = [counts.get(f"lora-{i:03d}", 0) for i in range(20)]
    assert ranked[0] > ranked[1] > ranked[4] > ranked[19]  # Zipf: popularity falls with rank
    share = sum(1 for r in rows if r.controlnets) / len(rows)
    assert share == pytest.approx(0.4, abs=0.04)
    assert any(len(r.controlnets) == 2 for r in rows)
    per = np.bincount([len(r.loras) for r in rows], minlength=4) / len(rows)
    assert per == pytest.approx([0.2, 0.5, 0.2, 0.1], abs=0.04)
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    for path in (a, b):
        proc = _katz("trace", "synth", "--out", str(path), "--requests", "50", "--seed", "3")
        assert proc.returncode == 0, proc.stderr
    assert a.read_text() == b.read_text()
    assert a.read_text().splitlines()[0] == "id,arrival_s,width,height,steps,controlnets,loras"


BAD_TRACE = """id,arrival_s,width,height,steps,controlnets,loras
0,0.0,64,64,2,,style:0.8
1,abc,64,64,2,,
2,0.2,64,64,two,,
3,0.3,64,64,2,canny:x,
4,0.4,64,64,2,,style:0.5;style:0.6
5,-1,64,64,2,,
6,0.6,64,64,2,,,extra
0,0.7,64,64,2,,
7,0.8,64,64,2,canny,detail
"""


def test_malformed_rows_are_reported_with_line_numbers(tmp_path):
    trace = tmp_path / "bad.csv"
    trace.write_text(BAD_TRACE)
    rows, errors = read_trace(trace)
    assert [r.id for r in rows] == [0, 7]
    assert rows[1].controlnets == [("canny", 1.0)] and rows[1].loras == [("detail", 1.0)]
    lines = dict(errors)
    assert sorted(lines) == [3, 4, 5, 6, 7, 8, 9]
    assert "arrival_s" in lines[3] and "steps" in lines[4] and "controlnets" in lines[5]
    assert "repeats" in lines[6] and "arrival_s" in lines[7] and "fields" in lines[8] and "id" in lines[9]
    with pytest.raises(TraceError, match="bad.csv:4: steps"):
        read_trace(trace, strict=True)
    # the CLI: --strict rejects before sending anything (nothing listens on port 1)
    proc = _katz("trace", "replay", str(trace), "--url", "127.0.0.1:1", "--strict", timeout=60)
    assert proc.returncode == 2 and "7 malformed row(s)" in proc.stderr and "bad.csv:5: controlnets" in proc.stderr
    header = tmp_path / "header.csv"
    header.write_text("id,arrival_s,steps\n0,0,2\n")
    proc = _katz("trace", "replay", str(header), "--url", "127.0.0.1:1", timeout=60)
    assert proc.returncode == 2 and "header lacks column(s) width, height" in proc.stderr


def _write_log(path: Path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "sent_s", "done_s", "ok", "error"])
        w.writeheader()
        for i, (sent, done, ok) in enumerate(rows):
            w.writerow({"id": i, "sent_s": sent, "done_s": done, "ok": int(ok), "error": "" if ok else "UNAVAILABLE"})


def test_report_numbers_and_plots(tmp_path):
    a, b = tmp_path / "baseline.csv", tmp_path / "katz.csv"
    _write_log(a, [(i, i + 1.0 + i % 3, True) for i in range(9)] + [(9, 9.5, False)])  # latencies 1, 2, 3, ...
    _write_log(b, [(i, i + 1.0, True) for i in range(10)])
    runs = [report.load_log(a, "baseline"), report.load_log(b, "katz")]
    s = report.summarize(runs[0], slo=2.0)
    assert (s["requests"], s["ok"], s["failed"]) == (10, 9, 1)
    assert s["p50_s"] == pytest.approx(2.0) and s["slo_attainment"] == pytest.approx(0.6)
    assert s["throughput_rps"] == pytest.approx(9 / (11.0 - 0.0))
    assert report.summarize(runs[1], slo=2.0)["slo_attainment"] == 1.0
    assert report.summarize(runs[1], slo=2.0)["max_in_flight"] == 1
    # p90 and goodput: answered OK within the SLO per second of the span (first send 0 to last answer 11)
    assert s["p90_s"] == pytest.approx(3.0)
    assert s["span_s"] == pytest.approx(11.0) and s["goodput_rps"] == pytest.approx(6 / 11.0)
    several = report.summarize(runs[0], slo=[2.0, 3.0])
    assert several["slos"]["2"] == {"attainment": pytest.approx(0.6), "goodput_rps": pytest.approx(6 / 11.0)}
    assert several["slos"]["3"] == {"attainment": pytest.approx(0.9), "goodput_rps": pytest.approx(9 / 11.0)}
    assert several["slo_attainment"] == pytest.approx(0.6)  # the first SLO's
    # a failure answered last (e.g. a timeout) lengthens the span: goodput counts the time it held
    late = tmp_path / "late.csv"
    _write_log(late, [(0, 1.0, True), (1, 21.0, False)])
    t = report.summarize(report.load_log(late), slo=2.0)
    assert t["span_s"] == pytest.approx(21.0) and t["goodput_rps"] == pytest.approx(1 / 21.0)
    assert t["throughput_rps"] == pytest.approx(1 / 21.0)
    out = tmp_path / "plots"
    proc = _katz("trace", "report", str(a), str(b), "--labels", "baseline,katz", "--slo", "2,3", "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "baseline" in proc.stdout and "katz" in proc.stdout and "60.0%" in proc.stdout
    lines = {line[:26].strip(): line[26:].split() for line in proc.stdout.splitlines()}
    assert lines["SLO attainment (<= 2s)"] == ["60.0%", "100.0%"]
    assert lines["SLO attainment (<= 3s)"] == ["90.0%", "100.0%"]
    assert lines["goodput (req/s) (<= 3s)"] == [f"{9 / 11:.3f}", f"{10 / 10:.3f}"]
    assert lines["p90 latency (s)"] == ["3.000", "1.000"]
    assert "1x UNAVAILABLE" in proc.stdout
    assert _katz("trace", "report", str(a), "--slo", "0", "--no-plots").returncode == 2  # SLOs are > 0 s
    for name in ("latency_cdf.png", "latency_over_time.png", "queue_length.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


# ------------------------------------------------------------------ integration
@pytest.fixture(scope="module")
def server(start_server):
    return tooling_support.tiny_server(start_server)


def _tiny_trace(path: Path, requests: int, rate: float, seed: int = 1):
    proc = _katz("trace", "synth", "--out", str(path), "--requests", str(requests), "--rate", str(rate),
                 "--arrivals", "gamma", "--cv", "2", "--lora-names", "style,detail", "--controlnets", "canny",
                 "--controlnet-share", "0.5", "--resolutions", "64x64:0.8,96x96:0.2", "--steps", "2:0.5,3:0.5",
                 "--seed", str(seed))
    assert proc.returncode == 0, proc.stderr


@integration
def test_synth_replay_report_round_trip(server, tmp_path):
    trace = tmp_path / "trace.csv"
    _tiny_trace(trace, 16, 4.0)
    rows, _ = read_trace(trace)
    assert any(r.loras for r in rows) and any(r.controlnets for r in rows)
    # a malformed row is reported and skipped, the rest replayed
    with open(trace, "a") as f:
        f.write("99,later,64,64,2,,\n")
    logs = []
    for label, speed in (("baseline", "1"), ("fast", "2")):
        log = tmp_path / f"{label}.csv"
        proc = _katz("trace", "replay", str(trace), "--url", server.grpc_url, "--log", str(log),
                     "--label", label, "--speed", speed, "--slo", "5", "--timeout", "60")
        assert proc.returncode == 0, proc.stderr[-3000:] + tooling_support.diagnose(server)
        assert "trace.csv:18: arrival_s: 'later' is not a number (row skipped)" in proc.stderr
        assert "p99 latency" in proc.stdout and "SLO attainment" in proc.stdout
        logged = list(csv.DictReader(open(log)))
        assert len(logged) == 16 and all(r["ok"] == "1" for r in logged), [r["error"] for r in logged]
        assert {int(r["id"]) for r in logged} == set(range(16))
        assert all(float(r["latency_s"]) > 0 for r in logged)
        # open loop: each request went out at its arrival time, not after the previous one finished
        assert all(abs(float(r["sent_s"]) - float(r["arrival_s"]) / float(speed)) < 2.0 for r in logged)
        logs.append(log)
    out = tmp_path / "report"
    proc = _katz("trace", "report", *map(str, logs), "--slo", "5", "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout)
    head = proc.stdout.splitlines()[0]
    assert "baseline" in head and "fast" in head and "100.0%" in proc.stdout
    for name in ("latency_cdf.png", "latency_over_time.png", "queue_length.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")


@integration
def test_replay_against_a_server_that_goes_away_finishes_with_a_report(server, tmp_path):
    trace = tmp_path / "trace.csv"
    _tiny_trace(trace, 40, 8.0, seed=2)  # ~5 s of traffic
    relay = tooling_support.Relay(server.grpc_url)
    log = tmp_path / "log.csv"
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "katz.cli", "trace", "replay", str(trace), "--url", relay.url,
                             "--log", str(log), "--timeout", "20", "--max-consecutive-failures", "5", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the "server" vanishes once a few requests were answered
        while time.monotonic() - start < 60 and proc.poll() is None:
            if log.exists() and sum(r["ok"] == "1" for r in csv.DictReader(open(log))) >= 2:
                break
            time.sleep(0.05)
        relay.close()
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        relay.close()
        if proc.poll() is None:
            proc.kill()
    took = time.monotonic() - start
    # some requests succeeded before it went away
    assert proc.returncode == 0, stderr[-3000:] + tooling_support.diagnose(server)
    logged = list(csv.DictReader(open(log)))
    assert len(logged) == 40
    ok = [r for r in logged if r["ok"] == "1"]
    failed = [r for r in logged if r["ok"] == "0"]
    assert ok and failed and all(r["error"] for r in failed)
    assert "failed" in stdout and "failures:" in stdout
    assert took < 60, f"replay took {took:.0f}s"
    assert server.proc.poll() is None  # only the relay went away

"""katz.serving.profiling: the per-model cProfile a server keeps under KATZ_PROFILE_DIR."""

from __future__ import annotations

import pstats

from katz.serving.profiling import ExecuteProfiler, top


def _work(n: int) -> int:
    return sum(i * i for i in range(n))


def test_profiles_accumulate_and_are_saved(tmp_path, monkeypatch):
    monkeypatch.delenv("KATZ_PROFILE_DIR", raising=False)
    assert ExecuteProfiler.from_env("unet") is None  # off unless asked for
    monkeypatch.setenv("KATZ_PROFILE_DIR", str(tmp_path / "prof"))
    prof = ExecuteProfiler.from_env("unet")
    prof.every_s = 3600.0  # saved after the first call only, then on save()
    assert prof.run(_work, 1000) == _work(1000)
    assert prof.path.parent == tmp_path / "prof" and prof.path.name.startswith("unet.")
    first = pstats.Stats(str(prof.path)).stats
    calls = {k[2]: v[1] for k, v in first.items()}  # function name -> calls
    assert calls["_work"] == 1
    prof.run(_work, 10)
    prof.run(_work, 10)
    assert {k[2]: v[1] for k, v in pstats.Stats(str(prof.path)).stats.items()}["_work"] == 1  # not yet saved
    prof.save()
    assert {k[2]: v[1] for k, v in pstats.Stats(str(prof.path)).stats.items()}["_work"] == 3
    assert "_work" in top([prof.path], limit=5)
    assert not list((tmp_path / "prof").glob("*.tmp"))


def test_first_call_is_saved_on_a_machine_up_for_less_than_every_s(tmp_path, monkeypatch):
    """``time.monotonic()`` counts from boot: a fresh CI machine is up for less than ``every_s``."""
    import types

    import katz.serving.profiling

    monkeypatch.setattr(katz.serving.profiling, "time", types.SimpleNamespace(monotonic=lambda: 5.0))
    prof = ExecuteProfiler(tmp_path / "unet.1.prof", every_s=3600.0)
    prof.run(_work, 10)
    assert prof.path.exists()


def test_gpu_gaps_name_the_host_ops_across_each_idle_gap():
    from katz.serving.profiling import format_gaps, gpu_gaps

    kernels = [(0, 50), (40, 100), (400, 500), (520, 600), (1600, 1700)]  # µs; overlapping ones merge
    host = [(90, 420, "cudaStreamSynchronize", "denoise.py(150): denoise"), (0, 2000, "execute", ""),
            (700, 1500, "aten::randn", "")]
    gaps = gpu_gaps(kernels, host, min_us=100)
    assert [(g["start_us"], g["us"]) for g in gaps] == [(100, 300), (600, 1000)]  # 500 -> 520 is too short
    assert gaps[0]["host"][0] == ("cudaStreamSynchronize", "denoise.py(150): denoise", 300)
    assert [o[0] for o in gaps[1]["host"]] == ["execute", "aten::randn"]
    text = format_gaps(gaps, kernels)
    assert text.startswith("GPU span 1.7 ms, 2 idle gaps, 1.3 ms idle in all")
    assert text.index("1.000 ms idle at +0.6 ms") < text.index("0.300 ms idle at +0.1 ms")
    assert gpu_gaps([], host) == [] and format_gaps([], []) == "no GPU kernels in this call\n"


def test_kernel_totals_rank_kernels_by_their_gpu_time():
    from katz.serving.profiling import format_kernels

    kernels = [(0, 50), (60, 100), (100, 400), (500, 510)]
    text = format_kernels(kernels, ["gemm", "add", "gemm", "add"])
    lines = text.splitlines()
    assert lines[0] == "GPU busy 0.4 ms in 4 kernels; by kernel (ms, count):"
    assert lines[1].split() == ["0.35", "2", "gemm"] and lines[2].split() == ["0.05", "2", "add"]
    assert format_kernels([], []) == ""


def test_execute_trace_records_only_the_chosen_calls(tmp_path, monkeypatch):
    from katz.serving.profiling import ExecuteTrace

    monkeypatch.delenv("KATZ_TRACE_DIR", raising=False)
    assert ExecuteTrace.from_env("unet") is None
    monkeypatch.setenv("KATZ_TRACE_DIR", str(tmp_path))
    monkeypatch.setenv("KATZ_TRACE_AT", "2")
    trace = ExecuteTrace.from_env("unet")
    assert [trace.run(_work, 100) for _ in range(3)] == [_work(100)] * 3
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(".call2." in f for f in files), files
    assert any(f.endswith(".json.gz") for f in files) and any(f.endswith(".gaps.txt") for f in files)


def test_launch_summary_splits_graph_replays_from_single_launches():
    from katz.serving.profiling import launch_summary

    host = {"pid": 1, "tid": 1}
    trace = {"traceEvents": [
        {"cat": "python_function", "name": "/x/katz/diffusion/denoise.py(10): step", "ts": 0, "dur": 100, **host},
        {"cat": "cpu_op", "name": "aten::mul", "ts": 5, "dur": 10, **host},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 6, "dur": 2, "args": {"correlation": 1}, **host},
        {"cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 20, "dur": 5, "args": {"correlation": 2}, **host},
        {"cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 200, "dur": 5, "args": {"correlation": 3}, **host},
        {"cat": "kernel", "name": "mul", "pid": 0, "tid": 7, "ts": 10, "dur": 30, "args": {"correlation": 1}},
        {"cat": "kernel", "name": "gemm", "pid": 0, "tid": 7, "ts": 40, "dur": 500, "args": {"correlation": 2}},
        {"cat": "kernel", "name": "gelu", "pid": 0, "tid": 7, "ts": 540, "dur": 500, "args": {"correlation": 2}},
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "pid": 0, "tid": 7, "ts": 1100, "dur": 20,
         "args": {"correlation": 3}},
    ]}
    lines = launch_summary(trace).splitlines()
    assert lines[0].startswith("GPU time replayed from CUDA graphs 1.0 ms; launched one by one 0.1 ms")
    assert lines[1].split() == ["0.03", "1", "denoise.py(10):", "step", "aten::mul"]
    assert lines[2].split() == ["0.02", "1", "-", "-"]  # outside any Katz frame and op
    assert launch_summary({"traceEvents": []}) == ""


def test_a_failing_trace_never_fails_the_call(tmp_path, monkeypatch):
    from katz.serving.profiling import ExecuteTrace

    trace = ExecuteTrace(tmp_path, "m", {1})

    def broken(prof, call):
        raise UnicodeDecodeError("utf-8", b"\xae", 0, 1, "invalid start byte")

    monkeypatch.setattr(trace, "save", broken)
    assert trace.run(lambda x: x + 1, 1) == 2
    (gaps,) = tmp_path.glob("m.*.call1.gaps.txt")
    assert gaps.read_text().startswith("no trace: the profiler failed (UnicodeDecodeError")

"""katz.profiling: the per-model cProfile a server keeps under KATZ_PROFILE_DIR."""

from __future__ import annotations

import pstats

from katz.profiling import ExecuteProfiler, top


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

    import katz.profiling

    monkeypatch.setattr(katz.profiling, "time", types.SimpleNamespace(monotonic=lambda: 5.0))
    prof = ExecuteProfiler(tmp_path / "unet.1.prof", every_s=3600.0)
    prof.run(_work, 10)
    assert prof.path.exists()

"""Python profiles of the Katz models inside a running server (``KATZ_PROFILE_DIR``).

With ``KATZ_PROFILE_DIR=<folder>`` in the environment ``tritonserver`` starts in
(``KATZ_PROFILE_DIR=/tmp/prof katz serve ...``), every model instance profiles its
``execute()`` calls with :mod:`cProfile` and keeps the cumulative statistics in
``<folder>/<model>.<pid>.prof`` (:mod:`pstats` format), rewritten at most once a
``every_s`` seconds, after an ``execute()``. Up to Python 3.11 only the executing
thread is profiled (the denoising loop, a UNet step); from 3.12 cProfile sits on
``sys.monitoring`` and sees every thread of the process while an ``execute()`` runs
(the LoRA loader, ControlNet calls), with their time mixed into the callers'. cProfile
slows Python-heavy code down, so read shares of the time, not absolute figures.

    python -m katz.profiling /tmp/prof/katz_pipeline.*.prof   # the top functions by own time
"""

from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

ENV = "KATZ_PROFILE_DIR"


class ExecuteProfiler:
    """Accumulates a cProfile of the calls it wraps; saves it to ``path`` now and then."""

    def __init__(self, path: Path, every_s: float = 1.0):
        self.path, self.every_s = Path(path), every_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.profile = cProfile.Profile()
        self._saved: float | None = None  # monotonic time of the last save; None: never (save after the first call)

    @classmethod
    def from_env(cls, model_name: str) -> "ExecuteProfiler | None":
        folder = os.environ.get(ENV)
        return cls(Path(folder) / f"{model_name}.{os.getpid()}.prof") if folder else None

    def run(self, fn, *args):
        self.profile.enable()
        try:
            return fn(*args)
        finally:
            self.profile.disable()
            if self._saved is None or time.monotonic() - self._saved >= self.every_s:
                self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        self.profile.dump_stats(str(tmp))
        os.replace(tmp, self.path)  # readers never see half a file
        self._saved = time.monotonic()


def top(paths, limit: int = 20, sort: str = "tottime") -> str:
    """The ``limit`` functions with the most ``sort`` time in the profiles at ``paths``, as text."""
    import io

    out = io.StringIO()
    stats = pstats.Stats(*[str(p) for p in paths], stream=out)
    stats.strip_dirs().sort_stats(sort).print_stats(limit)
    return out.getvalue()


if __name__ == "__main__":
    print(top(sys.argv[1:]))

"""Running estimates of how long LoRA loads take, per tier and phase, for BAL's decisions.

A LoRA comes from one of four *tiers*: ``device`` (the manager's device cache: nothing to load),
``host`` (its host tier: a copy to the device), ``page_cache`` (the file's pages are in the OS page
cache: a memory copy, parsing, an upload) or ``disk`` (the same, reading from storage). For each
tier the manager observes the *phases* of every load (``read``, ``parse``, ``upload``) and the
load's critical path (``load``: from the loader starting it to the LoRA being usable on the device),
and each switch's ``merge`` (host work, under ``device``), each as ``(bytes of the files, seconds)``.

Each estimate is an exponentially weighted least-squares line ``seconds = a + b * bytes`` (a
fixed cost per load and a rate) that forgets old loads at ``DECAY`` per load, so it follows a
disk that slows down or a page cache that warms up within a few loads. Before any load it is a
prior; where the loads seen so far are all about one size, the line through them is not
determined and the estimate is the prior's rate through their mean (exact at the sizes seen).
"""

from __future__ import annotations

import math
import threading

TIERS = ("device", "host", "page_cache", "disk")
PHASES = ("read", "parse", "upload", "merge", "load")
DECAY = 0.7  # weight of the previous loads at each new one: ~90 % of the estimate is the last 6 loads

# Priors (bytes/s for the whole load; replaced by what the machine measures within a few loads):
# reading a file from a local NVMe disk and from the page cache, a host-to-device copy, parsing.
_PRIOR_BYTES_PER_S = {"device": math.inf, "host": 4e9, "page_cache": 2e9, "disk": 1e9}
_PRIOR_FIXED_S = {"device": 0.0, "host": 0.002, "page_cache": 0.005, "disk": 0.01}


class LinearEstimate:
    """``seconds ≈ a + b * nbytes``, fitted by exponentially weighted least squares over the loads
    observed (not thread-safe). Before the first load: the prior line. Where the loads' sizes do not
    determine a line (all about one size) or the fit is not a cost (a or b < 0): the line of the
    prior's rate through the loads' weighted mean."""

    def __init__(self, bytes_per_s: float, fixed_s: float, decay: float = DECAY):
        self.decay = decay
        self.count = 0  # loads observed
        self.prior = (fixed_s, 0.0 if math.isinf(bytes_per_s) else 1.0 / bytes_per_s)
        self._sums = [0.0] * 5  # weight, x, y, x², x*y

    def observe(self, nbytes: int, seconds: float) -> None:
        x, y = float(nbytes), max(0.0, float(seconds))
        self._sums = [v * self.decay + d for v, d in zip(self._sums, (1.0, x, y, x * x, x * y))]
        self.count += 1

    def line(self) -> tuple[float, float]:
        """``(a, b)``: the fixed seconds and the seconds per byte, both >= 0."""
        if not self.count:
            return self.prior
        w, x, y, xx, xy = self._sums
        mx, my = x / w, y / w
        var = xx / w - mx * mx
        if var > (0.05 * mx) ** 2:
            b = (xy / w - mx * my) / var
            a = my - b * mx
            if a >= 0 and b >= 0:
                return a, b
        b = self.prior[1]
        if my - b * mx >= 0:
            return my - b * mx, b
        return 0.0, my / mx  # faster than the prior's rate: proportional to the bytes

    def seconds(self, nbytes: int) -> float:
        a, b = self.line()
        return a + b * nbytes


class LoadEstimates:
    """The manager's estimates: one :class:`LinearEstimate` per ``(tier, phase)`` (thread-safe)."""

    def __init__(self, decay: float = DECAY):
        self._lock = threading.Lock()
        self._est = {}
        for tier in TIERS:
            for phase in PHASES:
                # A phase's prior is the whole load's: only ``load`` is predicted from; the phases are
                # reported (metrics) once they have been observed.
                self._est[(tier, phase)] = LinearEstimate(_PRIOR_BYTES_PER_S[tier], _PRIOR_FIXED_S[tier], decay)

    def observe(self, tier: str, phase: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            self._est[(tier, phase)].observe(nbytes, seconds)

    def seconds(self, tier: str, nbytes: int, phase: str = "load") -> float:
        """The predicted seconds of ``phase`` for ``nbytes`` from ``tier`` (``device``: 0 for a load)."""
        if tier == "device" and phase == "load":
            return 0.0
        with self._lock:
            return self._est[(tier, phase)].seconds(nbytes)

    def count(self, tier: str, phase: str = "load") -> int:
        with self._lock:
            return self._est[(tier, phase)].count

    def gauges(self, reference_bytes: int = 100 << 20) -> list[tuple[str, str, dict, float]]:
        """The estimates as Triton gauges: predicted seconds for ``reference_bytes`` (100 MiB) per
        tier and phase, for the phases observed at least once."""
        out = []
        with self._lock:
            for (tier, phase), est in self._est.items():
                if est.count:
                    out.append(("katz_lora_estimate_seconds", "predicted seconds per 100 MiB of LoRA, by tier and "
                                "phase (load: the load's critical path)", {"tier": tier, "phase": phase},
                                est.seconds(reference_bytes)))
        return out

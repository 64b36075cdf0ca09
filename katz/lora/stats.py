"""What the LoRA manager and BAL count (:class:`LoraStats`), exported as Triton metrics by the ``unet`` model."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

# upper bounds (s) of the switch-time buckets (katz_lora_switches_total{le=...}); switches over
# SLOW_SWITCH_S are counted apart (katz_lora_slow_switches_total)
SWITCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
SLOW_SWITCH_S = 0.1


@dataclass
class LoraStats:
    """Totals since start, exported as Triton custom metrics (:meth:`metrics` counters, :meth:`gauges`;
    published by the ``unet`` model).

    ``read_seconds`` .. ``device_wait_seconds`` split the loader thread's time over the stages of a
    load, failed loads included; for successful loads they add up to ``load_seconds`` less
    ``load_delay_s`` and bookkeeping. ``host_fill_seconds`` comes after a load, when its waiters
    have been let go. Read bandwidth: ``read_bytes / read_seconds``.

    The BAL fields are per request with LoRAs (:class:`katz.lora.bal.LoopLoras`): what was predicted
    at its first step and what happened.
    """

    loads: int = 0
    load_seconds: float = 0.0
    load_failures: int = 0
    loads_by_tier: dict = field(default_factory=Counter)  # tier -> loads (host, page_cache, disk)
    load_seconds_by_tier: dict = field(default_factory=Counter)  # tier -> seconds of those loads
    host_hits: int = 0
    host_misses: int = 0
    host_rejected: int = 0  # loads the host tier did not keep: less popular than what they would evict
    device_hits: int = 0
    device_misses: int = 0
    steps_before_patch: int = 0
    patches: int = 0
    wait_seconds: float = 0.0
    read_seconds: float = 0.0  # header + waiting for the file bytes beyond the parsing done meanwhile (host misses)
    read_bytes: int = 0  # bytes read from LoRA files (host misses)
    parse_seconds: float = 0.0  # parse_lora + LoraPatcher.validate (host misses)
    upload_seconds: float = 0.0  # issuing the uploads and the device finiteness check, views of the device buffer
    device_wait_seconds: float = 0.0  # waiting for the upload and the finiteness check (the load's one host sync)
    host_copy_seconds: float = 0.0  # host hits: host tier -> staging buffer
    host_fill_seconds: float = 0.0  # after a load: staging buffer -> host tier (off the request's path)
    pristine_seconds: float = 0.0  # the loader making pristine copies of the weights a new LoRA targets
    # the UNet model's weight switches (merge a LoRA set in, or restore the base): host time, which for a
    # merge that streams in a loading LoRA includes waiting for its bytes (switch_wait_seconds of it)
    switches: int = 0
    switch_seconds: float = 0.0
    switch_wait_seconds: float = 0.0
    switch_max_seconds: float = 0.0
    slow_switches: int = 0  # switches over SLOW_SWITCH_S
    switch_buckets: list = field(default_factory=lambda: [0] * (len(SWITCH_BUCKETS) + 1))  # le bucket counts
    switch_gc_collections: int = 0  # Python garbage collections that ran during a switch
    # BAL, per request with LoRAs (counted at its end)
    requests: int = 0
    hot_requests: int = 0  # the LoRAs were on the device or in the host tier at the first step
    predicted_ready_seconds: float = 0.0  # at the first step: when the LoRA set would be on the device
    ready_seconds: float = 0.0  # from the first step to the LoRA set in place (requests that had it in)
    predicted_step_sum: int = 0  # the step the LoRA set was predicted to go in at (bounded by k)
    applied_step_sum: int = 0  # the step it went in at (requests that had it in)
    step_error_sum: int = 0  # |applied - predicted| summed
    late_requests: int = 0  # requests whose LoRAs went in later than predicted
    waited_requests: int = 0  # requests that waited for their LoRAs at some step

    def record_switch(self, seconds: float, waited: float, gc_collections: int) -> None:
        self.switches += 1
        self.switch_seconds += seconds
        self.switch_wait_seconds += waited
        self.switch_max_seconds = max(self.switch_max_seconds, seconds)
        self.slow_switches += seconds > SLOW_SWITCH_S
        self.switch_buckets[sum(seconds > b for b in SWITCH_BUCKETS)] += 1
        self.switch_gc_collections += gc_collections

    def metrics(self) -> list[tuple[str, str, dict, float]]:
        """The totals as Triton custom metrics ``(name, description, labels, total)``."""
        s = self
        out = [
            ("katz_lora_loads_total", "LoRAs loaded to the device", {}, s.loads),
            ("katz_lora_load_seconds_total", "time spent loading LoRAs (s)", {}, s.load_seconds),
            ("katz_lora_load_failures_total", "LoRA loads that failed", {}, s.load_failures),
            ("katz_lora_cache_hits_total", "LoRA cache hits", {"tier": "host"}, s.host_hits),
            ("katz_lora_cache_misses_total", "LoRA cache misses", {"tier": "host"}, s.host_misses),
            ("katz_lora_cache_hits_total", "LoRA cache hits", {"tier": "device"}, s.device_hits),
            ("katz_lora_cache_misses_total", "LoRA cache misses", {"tier": "device"}, s.device_misses),
            ("katz_lora_host_rejected_total", "loaded LoRAs the host tier did not keep (less popular than what "
             "they would evict)", {}, s.host_rejected),
            ("katz_lora_steps_before_patch_total", "UNet steps run on base weights while a LoRA loaded", {},
             s.steps_before_patch),
            ("katz_lora_patches_total", "LoRA sets patched into the UNet", {}, s.patches),
            ("katz_lora_wait_seconds_total", "time steps waited for a LoRA (s)", {}, s.wait_seconds),
            ("katz_lora_switch_seconds_total", "time switching the UNet weights: LoRA sets merged in, base restored (s)",
             {}, s.switch_seconds),
            ("katz_lora_switch_wait_seconds_total", "of the switch time, waiting for a loading LoRA's bytes (s)",
             {}, s.switch_wait_seconds),
            ("katz_lora_switch_count_total", "UNet weight switches", {}, s.switches),
            ("katz_lora_slow_switches_total", f"UNet weight switches over {SLOW_SWITCH_S * 1e3:.0f} ms", {},
             s.slow_switches),
            ("katz_lora_switch_gc_total", "Python garbage collections during weight switches", {},
             s.switch_gc_collections),
            ("katz_lora_load_phase_seconds_total", "LoRA load time by phase (s)", {"phase": "read"}, s.read_seconds),
            ("katz_lora_load_phase_seconds_total", "LoRA load time by phase (s)", {"phase": "parse"}, s.parse_seconds),
            ("katz_lora_load_phase_seconds_total", "LoRA load time by phase (s)", {"phase": "upload"},
             s.upload_seconds),
            ("katz_lora_load_phase_seconds_total", "LoRA load time by phase (s)", {"phase": "device_wait"},
             s.device_wait_seconds),
            ("katz_lora_load_phase_seconds_total", "LoRA load time by phase (s)", {"phase": "host_copy"},
             s.host_copy_seconds),
            ("katz_lora_load_phase_seconds_total", "LoRA load time by phase (s)", {"phase": "pristine"},
             s.pristine_seconds),
            ("katz_lora_bal_requests_total", "requests with LoRAs, by what their LoRAs were at the first step",
             {"start": "hot"}, s.hot_requests),
            ("katz_lora_bal_requests_total", "requests with LoRAs, by what their LoRAs were at the first step",
             {"start": "cold"}, s.requests - s.hot_requests),
            ("katz_lora_predicted_ready_seconds_total", "predicted at each request's first step: seconds until its "
             "LoRA set is on the device", {}, s.predicted_ready_seconds),
            ("katz_lora_ready_seconds_total", "seconds from each request's first step to its LoRA set in place", {},
             s.ready_seconds),
            ("katz_lora_predicted_step_total", "predicted step at which each request's LoRAs go in, summed", {},
             s.predicted_step_sum),
            ("katz_lora_applied_step_total", "step at which each request's LoRAs went in, summed", {},
             s.applied_step_sum),
            ("katz_lora_step_error_total", "|applied - predicted step| summed over requests", {}, s.step_error_sum),
            ("katz_lora_late_requests_total", "requests whose LoRAs went in later than predicted", {},
             s.late_requests),
            ("katz_lora_waited_requests_total", "requests that waited for their LoRAs at some step", {},
             s.waited_requests),
        ]
        for tier in ("host", "page_cache", "disk"):
            out.append(("katz_lora_tier_loads_total", "LoRA loads by the tier they came from", {"tier": tier},
                        s.loads_by_tier[tier]))
            out.append(("katz_lora_tier_load_seconds_total", "LoRA load time by the tier they came from (s)",
                        {"tier": tier}, s.load_seconds_by_tier[tier]))
        cumulative = 0
        for bound, count in zip((*SWITCH_BUCKETS, float("inf")), s.switch_buckets):
            cumulative += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(("katz_lora_switches_total", "UNet weight switches taking at most le seconds", {"le": le},
                        cumulative))
        return out

    def gauges(self) -> list[tuple[str, str, dict, float]]:
        return [("katz_lora_switch_max_seconds", "the longest UNet weight switch since start (s)", {},
                 self.switch_max_seconds)]

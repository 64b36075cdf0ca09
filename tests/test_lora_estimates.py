"""The LoRA manager's load estimates, its predictions of when a LoRA set is on the device, and its
tiers' popularity-aware admission and eviction (CPU, tiny LoRA files)."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest
import torch

from katz.lora.estimates import LinearEstimate, LoadEstimates
from katz.lora.manager import LoraManager
from katz.lora.tiers import Popularity, default_host_budget
from katz.lora.patch import LoraPatcher
from katz.lora.store import LoraStore
from test_lora_file import _Net, _peft_lora


def test_estimate_converges_to_the_loads_and_follows_a_slower_disk():
    est = LinearEstimate(bytes_per_s=1e9, fixed_s=0.01)
    assert est.seconds(100e6) == pytest.approx(0.11)  # the prior before any load
    # loads of several sizes at 20 ms + 1.4 GB/s: the line is found
    sizes = [50e6, 186e6, 120e6, 80e6, 186e6, 30e6]
    for n in sizes:
        est.observe(int(n), 0.02 + n / 1.4e9)
    for n in (40e6, 186e6, 300e6):
        assert est.seconds(n) == pytest.approx(0.02 + n / 1.4e9, rel=0.02)
    # the disk gets 3x slower: within a few loads the estimate follows (old loads fade at DECAY each)
    for n in sizes:
        est.observe(int(n), 0.02 + 3 * n / 1.4e9)
    assert est.seconds(186e6) == pytest.approx(0.02 + 3 * 186e6 / 1.4e9, rel=0.1)


def test_estimate_of_loads_of_one_size_is_exact_there():
    est = LinearEstimate(bytes_per_s=2e9, fixed_s=0.005)
    for _ in range(4):
        est.observe(325_000, 0.032)  # one size: no line through the loads; the prior's rate through them
    assert est.seconds(325_000) == pytest.approx(0.032)
    assert est.seconds(650_000) == pytest.approx(0.032 + 325_000 / 2e9)
    est = LinearEstimate(bytes_per_s=1e6, fixed_s=0.0)  # loads much faster than the prior's rate
    for _ in range(3):
        est.observe(10_000_000, 0.001)
    assert est.seconds(10_000_000) == pytest.approx(0.001) and est.seconds(0) == 0.0


def _manager(tmp_path, names, **kw) -> LoraManager:
    for i, name in enumerate(names):
        _peft_lora(tmp_path / f"{name}.safetensors", i + 1)
    return LoraManager(LoraStore(tmp_path, "sdxl"), [LoraPatcher(_Net(), "unet")], "cpu", **kw)


def test_manager_predicts_a_load_from_its_tier_and_the_queue(tmp_path):
    """The estimate of a file load converges to what loads take (here a slow disk: 0.15 s each); a
    LoRA queued behind another one is predicted after it; a LoRA on the device, or in the host tier
    (hot), is predicted at once."""
    m = _manager(tmp_path, ["a", "b", "c"], load_delay_s=0.15)
    try:
        for _ in range(3):
            m.clear_caches()
            m.get(["a"])
        m.wait_idle()
        tier = m.stats.loads_by_tier.most_common(1)[0][0]
        assert tier in ("page_cache", "disk") and m.estimates.count(tier) == 3
        took = m.stats.load_seconds / m.stats.loads
        m.clear_caches()
        eta = m.eta(["a"])
        assert eta == pytest.approx(took, rel=0.2) and eta >= 0.15
        # two loads queued on the one loader thread: the second is ready after the first
        m.prefetch(["b"])
        assert m.eta(["b", "c"]) == pytest.approx(2 * took, rel=0.3)
        t0 = time.perf_counter()
        m.get(["b"])
        waited = time.perf_counter() - t0
        assert waited == pytest.approx(took, rel=0.5)
        assert m.eta(["b"]) == 0.0 and m.tiers(["b"]) == ["device"]
        m.wait_idle()  # the host tier filled
        m.device_cache.clear()
        assert m.tiers(["b", "c"]) == ["host", tier]
        assert m.eta(["b"]) < 0.05  # a host-tier load: a copy, no slow read
        assert m.estimates.seconds("device", 1 << 30) == 0.0
    finally:
        m.close()


def test_zipf_traffic_keeps_the_popular_loras_in_the_host_tier(tmp_path):
    """Requests for 40 LoRAs with Zipf popularity, a device tier that holds one LoRA and a host tier
    that holds five. Counting uses over a sliding window, the host tier keeps the popular LoRAs (a
    LoRA used less is not admitted over them, and ties keep what is there): once the counts have
    seen a few requests, none of the three most popular is read from its file again. A plain LRU
    host tier reads them again and again, and reads more files in all."""
    names = [f"l{i:02d}" for i in range(40)]
    weights = [1 / (i + 1) ** 1.2 for i in range(len(names))]
    stream = random.Random(7).choices(names, weights, k=300)
    top = [n for n, _ in Counter(stream).most_common(3)]

    def run(window: int) -> list[tuple[int, str]]:
        d = tmp_path / f"w{window}"
        d.mkdir()
        m = _manager(d, names, popularity_window=window)
        m.get([names[0]])
        entry = m.device_cache.peek(names[0], m.cache_key(names[0])).nbytes
        m.clear_caches()
        m.device_cache.budget, m.host.budget = entry, 5 * entry
        reads: list[tuple[int, str]] = []
        real = m._read_entry

        def counting(name, progress):
            reads.append((i, name))
            return real(name, progress)

        m._read_entry = counting
        try:
            for i, name in enumerate(stream):
                m.note_request([name])
                m.get([name])
                m.wait_idle()  # the host tier filled (or not) before the next request
        finally:
            m.close()
        return reads

    popular, lru = run(256), run(0)
    late = [n for i, n in popular if i >= 100 and n in top]
    assert late == [] and all(sum(n == t for _i, n in popular) <= 3 for t in top), popular
    assert sum(i >= 100 and n in top for i, n in lru) > 10
    assert len(popular) < 0.8 * len(lru)


def test_popularity_counts_a_sliding_window():
    p = Popularity(window=4)
    p.note(["a", "b"])
    p.note(["a", "a"])  # one use per request and LoRA
    assert p.count("a") == 2 and p.count("b") == 1
    p.note(["c"])
    p.note(["c"])  # "a" (first) drops out of the window
    assert p.count("a") == 1 and p.count("b") == 1 and p.count("c") == 2
    p.note(["d"])
    assert p.count("b") == 0 and p.count("d") == 1


def test_host_budget_defaults_to_a_share_of_the_free_memory(tmp_path):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       131072000 kB\nMemAvailable:    8000000 kB\n")
    assert default_host_budget(str(info)) == 8000000 * 1024 // 4
    info.write_text("MemAvailable:   512000000 kB\n")
    assert default_host_budget(str(info)) == 16 << 30  # capped
    assert default_host_budget(str(tmp_path / "none")) == 2 << 30
    from katz.cli import parser as build_parser
    from katz.deployment import Deployment, DeploymentError

    assert Deployment.default("lora_host_cache_bytes") == -1
    args = build_parser().parse_args(["serve", "--preset", "tiny-sdxl"])
    assert args.lora_host_cache_mb == "auto"
    args = build_parser().parse_args(["serve", "--preset", "tiny-sdxl", "--lora-host-cache-mb", "512"])
    assert args.lora_host_cache_mb == 512
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--preset", "tiny-sdxl", "--lora-host-cache-mb", "-3"])
    with pytest.raises(DeploymentError, match="lora_host_cache_bytes"):
        Deployment(tmp_path, {}, None, None, lora_host_cache_bytes=-2).validate()
    m = LoraManager(LoraStore(tmp_path, "sdxl"), [LoraPatcher(_Net(), "unet")], "cpu")
    try:
        assert 0 < m.host.budget <= 16 << 30
    finally:
        m.close()


def test_load_estimates_are_exported_once_observed():
    est = LoadEstimates()
    assert est.gauges() == []
    est.observe("disk", "load", 100 << 20, 0.1)
    (name, _desc, labels, value), = est.gauges()
    assert name == "katz_lora_estimate_seconds" and labels == {"tier": "disk", "phase": "load"}
    assert value == pytest.approx(0.1)
    assert torch.tensor(value).isfinite()

"""bench/bal_quality.py: the share of a LoRA's effect a BAL image keeps, its guard and the bound it picks."""

from __future__ import annotations

import numpy as np
import pytest

from bench.bal_quality import NEVER, Renderer, aggregate, effect_kept, largest_bound, random_loras, ssim, summarize


def test_effect_kept_is_one_minus_the_mse_ratio_pooled_over_pairs():
    zero, lora_free = np.zeros((4, 4, 3)), np.full((4, 4, 3), 10.0)  # MSE(no LoRA, k = 0) = 100

    def m(a, b):
        return float(np.mean((a - b) ** 2))

    assert effect_kept([m(zero, zero)], [m(lora_free, zero)], floor=1.0) == 1.0  # the k = 0 image
    assert effect_kept([m(lora_free, zero)], [m(lora_free, zero)], floor=1.0) == 0.0  # as if never applied
    assert effect_kept([m(np.full_like(zero, 5.0), zero)], [100.0], floor=1.0) == pytest.approx(0.75)
    # pooled as a ratio of means: a pair where the LoRA does little weighs little
    assert effect_kept([25.0, 4.0], [100.0, 4.0], floor=1.0) == pytest.approx(1 - 29 / 104)
    # further from k = 0 than the LoRA-free image: negative, not clipped
    assert effect_kept([400.0], [100.0], floor=1.0) == pytest.approx(-3.0)


def test_effect_kept_is_undefined_where_the_lora_barely_changes_the_image():
    assert effect_kept([0.5], [1.9], floor=2.0) is None
    assert effect_kept([0.0], [0.0], floor=0.0) is None  # no effect at all: 0 / 0
    assert effect_kept([0.5], [2.0], floor=2.0) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        effect_kept([1.0, 2.0], [4.0], floor=0.0)


def test_largest_bound_needs_every_smaller_k_to_keep_enough():
    assert largest_bound({0: 1.0, 1: 0.97, 2: 0.91, 3: 0.85, 4: 0.95}, 0.9) == 2  # k = 4 is past a failing k = 3
    assert largest_bound({0: 1.0, 1: 0.97, 2: 0.91, 4: 0.95}, 0.9) == 2  # k = 3 not measured
    assert largest_bound({0: 1.0, 1: 0.5}, 0.9) == 0
    assert largest_bound({0: 1.0, 1: None, 2: 0.99}, 0.9) == 0
    assert largest_bound({1: 1.0}, 0.9) is None  # no k = 0


def _records(model, lora, effect, kept_by_k):
    """Records of one configuration and one pair whose effect kept at k is ``kept_by_k[k]``."""
    common = dict(model=model, scheduler="default", steps=20, lora=lora, rank=4, scale=1.0, case="p|0")
    out = [dict(common, k=NEVER, mse=effect, psnr=30.0, ssim=0.9)]
    for k, kept in kept_by_k.items():
        out.append(dict(common, k=k, mse=(1 - kept) * effect, psnr=40.0 + k, ssim=0.99))
    return out


def test_summary_takes_min_and_median_over_configurations_and_leaves_out_guarded_ones():
    recs = (_records("a", "r4", 100.0, {0: 1.0, 1: 0.95, 2: 0.80})
            + _records("a", "r64", 100.0, {0: 1.0, 1: 0.92, 2: 0.91})
            + _records("b", "r4", 100.0, {0: 1.0, 1: 0.99, 2: 0.97})
            + _records("b", "r64", 1.0, {0: 1.0, 1: 0.0, 2: 0.0}))  # effect below the floor of 2
    configs = aggregate(recs, floor=2.0)
    assert len(configs) == 4
    by_name = {(c["model"], c["lora"]): c for c in configs}
    assert by_name[("a", "r4")]["by_k"][1]["effect_kept"] == pytest.approx(0.95)
    assert by_name[("b", "r64")]["by_k"][1]["effect_kept"] is None
    s = summarize(configs, 0.9)
    assert s["by_k"]["1"]["effect_kept_min"] == pytest.approx(0.92)
    assert s["by_k"]["2"]["effect_kept_min"] == pytest.approx(0.80)
    assert s["by_k"]["2"]["effect_kept_median"] == pytest.approx(0.91)
    assert s["by_k"]["1"]["configs"] == 4 and s["by_k"]["1"]["configs_defined"] == 3
    assert s["by_k"][NEVER]["effect_kept_median"] == 0.0
    assert s["largest_k_all"] == 1 and s["largest_k_median"] == 2
    assert s["configs_undefined"] == 1


def test_ssim_numpy_and_torch_agree():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (23, 31, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 30, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    assert 0.5 < ssim(a, b) < 0.99
    assert ssim(a, b) == pytest.approx(ssim(a, b, "cpu"), abs=1e-12)


def test_renderer_brings_the_lora_in_at_step_k(preset_dir, tmp_path):
    """The bench's images are the server's: k = 0 with the LoRA differs from the LoRA-free image, the
    LoRA comes in exactly at k (Renderer checks lora_applied_step), a later k is between the two, and
    the decoded image kept for effect kept is the 8-bit one before rounding."""
    model = preset_dir("tiny-sdxl")
    (name,) = random_loras(model, tmp_path, [4], "float32")
    r = Renderer(model, tmp_path, 32, "cpu")
    none8, none = r.render("a cat", 0, 3)
    k0_8, k0 = r.render("a cat", 0, 3, name, 1.0, 0)
    k2_8, k2 = r.render("a cat", 0, 3, name, 1.0, 2)
    assert np.array_equal(np.round(k0).astype(np.uint8), k0_8)
    d_none, d_k2 = np.mean((none - k0) ** 2), np.mean((k2 - k0) ** 2)
    assert d_none > 1.0 and 0 < d_k2 < d_none

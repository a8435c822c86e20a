"""Protocol statistics on synthetic inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from monet.errors import MonetError
from monet.experiments.protocol_stats import (
    delta_ci,
    forget_retain_curve,
    others_at_target,
    percentile,
    random_masks,
    random_p95,
    verdict,
)


def test_constant_shift_has_a_zero_width_interval():
    before = np.linspace(2.0, 4.0, 50)
    out = delta_ci(before, before + 0.25)
    assert out["delta"] == pytest.approx(0.25)
    assert out["ci95"] == pytest.approx([0.25, 0.25])
    assert out["windows"] == 50 and out["tokens"] == 50


def test_pairing_removes_the_spread_between_windows():
    """Windows differ a lot (2..12 nats) but each moves by 0.1 +- 0.01: the interval is ~0.1 +- 0.003."""
    rng = np.random.default_rng(0)
    before = rng.uniform(2, 12, 400)
    after = before + 0.1 + rng.normal(0, 0.01, 400)
    lo, hi = delta_ci(before, after)["ci95"]
    assert lo < 0.1 < hi and hi - lo < 0.005


def test_interval_matches_the_normal_theory_width():
    rng = np.random.default_rng(1)
    n, sigma = 2000, 0.5
    diff = rng.normal(0.3, sigma, n)
    out = delta_ci(np.zeros(n), diff, reps=4000)
    lo, hi = out["ci95"]
    half = 1.96 * diff.std() / np.sqrt(n)
    assert out["delta"] == pytest.approx(diff.mean())
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(diff.mean(), abs=0.1 * half)


def test_token_weights_give_the_token_mean():
    before = np.array([1.0, 1.0, 1.0])
    after = np.array([1.0, 2.0, 4.0])
    out = delta_ci(before, after, tokens=[1, 1, 2])
    assert out["delta"] == pytest.approx((0 * 1 + 1 * 1 + 3 * 2) / 4)
    assert out["ci95"][0] <= out["delta"] <= out["ci95"][1]


def test_bootstrap_is_deterministic_and_checks_inputs():
    rng = np.random.default_rng(2)
    before, after = rng.normal(size=30), rng.normal(size=30)
    assert delta_ci(before, after, seed=3) == delta_ci(before, after, seed=3)
    with pytest.raises(MonetError, match="same windows"):
        delta_ci([1.0, 2.0], [1.0])
    with pytest.raises(MonetError, match="non-finite"):
        delta_ci([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(MonetError, match="positive count"):
        delta_ci([1.0, 2.0], [1.0, 2.0], tokens=[1, 0])


def test_random_masks_match_the_selection_and_stay_in_the_seen_units():
    seen = {0: np.arange(100, 200), 1: np.array([5, 7, 9, 11])}
    counts = {0: 10, 1: 3}
    masks = random_masks(counts, seen, n=25, seed=0)
    assert len(masks) == 25
    for mask in masks:
        assert {g: len(ids) for g, ids in mask.items()} == counts
        assert set(mask[0]) <= set(seen[0]) and set(mask[1]) <= {5, 7, 9, 11}
        assert len(set(mask[0])) == 10 and list(mask[0]) == sorted(mask[0])
    assert len({tuple(m[0]) for m in masks}) > 20, "masks should differ"
    again = random_masks(counts, seen, n=25, seed=0)
    assert all(np.array_equal(a[g], b[g]) for a, b in zip(masks, again, strict=True) for g in counts)
    # Lists work as group -> pool too, and every seen unit is eventually drawn (uniform draws).
    drawn = np.concatenate([m[1] for m in random_masks({1: 2}, [[], [5, 7, 9, 11]], n=200, seed=1)])
    assert set(drawn) == {5, 7, 9, 11}
    assert np.bincount(drawn)[[5, 7, 9, 11]].min() > 60


def test_random_masks_refuse_more_units_than_were_seen():
    with pytest.raises(MonetError, match="cannot draw 5 units from the 4 seen"):
        random_masks({0: 5}, {0: [1, 2, 3, 4]})
    assert random_masks({0: 0}, {0: []}, n=2)[1][0].size == 0


def test_percentiles():
    assert percentile(np.arange(101), 95) == pytest.approx(95)
    assert random_p95(np.arange(21)) == pytest.approx(19)          # 20 gaps: 0.95 * 20
    assert random_p95([0.5]) == 0.5
    with pytest.raises(MonetError):
        random_p95([])


def test_forget_retain_curve_and_equal_target_comparison():
    points = [{"delta_target": 0.4, "delta_others": 0.04, "masking_ratio": 0.05},
              {"delta_target": 0.1, "delta_others": 0.01, "masking_ratio": 0.01},
              {"delta_target": 0.2, "delta_others": 0.03, "masking_ratio": 0.02}]
    curve = forget_retain_curve(points)
    assert [p["delta_target"] for p in curve] == [0.1, 0.2, 0.4]
    assert others_at_target(points, 0.2) == pytest.approx(0.03)
    assert others_at_target(points, 0.3) == pytest.approx(0.035)
    assert others_at_target(points, 0.15) == pytest.approx(0.02)
    assert others_at_target(points, 0.05) is None and others_at_target(points, 0.5) is None
    with pytest.raises(MonetError):
        forget_retain_curve([{"delta_target": float("nan"), "delta_others": 0.0}])


def test_verdict():
    assert verdict(0.3, 0.02, 0.05)["passed"]
    assert not verdict(0.08, 0.0, 0.0)["min_delta"]
    assert not verdict(0.3, 0.07, 0.0)["selective"]
    assert verdict(0.3, -0.2, 0.0)["selective"]          # others improving is not a ratio blow-up
    assert not verdict(0.3, 0.0, 0.31)["beats_random"]

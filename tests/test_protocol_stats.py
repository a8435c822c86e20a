"""Protocol statistics on synthetic inputs with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from monet.errors import MonetError
from monet.experiments.protocol_stats import (
    control_comparison,
    delta_ci,
    forget_retain_curve,
    interval_verdict,
    matched_masks,
    others_at_target,
    percentile,
    random_masks,
    random_p95,
    replication_grade,
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


def test_clustered_interval_is_wider_when_windows_of_a_document_move_together():
    """20 documents of 20 windows each; the change is shared within a document. Resampling windows one by
    one treats 400 correlated values as independent; resampling documents gives the honest (wider) width."""
    rng = np.random.default_rng(4)
    docs = np.repeat(np.arange(20), 20)
    shift = rng.normal(0.2, 0.1, 20)[docs] + rng.normal(0, 0.01, docs.size)
    naive = delta_ci(np.zeros(docs.size), shift, reps=3000)
    clustered = delta_ci(np.zeros(docs.size), shift, reps=3000, clusters=docs)
    assert clustered["delta"] == pytest.approx(naive["delta"])
    width = lambda out: out["ci95"][1] - out["ci95"][0]   # noqa: E731
    assert width(clustered) > 3 * width(naive)
    # Normal theory over 20 document means: half-width 1.96 sd / sqrt(20).
    means = np.bincount(docs, weights=shift) / 20
    assert width(clustered) / 2 == pytest.approx(1.96 * means.std() / np.sqrt(20), rel=0.2)
    assert clustered["clusters"] == 20 and naive["clusters"] == 400
    # Without clusters (each window its own) the old interval is unchanged.
    assert delta_ci(np.zeros(docs.size), shift, reps=3000, clusters=np.arange(docs.size)) == naive
    with pytest.raises(MonetError, match="one value per window"):
        delta_ci([1.0, 2.0], [1.0, 2.0], clusters=[0])


def test_strata_weigh_each_label_the_same():
    """Δ others is the mean over labels whatever their window counts; documents resample within a label."""
    before = np.zeros(30)
    after = np.r_[np.full(10, 0.3), np.full(20, 0.0)]
    strata = np.r_[np.zeros(10), np.ones(20)]
    out = delta_ci(before, after, strata=strata, clusters=np.arange(30) // 5)
    assert out["delta"] == pytest.approx(0.15)               # (0.3 + 0.0) / 2, not 10 x 0.3 / 30
    assert out["ci95"] == pytest.approx([0.15, 0.15])         # constant within each label: no spread
    assert out["clusters"] == 6


def test_matched_masks_follow_the_selection_across_mass_deciles():
    rng = np.random.default_rng(5)
    mass = [rng.exponential(1.0, 1000)]
    order = np.argsort(mass[0])
    selected = {0: np.sort(np.r_[order[-30:], order[:10]])}   # 30 from the top decile, 10 from the bottom one
    masks, overlap = matched_masks(mass, [np.arange(1000)], selected, n=50, seed=1)
    assert len(masks) == 50 and overlap == 0
    top, bottom = set(order[-100:]), set(order[:100])
    for mask in masks:
        ids = mask[0]
        assert ids.size == 40 and len(set(ids)) == 40
        assert not set(ids) & set(selected[0])
        assert sum(i in top for i in ids) == 30 and sum(i in bottom for i in ids) == 10
    assert len({tuple(m[0]) for m in masks}) == 50
    again, _ = matched_masks(mass, [np.arange(1000)], selected, n=50, seed=1)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(masks, again, strict=True))
    # Uniform draws (the old control) do not follow the mass: about 4 of 40 from the top decile.
    uniform = random_masks({0: 40}, {0: np.arange(1000)}, n=50, seed=1)
    assert np.mean([sum(i in top for i in m[0]) for m in uniform]) < 10


def test_matched_masks_fall_back_to_the_whole_bin_and_report_the_overlap():
    mass = [np.arange(20, dtype=float)]
    selected = {0: np.arange(17, 20)}                         # 3 of the top bin's 4 units (5 bins of 4)
    masks, overlap = matched_masks(mass, [np.arange(20)], selected, n=20, bins=5, seed=0)
    assert all(set(m[0]) <= {16, 17, 18, 19} and m[0].size == 3 for m in masks)
    assert 0.5 < overlap < 1.0
    with pytest.raises(MonetError, match="unit 9 has no target mass"):
        matched_masks([np.zeros(5)], [np.arange(10)], {0: [1]}, n=1)
    with pytest.raises(MonetError, match="unit -1 has no target mass"):   # a boolean lookup would wrap it
        matched_masks([np.zeros(5)], [np.arange(5)], {0: [-1]}, n=1)


def test_control_comparison_can_fail():
    rng = np.random.default_rng(6)
    target = rng.normal(0.3, 0.05, 200)
    others = 0.2 * target + rng.normal(0, 0.005, 200)         # the masks' cost grows with what they forget
    good = control_comparison(0.3, 0.02, target, others)      # selective: 0.02 where masks pay ~0.06
    assert good["selection_below"] and good["dominating_masks"] == 0
    assert good["p_value"] == pytest.approx(1 / 201)
    assert good["others_near"] == pytest.approx(0.06, abs=0.01)
    bad = control_comparison(0.3, 0.08, target, others)       # costs more than the masks that forget as much
    assert not bad["selection_below"] and bad["p_value"] > 0.3
    assert bad["delta_target_p95"] == pytest.approx(np.percentile(target, 95))
    with pytest.raises(MonetError, match="one value per mask"):
        control_comparison(0.3, 0.0, [0.1, 0.2], [0.0])


def test_interval_verdict_and_grades():
    assert interval_verdict([0.25, 0.35], [0.01, 0.04], 0.3, 0.02, True)["grade"] == "robust"
    # lua 2026-12-05-like: point estimates pass (0.29 >= 5 x 0.05) but the bounds do not (0.27 < 5 x 0.058).
    marginal = interval_verdict([0.27, 0.31], [0.045, 0.058], 0.29, 0.05, True)
    assert marginal["grade"] == "marginal" and marginal["min_delta_lo"] and not marginal["selective_lo"]
    assert interval_verdict([0.08, 0.2], [0.0, 0.01], 0.14, 0.005, True)["grade"] == "marginal"
    assert interval_verdict([0.25, 0.35], [0.01, 0.04], 0.3, 0.02, False)["grade"] == "marginal"   # the control
    assert interval_verdict([0.25, 0.35], [0.01, 0.04], 0.3, 0.02, None)["grade"] == "marginal"    # no control
    assert interval_verdict([0.05, 0.1], [0.0, 0.01], 0.08, 0.0, True)["grade"] == "failing"
    assert interval_verdict([0.2, 0.3], [-0.05, -0.01], 0.25, -0.03, True)["grade"] == "robust"
    assert replication_grade(["robust", "robust", "robust", "marginal"]) == "robust"
    assert replication_grade(["robust", "robust", "marginal", "marginal"]) == "marginal"
    assert replication_grade(["robust", "failing", "failing", "marginal"]) == "failing"
    with pytest.raises(MonetError):
        replication_grade(["pass"])

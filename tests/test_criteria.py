"""Selection criteria on synthetic statistics with known answers."""

import numpy as np
import pytest

from monet.errors import MonetError
from monet.interp.criteria import (
    PearsonAccumulator,
    correlated_units,
    label_means,
    select_correlated,
    select_skewed,
    select_top,
    skewed_units,
    specificity,
    top_specific,
)

# 3 labels x 6 units. Labels 0 and 1 have totals of 100, label 2 of 200 (twice the tokens), so the
# normalised shares are label0 [.40 .15 .15 .15 .10 .05], label1 [.15 .15 .08 .10 .40 .12],
# label2 [.15 .15 .15 .45 .05 .05].
MASS = np.array([
    #  u0    u1    u2    u3    u4    u5
    [40.0, 15.0, 15.0, 15.0, 10.0, 5.0],
    [15.0, 15.0, 8.0, 10.0, 40.0, 12.0],
    [30.0, 30.0, 30.0, 90.0, 10.0, 10.0],
])


def test_label_means_divide_by_label_totals():
    means = label_means(MASS)
    np.testing.assert_allclose(means.sum(axis=1), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(means[2], MASS[2] / 200)
    assert (label_means(np.array([[0.0, 0.0], [1.0, 3.0]]))[0] == 0).all()


def test_skewness_known_answers():
    # u0: .40 / .15 = 2.67 -> label 0; u4: .40 / .10 = 4, u5: .12 / .05 = 2.4 -> label 1; u3: .45 / .15 = 3 -> 2.
    assert skewed_units(MASS, 0, ratio=2.0).tolist() == [0]
    assert skewed_units(MASS, 1, ratio=2.0).tolist() == [4, 5]
    assert skewed_units(MASS, 2, ratio=2.0).tolist() == [3]
    # A stricter ratio keeps fewer; a minimum mass drops rarely seen units (u5 has 12 on label 1).
    assert skewed_units(MASS, 0, ratio=3.0).tolist() == []
    assert skewed_units(MASS, 1, ratio=3.0).tolist() == [4]
    assert skewed_units(MASS, 1, ratio=2.0, min_mass=20.0).tolist() == [4]
    assert skewed_units(MASS, 2, ratio=3.5).tolist() == []
    # Without normalisation label 2's size wins: u1 and u2 (30 vs 15) look like label-2 experts too.
    assert skewed_units(MASS, 2, ratio=2.0, normalize=False).tolist() == [1, 2, 3]
    assert [skewed_units(MASS, target, ratio=2.0).tolist() for target in range(3)] == [[0], [4, 5], [3]]


def test_specificity_and_top_n():
    spec = specificity(np.array([[4.0, 1.0, 0.0, 2.0], [2.0, 0.0, 0.0, 2.0]]), 0, normalize=False)
    assert spec.tolist() == [2.0, np.inf, 0.0, 1.0]
    top = top_specific(np.array([[4.0, 1.0, 0.0, 2.0, 9.0], [2.0, 0.0, 0.0, 2.0, 3.0]]), 0, 2, normalize=False)
    assert top.tolist() == [1, 4]          # inf first, then 3.0 (u4) before 2.0 (u0)
    assert top_specific(MASS, 0, 0).tolist() == []


def test_selection_counts_and_ratio_and_edits():
    masses = [MASS, MASS[:, ::-1]]
    selection = select_skewed(masses, 1, ratio=2.0)
    assert selection.counts() == {0: 2, 1: 2}
    assert selection.ids[1].tolist() == [0, 1]
    assert selection.masking_ratio == pytest.approx(4 / 12)
    summary = selection.summary()
    assert summary["selected"] == 4 and summary["selected_per_group"] == {"0": 2, "1": 2}
    with pytest.raises(MonetError, match="not made for this model"):
        selection.to_edits(num_experts=3)
    square = select_top([np.ones((2, 4)) * [[1], [2]] + np.eye(2, 4)], 0, n=1, min_mass=0)
    edits = square.to_edits(num_experts=2)
    assert edits.experts == {0: {0: 0.0}} and edits.num_experts == 2 and edits.num_groups == 1


def update_padded(accumulator: PearsonAccumulator, ids: np.ndarray, scores: np.ndarray, y: np.ndarray) -> None:
    """Feed padded [tokens, P] ids (-1 = padding) and scores as the ragged entries the accumulator takes."""
    token, slot = np.nonzero(ids >= 0)
    accumulator.update(token, ids[token, slot], scores[token, slot], y)


def test_pearson_accumulator_equals_numpy_on_dense_matrix():
    rng = np.random.default_rng(0)
    tokens, units, active = 400, 30, 4
    toxic = 5                                   # unit 5 fires on every high-y token, and only there
    others = np.delete(np.arange(units), toxic)
    ids = np.stack([rng.choice(others, active, replace=False) for _ in range(tokens)])
    scores = rng.random((tokens, active))
    y = rng.random(tokens)
    ids[::7, -1] = -1                           # padding entries are ignored
    scores[::7, -1] = 0.0
    ids[y > 0.6, 0] = toxic
    dense = np.zeros((tokens, units))
    for t in range(tokens):
        for p in range(active):
            if ids[t, p] >= 0:
                dense[t, ids[t, p]] += scores[t, p]
    expected = np.array([np.corrcoef(dense[:, u], y)[0, 1] if dense[:, u].std() > 0 else 0.0 for u in range(units)])
    whole = PearsonAccumulator(units)
    update_padded(whole, ids, scores, y)
    np.testing.assert_allclose(whole.correlation(), expected, atol=1e-10)
    halves = PearsonAccumulator(units)
    update_padded(halves, ids[:150], scores[:150], y[:150])
    other = PearsonAccumulator(units)
    update_padded(other, ids[150:], scores[150:], y[150:])
    np.testing.assert_allclose(halves.merge(other).correlation(), expected, atol=1e-10)
    assert int(np.argmax(whole.correlation())) == toxic
    assert whole.correlation()[toxic] > 0.5 > np.delete(whole.correlation(), toxic).max()
    assert correlated_units(whole.correlation(), 0.5).tolist() == [toxic]
    selection = select_correlated([whole.correlation()], 0.5)
    assert selection.counts() == {0: 1} and selection.masking_ratio == pytest.approx(1 / units)


def test_never_active_unit_has_zero_correlation():
    acc = PearsonAccumulator(3)
    acc.update(np.arange(3), np.array([0, 0, 1]), np.array([0.5, 0.7, 0.2]), np.array([0.1, 0.9, 0.3]))
    corr = acc.correlation()
    assert corr[2] == 0.0 and np.isfinite(corr).all()


def test_bad_inputs():
    with pytest.raises(MonetError, match="num_labels"):
        skewed_units(np.ones(5), 0)
    with pytest.raises(MonetError, match="num_labels"):
        skewed_units(np.ones((1, 5)), 0)
    with pytest.raises(MonetError, match="out of range"):
        skewed_units(MASS, 3)
    with pytest.raises(MonetError, match="ratio"):
        skewed_units(MASS, 0, ratio=0.5)
    with pytest.raises(MonetError, match="non-negative"):
        skewed_units(-MASS, 0)
    with pytest.raises(MonetError, match="threshold"):
        correlated_units(np.zeros(3), 1.5)
    with pytest.raises(MonetError, match="out of range"):
        PearsonAccumulator(3).update(np.array([0]), np.array([3]), np.array([1.0]), np.array([1.0]))
    with pytest.raises(MonetError, match="entries"):
        PearsonAccumulator(3).update(np.array([0, 0]), np.array([1]), np.array([1.0]), np.array([1.0]))
    with pytest.raises(MonetError, match="no groups"):
        select_skewed([], 0)

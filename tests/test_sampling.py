"""Samples that must not follow the stored order (issue 23, item 8): documents are stored by label, then
path (or by label alone), so "the first N tokens" of a label come from its first files and "the first N
tokens" of the toxicity corpus are all "non-toxic"."""

from __future__ import annotations

import numpy as np

from monet.data.storage import spread_order
from monet.experiments.toxicity import correlation_windows
from monet.interp.atlas import plan_windows


def _docs(lengths: list[int], labels: list[int]) -> np.ndarray:
    ends = np.cumsum(lengths)
    return np.stack([ends - np.asarray(lengths), ends, np.asarray(labels)], axis=1).astype(np.int64)


def test_spread_order_is_a_seeded_permutation():
    order = spread_order(1000, seed=3)
    assert sorted(order.tolist()) == list(range(1000))
    assert np.array_equal(order, spread_order(1000, seed=3)) and not np.array_equal(order, spread_order(1000, 4))
    assert order[:100].mean() > 300   # not the first items


def test_atlas_budget_spreads_over_each_labels_documents():
    """Two labels of 20 documents x 10 windows; a budget of 20 windows per label. Stream order took them
    all from the first 2 documents of each label; the sample must reach most documents."""
    docs = _docs([320] * 40, [0] * 20 + [1] * 20)
    windows = plan_windows(docs, 32, 2 * 20 * 32)
    assert len(windows) == 40 and (windows[:, 2] == 32).all()
    for label in (0, 1):
        mine = windows[docs[windows[:, 0], 2] == label]
        assert len(mine) == 20
        assert len(set(mine[:, 0].tolist())) >= 10, "windows come from the label's first documents only"
    assert len({(d, s) for d, s, _ in windows.tolist()}) == 40           # no window twice
    assert np.array_equal(windows, plan_windows(docs, 32, 2 * 20 * 32))   # the same on every run
    # Without a budget every window is still taken exactly once.
    full = plan_windows(docs, 32, None)
    assert sorted(map(tuple, full.tolist())) == sorted((d, o, 32) for d in range(40) for o in range(0, 320, 32))


def test_toxicity_correlations_see_both_labels():
    """90 non-toxic documents stored before 10 toxic ones; 10 % of the tokens must include toxic text (in
    stored order none would), in about its share."""
    labels = [0] * 90 + [1] * 10
    docs = _docs([640] * 100, labels)
    windows = correlation_windows(docs, 64, 6400)
    tokens = sum(length for _, _, length in windows)
    assert 6400 <= tokens < 6400 + 64
    toxic = sum(length for doc, _, length in windows if labels[doc] == 1)
    assert 0.03 * tokens < toxic < 0.25 * tokens
    for doc, start, length in windows:   # stream offsets inside their document
        assert docs[doc, 0] <= start and start + length <= docs[doc, 1]
    assert correlation_windows(docs, 64, 6400) == windows

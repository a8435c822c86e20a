"""Statistics of the unlearning protocol: noise floors for "deleting these units costs the target this much".

Pure numpy, no model: the protocol code (`monet.experiments.unlearn`) measures per-window losses and calls
these: paired bootstrap CIs (`delta_ci`), random control masks and their 95th percentile (`random_masks`,
`random_p95`), forget-retain curves compared at equal forgetting (`others_at_target`) and the bar (`verdict`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from monet.errors import MonetError


def _vector(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise MonetError(f"{name} must be a non-empty 1-D sequence, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise MonetError(f"{name} holds non-finite values")
    return array


def delta_ci(before: Sequence[float], after: Sequence[float], tokens: Sequence[float] | None = None,
             reps: int = 2000, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Paired Δ = mean(after) - mean(before) over the same windows, with a bootstrap interval.

    before, after: mean loss (nats/token) of each window, evaluated without and with the edit. Each window
    gives one difference and windows (not tokens: tokens within a window are correlated) are resampled.
    tokens: tokens per window (default: all equal); the estimate is then the token-weighted mean, resampled
    as a ratio of sums. Returns {"delta", "ci95": [lo, hi], "windows", "tokens"}.
    """
    b, a = _vector(before, "before"), _vector(after, "after")
    if b.shape != a.shape:
        raise MonetError(f"before and after must hold the same windows, got {b.size} and {a.size}")
    w = np.ones_like(b) if tokens is None else _vector(tokens, "tokens")
    if w.shape != b.shape or (w <= 0).any():
        raise MonetError("tokens must give a positive count for every window")
    if not 0 < level < 1 or reps < 1:
        raise MonetError(f"need 0 < level < 1 and reps >= 1, got level={level}, reps={reps}")
    diff = (a - b) * w
    delta = float(diff.sum() / w.sum())
    rng = np.random.default_rng(seed)
    index = rng.integers(0, b.size, size=(reps, b.size))
    samples = diff[index].sum(axis=1) / w[index].sum(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return {"delta": delta, "ci95": [float(min(lo, delta)), float(max(hi, delta))], "windows": int(b.size),
            "tokens": float(w.sum())}


def random_masks(counts: Mapping[int, int], seen: Mapping[int, Sequence[int]] | Sequence[Sequence[int]],
                 n: int = 20, seed: int = 0) -> list[dict[int, np.ndarray]]:
    """`n` control masks: group -> sorted unit ids, the same number per group as `counts`, each drawn
    uniformly without replacement from that group's `seen` units (active at least once in the atlas, so a
    control never "deletes" units that never fire)."""
    if n < 1:
        raise MonetError(f"need at least one random mask, got n={n}")
    pools = dict(seen) if isinstance(seen, Mapping) else dict(enumerate(seen))
    draws = {}
    for group, count in sorted(counts.items()):
        pool = np.unique(np.asarray(pools.get(group, ()), dtype=np.int64))
        if count > pool.size:
            raise MonetError(f"group {group}: cannot draw {count} units from the {pool.size} seen in the atlas; "
                             "build the atlas on more tokens or select fewer units")
        draws[group] = pool, int(count)
    rng = np.random.default_rng(seed)
    return [{group: np.sort(rng.choice(pool, size=count, replace=False)) if count else np.zeros(0, np.int64)
             for group, (pool, count) in draws.items()} for _ in range(n)]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (as numpy's)."""
    if not 0 <= q <= 100:
        raise MonetError(f"percentile must lie in [0, 100], got {q}")
    return float(np.percentile(_vector(values, "values"), q))


def random_p95(deltas: Sequence[float]) -> float:
    """95th percentile of the random-control Δ target values: the bar a selection's Δ target must clear."""
    return percentile(deltas, 95.0)


def forget_retain_curve(points: Sequence[Mapping[str, float]]) -> list[dict[str, float]]:
    """Sweep points ({"delta_target", "delta_others", ...}) sorted by Δ target (ties by Δ others)."""
    rows = [dict(p) for p in points]
    for row in rows:
        if not (np.isfinite(row.get("delta_target", np.nan)) and np.isfinite(row.get("delta_others", np.nan))):
            raise MonetError(f"every point needs finite delta_target and delta_others, got {row}")
    return sorted(rows, key=lambda r: (r["delta_target"], r["delta_others"]))


def others_at_target(points: Sequence[Mapping[str, float]], delta_target: float) -> float | None:
    """Δ others that the curve reaches at `delta_target`, by linear interpolation between the two sweep
    points around it (the exact value at a point); None when `delta_target` lies outside the curve."""
    curve = forget_retain_curve(points)
    xs = np.array([p["delta_target"] for p in curve])
    ys = np.array([p["delta_others"] for p in curve])
    if not curve or delta_target < xs[0] or delta_target > xs[-1]:
        return None
    exact = np.flatnonzero(xs == delta_target)   # tied points: the first (lowest Δ others)
    return float(ys[exact[0]] if exact.size else np.interp(delta_target, xs, ys))


def verdict(delta_target: float, delta_others: float, random_p95_value: float, min_delta: float = 0.10,
            ratio: float = 5.0) -> dict[str, bool]:
    """The bar of one label: Δ target >= min_delta, >= ratio x max(Δ others, 0), and above the random
    control's p95."""
    checks = {
        "min_delta": bool(delta_target >= min_delta),
        "selective": bool(delta_target >= ratio * max(delta_others, 0.0)),
        "beats_random": bool(delta_target > random_p95_value),
    }
    checks["passed"] = all(checks.values())
    return checks


__all__ = ["delta_ci", "forget_retain_curve", "others_at_target", "percentile", "random_masks", "random_p95",
           "verdict"]

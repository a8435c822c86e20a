"""Statistics of the unlearning protocol: noise floors for "deleting these units costs the target this much".

Pure numpy, no model: the protocol code (`monet.experiments.unlearn`) measures per-window losses and calls
these: paired bootstrap CIs clustered by document (`delta_ci`), control masks matched on the target's
routing mass and the comparison with them (`matched_masks`, `control_comparison`; the older uniform draws:
`random_masks`, `random_p95`), forget-retain curves compared at equal forgetting (`others_at_target`), the
bars (`verdict` on point estimates, `interval_verdict` on interval bounds) and the grade over seeds
(`replication_grade`).
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
             reps: int = 2000, level: float = 0.95, seed: int = 0, clusters: Sequence[Any] | None = None,
             strata: Sequence[Any] | None = None) -> dict[str, Any]:
    """Paired Δ = mean(after) - mean(before) over the same windows, with a bootstrap interval.

    before, after: mean loss (nats/token) of each window, evaluated without and with the edit. Each window
    gives one difference. tokens: tokens per window (default: all equal); the estimate is the token-weighted
    mean, resampled as a ratio of sums. clusters: the document of each window: whole documents are
    resampled, because windows cut from one file are correlated and resampling them one by one gives an
    interval that is too narrow (default: every window its own cluster). strata: the label of each window:
    clusters are resampled within each stratum and the estimate is the mean of the strata's Δ, each stratum
    weighing the same (Δ others: the mean over the other labels). Returns {"delta", "ci95": [lo, hi],
    "windows", "tokens", "clusters"}.
    """
    b, a = _vector(before, "before"), _vector(after, "after")
    if b.shape != a.shape:
        raise MonetError(f"before and after must hold the same windows, got {b.size} and {a.size}")
    w = np.ones_like(b) if tokens is None else _vector(tokens, "tokens")
    if w.shape != b.shape or (w <= 0).any():
        raise MonetError("tokens must give a positive count for every window")
    if not 0 < level < 1 or reps < 1:
        raise MonetError(f"need 0 < level < 1 and reps >= 1, got level={level}, reps={reps}")
    cluster = _labels(clusters, b.size, "clusters") if clusters is not None else np.arange(b.size)
    stratum = _labels(strata, b.size, "strata") if strata is not None else np.zeros(b.size, np.int64)
    rng = np.random.default_rng(seed)
    estimates, samples, count = [], [], 0
    for s in np.unique(stratum):
        inside = stratum == s
        # Per cluster: the sum of weighted differences and of weights (a ratio of sums per replicate).
        ids, member = np.unique(cluster[inside], return_inverse=True)
        dw = np.bincount(member, weights=((a - b) * w)[inside], minlength=ids.size)
        ws = np.bincount(member, weights=w[inside], minlength=ids.size)
        estimates.append(dw.sum() / ws.sum())
        index = rng.integers(0, ids.size, size=(reps, ids.size))
        samples.append(dw[index].sum(axis=1) / ws[index].sum(axis=1))
        count += ids.size
    delta = float(np.mean(estimates))
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(np.mean(samples, axis=0), [tail, 100 - tail])
    return {"delta": delta, "ci95": [float(min(lo, delta)), float(max(hi, delta))], "windows": int(b.size),
            "tokens": float(w.sum()), "clusters": int(count)}


def _labels(values: Sequence[Any], size: int, name: str) -> np.ndarray:
    """Integer codes of per-window labels (any hashable values: document ids, label names)."""
    array = np.asarray(values)
    if array.shape != (size,):
        raise MonetError(f"{name} must give one value per window ({size}), got shape {array.shape}")
    return np.unique(array, return_inverse=True)[1].reshape(-1)


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


def matched_masks(mass: Sequence[np.ndarray], pools: Sequence[Sequence[int]], selected: Mapping[int, Sequence[int]],
                  n: int = 100, bins: int = 10, seed: int = 0) -> tuple[list[dict[int, np.ndarray]], float]:
    """`n` control masks matched to a selection on the target's routing mass, bin by bin.

    mass[g]: every unit's mass on the target label (the atlas's mean score per token) in group g; pools[g]:
    the units a mask may draw from (seen in the atlas); selected[g]: the selection's units. In each group
    the pool is cut into `bins` equal-count bins by target mass (deciles by rank, ties by unit id, so a
    mass of 0 shared by many units still fills equal bins), and each mask takes, from each bin, as many
    units as the selection has there, uniformly and without replacement among the bin's units that the
    selection does not hold. A bin with too few of those draws from all its units (the selection's too).
    Such masks delete as much of the target's routing as the selection, so what sets the selection apart is
    which units it picked, not how much target mass they carry. Returns (masks, overlap): overlap is the
    share of drawn units that belong to the selection (0 unless some bin was too small).
    """
    if n < 1 or bins < 1:
        raise MonetError(f"need n >= 1 masks and bins >= 1, got n={n}, bins={bins}")
    plans: dict[int, list[tuple[np.ndarray, int]]] = {}
    is_selected: dict[int, np.ndarray] = {}   # group -> [units] bool: a lookup, not a set search per mask
    for group, chosen in sorted(selected.items()):
        values = np.asarray(mass[group], dtype=np.float64)
        chosen, drawable = (np.asarray(ids, dtype=np.int64) for ids in (chosen, pools[group]))
        for ids in (chosen, drawable):
            if ids.size and (ids.min() < 0 or ids.max() >= values.size):
                bad = ids.min() if ids.min() < 0 else ids.max()
                raise MonetError(f"group {group}: unit {bad} has no target mass ({values.size} units)")
        is_selected[group] = np.zeros(values.size, dtype=bool)
        is_selected[group][chosen] = True
        in_pool = is_selected[group].copy()
        in_pool[drawable] = True
        pool = np.flatnonzero(in_pool)   # the union of the two, sorted
        ranked = pool[np.lexsort((pool, values[pool]))]
        plans[group] = []
        for members in np.array_split(ranked, min(bins, max(ranked.size, 1))):
            taken = is_selected[group][members]
            need = int(taken.sum())
            if need:
                free = np.sort(members[~taken])
                plans[group].append((free if free.size >= need else members, need))
    rng = np.random.default_rng(seed)
    masks, overlap, drawn = [], 0, 0
    for _ in range(n):
        mask = {}
        for group, parts in plans.items():
            ids = [rng.choice(members, size=need, replace=False) for members, need in parts]
            mask[group] = np.sort(np.concatenate(ids)) if ids else np.zeros(0, np.int64)
            overlap += int(is_selected[group][mask[group]].sum())
            drawn += mask[group].size
        masks.append(mask)
    return masks, overlap / max(drawn, 1)


def control_comparison(selection_target: float, selection_others: float, target: Sequence[float],
                       others: Sequence[float], level: float = 0.05, neighbours: int = 20) -> dict[str, Any]:
    """Does the selection cost the other labels less than matched random masks that forget as much?

    All values are Δ (masked - unmasked) on the same windows: the selection's (Δ target, Δ others) and each
    control mask's. `dominated_by` is the share of masks at least as good on both counts (Δ target >= the
    selection's and Δ others <= the selection's), as a permutation p-value (1 + k) / (1 + n); the selection
    beats the control when it is below `level`. `others_near` is the median Δ others of the `neighbours`
    masks closest in Δ target (the matched masks' cost at a similar Δ target), beside the selection's.
    """
    t, o = _vector(target, "control Δ target"), _vector(others, "control Δ others")
    if t.shape != o.shape:
        raise MonetError(f"control Δ target and Δ others must have one value per mask, got {t.size} and {o.size}")
    dominated = int(((t >= selection_target) & (o <= selection_others)).sum())
    p_value = (1 + dominated) / (1 + t.size)
    near = np.argsort(np.abs(t - selection_target), kind="stable")[:neighbours]
    return {
        "masks": int(t.size),
        "selection_delta_target": float(selection_target), "selection_delta_others": float(selection_others),
        "delta_target_p95": percentile(t, 95.0), "delta_others_median": float(np.median(o)),
        "dominating_masks": dominated, "p_value": float(p_value),
        "others_near": float(np.median(o[near])), "target_near": [float(t[near].min()), float(t[near].max())],
        "selection_below": bool(p_value < level),
    }


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
    """The point-estimate bar of one label: Δ target >= min_delta, >= ratio x max(Δ others, 0), and above
    the random control's p95."""
    checks = {
        "min_delta": bool(delta_target >= min_delta),
        "selective": bool(delta_target >= ratio * max(delta_others, 0.0)),
        "beats_random": bool(delta_target > random_p95_value),
    }
    checks["passed"] = all(checks.values())
    return checks


GRADES = ("robust", "marginal", "failing")


def interval_verdict(target_ci: Sequence[float], others_ci: Sequence[float], delta_target: float,
                     delta_others: float, control: bool | None, min_delta: float = 0.10,
                     ratio: float = 5.0) -> dict[str, Any]:
    """The bar on interval bounds (issue 23) and its grade for one label on one run.

    robust: the lower bound of Δ target clears both bars (Δt_lo >= min_delta and Δt_lo >= ratio x
    max(Δo_hi, 0): the worst case of the target's loss against the worst case of the others') and the
    control does not match the selection (`control`: `control_comparison`'s selection_below; None when no
    control ran, which cannot be robust). marginal: the point estimates clear both bars but the bounds do
    not. failing: the point estimates do not.
    """
    lo, hi = float(target_ci[0]), float(others_ci[1])
    checks = {"min_delta_lo": bool(lo >= min_delta), "selective_lo": bool(lo >= ratio * max(hi, 0.0)),
              "control": control}
    point = delta_target >= min_delta and delta_target >= ratio * max(delta_others, 0.0)
    if checks["min_delta_lo"] and checks["selective_lo"] and control:
        grade = "robust"
    else:
        grade = "marginal" if point else "failing"
    return {**checks, "grade": grade}


def replication_grade(grades: Sequence[str], robust_share: float = 0.75) -> str:
    """One label over seeds (the pre-registration, benchmarks/unlearning/PREREGISTRATION.md): robust when
    robust on at least `robust_share` of the seeds (3 of 4), failing when failing on at least half, marginal
    otherwise."""
    if not grades or any(g not in GRADES for g in grades):
        raise MonetError(f"need per-seed grades among {', '.join(GRADES)}, got {list(grades)}")
    if sum(g == "robust" for g in grades) >= robust_share * len(grades):
        return "robust"
    return "failing" if sum(g == "failing" for g in grades) >= len(grades) / 2 else "marginal"


__all__ = ["GRADES", "control_comparison", "delta_ci", "forget_retain_curve", "interval_verdict", "matched_masks",
           "others_at_target", "percentile", "random_masks", "random_p95", "replication_grade", "verdict"]

"""Which experts to edit: selection criteria on routing statistics (paper §5, appendix D).

Pure functions on numpy arrays, so they work the same on an atlas's statistics, on statistics measured
on the fly, and on a dense model's neurons (a "unit" is an expert of a routing group or a neuron):
domain / language experts by skewness of their per-label routing mass (D.1, D.2), toxic experts by the
Pearson correlation of their routing score with a per-token toxicity score (D.3), and a `Selection` of
units per group with its masking ratio (selected / (groups x N)).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from monet.edits import ExpertEdits
from monet.errors import MonetError


def _check_mass(mass: np.ndarray) -> np.ndarray:
    mass = np.asarray(mass, dtype=np.float64)
    if mass.ndim != 2 or mass.shape[0] < 2:
        raise MonetError(f"label mass must be [num_labels >= 2, units], got shape {mass.shape}: the skewness "
                         "criterion compares a label with the others")
    if not np.isfinite(mass).all() or (mass < 0).any():
        raise MonetError("label mass must be finite and non-negative (routing scores summed per label)")
    return mass


def label_means(mass: np.ndarray) -> np.ndarray:
    """Each label's row divided by its total: comparable across labels with different token counts (every
    token spreads the same mass H over its experts, so the normalised row is the mean score per token / H).
    A label with no mass at all stays zero."""
    mass = _check_mass(mass)
    totals = mass.sum(axis=1, keepdims=True)
    return np.divide(mass, totals, out=np.zeros_like(mass), where=totals > 0)


def skewness(values: np.ndarray, target: int) -> np.ndarray:
    """[units]: values[target] / the largest value on any other label (paper §5.1 / D.1: a unit is
    specialised in a label when this is at least 2); inf where the others are all 0, 0 where the target is.
    `values` [num_labels, units] are per-label means (routing probability per token of the label)."""
    values = np.asarray(values, dtype=np.float64)
    others = np.delete(values, target, axis=0).max(axis=0) if values.shape[0] > 1 else np.zeros(values.shape[1])
    ratio = np.divide(values[target], others, out=np.full(values.shape[1], np.inf), where=others > 0)
    return np.where(values[target] > 0, ratio, 0.0)


def specificity(mass: np.ndarray, target: int, normalize: bool = True) -> np.ndarray:
    """`skewness` of routing mass per label, first divided by each label's total (`label_means`) unless
    `normalize` is False (the values are already per-label means)."""
    mass = _check_mass(mass)
    if not 0 <= target < mass.shape[0]:
        raise MonetError(f"target label index {target} is out of range for {mass.shape[0]} labels")
    return skewness(label_means(mass) if normalize else mass, target)


def skewed_units(mass: np.ndarray, target: int, ratio: float = 2.0, min_mass: float = 0.0,
                 normalize: bool = True) -> np.ndarray:
    """Ids of units whose (normalised) mass on `target` is >= `ratio` x their mass on every other label;
    `min_mass` is the smallest raw mass on the target label for a unit to be judged at all."""
    if ratio < 1.0:
        raise MonetError(f"skewness ratio must be >= 1 (a unit is assigned to one label at most), got {ratio}")
    mass = _check_mass(mass)
    spec = specificity(mass, target, normalize)
    return np.flatnonzero((spec >= ratio) & (mass[target] > 0) & (mass[target] >= min_mass))


def top_specific(mass: np.ndarray, target: int, n: int, min_mass: float = 0.0, normalize: bool = True) -> np.ndarray:
    """The `n` units most specific to `target` (highest specificity, ties by more target mass)."""
    if n < 0:
        raise MonetError(f"n must be >= 0, got {n}")
    mass = _check_mass(mass)
    spec = specificity(mass, target, normalize)
    eligible = np.flatnonzero((mass[target] > 0) & (mass[target] >= min_mass))
    order = np.lexsort((-mass[target][eligible], -spec[eligible]))
    return eligible[order[:n]]


# --------------------------------------------------------------------- correlation with a per-token score (toxicity)

class PearsonAccumulator:
    """Streaming Pearson correlation of every unit's per-token score x with one per-token score y.

    x is a unit's routing score on a token, 0 when the unit is not active there. Per unit we keep Σx,
    Σx², Σxy (touched only by active pairs); n, Σy, Σy² are shared by all units.
    """

    _SUMS = ("sum_x", "sum_xx", "sum_xy", "n", "sum_y", "sum_yy")

    def __init__(self, units: int) -> None:
        self.units = int(units)
        self.sum_x, self.sum_xx, self.sum_xy = (np.zeros(self.units) for _ in range(3))
        self.n, self.sum_y, self.sum_yy = 0, 0.0, 0.0

    def update(self, token: np.ndarray, ids: np.ndarray, scores: np.ndarray, y: np.ndarray) -> None:
        """Add the tokens of y [tokens]: one row per (token, active unit), `token` indexing y (each unit at
        most once per token, as `Units` entries are)."""
        token, ids = np.asarray(token, dtype=np.int64), np.asarray(ids, dtype=np.int64)
        x, y = np.asarray(scores, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if not token.shape == ids.shape == x.shape or token.ndim != 1 or y.ndim != 1:
            raise MonetError(f"expected token, ids, scores [entries] and y [tokens], got {token.shape}, {ids.shape}, "
                             f"{x.shape}, {y.shape}")
        if ids.size and int(ids.max()) >= self.units:
            raise MonetError(f"unit id {int(ids.max())} is out of range for {self.units} units")
        self.n += len(y)
        self.sum_y += float(y.sum())
        self.sum_yy += float((y * y).sum())
        self.sum_x += np.bincount(ids, weights=x, minlength=self.units)
        self.sum_xx += np.bincount(ids, weights=x * x, minlength=self.units)
        self.sum_xy += np.bincount(ids, weights=x * y[token], minlength=self.units)

    def merge(self, other: PearsonAccumulator) -> PearsonAccumulator:
        """Add another accumulator's sums (e.g. from another process)."""
        if other.units != self.units:
            raise MonetError(f"cannot merge accumulators of {self.units} and {other.units} units")
        for name in self._SUMS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def correlation(self) -> np.ndarray:
        """Pearson r per unit (0 for a unit never active, or when y is constant)."""
        n = float(self.n)
        cov = n * self.sum_xy - self.sum_x * self.sum_y
        var_x = n * self.sum_xx - self.sum_x**2
        var_y = n * self.sum_yy - self.sum_y**2
        denominator = np.sqrt(np.clip(var_x, 0.0, None) * max(var_y, 0.0))
        return np.divide(cov, denominator, out=np.zeros(self.units), where=denominator > 1e-12 * max(n, 1.0) ** 2)


def correlated_units(correlation: np.ndarray, threshold: float) -> np.ndarray:
    """Ids of units with correlation >= threshold (the paper masks at 0.2, 0.1, 0.05)."""
    if not -1.0 <= threshold <= 1.0:
        raise MonetError(f"correlation threshold must lie in [-1, 1], got {threshold}")
    return np.flatnonzero(np.asarray(correlation) >= threshold)


# ------------------------------------------------------------------------------------------- a selection over groups

@dataclass
class Selection:
    """Selected unit ids per group (routing group for Monet, layer for a dense model)."""

    units_per_group: int
    groups: int
    ids: dict[int, np.ndarray] = field(default_factory=dict)
    criterion: str = ""

    def counts(self) -> dict[int, int]:
        return {g: len(self.ids.get(g, ())) for g in range(self.groups)}

    @property
    def total(self) -> int:
        return sum(self.counts().values())

    @property
    def masking_ratio(self) -> float:
        """selected / (groups x units per group)."""
        return self.total / max(1, self.groups * self.units_per_group)

    def summary(self) -> dict:
        return {"criterion": self.criterion, "selected_per_group": {str(g): c for g, c in self.counts().items()},
                "selected": self.total, "units_per_group": self.units_per_group, "groups": self.groups,
                "masking_ratio": self.masking_ratio}

    def to_edits(self, num_experts: int):
        """Delete every selected expert: an `ExpertEdits` for a Monet model with E = num_experts."""
        if num_experts * num_experts != self.units_per_group:
            raise MonetError(f"this selection has {self.units_per_group} units per group, not E^2 = "
                             f"{num_experts * num_experts}: it was not made for this model")
        edits = ExpertEdits(num_experts=num_experts, num_groups=self.groups)
        for group, ids in self.ids.items():
            edits.delete(group, ids)
        return edits


def _per_group(values: list, criterion: str, pick: Callable[[np.ndarray], np.ndarray]) -> Selection:
    """A `Selection` with `pick(values[g])` as group g's unit ids (values[g] has the units on its last axis)."""
    if not values:
        raise MonetError("no groups to select from")
    return Selection(units_per_group=np.asarray(values[0]).shape[-1], groups=len(values),
                     ids={group: pick(value) for group, value in enumerate(values)}, criterion=criterion)


def select_skewed(masses: list[np.ndarray], target: int, ratio: float = 2.0, min_mass: float = 0.0,
                  normalize: bool = True) -> Selection:
    """`skewed_units` in every group; masses[g] is group g's [num_labels, units] label mass."""
    return _per_group(masses, f"skewness >= {ratio} (min mass {min_mass})",
                      lambda mass: skewed_units(mass, target, ratio, min_mass, normalize))


def select_correlated(correlations: list[np.ndarray], threshold: float) -> Selection:
    """`correlated_units` in every group; correlations[g] is group g's [units] Pearson r."""
    return _per_group(correlations, f"correlation >= {threshold}", lambda corr: correlated_units(corr, threshold))


def select_top(masses: list[np.ndarray], target: int, n: int, min_mass: float = 0.0,
               normalize: bool = True) -> Selection:
    """`top_specific` in every group (n per group)."""
    return _per_group(masses, f"top {n} by specificity",
                      lambda mass: top_specific(mass, target, n, min_mass, normalize))


__all__ = ["PearsonAccumulator", "Selection", "correlated_units", "label_means", "select_correlated",
           "select_skewed", "select_top", "skewness", "skewed_units", "specificity", "top_specific"]

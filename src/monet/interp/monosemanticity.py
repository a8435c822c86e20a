"""Monosemanticity measures per expert (or per dense neuron), from routing mass per label.

For unit u and label l let p_l(u) = (summed score of u on tokens of label l) / (tokens of label l),
the unit's mean routing probability on that label. Then

- skewness_l(u) = p_l(u) / max_{l' != l} p_l'(u): paper §5.1 / appendix D.1 call a unit specialised in
  l when it is at least 2 ("at least twice that of the second most activated domain");
- purity(u) = max_l share_l(u) with share = p / sum_l p (1/num_labels for a unit that ignores labels);
- entropy(u) = -sum_l share_l log2 share_l (0 for a single-label unit, log2(num_labels) for uniform).

`measure(model, dataset)` computes these for a Monet model (per routing group) or a dense LLaMA
baseline (per layer, over its MLP neurons), so the two can be compared on the same data.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from monet.interp.atlas import AtlasOptions, collect, label_tokens, plan_windows
from monet.interp.criteria import skewness
from monet.interp.units import units_of

SPECIALISED_SKEW = 2.0


def label_shares(prob: np.ndarray) -> np.ndarray:
    total = prob.sum(axis=0, keepdims=True)
    return np.divide(prob, total, out=np.zeros_like(prob), where=total > 0)


def purity(prob: np.ndarray) -> np.ndarray:
    return label_shares(prob).max(axis=0)


def entropy(prob: np.ndarray) -> np.ndarray:
    shares = label_shares(prob)
    return -(shares * np.log2(np.where(shares > 0, shares, 1.0))).sum(axis=0)


def summarize(mass: np.ndarray, label_tokens: np.ndarray, labels: list[str], count: np.ndarray | None = None,
              min_count: int = 10, skew: float = SPECIALISED_SKEW) -> dict[str, Any]:
    """Summary of one group/layer: mean purity and entropy over units seen at least `min_count` times,
    and per label the share (of all units) and number specialised at `skew`x."""
    prob = mass / np.maximum(np.asarray(label_tokens, np.float64), 1.0)[:, None]
    seen = (count >= min_count) if count is not None else prob.sum(axis=0) > 0
    units = prob.shape[1]
    specialised = {label: int(((skewness(prob, index) >= skew) & seen).sum()) for index, label in enumerate(labels)}
    per_label = {label: {"experts": n, "share": n / max(units, 1)} for label, n in specialised.items()}
    return {
        "units": units, "units_seen": int(seen.sum()),
        "mean_purity": float(purity(prob)[seen].mean()) if seen.any() else 0.0,
        "mean_entropy_bits": float(entropy(prob)[seen].mean()) if seen.any() else 0.0,
        "max_entropy_bits": float(np.log2(len(labels))) if labels else 0.0,
        "specialised": per_label,
        "mean_specialised_share": float(np.mean([v["share"] for v in per_label.values()])) if labels else 0.0,
    }


def summarize_atlas(atlas, min_count: int = 10) -> list[dict[str, Any]]:
    """`summarize` for every group of an atlas."""
    out = []
    for group in atlas.groups:
        labels, mass = atlas.label_mass(group)
        out.append({"group": group, **summarize(mass, atlas.label_tokens, labels,
                                                atlas._group(group)["count"], min_count)})
    return out


def measure(model, dataset, max_tokens: int = 200_000, seq_len: int = 256, batch_size: int = 8,
            min_count: int = 10, progress: bool = True) -> dict[str, Any]:
    """Monosemanticity of a Monet model (per routing group) or a dense model (per layer) on `dataset`."""
    limit = getattr(model.config, "max_position_embeddings", seq_len) or seq_len
    options = AtlasOptions(max_tokens=max_tokens, top_k=1, seq_len=min(seq_len, limit), batch_size=batch_size)
    windows = plan_windows(dataset.docs, options.seq_len, options.max_tokens)
    stats, tokens = collect(model, dataset, options, windows, progress=progress)
    per_token = label_tokens(dataset, windows)
    groups = [{"group": g, **summarize(s.mass, per_token, dataset.labels, s.count, min_count)}
              for g, s in enumerate(stats)]
    return {"kind": units_of(model).kind, "tokens": tokens, "labels": list(dataset.labels), "groups": groups,
            "mean_specialised_share": float(np.mean([g["mean_specialised_share"] for g in groups])),
            "mean_purity": float(np.mean([g["mean_purity"] for g in groups]))}


__all__ = ["SPECIALISED_SKEW", "entropy", "label_shares", "measure", "purity", "summarize",
           "summarize_atlas"]

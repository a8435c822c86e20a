"""Fairer dense baselines for the unlearning protocol (issue 23, item 4).

The dense baseline of `monet unlearn` ranks neurons by the specificity of the positive part of
act(gate(x)) * up(x) (from the atlas) and zeroes them. A reviewer's objections: the positive part ignores
neurons that carry a language by their sign, specificity favours near-silent neurons, and zero is not
a neutral value for a neuron whose mean is far from 0. Here:

* `neuron_label_means`: each neuron's **signed** mean input to `down_proj` per label (and over all
  tokens), measured on training windows;
* `class_mean_difference`: the rule "mean on the target minus the mean of the other labels' means";
* `mean_ablated`: replace the chosen neurons' inputs by their mean over all tokens instead of 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from monet.errors import MonetError


def _dense_layers(model: nn.Module) -> list[nn.Module]:
    layers = [getattr(layer, "mlp", None) for layer in model.model.layers]
    if not all(hasattr(mlp, "down_proj") for mlp in layers):
        raise MonetError("dense neuron rules need an mlp_type='dense' model (an MLP with down_proj per layer)")
    return layers


@torch.no_grad()
def neuron_label_means(model: nn.Module, dataset: Any, windows: np.ndarray, batch_size: int = 16
                       ) -> tuple[list[np.ndarray], np.ndarray]:
    """(per layer [num_labels, width] signed mean of each neuron's down_proj input per token of each label,
    token counts per label). `windows`: [n, 3] (doc, start in the document, length) rows, e.g. from
    `plan_windows` on the training split; a token's label is its document's."""
    mlps = _dense_layers(model)
    num_labels = len(dataset.labels)
    sums = [np.zeros((num_labels, mlp.down_proj.in_features)) for mlp in mlps]
    counts = np.zeros(num_labels)
    captured: list[torch.Tensor] = []
    hooks = [mlp.down_proj.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
             for mlp in mlps]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(windows), batch_size):
            chunk = windows[first:first + batch_size]
            width = int(chunk[:, 2].max())
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            real = torch.zeros((len(chunk), width), dtype=torch.bool)
            labels = torch.zeros(len(chunk), dtype=torch.long)
            for row, (doc, start, length) in enumerate(chunk.tolist()):
                begin = int(dataset.docs[doc, 0]) + start
                ids[row, :length] = torch.from_numpy(np.asarray(dataset.tokens[begin:begin + length], dtype=np.int64))
                real[row, :length] = True
                labels[row] = int(dataset.docs[doc, 2])
            captured.clear()
            model(input_ids=ids.to(device), use_cache=False)   # right padding: real tokens are unaffected
            onehot = torch.nn.functional.one_hot(labels, num_labels).double()                   # [B, labels]
            weights = (real.double()[:, :, None] * onehot[:, None, :]).reshape(-1, num_labels)  # [B*T, labels]
            for layer, acts in enumerate(captured):
                sums[layer] += (weights.T @ acts.reshape(-1, acts.shape[-1]).double().cpu()).numpy()
            counts += weights.sum(0).numpy()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    safe = np.maximum(counts, 1)[:, None]
    return [s / safe for s in sums], counts


def class_mean_difference(means: np.ndarray, target: int, counts: np.ndarray | None = None) -> np.ndarray:
    """[units] score of the rule: the target's mean minus the mean of the other labels' means (labels
    without tokens, per `counts`, left out). Signed: a neuron that carries the target by being low
    elsewhere counts as much as one that fires on it."""
    means = np.asarray(means, dtype=np.float64)
    others = [i for i in range(len(means)) if i != target and (counts is None or counts[i] > 0)]
    if not others:
        raise MonetError("the class-mean difference needs tokens of at least one other label")
    return means[target] - means[others].mean(axis=0)


def top_by_score(scores: list[np.ndarray], n: int) -> dict[int, np.ndarray]:
    """Per layer the `n` units with the highest score (ties: lower id first), sorted."""
    return {layer: np.sort(np.argsort(-s, kind="stable")[:n]) for layer, s in enumerate(scores)}


def overall_means(means: list[np.ndarray], counts: np.ndarray) -> list[np.ndarray]:
    """Per layer [width]: each neuron's mean input over all tokens (the label means weighted by tokens)."""
    weights = np.asarray(counts, dtype=np.float64) / max(float(np.sum(counts)), 1.0)
    return [weights @ m for m in means]


@contextmanager
def mean_ablated(model: nn.Module, neurons: dict[int, np.ndarray], means: list[np.ndarray]) -> Iterator[nn.Module]:
    """Replace the chosen neurons' down_proj inputs (layer -> ids) by their mean (`means[layer]`) inside
    the block: the neuron keeps its average contribution and loses only what varies with the input."""
    mlps = _dense_layers(model)
    handles = []
    try:
        for layer, ids in neurons.items():
            if len(ids) == 0:
                continue
            down = mlps[layer].down_proj
            index = torch.as_tensor(np.asarray(ids), dtype=torch.long, device=down.weight.device)
            value = torch.as_tensor(np.asarray(means[layer])[np.asarray(ids)], device=down.weight.device)

            def hook(module, args, index=index, value=value):
                x = args[0].clone()
                x[..., index] = value.to(x.dtype)
                return (x,) + tuple(args[1:])

            handles.append(down.register_forward_pre_hook(hook))
        yield model
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["class_mean_difference", "mean_ablated", "neuron_label_means", "overall_means", "top_by_score"]

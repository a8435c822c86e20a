"""Fairer dense baselines for the unlearning protocol (issue 23, item 4).

The dense baseline of `monet unlearn` ranks neurons by the specificity of the positive part of
act(gate(x)) * up(x) (from the atlas) and zeroes them. A reviewer's objections: the positive part ignores
neurons that carry a language by their sign, specificity favours near-silent neurons, and zero is not
a neutral value for a neuron whose mean is far from 0. Here:

* `neuron_label_means`: each neuron's **signed** mean input to `down_proj` per label (and over all
  tokens), measured on training windows;
* `class_mean_difference`: the rule "mean on the target minus the mean of the other labels' means";
* `mean_ablated`: replace the chosen neurons' inputs by their mean over all tokens instead of 0;
* `neuron_attributions` / `attribution_rises`: attribution patching (activation x gradient of the loss), the
  first-order estimate of how much each label's loss rises when a neuron is ablated; the rule ranks neurons
  by the target's estimated rise minus the other labels' mean (`class_mean_difference` of the rises).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from monet.errors import MonetError
from monet.model import causal_lm_loss


def dense_layers(model: nn.Module) -> list[nn.Module]:
    """Each layer's dense MLP (a clear error for a Monet or PEER model)."""
    layers = [getattr(layer, "mlp", None) for layer in model.model.layers]
    if not all(hasattr(mlp, "down_proj") for mlp in layers):
        raise MonetError("dense neuron rules need an mlp_type='dense' model (an MLP with down_proj per layer)")
    return layers


def window_batches(dataset: Any, windows: np.ndarray, batch_size: int
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(ids [B, T], real [B, T] bool, labels [B]) per batch of `windows` ([n, 3] (doc, start in the document,
    length) rows of a TokenDataset-like `dataset`), right-padded with token 0 to the batch's longest window
    (causal attention: padding after a token does not change it)."""
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
        yield ids, real, labels


@torch.no_grad()
def neuron_label_means(model: nn.Module, dataset: Any, windows: np.ndarray, batch_size: int = 16
                       ) -> tuple[list[np.ndarray], np.ndarray]:
    """(per layer [num_labels, width] signed mean of each neuron's down_proj input per token of each label,
    token counts per label). `windows`: [n, 3] (doc, start in the document, length) rows, e.g. from
    `plan_windows` on the training split; a token's label is its document's."""
    downs = [mlp.down_proj for mlp in dense_layers(model)]
    return label_means(model, dataset, windows, downs, [down.in_features for down in downs],
                       lambda layer, acts: acts, batch_size, read_input=True)


@torch.no_grad()
def label_means(model: nn.Module, dataset: Any, windows: np.ndarray, modules: list[nn.Module], widths: list[int],
                features: Callable[[int, torch.Tensor], torch.Tensor], batch_size: int = 16,
                read_input: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
    """(per module [num_labels, width] mean of `features(index, tensor)` per real token of each label, token
    counts per label): the tensor is each module's output (its input with `read_input`), captured by a hook
    while the windows (rows as for `neuron_label_means`) run through the model in evaluation mode."""
    num_labels = len(dataset.labels)
    sums = [np.zeros((num_labels, width)) for width in widths]
    counts = np.zeros(num_labels)
    captured: list[torch.Tensor] = []
    hooks = [module.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
             if read_input else
             module.register_forward_hook(lambda module, args, out: captured.append(out.detach()))
             for module in modules]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for ids, real, labels in window_batches(dataset, windows, batch_size):
            captured.clear()
            model(input_ids=ids.to(device), use_cache=False)   # right padding: real tokens are unaffected
            onehot = torch.nn.functional.one_hot(labels, num_labels).double()                   # [B, labels]
            weights = (real.double()[:, :, None] * onehot[:, None, :]).reshape(-1, num_labels)  # [B*T, labels]
            for index, tensor in enumerate(captured):
                values = features(index, tensor).reshape(-1, widths[index]).double().cpu()
                sums[index] += (weights.T @ values).numpy()
            counts += weights.sum(0).numpy()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    safe = np.maximum(counts, 1)[:, None]
    return [s / safe for s in sums], counts


def neuron_attributions(model: nn.Module, dataset: Any, windows: np.ndarray, batch_size: int = 16
                        ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Attribution patching on each neuron's down_proj input a: (per layer [num_labels, width] sums of
    a * dL/da, per layer [num_labels, width] sums of dL/da, loss terms per label). L is the summed next-token
    loss of a window (so dL/da at a position includes its effect on every later prediction); the gradient is
    taken through a zero added to a, so the model's parameters need not require grad and collect none.
    `windows` as for `neuron_label_means`; every position of a window counts towards its document's label."""
    mlps = dense_layers(model)
    num_labels = len(dataset.labels)
    ag = [np.zeros((num_labels, mlp.down_proj.in_features)) for mlp in mlps]
    g = [np.zeros((num_labels, mlp.down_proj.in_features)) for mlp in mlps]
    terms = np.zeros(num_labels)
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple) -> tuple:
        zero = torch.zeros_like(args[0], requires_grad=True)
        captured.append((args[0].detach(), zero))
        return (args[0] + zero,) + tuple(args[1:])

    hooks = [mlp.down_proj.register_forward_pre_hook(hook) for mlp in mlps]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for ids, real, labels in window_batches(dataset, windows, batch_size):
                captured.clear()
                ids = ids.to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                loss = causal_lm_loss(logits, ids.masked_fill(~real.to(device), -100), reduction="sum")
                grads = torch.autograd.grad(loss, [zero for _, zero in captured])
                onehot = torch.nn.functional.one_hot(labels, num_labels).double()            # [B, labels]
                for layer, ((acts, _), grad) in enumerate(zip(captured, grads, strict=True)):
                    # padding only feeds ignored predictions, so its gradient is 0 and it adds nothing
                    ag[layer] += (onehot.T @ (acts * grad).sum(1).double().cpu()).numpy()
                    g[layer] += (onehot.T @ grad.sum(1).double().cpu()).numpy()
                terms += (onehot.T @ real[:, 1:].sum(1).double()).numpy()
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    return ag, g, terms


def attribution_rises(ag: list[np.ndarray], g: list[np.ndarray], terms: np.ndarray,
                      centre: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Per layer [num_labels, width]: the first-order estimate of each label's per-token loss rise when a
    neuron's input is replaced by `centre[layer]` (mean ablation) or 0 (None): L(c) - L(a) ~ (c - a) dL/da,
    summed over positions and divided by the label's loss terms. Ranking neurons by `class_mean_difference`
    of these rises is the attribution rule: the estimated cost to the target minus the others' mean."""
    safe = np.maximum(np.asarray(terms, dtype=np.float64), 1)[:, None]
    if centre is None:
        return [-s / safe for s in ag]
    return [(np.asarray(c)[None, :] * grad - s) / safe for s, grad, c in zip(ag, g, centre, strict=True)]


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
    mlps = dense_layers(model)
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


__all__ = ["attribution_rises", "class_mean_difference", "dense_layers", "label_means", "mean_ablated",
           "neuron_attributions", "neuron_label_means", "overall_means", "top_by_score", "window_batches"]

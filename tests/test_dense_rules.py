"""Fairer dense baselines (issue 23, item 4): signed neuron means, class-mean difference, mean ablation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import monet
from monet.errors import MonetError
from monet.experiments.dense_rules import (
    attribution_rises,
    class_mean_difference,
    mean_ablated,
    neuron_attributions,
    neuron_label_means,
    overall_means,
    top_by_score,
)


def test_class_mean_difference_is_signed_and_skips_empty_labels():
    means = np.array([[1.0, 0.0, -2.0, 5.0],     # target
                      [0.0, 0.0, -4.0, 5.0],
                      [0.0, 2.0, -4.0, 5.0],
                      [9.0, 9.0, 9.0, 9.0]])      # a label without tokens
    counts = np.array([10, 10, 10, 0])
    score = class_mean_difference(means, 0, counts)
    assert score == pytest.approx([1.0, -1.0, 2.0, 0.0])   # neuron 2: less negative on the target counts too
    assert top_by_score([score], 2)[0].tolist() == [0, 2]
    with pytest.raises(MonetError, match="at least one other label"):
        class_mean_difference(means[:1], 0)


class _Tokens:
    """What `neuron_label_means` reads of a TokenDataset."""

    def __init__(self, docs: list[list[int]], labels: list[int]) -> None:
        lengths = np.array([len(d) for d in docs])
        ends = np.cumsum(lengths)
        self.docs = np.stack([ends - lengths, ends, np.array(labels)], axis=1)
        self.tokens = np.concatenate([np.array(d) for d in docs])
        self.labels = ["a", "b", "c"]


def test_neuron_label_means_equal_a_per_window_computation():
    torch.manual_seed(0)
    model = monet.MonetForCausalLM(monet.preset("tiny", mlp_type="dense")).eval()
    rng = np.random.default_rng(0)
    data = _Tokens([rng.integers(3, 200, n).tolist() for n in (9, 5, 12, 7)], [0, 1, 0, 1])
    windows = np.array([[0, 0, 6], [0, 6, 3], [1, 0, 5], [2, 2, 8], [3, 0, 7]])
    means, counts = neuron_label_means(model, data, windows, batch_size=2)
    assert counts.tolist() == [6 + 3 + 8, 5 + 7, 0]
    want = [np.zeros((3, m.shape[1])) for m in means]
    seen: list[torch.Tensor] = []
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
             for layer in model.model.layers]
    for doc, start, length in windows.tolist():
        begin = int(data.docs[doc, 0]) + start
        seen.clear()
        with torch.no_grad():
            model(input_ids=torch.tensor(data.tokens[begin:begin + length])[None])
        for layer, acts in enumerate(seen):
            want[layer][data.docs[doc, 2]] += acts[0].double().sum(0).numpy()
    for hook in hooks:
        hook.remove()
    for got, total in zip(means, want, strict=True):
        np.testing.assert_allclose(got[:2], total[:2] / counts[:2, None], rtol=1e-4, atol=1e-5)
        assert (got[2] == 0).all()
    centre = overall_means(means, counts)   # every token weighs the same, whatever its label
    np.testing.assert_allclose(centre[0], want[0].sum(0) / counts.sum(), rtol=1e-4, atol=1e-5)
    with pytest.raises(MonetError, match="dense"):
        neuron_label_means(monet.MonetForCausalLM(monet.preset("tiny")), data, windows)


def test_mean_ablation_replaces_inputs_by_their_means():
    """Mean ablation of neurons i equals zeroing their down_proj columns and adding W[:, i] @ mean_i."""
    torch.manual_seed(1)
    model = monet.MonetForCausalLM(monet.preset("tiny", mlp_type="dense")).eval()
    ids = torch.randint(3, 256, (2, 7))
    width = model.model.layers[0].mlp.down_proj.in_features
    means = [np.linspace(-1, 1, width) for _ in model.model.layers]
    chosen = {0: np.array([1, 5, 9]), 1: np.array([0])}
    with torch.no_grad(), mean_ablated(model, chosen, means):
        got = model(ids).logits
    reference = monet.MonetForCausalLM(model.config).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer, neurons in chosen.items():
            down = reference.model.layers[layer].mlp.down_proj
            shift = down.weight[:, neurons] @ torch.tensor(means[layer][neurons], dtype=down.weight.dtype)
            down.weight[:, neurons] = 0.0
            down.bias = torch.nn.Parameter(shift if down.bias is None else down.bias + shift)
        torch.testing.assert_close(got, reference(ids).logits)
        assert not torch.allclose(model(ids).logits, got)   # hooks removed


def test_attribution_is_the_first_order_loss_change_of_an_ablation():
    """Sum over windows of (c - a) dL/da equals d/de of the summed loss when a neuron's input moves to
    a + e (c - a) (finite difference, float64): the rule ranks by an estimate of the ablation it applies."""
    torch.manual_seed(2)
    model = monet.MonetForCausalLM(monet.preset("tiny", mlp_type="dense")).double().eval()
    for p in model.parameters():
        p.requires_grad_(False)   # the gradient goes through the activations, not the weights
    rng = np.random.default_rng(1)
    data = _Tokens([rng.integers(3, 200, n).tolist() for n in (9, 5, 12, 7)], [0, 1, 0, 2])
    windows = np.array([[0, 0, 6], [1, 0, 5], [2, 2, 8], [3, 0, 7], [0, 6, 3]])
    ag, g, terms = neuron_attributions(model, data, windows, batch_size=2)
    assert terms.tolist() == [5 + 7 + 2, 4, 6]
    width = ag[0].shape[1]
    centre = [np.linspace(-0.5, 0.5, width) for _ in ag]

    def summed_loss(layer: int, neuron: int, eps: float, label: int) -> float:
        down = model.model.layers[layer].mlp.down_proj

        def hook(module, args):
            x = args[0].clone()
            value = torch.tensor(centre[layer][neuron], dtype=x.dtype)
            x[..., neuron] = x[..., neuron] + eps * (value - x[..., neuron])
            return (x,)

        handle = down.register_forward_pre_hook(hook)
        total = 0.0
        with torch.no_grad():
            for doc, start, length in windows.tolist():
                if data.docs[doc, 2] != label:
                    continue
                begin = int(data.docs[doc, 0]) + start
                ids = torch.tensor(data.tokens[begin:begin + length])[None]
                hidden = model.model(input_ids=ids).last_hidden_state   # float64 (the model's logits are float32)
                logits = model.lm_head(hidden)[0, :-1]
                total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        handle.remove()
        return total

    rises = attribution_rises(ag, g, terms, centre)
    zero_rises = attribution_rises(ag, g, terms)
    for layer, neuron, label in [(0, 3, 0), (1, 17, 1), (1, 40, 2), (0, width - 1, 0)]:
        eps = 1e-3   # above the float32 rounding of attention and logits, small enough for O(eps^2)
        slope = (summed_loss(layer, neuron, eps, label) - summed_loss(layer, neuron, -eps, label)) / (2 * eps)
        assert rises[layer][label, neuron] * terms[label] == pytest.approx(slope, rel=1e-3)
        assert abs(slope) > 1e-6   # the neuron matters, so the comparison means something
    # zero ablation: c = 0, the estimate is -a dL/da
    np.testing.assert_allclose(zero_rises[0] * terms[:, None], -ag[0])
    assert not any(p.grad is not None for p in model.parameters())
    # the rule: the target's estimated rise minus the other labels' mean
    score = class_mean_difference(rises[1], 1, terms)
    np.testing.assert_allclose(score, rises[1][1] - (rises[1][0] + rises[1][2]) / 2)

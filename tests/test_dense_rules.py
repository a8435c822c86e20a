"""Fairer dense baselines (issue 23, item 4): signed neuron means, class-mean difference, mean ablation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import monet
from monet.errors import MonetError
from monet.experiments.dense_rules import (
    class_mean_difference,
    mean_ablated,
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

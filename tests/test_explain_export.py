"""Factored expert outputs equal the layer itself; promoted tokens; explain prompt; JSON export shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from atlas_fixtures import atlas_of, corpus, load, save_run, tiny_config

from monet.errors import MonetError
from monet.interp.explain import (
    CHAT_NOTE,
    EXPLAIN_PROMPT,
    expert_direction,
    expert_logits,
    explain_expert,
    explanation_inputs,
)
from monet.interp.export import expert_page
from monet.interp.query import Atlas
from monet.model import build_experts, expert_output


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.getbasetemp()
    data = corpus(base)
    work = tmp_path_factory.mktemp("explain")
    run = save_run(work / "run", tiny_config(), data, seed=0)
    return {"data": data, "run": run, "atlas": atlas_of(run, data, work / "atlas")}


@pytest.mark.parametrize("decompose", ["vertical", "horizontal"])
def test_expert_output_equals_layer_with_one_hot_routing(decompose):
    """With g1, g2 one-hot at (i, j) in every head, the layer outputs H * E_ij(x) (each head adds it once)."""
    torch.manual_seed(0)
    config = tiny_config(moe_decompose=decompose)
    layer = build_experts(config).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 3, config.hidden_size, dtype=torch.float64)
    heads, experts = config.moe_heads, config.moe_experts
    for i, j in [(0, 0), (3, 5), (7, 2)]:
        g1 = torch.zeros(2, 3, heads, experts, dtype=torch.float64)
        g2 = torch.zeros_like(g1)
        g1[..., i], g2[..., j] = 1.0, 1.0
        torch.testing.assert_close(layer(x, g1, g2) / heads, expert_output(layer, x, i, j))


@pytest.mark.slow
@pytest.mark.parametrize("group", [0, 1])
def test_expert_direction_and_logits(setup, group):
    model, _ = load(setup["run"])
    atlas = Atlas(setup["atlas"], model)
    expert = max(range(64), key=lambda e: atlas.expert(group, e)["count"])
    layers = (0, 1) if group == 0 else (2, 3)
    above = [n for n in range(model.config.num_hidden_layers) if n > layers[-1]]
    ran = []   # layers above the group's: expert_direction stops before them (and before the LM head)
    counters = [model.model.layers[n].register_forward_hook(lambda m, a, o, n=n: ran.append(n)) for n in above]
    counters.append(model.lm_head.register_forward_hook(lambda m, a, o: ran.append("lm_head")))
    direction = expert_direction(model, atlas, group, expert, k=2)
    one = expert_direction(model, atlas, group, expert, k=1)
    for h in counters:
        h.remove()
    assert ran == []
    # Recompute by hand for the best context from a whole forward pass: the hidden inputs of the group's
    # layers at the activating token.
    ctx = atlas.top_contexts(group, expert, 1)[0]
    from monet.data import TokenDataset

    doc = TokenDataset(setup["data"], "validation").document(ctx["doc"])
    seq_len = atlas.manifest["options"]["seq_len"]
    prefix = torch.tensor([list(doc[(ctx["pos"] // seq_len) * seq_len:ctx["pos"] + 1])], dtype=torch.long)
    seen = {}
    hooks = [model.model.layers[n].moe.register_forward_hook(
        lambda m, a, o, n=n: seen.__setitem__(n, a[0][0, -1])) for n in layers]
    with torch.no_grad():
        model(prefix)
    for h in hooks:
        h.remove()
    i, j = divmod(expert, model.config.moe_experts)
    first = sum(expert_output(model.model.layers[n].moe, seen[n], i, j) for n in layers)
    torch.testing.assert_close(one, first, rtol=1e-4, atol=1e-5)
    assert direction.shape == (model.config.hidden_size,)
    logits = expert_logits(model, atlas, group, expert, n=5)
    assert len(logits["pos_str"]) == 5 and logits["pos_values"] == sorted(logits["pos_values"], reverse=True)
    assert logits["neg_values"] == sorted(logits["neg_values"]) and logits["neg_values"][0] < logits["pos_values"][0]


def test_explanation_prompt_and_samples(setup):
    model, tokenizer = load(setup["run"])
    atlas = Atlas(setup["atlas"])
    vector = torch.randn(model.config.hidden_size)
    inputs = explanation_inputs(model, tokenizer, vector)
    matches = [t for t in range(inputs.shape[1]) if torch.equal(inputs[0, t], vector)]
    assert len(matches) == EXPLAIN_PROMPT.count("X") == 2
    texts = explain_expert(model, tokenizer, atlas, 0, 1, samples=3, max_new_tokens=5, seed=0)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert texts == explain_expert(model, tokenizer, atlas, 0, 1, samples=3, max_new_tokens=5, seed=0)
    with pytest.raises(MonetError):
        explain_expert(model, tokenizer, atlas, 0, 1, samples=0)


def test_export_page_shape(setup, tmp_path, capsys):
    from monet.cli import main

    out = tmp_path / "expert.json"
    assert main(["atlas", "export", str(setup["atlas"]), "--expert", "0:5", "--out", str(out),
                 "--run", str(setup["run"])]) == 0
    page = json.loads(out.read_text())
    for key in ("modelId", "layer", "index", "activations", "pos_str", "pos_values", "neg_str", "neg_values",
                "frac_nonzero", "freq_hist_data_bar_heights", "freq_hist_data_bar_values", "explanations"):
        assert key in page, key
    assert page["layer"] == "group-0" and page["index"] == 5 and len(page["pos_str"]) == 10
    act = page["activations"][0]
    assert len(act["tokens"]) == len(act["values"]) and act["values"][act["maxValueTokenIndex"]] == act["maxValue"]
    assert page["monet"]["i"] * 8 + page["monet"]["j"] == 5
    atlas = Atlas(setup["atlas"])
    assert expert_page(atlas, 0, 5)["pos_str"] == []      # without the model no logits are claimed
    assert page["freq_hist_data_bar_heights"] == atlas.expert(0, 5)["histogram"]["counts"]
    assert main(["explain", str(setup["run"]), "--atlas", str(setup["atlas"]), "--expert", "0:5",
                 "--samples", "2", "--max-new-tokens", "3", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    assert CHAT_NOTE in captured.err and "\n1. " in captured.out and "\n2. " in captured.out
    assert main(["atlas", "export", str(setup["atlas"]), "--expert", "0:5", "--out",
                 str(tmp_path / "no" / "x.json")]) == 2
    assert "directory" in capsys.readouterr().err


def test_what_a_kind_offers_comes_from_its_units_class():
    """`units.kind_of`: the tools read what an atlas's kind offers from its units class, not from kind names."""
    from monet.interp.units import kind_of

    monet_kind, dense_kind = kind_of("monet"), kind_of("dense")
    assert monet_kind.halves({"experts_per_side": 8}, 5 * 8 + 3) == (5, 3)
    assert monet_kind.halves({}, 7) is None                      # an atlas that does not record E
    assert dense_kind.halves({"experts_per_side": 8}, 7) is None
    assert (monet_kind.steerable, monet_kind.coactive, monet_kind.group_word) == (True, True, "group")
    assert (dense_kind.steerable, dense_kind.coactive, dense_kind.group_word) == (False, False, "layer")
    assert (monet_kind.unit_word, dense_kind.unit_word) == ("expert", "neuron")
    with pytest.raises(MonetError, match="not 'peer'"):
        kind_of("peer")


@pytest.mark.slow
def test_a_dense_atlas_names_no_halves_and_refuses_similar_experts(setup, tmp_path):
    from monet.interp.export import similar_experts

    run = save_run(tmp_path / "dense-run", tiny_config(mlp_type="dense"), setup["data"], seed=0)
    atlas = Atlas(atlas_of(run, setup["data"], tmp_path / "dense-atlas"))
    model = load(run)[0]
    assert atlas.manifest["kind"] == "dense"
    assert "i" not in expert_page(atlas, 0, 5)["monet"]
    with pytest.raises(MonetError, match="Monet atlases only"):
        similar_experts(model, atlas, 0, 5)
    # A neuron's output direction: its down-projection column times its largest score, no context read.
    layer, neuron = 1, 5
    want = model.model.layers[layer].mlp.down_proj.weight[:, neuron] * float(atlas.expert(layer, neuron)["max_score"])
    torch.testing.assert_close(expert_direction(model, atlas, layer, neuron), want)
    assert len(expert_logits(model, atlas, layer, neuron, n=3)["pos_str"]) == 3

"""Expert masks and steering on whole models: the edited forward equals the naive masked sum, per group;
edits persist through save/load and KV-cache generation; edits for another model are refused."""


import pytest
import torch
from naive import naive_layer

import monet
from monet.edits import (
    EXPERT_EDITS_FILE,
    ExpertEdits,
    apply_edits,
    apply_steering,
    clear_edits,
    current_weights,
    edited,
    load_edits,
    masking_ratio,
    parse_steer,
    save_edits,
)
from monet.errors import MonetError
from monet.interp.capture import capture_routing


def _model(decompose="vertical", layers=4, seed=0, **overrides):
    torch.manual_seed(seed)
    config = monet.preset("tiny", num_hidden_layers=layers, moe_decompose=decompose, **overrides)
    model = monet.MonetForCausalLM(config).eval()
    with torch.no_grad():   # non-zero biases so every term of every expert is checked
        for name, p in model.named_parameters():
            if ".moe." in name:
                p.normal_(0.0, 0.3)
    return model


def _record_expert_calls(model):
    """Forward hooks keeping (x, g1, g2, output) of every expert layer."""
    calls, handles = {}, []
    for index, layer in enumerate(model.model.layers):
        def hook(module, args, output, index=index):
            calls[index] = (*(a.detach() for a in args), output.detach())
        handles.append(layer.moe.register_forward_hook(hook))
    return calls, handles


@pytest.mark.parametrize("decompose", ["vertical", "horizontal"])
def test_masked_model_layers_equal_naive_masked_sum(decompose):
    model = _model(decompose).double()
    E = model.config.moe_experts
    ids = torch.randint(3, 256, (2, 5))
    deleted = {(1, 2), (3, 3), (5, 0), (7, 7)}
    steered = {(2, 6): 2.5, (0, 1): 0.5}
    edits = ExpertEdits().delete(1, [i * E + j for i, j in deleted])
    for (i, j), alpha in steered.items():
        edits.scale_pair(1, i, j, alpha)
    edits.scale_bottom(0, 4, 0.0)          # group 0: every expert (4, j) deleted
    calls, handles = _record_expert_calls(model)
    with edited(model, edits):
        masked_logits = model(ids).logits
    for handle in handles:
        handle.remove()
    for layer in range(4):
        x, g1, g2, out = calls[layer]
        module = model.model.layers[layer].moe
        if layer // 2 == 0:
            ref = naive_layer(module, x, g1, g2, mask={(4, j) for j in range(E)})
        else:
            ref = naive_layer(module, x, g1, g2, mask=deleted, scale=steered)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    # The context manager restored the unedited model.
    assert all(w is None for w in current_weights(model).values())
    assert not torch.allclose(model(ids).logits, masked_logits)


def test_top_half_and_merge_and_ratio():
    model = _model()
    E = model.config.moe_experts
    edits = ExpertEdits().scale_top(0, 2, 0.0).merge(ExpertEdits().delete(1, [5, 6]))
    apply_edits(model, edits)
    table = current_weights(model)[0]
    assert table.shape == (E * E,) and table is model.model.layers[0].router.edit_weights   # one table per group
    expected = torch.zeros(E, E)
    expected[:, 2] = 1.0
    torch.testing.assert_close(table, expected.flatten())
    assert masking_ratio(model) == pytest.approx((E + 2) / (2 * E * E))
    # Composition: scaling a deleted expert keeps it deleted; halving twice keeps a quarter.
    apply_edits(model, ExpertEdits().scale(1, 5, 3.0).scale(1, 9, 0.5))
    apply_edits(model, ExpertEdits().scale(1, 9, 0.5))
    table = current_weights(model)[1]
    assert float(table[5]) == 1.0 and float(table[9]) == pytest.approx(0.75)
    clear_edits(model)
    assert all(w is None for w in current_weights(model).values())


def test_edited_restores_previous_state_on_error():
    model = _model()
    apply_edits(model, ExpertEdits().delete(0, [3]))
    before = current_weights(model)
    with pytest.raises(RuntimeError), edited(model, ExpertEdits().delete(1, [4])):
        assert current_weights(model)[1] is not None
        raise RuntimeError("boom")
    assert current_weights(model) == before


def test_gradients_flow_and_deleted_half_gets_none():
    model = _model("horizontal").train()
    m = model.config.moe_dim
    apply_edits(model, ExpertEdits().scale_bottom(0, 3, 0.0).scale(1, 10, 2.0))
    ids = torch.randint(3, 256, (2, 16))
    loss = model(ids, labels=ids).loss
    loss.backward()
    for layer in (0, 1):   # group 0: bottom half 3 is never used, so U_3 gets no gradient (up to rounding:
        grad = model.model.layers[layer].moe.u.weight.grad   # the edit subtracts the term it removes)
        assert float(grad[3 * m:(3 + 1) * m].abs().max()) < 1e-5 * float(grad.abs().max())
        assert float(grad[4 * m:(4 + 1) * m].abs().max()) > 1e-3 * float(grad.abs().max())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_edits_persist_through_save_and_load(tmp_path):
    model = _model()
    ids = torch.randint(3, 256, (1, 9))
    plain = model(ids).logits
    apply_edits(model, ExpertEdits().delete(0, range(0, 64, 3)).scale(1, 17, 1.7))
    masked = model(ids).logits
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / EXPERT_EDITS_FILE).is_file()
    loaded = monet.MonetForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    torch.testing.assert_close(loaded(ids).logits, masked)
    # Clearing and saving again removes the file, so the plain model comes back.
    clear_edits(loaded)
    loaded.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / EXPERT_EDITS_FILE).exists()
    torch.testing.assert_close(monet.MonetForCausalLM.from_pretrained(tmp_path / "ckpt").eval()(ids).logits, plain)


@pytest.mark.slow
def test_generation_with_cache_equals_without_and_mask_stays(tmp_path):
    model = _model(layers=4, seed=3)
    ids = torch.randint(3, 256, (1, 6))
    E = model.config.moe_experts
    # Delete the experts the prompt's last token uses most in each group, so the edit matters.
    with capture_routing(model) as capture:
        model(ids)
    edits = ExpertEdits()
    for group in range(2):
        edits.delete(group, [e for e, _ in capture.experts(group).token(0, ids.shape[1] - 1)[:4]])
    edits.scale_bottom(1, 0, 0.0).scale_top(0, E - 1, 3.0)
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    plain = model.generate(ids, **options)
    apply_edits(model, edits)
    cached = model.generate(ids, use_cache=True, **options)
    uncached = model.generate(ids, use_cache=False, **options)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)
    # Step-by-step cached logits equal one full masked forward over the generated sequence.
    out = model.generate(ids, use_cache=True, output_logits=True, return_dict_in_generate=True, **options)
    full = model(out.sequences).logits
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0], full[0, ids.shape[1] - 1 + step], rtol=1e-4, atol=1e-5)
    # And after a save/load round trip the masked generation is the same.
    model.save_pretrained(tmp_path / "m")
    again = monet.MonetForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(again.generate(ids, **options), cached)


def test_edits_from_another_model_are_refused(tmp_path):
    small = _model(layers=4)
    other = _model(layers=6)                       # 3 routing groups
    wider = _model(layers=4, moe_experts=16)
    with pytest.raises(MonetError, match="experts per side"):
        apply_edits(small, ExpertEdits(num_experts=16).delete(0, [1]))
    with pytest.raises(MonetError, match="routing groups"):
        apply_edits(small, ExpertEdits(num_groups=3).delete(0, [1]))
    with pytest.raises(MonetError, match="group 2 does not exist"):
        apply_edits(small, ExpertEdits().delete(2, [1]))
    with pytest.raises(MonetError, match="out of range"):
        apply_edits(small, ExpertEdits().delete(0, [64]))
    with pytest.raises(MonetError, match="out of range"):
        apply_edits(small, ExpertEdits().scale_bottom(0, 8, 0.0))
    apply_edits(other, ExpertEdits().delete(2, [1]))
    save_edits(other, tmp_path)
    with pytest.raises(MonetError, match="another model"):
        load_edits(small, tmp_path)
    apply_edits(wider, ExpertEdits().delete(0, [200]))
    save_edits(wider, tmp_path)
    with pytest.raises(MonetError, match="another model"):
        load_edits(small, tmp_path)
    (tmp_path / EXPERT_EDITS_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(MonetError, match="corrupt"):
        load_edits(small, tmp_path)
    dense = monet.MonetForCausalLM(monet.preset("tiny", mlp_type="dense"))
    with pytest.raises(MonetError, match="no Monet expert layers"):
        apply_edits(dense, ExpertEdits().delete(0, [1]))
    with pytest.raises(MonetError, match="finite"):
        ExpertEdits().scale(0, 1, float("nan"))


def test_parse_steer_and_cli_arguments(tmp_path):
    edits = parse_steer(["0:12=0", "1:5", "1:2,3=2.5", "0:bottom:4=0.5", "1:top:7=0"])
    assert edits.experts == {0: {12: 0.0}, 1: {5: 0.0}}
    assert edits.pairs == {1: {(2, 3): 2.5}}
    assert edits.bottom == {0: {4: 0.5}} and edits.top == {1: {7: 0.0}}
    for bad in ["x:1=0", "0:1=abc", "0", "0:side:1=0", "0:-1=2", "0:1=inf"]:
        with pytest.raises(MonetError):
            parse_steer(bad)
    model = _model()
    apply_edits(model, ExpertEdits().delete(0, [1]))
    save_edits(model, tmp_path)
    clear_edits(model)
    apply_steering(model, ["1:2,3=2.5", "0:9=0"], tmp_path / EXPERT_EDITS_FILE)
    E = model.config.moe_experts
    assert float(current_weights(model)[1][2 * E + 3]) == pytest.approx(-1.5)
    table = current_weights(model)[0]
    assert float(table[1]) == 1.0 and float(table[9]) == 1.0 and int(torch.count_nonzero(table)) == 2

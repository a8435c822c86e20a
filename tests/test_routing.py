"""Router: BatchNorm quantile thresholds, at least one expert per head, normalised rows, grouping, losses."""

from statistics import NormalDist

import pytest
import torch

import monet
from monet.model import MonetRouter, ambiguity_loss, routing_threshold, uniformity_loss


def _router(experts=64, topk=4, heads=3, hidden=16):
    config = monet.MonetConfig(hidden_size=hidden, num_attention_heads=1, moe_experts=experts, moe_topk=topk,
                               moe_heads=heads, vocab_size=16)
    torch.manual_seed(0)
    return MonetRouter(config)


def test_threshold_is_the_normal_quantile():
    assert routing_threshold(8, 512) == pytest.approx(NormalDist().inv_cdf(1 - 8 / 512))
    assert routing_threshold(8, 512) == pytest.approx(2.1538746940614564)
    assert routing_threshold(4, 4) == float("-inf")


def test_rows_sum_to_one_and_keep_at_least_one_expert_per_head():
    router = _router().train()
    x = torch.randn(4, 7, 16)
    for g in router(x):
        assert g.dtype == torch.float32
        assert g.shape == (4, 7, 3, 64)
        torch.testing.assert_close(g.sum(-1), torch.ones(4, 7, 3))
        assert bool(((g > 0).sum(-1) >= 1).all())


def test_keeps_about_k_entries_per_head_with_gaussian_logits():
    router = _router(experts=256, topk=8, heads=2, hidden=64).train()
    g1, g2 = router(torch.randn(8, 64, 64))
    for g in (g1, g2):
        kept = (g > 0).sum(-1).float().mean().item()
        assert 5.0 < kept < 12.0, kept   # ~k = 8 on average, not all and not one


def test_softmax_uses_raw_logits_over_kept_entries():
    router = _router(experts=16, topk=3, heads=2).eval()
    x = torch.randn(2, 5, 16)
    g1, _ = router(x)
    z = router.w1(x).view(2, 5, 2, 16).float()
    kept = g1 > 0
    expected = torch.softmax(z.masked_fill(~kept, float("-inf")), dim=-1)
    torch.testing.assert_close(g1, expected)


def test_eval_uses_running_statistics_and_training_updates_them():
    router = _router(experts=32, topk=4).train()
    x = torch.randn(3, 9, 16) * 3 + 1
    before = router.norm1.running_mean.clone()
    router(x)
    assert not torch.equal(before, router.norm1.running_mean)
    assert int(router.norm1.num_batches_tracked) == 1

    # The batch statistics the router used agree with torch's own BatchNorm over tokens and E entries.
    reference = torch.nn.BatchNorm1d(3, affine=False)
    z = router.w1(x).view(27, 3, 32).float()
    reference.train()(z)
    torch.testing.assert_close(router.norm1.running_mean, reference.running_mean)
    torch.testing.assert_close(router.norm1.running_var, reference.running_var)

    router.eval()
    with torch.no_grad():   # huge running mean: nothing passes sigma, so only the best entry per head is kept
        router.norm1.running_mean.fill_(100.0)
        router.norm2.running_mean.fill_(-100.0)    # everything passes: all 32 kept
    g1, g2 = router(x)
    assert bool(((g1 > 0).sum(-1) == 1).all())
    assert bool(((g2 > 0).sum(-1) == 32).all())
    # In eval the same token is routed the same way whatever else is in the batch.
    g1_single, _ = router(x[:1, :3])
    torch.testing.assert_close(g1_single, g1[:1, :3])


def test_padding_is_left_out_of_batch_statistics():
    router = _router(experts=32, topk=4).train()
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    padded = x.clone()
    padded[1, :3] = 1e3    # garbage in padding positions must not move the statistics
    router(padded, mask)
    with_padding = router.norm1.running_mean.clone()
    other = _router(experts=32, topk=4).train()
    other(x, mask)
    torch.testing.assert_close(with_padding, other.norm1.running_mean)


def test_router_weights_receive_gradients_in_training():
    model = monet.MonetForCausalLM(monet.preset("tiny")).train()
    ids = torch.randint(0, 256, (2, 12))
    model(ids, labels=ids).loss.backward()
    router = model.model.layers[0].router
    assert router.w1.weight.grad is not None and router.w1.weight.grad.abs().sum() > 0
    assert router.w2.weight.grad is not None and router.w2.weight.grad.abs().sum() > 0


def test_grouped_routing_reuses_the_group_router():
    config = monet.preset("tiny", num_hidden_layers=5, moe_groups=2)
    model = monet.MonetForCausalLM(config).eval()
    layers = model.model.layers
    assert [hasattr(layer, "router") for layer in layers] == [True, False, True, False, True]
    seen = {}

    def capture(index):
        def hook(module, args):
            seen[index] = (args[1], args[2])
        return hook

    for index, layer in enumerate(layers):
        layer.moe.register_forward_pre_hook(capture(index))
    out = model(torch.randint(0, 256, (1, 6)), output_router_probs=True)
    probs = out.router_probs
    assert len(probs) == 5 and probs[1] is None and probs[3] is None
    for layer_index, group_layer in [(0, 0), (1, 0), (2, 2), (3, 2), (4, 4)]:
        torch.testing.assert_close(seen[layer_index][0], probs[group_layer][0])
        torch.testing.assert_close(seen[layer_index][1], probs[group_layer][1])


def test_auxiliary_losses():
    uniform = torch.full((2, 3, 4, 8), 1 / 8)
    # Perfectly uniform usage: L_unif = -log(1/E) (the KL term is 0), one-hot tokens: L_amb = 0.
    assert uniformity_loss(uniform, uniform).item() == pytest.approx(torch.log(torch.tensor(8.0)).item(), rel=1e-4)
    one_hot = torch.zeros(2, 3, 4, 8)
    one_hot[..., 0] = 1
    assert ambiguity_loss(one_hot, one_hot).item() == pytest.approx(0.0)
    assert ambiguity_loss(uniform, uniform).item() == pytest.approx(1 - 1 / 8)
    # Collapsed usage (every token on expert 0) is penalised more than uniform usage.
    assert uniformity_loss(one_hot, one_hot) > uniformity_loss(uniform, uniform) + 1


def test_total_loss_is_lm_plus_weighted_aux():
    model = monet.MonetForCausalLM(monet.preset("tiny", aux_loss_weight=0.5)).train()
    ids = torch.randint(0, 256, (2, 10))
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.aux_loss)
    torch.testing.assert_close(out.aux_loss, out.unif_loss + out.amb_loss)
    logits = out.logits[:, :-1].reshape(-1, 256)
    torch.testing.assert_close(out.lm_loss, torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1)))


def test_activation_checkpointing_updates_running_statistics_once():
    torch.manual_seed(0)
    model = monet.MonetForCausalLM(monet.preset("tiny")).train()
    reference = monet.MonetForCausalLM(monet.preset("tiny")).train()
    reference.load_state_dict(model.state_dict())
    model.gradient_checkpointing_enable()
    ids = torch.randint(3, 256, (2, 9))
    model(ids, labels=ids).loss.backward()
    reference(ids, labels=ids).loss.backward()
    for ours, theirs in zip(model.model.layers[0].router.buffers(), reference.model.layers[0].router.buffers(),
                            strict=True):
        torch.testing.assert_close(ours, theirs)
    grad = model.model.layers[1].moe.u2.weight.grad
    torch.testing.assert_close(grad, reference.model.layers[1].moe.u2.weight.grad)

"""The fast routing paths equal the plain formulation: fused threshold, row-wise statistics, sparse backward.

The reference here is the router as the paper writes it, run through plain autograd in float64:
logits z = x W^T, BatchNorm normalisation of a copy, keep entries >= min(best, sigma), softmax of the
raw logits over the kept entries.
"""

import pytest
import torch

import monet
from monet import ops
from monet.model import MonetRouter
from monet.ops import batch_statistics


def _router(experts, topk, heads, hidden=24, seed=0):
    config = monet.MonetConfig(hidden_size=hidden, num_attention_heads=1, moe_experts=experts, moe_topk=topk,
                               moe_heads=heads, vocab_size=16)
    torch.manual_seed(seed)
    router = MonetRouter(config).double()
    with torch.no_grad():
        router.w1.weight.normal_(0.0, 0.5)
        router.w2.weight.normal_(0.0, 0.5)
    return router


def reference_gate(router, x, keys, mean, var, eps=1e-5):
    """Plain autograd: normalise a copy, compare with min(best, sigma), softmax of raw logits."""
    z = keys(x).unflatten(-1, (router.heads, router.experts)).double()
    normalised = (z - mean[:, None]) / torch.sqrt(var[:, None] + eps)
    keep = normalised >= normalised.amax(-1, keepdim=True).clamp_max(router.threshold)
    return torch.softmax(z.masked_fill(~keep, float("-inf")), dim=-1)


def _float64_statistics(z):
    flat = z.reshape(-1, z.shape[-2], z.shape[-1]).double()
    return flat.mean(dim=(0, 2)), flat.var(dim=(0, 2), correction=0)


@pytest.mark.parametrize("experts, topk, heads", [(64, 2, 3), (128, 4, 2), (8, 4, 2), (6, 6, 1)])
def test_router_values_and_gradients_equal_the_plain_formulation(experts, topk, heads):
    """(64, 2) and (128, 4) take the sparse backward (few kept entries); (8, 4) and k = E the dense one."""
    router = _router(experts, topk, heads).train()
    x = torch.randn(3, 11, 24, dtype=torch.float64, requires_grad=True)
    g1, g2 = router(x)
    with torch.no_grad():
        stats1 = _float64_statistics(router.w1(x).unflatten(-1, (heads, experts)))
        stats2 = _float64_statistics(router.w2(x).unflatten(-1, (heads, experts)))
    r1 = reference_gate(router, x, router.w1, *stats1)
    r2 = reference_gate(router, x, router.w2, *stats2)
    torch.testing.assert_close(g1, r1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g2, r2, rtol=1e-12, atol=1e-12)
    sparse = bool((g1 > 0).double().mean() <= ops.SPARSE_BACKWARD_MAX_FRACTION)
    assert sparse == (experts >= 64)

    p1, p2 = torch.randn_like(g1), torch.randn_like(g2)
    inputs = [x, router.w1.weight, router.w2.weight]
    got = torch.autograd.grad((g1 * p1).sum() + (g2 * p2).sum(), inputs)
    want = torch.autograd.grad((r1 * p1).sum() + (r2 * p2).sum(), inputs)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_eval_router_uses_running_statistics_on_the_fast_path():
    router = _router(64, 4, 2)
    with torch.no_grad():
        router.norm1.running_mean.copy_(torch.tensor([0.3, -0.2], dtype=torch.float64))
        router.norm1.running_var.copy_(torch.tensor([2.0, 0.5], dtype=torch.float64))
    router.eval()
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    g1, _ = router(x)
    expected = reference_gate(router, x, router.w1, router.norm1.running_mean, router.norm1.running_var)
    torch.testing.assert_close(g1, expected, rtol=1e-12, atol=1e-12)


def test_row_wise_statistics_equal_float64_moments_with_padding():
    z = torch.randn(4, 7, 3, 50) * 3 + 2
    mask = torch.rand(4, 7) > 0.3
    count, mean, var = batch_statistics(z, mask)
    flat = z[mask].double()
    assert float(count) == flat.shape[0] * 50
    torch.testing.assert_close(mean.double(), flat.mean(dim=(0, 2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), flat.var(dim=(0, 2), correction=0), rtol=1e-5, atol=1e-5)


def test_sparse_and_dense_router_backward_agree_in_a_whole_model(monkeypatch):
    """Forcing either path gives the same gradients for every parameter of a float64 model."""
    config = monet.preset("tiny", moe_experts=32, moe_topk=2, moe_heads=2)
    torch.manual_seed(0)
    model = monet.MonetForCausalLM(config).double().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 256, (2, 10))

    def grads(fraction):
        monkeypatch.setattr(ops, "SPARSE_BACKWARD_MAX_FRACTION", fraction)
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    sparse, dense = grads(1.0), grads(0.0)
    assert sparse.keys() == dense.keys() and any(".router." in name for name in sparse)
    for name in sparse:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-9, atol=1e-12, msg=name)


def test_router_gradient_reaches_only_kept_key_rows():
    """Sparse backward: key rows of halves that no token kept get exactly zero gradient."""
    router = _router(128, 2, 1).train()
    x = torch.randn(1, 3, 24, dtype=torch.float64, requires_grad=True)
    g1, _ = router(x)
    (g1 * torch.randn_like(g1)).sum().backward()
    used = (g1 > 0).reshape(-1, 128).any(0)
    assert bool((router.w1.weight.grad[~used] == 0).all())
    assert bool((router.w1.weight.grad[used] != 0).any())   # (a head keeping a single entry has g = 1: no grad)


def test_router_backward_on_an_empty_batch_gives_zero_key_gradients():
    """Zero tokens (an empty shard or window list) must not break the sparse router backward: the key
    gradients are zeros of the keys' shape (it raised on reshaping the empty kept mask before)."""
    x = torch.randn(0, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    z = (x @ weight.t()).detach().view(0, 2, 3)
    g = ops.KeptSoftmax.apply(x, weight, z, torch.ones_like(z, dtype=torch.bool))
    g.sum().backward()
    assert x.grad.shape == (0, 4) and weight.grad.shape == (6, 4) and not weight.grad.any()

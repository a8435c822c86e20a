"""Factored HD/VD layers equal the naive sum over all N experts (eq. 7, 14), values and gradients."""

import pytest
import torch
from naive import naive_layer

from monet import MonetConfig
from monet.model import MonetHorizontalExperts, MonetRouter, MonetVerticalExperts, RoutingGroup

SHAPES = [
    # (hidden, experts E, moe_dim m, heads H, topk k, batch, length)
    (8, 5, 4, 2, 2, 2, 3),     # E not a power of two, odd length
    (6, 3, 2, 1, 1, 1, 5),     # H = 1, k = 1
    (8, 4, 2, 3, 4, 1, 2),     # k = E: every half kept
    (10, 7, 6, 2, 3, 2, 1),    # odd E, single token
]


def _layer(cls, hidden, experts, moe_dim, heads, topk):
    config = MonetConfig(hidden_size=hidden, num_attention_heads=1, moe_experts=experts, moe_dim=moe_dim,
                         moe_heads=heads, moe_topk=topk, vocab_size=16, hidden_act="relu2")
    torch.manual_seed(0)
    layer = cls(config).double()
    with torch.no_grad():
        for p in layer.parameters():   # biases are zero at init; give every term something to check
            p.normal_(0.0, 0.5)
    router = MonetRouter(config).double().train()
    return layer, router


@pytest.mark.slow
@pytest.mark.parametrize("cls", [MonetHorizontalExperts, MonetVerticalExperts])
@pytest.mark.parametrize("shape", SHAPES)
def test_factored_equals_naive_sum(cls, shape):
    hidden, experts, moe_dim, heads, topk, batch, length = shape
    layer, router = _layer(cls, hidden, experts, moe_dim, heads, topk)
    x = torch.randn(batch, length, hidden, dtype=torch.float64, requires_grad=True)
    g1, g2 = router(x)
    g1, g2 = g1.double(), g2.double()
    if topk == experts:
        assert bool((g1 > 0).all()) and bool((g2 > 0).all())
    out = layer(x, g1, g2)
    ref = naive_layer(layer, x, g1, g2)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)

    # Gradients with respect to the input, the routing and every weight match too.
    probe = torch.randn_like(out)
    inputs = [x, *layer.parameters()]
    grads = torch.autograd.grad((out * probe).sum(), inputs, retain_graph=True)
    ref_grads = torch.autograd.grad((ref * probe).sum(), inputs)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("cls", [MonetHorizontalExperts, MonetVerticalExperts])
def test_exactness_needs_normalised_routing(cls):
    """The reordering relies on sum_j g2_hj = 1; with unnormalised g the factored form is not eq. 7."""
    layer, _ = _layer(cls, 8, 4, 2, 2, 2)
    x = torch.randn(1, 2, 8, dtype=torch.float64)
    g1 = torch.rand(1, 2, 2, 4, dtype=torch.float64)
    g2 = torch.rand(1, 2, 2, 4, dtype=torch.float64)
    assert not torch.allclose(layer(x, g1, g2), naive_layer(layer, x, g1, g2))
    g1, g2 = g1 / g1.sum(-1, keepdim=True), g2 / g2.sum(-1, keepdim=True)
    torch.testing.assert_close(layer(x, g1, g2), naive_layer(layer, x, g1, g2))


@pytest.mark.parametrize("cls", [MonetHorizontalExperts, MonetVerticalExperts])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_edited_factored_equals_naive_masked_and_steered_sum(cls, shape):
    hidden, experts, moe_dim, heads, topk, batch, length = shape
    layer, router = _layer(cls, hidden, experts, moe_dim, heads, topk)
    x = torch.randn(batch, length, hidden, dtype=torch.float64, requires_grad=True)
    g1, g2 = router(x)
    generator = torch.Generator().manual_seed(1)
    chosen = torch.randperm(experts * experts, generator=generator)[: max(1, experts * experts // 3)].tolist()
    masked = {(e // experts, e % experts) for e in chosen[: len(chosen) // 2 + 1]}
    steered = {(e // experts, e % experts): 2.5 for e in chosen[len(chosen) // 2 + 1:]}
    table = torch.zeros(experts * experts, dtype=torch.float64)
    for i, j in masked:
        table[i * experts + j] = 1.0                  # delete: remove the whole term
    for (i, j), alpha in steered.items():
        table[i * experts + j] = 1.0 - alpha          # steer: keep alpha times the term
    out = layer(x, g1, g2, group=RoutingGroup(g1, g2, table))   # the group's edit table, as the decoder passes it
    ref = naive_layer(layer, x, g1, g2, mask=masked, scale=steered)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe).sum(), [x, *layer.parameters()], retain_graph=True)
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x, *layer.parameters()])
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # An all-zero table is the unedited layer.
    zero = RoutingGroup(g1, g2, torch.zeros_like(table))
    torch.testing.assert_close(layer(x, g1, g2, group=zero), naive_layer(layer, x, g1, g2))

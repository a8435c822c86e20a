"""Routing capture equals the naive per-expert computation of g_hij = g1_hi g2_hj."""

import torch

import monet
from monet.interp.capture import capture_routing


def test_active_experts_equal_naive_scores():
    torch.manual_seed(0)
    model = monet.MonetForCausalLM(monet.preset("tiny", num_hidden_layers=4)).eval()
    ids = torch.randint(3, 256, (2, 7))
    with capture_routing(model) as capture:
        out = model(ids, output_router_probs=True)
    assert len(capture.groups) == 2
    for group, layer in enumerate([0, 2]):
        g1, g2 = out.router_probs[layer]
        torch.testing.assert_close(capture.groups[group][0], g1)
        naive = torch.einsum("bthi,bthj->bthij", g1, g2).sum(2).flatten(-2)   # [B, T, N], tiny E only
        sparse = capture.experts(group)
        for b in range(2):
            for t in range(7):
                expected = {e: naive[b, t, e].item() for e in torch.nonzero(naive[b, t]).flatten().tolist()}
                got = dict(sparse.token(b, t))
                assert got.keys() == expected.keys()
                for e, score in expected.items():
                    assert abs(got[e] - score) < 1e-6
                scores = [s for _, s in sparse.token(b, t)]
                assert scores == sorted(scores, reverse=True)

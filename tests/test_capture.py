"""Routing capture equals the naive per-expert computation of g_hij = g1_hi g2_hj."""

import torch

import monet
from monet.interp.capture import active_experts, capture_routing


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


def test_per_head_scores_sum_to_merged_scores():
    torch.manual_seed(1)
    g1 = torch.softmax(torch.randn(1, 3, 2, 5), -1) * (torch.rand(1, 3, 2, 5) > 0.4)
    g1[..., 0] += 1e-3
    g2 = torch.softmax(torch.randn(1, 3, 2, 5), -1) * (torch.rand(1, 3, 2, 5) > 0.4)
    g2[..., 1] += 1e-3
    merged = active_experts(g1, g2)
    per_head = active_experts(g1, g2, per_head=True)
    for t in range(3):
        totals = {}
        keep = per_head.ids[0, t] >= 0
        for e, s, h in zip(per_head.ids[0, t][keep].tolist(), per_head.scores[0, t][keep].tolist(),
                           per_head.heads[0, t][keep].tolist(), strict=True):
            assert abs(s - (g1[0, t, h, e // 5] * g2[0, t, h, e % 5]).item()) < 1e-7
            totals[e] = totals.get(e, 0.0) + s
        got = dict(merged.token(0, t))
        assert got.keys() == totals.keys()
        assert all(abs(got[e] - totals[e]) < 1e-6 for e in totals)

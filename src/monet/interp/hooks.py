"""Helpers for hooks on a Monet model (nnsight, TransformerLens-style forward hooks, plain PyTorch).

Every place to read or overwrite is the input or output of a named module (the official module names);
docs/tools.md has the table of hook points. One rule for interventions: the expert layers sum over all
N = E^2 experts in factored form, exact only because each head's g1 and g2 sum to 1 (eq. 12, appendix
A.1), so zeroing routing entries does NOT delete their experts -- it computes a third function. Delete or
scale experts at the expert layer's OUTPUT (`expert_contribution`), as `monet.edits` does inside the
forward pass (tests/test_tools.py checks the two agree), or overwrite the routing with rows that still
sum to 1 per head (`forced_routing`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from monet.model import expert_output


def expert_contribution(moe, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor,
                        experts: Iterable[int]) -> torch.Tensor:
    """What the listed experts add to an expert layer's output: sum over ids e = i*E + j of
    score_e(t) * E_ij(x_t), with score_e = sum_h g1_hi g2_hj. [B, T, d].

    `moe` is a layer's expert module (`model.model.layers[l].moe`, or nnsight's envoy of it), `x` its input
    (the output of `post_attention_layernorm`), `g1`, `g2` the group's routing ([B, T, H, E]). Subtract it
    from the layer's output to delete the experts (in every layer of their group), add (alpha - 1) times it
    to scale them by alpha. Cost: one small matmul per listed expert; nothing of size N is formed.
    """
    module = getattr(moe, "_module", moe)   # an nnsight Envoy wraps the torch module as `._module`
    num = g1.shape[-1]
    total = torch.zeros_like(x)
    for expert in sorted(set(int(e) for e in experts)):
        i, j = divmod(expert, num)
        score = (g1[..., i] * g2[..., j]).sum(-1).to(x.dtype)   # [B, T], summed over heads
        total = total + score.unsqueeze(-1) * expert_output(module, x, i, j)
    return total


def forced_routing(g: torch.Tensor, half: int) -> torch.Tensor:
    """A routing like `g` ([..., H, E]) that sends every token and head to one half (one-hot rows: each head
    still sums to 1, so the factored expert sums stay exact). Forcing g1 to i and g2 to j makes every layer of
    the group output H * E_ij(x)."""
    out = torch.zeros_like(g)
    out[..., half] = 1.0
    return out


__all__ = ["expert_contribution", "forced_routing"]

"""Hook points of a Monet model, for nnsight, TransformerLens-style forward hooks and plain PyTorch.

Every place a user wants to read or overwrite is the input or output of a named module (the official
module names; `print(model)` shows them), so nnsight's `.input`/`.output`, `register_forward_hook` and
`register_forward_pre_hook` all reach them without wrappers:

    path (l = layer)                              input                         output
    model.embed_tokens                            token ids                     residual stream into layer 0
    model.layers[l]                               residual stream into l        (residual after l, attention
                                                                                weights or None, routing or None)
    model.layers[l].self_attn                     normed residual, ...          (attention output, weights)
    model.layers[l].post_attention_layernorm      residual after attention      x: what the router and experts read
    model.layers[l].router  (l % moe_groups == 0) x                             (g1, g2), each [B, T, H, E]
    model.layers[l].moe                           (x, g1, g2)                   expert-layer output [B, T, d], added
                                                                                to the residual
    model.layers[l].mlp     (dense baseline)      x                             MLP output (mlp.down_proj's input
                                                                                holds the neuron activations)
    model.norm, lm_head                           final residual                logits

A routing layer's (g1, g2) are reused by the next `moe_groups - 1` layers, so overwriting a router's
output changes the whole group, as deleting an expert does (an expert is named (group, i*E + j)).

One rule for interventions. The expert layers compute the routing-weighted sum over all N = E^2 experts in
factored form, which is exact only because each head's g1 and g2 sum to 1 (eq. 12, appendix A.1). An
overwrite of (g1, g2) must keep that true (e.g. `forced_routing`); zeroing some entries does NOT delete the
experts they belong to -- it computes a third function. To delete or scale experts from a hook, change the
expert layer's OUTPUT by their contribution (`expert_contribution`): that is exactly what
`monet.edits` does inside the forward pass (tests/test_tools.py checks the two agree).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from monet.model import expert_output


def _module(moe):
    """The torch module behind `moe` (an nnsight Envoy wraps it as `._module`)."""
    return getattr(moe, "_module", moe)


def expert_contribution(moe, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor,
                        experts: Iterable[int]) -> torch.Tensor:
    """What the listed experts add to an expert layer's output: sum over ids e = i*E + j of
    score_e(t) * E_ij(x_t), with score_e = sum_h g1_hi g2_hj. [B, T, d].

    `moe` is a layer's expert module (`model.model.layers[l].moe`, or nnsight's envoy of it), `x` its input
    (the output of `post_attention_layernorm`), `g1`, `g2` the group's routing ([B, T, H, E]). Subtract it
    from the layer's output to delete the experts (in every layer of their group), add (alpha - 1) times it
    to scale them by alpha. Cost: one small matmul per listed expert; nothing of size N is formed.
    """
    module = _module(moe)
    num = g1.shape[-1]
    total = torch.zeros(*x.shape[:-1], x.shape[-1], dtype=x.dtype, device=x.device)
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

"""Baseline feed-forward blocks for the same decoder, so comparisons change one thing only.

- `DenseMLP`: the LLaMA gated MLP (the paper's dense LLaMA baseline), width `intermediate_size`.
- `PEERLayer`: Parameter Efficient Expert Retrieval (paper eq. 3-5): N = E^2 single-neuron experts
  u_ij, v_ij in R^d, retrieved per head with product keys over the two halves of x.
"""

from __future__ import annotations

import torch
from torch import nn

from monet.config import MonetConfig
from monet.experts import activation


class DenseMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with LLaMA's key names."""

    def __init__(self, config: MonetConfig) -> None:
        super().__init__()
        bias = bool(config.mlp_bias)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = activation(config.dense_hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PEERLayer(nn.Module):
    """PEER(x) = sum_h sum_{(i,j) in K_h} g_hij v_ij sigma(u_ij . x) (eq. 5).

    Per head: score the E sub-keys of each side (eq. 3), take the top-k of each, score the k^2
    candidate pairs by the sum of their sub-key scores and keep the top k (eq. 4), softmax them.
    """

    def __init__(self, config: MonetConfig) -> None:
        super().__init__()
        self.heads, self.experts, self.topk = config.moe_heads, config.moe_experts, config.moe_topk
        half = config.hidden_size // 2
        self.key1 = nn.Linear(half, self.heads * self.experts, bias=False)
        self.key2 = nn.Linear(half, self.heads * self.experts, bias=False)
        self.expert_in = nn.Embedding(self.experts**2, config.hidden_size)    # u_ij
        self.expert_out = nn.Embedding(self.experts**2, config.hidden_size)   # v_ij
        self.act = activation(config.hidden_act)

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids i*E + j [B, T, H, k] and their routing scores g [B, T, H, k]."""
        x1, x2 = x.chunk(2, dim=-1)
        shape = (*x.shape[:-1], self.heads, self.experts)
        s1, i1 = self.key1(x1).view(shape).float().topk(self.topk, dim=-1)
        s2, i2 = self.key2(x2).view(shape).float().topk(self.topk, dim=-1)
        pair_scores = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)          # [..., H, k*k]
        pair_ids = (i1.unsqueeze(-1) * self.experts + i2.unsqueeze(-2)).flatten(-2)
        scores, best = pair_scores.topk(self.topk, dim=-1)
        return pair_ids.gather(-1, best), torch.softmax(scores, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, g = self.retrieve(x)
        u = self.expert_in(ids)                                                    # [B, T, H, k, d]
        hidden = self.act((u * x[..., None, None, :]).sum(-1)) * g.to(x.dtype)     # [B, T, H, k]
        return (hidden.unsqueeze(-1) * self.expert_out(ids)).sum(dim=(-3, -2))


class SMoELayer(nn.Module):
    """Conventional sparse MoE (eq. 1-2): N experts V_i sigma(U_i x), top-k of N router scores.

    Kept for the size comparison of `monet info --compare` (its parameters grow like N m d) and as a
    readable reference; it is not a decoder option.
    """

    def __init__(self, dim: int, experts: int, expert_dim: int, topk: int, act: str = "relu2") -> None:
        super().__init__()
        self.topk = topk
        self.router = nn.Linear(dim, experts, bias=False)                       # expert embeddings w_i
        self.up = nn.Parameter(torch.empty(experts, expert_dim, dim))           # U_i
        self.down = nn.Parameter(torch.empty(experts, dim, expert_dim))         # V_i
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, ids = self.router(x).float().topk(self.topk, dim=-1)
        g = torch.softmax(scores, dim=-1).to(x.dtype)                           # [..., k]
        hidden = self.act(torch.einsum("...kmd,...d->...km", self.up[ids], x))
        return torch.einsum("...k,...kdm,...km->...d", g, self.down[ids], hidden)

"""Exact fast-path operations under `monet.model`: the same numbers as the plain formulas, fewer passes.

Router (`MonetRouter`): BatchNorm statistics without a float64 copy or a host sync (`batch_statistics`) and
the kept-entry softmax with a sparse backward (`KeptSoftmax`). Experts: the E-sized routing contractions
`hd_mix` / `vd_mix` and the edit correction of the dense path (`edited_entries`); the
sparse expert path itself lives in `monet.sparse`. Everything is checked against the plain formulation and,
through the model, against the float64 naive sum over all N = E^2 experts (tests/naive.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from monet import sparse
from monet.runtime import distributed

# ----------------------------------------------------------------------------------------------------------
# Routing statistics


@torch.no_grad()
def batch_statistics(z: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Per-head (count, mean, biased variance) of logits z [..., H, E] over tokens and E entries.

    Rows of E contiguous logits per (token, head) give row moments, combined exactly (mean of means; mean
    of variances + variance of means); padding tokens (token_mask False) get weight 0. Sums are all-reduced
    across data-parallel ranks. Results stay tensors (float64 count; z's dtype for the moments), so nothing
    waits for the device.
    """
    heads, experts = z.shape[-2:]
    flat = z.reshape(-1, heads, experts)
    row_var, row_mean = torch.var_mean(flat, dim=-1, correction=0)           # [tokens, H]
    weight = (torch.ones(flat.shape[0], dtype=torch.float64, device=z.device) if token_mask is None
              else token_mask.reshape(-1).to(torch.float64))
    rows = weight.sum()
    # First and second moments per head, from the rows: E[z] and E[z^2] = E[row var + row mean^2].
    first = (weight[:, None] * row_mean.double()).sum(0)
    second = (weight[:, None] * (row_var.double() + row_mean.double().square())).sum(0)
    if distributed():
        sums = torch.cat((rows.view(1), first, second))
        dist.all_reduce(sums)
        rows, first, second = sums[0], sums[1:1 + heads], sums[1 + heads:]
    mean = first / rows.clamp_min(1.0)
    var = (second / rows.clamp_min(1.0) - mean.square()).clamp_min(0.0)
    return rows * experts, mean.to(z.dtype), var.to(z.dtype)


@torch.no_grad()
def update_running_statistics(norm: nn.BatchNorm1d, count: torch.Tensor, mean: torch.Tensor,
                              var: torch.Tensor) -> None:
    """PyTorch BatchNorm semantics: exponential average with the unbiased batch variance (no host sync)."""
    momentum = norm.momentum if norm.momentum is not None else 0.1
    unbiased = var.double() * (count / (count - 1.0).clamp_min(1.0))
    norm.running_mean.mul_(1 - momentum).add_(momentum * mean.to(norm.running_mean.dtype))
    norm.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(norm.running_var.dtype))
    norm.num_batches_tracked.add_(1)


class AllReduceSum(torch.autograd.Function):
    """Sum of a tensor over data-parallel ranks, differentiable: the backward sums the gradients the same way
    (each rank's input reaches every rank's loss)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    backward = forward


def recomputing_in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointed layers recompute their forward)."""
    return torch._C._current_graph_task_id() != -1


# ----------------------------------------------------------------------------------------------------------
# Gate: softmax over the kept entries, sparse backward

# The sparse backward pays while the kept entries are at most this fraction of the E per head. It needs
# host syncs (the count, `nonzero`, `bincount`); off the CPU the dense product is cheap and sync-free, so it
# runs there unless SPARSE_BACKWARD_OFF_CPU is set (benchmarks/gpu_paths.py compares both).
SPARSE_BACKWARD_MAX_FRACTION = 0.125
SPARSE_BACKWARD_OFF_CPU = False


class KeptSoftmax(torch.autograd.Function):
    """g = softmax over the kept entries of z = x W^T, zero elsewhere; gradients for x and W only.

    forward(x [..., d], weight [H*E, d], z [..., H, E] (the logits, float32 or float64, computed without
    autograd), keep [..., H, E] bool) -> g. d loss / d z is zero off the kept entries (their g is exactly
    0), so the key gradients are embedding-bag products over the ~H*k kept ids per token.
    """

    @staticmethod
    def forward(ctx, x, weight, z, keep):
        g = torch.softmax(z.masked_fill(~keep, float("-inf")), dim=-1)
        ctx.save_for_backward(x, weight, g)
        return g

    @staticmethod
    def backward(ctx, grad_g):
        x, weight, g = ctx.saved_tensors
        grad_z = g * (grad_g - (g * grad_g).sum(dim=-1, keepdim=True))   # softmax backward, 0 off kept
        x2d = x.reshape(-1, x.shape[-1])
        kept = g.reshape(x2d.shape[0], weight.shape[0]) > 0                   # [tokens, H*E] (0 tokens too)
        # On the CPU, one host sync (backward only) picks the sparse or the dense product by the kept fraction.
        dense = kept.device.type != "cpu" and not SPARSE_BACKWARD_OFF_CPU
        if dense or int(kept.sum()) > SPARSE_BACKWARD_MAX_FRACTION * kept.numel():
            flat = grad_z.reshape(kept.shape).to(weight.dtype)
            grad_x = (flat @ weight).view_as(x) if ctx.needs_input_grad[0] else None
            grad_w = flat.t() @ x2d.to(weight.dtype) if ctx.needs_input_grad[1] else None
            return grad_x, grad_w, None, None
        tokens, ids = kept.nonzero().unbind(-1)                  # token-major: each token's kept ids h*E + e
        values = grad_z.reshape(kept.shape)[tokens, ids].to(weight.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            offsets = sparse.bag_offsets(tokens, x2d.shape[0])
            grad_x = F.embedding_bag(ids, weight, offsets, per_sample_weights=values, mode="sum")
            grad_x = grad_x.to(x.dtype).view_as(x)
        if ctx.needs_input_grad[1]:
            # The transpose of that gather: entries ordered by key id (a stable sort, so the sums are
            # deterministic), the token rows of x bagged per id.
            ids, order = ids.sort(stable=True)
            offsets = sparse.bag_offsets(ids, weight.shape[0])
            grad_w = F.embedding_bag(tokens[order], x2d.to(weight.dtype), offsets, per_sample_weights=values[order],
                                     mode="sum")
        return grad_x, grad_w, None, None


# ----------------------------------------------------------------------------------------------------------
# Expert mixes (the E-sized contractions between the two projections)


def hd_mix(hidden: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HD routing mix (eq. 12, inner sums first): the input of `v` [B, T, E, m] and the bias weights [B, T, E].

    Reduce over bottom halves per head, then spread over top halves: never the E x E grid.
    """
    per_head = g1 @ hidden                          # [B, T, H, m] = sum_i g1_hi sigma(U_i x + b1_i)
    top_input = g2.transpose(-1, -2) @ per_head     # [B, T, E, m] = sum_h g2_hj per_head_h
    return top_input, g2.sum(dim=-2)                # sum_h g2_hj weighs b2_j (sum_i g1_hi = 1)


def vd_mix(h1: torch.Tensor, h2: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """VD routing mix (appendix A.1): straight flows (eq. 23, 25), cross flows (eq. 26-27), bias weights.

    Returns (straight1, straight2, cross12, cross21, s1, s2): the inputs of v11, v22, v12, v21 and the
    weights of b1, b2. Straight flows use that the other side's g sums to 1 per head; cross flows reduce
    one side per head, then spread over the other side.
    """
    s1, s2 = g1.sum(dim=-2), g2.sum(dim=-2)          # [B, T, E]: routing summed over heads
    straight1 = s1.unsqueeze(-1) * h1
    straight2 = s2.unsqueeze(-1) * h2
    cross12 = g1.transpose(-1, -2) @ (g2 @ h2)      # [B, T, E(i), m/2]
    cross21 = g2.transpose(-1, -2) @ (g1 @ h1)      # [B, T, E(j), m/2]
    return straight1, straight2, cross12, cross21, s1, s2


# ----------------------------------------------------------------------------------------------------------
# The edit correction of the dense path: each token's edited active pairs (ragged, see monet.sparse)


def edited_entries(g1: torch.Tensor, g2: torch.Tensor, edit_weights: torch.Tensor):
    """The active (token, head, i, j) whose edit weight is non-zero, ragged: (token, i, j, c), each [P'].

    `token` indexes the flattened leading dims (B*T); c = g1_hi g2_hj edit[i*E2 + j] (E2 = g2's last size; the
    decode path passes an [E1, E2] block of the [E, E] table with g restricted to its halves). Enumerated without
    padding (`monet.sparse.edited_entries`): work in the number of active pairs, never the E x E grid.
    """
    first, second = sparse.kept_entries(g1), sparse.kept_entries(g2)
    edit = sparse.edited_entries(first, second, edit_weights, g2.shape[-1])   # row-major [E1, E2] table
    return (first.token[edit.first], first.half[edit.first], second.half[edit.second],
            edit.coefficient(first, second))

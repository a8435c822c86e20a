"""Product-key routing with BatchNorm quantile thresholds, and the auxiliary losses (paper eq. 9, 16-17).

For each token and head the router scores the E bottom halves (`w1`) and the E top halves (`w2`)
separately. Instead of a top-k sort, each score is normalised with BatchNorm statistics (per head,
over all tokens and all E entries) and compared with the standard-normal quantile
sigma = Phi^-1(1 - k/E): if the logits were Gaussian, about k entries per head would pass. A head always
keeps at least its best entry. The kept entries get a softmax of their RAW logits (float32), the
others get exactly zero, so each head's g sums to 1 — the fact the factored expert sums rely on.

Only the keep/drop decision depends on the BatchNorm statistics, and a comparison has no gradient,
so the statistics are computed without autograd. In data-parallel training they are summed across
ranks first, so every rank thresholds with the global batch's quantiles, as one device would.

Fast path (same numbers, fewer passes): normalising is monotone, so the test
(z - mean) / sqrt(var + eps) >= min(best, sigma) is done on the raw logits as
z >= min(max z, mean + sigma * sqrt(var + eps)), one cut per head, and a single masked softmax
follows. In the backward pass only the kept entries (about k of E per head) have a non-zero
gradient, so `KeptSoftmaxGate` multiplies just those with the key weights (an embedding-bag
gather/scatter) instead of two dense [tokens, H*E] x [H*E, d] products; it falls back to the dense
products when many entries are kept (k close to E).
"""

from __future__ import annotations

from statistics import NormalDist

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from monet.config import MonetConfig


def routing_threshold(topk: int, experts: int) -> float:
    """sigma = Phi^-1(1 - k/E); with k = E every entry is kept (sigma = -inf)."""
    if topk >= experts:
        return float("-inf")
    return NormalDist().inv_cdf(1.0 - topk / experts)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def batch_statistics(z: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Per-head (count, mean, biased variance) of logits z [..., H, E] over tokens and E entries.

    Padding tokens (token_mask False) are left out. Sums are all-reduced across data-parallel ranks.
    Moments are taken per (token, head) row of E contiguous entries in z's dtype (no float64 copy of
    z) and combined exactly: mean = mean of row means, var = mean of row variances + variance of row
    means (all rows hold E entries). Only per-head results are widened to float64.
    """
    heads = z.shape[-2]
    flat = z.reshape(-1, heads, z.shape[-1])
    if token_mask is not None:
        flat = flat[token_mask.reshape(-1)]
    count = torch.tensor(float(flat.shape[0] * flat.shape[-1]), dtype=torch.float64, device=z.device)
    if flat.shape[0]:
        row_var, row_mean = torch.var_mean(flat, dim=-1, correction=0)          # [tokens, H]
        between, mean = torch.var_mean(row_mean.double(), dim=0, correction=0)
        var = row_var.double().mean(dim=0) + between
    else:
        var = mean = torch.zeros(heads, dtype=torch.float64, device=z.device)
    if _distributed():
        sums = torch.stack([mean * count, (var + mean.square()) * count])
        dist.all_reduce(count)
        dist.all_reduce(sums)
        mean = sums[0] / count.clamp_min(1.0)
        var = (sums[1] / count.clamp_min(1.0) - mean.square()).clamp_min(0.0)
    return count, mean.to(z.dtype), var.to(z.dtype)


class MonetRouter(nn.Module):
    """Two key sets (w1 for bottom/left halves, w2 for top/right), H heads, BatchNorm thresholds."""

    def __init__(self, config: MonetConfig) -> None:
        super().__init__()
        self.heads, self.experts = config.moe_heads, config.moe_experts
        self.threshold = routing_threshold(config.moe_topk, config.moe_experts)
        self.w1 = nn.Linear(config.hidden_size, self.heads * self.experts, bias=False)
        self.w2 = nn.Linear(config.hidden_size, self.heads * self.experts, bias=False)
        # affine=False BatchNorm modules only hold the running statistics (official key names).
        self.norm1 = nn.BatchNorm1d(self.heads, affine=False)
        self.norm2 = nn.BatchNorm1d(self.heads, affine=False)

    def forward(
        self, x: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> (g1, g2), each [B, T, H, E] in float32 (float64 for float64 input), rows summing
        to 1 per head."""
        return self._gate(x, self.w1, self.norm1, token_mask), self._gate(x, self.w2, self.norm2, token_mask)

    def _gate(
        self, x: torch.Tensor, keys: nn.Linear, norm: nn.BatchNorm1d, token_mask: torch.Tensor | None
    ) -> torch.Tensor:
        shape = (*x.shape[:-1], self.heads, self.experts)

        def keep(z: torch.Tensor) -> torch.Tensor:
            return self._keep_mask(z, norm, token_mask)

        return KeptSoftmaxGate.apply(x, keys.weight, shape, keep)

    @torch.no_grad()
    def _keep_mask(self, z: torch.Tensor, norm: nn.BatchNorm1d, token_mask: torch.Tensor | None) -> torch.Tensor:
        """Entries whose BatchNorm-normalised logit reaches min(its head's best, sigma), tested on raw z."""
        if self.training:
            count, mean, var = batch_statistics(z, token_mask)
            if not _recomputing_in_backward():   # activation checkpointing replays the forward once more
                _update_running_statistics(norm, count, mean, var)
        else:
            mean, var = norm.running_mean.to(z.dtype), norm.running_var.to(z.dtype)
        cut = (mean + self.threshold * torch.sqrt(var + norm.eps))[:, None]   # [H, 1], -inf when k = E
        return z >= torch.minimum(z.amax(dim=-1, keepdim=True), cut)


def _recomputing_in_backward() -> bool:
    """True while autograd runs a backward pass (where checkpointed layers recompute their forward)."""
    return torch._C._current_graph_task_id() != -1


# Sparse backward pays while the kept entries are at most this fraction of the E per head.
SPARSE_BACKWARD_MAX_FRACTION = 0.125


class KeptSoftmaxGate(torch.autograd.Function):
    """g = softmax over the kept entries of z = x W^T (float32), with a backward that only touches
    kept entries.

    forward(x [..., d], weight [H*E, d], shape (..., H, E), keep: z -> bool mask) -> g [..., H, E].
    The logits are computed in x's dtype and widened to float32 (float64 stays float64), as
    `nn.Linear` followed by `.float()` would. d loss / d z is zero off the kept entries (their g is
    exactly 0), so the key gradients are embedding-bag products over the ~H*k kept ids per token.
    """

    @staticmethod
    def forward(ctx, x, weight, shape, keep):
        dtype = torch.promote_types(x.dtype, torch.float32)
        z = F.linear(x, weight).view(shape).to(dtype)
        g = torch.softmax(z.masked_fill_(~keep(z), float("-inf")), dim=-1)
        ctx.save_for_backward(x, weight, g)
        return g

    @staticmethod
    def backward(ctx, grad_g):
        x, weight, g = ctx.saved_tensors
        if grad_g is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None
        grad_z = g * (grad_g - (g * grad_g).sum(dim=-1, keepdim=True))   # softmax backward, 0 off kept
        x2d = x.reshape(-1, x.shape[-1])
        kept = g.reshape(x2d.shape[0], -1) > 0                                # [tokens, H*E]
        count = int(kept.sum())
        if count > SPARSE_BACKWARD_MAX_FRACTION * kept.numel():
            flat = grad_z.reshape(kept.shape).to(weight.dtype)
            grad_x = (flat @ weight).view_as(x) if ctx.needs_input_grad[0] else None
            grad_w = flat.t() @ x2d.to(weight.dtype) if ctx.needs_input_grad[1] else None
            return grad_x, grad_w, None, None
        tokens, ids = kept.nonzero().unbind(-1)                  # token-major: each token's kept ids h*E + e
        values = grad_z.reshape(kept.shape)[tokens, ids].to(weight.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            offsets = _offsets(tokens, x2d.shape[0])
            grad_x = F.embedding_bag(ids, weight, offsets, per_sample_weights=values, mode="sum")
            grad_x = grad_x.to(x.dtype).view_as(x)
        if ctx.needs_input_grad[1]:
            grad_w = _scatter_rows(ids, tokens, values, x2d.to(weight.dtype), weight.shape[0])
        return grad_x, grad_w, None, None


def _offsets(sorted_index: torch.Tensor, bags: int) -> torch.Tensor:
    """Start of each bag in a sorted index list (empty bags allowed): the embedding-bag offsets."""
    offsets = torch.zeros(bags, dtype=torch.long, device=sorted_index.device)
    offsets[1:] = torch.bincount(sorted_index, minlength=bags).cumsum(0)[:-1]
    return offsets


def _scatter_rows(ids: torch.Tensor, tokens: torch.Tensor, values: torch.Tensor, x2d: torch.Tensor,
                  rows: int) -> torch.Tensor:
    """sum over entries p of values[p] * x[tokens[p]] into row ids[p]: [rows, d].

    The transpose of the embedding-bag gather: order the entries by row id (a stable sort, so the
    sums are deterministic) and bag the token rows of x per id.
    """
    ids, order = ids.sort(stable=True)
    return F.embedding_bag(tokens[order], x2d, _offsets(ids, rows), per_sample_weights=values[order], mode="sum")


@torch.no_grad()
def _update_running_statistics(
    norm: nn.BatchNorm1d, count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
) -> None:
    """PyTorch BatchNorm semantics: exponential average with the unbiased batch variance."""
    momentum = norm.momentum if norm.momentum is not None else 0.1
    n = float(count)
    unbiased = var * (n / max(n - 1.0, 1.0))
    norm.running_mean.mul_(1 - momentum).add_(momentum * mean.to(norm.running_mean.dtype))
    norm.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(norm.running_var.dtype))
    norm.num_batches_tracked.add_(1)


def _token_mean(g: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Average routing probabilities over (non-padding) tokens: [..., H, E] -> [H, E].

    Across data-parallel ranks the sums are all-reduced with autograd, so the loss is the global
    batch's and its gradient matches a single device.
    """
    flat = g.reshape(-1, *g.shape[-2:])
    if token_mask is not None:
        flat = flat[token_mask.reshape(-1)]
    total = flat.sum(dim=0)
    count = torch.tensor(float(flat.shape[0]), device=g.device)
    if _distributed():
        from torch.distributed.nn.functional import all_reduce

        total = all_reduce(total)
        dist.all_reduce(count)
    return total / count.clamp_min(1.0)


def uniformity_loss(g1: torch.Tensor, g2: torch.Tensor, token_mask: torch.Tensor | None = None,
                    eps: float = 1e-6) -> torch.Tensor:
    """Eq. 16 with g-hat read as the routing probability averaged over the batch's tokens.

    L_unif = -1/(2HE) * sum_{h,i} log(mean_t g1_thi + eps) - (same for g2). Up to the constant log E
    this is KL(uniform || mean routing), minimal when every half is used equally; eps guards log 0.
    """
    loss = 0.0
    for g in (g1, g2):
        mean = _token_mean(g, token_mask)
        loss = loss - torch.log(mean + eps).mean() / 2
    return loss


def ambiguity_loss(g1: torch.Tensor, g2: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 17 read as 1/(2H) * sum_h (1 - max_i g1_hi) + (same for g2), averaged over tokens.

    The printed equation carries a leading minus sign, but the text says minimising it makes each
    token pick its experts with high confidence; that is the sign used here (the loss is >= 0 and
    falls as the largest routing probability of each head rises towards 1).
    """
    per_token = ((1 - g1.amax(dim=-1)).mean(dim=-1) + (1 - g2.amax(dim=-1)).mean(dim=-1)) / 2
    if token_mask is not None:
        return per_token[token_mask].mean() if token_mask.any() else per_token.sum() * 0
    return per_token.mean()


def active_halves(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept entries of routing g [..., H, E] as (values, indices), each [..., H, K].

    K is the largest number of kept entries of any (token, head) in the batch (about k, at least 1);
    rows with fewer kept entries are padded with zero values.
    """
    kept = int((g > 0).sum(-1).max()) if g.numel() else 1
    return g.topk(max(kept, 1), dim=-1)


def active_pairs(g1: torch.Tensor, g2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (head, i, j) with g1_hi * g2_hj > 0, without ever forming the E x E grid.

    Returns (i, j, weight), each [..., P] with P = H * K1 * K2 (see `active_halves`): the bottom/left
    index, the top/right index and the per-head product g1_hi * g2_hj (zero for padding entries).
    The same (i, j) may appear once per head; its routing score is the sum of its weights.
    """
    v1, i1 = active_halves(g1)
    v2, i2 = active_halves(g2)
    shape = (*v1.shape[:-1], v1.shape[-1], v2.shape[-1])
    weight = (v1.unsqueeze(-1) * v2.unsqueeze(-2)).flatten(-3)
    i = i1.unsqueeze(-1).expand(shape).flatten(-3)
    j = i2.unsqueeze(-2).expand(shape).flatten(-3)
    return i, j, weight


def apply_padding_to_mask(attention_mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """A [B, T] bool token mask from a 2D attention mask (None when every token is real)."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[-1] < shape[1]:
        return None
    mask = attention_mask[:, -shape[1]:].bool()
    return None if bool(mask.all()) else mask


__all__ = [
    "MonetRouter",
    "KeptSoftmaxGate",
    "active_halves",
    "active_pairs",
    "routing_threshold",
    "batch_statistics",
    "uniformity_loss",
    "ambiguity_loss",
    "apply_padding_to_mask",
]

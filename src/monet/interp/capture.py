"""Routing capture: which experts fire on which tokens, sparse and factored.

`capture_routing(model)` records (g1, g2) of every routing group during forward passes.
`active_experts(g1, g2)` turns one group's routing into, per token, the experts with a non-zero
score: expert id i*E + j and score sum_h g1_hi g2_hj (the official README's convention), or the
per-head scores on request. Only each token's active (i, j) pairs are formed (about H k^2 of them),
never the N = E^2 grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from monet.errors import MonetError
from monet.model import MonetRouter
from monet.ops import active_pairs


@dataclass
class ActiveExperts:
    """Per token, its active experts, padded: ids [B, T, P] (-1 for padding), scores [B, T, P] (0 there).

    With per-head scores, `heads` [B, T, P] says which head each entry comes from and the same id can
    appear once per head; otherwise each id appears once with its scores summed over heads. Entries are
    sorted by decreasing score.
    """

    ids: torch.Tensor
    scores: torch.Tensor
    heads: torch.Tensor | None = None

    def token(self, b: int, t: int) -> list[tuple[int, float]]:
        """(expert id, score) of one token, best first."""
        keep = self.ids[b, t] >= 0
        return list(zip(self.ids[b, t][keep].tolist(), self.scores[b, t][keep].tolist(), strict=True))


def active_experts(g1: torch.Tensor, g2: torch.Tensor, per_head: bool = False) -> ActiveExperts:
    """Sparse experts of one routing group from g1, g2 [B, T, H, E]."""
    experts = g1.shape[-1]
    i, j, weight = active_pairs(g1.float(), g2.float())
    ids = i * experts + j
    if per_head:
        heads_count, pairs = g1.shape[-2], ids.shape[-1] // g1.shape[-2]
        heads = torch.arange(heads_count, device=ids.device).repeat_interleave(pairs).expand_as(ids)
        ids = torch.where(weight > 0, ids, torch.full_like(ids, -1))
        scores, order = weight.sort(dim=-1, descending=True)
        return ActiveExperts(ids.gather(-1, order), scores, heads.gather(-1, order))
    # Merge the heads: sort by id, sum runs of equal ids (segment sums), then order by score.
    ids = torch.where(weight > 0, ids, torch.full_like(ids, experts * experts))   # padding sorts last
    ids, order = ids.sort(dim=-1)
    weight = weight.gather(-1, order)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[..., 1:] = ids[..., 1:] != ids[..., :-1]
    segment = starts.long().cumsum(-1) - 1
    merged = torch.zeros_like(weight).scatter_add(-1, segment, weight)
    merged_ids = torch.full_like(ids, -1).scatter(-1, segment, ids)
    merged_ids = torch.where(merged_ids == experts * experts, torch.full_like(merged_ids, -1), merged_ids)
    merged = torch.where(merged_ids >= 0, merged, torch.zeros_like(merged))
    width = int(starts.sum(-1).max()) if ids.numel() else 0
    scores, order = merged[..., :width].sort(dim=-1, descending=True)
    return ActiveExperts(merged_ids[..., :width].gather(-1, order), scores)


class RoutingCapture:
    """Holds the (g1, g2) of each routing group from the forward passes run inside `capture_routing`."""

    def __init__(self) -> None:
        self.groups: list[tuple[torch.Tensor, torch.Tensor]] = []

    def clear(self) -> None:
        self.groups = []

    def experts(self, group: int, per_head: bool = False) -> ActiveExperts:
        if not 0 <= group < len(self.groups):
            raise MonetError(f"routing group {group} was not captured; groups 0..{len(self.groups) - 1} exist")
        return active_experts(*self.groups[group], per_head=per_head)


@contextmanager
def capture_routing(model: torch.nn.Module, keep_on_device: bool = False) -> Iterator[RoutingCapture]:
    """Record the routing probabilities of every routing group, in group order.

    Each forward pass inside the block replaces what was recorded before (one entry per group),
    so run one batch, read `capture.groups` or `capture.experts(g)`, then run the next.

    >>> with capture_routing(model) as capture:
    ...     model(input_ids)
    ...     experts = capture.experts(0)     # ids i*E + j and scores per token
    """
    routers = [m for m in model.modules() if isinstance(m, MonetRouter)]
    if not routers:
        raise MonetError("this model has no Monet routers (is it a dense or PEER baseline?)")
    capture = RoutingCapture()
    pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(index: int):
        def record(module, args, output):
            if index == 0:
                pending.clear()
            g1, g2 = output
            pending[index] = (g1.detach(), g2.detach()) if keep_on_device else (g1.detach().cpu(), g2.detach().cpu())
            if len(pending) == len(routers):
                capture.groups = [pending[k] for k in range(len(routers))]
        return record

    handles = [router.register_forward_hook(hook(index)) for index, router in enumerate(routers)]
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()

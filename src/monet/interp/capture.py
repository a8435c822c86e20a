"""Routing capture: which experts fire on which tokens, sparse and factored.

`capture_routing(model)` records (g1, g2) of every routing group during forward passes;
`active_experts(g1, g2)` turns one group's routing into each token's experts with a non-zero score
(id i*E + j, score sum_h g1_hi g2_hj as in the official README), forming only the active (i, j) pairs
(about H k^2 per token), never the N = E^2 grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from monet.errors import MonetError
from monet.model import MonetRouter
from monet.sparse import merged_experts


@dataclass
class ActiveExperts:
    """Per token, its active experts, ragged: one entry per (token, expert) flattened over the tokens (B*T,
    row-major), grouped by token (in no order within a token) and delimited by `offsets` [B*T + 1], so memory
    follows the real number of active experts. `token(b, t)` gives one token's list, best score first."""

    shape: tuple[int, ...]
    offsets: torch.Tensor
    expert_ids: torch.Tensor
    expert_scores: torch.Tensor

    @property
    def num_entries(self) -> int:
        return int(self.expert_ids.numel())

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token index over the flattened B*T, expert id i*E + j, score), each [entries]."""
        counts = self.offsets[1:] - self.offsets[:-1]
        token = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        return token, self.expert_ids, self.expert_scores

    def token(self, b: int, t: int) -> list[tuple[int, float]]:
        """(expert id, score) of one token, best first."""
        flat = b * self.shape[-1] + t
        lo, hi = int(self.offsets[flat]), int(self.offsets[flat + 1])
        scores, order = torch.sort(self.expert_scores[lo:hi], descending=True, stable=True)
        return list(zip(self.expert_ids[lo:hi][order].tolist(), scores.tolist(), strict=True))


def active_experts(g1: torch.Tensor, g2: torch.Tensor) -> ActiveExperts:
    """Sparse experts of one routing group from g1, g2 [B, T, H, E], ragged (`monet.sparse.merged_experts`)."""
    shape, tokens = tuple(g1.shape[:-2]), g1[..., 0, 0].numel()
    token, ids, scores = merged_experts(g1.detach().float(), g2.detach().float())
    offsets = torch.zeros(tokens + 1, dtype=torch.long, device=token.device)
    offsets[1:] = torch.bincount(token, minlength=tokens).cumsum(0)      # entries come grouped by token
    return ActiveExperts(shape, offsets, ids, scores)


class RoutingCapture:
    """Holds the (g1, g2) of each routing group from the forward passes run inside `capture_routing`."""

    def __init__(self) -> None:
        self.groups: list[tuple[torch.Tensor, torch.Tensor]] = []

    def experts(self, group: int) -> ActiveExperts:
        if not 0 <= group < len(self.groups):
            raise MonetError(f"routing group {group} was not captured; groups 0..{len(self.groups) - 1} exist")
        return active_experts(*self.groups[group])


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
            pending[index] = tuple(g.detach() if keep_on_device else g.detach().cpu() for g in output)   # (g1, g2)
            if len(pending) == len(routers):
                capture.groups = [pending[k] for k in range(len(routers))]
        return record

    with ExitStack() as hooks:
        for index, router in enumerate(routers):
            hooks.enter_context(router.register_forward_hook(hook(index)))
        yield capture

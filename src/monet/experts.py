"""Monet expert layers in factored form: horizontal (HD, eq. 6-12) and vertical (VD, eq. 13-15, A.1).

Each layer holds E bottom/left halves and E top/right halves; expert (i, j) combines half i with
half j, so N = E^2 experts cost O(E) parameters. The layer output is the routing-weighted sum over all
N experts, but it is never expanded: the sums over i, j and the heads are reordered so that only
E-sized routing vectors (g1, g2 per head) meet the E*m hidden units. This is exact because each head's
g1 and g2 sum to 1 (see `monet.routing`). Hidden units are laid out expert-major ([E, m]), and the
parameter names are the official ones (`u`, `v`, `b` for HD; `u1`, `u2`, `v11`..`v22`, `b1`, `b2` for VD).

Shapes: x [B, T, d]; g1, g2 [B, T, H, E]; output [B, T, d].

Editing (masking and steering, `monet.editing`): a layer may carry `edit_weights`, a [E*E] table
holding, for expert (i, j) at i*E + j, the fraction of its term to remove (1 deletes it, 1 - alpha
scales it by alpha, 0 leaves it). Only each token's active (i, j) pairs are looked up: their terms
g1_hi g2_hj E_ij(x) are subtracted from the E-sized intermediate sums before the output
projections, so an edited forward costs little more than a plain one and stays exact.

Speed: the routing mix (the E-sized contractions between the two projections) is a pure function,
`hd_mix` / `vd_mix`. With the environment variable MONET_COMPILE=1 it is wrapped in `torch.compile`;
if compiling or running the compiled version fails, the eager function takes over for good (a warning
says why). Compilation is off by default: on CPU the mix is a small share of a block's time and a
first compile takes tens of seconds (see docs/performance.md).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN

from monet.config import MonetConfig
from monet.routing import active_pairs


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


def maybe_compile(fn: Callable) -> Callable:
    """`torch.compile(fn)` when MONET_COMPILE=1, falling back to `fn` (with a warning) if that fails."""
    if os.environ.get("MONET_COMPILE", "0") != "1":
        return fn
    state: dict[str, Callable] = {}

    def run(*args):
        if "fn" not in state:
            try:
                state["fn"] = torch.compile(fn, dynamic=True)
            except Exception as exc:  # no compiler toolchain, unsupported platform, ...
                warnings.warn(f"MONET_COMPILE=1 but torch.compile failed ({exc}); using eager {fn.__name__}",
                              stacklevel=2)
                state["fn"] = fn
        try:
            return state["fn"](*args)
        except Exception as exc:
            if state["fn"] is fn:
                raise
            warnings.warn(f"compiled {fn.__name__} failed ({type(exc).__name__}: {exc}); using eager", stacklevel=2)
            state["fn"] = fn
            return fn(*args)

    run.__wrapped__ = fn
    return run


_hd_mix = maybe_compile(hd_mix)
_vd_mix = maybe_compile(vd_mix)


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    """sigma(x) = relu(x)^2, the activation of the released models (`hidden_act="relu2"`)."""
    return torch.relu(x).square()


def activation(name: str):
    """The expert nonlinearity by its Hugging Face name; "relu2" is the squared ReLU."""
    return squared_relu if name == "relu2" else ACT2FN[name]


class MonetHorizontalExperts(nn.Module):
    """MoHDE: E_ij(x) = V_j sigma(U_i x + b1_i) + b2_j (eq. 6), summed as eq. 12.

    `u` holds every U_i and b1_i (d -> E*m with bias), `v` every V_j (E*m -> d), `b` every b2_j ([E, d]).
    """

    def __init__(self, config: MonetConfig) -> None:
        super().__init__()
        self.experts, self.expert_dim = config.moe_experts, config.moe_dim
        width = self.experts * self.expert_dim
        self.act = activation(config.hidden_act)
        self.u = nn.Linear(config.hidden_size, width)
        self.v = nn.Linear(width, config.hidden_size, bias=False)
        self.b = nn.Parameter(torch.zeros(self.experts, config.hidden_size))
        self.register_buffer("edit_weights", None, persistent=False)

    def bottom(self, x: torch.Tensor) -> torch.Tensor:
        """sigma(U_i x + b1_i) for every bottom half i: [B, T, E, m]."""
        return self.act(self.u(x)).unflatten(-1, (self.experts, self.expert_dim))

    def forward(self, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        g1, g2 = g1.to(x.dtype), g2.to(x.dtype)
        hidden = self.bottom(x)
        top_input, bias_weight = _hd_mix(hidden, g1, g2)
        if self.edit_weights is not None:
            token, i, j, c = edited_entries(g1, g2, self.edit_weights)
            # Remove c_ij (V_j sigma(U_i x + b1_i) + b2_j) for every edited active pair.
            top_input = _add_rows(top_input, token, j, -c.unsqueeze(-1) * _rows(hidden, token, i))
            bias_weight = _add_rows(bias_weight, token, j, -c)
        return self.v(top_input.flatten(-2)) + bias_weight @ self.b


class MonetVerticalExperts(nn.Module):
    """MoVDE (eq. 13-15): each expert's first layer is split into a left half (from i) and a right
    half (from j), and its second layer into four blocks, giving the six terms of appendix A.1:

        top    = V11_i s(U1_i x) + V12_i s(U2_j x) + b12_i     (X11 + X12 + X13)
        bottom = V21_j s(U1_i x) + V22_j s(U2_j x) + b22_j     (X21 + X22 + X23)

    `u1`/`u2` hold U1_i, b11_i / U2_j, b21_j (d -> E*m/2 with bias), `v11`, `v12`, `v21`, `v22` the
    blocks (E*m/2 -> d/2), `b1` the b12_i and `b2` the b22_j ([E, d/2]).
    """

    def __init__(self, config: MonetConfig) -> None:
        super().__init__()
        self.experts, self.half_dim = config.moe_experts, config.moe_dim // 2
        width, half_out = self.experts * self.half_dim, config.hidden_size // 2
        self.act = activation(config.hidden_act)
        self.u1 = nn.Linear(config.hidden_size, width)
        self.u2 = nn.Linear(config.hidden_size, width)
        self.v11 = nn.Linear(width, half_out, bias=False)
        self.v12 = nn.Linear(width, half_out, bias=False)
        self.v21 = nn.Linear(width, half_out, bias=False)
        self.v22 = nn.Linear(width, half_out, bias=False)
        self.b1 = nn.Parameter(torch.zeros(self.experts, half_out))
        self.b2 = nn.Parameter(torch.zeros(self.experts, half_out))
        self.register_buffer("edit_weights", None, persistent=False)

    def left(self, x: torch.Tensor) -> torch.Tensor:
        """sigma(U1_i x + b11_i) for every left half i: [B, T, E, m/2]."""
        return self.act(self.u1(x)).unflatten(-1, (self.experts, self.half_dim))

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """sigma(U2_j x + b21_j) for every right half j: [B, T, E, m/2]."""
        return self.act(self.u2(x)).unflatten(-1, (self.experts, self.half_dim))

    def forward(self, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        g1, g2 = g1.to(x.dtype), g2.to(x.dtype)
        h1, h2 = self.left(x), self.right(x)
        straight1, straight2, cross12, cross21, s1, s2 = _vd_mix(h1, h2, g1, g2)
        if self.edit_weights is not None:
            token, i, j, c = edited_entries(g1, g2, self.edit_weights)
            # Remove c_ij E_ij(x): row sums over j and column sums over i of c, and the cross terms.
            rows = _add_rows(torch.zeros_like(s1), token, i, c)
            cols = _add_rows(torch.zeros_like(s2), token, j, c)
            straight1 = straight1 - rows.unsqueeze(-1) * h1
            straight2 = straight2 - cols.unsqueeze(-1) * h2
            cross12 = _add_rows(cross12, token, i, -c.unsqueeze(-1) * _rows(h2, token, j))
            cross21 = _add_rows(cross21, token, j, -c.unsqueeze(-1) * _rows(h1, token, i))
            s1, s2 = s1 - rows, s2 - cols
        top = self.v11(straight1.flatten(-2)) + self.v12(cross12.flatten(-2)) + s1 @ self.b1
        bottom = self.v21(cross21.flatten(-2)) + self.v22(straight2.flatten(-2)) + s2 @ self.b2
        return torch.cat((top, bottom), dim=-1)


def edited_pairs(g1: torch.Tensor, g2: torch.Tensor, edit_weights: torch.Tensor):
    """Active pairs (i, j) [B, T, P] and their removal weights c = g1_hi g2_hj edit[i*E + j]."""
    i, j, weight = active_pairs(g1, g2)
    experts = g1.shape[-1]
    return i, j, weight * edit_weights.to(weight.dtype)[i * experts + j]


def edited_entries(g1: torch.Tensor, g2: torch.Tensor, edit_weights: torch.Tensor):
    """Only the active pairs whose edit weight is non-zero, flattened: (token, i, j, c), each [P'].

    `token` indexes the flattened leading dims (B*T). With a small mask most active pairs are
    untouched, so the gathers and scatters below work on a few entries instead of every pair.
    """
    i, j, c = edited_pairs(g1, g2, edit_weights)
    token, slot = (c != 0).reshape(-1, c.shape[-1]).nonzero(as_tuple=True)
    flat = slot.new_tensor(c.shape[-1]) * token + slot
    return token, i.reshape(-1)[flat], j.reshape(-1)[flat], c.reshape(-1)[flat]


def _rows(hidden: torch.Tensor, token: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden [..., E, w] at (token, index) pairs -> [P', w] (token over the flattened leading dims)."""
    return hidden.reshape(-1, *hidden.shape[-2:])[token, index]


def _add_rows(target: torch.Tensor, token: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """target [..., E(, w)] plus values accumulated at (token, index) pairs; out of place (autograd)."""
    flat = target.reshape(-1, *target.shape[target.dim() - values.dim():])   # [B*T, E(, w)]
    return flat.index_put((token, index), values, accumulate=True).view_as(target)


def build_experts(config: MonetConfig) -> nn.Module:
    if config.moe_decompose == "horizontal":
        return MonetHorizontalExperts(config)
    return MonetVerticalExperts(config)

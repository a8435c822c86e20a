"""Exact sparse Monet experts: compute only the routed halves (issue 12; design, autograd, tests and
timings in docs/performance.md, "The sparse expert path").

The dense factored layers (`monet.model`, eq. 12 and appendix A.1) compute sigma(U_i x + b_i) for all E
bottom/left halves of every token, although a token only uses the halves some head kept: about H*k of E.
The routing-weighted sums are unchanged if the zero routing weights are left out (eq. 10 = eq. 8), so
this module computes exactly the same output from the kept halves only:

    HD (eq. 12):  y_t = sum_{j in J_t} [V_j | b2_j] [c_tj ; s2_tj],
                  c_tj  = sum_h g2_thj sum_{i in K1_th} g1_thi sigma(U_i x_t + b1_i),  s2_tj = sum_h g2_thj
    VD (A.1):     top_t    = sum_{i in I_t} [V11_i | V12_i | b12_i] [s1_ti a1_ti ; X12_ti ; s1_ti]     (eq. 23, 26, 28)
                  bottom_t = sum_{j in J_t} [V21_j | V22_j | b22_j] [X21_tj ; s2_tj a2_tj ; s2_tj]     (eq. 27, 25)

where I_t / J_t are the token's *active halves* (the union over heads of the kept entries of g1 / g2),
K1_th the entries kept by head h, a1_ti = sigma(U1_i x_t + b11_i), a2_tj = sigma(U2_j x_t + b21_j),
X12_ti = sum_h g1_thi sum_j g2_thj a2_tj and X21_tj = sum_h g2_thj sum_i g1_thi a1_ti (the cross flows).
Every tensor is O(active pairs), O(kept entries), O(tokens * H) or O(tokens * E), never E^2 per token.

Gradient w.r.t. g1, g2: exact on the kept entries; 0 off them, where the dense formula gives the
derivative of a term multiplied by 0. The router's softmax backward never reads those, so every model
gradient is the same on both paths; use the dense path if you need d out / d g at zero entries.

Host synchronisation: the per-half loop needs each half's pair count on the host (`counts.tolist()`),
one device sync per side and group on a GPU (plus one for the number of active per-head pairs when
edits are present). So the automatic dispatch (`choose`) picks the dense path on non-CPU devices, where
the dense matmuls are fast and a loop over E halves would be launch-bound; the sparse path still runs
there when forced (6-55x slower on an H100: docs/performance.md, "GPU checks"). Switch: `expert_path`.
Where `use_kernels` (CUDA + triton), the sparse path runs on `monet.kernels` over a layout of static size
instead (`static_routing`: K slots per (token, head), no host sync; edits applied inside the kernel).

The structure of a group's routing (`Routing`, with the edited pairs of the group's edit table) is built
once per routing group and forward call: the decoder passes it down the group's layers inside its
`monet.model.RoutingGroup`. So is the decode path's plan (`KeptHalves`: 1-8 tokens, the dense formula on
the kept halves' weights only; `hd_decode`, `vd_decode`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from monet import kernels

# ----------------------------------------------------------------------------------------------------------
# Ragged routing structures


@dataclass
class KeptEntries:
    """The kept (token, head, half) entries of one routing tensor g [tokens, H, E] (g > 0), flattened.

    Sorted by bag = token * H + head, then half (the order of `nonzero`). `flat` is the entry's position
    in g.reshape(-1) and `value` = g there (an autograd-tracked gather: gradients reach g). With a
    layout: `pair` is the entry's (token, half) pair, `by_pair` a stable order grouping entries by pair,
    `offsets` the start of each (token, head) bag (embedding-bag offsets).
    """

    token: torch.Tensor
    head: torch.Tensor
    half: torch.Tensor
    flat: torch.Tensor
    num_tokens: int
    heads: int
    value: torch.Tensor | None = None
    pair: torch.Tensor | None = None
    by_pair: torch.Tensor | None = None
    offsets: torch.Tensor | None = None

    @property
    def bag(self) -> torch.Tensor:
        return self.token * self.heads + self.head

    def bind(self, g: torch.Tensor) -> KeptEntries:
        """A copy whose values are gathered from g (same kept pattern): one gather, autograd-tracked."""
        return dataclasses.replace(self, value=g.reshape(-1).index_select(0, self.flat))


@dataclass
class HalfLayout:
    """Every (token, active half) pair of one side, ordered by half then token.

    A half is active for a token when any head kept it (union over heads). `counts` holds the number
    of pairs per half on the host (the per-half loop needs it; one device sync).
    """

    token: torch.Tensor      # [P] long
    counts: list[int]        # [E]
    num_tokens: int
    experts: int
    _table: tuple | None = None

    def table(self) -> tuple[torch.Tensor, ...]:
        """(half, start, stop) per block of pairs of one half and the block count, for `monet.kernels` (built
        once per layout)."""
        if self._table is None:
            self._table = kernels.block_table(self.counts, kernels.BLOCK_P, self.token.device)
        return self._table

    @property
    def size(self) -> int:
        return int(self.token.shape[0])

    def blocks(self) -> Iterator[tuple[int, int, int, torch.Tensor]]:
        """(half, start, stop, token rows) for every half with at least one pair."""
        start = 0
        for half, count in enumerate(self.counts):
            if count:
                yield half, start, start + count, self.token[start:start + count]
            start += count


def kept_entries(g: torch.Tensor) -> KeptEntries:
    """The kept entries (g > 0) of g [..., H, E] (token over the flattened leading dims) with their values,
    without pair indices."""
    g = g.reshape(-1, *g.shape[-2:])
    tokens, heads, experts = g.shape
    token, head, half = (g > 0).nonzero(as_tuple=True)
    return KeptEntries(token, head, half, (token * heads + head) * experts + half, tokens, heads).bind(g)


def side(g: torch.Tensor) -> tuple[KeptEntries, HalfLayout]:
    """Kept entries of g [..., H, E] with their pair indices and bag offsets, and the side's layout.

    The union over heads is marked in an [E, tokens] bool grid (the size of one head's routing); its
    non-zeros in row-major order are the pairs sorted by half then token, and a running count over
    the grid gives each entry's pair index.
    """
    entries = kept_entries(g)
    tokens, experts = entries.num_tokens, g.shape[-1]
    mark = torch.zeros(experts, tokens, dtype=torch.bool, device=g.device)
    mark[entries.half, entries.token] = True
    token = mark.nonzero(as_tuple=True)[1]
    position = mark.view(-1).cumsum(0) - 1
    entries.pair = position[entries.half * tokens + entries.token]
    entries.by_pair = torch.sort(entries.pair, stable=True).indices
    entries.offsets = bag_offsets(entries.bag, tokens * entries.heads)
    counts = mark.sum(dim=1).tolist()               # host sync on GPU (see the module docstring)
    return entries, HalfLayout(token, counts, tokens, experts)


def bag_offsets(sorted_index: torch.Tensor, bags: int) -> torch.Tensor:
    """Start of each bag in a sorted index list (empty bags allowed): embedding-bag offsets [bags]."""
    counts = torch.bincount(sorted_index, minlength=bags)
    return counts.cumsum(0) - counts


def combinations(first: KeptEntries, second: KeptEntries) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-head combinations K1_th x K2_th of kept g1 and g2 entries of the same (token, head), ragged:
    sum_{t,h} |K1_th| |K2_th| of them (about tokens * H * k^2; one host sync for the total). Returns each
    combination's g1 entry and g2 entry, [combinations] each, in g1-entry order."""
    bag1 = first.bag
    count2 = torch.bincount(second.bag, minlength=first.num_tokens * first.heads)
    repeat = count2[bag1]                                           # partners of each first entry
    total = int(repeat.sum())
    index1 = torch.repeat_interleave(torch.arange(bag1.shape[0], device=bag1.device), repeat, output_size=total)
    # The n-th combination of a run pairs its first entry with the n-th g2 entry of the bag.
    shift = (count2.cumsum(0) - count2)[bag1] - (repeat.cumsum(0) - repeat)    # bag's first g2 entry - run start
    return index1, torch.arange(total, device=bag1.device) + shift[index1]


@dataclass
class ActivePairs:
    """Ragged active experts of one routing group: one row per kept (token, head, i, j), flattened.

    token indexes the flattened leading dims of g; weight = g1_hi g2_hj (autograd-tracked). The same
    (token, i, j) appears once per head that activates it; its routing score is the sum of its weights.
    """

    token: torch.Tensor
    head: torch.Tensor
    i: torch.Tensor
    j: torch.Tensor
    weight: torch.Tensor


def active_pairs(g1: torch.Tensor, g2: torch.Tensor) -> ActivePairs:
    """Every (token, head, i, j) with g1_hi * g2_hj > 0 for g [..., H, E], ragged (never padded, never E^2)."""
    first, second = kept_entries(g1), kept_entries(g2)
    index1, index2 = combinations(first, second)
    return ActivePairs(first.token[index1], first.head[index1], first.half[index1], second.half[index2],
                       first.value[index1] * second.value[index2])


def merged_experts(g1: torch.Tensor, g2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token, each active expert once with its score sum_h g1_hi g2_hj: (token, id i*E + j, score),
    ragged, grouped by token (flattened leading dims), in no particular order within a token.

    An (i, j) can come from several heads only when both i and j are kept by at least two of the
    token's heads; only those candidates are merged (a sort of a few keys), the rest pass through.
    """
    experts = g1.shape[-1]
    pairs = active_pairs(g1, g2)
    token, ids, score = pairs.token, pairs.i * experts + pairs.j, pairs.weight
    # (token, half) kept by >= 2 heads: [tokens, E] per side.
    shared1, shared2 = ((g > 0).sum(dim=-2).reshape(-1, experts) > 1 for g in (g1, g2))
    candidate = (shared1[token, pairs.i] & shared2[token, pairs.j]).nonzero().squeeze(1)
    if candidate.numel():
        keys, inverse = torch.unique(token[candidate] * experts * experts + ids[candidate], return_inverse=True)
        total = score.new_zeros(keys.shape).index_add_(0, inverse, score[candidate])
        position = candidate.new_full(keys.shape, token.shape[0])
        position = position.scatter_reduce(0, inverse, candidate, reduce="amin")   # first occurrence
        score = score.index_put((position,), total)
        keep = torch.ones_like(token, dtype=torch.bool)
        keep[candidate[position[inverse] != candidate]] = False                    # the later occurrences
        kept = keep.nonzero().squeeze(1)
        token, ids, score = token[kept], ids[kept], score[kept]
    return token, ids, score


def gather_rows(hidden: torch.Tensor, token: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden [..., E, w] at (token, index) pairs -> [P', w] (token over the flattened leading dims)."""
    return hidden.reshape(-1, *hidden.shape[-2:])[token, index]


def add_rows(target: torch.Tensor, token: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """target [..., E(, w)] plus values accumulated at (token, index) pairs; out of place (autograd).

    An `index_add` over the flat (token, index) rows, which sums repeated pairs in index order on any number
    of threads: `index_put(accumulate=True)` on the CPU splits large index lists across threads and sums them
    in an order that varies from run to run (docs/performance.md, "Run-to-run differences")."""
    experts = target.shape[target.dim() - values.dim()]
    flat = target.reshape(-1, *values.shape[1:])                              # [B*T*E(, w)]
    return flat.index_add(0, token * experts + index, values).view_as(target)


@dataclass
class EditedEntries:
    """The active (token, head, i, j) whose edit weight is non-zero: indices into the two entry lists
    and the edit weight edit[i*E + j]; the term to remove is c E_ij(x) with c = g1_hi g2_hj edit[i*E + j]."""

    first: torch.Tensor
    second: torch.Tensor
    weight: torch.Tensor

    def coefficient(self, first: KeptEntries, second: KeptEntries) -> torch.Tensor:
        """c for every edited entry, from the entries' current (autograd-tracked) values."""
        return first.value[self.first] * second.value[self.second] * self.weight


def edited_entries(first: KeptEntries, second: KeptEntries, edit_weights: torch.Tensor,
                   experts: int) -> EditedEntries:
    """Only the active per-head pairs with a non-zero edit weight (ragged; O(active pairs) work).

    Every combination's expert id i*E + j is looked up in the table; only the hits are kept.
    """
    index1, index2 = combinations(first, second)
    table = edit_weights.to(device=first.token.device, dtype=first.value.dtype)
    weight = table[first.half[index1] * experts + second.half[index2]]
    hit = weight.nonzero().squeeze(1)
    return EditedEntries(index1[hit], index2[hit], weight[hit])


# ----------------------------------------------------------------------------------------------------------
# Grouped projections over the token-half layout

class GatherMatmul(torch.autograd.Function):
    """r_p = U_{half(p)} x_{token(p)} + b_{half(p)} for every pair p of a layout: [P, w].

    forward(x [tokens, d], layout, weight [E, w, d], bias [E, w]). One matmul per half over
    the gathered rows of x. Backward re-gathers the rows of x per half (nothing of size [P, d] is
    kept): grad_x scatters grad_r U_i back onto the tokens, grad_U_i = grad_r^T x_rows.

    The products are written in the orientation MKL runs fastest for a small w (U_i x_rows^T, then a
    transposed copy of the small [w, n] result): up to 1.7x faster than x_rows U_i^T at w = 6..12.
    """

    @staticmethod
    def forward(ctx, x, layout: HalfLayout, weight, bias):
        out = x.new_empty(layout.size, weight.shape[1])
        for half, start, stop, rows in layout.blocks():
            block = x.index_select(0, rows)
            out[start:stop] = torch.addmm(bias[half].unsqueeze(1), weight[half], block.t()).t()
        ctx.layout = layout
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, _, need_w, need_b = ctx.needs_input_grad
        grad_x = torch.zeros_like(x) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = grad_out.new_zeros(weight.shape[:2]) if need_b else None
        grad_t = grad_out.t().contiguous()                           # [w, P]: column blocks per half
        for half, start, stop, rows in ctx.layout.blocks():
            grad = grad_t[:, start:stop].t()                          # [n, w], transposed storage
            if grad_x is not None:
                grad_x.index_add_(0, rows, grad @ weight[half])
            if grad_w is not None:
                torch.mm(grad.t(), x.index_select(0, rows), out=grad_w[half])
            if grad_b is not None:
                torch.sum(grad_t[:, start:stop], dim=1, out=grad_b[half])
        return grad_x, None, grad_w, grad_b


class ScatterMatmul(torch.autograd.Function):
    """y_t = sum over pairs p of token t of W_{half(p)} c_p: [tokens, d_out].

    forward(c [P, K], layout, *weights), each weight [d_out, E, w_k] with sum_k w_k = K: W_j is the
    concatenation of the weights' j-th blocks (e.g. [V_j | b2_j]). One matmul per half, scattered onto
    the tokens with index_add. Backward saves only c and re-gathers grad_y rows per half; its two small
    products are computed transposed (W_j^T G^T and c^T G: [K, n] and [K, d_out]), the orientation MKL
    runs 1.4-2.2x faster than G W_j and G^T c at K = m + 1.
    """

    @staticmethod
    def forward(ctx, c, layout: HalfLayout, *weights):
        out = c.new_zeros(layout.num_tokens, weights[0].shape[0])
        for half, start, stop, rows in layout.blocks():
            out.index_add_(0, rows, c[start:stop] @ _block(weights, half).t())
        ctx.layout = layout
        ctx.save_for_backward(c, *weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        c, *weights = ctx.saved_tensors
        need_c, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2:]
        grad_c = torch.zeros_like(c) if need_c else None
        grad_w = [torch.zeros_like(w) if need else None for w, need in zip(weights, need_w, strict=True)]
        widths = [w.shape[-1] for w in weights]
        grad_out = grad_out.contiguous()
        for half, start, stop, rows in ctx.layout.blocks():
            grad = grad_out.index_select(0, rows)                     # [n, d_out]
            if grad_c is not None:
                grad_c[start:stop] = (_block(weights, half).t() @ grad.t()).t()
            if any(need_w):
                full = c[start:stop].t() @ grad                       # [K, d_out]
                for target, part in zip(grad_w, full.split(widths, dim=0), strict=True):
                    if target is not None:
                        target[:, half] = part.t()
        return (grad_c, None, *grad_w)


def use_kernels(x: torch.Tensor) -> bool:
    """Whether the grouped projections run on the Triton kernels (`monet.kernels`): $MONET_KERNELS auto (the
    default: on CUDA when triton is installed), on (required; on the CPU only under TRITON_INTERPRET=1) or off."""
    mode = os.environ.get("MONET_KERNELS", "auto")
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"MONET_KERNELS must be auto, on or off, got {mode!r}")
    if mode == "on" and not kernels.available(x):
        raise RuntimeError("MONET_KERNELS=on needs triton (pip install 'monet[gpu]') and a CUDA tensor, or "
                           "TRITON_INTERPRET=1 for CPU tensors")
    return mode == "on" or (mode == "auto" and x.is_cuda and kernels.available(x))


def gather_matmul(x: torch.Tensor, layout: HalfLayout, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`GatherMatmul`: the per-half loop (the kernels have their own layout: `static_routing`)."""
    return GatherMatmul.apply(x, layout, weight, bias)


def scatter_matmul(c: torch.Tensor, layout: HalfLayout, *weights: torch.Tensor) -> torch.Tensor:
    """`ScatterMatmul`: the per-half loop (the kernels have their own layout: `static_routing`)."""
    return ScatterMatmul.apply(c, layout, *weights)


def _block(weights: tuple[torch.Tensor, ...], half: int) -> torch.Tensor:
    """[W^1_half | W^2_half | ...]: [d_out, K] (a copy of d_out * K values, small next to the matmul)."""
    return torch.cat([w[:, half] for w in weights], dim=1)


def _bag(ids: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[b] = sum over the entries e of bag b (bags given by their offsets) of weights[e] * table[ids[e]]."""
    return F.embedding_bag(ids, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype))


def _with_ones(t: torch.Tensor) -> torch.Tensor:
    """[t | 1]: the extra column that carries the routing mass to the bias of the output projection."""
    return torch.cat((t, t.new_ones(t.shape[0], 1)), dim=1)


def _up(layer, linear, x2: torch.Tensor, layout: HalfLayout) -> torch.Tensor:
    """sigma(U_i x + b_i) for every pair of the layout: [P, width of one half]."""
    weight, bias = linear.weight.unflatten(0, (layer.experts, -1)), linear.bias.view(layer.experts, -1)
    return layer.act(gather_matmul(x2, layout, weight, bias))


def _spread(entries: KeptEntries, per_head: torch.Tensor, size: int) -> torch.Tensor:
    """[sum_h g_h per_head_h | sum_h g_h] for every (token, half) pair of the entries' side: [size, w+1]."""
    order = entries.by_pair
    return _bag(entries.bag[order], _with_ones(per_head), bag_offsets(entries.pair[order], size),
                entries.value[order])


# ----------------------------------------------------------------------------------------------------------
# The kernel path: a static layout (no host synchronisation)
#
# On a GPU every size the host needs (a tensor's shape, a loop's length, a launch grid) costs a sync when it
# depends on the routing's values. The router keeps a data-dependent number of entries per head (a threshold,
# eq. 9, not a top-k), so this layout holds a static capacity of K entries per (token, head), and every size is
# a function of (tokens, H, K, E) alone: entries from `topk` instead of `nonzero`, sorted by half with
# `argsort`, counted per half with `index_add_` into the kernels' block table (`kernels.device_block_table`),
# and each bag's K x K combinations (the active experts, never E^2) for the edit table. Unused slots have
# g = 0 and sort behind every kept entry, so no kernel block reads or writes them. Entries are used rather
# than de-duplicated (token, half) pairs: a half kept by two heads of a token is projected twice (4-5 % more
# rows at the released shapes), and the sums over heads add the duplicates (eq. 10 as written).

KERNEL_CAPACITY = 64     # K per (token, head): 8 k at the released k = 8; the trained demo model keeps at most 36


def kernel_capacity(experts: int) -> int:
    """K for E halves: $MONET_KERNEL_CAPACITY (default KERNEL_CAPACITY), at most E (K = E is always exact)."""
    value = os.environ.get("MONET_KERNEL_CAPACITY", str(KERNEL_CAPACITY))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"MONET_KERNEL_CAPACITY must be a positive integer, got {value!r}")
    return min(int(value), experts)


@dataclass
class StaticSide:
    """One side's kept entries at a static capacity of K slots per (token, head), for the kernels.

    Slot (t, h, s) holds the s-th largest g of head h at token t: its `half` and `flat` position in
    g.reshape(-1) ([T, H, K]; the bag's `kept` [T*H] entries first, an unused slot has g = 0). The kernels see
    the slots sorted by half, the unused ones last: `order` (the slot of each sorted row), `token` and
    `half_of_row` (E for an unused slot) per sorted row, `row` (the sorted row of each slot) and the block
    table `table` built from per-half counts that stay on the device. `value` = g at the slots (an
    autograd-tracked gather, [T, H, K]).
    """

    half: torch.Tensor
    flat: torch.Tensor
    order: torch.Tensor
    token: torch.Tensor
    half_of_row: torch.Tensor
    row: torch.Tensor
    table: tuple[torch.Tensor, ...]
    kept: torch.Tensor
    value: torch.Tensor | None = None

    def bind(self, g: torch.Tensor) -> StaticSide:
        """A copy whose values are gathered from g (same kept pattern): one gather, autograd-tracked."""
        return dataclasses.replace(self, value=g.reshape(-1).index_select(0, self.flat.view(-1)).view(self.flat.shape))


def static_side(g: torch.Tensor, capacity: int) -> StaticSide:
    """The static layout of g [..., H, E] (tokens = the flattened leading dims) at K = capacity slots per head.

    No host sync: `topk` (not `nonzero`), a stable `argsort` of the slots' halves (unused slots get the key E),
    per-half counts by `index_add_`. That no head kept more than K entries is checked on the device
    (`torch._assert_async`: an error, never a silently dropped entry)."""
    g = g.reshape(-1, *g.shape[-2:])
    tokens, heads, experts = g.shape
    with torch.no_grad():
        top, half = g.topk(capacity, dim=-1)                                   # [T, H, K], kept slots first
        torch._assert_async(((g > 0).sum(dim=-1) <= capacity).all(),
                            f"a routing head kept more than {capacity} halves, the kernel path's static capacity: "
                            f"set MONET_KERNEL_CAPACITY higher (at most E = {experts}) or MONET_KERNELS=off")
        key = torch.where(top > 0, half, experts).reshape(-1)
        order = torch.argsort(key, stable=True)                                # by half, then token; unused last
        row = torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=g.device))
        counts = torch.zeros(experts + 1, dtype=torch.int64, device=g.device)
        counts.index_add_(0, key, torch.ones_like(key))
        table = kernels.device_block_table(counts[:experts], key.shape[0], kernels.BLOCK_P)
        flat = torch.arange(tokens * heads, device=g.device).view(tokens, heads, 1) * experts + half
        kept = (top > 0).sum(dim=-1).flatten()                                 # [T * H]
    return StaticSide(half, flat, order, order // (heads * capacity), key[order], row, table, kept).bind(g)


@dataclass
class StaticRouting:
    """Both sides of a routing group's static layout (`static_side`), the group's [E*E] edit table in the routing
    values' dtype (None: unedited; the kernels read it for each bag's K x K combinations) and, as `Routing`'s,
    the active fraction (on the device)."""

    first: StaticSide
    second: StaticSide
    num_tokens: int
    experts: int
    capacity: int
    edit: torch.Tensor | None
    active_fraction: torch.Tensor

    def bind(self, g1: torch.Tensor, g2: torch.Tensor) -> StaticRouting:
        return dataclasses.replace(self, first=self.first.bind(g1), second=self.second.bind(g2))

    def mix(self, self_first: bool, modes: tuple[str, ...]) -> kernels.Mix:
        """The fused scatter's input stage over side 1's slots (self_first) or side 2's (`kernels.Mix`)."""
        mine, other = (self.first, self.second) if self_first else (self.second, self.first)
        return kernels.Mix(mine.order, mine.token, mine.table, mine.half.reshape(-1), other.half.reshape(-1),
                           other.kept, self.capacity, self.experts, self_first, modes, self.edit)


def static_routing(g1: torch.Tensor, g2: torch.Tensor, edit_weights: torch.Tensor | None = None) -> StaticRouting:
    """The kernel path's layout of g1, g2 [..., H, E] and an [E*E] edit table: no host sync."""
    experts = g1.shape[-1]
    capacity = kernel_capacity(experts)
    first, second = static_side(g1, capacity), static_side(g2, capacity)
    edit = None if edit_weights is None else edit_weights.to(device=g1.device, dtype=first.value.dtype)
    with torch.no_grad():
        active = [(g.reshape(-1, *g.shape[-2:]) > 0).any(dim=-2).sum() for g in (g1, g2)]
        fraction = torch.maximum(*active) / max(1, first.half.shape[0] * experts)
    return StaticRouting(first, second, first.half.shape[0], experts, capacity, edit, fraction)


def _slots(layer, linear, x2: torch.Tensor, side: StaticSide) -> torch.Tensor:
    """sigma(U_i x + b_i) for every slot of the side (the gather kernel over the sorted rows): [T*H*K, w]."""
    weight, bias = linear.weight.unflatten(0, (layer.experts, -1)), linear.bias.view(layer.experts, -1)
    rows = kernels.GatherMatmulKernel.apply(x2, side.token, side.table, weight, bias, side.half_of_row)
    return layer.act(rows).index_select(0, side.row)


def kernel_hd_forward(layer, x: torch.Tensor, routing: StaticRouting) -> torch.Tensor:
    """MonetHorizontalExperts on the kernels and the static layout (eq. 12): one input row per g2 slot (h, j),
    mixed inside the scatter kernel: y_t = sum_{h, j} [V_j | b2_j] sum_i g2_hj g1_hi keep_ij [sigma(U_i x_t + b1_i) ; 1]
    (keep_ij = 1 - edit[i*E + j], 1 unedited)."""
    shape = x.shape
    first, second = routing.first, routing.second
    hidden = _slots(layer, layer.u, x.reshape(-1, shape[-1]), first)                  # [T*H*K, m]
    weight_v = layer.v.weight.unflatten(1, (layer.experts, -1))
    out = kernels.MixScatterKernel.apply(routing.mix(False, ("other", "ones")), routing.num_tokens,
                                         second.value.reshape(-1), first.value.reshape(-1), None, hidden,
                                         weight_v, layer.b.t().unsqueeze(-1))
    return out.view(shape)


def kernel_vd_forward(layer, x: torch.Tensor, routing: StaticRouting) -> torch.Tensor:
    """MonetVerticalExperts on the kernels and the static layout (A.1): with w_hij = g1_hi g2_hj keep_ij, the
    g1 slot (h, i) feeds [V11_i | V12_i | b12_i] with [sum_j w a1_i ; sum_j w a2_j ; sum_j w] and the g2 slot
    (h, j) feeds [V21_j | V22_j | b22_j] with [sum_i w a1_i ; sum_i w a2_j ; sum_i w] (eq. 23-28), each row
    mixed inside the scatter kernel."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    first, second = routing.first, routing.second
    left, right = _slots(layer, layer.u1, x2, first), _slots(layer, layer.u2, x2, second)   # [T*H*K, m/2]
    g1, g2 = first.value.reshape(-1), second.value.reshape(-1)

    def blocks(linear):
        return linear.weight.unflatten(1, (layer.experts, -1))

    top = kernels.MixScatterKernel.apply(routing.mix(True, ("self", "other", "ones")), routing.num_tokens, g1, g2,
                                         left, right, blocks(layer.v11), blocks(layer.v12), layer.b1.t().unsqueeze(-1))
    bottom = kernels.MixScatterKernel.apply(routing.mix(False, ("other", "self", "ones")), routing.num_tokens, g2,
                                            g1, right, left, blocks(layer.v21), blocks(layer.v22),
                                            layer.b2.t().unsqueeze(-1))
    return torch.cat((top, bottom), dim=-1).view(shape)


# ----------------------------------------------------------------------------------------------------------
# The layers


@dataclass
class Routing:
    """Both sides of one routing group's sparse structure ([tokens, H, E] flattened): kept entries with
    values and their layouts (`side`), and the edited active pairs of the group's edit table (None: unedited).
    On the Triton kernels (`use_kernels`) only `static` is set: the sync-free layout of `static_routing`."""

    first: KeptEntries | None
    layout1: HalfLayout | None
    second: KeptEntries | None
    layout2: HalfLayout | None
    edit: EditedEntries | None = None
    static: StaticRouting | None = None

    @property
    def active_fraction(self) -> float:
        """Active (token, half) pairs over tokens * E, the larger of the two sides (host ints; on the kernel
        path read from the device: a sync, only `choose`'s auto rule asks, and never off the CPU)."""
        if self.static is not None:
            return float(self.static.active_fraction)
        total = max(1, self.layout1.num_tokens * self.layout1.experts)
        return max(self.layout1.size, self.layout2.size) / total

    def bind(self, g1: torch.Tensor, g2: torch.Tensor) -> Routing:
        """The same structure with values gathered from g1, g2 [..., H, E] (this call's autograd graph)."""
        if self.static is not None:
            return dataclasses.replace(self, static=self.static.bind(g1, g2))
        return dataclasses.replace(self, first=self.first.bind(g1), second=self.second.bind(g2))



def sparse_routing(g1: torch.Tensor, g2: torch.Tensor, edit_weights: torch.Tensor | None = None) -> Routing:
    """Kept entries, layouts and bag offsets of g1, g2 [..., H, E] (flattened over the leading dims), and the
    edited active pairs of an [E*E] edit table. Where `use_kernels`: the static layout (`static_routing`)."""
    if use_kernels(g1):
        return Routing(None, None, None, None, static=static_routing(g1, g2, edit_weights))
    first, layout1 = side(g1)
    second, layout2 = side(g2)
    edit = None if edit_weights is None else edited_entries(first, second, edit_weights, layout1.experts)
    return Routing(first, layout1, second, layout2, edit)


def hd_forward(layer, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """MonetHorizontalExperts on the active halves only (eq. 12); same value as the dense layer."""
    if routing.static is not None:
        return kernel_hd_forward(layer, x, routing.static)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    first, second, layout1, layout2 = routing.first, routing.second, routing.layout1, routing.layout2
    hidden = _up(layer, layer.u, x2, layout1)                                      # [P1, m]: sigma(U_i x + b1_i)
    per_head = _bag(first.pair, hidden, first.offsets, first.value)                # sum_i g1_hi sigma(...)
    top_input = _spread(second, per_head, layout2.size)                            # [P2, m+1]: [c_tj, s2_tj]
    edit = routing.edit
    if edit is not None:
        p, q = first.pair[edit.first], second.pair[edit.second]
        # Remove c (V_j sigma(U_i x + b1_i) + b2_j): [V_j | b2_j] meets [sigma(U_i x + b1_i), 1].
        c = edit.coefficient(first, second).unsqueeze(-1)
        top_input.index_add_(0, q, -c * _with_ones(hidden[p]))      # in place: nothing saved it
    weight_v = layer.v.weight.unflatten(1, (layer.experts, -1))
    out = scatter_matmul(top_input, layout2, weight_v, layer.b.t().unsqueeze(-1))
    return out.view(shape)


def vd_forward(layer, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """MonetVerticalExperts on the active halves only (appendix A.1, six terms); same value as dense."""
    if routing.static is not None:
        return kernel_vd_forward(layer, x, routing.static)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    first, second, layout1, layout2 = routing.first, routing.second, routing.layout1, routing.layout2
    left = _up(layer, layer.u1, x2, layout1)                       # a1 [P1, m/2]
    right = _up(layer, layer.u2, x2, layout2)                      # a2 [P2, m/2]
    per_head1 = _bag(first.pair, left, first.offsets, first.value)             # sum_i g1_hi a1_i
    per_head2 = _bag(second.pair, right, second.offsets, second.value)          # sum_j g2_hj a2_j
    # [X12_ti, s1_ti] (eq. 26, 28) and [X21_tj, s2_tj] (eq. 27, 25): spread each head's sum over the other side.
    cross12, cross21 = _spread(first, per_head2, layout1.size), _spread(second, per_head1, layout2.size)
    s1, s2 = cross12[:, -1:], cross21[:, -1:]
    top_input = torch.cat((s1 * left, cross12), dim=1)                         # [V11_i | V12_i | b12_i]
    bottom_input = torch.cat((cross21[:, :-1], s2 * right, s2), dim=1)          # [V21_j | V22_j | b22_j]
    edit = routing.edit
    if edit is not None:
        p, q = first.pair[edit.first], second.pair[edit.second]
        # Remove c E_ij(x): both output blocks of expert (i, j) read [a1_ti, a2_tj, 1] (eq. 21).
        c = edit.coefficient(first, second).unsqueeze(-1)
        term = -c * _with_ones(torch.cat((left[p], right[q]), dim=1))
        top_input.index_add_(0, p, term)                    # in place: nothing saved these
        bottom_input.index_add_(0, q, term)

    def blocks(linear):
        return linear.weight.unflatten(1, (layer.experts, -1))

    top = scatter_matmul(top_input, layout1, blocks(layer.v11), blocks(layer.v12), layer.b1.t().unsqueeze(-1))
    bottom = scatter_matmul(bottom_input, layout2, blocks(layer.v21), blocks(layer.v22), layer.b2.t().unsqueeze(-1))
    return torch.cat((top, bottom), dim=-1).view(shape)


# ----------------------------------------------------------------------------------------------------------
# Decoding: a few tokens per call


@dataclass
class KeptRouting:
    """One call's routing values on the kept halves ([tokens, H, E1], [tokens, H, E2] in the layer's dtype),
    with what every layer of the group reads from them: the bias weights s_s = sum_h g_s (edited: minus the
    edited experts' coefficients, see `KeptHalves.restrict`) gathered for the bias bags, and the edited active
    pairs (token, i, j, c) in kept-half indices (None: unedited)."""

    g1: torch.Tensor
    g2: torch.Tensor
    s1: torch.Tensor                  # [tokens, E1]: weight of b12_i (VD) and of the straight flow s1 a1
    s2: torch.Tensor                  # [tokens, E2]: weight of b2_j (HD) / b22_j (VD), straight flow s2 a2
    bias1: torch.Tensor               # s1 at the (token, half) blocks of the bias bags of side 1
    bias2: torch.Tensor
    edit: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
    edit_weights: torch.Tensor | None


@dataclass(eq=False)
class KeptHalves:
    """The halves some token and head of the call kept, per side (sorted ids, [E1] and [E2] long).

    Decoding runs 1-8 tokens per call, so the union over tokens and heads stays a small share of E
    (61 of 512 at one token of the 1.4B model). The dense formula restricted to these halves is the
    same sum (every other half has g = 0 for every token: eq. 10 = eq. 8) and reads only their
    weights: rows of U and b1 (a gather), columns of V and rows of b2 (embedding bags read in place),
    an [E1, E2] block of an edit table. Memory-bound decoding then reads about E1/E of the expert
    weights (`hd_decode`, `vd_decode`).

    Built once per routing group (`monet.model.RoutingGroup.kept_halves`): the index lists of the
    bags (`columns`, `bias_bag`) and, when autograd does not track the routing, its restricted values
    and edited pairs (`restrict`) are kept here and reused by every layer of the group.
    Host syncs: the union's size per side and the number of kept (token, half) blocks.
    Gradients: exact for x, every weight and g on its kept entries (off them: partial sums, unlike
    the dense path; the router's softmax backward never reads them).
    """

    first: torch.Tensor
    second: torch.Tensor
    experts: int
    kept: tuple[torch.Tensor, torch.Tensor] | None = None    # per side: [tokens, E_s] bool (`restrict`, > 1 token)
    _cache: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def active_fraction(self) -> float:
        return max(self.first.numel(), self.second.numel()) / max(1, self.experts)

    def halves(self, side: int) -> torch.Tensor:
        return self.first if side == 1 else self.second

    def restrict(self, g1: torch.Tensor, g2: torch.Tensor, dtype: torch.dtype,
                 edit_weights: torch.Tensor | None = None) -> KeptRouting:
        """g1, g2 [..., H, E] on the kept halves' columns (every other column is 0), in dtype, with the bias
        weights and the edited active pairs of the [E * E] table `edit_weights` (ragged, `edited_entries`).

        Edits (eq. 12 and A.1 with c E_ij(x) removed per edited active pair): the bias weights lose c at i
        (VD b12_i) and j (b2_j / b22_j), and so do VD's straight flows s1 a1 and s2 a2, since
        sum_(h,j edited) c a1_i is a1_i times the same sum; the layers remove the cross terms themselves.
        Kept for the group's other layers when autograd does not track g1, g2 (decoding): a tracked call
        gathers again, so no graph is shared between backward passes.
        """
        tracked = torch.is_grad_enabled() and (g1.requires_grad or g2.requires_grad)
        cached = None if tracked else self._cache.get(dtype)
        if cached is not None and cached.edit_weights is edit_weights:
            return cached
        g1, g2 = (g.reshape(-1, *g.shape[-2:]).index_select(-1, halves).to(dtype)
                  for g, halves in ((g1, self.first), (g2, self.second)))
        if self.kept is None and g1.shape[0] > 1:       # one token kept every half of the union
            self.kept = ((g1 > 0).any(dim=1), (g2 > 0).any(dim=1))
        s1, s2 = g1.sum(dim=1), g2.sum(dim=1)
        edit = None
        table = self.table(edit_weights)
        if table is not None:
            first, second = kept_entries(g1), kept_entries(g2)
            edited = edited_entries(first, second, table, g2.shape[-1])      # row-major [E1, E2] block
            token, i, j = first.token[edited.first], first.half[edited.first], second.half[edited.second]
            c = edited.coefficient(first, second)
            edit = (token, i, j, c)
            s1, s2 = add_rows(s1, token, i, -c), add_rows(s2, token, j, -c)
        (_, _, select1), (_, _, select2) = self.bias_bag(1), self.bias_bag(2)
        bias1, bias2 = (s.reshape(-1) if select is None else s.reshape(-1).index_select(0, select)
                        for s, select in ((s1, select1), (s2, select2)))
        routing = KeptRouting(g1, g2, s1, s2, bias1, bias2, edit, edit_weights)
        if not tracked:
            self._cache[dtype] = routing
        return routing

    def bias_bag(self, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(ids, offsets, select) of an embedding bag over the rows of a side's [E, d_out] bias: per token,
        the halves it kept (any head), and where their weights sit in a [tokens, E_s] tensor (None: all)."""
        key = ("bias", side)
        if key not in self._cache:
            halves = self.halves(side)
            if self.kept is None:       # one token (`restrict`): it kept every half of the union
                self._cache[key] = halves, halves.new_zeros(1), None
            else:
                kept = self.kept[side - 1]
                tokens, size = kept.shape
                token, block = kept.nonzero(as_tuple=True)                   # token-major: bags in order
                select = None if token.numel() == tokens * size else token * size + block
                self._cache[key] = halves[block], bag_offsets(token, tokens), select
        return self._cache[key]

    def columns(self, side: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(ids, offsets, select) of an embedding bag over the columns of a side's output projection
        [d_out, E * width]: per token, the `width` columns of each half it kept (the inputs of the others
        are 0 by construction: g = 0 in every term), and where their inputs sit in a [tokens, E_s, width]
        tensor (None: all of it, as at one token)."""
        key = ("columns", side, width)
        if key not in self._cache:
            ids, offsets, select = self.bias_bag(side)
            step = torch.arange(width, device=ids.device)
            if select is not None:
                select = ((select * width).unsqueeze(1) + step).view(-1)
            if offsets.numel() > 1:                                        # one token: [0] as it is
                offsets = offsets * width
            self._cache[key] = ((ids * width).unsqueeze(1) + step).view(-1), offsets, select
        return self._cache[key]

    def column_pairs(self, side: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`columns` for a `paired_columns` table: each column id r becomes rows 2r and 2r + 1 (twice the entries
        per bag; `select` unchanged, the values of the two projections are interleaved by the caller)."""
        key = ("column_pairs", side, width)
        if key not in self._cache:
            ids, offsets, select = self.columns(side, width)
            self._cache[key] = torch.stack((2 * ids, 2 * ids + 1), dim=1).view(-1), offsets * 2, select
        return self._cache[key]

    def table(self, edit_weights: torch.Tensor | None) -> torch.Tensor | None:
        """The [E1 * E2] block of an [E * E] edit table (entry i*E2 + j: expert (first[i], second[j]))."""
        if edit_weights is None:
            return None
        table = edit_weights.view(self.experts, self.experts).index_select(0, self.first.to(edit_weights.device))
        return table.index_select(1, self.second.to(edit_weights.device)).reshape(-1)


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """weight^T [E * w, d_out] as a contiguous tensor, for weight [d_out, E * w] (a Parameter or tensor).

    A row-major weight is stored column-major once, in place (`.data`: the same Parameter, values and
    shape; strides (1, d_out)). Matmuls read either layout at the same speed (F.linear multiplies by
    weight^T), `save_pretrained` writes contiguous copies, and the sparse path's column blocks become
    contiguous too; only the decode path needs it.
    """
    if weight.stride() != (1, weight.shape[0]):            # read on every decode call: no tensor op
        with _normal_tensors():
            weight.data = weight.data.t().contiguous().t()
    return weight.t()


@contextmanager
def _normal_tensors() -> Iterator[None]:
    """No autograd, and not inference mode even inside `torch.inference_mode()`: a weight's new storage made
    while decoding there would be an inference tensor, and training the model afterwards would fail."""
    with torch.no_grad(), torch.inference_mode(False):
        yield


def kept_halves(g1: torch.Tensor, g2: torch.Tensor) -> KeptHalves:
    """The union over tokens and heads of the kept halves of g1, g2 [..., H, E]."""
    experts = g1.shape[-1]
    first, second = ((g.reshape(-1, experts) > 0).any(dim=0).nonzero().squeeze(1) for g in (g1, g2))
    return KeptHalves(first, second, experts)


def _kept_up(layer, linear, x2: torch.Tensor, halves: torch.Tensor) -> torch.Tensor:
    """sigma(U_i x + b_i) for the kept halves i: [tokens, E_s, w]. At one token on the CPU, one product per
    half read in place (each half's rows of U are w * d contiguous values, seen through `_half_views`), the
    biases added in one gather; otherwise the halves' rows are gathered into one matrix for one product (a
    copy: a write and a second read; at 4 tokens a loop won at one shape and lost at another, and on a GPU it
    would be one launch per half). `torch.mv` per half into rows of one tensor costs less than `torch.addmv` per
    half and a stack (48 halves of the 1.4B VD shape, cold caches: 0.50 -> 0.38 ms with `mv`, 0.23 -> 0.17 ms
    without the stack); figures in docs/performance.md, "Decode results"."""
    if x2.shape[0] == 1 and x2.device.type == "cpu" and halves.numel() and not torch.is_grad_enabled():
        x1 = x2[0]
        weights = _half_views(layer, linear)
        products = x1.new_empty(halves.numel(), weights[0].shape[0])
        for row, i in zip(products.unbind(0), halves.tolist(), strict=True):    # written in place: no stack
            torch.mv(weights[i], x1, out=row)
        products += linear.bias.view(layer.experts, -1).index_select(0, halves)
        return layer.act(products).view(1, halves.numel(), -1)
    weight = linear.weight.unflatten(0, (layer.experts, -1))                               # [E, w, d]
    bias = linear.bias.view(layer.experts, -1)                                            # [E, w]
    weight, bias = weight.index_select(0, halves), bias.index_select(0, halves)
    return layer.act(F.linear(x2, weight.flatten(0, 1), bias.view(-1))).view(x2.shape[0], halves.numel(), -1)


def _half_views(layer, linear) -> tuple[torch.Tensor, ...]:
    """Every half's rows of an up-projection as views [w, d] (no autograd), made once per weight and kept on
    the layer: indexing [E, w, d] per half and call is a tensor op each, a third of the one-token loop. Keyed
    by the weight's address (a view keeps its storage alive, so a new weight cannot reuse it); moving or
    casting the layer drops them (`monet.model.ExpertLayer._apply`)."""
    cache = layer.__dict__.setdefault("_half_views", {})
    key = linear.weight.data_ptr()
    entry = cache.get(id(linear))
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = cache[id(linear)] = key, linear.weight.unflatten(0, (layer.experts, -1)).unbind(0)
    return entry[1]


def paired_columns(layer, first: torch.nn.Linear, second: torch.nn.Linear) -> torch.Tensor:
    """Two output projections that one side's halves read (VD: V11 and V12 for i, V21 and V22 for j; each
    [d_out, E * w]) stored as one table [2 * E * w, d_out] whose rows alternate (column r of `first`, column r
    of `second`), in place (`.data`: the same Parameters, values and shapes; strides (1, 2 * d_out)). A kept
    half's columns of both are then one block of 2 * w * d_out contiguous values read by one embedding bag,
    where two column-major weights took two bags over blocks half as long (VD's blocks were half HD's: issue
    24, docs/performance.md). Kept on the layer and rebuilt if a weight was replaced; moving or casting the
    layer drops it (`ExpertLayer._apply`), and state dicts hold contiguous copies (`MonetVerticalExperts`:
    safetensors refuses tensors that share memory). Under autograd (a forced decode path) a differentiable copy
    is made per call instead."""
    if torch.is_grad_enabled() and (first.weight.requires_grad or second.weight.requires_grad):
        return torch.stack((first.weight.t(), second.weight.t()), dim=1).flatten(0, 1)
    cache = layer.__dict__.setdefault("_paired_columns", {})
    entry = cache.get(id(first))
    if entry is None or entry[0] != (first.weight.data_ptr(), second.weight.data_ptr()):
        with _normal_tensors():
            table = torch.stack((first.weight.t(), second.weight.t()), dim=1)       # [E * w, 2, d_out]
            first.weight.data, second.weight.data = table[:, 0].t(), table[:, 1].t()
        entry = cache[id(first)] = (first.weight.data_ptr(), second.weight.data_ptr()), table.flatten(0, 1)
    return entry[1]


def _kept_project(plan: KeptHalves, weight: torch.Tensor, inputs: torch.Tensor, side: int) -> torch.Tensor:
    """inputs [tokens, E_s, w] times the side's columns of weight [d_out, E * w] -> [tokens, d_out]: an
    embedding bag over the columns the tokens kept (`KeptHalves.columns`), read in place from the
    column-major weight (`column_major`: a column of a row-major matrix is d_out scattered values)."""
    ids, offsets, select = plan.columns(side, inputs.shape[-1])
    values = inputs.reshape(-1) if select is None else inputs.reshape(-1).index_select(0, select)
    return F.embedding_bag(ids, column_major(weight), offsets, mode="sum", per_sample_weights=values)


def _paired_project(plan: KeptHalves, table: torch.Tensor, first: torch.Tensor, second: torch.Tensor,
                    side: int) -> torch.Tensor:
    """first @ A^T + second @ B^T for the side's columns of two projections A, B stored as `paired_columns`'
    table, first and second [tokens, E_s, w]: one embedding bag over both (`KeptHalves.column_pairs`)."""
    ids, offsets, select = plan.column_pairs(side, first.shape[-1])
    values = [t.reshape(-1) if select is None else t.reshape(-1).index_select(0, select) for t in (first, second)]
    return F.embedding_bag(ids, table, offsets, mode="sum", per_sample_weights=torch.stack(values, dim=1).view(-1))


def _kept_bias(plan: KeptHalves, bias: torch.Tensor, weights: torch.Tensor, side: int) -> torch.Tensor:
    """sum_j s_tj b_j over the halves each token kept, for a side's bias rows [E, d_out]: [tokens, d_out]."""
    ids, offsets, _ = plan.bias_bag(side)
    return F.embedding_bag(ids, bias, offsets, mode="sum", per_sample_weights=weights)


def hd_decode(layer, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, plan: KeptHalves,
              edit_weights: torch.Tensor | None = None) -> torch.Tensor:
    """MonetHorizontalExperts on the kept halves' weights only (eq. 12 restricted to them); same value as
    the dense layer, with the edits of `edit_weights` ([E * E]) applied."""
    shape = x.shape
    if plan.first.numel() == 0:                                     # no token at all
        return x.new_zeros(shape)
    x2 = x.reshape(-1, shape[-1])
    routing = plan.restrict(g1, g2, x.dtype, edit_weights)
    hidden = _kept_up(layer, layer.u, x2, plan.first)                              # [N, E1, m]
    top_input = torch.bmm(routing.g2.transpose(1, 2), torch.bmm(routing.g1, hidden))   # [N, E2, m]
    if routing.edit is not None:
        token, i, j, c = routing.edit
        # Remove c_ij V_j sigma(U_i x + b1_i) for every edited active pair (its c_ij b2_j left s2 already).
        top_input = add_rows(top_input, token, j, -c.unsqueeze(-1) * hidden[token, i])
    out = _kept_project(plan, layer.v.weight, top_input, 2) + _kept_bias(plan, layer.b, routing.bias2, 2)
    return out.view(shape)


def vd_decode(layer, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, plan: KeptHalves,
              edit_weights: torch.Tensor | None = None) -> torch.Tensor:
    """MonetVerticalExperts on the kept halves' weights only (appendix A.1, six terms, restricted to them);
    same value as the dense layer, with the edits of `edit_weights` ([E * E]) applied."""
    shape = x.shape
    if plan.first.numel() == 0:
        return x.new_zeros(shape)
    x2 = x.reshape(-1, shape[-1])
    routing = plan.restrict(g1, g2, x.dtype, edit_weights)
    g1, g2 = routing.g1, routing.g2
    h1 = _kept_up(layer, layer.u1, x2, plan.first)                  # a1 [N, E1, m/2]
    h2 = _kept_up(layer, layer.u2, x2, plan.second)                 # a2 [N, E2, m/2]
    cross12 = torch.bmm(g1.transpose(1, 2), torch.bmm(g2, h2))      # X12 (eq. 26) [N, E1, m/2]
    cross21 = torch.bmm(g2.transpose(1, 2), torch.bmm(g1, h1))      # X21 (eq. 27) [N, E2, m/2]
    if routing.edit is not None:
        token, i, j, c = routing.edit
        # Remove the cross terms of c_ij E_ij(x); its straight and bias terms left s1, s2 already.
        c = c.unsqueeze(-1)
        cross12 = add_rows(cross12, token, i, -c * h2[token, j])
        cross21 = add_rows(cross21, token, j, -c * h1[token, i])
    # V11|V12 and V21|V22 each read by one bag over their interleaved columns (`paired_columns`).
    top_table, bottom_table = paired_columns(layer, layer.v11, layer.v12), paired_columns(layer, layer.v21, layer.v22)
    top = (_paired_project(plan, top_table, routing.s1.unsqueeze(-1) * h1, cross12, 1)
           + _kept_bias(plan, layer.b1, routing.bias1, 1))
    bottom = (_paired_project(plan, bottom_table, cross21, routing.s2.unsqueeze(-1) * h2, 2)
              + _kept_bias(plan, layer.b2, routing.bias2, 2))
    return torch.cat((top, bottom), dim=-1).view(shape)


# ----------------------------------------------------------------------------------------------------------
# Dispatch

PATHS = ("auto", "dense", "sparse", "decode")
# Auto rule (CPU, one thread; measured at the 850M shape, HD and VD, interleaved): sparse when at most
# this fraction of (token, half) pairs is active (sparse / dense time: 0.5-0.66 at 0.09, the released
# models' k = 8 of 512; 0.98 (HD) and 1.29 (VD) at 0.32; 1.7-2.5 at 0.55) ...
SPARSE_MAX_ACTIVE_FRACTION = 0.2
# ... and the dense projections are big enough that the loop over E halves is amortised: tokens * d * m
# multiply-adds per half (sparse / dense: 1.3-1.6 at 64 tokens, 0.5-0.7 at 256 tokens of the 850M shape).
SPARSE_MIN_WORK_PER_HALF = 1 << 22
# Decoding (`KeptHalves`): at most this many tokens per call (a KV-cache step of 1-8 sequences), and the
# kept halves at most this share of E on either side (at one token of the released models: 0.09-0.12;
# the gathered weights cost about their share of the dense time plus the copy, docs/performance.md).
DECODE_MAX_TOKENS = 8
DECODE_MAX_ACTIVE_FRACTION = 0.5

_forced: list[str] = []   # the paths of the `expert_path` blocks entered, innermost last


@contextmanager
def expert_path(path: str) -> Iterator[None]:
    """The one switch of the expert computation: force the dense, sparse or decode path within the block
    ("auto", the default outside any block, restores the rule of `choose`; `monet bench --path` sets it)."""
    if path not in PATHS:
        raise ValueError(f"expert path must be one of {PATHS}, got {path!r}")
    _forced.append(path)
    try:
        yield
    finally:
        _forced.pop()


def choose(layer, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, structure: Callable[[], Routing],
           halves: Callable[[], KeptHalves] | None = None) -> Routing | KeptHalves | None:
    """How this call computes the experts: the sparse routing (`Routing`: the active (token, half) pairs, from
    `structure`, which builds it once per routing group: `monet.model.RoutingGroup.sparse_routing`), the kept
    halves (`KeptHalves`: the dense formula on their weights only; from `halves`, likewise once per group:
    `RoutingGroup.kept_halves`; without it, built for this call) or None (the dense path).

    Auto, CPU only (see the module docstring for GPUs): at most DECODE_MAX_TOKENS tokens without autograd
    (generation, evaluation) -> the kept halves if they are at most DECODE_MAX_ACTIVE_FRACTION of E
    (training keeps its paths); else sparse with enough work per half
    (tokens * d * m) and at most SPARSE_MAX_ACTIVE_FRACTION of the (token, half) pairs active; else dense.
    """
    path = _forced[-1] if _forced else "auto"
    if path == "dense":
        return None
    if halves is None:
        def halves() -> KeptHalves:
            return kept_halves(g1, g2)
    if path == "decode":
        return halves()
    if path == "auto":
        if x.device.type != "cpu":
            return None
        if x.numel() <= DECODE_MAX_TOKENS * x.shape[-1] and not torch.is_grad_enabled():
            plan = halves()
            return plan if plan.active_fraction <= DECODE_MAX_ACTIVE_FRACTION else None
        width = getattr(layer, "expert_dim", None) or 2 * layer.half_dim
        if x.numel() * width < SPARSE_MIN_WORK_PER_HALF:      # tokens * d * m
            return None
    routing = structure()
    if path == "auto" and routing.active_fraction > SPARSE_MAX_ACTIVE_FRACTION:
        return None
    return routing


__all__ = [
    "ActivePairs", "EditedEntries", "GatherMatmul", "HalfLayout", "KeptEntries", "KeptHalves", "Routing",
    "KeptRouting", "ScatterMatmul", "StaticRouting", "StaticSide", "active_pairs", "bag_offsets", "choose",
    "combinations", "edited_entries", "expert_path", "hd_decode", "hd_forward", "kept_entries", "kept_halves",
    "merged_experts", "paired_columns", "side", "sparse_routing", "static_routing", "static_side", "vd_decode",
    "vd_forward"
]

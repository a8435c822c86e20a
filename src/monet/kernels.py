"""Triton kernels for the exact sparse expert path (`monet.sparse`, where `sparse.use_kernels`).

The sparse path computes, for rows (kept routing slots) sorted by half,

    gather:   r_p = W_{half(p)} x_{token(p)} + b_{half(p)}          (U_i x + b1_i: eq. 12, A.1)
    scatter:  y_t += sum over rows p of token t of W_{half(p)} c_p  ([V_j | b2_j] [c ; s]: eq. 12, A.1)

On the CPU it loops over the halves in Python (one matmul each). Here each Triton program takes a block
of up to BLOCK_P rows of ONE half (a block table), gathers the rows of x straight into a tile product with
that half's weights (tl.dot) and either stores r_p or adds its products into y with atomics: nothing of size
[rows, d] is formed, the launch count does not grow with E, and weights are read once per block instead of
once per row. `mix_scatter_mm` forms the scatter's input rows inside the kernel from the routing weights of
each (token, head) bag and the edit table (`Mix`: masks and steering, read for the bag's K x K combinations,
never E^2). Backward uses the same kernels with transposed strides (grad_x: scatter; grad_W: a per-half
outer-product accumulation) and recomputes the mixed rows with torch (`mix_rows`).

Optional: `pip install monet[gpu]` (triton). Without CUDA, the kernels run under Triton's CPU
interpreter (TRITON_INTERPRET=1, set before triton is imported), which is how the tests check them
against the float64 naive sum. Host syncs: none. The kernel path's layout (`monet.sparse.static_routing`)
has a static size, and `device_block_table` builds the block table from per-half counts left on the device
(at most cdiv(rows, BLOCK_P) + E blocks, the unused ones empty, and their count, which the kernels'
persistent programs read: the launch grid is a few programs per multiprocessor, `programs`);
docs/performance.md ("The kernel path") says how that is checked on the CPU and what is open without a GPU.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

BLOCK_P = 32      # pairs per program (one half); tl.dot needs >= 16
BLOCK_D = 32      # reduction / output chunk


@functools.cache
def _triton():
    """The triton module, or None when it is not installed (or cannot be imported)."""
    try:
        import triton
        import triton.language  # noqa: F401
    except Exception:  # not installed, or a broken install: the CPU path stays
        return None
    return triton


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(x: torch.Tensor) -> bool:
    """Kernels can run for tensors like x: triton importable and x on CUDA (or the interpreter on for CPU)."""
    return _triton() is not None and (x.is_cuda or (interpreted() and x.device.type == "cpu"))


def block_table(counts: list[int], block: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(half, start, stop) of every block of at most `block` consecutive pairs of one half, [blocks] each, and
    the number of blocks ([1]: the kernels' persistent programs loop up to it).

    Built on the host from the layout's counts (already there: no extra sync), then copied to the device.
    """
    halves, starts, stops = [], [], []
    start = 0
    for half, count in enumerate(counts):
        for offset in range(0, count, block):
            halves.append(half)
            starts.append(start + offset)
            stops.append(start + min(count, offset + block))
        start += count
    table = torch.tensor([halves, starts, stops], dtype=torch.int64)
    count = torch.tensor([len(halves)], dtype=torch.int64)
    return (*table.to(device, non_blocking=True).unbind(0), count.to(device, non_blocking=True))


def device_block_table(counts: torch.Tensor, pairs: int, block: int) -> tuple[torch.Tensor, ...]:
    """`block_table` from per-half counts on the device ([E] integers summing to at most `pairs`), without a
    host sync.

    The table's size cannot depend on the counts' values, so it has an upper bound of blocks, cdiv(pairs,
    block) + E (each half adds at most one partial block); block b finds its half by a search over the running
    block counts, and the blocks past the last one get start == stop (the kernels mask everything out). The
    number of used blocks stays on the device ([1]): the kernels' persistent programs stop there, so the
    launch grid need not cover the empty ones.
    """
    experts = counts.shape[0]
    counts = counts.to(torch.int64)
    per_half = (counts + block - 1) // block
    ends = per_half.cumsum(0)                                       # blocks up to and including each half
    index = torch.arange(triton_cdiv(pairs, block) + experts, device=counts.device)
    half = torch.searchsorted(ends, index, right=True)              # the half whose blocks include `index`
    used = half < experts
    half = half.clamp(max=max(experts - 1, 0))
    first = counts.cumsum(0) - counts                               # first pair of each half
    start = first[half] + (index - (ends[half] - per_half[half])) * block
    stop = torch.minimum(start + block, first[half] + counts[half])
    zero = torch.zeros_like(start)
    return (torch.where(used, half, zero), torch.where(used, start, zero), torch.where(used, stop, zero),
            per_half.sum().reshape(1))


@functools.cache
def _kernels():
    """Compile (define) the kernels on first use, so that importing monet never needs triton."""
    triton = _triton()
    tl = triton.language

    @triton.jit
    def gather_mm(x_ptr, token_ptr, w_ptr, b_ptr, out_ptr, half_ptr, start_ptr, stop_ptr, nblocks_ptr,
                  width, depth, sx, sw_half, sw_k, sw_c, sb_half, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                  PRECISION: tl.constexpr, BP: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr):
        """out[p, k] = sum_c x[token[p], c] W(half, k, c) (+ b[half, k]) for the pairs of one block."""
        for block in range(tl.program_id(0), tl.load(nblocks_ptr), tl.num_programs(0)):   # persistent
            half, start, stop = tl.load(half_ptr + block), tl.load(start_ptr + block), tl.load(stop_ptr + block)
            pairs = start + tl.arange(0, BP)
            valid = pairs < stop
            rows = tl.load(token_ptr + pairs, mask=valid, other=0)
            ks = tl.program_id(1) * BW + tl.arange(0, BW)
            acc = tl.zeros((BP, BW), dtype=ACC)
            for c0 in range(0, depth, BD):
                cs = c0 + tl.arange(0, BD)
                xs = tl.load(x_ptr + rows[:, None] * sx + cs[None, :], mask=valid[:, None] & (cs[None, :] < depth),
                             other=0.0)
                ws = tl.load(w_ptr + half * sw_half + cs[:, None] * sw_c + ks[None, :] * sw_k,
                             mask=(cs[:, None] < depth) & (ks[None, :] < width), other=0.0)
                acc += tl.dot(xs, ws, input_precision=PRECISION, out_dtype=ACC)
            if HAS_BIAS:
                acc += tl.load(b_ptr + half * sb_half + ks, mask=ks < width, other=0.0)[None, :]
            tl.store(out_ptr + pairs[:, None] * width + ks[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=valid[:, None] & (ks[None, :] < width))

    @triton.jit
    def scatter_mm(c_ptr, token_ptr, w_ptr, y_ptr, half_ptr, start_ptr, stop_ptr, nblocks_ptr,
                   inner, outer, sc, sw_half, sw_k, sw_n, sy, ACC: tl.constexpr, PRECISION: tl.constexpr,
                   BP: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
        """y[token[p], n] += sum_k c[p, k] W(half, k, n) for the pairs of one block (atomics)."""
        for block in range(tl.program_id(0), tl.load(nblocks_ptr), tl.num_programs(0)):   # persistent
            half, start, stop = tl.load(half_ptr + block), tl.load(start_ptr + block), tl.load(stop_ptr + block)
            pairs = start + tl.arange(0, BP)
            valid = pairs < stop
            rows = tl.load(token_ptr + pairs, mask=valid, other=0)
            ns = tl.program_id(1) * BN + tl.arange(0, BN)
            acc = tl.zeros((BP, BN), dtype=ACC)
            for k0 in range(0, inner, BK):
                ks = k0 + tl.arange(0, BK)
                cs = tl.load(c_ptr + pairs[:, None] * sc + ks[None, :], mask=valid[:, None] & (ks[None, :] < inner),
                             other=0.0)
                ws = tl.load(w_ptr + half * sw_half + ks[:, None] * sw_k + ns[None, :] * sw_n,
                             mask=(ks[:, None] < inner) & (ns[None, :] < outer), other=0.0)
                acc += tl.dot(cs, ws, input_precision=PRECISION, out_dtype=ACC)
            tl.atomic_add(y_ptr + rows[:, None] * sy + ns[None, :], acc.to(y_ptr.dtype.element_ty),
                          mask=valid[:, None] & (ns[None, :] < outer))

    @triton.jit
    def half_outer(left_ptr, right_ptr, token_ptr, g_ptr, half_ptr, start_ptr, stop_ptr, nblocks_ptr,
                   width, depth, sl, sr, sg_half, sg_k, sg_c, GATHER: tl.constexpr, ACC: tl.constexpr,
                   PRECISION: tl.constexpr, BP: tl.constexpr, BW: tl.constexpr, BD: tl.constexpr):
        """G(half, k, c) += sum_p left[p, k] right[row(p), c], row = token[p] (GATHER) or p (atomics)."""
        for block in range(tl.program_id(0), tl.load(nblocks_ptr), tl.num_programs(0)):   # persistent
            half, start, stop = tl.load(half_ptr + block), tl.load(start_ptr + block), tl.load(stop_ptr + block)
            pairs = start + tl.arange(0, BP)
            valid = pairs < stop
            if GATHER:
                rows = tl.load(token_ptr + pairs, mask=valid, other=0)
            else:
                rows = pairs
            ks = tl.program_id(1) * BW + tl.arange(0, BW)
            cs = tl.program_id(2) * BD + tl.arange(0, BD)
            lt = tl.load(left_ptr + pairs[None, :] * sl + ks[:, None], mask=valid[None, :] & (ks[:, None] < width),
                         other=0.0)
            rt = tl.load(right_ptr + rows[:, None] * sr + cs[None, :], mask=valid[:, None] & (cs[None, :] < depth),
                         other=0.0)
            acc = tl.dot(lt, rt, input_precision=PRECISION, out_dtype=ACC)
            tl.atomic_add(g_ptr + half * sg_half + ks[:, None] * sg_k + cs[None, :] * sg_c,
                          acc.to(g_ptr.dtype.element_ty),
                          mask=(ks[:, None] < width) & (cs[None, :] < depth) & (ks[:, None] * 0 + start < stop))

    @triton.jit
    def mix_scatter_mm(src_ptr, gs_ptr, go_ptr, other_half_ptr, kept_ptr, edit_ptr, order_ptr, token_ptr, w_ptr,
                       y_ptr, half_ptr, start_ptr, stop_ptr, nblocks_ptr, inner, outer, ss, experts, sw_half, sw_k,
                       sw_n, sy,
                       MODE: tl.constexpr, SELF_FIRST: tl.constexpr, HAS_EDIT: tl.constexpr, SLOTS: tl.constexpr,
                       ACC: tl.constexpr, PRECISION: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr,
                       BN: tl.constexpr):
        """`scatter_mm` whose input rows are mixed here from the bag's slots of the other side (`Mix`):
        coef_a = g_self g_a (1 - edit[i*E + j]); row = sum_a coef_a src[a] (MODE 0), (sum_a coef_a) src[slot]
        (MODE 1) or sum_a coef_a (MODE 2, one column); y[token] += row W(half). The other side's slots of a bag
        hold its kept entries first (`kept` of them): the loop stops at the block's largest count."""
        for block in range(tl.program_id(0), tl.load(nblocks_ptr), tl.num_programs(0)):   # persistent
            half, start, stop = tl.load(half_ptr + block), tl.load(start_ptr + block), tl.load(stop_ptr + block)
            pairs = start + tl.arange(0, BP)
            valid = pairs < stop
            rows = tl.load(token_ptr + pairs, mask=valid, other=0)
            slot = tl.load(order_ptr + pairs, mask=valid, other=0)         # the row's own slot (token, head, s)
            g_self = tl.load(gs_ptr + slot, mask=valid, other=0.0).to(ACC)
            used = tl.max(tl.load(kept_ptr + slot // SLOTS, mask=valid, other=0), axis=0)   # slots to mix, <= K
            ns = tl.program_id(1) * BN + tl.arange(0, BN)
            acc = tl.zeros((BP, BN), dtype=ACC)
            for k0 in range(0, inner, BK):
                ks = k0 + tl.arange(0, BK)
                inside = valid[:, None] & (ks[None, :] < inner)
                cs = tl.zeros((BP, BK), dtype=ACC)
                mass = tl.zeros((BP,), dtype=ACC)
                for a in range(0, used):                                 # the bag's kept slots of the other side
                    partner = (slot // SLOTS) * SLOTS + a
                    coef = g_self * tl.load(go_ptr + partner, mask=valid, other=0.0).to(ACC)
                    if HAS_EDIT:
                        other = tl.load(other_half_ptr + partner, mask=valid, other=0)
                        expert = half * experts + other if SELF_FIRST else other * experts + half
                        coef = coef * (1.0 - tl.load(edit_ptr + expert, mask=valid, other=0.0).to(ACC))
                    if MODE == 0:
                        cs += coef[:, None] * tl.load(src_ptr + partner[:, None] * ss + ks[None, :], mask=inside,
                                                      other=0.0).to(ACC)
                    else:
                        mass += coef
                if MODE == 1:
                    cs = mass[:, None] * tl.load(src_ptr + slot[:, None] * ss + ks[None, :], mask=inside,
                                                 other=0.0).to(ACC)
                if MODE == 2:
                    cs = tl.where(inside, mass[:, None] + cs, 0.0)
                ws = tl.load(w_ptr + half * sw_half + ks[:, None] * sw_k + ns[None, :] * sw_n,
                             mask=(ks[:, None] < inner) & (ns[None, :] < outer), other=0.0)
                acc += tl.dot(cs.to(ws.dtype), ws, input_precision=PRECISION, out_dtype=ACC)
            tl.atomic_add(y_ptr + rows[:, None] * sy + ns[None, :], acc.to(y_ptr.dtype.element_ty),
                          mask=valid[:, None] & (ns[None, :] < outer))

    return gather_mm, scatter_mm, half_outer, mix_scatter_mm


def _numerics(t: torch.Tensor) -> dict:
    """Accumulate in float64 for float64 inputs, else float32; IEEE products for float32 (not TF32)."""
    tl = _triton().language
    return {"ACC": tl.float64 if t.dtype == torch.float64 else tl.float32,
            "PRECISION": "ieee" if t.dtype in (torch.float32, torch.float64) else "tf32"}


def _block(n: int) -> int:
    """A tile size for a dimension of n: a power of two, at least 16 (tl.dot), at most 64."""
    return max(16, min(64, 1 << max(0, (n - 1).bit_length())))


def _accumulator(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A zeroed buffer for atomic sums: float32 for half precisions (atomics in bf16 lose sums), else like's."""
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.zeros(shape, dtype=dtype, device=like.device)


def gather(x: torch.Tensor, token: torch.Tensor, table: tuple, weight: torch.Tensor, bias: torch.Tensor | None,
           pairs: int, transposed: bool = False) -> torch.Tensor:
    """out[p] = W_{half(p)} x_{token(p)} (+ b): weight [E, w, d] (or [E, d, w] with transposed), x [n, d]."""
    gather_mm = _kernels()[0]
    x = x.contiguous()
    width = weight.shape[2] if transposed else weight.shape[1]
    depth = x.shape[1]
    s_half, s_k, s_c = (weight.stride(0), weight.stride(2), weight.stride(1)) if transposed else weight.stride()
    out = x.new_zeros(pairs, width)     # rows no block covers (the static layout's unused slots) stay 0
    blocks = table[0].shape[0]
    if blocks and width:
        bw = _block(width)
        gather_mm[(programs(x, blocks), triton_cdiv(width, bw))](
            x, token, weight, bias if bias is not None else weight, out, *table, width, depth, x.stride(0),
            s_half, s_k, s_c, bias.stride(0) if bias is not None else 0, HAS_BIAS=bias is not None,
            BP=BLOCK_P, BW=bw, BD=BLOCK_D, **_numerics(x))
    return out


def scatter(c: torch.Tensor, token: torch.Tensor, table: tuple, weight: torch.Tensor, rows: int,
            out_dim: int, strides: tuple[int, int, int], into: torch.Tensor | None = None) -> torch.Tensor:
    """y[token[p]] += sum_k c[p, k] W(half(p), k, n) with W(h, k, n) = weight[h*s0 + k*s1 + n*s2]: [rows, out_dim]."""
    scatter_mm = _kernels()[1]
    c = c.contiguous()
    y = _accumulator(c, (rows, out_dim)) if into is None else into
    blocks = table[0].shape[0]
    if blocks and c.shape[1] and out_dim:
        bn = _block(out_dim)
        scatter_mm[(programs(c, blocks), triton_cdiv(out_dim, bn))](
            c, token, weight, y, *table, c.shape[1], out_dim, c.stride(0), *strides, y.stride(0),
            BP=BLOCK_P, BK=_block(c.shape[1]), BN=bn, **_numerics(c))
    return y


def outer(left: torch.Tensor, right: torch.Tensor, token: torch.Tensor | None, table: tuple, grad: torch.Tensor,
          strides: tuple[int, int, int]) -> None:
    """grad(half, k, c) += sum_p left[p, k] right[row(p), c] (row = token[p], or p without token), in place."""
    half_outer = _kernels()[2]
    left, right = left.contiguous(), right.contiguous()
    width, depth = left.shape[1], right.shape[1]
    blocks = table[0].shape[0]
    if blocks and width and depth:
        bw, bd = _block(width), _block(depth)
        half_outer[(programs(left, blocks), triton_cdiv(width, bw), triton_cdiv(depth, bd))](
            left, right, token if token is not None else table[0], grad, *table, width, depth, left.stride(0),
            right.stride(0), *strides, GATHER=token is not None, BP=BLOCK_P, BW=bw, BD=bd, **_numerics(left))


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


PROGRAMS_PER_SM = 8       # persistent programs per multiprocessor (each loops over blocks up to the table's count)
INTERPRETED_PROGRAMS = 3  # under the interpreter: few, so that the tests run several blocks per program


def programs(like: torch.Tensor, blocks: int) -> int:
    """The launch grid's first dimension for a table of `blocks` rows (an upper bound): persistent programs,
    at most PROGRAMS_PER_SM per multiprocessor on CUDA (a host property, no sync)."""
    limit = INTERPRETED_PROGRAMS
    if like.is_cuda:
        limit = PROGRAMS_PER_SM * torch.cuda.get_device_properties(like.device).multi_processor_count
    return max(1, min(blocks, limit))


class GatherMatmulKernel(torch.autograd.Function):
    """`monet.sparse.GatherMatmul` on the kernels: r_p = U_{half(p)} x_{token(p)} + b_{half(p)}, [P, w].

    forward(x [n, d], token [P], table, weight [E, w, d], bias [E, w], half_of_row [P] or None). Backward:
    grad_x by the scatter kernel (grad_r U_i onto the tokens), grad_U by the per-half outer product, grad_b
    by a sum per half: over `half_of_row` (E: a row no block covers, left out) where given, else over the
    table's blocks, which must then cover every row.
    """

    @staticmethod
    def forward(ctx, x, token, table, weight, bias, half_of_row=None):
        ctx.table = table
        ctx.save_for_backward(x, token, weight, half_of_row)
        return gather(x, token, table, weight, bias, token.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, token, weight, half_of_row = ctx.saved_tensors
        table = ctx.table
        need_x, _, _, need_w, need_b = ctx.needs_input_grad[:5]
        grad_out = grad_out.contiguous()
        grad_x = grad_w = grad_b = None
        if need_x:      # W(h, k, n) = weight[h, k, n]: k over w, n over d
            grad_x = scatter(grad_out, token, table, weight, x.shape[0], x.shape[1], weight.stride()).to(x.dtype)
        if need_w:
            grad_w = _accumulator(weight, tuple(weight.shape))
            outer(grad_out, x, token, table, grad_w, grad_w.stride())
            grad_w = grad_w.to(weight.dtype)
        if need_b:      # a sum per half (row E, the uncovered rows, is dropped)
            if half_of_row is None:     # the blocks are in pair order and cover every row
                half_of_row = torch.repeat_interleave(table[0], table[2] - table[1], output_size=token.shape[0])
            grad_b = grad_out.new_zeros(weight.shape[0] + 1, weight.shape[1]).index_add_(0, half_of_row, grad_out)
            grad_b = grad_b[:-1].to(weight.dtype)
        return (grad_x, None, None, grad_w, grad_b, None)[:len(ctx.needs_input_grad)]


class ScatterMatmulKernel(torch.autograd.Function):
    """`monet.sparse.ScatterMatmul` on the kernels: y_t = sum over pairs p of token t of W_{half(p)} c_p.

    forward(c [P, K], token [P], table, rows, *weights), each weight [d_out, E, w_k] (sum w_k = K), read
    in place (no [d_out, K] concatenation). Backward: grad_c by the gather kernel (W_j^T grad_y rows),
    grad_W by the per-half outer product (grad_y rows x c).
    """

    @staticmethod
    def forward(ctx, c, token, table, rows, *weights):
        out_dim = weights[0].shape[0]
        y = _accumulator(c, (rows, out_dim))
        offset = 0
        for weight in weights:          # W(h, k, n) = weight[n, h, k]
            width = weight.shape[2]
            scatter(c[:, offset:offset + width], token, table, weight, rows, out_dim,
                    (weight.stride(1), weight.stride(2), weight.stride(0)), into=y)
            offset += width
        ctx.table = table
        ctx.save_for_backward(c, token, *weights)
        return y.to(c.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        c, token, *weights = ctx.saved_tensors
        grad_c, grads = _scatter_backward(c, token, ctx.table, weights, ctx.needs_input_grad[0],
                                          ctx.needs_input_grad[4:], grad_y)
        return (grad_c, None, None, None, *grads)


def _scatter_backward(c: torch.Tensor, token: torch.Tensor, table: tuple, weights: list[torch.Tensor], need_c: bool,
                      need_w: tuple[bool, ...], grad_y: torch.Tensor) -> tuple[torch.Tensor | None, list]:
    """Gradients of y = scatter(c, token, table, *weights): grad_c by the gather kernel (W_j^T grad_y rows; 0 on
    rows no block covers), grad_W by the per-half outer product (grad_y rows x c)."""
    grad_y = grad_y.contiguous()
    grad_c = None
    if need_c:          # grad_c[p, k] = sum_n grad_y[token[p], n] weight[n, half, k]: weight as [E, d_out, w]
        grad_c = torch.cat([gather(grad_y, token, table, w.transpose(0, 1), None, token.shape[0], transposed=True)
                            for w in weights], dim=1).to(c.dtype)
    grads, offset = [], 0
    for weight, need in zip(weights, need_w, strict=True):
        width = weight.shape[2]
        if need:        # grad_W[n, half, k] = sum_p c[p, k] grad_y[token[p], n]
            grad = _accumulator(weight, tuple(weight.shape))
            outer(c[:, offset:offset + width], grad_y, token, table, grad,
                  (grad.stride(1), grad.stride(2), grad.stride(0)))
            grads.append(grad.to(weight.dtype))
        else:
            grads.append(None)
        offset += width
    return grad_c, grads


# ----------------------------------------------------------------------------------------------------------
# The fused input stage: routing mixes and edits inside the scatter kernel

MODES = {"other": 0, "self": 1, "ones": 2}


@dataclass(eq=False)
class Mix:
    """The input stage of a fused scatter (`MixScatterKernel`) over the slots of a static layout
    (`monet.sparse.static_side`: K slots per (token, head) bag, unused slots with g = 0).

    The rows are the "self" side's slots sorted by half (`order`: the slot of each row, `token`, `table`). Each
    mixes the K slots of its bag on the other side: coef_a = g_self g_a keep_a, keep_a = 1 - edit[i*E + j]
    (i from side 1, j from side 2: `self_first` says whether the self side is side 1; keep = 1 without an edit
    table). Per weight piece, `modes`: "other" sum_a coef_a other_rows_a, "self" (sum_a coef_a) self_rows_slot,
    "ones" sum_a coef_a (one column: the bias). So the edit table is read for the K x K combinations of each
    bag inside the kernel: in forward no input row, combination tensor or edited-pair list is formed.
    """

    order: torch.Tensor
    token: torch.Tensor
    table: tuple[torch.Tensor, ...]
    self_half: torch.Tensor     # [slots] the halves of the self side's slots (slot order)
    other_half: torch.Tensor    # [slots] the other side's
    other_count: torch.Tensor   # [bags] the other side's kept slots per bag (they come first in the bag)
    slots: int                  # K
    experts: int
    self_first: bool
    modes: tuple[str, ...]
    edit: torch.Tensor | None = None     # [E * E] in the routing values' dtype


def mix_rows(mix: Mix, g_self: torch.Tensor, g_other: torch.Tensor, self_rows: torch.Tensor | None,
             other_rows: torch.Tensor | None, widths: list[int]) -> torch.Tensor:
    """The input rows the kernel mixes, with torch ops (backward recomputes them): [rows, sum widths], sorted.

    With an edit table it forms each bag's K x K combinations (O(tokens H K^2), never E^2; only backward pays
    for it); without one the coefficients factorise (g_self times a sum over the other side)."""
    k = mix.slots
    mine = g_self.reshape(-1, k, 1)
    if mix.edit is not None:
        coef = mine * g_other.reshape(-1, 1, k)                                      # [bags, K self, K other]
        halves, theirs = mix.self_half.view(-1, k, 1), mix.other_half.view(-1, 1, k)
        expert = halves * mix.experts + theirs if mix.self_first else theirs * mix.experts + halves
        coef = coef * (1 - mix.edit[expert])
        mass = coef.sum(-1, keepdim=True)
    else:
        mass = mine * g_other.reshape(-1, 1, k).sum(-1, keepdim=True)
    parts = []
    for mode, width in zip(mix.modes, widths, strict=True):
        if mode == "other" and mix.edit is None:
            parts.append(mine * torch.einsum("ba,baw->bw", g_other.reshape(-1, k), other_rows.reshape(-1, k, width))
                         .unsqueeze(1))
        elif mode == "other":
            parts.append(torch.einsum("bsa,baw->bsw", coef, other_rows.reshape(-1, k, width)))
        elif mode == "self":
            parts.append(mass * self_rows.reshape(-1, k, width))
        else:
            parts.append(mass)
    return torch.cat(parts, dim=-1).flatten(0, 1).index_select(0, mix.order)


def mix_scatter(mix: Mix, g_self: torch.Tensor, g_other: torch.Tensor, self_rows: torch.Tensor | None,
                other_rows: torch.Tensor | None, rows: int, weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """y[token] += (mixed row) W(half) for every row of the self side: [rows, d_out] (an accumulator)."""
    mix_scatter_mm = _kernels()[3]
    out_dim = weights[0].shape[0]
    like = other_rows if other_rows is not None else self_rows
    y = _accumulator(like, (rows, out_dim))
    g_self, g_other = g_self.contiguous(), g_other.contiguous()
    edit = mix.edit if mix.edit is not None else g_self
    blocks = mix.table[0].shape[0]
    for mode, weight in zip(mix.modes, weights, strict=True):
        width = weight.shape[2]
        if not (blocks and width and out_dim):
            continue
        source = (other_rows if mode == "other" else self_rows if mode == "self" else like).contiguous()
        bn = _block(out_dim)
        mix_scatter_mm[(programs(like, blocks), triton_cdiv(out_dim, bn))](
            source, g_self, g_other, mix.other_half, mix.other_count, edit, mix.order, mix.token, weight, y,
            *mix.table, width, out_dim, source.stride(0), mix.experts, weight.stride(1), weight.stride(2),
            weight.stride(0), y.stride(0), MODE=MODES[mode], SELF_FIRST=mix.self_first, HAS_EDIT=mix.edit is not None,
            SLOTS=mix.slots, BP=BLOCK_P, BK=_block(width), BN=bn, **_numerics(like))
    return y


class MixScatterKernel(torch.autograd.Function):
    """y_t = sum over the self side's slots s of token t of W_{half(s)} row_s, the rows mixed inside the kernel
    (`Mix`: routing weights, edits). forward(mix, rows, g_self [slots], g_other [slots], self_rows [slots, w]
    or None, other_rows [slots, w] or None, *weights [d_out, E, w_k]). Backward recomputes the rows with torch
    (`mix_rows`) and takes the scatter's gradients (`_scatter_backward`) through them.
    """

    @staticmethod
    def forward(ctx, mix, rows, g_self, g_other, self_rows, other_rows, *weights):
        ctx.mix = mix
        ctx.save_for_backward(g_self, g_other, self_rows, other_rows, *weights)
        like = other_rows if other_rows is not None else self_rows
        return mix_scatter(mix, g_self, g_other, self_rows, other_rows, rows, weights).to(like.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        g_self, g_other, self_rows, other_rows, *weights = ctx.saved_tensors
        mix = ctx.mix
        inputs, needs = (g_self, g_other, self_rows, other_rows), ctx.needs_input_grad[2:6]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) if t is not None else None
                      for t, need in zip(inputs, needs, strict=True)]
            c = mix_rows(mix, *leaves, [w.shape[2] for w in weights])
        wanted = [n for n, (t, need) in enumerate(zip(leaves, needs, strict=True)) if need and t is not None]
        grad_c, grad_w = _scatter_backward(c.detach(), mix.token, mix.table, weights, bool(wanted),
                                           ctx.needs_input_grad[6:], grad_y)
        grads = [None] * 4
        if wanted:
            found = torch.autograd.grad(c, [leaves[n] for n in wanted], grad_c, allow_unused=True)
            for n, grad in zip(wanted, found, strict=True):
                grads[n] = grad if grad is not None else torch.zeros_like(leaves[n])
        return (None, None, *grads, *grad_w)


__all__ = ["GatherMatmulKernel", "Mix", "MixScatterKernel", "ScatterMatmulKernel", "available", "block_table",
           "device_block_table", "interpreted", "mix_rows"]

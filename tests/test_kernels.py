"""The Triton kernels (monet.kernels) under Triton's CPU interpreter: the grouped projections equal the per-half
loops (values and every gradient), and HD / VD layers on the kernels equal the float64 naive N-sum, with edits
(masks, steering) and odd shapes. Tiny sizes: the interpreter runs the kernels in numpy."""

import os

os.environ["TRITON_INTERPRET"] = "1"     # conftest.py sets it before triton is imported; alone, before torch

import pytest  # noqa: E402
import torch  # noqa: E402
from naive import naive_layer  # noqa: E402
from test_sparse import LAYERS, _edit_table, _grads, _layer, _run  # noqa: E402

from monet import kernels, sparse  # noqa: E402

if os.environ.get("CI"):
    import triton  # noqa: F401   CI installs the gpu extra: these tests must run there, never skip
else:
    pytest.importorskip("triton")

SHAPES = [
    # (hidden, experts E, moe_dim m, heads H, topk k, batch, length)
    (8, 5, 4, 2, 2, 2, 3),      # E not a power of two, odd length
    (10, 7, 6, 2, 3, 2, 1),     # odd E and m, single token
    (6, 11, 2, 3, 1, 1, 3),     # H = 3, k = 1: most halves never active
]


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.setenv("MONET_KERNELS", "on")


def _layout(tokens=37, experts=6, seed=0):
    """A side's layout with some halves empty and one half holding more than a block of pairs."""
    generator = torch.Generator().manual_seed(seed)
    g = torch.rand(tokens, 2, experts, generator=generator, dtype=torch.float64)
    g[..., 1] += 2.0                                             # half 1: every token (> BLOCK_P pairs)
    g[..., 4] = 0.0                                              # half 4: never
    keep = g >= g.topk(2, dim=-1).values[..., -1:]
    return sparse.side(torch.softmax(g.masked_fill(~keep, float("-inf")), dim=-1))[1]


def test_block_table_covers_every_pair_once_by_half():
    layout = _layout()
    half, start, stop = layout.table()
    assert layout.counts[1] > kernels.BLOCK_P and layout.counts[4] == 0
    covered = torch.cat([torch.arange(a, b) for a, b in zip(start.tolist(), stop.tolist(), strict=True)])
    assert torch.equal(covered, torch.arange(layout.size))
    assert ((stop - start) <= kernels.BLOCK_P).all() and ((stop - start) > 0).all()
    expected = torch.repeat_interleave(torch.arange(6), torch.tensor(layout.counts))
    assert torch.equal(torch.repeat_interleave(half, stop - start), expected)


def _device_table(layout):
    """The block table built from device counts (no host sync), as the kernels would get it on a GPU."""
    return kernels.device_block_table(torch.tensor(layout.counts), layout.size, kernels.BLOCK_P)


def test_device_block_table_is_the_host_table_padded_with_empty_blocks():
    for layout in (_layout(), _layout(tokens=1, seed=3), _layout(tokens=70, experts=5, seed=5)):
        half, start, stop = _device_table(layout)
        used = stop > start
        for got, want in zip((half[used], start[used], stop[used]), layout.table(), strict=True):
            assert torch.equal(got, want)
        assert not used[used.sum():].any()                          # the padding comes last ...
        assert (start[~used] == 0).all() and (stop[~used] == 0).all() and (half[~used] == 0).all()   # ... empty
        assert half.shape[0] == -(-layout.size // kernels.BLOCK_P) + layout.experts
    half, start, stop = kernels.device_block_table(torch.zeros(4, dtype=torch.int64), 0, kernels.BLOCK_P)
    assert half.shape == (4,) and not (stop > start).any()          # no pair at all: every block empty


@pytest.mark.parametrize("width,depth,table", [(4, 8, "host"), (6, 19, "host"), (17, 33, "host"), (6, 19, "device")])
def test_gather_and_scatter_kernels_equal_the_loops_with_every_gradient(width, depth, table):
    layout = _layout(seed=width)
    if table == "device":       # padded with empty blocks: they must add nothing, values or gradients
        layout._table = _device_table(layout)
    tokens, experts = layout.num_tokens, layout.experts
    x = torch.randn(tokens, depth, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(experts, width, depth, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(experts, width, dtype=torch.float64, requires_grad=True)
    inputs = [x, weight, bias]
    got = kernels.GatherMatmulKernel.apply(x, layout.token, layout.table(), weight, bias)
    want = sparse.GatherMatmul.apply(x, layout, weight, bias)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(want)
    for a, b in zip(_grads(got, inputs, probe), _grads(want, inputs, probe), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    c = torch.randn(layout.size, width + 1, dtype=torch.float64, requires_grad=True)
    v = torch.randn(depth, experts, width, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(depth, experts, 1, dtype=torch.float64, requires_grad=True)
    inputs = [c, v, b2]
    got = kernels.ScatterMatmulKernel.apply(c, layout.token, layout.table(), tokens, v, b2)
    want = sparse.ScatterMatmul.apply(c, layout, v, b2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(want)
    for a, b in zip(_grads(got, inputs, probe), _grads(want, inputs, probe), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("cls,shape,edit", [
    (LAYERS[0], SHAPES[0], True), (LAYERS[1], SHAPES[0], False), (LAYERS[0], SHAPES[1], False),
    (LAYERS[1], SHAPES[1], True), (LAYERS[1], SHAPES[2], True),
], ids=["hd-odd-edited", "vd-odd-plain", "hd-one-token-plain", "vd-one-token-edited", "vd-sparse-edited"])
def test_layers_on_the_kernels_equal_the_naive_sum(cls, shape, edit, monkeypatch):
    """HD and VD on the sparse path with the kernels: value and gradients w.r.t. x (through the router) and
    every weight equal the naive N-sum in float64, with masks and steering; the kernels must have run."""
    calls = []
    for name in ("GatherMatmulKernel", "ScatterMatmulKernel"):
        original = getattr(kernels, name).apply
        monkeypatch.setattr(getattr(kernels, name), "apply",
                            lambda *a, original=original, name=name: calls.append(name) or original(*a))
    hidden, experts, moe_dim, heads, topk, batch, length = shape
    layer, router = _layer(cls, hidden, experts, moe_dim, heads, topk)
    table = masked = steered = None
    if edit:
        table, masked, steered = _edit_table(experts)
    x = torch.randn(batch, length, hidden, dtype=torch.float64, requires_grad=True)
    g1, g2 = router(x)
    out = _run(layer, "sparse", x, g1, g2, table)
    assert {"GatherMatmulKernel", "ScatterMatmulKernel"} <= set(calls)
    ref = naive_layer(layer, x, g1, g2, mask=masked, scale=steered)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    probe = torch.randn_like(out)
    inputs = [x, *router.parameters(), *layer.parameters()]
    for got, want in zip(_grads(out, inputs, probe), _grads(ref, inputs, probe), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_switch(monkeypatch):
    x = torch.zeros(2, 3)
    assert sparse.use_kernels(x)                       # on, interpreter, CPU tensor
    monkeypatch.setenv("MONET_KERNELS", "off")
    assert not sparse.use_kernels(x)
    monkeypatch.setenv("MONET_KERNELS", "auto")
    assert not sparse.use_kernels(x)                   # auto: CUDA only
    monkeypatch.setenv("MONET_KERNELS", "fast")
    with pytest.raises(ValueError, match="MONET_KERNELS"):
        sparse.use_kernels(x)

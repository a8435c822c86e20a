"""The Triton kernels (monet.kernels) under Triton's CPU interpreter: the grouped projections equal the per-half
loops (values and every gradient); HD / VD layers on the kernel path (the static layout of
`monet.sparse.static_routing`, mixes and edits inside the scatter kernel) equal the float64 naive N-sum with
edits (masks, steering) and odd shapes; and the kernel path makes no host synchronisation (a CPU proxy for
`torch.cuda.set_sync_debug_mode("error")`: no syncing op, every size a function of the input shapes).
Tiny sizes: the interpreter runs the kernels in numpy."""

import contextlib
import os

os.environ["TRITON_INTERPRET"] = "1"     # conftest.py sets it before triton is imported; alone, before torch

import pytest  # noqa: E402
import torch  # noqa: E402
from naive import naive_layer  # noqa: E402
from test_sparse import LAYERS, _edit_table, _grads, _layer, _padded_edited_run, _run, _tiny_model  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

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
    (8, 5, 2, 1, 5, 1, 2),      # H = 1, k = E: every half kept by the one head
    (8, 7, 4, 1, 1, 3, 3),      # H = 1, k = 1
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
    half, start, stop, count = layout.table()
    assert count.tolist() == [half.shape[0]]
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
        half, start, stop, count = _device_table(layout)
        used = stop > start
        for got, want in zip((half[used], start[used], stop[used], count), layout.table(), strict=True):
            assert torch.equal(got, want)                           # the used blocks and their count
        assert not used[used.sum():].any()                          # the padding comes last ...
        assert (start[~used] == 0).all() and (stop[~used] == 0).all() and (half[~used] == 0).all()   # ... empty
        assert half.shape[0] == -(-layout.size // kernels.BLOCK_P) + layout.experts
    half, start, stop, count = kernels.device_block_table(torch.zeros(4, dtype=torch.int64), 0, kernels.BLOCK_P)
    assert half.shape == (4,) and not (stop > start).any() and count.item() == 0   # no pair: every block empty


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


def _count_kernel_calls(monkeypatch) -> list[str]:
    calls = []
    for name in ("GatherMatmulKernel", "MixScatterKernel"):
        original = getattr(kernels, name).apply
        monkeypatch.setattr(getattr(kernels, name), "apply",
                            lambda *a, original=original, name=name: calls.append(name) or original(*a))
    return calls


# Every shape, HD and VD, plain and edited (one to three seconds each under the interpreter): the fast tier
# keeps the first shape edited for each layer, the full suite runs them all.
CASES = [pytest.param(cls, shape, edit,
                      id=f"{'hd' if cls is LAYERS[0] else 'vd'}-E{shape[1]}-m{shape[2]}-H{shape[3]}-k{shape[4]}-"
                         f"{'edited' if edit else 'plain'}",
                      marks=() if shape == SHAPES[0] and edit else pytest.mark.slow)
         for shape in SHAPES for cls in LAYERS for edit in (False, True)]
# HD in the fast tier, VD (the slower one under the interpreter) in the full suite.
LAYERS_HD_FAST = [LAYERS[0], pytest.param(LAYERS[1], marks=pytest.mark.slow, id=LAYERS[1].__name__)]


@pytest.mark.parametrize("cls,shape,edit", CASES)
def test_layers_on_the_kernels_equal_the_naive_sum(cls, shape, edit, monkeypatch):
    """HD and VD on the kernel path: value and gradients w.r.t. x (through the router) and every router and
    expert weight equal the naive N-sum in float64, with masks and steering; the kernels must have run."""
    calls = _count_kernel_calls(monkeypatch)
    hidden, experts, moe_dim, heads, topk, batch, length = shape
    layer, router = _layer(cls, hidden, experts, moe_dim, heads, topk)
    table = masked = steered = None
    if edit:
        table, masked, steered = _edit_table(experts)
    x = torch.randn(batch, length, hidden, dtype=torch.float64, requires_grad=True)
    g1, g2 = router(x)
    out = _run(layer, "sparse", x, g1, g2, table)
    assert {"GatherMatmulKernel", "MixScatterKernel"} <= set(calls)
    ref = naive_layer(layer, x, g1, g2, mask=masked, scale=steered)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    probe = torch.randn_like(out)
    inputs = [x, *router.parameters(), *layer.parameters()]
    for got, want in zip(_grads(out, inputs, probe), _grads(ref, inputs, probe), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("decompose", ["vertical", "horizontal"])
def test_whole_model_on_the_kernels_equals_the_dense_path(decompose, monkeypatch):
    """A model in training mode on a left-padded batch with masks and steering: the loss and every parameter
    gradient on the kernel path (one static layout per routing group, shared by its layers) equal the dense
    path's."""
    calls = _count_kernel_calls(monkeypatch)
    builds = []
    monkeypatch.setattr(sparse, "static_side", lambda *a, original=sparse.static_side: builds.append(1) or original(*a))
    model = _tiny_model(decompose).train()
    results = _padded_edited_run(model)
    layers, groups = model.config.num_hidden_layers, model.config.num_hidden_layers // model.config.moe_groups
    assert calls.count("GatherMatmulKernel") == layers * (1 if decompose == "horizontal" else 2)
    assert len(builds) == 2 * groups                     # one layout (two sides) per routing group
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-10, atol=1e-12)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-8, atol=1e-11, msg=name)


@pytest.mark.parametrize("cls", LAYERS_HD_FAST)
def test_float32_on_the_kernels_matches_the_dense_path(cls):
    """float32 (IEEE products, float32 accumulation): within float32 rounding of the dense path, with edits."""
    layer, router = _layer(cls, 16, 7, 4, 2, 3)
    layer, router = layer.float(), router.float()
    table = _edit_table(7)[0].float()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        g1, g2 = router(x)
        out, ref = _run(layer, "sparse", x, g1, g2, table), _run(layer, "dense", x, g1, g2, table)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", LAYERS)
def test_an_empty_batch_on_the_kernels(cls):
    """No token: every block of the grid is empty; the output and the gradients are empty, the weights' zero."""
    layer, router = _layer(cls, 8, 5, 4, 2, 2)
    x = torch.randn(0, 3, 8, dtype=torch.float64, requires_grad=True)
    g1, g2 = (g.detach() for g in router.eval()(x))
    out = _run(layer, "sparse", x, g1, g2, _edit_table(5)[0])
    grads = torch.autograd.grad(out.sum(), [x, *layer.parameters()], allow_unused=True)
    assert out.shape == (0, 3, 8) and grads[0].shape == (0, 3, 8)
    assert all(g is None or not g.any() for g in grads[1:])


@pytest.mark.parametrize("cls", LAYERS_HD_FAST)
def test_edits_add_nothing_to_what_the_kernel_path_saves_for_backward(cls):
    """Masks and steering are read inside the kernel: an edited forward saves exactly the tensors an unedited
    one saves (the issue's <= 5 % more memory when masked; no edited-pair list, no combination tensor)."""
    from monet.experiments.bench import saved_bytes

    layer, router = _layer(cls, 8, 7, 4, 2, 3)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    g1, g2 = (g.detach().requires_grad_() for g in router(x))
    weights = [x, g1, g2, *layer.parameters()]
    plain = saved_bytes(lambda: _run(layer, "sparse", x, g1, g2), weights)
    edited = saved_bytes(lambda: _run(layer, "sparse", x, g1, g2, _edit_table(7)[0]), weights)
    assert plain > 0 and edited == plain


def _capped_routing(tokens, heads, experts, kept, seed=0):
    """g [tokens, H, E] (float64, rows summing to 1) with `kept` entries per head, some halves never kept."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, heads, experts, generator=generator, dtype=torch.float64)
    logits[..., 0] = -10.0                                       # half 0 never among the largest
    keep = logits >= logits.topk(kept, dim=-1).values[..., -1:]
    return torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)


def test_static_side_sorts_the_kept_entries_by_half_and_covers_only_them():
    g = _capped_routing(9, 3, 7, kept=2)
    side = sparse.static_side(g, capacity=4)
    kept = int((g > 0).sum())
    assert side.half.shape == (9, 3, 4) and side.order.shape == (9 * 3 * 4,)      # static: T, H, K
    assert torch.equal(side.kept, (g > 0).sum(-1).flatten())                       # each bag's kept slots ...
    assert torch.equal(side.value > 0, torch.arange(4) < side.kept.view(9, 3, 1))  # ... come first (the mix loop)
    assert side.half_of_row[:kept].le(6).all() and side.half_of_row[kept:].eq(7).all()   # unused slots last
    assert (side.half_of_row[1:] >= side.half_of_row[:-1]).all()                  # sorted by half
    slot_token, slot_head = side.order // 12, side.order // 4 % 3
    got = sorted(zip(slot_token[:kept].tolist(), slot_head[:kept].tolist(), side.half_of_row[:kept].tolist(),
                     strict=True))
    assert got == sorted(map(tuple, (g > 0).nonzero().tolist()))                  # every kept entry once
    assert torch.equal(side.token, slot_token) and torch.equal(side.order[side.row], torch.arange(108))
    torch.testing.assert_close(side.value.reshape(-1)[side.order[:kept]],
                               g[slot_token[:kept], slot_head[:kept], side.half_of_row[:kept]])
    half, start, stop, count = side.table
    used = stop > start
    assert count.item() == used.sum()                                              # the kernels loop up to it
    covered = torch.cat([torch.arange(a, b) for a, b in zip(start[used].tolist(), stop[used].tolist(), strict=True)])
    assert torch.equal(covered, torch.arange(kept))                               # the kept rows, once, in order
    assert torch.equal(torch.repeat_interleave(half[used], (stop - start)[used]), side.half_of_row[:kept])


@pytest.mark.parametrize("cls", LAYERS_HD_FAST)
def test_a_capacity_below_e_is_exact_and_an_overflow_is_an_error(cls, monkeypatch):
    """K < E slots per head: exact while no head keeps more than K (naive sum, with edits); a head keeping
    more raises (on a GPU asynchronously, `torch._assert_async`): never a silently dropped entry."""
    layer, _ = _layer(cls, 6, 7, 4, 2, 2)
    table, masked, steered = _edit_table(7)
    g1, g2 = _capped_routing(4, 2, 7, kept=3, seed=1), _capped_routing(4, 2, 7, kept=2, seed=2)
    x = torch.randn(1, 4, 6, dtype=torch.float64)
    monkeypatch.setenv("MONET_KERNEL_CAPACITY", "3")
    out = _run(layer, "sparse", x, g1.unsqueeze(0), g2.unsqueeze(0), table)
    ref = naive_layer(layer, x, g1.unsqueeze(0), g2.unsqueeze(0), mask=masked, scale=steered)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    monkeypatch.setenv("MONET_KERNEL_CAPACITY", "2")
    with pytest.raises(RuntimeError, match="MONET_KERNEL_CAPACITY"):
        _run(layer, "sparse", x, g1.unsqueeze(0), g2.unsqueeze(0), table)
    monkeypatch.setenv("MONET_KERNEL_CAPACITY", "many")
    with pytest.raises(ValueError, match="MONET_KERNEL_CAPACITY"):
        _run(layer, "sparse", x, g1.unsqueeze(0), g2.unsqueeze(0), table)


# Ops that make the host wait for the device on CUDA: a data-dependent output size or a value read on the host.
SYNCING = {"nonzero", "_local_scalar_dense", "item", "unique", "_unique", "_unique2", "unique_dim",
           "unique_consecutive", "masked_select", "bincount", "histc", "masked_scatter", "equal", "is_nonzero",
           "_assert_tensor_metadata"}


class _SyncRecorder(TorchDispatchMode):
    """Every aten op outside the kernel launches: its name, output shapes and whether it would sync on CUDA."""

    def __init__(self):
        super().__init__()
        self.ops, self.syncs, self.paused = [], [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.paused:
            name = func.overloadpacket.__name__
            flat = torch.utils._pytree.tree_leaves((args, kwargs))
            if (name in SYNCING or (name == "repeat_interleave" and kwargs.get("output_size") is None)
                    or (name.startswith("index") and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool
                                                         for t in flat))):
                self.syncs.append(name)
            self.ops.append((name, tuple(tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out)
                                         if isinstance(t, torch.Tensor))))
        return out

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


def _record_kernel_path(cls, shape, seed) -> _SyncRecorder:
    """Forward + backward of one layer on the kernel path (layout, kernels, mixes, edits) under the recorder.
    The kernel launches themselves run paused (the interpreter reads device memory on the host by design; on a
    GPU a launch is asynchronous): their grids must be host ints known before any value is read."""
    recorder = _SyncRecorder()
    launchers = kernels._kernels()

    class Paused:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            assert all(isinstance(n, int) for n in grid)             # sizes, never values read from the device
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                with recorder.pause():
                    return launch(*args, **kwargs)
            return run

    hidden, experts, moe_dim, heads, topk, batch, length = shape
    layer, router = _layer(cls, hidden, experts, moe_dim, heads, topk, seed=seed)
    table = _edit_table(experts, seed=seed)[0]
    x = torch.randn(batch, length, hidden, dtype=torch.float64, requires_grad=True)
    g1, g2 = (g.detach().requires_grad_() for g in router(x))    # the router's own backward is not the kernels'
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "_kernels", lambda: tuple(Paused(k) for k in launchers))
        for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
            original = getattr(torch.Tensor, name)

            def guarded(self, *a, original=original, name=name, **k):
                if not recorder.paused:
                    recorder.syncs.append(name)
                return original(self, *a, **k)
            patch.setattr(torch.Tensor, name, guarded)
        with recorder:
            out = _run(layer, "sparse", x, g1, g2, table)
            torch.autograd.grad(out.square().sum(), [x, g1, g2, *layer.parameters()])
    return recorder


@pytest.mark.slow
@pytest.mark.parametrize("cls", LAYERS)
def test_the_kernel_path_makes_no_host_sync_and_its_sizes_are_static(cls):
    """The CPU proxy for set_sync_debug_mode("error"): layout, mixes, edits, forward and backward run no op that
    syncs on CUDA (nonzero, item, unique, bincount, boolean indexing, repeat_interleave without its size, ...)
    and read no value on the host, and every op's output shapes are the same for two routings of equal shapes
    with different kept patterns: every size is a function of the input shapes."""
    shape = (8, 7, 4, 2, 3, 3, 4)
    first, second = _record_kernel_path(cls, shape, 0), _record_kernel_path(cls, shape, 5)
    assert first.syncs == [] and second.syncs == []
    assert any(name == "topk" for name, _ in first.ops)                    # the recorder saw the layout
    assert first.ops == second.ops


@pytest.mark.slow
def test_bench_sync_check_runs_every_case_under_the_error_mode(monkeypatch):
    """`monet bench --sync-check` (CUDA only; here with torch.cuda's sync calls stubbed, on the interpreter): every
    case runs once between set_sync_debug_mode("error") and "default", and a case that raises is reported."""
    from monet.experiments.bench import sync_check

    modes = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    layers = {kind: _layer(cls, 8, 5, 4, 2, 2)[0] for kind, cls in zip(("hd", "vd"), LAYERS, strict=True)}
    router = _layer(LAYERS[0], 8, 5, 4, 2, 2)[1]
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    routing = [g.detach().requires_grad_() for g in router(x)]
    found = sync_check(layers, router, x, routing, "sparse")
    assert found == {name: "none" for name in ("router_train", "hd_forward", "hd_train", "hd_masked", "vd_forward",
                                               "vd_train", "vd_masked")}
    assert modes == ["error", "default"] * 7

    def syncing(*args, **kwargs):
        raise RuntimeError("called a synchronizing CUDA operation\nmore")
    monkeypatch.setattr(kernels, "mix_scatter", syncing)
    assert sync_check(layers, router, x, routing, "sparse")["hd_forward"] == "called a synchronizing CUDA operation"


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

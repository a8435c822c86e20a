"""The sparse expert path (monet.sparse) equals the dense factored layers and the naive sum over all N
experts: values and gradients (x, g1, g2, every weight), HD and VD, with masks and steering, odd shapes,
padding, KV-cache generation; ragged structures stay proportional to the real active pairs."""

import pytest
import torch
from naive import naive_layer

import monet
from monet import sparse
from monet.edits import ExpertEdits, apply_edits
from monet.interp.capture import active_experts
from monet.model import MonetHorizontalExperts, MonetRouter, MonetVerticalExperts, RoutingGroup
from monet.ops import edited_entries

SHAPES = [
    # (hidden, experts E, moe_dim m, heads H, topk k, batch, length)
    (8, 5, 4, 2, 2, 2, 3),     # E not a power of two, odd length
    (6, 3, 2, 1, 1, 1, 5),     # H = 1, k = 1
    (8, 4, 2, 3, 4, 1, 2),     # k = E: every half kept
    (10, 7, 6, 2, 3, 2, 1),    # odd E, single token
    (12, 16, 4, 4, 2, 3, 4),   # many halves never active in the batch
]
LAYERS = [MonetHorizontalExperts, MonetVerticalExperts]


def _layer(cls, hidden, experts, moe_dim, heads, topk, seed=0):
    config = monet.MonetConfig(hidden_size=hidden, num_attention_heads=1, moe_experts=experts, moe_dim=moe_dim,
                               moe_heads=heads, moe_topk=topk, vocab_size=16, hidden_act="relu2")
    torch.manual_seed(seed)
    layer = cls(config).double()
    with torch.no_grad():
        for p in layer.parameters():      # biases are zero at init: give every term something to check
            p.normal_(0.0, 0.5)
    return layer, MonetRouter(config).double().train()


def _edit_table(experts, seed=1):
    """About a third of the experts edited: half deleted, half steered by 2.5 (naive mask / scale sets)."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(experts * experts, generator=generator)[: max(2, experts * experts // 3)].tolist()
    masked = {(e // experts, e % experts) for e in chosen[: len(chosen) // 2]}
    steered = {(e // experts, e % experts): 2.5 for e in chosen[len(chosen) // 2:]}
    table = torch.zeros(experts * experts, dtype=torch.float64)
    for i, j in masked:
        table[i * experts + j] = 1.0
    for (i, j), alpha in steered.items():
        table[i * experts + j] = 1.0 - alpha
    return table, masked, steered


def _run(layer, path, x, g1, g2, table=None, group=None):
    """The layer on one expert path, as a routing group with edit table `table` passes it (or in `group`)."""
    with sparse.expert_path(path):
        return layer(x, g1, g2, group=group or RoutingGroup(g1, g2, table))


def _grads(out, inputs, probe):
    return torch.autograd.grad((out * probe).sum(), inputs, retain_graph=True, allow_unused=True)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["sparse", "decode"])
@pytest.mark.parametrize("edit", [False, True], ids=["plain", "edited"])
@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_equals_naive_through_the_router(cls, shape, edit, path):
    """Values and gradients w.r.t. x (through the router too) and every weight equal the naive N-sum,
    on the sparse path and on the decode path (`KeptHalves`)."""
    hidden, experts, moe_dim, heads, topk, batch, length = shape
    layer, router = _layer(cls, hidden, experts, moe_dim, heads, topk)
    table = masked = steered = None
    if edit:
        table, masked, steered = _edit_table(experts)
    x = torch.randn(batch, length, hidden, dtype=torch.float64, requires_grad=True)
    g1, g2 = router(x)
    out = _run(layer, path, x, g1, g2, table)
    ref = naive_layer(layer, x, g1, g2, mask=masked, scale=steered)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    probe = torch.randn_like(out)
    inputs = [x, *router.parameters(), *layer.parameters()]
    for got, want in zip(_grads(out, inputs, probe), _grads(ref, inputs, probe), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("path", ["sparse", "decode"])
@pytest.mark.parametrize("edit", [False, True], ids=["plain", "edited"])
@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_equals_dense_for_routing_inputs(cls, shape, edit, path):
    """With g1, g2 as inputs: same value, same gradients w.r.t. x, every weight, and g on its kept entries
    (off them the sparse path returns 0 and the decode path partial sums: see monet.sparse; the router never
    reads those entries)."""
    hidden, experts, moe_dim, heads, topk, batch, length = shape
    layer, router = _layer(cls, hidden, experts, moe_dim, heads, topk, seed=2)
    table = _edit_table(experts, seed=3)[0] if edit else None
    x = torch.randn(batch, length, hidden, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        g1, g2 = router(x)
    g1.requires_grad_(True)
    g2.requires_grad_(True)
    dense, sparse_out = _run(layer, "dense", x, g1, g2, table), _run(layer, path, x, g1, g2, table)
    torch.testing.assert_close(sparse_out, dense, rtol=1e-10, atol=1e-10)
    probe = torch.randn_like(dense)
    inputs = [x, g1, g2, *layer.parameters()]
    got, want = _grads(sparse_out, inputs, probe), _grads(dense, inputs, probe)
    for index, (a, b) in enumerate(zip(got, want, strict=True)):
        if index in (1, 2):                       # g1, g2: equal on the kept entries, 0 elsewhere
            kept = inputs[index] > 0
            torch.testing.assert_close(a[kept], b[kept], rtol=1e-9, atol=1e-10)
            if path == "sparse":
                assert not a[~kept].any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("path", ["sparse", "decode"])
@pytest.mark.parametrize("cls", LAYERS)
def test_float32_and_no_grad_and_empty_batch(cls, path):
    layer, router = _layer(cls, 16, 12, 4, 3, 2)
    layer.float()
    router.float()
    x = torch.randn(2, 6, 16)
    g1, g2 = router(x)
    with torch.no_grad():
        torch.testing.assert_close(_run(layer, path, x, g1, g2), _run(layer, "dense", x, g1, g2),
                                   rtol=1e-5, atol=1e-5)
    empty = torch.zeros(1, 0, 16)
    g_empty = torch.zeros(1, 0, 3, 12)
    assert _run(layer, path, empty, g_empty, g_empty).shape == (1, 0, 16)


def _tiny_model(decompose, seed=0):
    torch.manual_seed(seed)
    config = monet.preset("tiny", num_hidden_layers=4, moe_decompose=decompose, moe_experts=6, moe_topk=2)
    model = monet.MonetForCausalLM(config).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".moe." in name:
                p.normal_(0.0, 0.3)
    return model


def _padded_edited_run(model) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(loss, every parameter gradient) of `model` with masks and steering on a left-padded batch, on the dense
    path and then on the sparse one."""
    apply_edits(model, ExpertEdits().delete(0, [1, 7, 20]).scale(1, 8, 2.0).scale_bottom(1, 3, 0.5))
    ids = torch.randint(3, 256, (2, 7))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    results = []
    for path in ("dense", "sparse"):
        model.zero_grad()
        with sparse.expert_path(path):
            loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    return results


@pytest.mark.parametrize("decompose", ["vertical", "horizontal"])
def test_whole_model_with_padding_and_edits_sparse_equals_dense(decompose):
    """Training-mode forward+backward of a model on a left-padded batch with edits: same loss, same grads."""
    results = _padded_edited_run(_tiny_model(decompose).train())
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-10, atol=1e-12)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-8, atol=1e-11, msg=name)


@pytest.mark.parametrize("decompose", ["vertical", "horizontal"])
def test_kv_cache_generation_on_the_sparse_path_equals_full_forward(decompose):
    model = _tiny_model(decompose, seed=4).eval()
    apply_edits(model, ExpertEdits().delete(1, [0, 9, 13]).scale_top(0, 2, 3.0))
    ids = torch.randint(3, 256, (2, 5))
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
                   attention_mask=torch.ones_like(ids))
    with sparse.expert_path("sparse"):
        out = model.generate(ids, use_cache=True, output_logits=True, return_dict_in_generate=True, **options)
        full_sparse = model(out.sequences).logits
    with sparse.expert_path("dense"):
        full_dense = model(out.sequences).logits
        assert torch.equal(model.generate(ids, use_cache=True, **options), out.sequences)
    torch.testing.assert_close(full_sparse, full_dense, rtol=1e-10, atol=1e-12)
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full_sparse[:, ids.shape[1] - 1 + step], rtol=1e-9, atol=1e-11)


def _outlier_routing(tokens, heads, experts, outliers, seed=0):
    """g [tokens, H, E]: most tokens keep 1-2 halves per head, the outliers keep every half."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, heads, experts, generator=generator, dtype=torch.float64)
    keep = torch.zeros_like(z, dtype=torch.bool)
    keep.scatter_(-1, z.topk(2, dim=-1).indices[..., : 1 + int(torch.rand(1, generator=generator) < 0.5)], True)
    keep[:outliers] = True
    return torch.softmax(z.masked_fill(~keep, float("-inf")), dim=-1)


def test_ragged_pairs_with_outlier_tokens_are_exact_and_proportional():
    tokens, heads, experts, outliers = 64, 3, 24, 2
    g1 = _outlier_routing(tokens, heads, experts, outliers, seed=1)
    g2 = _outlier_routing(tokens, heads, experts, outliers, seed=2)
    pairs = sparse.active_pairs(g1, g2)
    real = int(((g1 > 0).sum(-1) * (g2 > 0).sum(-1)).sum())        # sum over (t, h) of |K1_th| |K2_th|
    assert pairs.token.numel() == real
    padded = tokens * heads * experts * experts                     # what padding to the batch max gave
    assert real < padded / 10
    # Each listed pair is real and its weight is g1_hi g2_hj.
    want = g1[pairs.token, pairs.head, pairs.i] * g2[pairs.token, pairs.head, pairs.j]
    torch.testing.assert_close(pairs.weight, want)
    # Merged per token: the naive g_ij = sum_h g1_hi g2_hj (tiny E only) and nothing else.
    naive = torch.einsum("thi,thj->tij", g1, g2).flatten(-2)
    merged = active_experts(g1.unsqueeze(0), g2.unsqueeze(0))
    assert merged.num_entries == int((naive > 0).sum())
    token, ids, scores = merged.entries()
    torch.testing.assert_close(scores.double(), naive[token, ids], rtol=1e-6, atol=1e-9)
    # The sparse layout lists exactly the (token, half) pairs some head kept.
    routing = sparse.sparse_routing(g1, g2)
    assert routing.layout1.size == int((g1 > 0).any(1).sum())
    # Edited entries: only edited active pairs, exactly.
    table = torch.zeros(experts * experts, dtype=torch.float64)
    table[::7] = 1.0
    token, i, j, c = edited_entries(g1, g2, table)
    want = (table[pairs.i * experts + pairs.j] != 0)
    assert token.numel() == int(want.sum())


def _saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves for backward while fn runs (storage counted once)."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, seen


@pytest.mark.parametrize("cls", LAYERS)
def test_outlier_tokens_stay_within_the_memory_bound(cls):
    """Memory proportional to the real active pairs, never tokens x batch-max: with two outlier tokens
    keeping every half, every tensor saved for backward and every ragged structure stays within
    O(active pairs * (m + 1) + tokens * (d + H * E)) bytes, far below what padding would take."""
    tokens, heads, experts, hidden, moe_dim = 256, 2, 64, 16, 4
    layer, _ = _layer(cls, hidden, experts, moe_dim, heads, 2)
    layer.float()
    table = torch.zeros(experts * experts)
    table[::5] = 1.0
    g1 = _outlier_routing(tokens, heads, experts, 2, seed=3).float().requires_grad_(True)
    g2 = _outlier_routing(tokens, heads, experts, 2, seed=4).float().requires_grad_(True)
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    out, seen = _saved_bytes(lambda: _run(layer, "sparse", x, g1.unsqueeze(0), g2.unsqueeze(0), table))
    parameters = {p.untyped_storage().data_ptr() for p in [*layer.parameters(), x, g1, g2]}
    saved = sum(n for ptr, n in seen.items() if ptr not in parameters)
    pairs = int(((g1 > 0).sum(-1) * (g2 > 0).sum(-1)).sum())          # real per-head active pairs
    active = int((g1 > 0).any(1).sum() + (g2 > 0).any(1).sum())      # real (token, half) pairs
    bound = 4 * (4 * active * (moe_dim + 1) + 2 * tokens * heads * experts) + 24 * pairs
    padded = 8 * tokens * heads * experts * experts                   # one int64 per padded pair
    assert saved <= bound < padded / 4, (saved, bound, padded)
    out.sum().backward()


@pytest.mark.parametrize("cls", LAYERS)
def test_outlier_tokens_never_create_a_tensor_of_batch_max_size(cls):
    """Every tensor any op creates (forward, backward, capture) stays O(largest real structure): the
    [tokens, H, E] routing itself, tokens x d, the real per-head pairs; never tokens x H x E^2-like."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    tokens, heads, experts, hidden, moe_dim = 256, 2, 64, 16, 4
    layer, _ = _layer(cls, hidden, experts, moe_dim, heads, 2)
    layer.float()
    table = torch.zeros(experts * experts)
    table[::5] = 1.0
    g1 = _outlier_routing(tokens, heads, experts, 2, seed=5).float().requires_grad_(True)
    g2 = _outlier_routing(tokens, heads, experts, 2, seed=6).float().requires_grad_(True)
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    pairs = int(((g1 > 0).sum(-1) * (g2 > 0).sum(-1)).sum())
    with Largest():
        out = _run(layer, "sparse", x, g1.unsqueeze(0), g2.unsqueeze(0), table)
        out.square().sum().backward()
        active_experts(g1.detach().unsqueeze(0), g2.detach().unsqueeze(0))
        sparse.active_pairs(g1.detach().unsqueeze(0), g2.detach().unsqueeze(0))   # the per-head pairs
    bound = max(tokens * heads * experts, tokens * hidden, experts * experts, pairs)
    assert Largest.numel <= bound < tokens * heads * experts * experts / 8, (Largest.numel, bound)


def test_routing_structure_is_built_once_per_group_and_survives_backward(monkeypatch):
    """The decoder passes each routing group down its layers: the index structure (with the edited pairs of
    the group's one edit table) is built by the first layer and reused by the others (values are gathered
    again per call, so repeated forward+backward on the same group works)."""
    builds, edits = [], []
    original, original_edits = sparse.sparse_routing, sparse.edited_entries
    monkeypatch.setattr(sparse, "sparse_routing", lambda *a: builds.append(1) or original(*a))
    monkeypatch.setattr(sparse, "edited_entries", lambda *a: edits.append(1) or original_edits(*a))
    model = _tiny_model("vertical").train()          # 4 layers, moe_groups 2: two routing groups
    apply_edits(model, ExpertEdits().delete(0, [1, 7]).scale(1, 8, 2.0))
    ids = torch.randint(3, 256, (2, 6))
    with sparse.expert_path("sparse"):
        model(ids, labels=ids).loss.backward()
    assert len(builds) == 2 and len(edits) == 2
    layer, router = _layer(MonetHorizontalExperts, 8, 5, 4, 2, 2)
    x = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    g1, g2 = (g.detach().requires_grad_(True) for g in router(x))
    group = RoutingGroup(g1, g2, _edit_table(5)[0])
    builds.clear()
    grads = []
    for _ in range(2):
        out = _run(layer, "sparse", x, g1, g2, group=group)
        grads.append(torch.autograd.grad(out.square().sum(), [x, g1, g2, *layer.parameters()]))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(builds) == 1
    # A routing that is not the group's own (a hook replaced it) gets a structure of its own.
    other = torch.roll(g1.detach(), 1, dims=-1)
    torch.testing.assert_close(_run(layer, "sparse", x, other, g2, group=group),
                               _run(layer, "dense", x, other, g2, group.edit_weights), rtol=1e-10, atol=1e-12)
    assert len(builds) == 2


@pytest.mark.parametrize("decompose", ["horizontal", "vertical"])
def test_dense_path_enumerates_edited_pairs_once_per_group_without_autograd(decompose, monkeypatch):
    """On the dense path an edited group's active pairs are enumerated by its first layer and reused by the
    others when nothing is differentiated (evaluation), with the same logits as enumerating them per layer;
    with autograd each layer enumerates its own (its own graph), and the gradients still match."""
    from monet import ops

    calls = []
    original = ops.edited_entries
    monkeypatch.setattr(ops, "edited_entries", lambda *a: calls.append(1) or original(*a))
    model = _tiny_model(decompose).eval()            # 4 layers, moe_groups 2: two routing groups
    apply_edits(model, ExpertEdits().delete(0, [1, 7, 12]).scale(1, 8, 2.0).delete(1, [3]))
    ids = torch.randint(3, 256, (2, 6))
    with sparse.expert_path("dense"), torch.no_grad():
        cached = model(ids).logits
    assert len(calls) == 2, "the dense path did not reuse its group's edited pairs"
    calls.clear()
    monkeypatch.setattr(monet.model.RoutingGroup, "edited_pairs",
                        lambda self, g1, g2, dtype: original(g1.to(dtype), g2.to(dtype), self.edit_weights))
    with sparse.expert_path("dense"), torch.no_grad():
        per_layer = model(ids).logits
    torch.testing.assert_close(cached, per_layer, rtol=0, atol=0)
    monkeypatch.undo()
    monkeypatch.setattr(ops, "edited_entries", lambda *a: calls.append(1) or original(*a))
    calls.clear()
    with sparse.expert_path("dense"):
        model(ids, labels=ids).loss.backward()
    assert len(calls) == 4


def test_dispatch_rule_and_switch(monkeypatch):
    layer, router = _layer(MonetHorizontalExperts, 8, 5, 4, 2, 2)
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    g1, g2 = router(x)
    group = RoutingGroup(g1, g2)

    def choose():
        return sparse.choose(layer, x, g1, g2, lambda: group.sparse_routing(g1, g2, x.dtype))

    assert choose() is None    # auto: far too little work per half
    with sparse.expert_path("sparse"):
        assert isinstance(choose(), sparse.Routing)
        with sparse.expert_path("dense"):                                # the innermost block wins
            assert choose() is None
        with sparse.expert_path("decode"):
            assert isinstance(choose(), sparse.KeptHalves)
    assert choose() is None    # back to auto after the block
    with pytest.raises(ValueError, match="expert path"), sparse.expert_path("fast"):
        pass
    monkeypatch.setattr(sparse, "SPARSE_MIN_WORK_PER_HALF", 0)
    assert choose() is None    # k = 2 of E = 5 per head: too dense
    monkeypatch.setattr(sparse, "SPARSE_MAX_ACTIVE_FRACTION", 1.0)
    assert choose() is not None


def test_add_rows_sums_repeated_pairs_in_index_order_on_any_number_of_threads():
    """The edit corrections accumulate with `sparse.add_rows`: the same bits on every call and thread count
    (index_put(accumulate=True) split 200k entries between two threads and gave ~280 different results in 300
    calls, the run-to-run differences of masked evaluations), equal to the one-thread sum; rows and scalars."""
    generator = torch.Generator().manual_seed(0)
    entries = 200_000
    token = torch.randint(0, 1024, (entries,), generator=generator)
    half = torch.randint(0, 64, (entries,), generator=generator)
    threads = torch.get_num_threads()
    try:
        for values, target in ((torch.randn(entries, generator=generator), torch.zeros(16, 64, 64)),
                               (torch.randn(entries, 3, generator=generator), torch.zeros(1024, 64, 3))):
            torch.set_num_threads(1)
            want = target.reshape(1024, 64, *values.shape[1:]).index_put((token, half), values, accumulate=True)
            torch.set_num_threads(max(2, threads))
            for _ in range(20):
                got = sparse.add_rows(target, token, half, values)
                assert got.shape == target.shape and torch.equal(got.reshape(want.shape), want)
    finally:
        torch.set_num_threads(threads)

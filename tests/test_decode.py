"""The decode path (monet.sparse.KeptHalves): chosen automatically for a few tokens without autograd, reads
only the kept halves' weights, and gives the dense path's tokens and logits under greedy decoding, with and
without edits. Values and gradients against the naive N-sum are in tests/test_sparse.py (path "decode")."""

import copy

import pytest
import torch
from test_sparse import LAYERS, _edit_table, _layer, _run

import monet
from monet import sparse
from monet.edits import ExpertEdits, apply_edits
from monet.model import RoutingGroup


def _halves_outside(layer, keep1: torch.Tensor, keep2: torch.Tensor) -> None:
    """Poison every weight of the halves not in keep1 (side 1) / keep2 (side 2) with NaN."""
    experts = layer.experts
    drop1, drop2 = (torch.ones(experts, dtype=torch.bool).index_fill_(0, keep, False) for keep in (keep1, keep2))

    def rows(weight, drop):
        weight.unflatten(0, (experts, -1))[drop] = float("nan")

    def columns(weight, drop):
        weight.unflatten(1, (experts, -1))[:, drop] = float("nan")

    with torch.no_grad():
        if isinstance(layer, monet.model.MonetHorizontalExperts):
            rows(layer.u.weight, drop1), rows(layer.u.bias, drop1), columns(layer.v.weight, drop2)
            rows(layer.b, drop2)
        else:
            for weight in (layer.u1.weight, layer.u1.bias, layer.b1):
                rows(weight, drop1)
            for weight in (layer.u2.weight, layer.u2.bias, layer.b2):
                rows(weight, drop2)
            columns(layer.v11.weight, drop1), columns(layer.v12.weight, drop1)
            columns(layer.v21.weight, drop2), columns(layer.v22.weight, drop2)


@pytest.mark.parametrize("tokens", ["one", "three", "repeated"])
@pytest.mark.parametrize("edit", [False, True], ids=["plain", "edited"])
@pytest.mark.parametrize("cls", LAYERS)
def test_decode_reads_only_the_kept_halves(cls, edit, tokens):
    """NaN in every weight of the halves no token kept: the decode path's output is still the dense value
    (a path that read those weights would return NaN, as the dense path does); one token (every half of the
    union is its own), several, and several that all keep every half of the union (bags without a gather)."""
    layer, router = _layer(cls, 12, 16, 4, 2, 2, seed=5)
    table = _edit_table(16, seed=6)[0] if edit else None
    x = torch.randn({"one": 1, "three": 3, "repeated": 1}[tokens], 1, 12, dtype=torch.float64)
    if tokens == "repeated":
        x = x.expand(3, 1, 12)
    with torch.no_grad():
        g1, g2 = router(x)
        want = _run(layer, "dense", x, g1, g2, table)
        plan = sparse.kept_halves(g1, g2)
        assert plan.first.numel() < 16 and plan.second.numel() < 16     # something left out on both sides
        _halves_outside(layer, plan.first, plan.second)
        assert _run(layer, "dense", x, g1, g2, table).isnan().any()
        torch.testing.assert_close(_run(layer, "decode", x, g1, g2, table), want, rtol=1e-12, atol=1e-12)


def test_auto_rule_picks_decoding_for_a_few_tokens_without_autograd(monkeypatch):
    layer, router = _layer(LAYERS[0], 12, 32, 4, 2, 2)
    x = torch.randn(2, 1, 12, dtype=torch.float64)
    g1, g2 = router(x)

    def choose(x, g1, g2):
        return sparse.choose(layer, x, g1, g2, lambda: RoutingGroup(g1, g2).sparse_routing(g1, g2, x.dtype))

    with torch.no_grad():
        assert isinstance(choose(x, g1, g2), sparse.KeptHalves)
        many = torch.randn(1, sparse.DECODE_MAX_TOKENS + 1, 12, dtype=torch.float64)
        assert not isinstance(choose(many, *router(many)), sparse.KeptHalves)
        monkeypatch.setattr(sparse, "DECODE_MAX_ACTIVE_FRACTION", 0.01)      # the halves are too large a share
        assert choose(x, g1, g2) is None
        with sparse.expert_path("decode"):                                  # forced: any size
            assert isinstance(choose(many, *router(many)), sparse.KeptHalves)
    assert choose(x, g1, g2) is None                                        # autograd on: training keeps its paths


def _model(decompose, dtype):
    torch.manual_seed(7)
    config = monet.preset("tiny", num_hidden_layers=4, moe_decompose=decompose, moe_experts=32, moe_topk=2)
    model = monet.MonetForCausalLM(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".moe." in name:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("edited", [False, True], ids=["plain", "edited"])
@pytest.mark.parametrize("decompose", ["vertical", "horizontal"])
def test_greedy_decoding_gives_the_dense_paths_tokens_and_logits(decompose, edited, dtype, batch, monkeypatch):
    """`generate` on the auto rule (which decodes on KeptHalves) = on the dense path: same tokens, logits within
    float rounding; with masks and steering too; one sequence (one token per step) and two. The decode path
    must actually have run, its plan built once per routing group and forward call."""
    model = _model(decompose, dtype)
    if edited:
        apply_edits(model, ExpertEdits().delete(0, [1, 40, 200, 333]).scale(1, 70, 2.5).scale_bottom(0, 3, 0.5))
    calls = []
    original = sparse.kept_halves
    monkeypatch.setattr(sparse, "kept_halves", lambda g1, g2: calls.append(1) or original(g1, g2))
    ids = torch.randint(3, 256, (batch, 6))
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=True,
                   attention_mask=torch.ones_like(ids), output_logits=True, return_dict_in_generate=True)
    auto = model.generate(ids, **options)
    groups = model.config.num_hidden_layers // model.config.moe_groups
    forwards = 8 if ids.numel() <= sparse.DECODE_MAX_TOKENS else 7     # the prompt too if it is short enough
    assert len(calls) == forwards * groups, "the decode path did not run once per group and forward call"
    with sparse.expert_path("dense"):
        dense = model.generate(ids, **options)
    assert torch.equal(auto.sequences, dense.sequences)
    tolerance = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for got, want in zip(auto.logits, dense.logits, strict=True):
        torch.testing.assert_close(got, want, **tolerance)


def test_column_major_weights_keep_values_and_save_as_before(tmp_path):
    """The decode path stores output projections column-major, VD's in pairs sharing one table (same values
    and shapes); state dicts hold unshared contiguous copies, and a model saved after decoding loads with the
    same weights and gives the same logits (up to float rounding)."""
    model = _model("vertical", torch.float64)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(3, 256, (1, 4))
    model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    moe = model.model.layers[0].moe
    assert not moe.v11.weight.is_contiguous()                             # V11|V12 interleaved now
    assert moe.v11.weight.untyped_storage().data_ptr() == moe.v12.weight.untyped_storage().data_ptr()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    state = model.state_dict()                 # contiguous copies: safetensors refuses tensors sharing memory
    assert all(state[f"model.layers.0.moe.{v}.weight"].is_contiguous() for v in ("v11", "v12", "v21", "v22"))
    copy = state["model.layers.0.moe.v11.weight"]
    assert moe.v11.weight.untyped_storage().data_ptr() != copy.untyped_storage().data_ptr()
    model.save_pretrained(tmp_path)
    loaded = monet.MonetForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    for name, p in loaded.named_parameters():
        assert torch.equal(p, before[name]), name
    with torch.no_grad():      # float32 logits: a matmul over either layout sums in its own order
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decompose", ["horizontal", "vertical"])
def test_decoding_in_inference_mode_leaves_a_trainable_model(decompose):
    """Decoding lays output projections out anew (column-major, VD's in pairs) and keeps the router's eval cut;
    inside `torch.inference_mode()` those must still be normal tensors, or a later training step fails."""
    model = _model(decompose, torch.float32)
    ids = torch.randint(3, 256, (1, 4))
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert not model.model.layers[0].moe.get_parameter("v11.weight" if decompose == "vertical" else
                                                       "v.weight").is_contiguous()      # laid out anew
    assert not any(p.is_inference() for p in model.parameters())
    model(ids, labels=ids).loss.backward()                   # eval mode, autograd: the kept cut is used
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if ".moe." in name)


def test_plan_is_built_once_per_group_and_follows_its_routing_and_edits():
    """The decoder passes one plan per routing group: its layers reuse it (same restricted routing object when
    nothing is differentiated), a routing that is not the group's gets a plan of its own, another edit table
    gets its own edited pairs, and a tracked call gathers again (repeated forward+backward works)."""
    layer, router = _layer(LAYERS[1], 12, 16, 4, 2, 2, seed=8)
    tables = [_edit_table(16, seed=s)[0] for s in (9, 10)]
    x = torch.randn(2, 1, 12, dtype=torch.float64)
    with torch.no_grad():
        g1, g2 = router(x)
        group = RoutingGroup(g1, g2, tables[0])
        outs = [_run(layer, "decode", x, g1, g2, group=group) for _ in range(2)]
        plan = group.halves
        assert group.kept_halves(g1, g2) is plan and plan.restrict(g1, g2, x.dtype, tables[0]) is \
            plan.restrict(g1, g2, x.dtype, tables[0])
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
        torch.testing.assert_close(outs[0], _run(layer, "dense", x, g1, g2, tables[0]), rtol=1e-12, atol=1e-12)
        other = torch.roll(g1, 1, dims=-1)                   # a hook replaced the routing: not the group's plan
        assert group.kept_halves(other, g2) is not plan
        torch.testing.assert_close(_run(layer, "decode", x, other, g2, group=group),
                                   _run(layer, "dense", x, other, g2, tables[0]), rtol=1e-12, atol=1e-12)
        for table in (tables[1], None, tables[0]):         # the same plan with other tables
            got = sparse.vd_decode(layer, x, g1, g2, plan, table)
            torch.testing.assert_close(got, _run(layer, "dense", x, g1, g2, table), rtol=1e-12, atol=1e-12)
    g1, g2 = (g.detach().requires_grad_(True) for g in (g1, g2))
    group = RoutingGroup(g1, g2, tables[0])
    grads = []
    for _ in range(2):
        out = _run(layer, "decode", x, g1, g2, group=group)
        grads.append(torch.autograd.grad(out.square().sum(), [g1, g2, *layer.parameters()]))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_router_without_autograd_gives_the_same_routing():
    """The router's no-autograd shortcut (decoding, evaluation) computes KeptSoftmax's forward: same g, bit for bit."""
    _, router = _layer(LAYERS[0], 12, 16, 4, 3, 2, seed=11)
    x = torch.randn(4, 3, 12, dtype=torch.float64)
    router(torch.randn(64, 12, dtype=torch.float64))            # running statistics from a batch
    router.eval()
    with torch.no_grad():
        fast = fast_before = router(x)
    slow = router(x)
    assert all(g.grad_fn is not None for g in slow)
    for a, b in zip(fast, slow, strict=True):
        assert torch.equal(a, b.detach())
    # The eval cut is kept until the running statistics change: in place, or replaced by another tensor.
    for change in (lambda norm: norm.running_mean.sub_(50.0),                           # every entry kept
                   lambda norm: setattr(norm, "running_mean", norm.running_mean + 50.0)):   # as before
        for norm in (router.norm1, router.norm2):
            change(norm)
        with torch.no_grad():
            fast = router(x)
        slow = router(x)
        for a, b in zip(fast, slow, strict=True):
            assert torch.equal(a, b.detach())
        assert not all(torch.equal(a, b) for a, b in zip(fast, fast_before, strict=True))
        fast_before = fast
    assert "_eval_cuts" in router.__dict__ and "_eval_cuts" not in copy.deepcopy(router).__dict__


@pytest.mark.parametrize("cls", LAYERS)
def test_one_token_views_follow_the_weights_and_go_when_the_layer_is_cast(cls):
    """The one-token loop reads each half through views kept on the layer (and VD's output projections through
    paired tables): they see in-place updates, are rebuilt for a replaced weight, and a cast (`.to`) drops
    them (nothing keeps the old weights alive)."""
    layer, router = _layer(cls, 12, 16, 4, 2, 2, seed=5)
    x = torch.randn(1, 1, 12, dtype=torch.float64)
    up = layer.u if isinstance(layer, monet.model.MonetHorizontalExperts) else layer.u1
    with torch.no_grad():
        g1, g2 = router(x)
        _run(layer, "decode", x, g1, g2, None)
        assert "_half_views" in layer.__dict__
        up.weight.mul_(-2.0)                                               # in place: the views see it
        torch.testing.assert_close(_run(layer, "decode", x, g1, g2, None), _run(layer, "dense", x, g1, g2, None))
        up.weight = torch.nn.Parameter(torch.randn_like(up.weight))       # replaced: views made again
        torch.testing.assert_close(_run(layer, "decode", x, g1, g2, None), _run(layer, "dense", x, g1, g2, None))
        if isinstance(layer, monet.model.MonetVerticalExperts):      # VD's paired output tables likewise
            assert "_paired_columns" in layer.__dict__
            layer.v12.weight.mul_(0.5)
            torch.testing.assert_close(_run(layer, "decode", x, g1, g2, None), _run(layer, "dense", x, g1, g2, None))
            layer.v21.weight = torch.nn.Parameter(torch.randn_like(layer.v21.weight))
            torch.testing.assert_close(_run(layer, "decode", x, g1, g2, None), _run(layer, "dense", x, g1, g2, None))
            assert layer.v21.weight.untyped_storage().data_ptr() == layer.v22.weight.untyped_storage().data_ptr()
        copied = copy.deepcopy(layer)                    # copies leave the caches (and their weights) behind
        assert "_half_views" not in copied.__dict__ and "_paired_columns" not in copied.__dict__
        torch.testing.assert_close(_run(copied, "decode", x, g1, g2, None), _run(layer, "dense", x, g1, g2, None))
        layer.to(torch.float32)
        assert "_half_views" not in layer.__dict__ and "_paired_columns" not in layer.__dict__
        x32, g1, g2 = x.float(), g1.float(), g2.float()
        torch.testing.assert_close(_run(layer, "decode", x32, g1, g2, None), _run(layer, "dense", x32, g1, g2, None))

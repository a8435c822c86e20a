"""`monet bench`: report shape (never timing thresholds), the official-order references, measuring helpers."""

import json
import math

import pytest
import torch

import monet
from monet import ops
from monet.cli import main
from monet.experiments import bench
from monet.model import MonetHorizontalExperts, MonetRouter, MonetVerticalExperts


def _finite_positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report.json"
    md = out.with_suffix(".md")
    assert main(["bench", "--quick", "--json", "--out", str(out), "--markdown", str(md)]) == 0
    return json.loads(out.read_text()), md.read_text(), out


def test_quick_report_has_every_ratio_positive_and_finite(quick_report):
    report, _, _ = quick_report
    ratios = report["ratios"]
    for name in ("monet_vs_dense", "monet_vs_official_order", "masked_vs_unmasked"):
        assert ratios[name], name
        assert all(_finite_positive(v) for v in ratios[name].values()), (name, ratios[name])
    assert set(ratios["monet_vs_dense"]) == {"micro/hd", "micro/vd"}
    assert len(ratios["masked_vs_unmasked"]) == 6          # HD and VD at 0.1%, 1%, 15%
    assert _finite_positive(ratios["train_monet_vs_dense"])
    assert _finite_positive(ratios["capture_vs_forward"])
    assert set(report["goals"]) == set(bench.GOALS)
    assert report["machine"]["threads"] == 1 and report["machine"]["torch"] == torch.__version__
    assert len(report["load_average_start"]) == 3 and len(report["load_average_end"]) == 3


def test_quick_report_times_memory_and_scaling(quick_report):
    report, _, _ = quick_report
    block = report["blocks"][0]
    cases = {"router", "router_official", "hd", "hd_official", "vd", "vd_official", "dense_relu2", "dense_gated"}
    assert set(block["times"]) == cases and set(block["peak_mib"]) == cases
    for stats in block["times"].values():
        assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"]
    assert all(v >= 0 for v in block["peak_mib"].values())
    rows = report["scaling"]["rows"]
    assert [r["experts"] for r in rows if r["decompose"] == "vertical"] == [8, 16, 32]
    for kind in ("horizontal", "vertical"):
        # Parameters grow linearly in E = sqrt(N) (the router dominates nothing here): exponent ~1, not 2.
        assert report["scaling"]["summary"][kind]["param_exponent_vs_E"] == pytest.approx(1.0, abs=0.1)


def test_markdown_and_json_files_are_written(quick_report):
    _, md, out = quick_report
    assert "| shape | decomposition | block ms |" in md and "Headline ratios" in md
    assert "Load average" in md and "Command: `monet bench" in md
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("cls, reference", [(MonetHorizontalExperts, bench.official_order_hd),
                                            (MonetVerticalExperts, bench.official_order_vd)])
def test_official_order_reference_equals_the_layer(cls, reference):
    config = monet.MonetConfig(hidden_size=12, num_attention_heads=1, moe_experts=6, moe_dim=4, moe_heads=2,
                               moe_topk=2, vocab_size=16, hidden_act="relu2")
    layer = bench._init(cls(config).double(), seed=3)
    router = bench._init(MonetRouter(config).double(), seed=4).train()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    g1, g2 = router(x)
    torch.testing.assert_close(reference(layer, x, g1, g2), layer(x, g1, g2), rtol=1e-10, atol=1e-12)


def test_official_router_equals_the_fast_router():
    config = monet.MonetConfig(hidden_size=16, num_attention_heads=1, moe_experts=64, moe_topk=4, moe_heads=3,
                               vocab_size=16)
    router = bench._init(MonetRouter(config).double(), seed=0)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    fast = router.train()(x)
    reference = MonetRouter(config).double().train()
    reference.load_state_dict(router.state_dict())
    reference.norm1.reset_running_stats()
    reference.norm2.reset_running_stats()
    for got, want in zip(fast, bench.official_router(reference, x), strict=True):
        torch.testing.assert_close(got, want.double(), rtol=1e-6, atol=1e-9)


def test_interleaved_rotates_cases_and_summarises():
    calls = []
    cases = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    stats = bench.interleaved(cases, repeats=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert set(stats) == set("abc") and all(s["runs"] == 3 for s in stats.values())
    summary = bench.summarise([0.003, 0.001, 0.002])
    assert summary["median_ms"] == pytest.approx(2.0) and summary["min_ms"] == pytest.approx(1.0)
    assert summary["max_ms"] == pytest.approx(3.0)


def test_peak_memory_sees_a_large_temporary():
    def step():
        a = torch.ones(4 * 2**20)       # 16 MiB
        b = a * 2                       # 16 MiB more, both alive
        del a, b
    assert bench.peak_memory_mib(step) >= 31.0


def test_bad_arguments_are_clear_errors(capsys):
    assert main(["bench", "--quick", "--tokens", "0"]) == 2
    assert "--tokens must be a positive" in capsys.readouterr().err
    assert main(["bench", "--quick", "--threads", "0"]) == 2


def test_compile_switch_is_off_by_default_and_falls_back(monkeypatch):
    monkeypatch.delenv("MONET_COMPILE", raising=False)
    assert ops.maybe_compile(ops.hd_mix) is ops.hd_mix
    monkeypatch.setenv("MONET_COMPILE", "1")

    def broken(fn, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    wrapped = ops.maybe_compile(ops.hd_mix)
    hidden, g = torch.randn(1, 2, 4, 3), torch.softmax(torch.randn(1, 2, 2, 4), -1)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        top, weight = wrapped(hidden, g, g)
    want_top, want_weight = ops.hd_mix(hidden, g, g)
    torch.testing.assert_close(top, want_top)
    torch.testing.assert_close(weight, want_weight)

"""`monet bench`: report shape and keys, finite positive ratios, the measuring helpers (never timings)."""

import json
import math

import pytest
import torch

from monet.cli import main
from monet.experiments import bench


def _finite_positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report.json"
    md = out.with_suffix(".md")
    assert main(["bench", "--quick", "--path", "sparse", "--json", str(out), "--markdown", str(md)]) == 0
    return json.loads(out.read_text()), md.read_text(), out


def test_quick_report_has_every_ratio_keyed_and_finite(quick_report):
    report, _, _ = quick_report
    ratios = report["ratios"]
    assert set(ratios) == set(bench.GOALS)
    for name in ("sparse_vs_dense", "train_vs_dense", "masked_vs_unmasked", "train_memory_vs_dense", "decode_vs_dense",
                 "decode_batch4_vs_dense"):
        assert set(ratios[name]) == {"tiny/hd", "tiny/vd"}, name
        assert all(_finite_positive(v) for v in ratios[name].values()), (name, ratios[name])
    assert _finite_positive(ratios["capture_vs_forward"])
    assert set(report["ratios_min"]) == set(ratios)
    assert report["machine"]["threads"] == 1 and report["machine"]["torch"] == torch.__version__
    assert len(report["load_average_start"]) == 3 and len(report["load_average_end"]) == 3
    assert report["command"].startswith("monet bench --device cpu")


def test_quick_report_sections(quick_report):
    report, _, _ = quick_report
    shape = report["shapes"]["tiny"]
    assert shape["sparse_path"] == {"hd": True, "vd": True}
    assert set(shape["forward"]) == {"dense", "router", "hd", "vd", "hd_dense_path", "vd_dense_path", "prep"}
    assert set(shape["train"]) == {"dense", "router", "hd", "vd"}
    labels = ["none", *(f"{100 * f:g}%" for f in bench.MASK_FRACTIONS)]
    assert set(shape["masking"]) == {f"{k}/{label}" for k in ("hd", "vd", "prep") for label in labels}
    for section in ("forward", "train", "masking"):
        for stats in shape[section].values():
            assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["max_ms"] and stats["runs"] == 2
    assert all(v > 0 for v in shape["saved_mib"].values())
    decode = shape["decode"]
    cases = {f"{k}/b{b}" for k in ("dense", "router", "hd", "vd", "hd_first", "vd_first", "hd_dense_path",
                                   "vd_dense_path")
             for b in bench.DECODE_BATCHES}
    assert set(decode) == {"batches", "auto_path", "kept_halves_fraction", *cases}
    assert all(decode[case]["runs"] == 2 for case in cases)
    assert decode["auto_path"]["hd/b1"] == "decode"          # one token of the tiny shape: the kept halves
    assert set(report["capture"]) == {"tokens", "forward", "capture"}


def test_markdown_and_json_files_are_written(quick_report):
    _, md, out = quick_report
    assert "| ratio | key | medians | mins | goal (on medians) |" in md
    assert "Load average" in md and "Command: `monet bench" in md
    assert "## tiny: masking" in md
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_interleaved_rotates_cases_and_summarises():
    calls = []
    cases = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = bench.interleaved(cases, repeats=3, warmup=1, timer=bench.Timer(torch.device("cpu")))
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert set(times) == set("abc") and all(len(v) == 3 for v in times.values())
    summary = bench.summarise([0.003, 0.001, 0.002])
    assert summary["median_ms"] == pytest.approx(2.0) and summary["min_ms"] == pytest.approx(1.0)
    assert summary["max_ms"] == pytest.approx(3.0) and summary["runs"] == 3


def test_saved_bytes_counts_distinct_saved_storages():
    x = torch.randn(1000, requires_grad=True)
    w = torch.randn(1000, requires_grad=True)
    # x * w saves both; excluding x leaves w; y.sin() saves y (a new 4000-byte storage).
    assert bench.saved_bytes(lambda: (x * w).sin(), [x]) == 8000
    assert bench.saved_bytes(lambda: (x * w).sin(), [x, w]) == 4000


def test_path_decode_times_the_block_on_the_kept_halves(tmp_path):
    """`--path decode` is accepted and runs the block cases on the kept halves (no sparse routing structure)."""
    out = tmp_path / "decode.json"
    assert main(["bench", "--quick", "--path", "decode", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    shape = report["shapes"]["tiny"]
    assert shape["sparse_path"] == {"hd": False, "vd": False} and "prep" not in shape["forward"]
    assert "--path decode" in report["command"]
    assert all(_finite_positive(v) for v in report["ratios"]["sparse_vs_dense"].values())


def test_bad_arguments_are_clear_errors(capsys):
    assert main(["bench", "--quick", "--tokens", "0"]) == 2
    assert "--tokens must be a positive" in capsys.readouterr().err
    assert main(["bench", "--quick", "--threads", "0"]) == 2
    if not torch.cuda.is_available():
        assert main(["bench", "--quick", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err

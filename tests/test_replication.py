"""benchmarks/unlearning/run.py --replication: per-seed grades, the verdict over seeds, provenance checks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "unlearning" / "run.py"


def _run_module():
    spec = importlib.util.spec_from_file_location("unlearning_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(grades: dict[str, str], lock: str = "abc", ratio: float = 1.5) -> dict:
    row = {"delta_target": 0.3, "delta_others": 0.02, "random_delta_target_p95": 0.1, "masking_ratio": 0.06,
           "worst_other": {"label": "x", "delta": 0.05}, "passed": True}
    return {"summary": {label: {**row, "grade": grade} for label, grade in grades.items()}, "ratio": ratio,
            "provenance": {"corpus_lock_sha256": lock}}


def test_replication_grades_and_provenance():
    run = _run_module()
    reports = {3: _report({"c": "robust", "go": "marginal"}), 4: _report({"c": "robust", "go": "robust"}),
               5: _report({"c": "robust", "go": "failing"}), 6: _report({"c": "marginal", "go": "failing"})}
    result = run.aggregate(reports)
    assert result["monet"]["c"]["replication"] == "robust" and result["monet"]["go"]["replication"] == "failing"
    assert result["monet"]["c"]["grades"] == ["robust", "robust", "robust", "marginal"]
    assert run.provenance_check(reports, "abc") == []
    text = run.replication_markdown(result, [3, 4, 5, 6], "cmd", [])
    assert "| c | robust robust robust marginal | robust |" in text and "1 of 2 labels robust" in text
    reports[6] = _report({"c": "robust", "go": "robust"}, lock="other", ratio=2.0)
    problems = run.provenance_check(reports, "abc")
    assert any("seed 6: corpus lock other" in p for p in problems)
    assert any("seed 6: settings differ" in p and "ratio" in p for p in problems)
    # Reports from before issue 23 carry no grade: no verdict is invented for them.
    old = {0: {"summary": {"c": {k: v for k, v in _report({"c": "robust"})["summary"]["c"].items() if k != "grade"}}}}
    assert "replication" not in run.aggregate(old)["monet"]["c"]


def test_a_rerun_keeps_the_hand_written_sections(tmp_path):
    run = _run_module()
    path = tmp_path / "RESULTS.md"
    assert run.kept_sections(path) == ""
    path.write_text("# old table\n\nrows\n", encoding="utf-8")
    assert run.kept_sections(path) == ""   # no marker: everything is the generated table
    path.write_text(f"# old table\n\nrows\n\n{run.KEEP}\n\n## Baselines\n\ntext\n", encoding="utf-8")
    assert run.kept_sections(path) == f"\n{run.KEEP}\n\n## Baselines\n\ntext\n"


def test_replication_table_carries_the_dense_baselines_at_equal_target():
    run = _run_module()
    reports = {3: _report({"c": "robust"}), 4: _report({"c": "robust"})}
    for seed, at in ((3, 0.2), (4, None)):
        reports[seed]["equal_target"] = {"c": {"monet_delta_others": 0.02, "dense_delta_others": at}}
    result = run.aggregate(reports)
    # One seed's attribution curve reaches Monet's Δ target (Δ others 0.15), the other's never does.
    baselines = {3: {"comparison": {"c": {"monet": {"delta_others": 0.03},
                                          "attribution:zero": {"others_at_monet_target": 0.15}}}},
                 4: {"comparison": {"c": {"monet": {"delta_others": 0.05},
                                          "attribution:zero": {"others_at_monet_target": None}}}}}
    rows = run.baseline_rows(baselines, "attribution:zero")
    assert rows["c"]["reached"] == 1 and rows["c"]["seeds"] == 2
    assert rows["c"]["rule"]["mean"] == 0.15 and rows["c"]["monet"]["mean"] == 0.03
    text = run.replication_markdown(result, [3, 4], "cmd", [], baselines)
    assert "| c | +0.020 ± 0.000 | +0.200 ± 0.000 (1/2) | +0.030 ± 0.000 | +0.150 ± 0.000 (1/2) |" in text
    assert "attribution:zero" not in run.replication_markdown(result, [3, 4], "cmd", [])


def test_an_incomplete_replication_says_what_is_already_decided():
    """With seeds missing the table is marked incomplete; a label is robust for sure at 3 robust seeds, out of
    reach when the missing seeds cannot bring it to 3, open otherwise."""
    run = _run_module()
    assert run.decided_verdict(["robust"] * 3, 1) == "robust"
    assert run.decided_verdict(["robust", "robust", "marginal"], 1) == "open"
    assert run.decided_verdict(["robust", "marginal", "marginal"], 1) == "not robust"
    assert run.decided_verdict(["marginal"], 3) == "open"
    reports = {3: _report({"c": "robust", "go": "marginal"}), 4: _report({"c": "robust", "go": "failing"}),
               5: _report({"c": "robust", "go": "marginal"})}
    text = run.replication_markdown(run.aggregate(reports), [3, 4, 5], "cmd", [])
    assert "INCOMPLETE: seed 6 missing" in text and "pre-registered success: at least 6 of 8)." not in text
    assert "robust already 1 (c), cannot be robust 1 (go)" in text and "already out of reach" in text
    full = run.replication_markdown(run.aggregate({**reports, 6: _report({"c": "robust", "go": "robust"})}),
                                    [3, 4, 5, 6], "cmd", [])
    assert "INCOMPLETE" not in full and "1 of 2 labels robust" in full

"""`monet demo --quick`: the whole path on a tiny model, then a re-run that reuses every finished step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monet.cli import main


@pytest.mark.slow
def test_quick_demo_runs_and_reuses_finished_steps(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["demo", "--out", str(tmp_path / "demo"), "--quick", "--quiet"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    report = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    assert report["targets"] and report["monet"]["before"]
    for name in ("data/manifest.json", "atlas/manifest.json", "dense-atlas/manifest.json", "report/heatmap.png",
                 "report/forget_retain.png", "report/loss_matrix.csv"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert "Δ target" in first and "grade" in first and "labels pass)" in first and "monet view" in first
    assert "already done" not in first
    assert set(report["summary"]) == set(report["dense"]) == set(report["targets"])
    import monet.experiments.demo as demo

    def rerun(*args, **kwargs):
        raise AssertionError("a finished step ran again")

    for step in ("train", "load_checkpoint", "build_atlas", "unlearn"):   # the re-run may run none of them
        monkeypatch.setattr(demo, step, rerun)
    check_summary(tmp_path / "demo", first)
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert second.count("already done, reused") == 6   # corpus, 2 runs, 2 atlases, report
    assert json.loads((tmp_path / "demo" / "report" / "report.json").read_text()) == report


def test_demo_refuses_a_file_as_directory(tmp_path: Path) -> None:
    from monet.errors import MonetError
    from monet.experiments.demo import run_demo
    from monet.settings import DemoSettings

    (tmp_path / "file").write_text("x")
    with pytest.raises(MonetError, match="is a file"):
        run_demo(DemoSettings(out=str(tmp_path / "file"), quick=True, quiet=True))


def check_summary(demo: Path, printed: str) -> None:
    """summary.md holds the printed table and legend, each figure with its caption, and commands that parse;
    the closing hint opens the viewer with --run (steering, test text and similar experts need the model)."""
    import shlex

    from monet.cli import parse, split_command

    summary = (demo / "report" / "summary.md").read_text(encoding="utf-8")
    table = printed[printed.index("masked "):printed.index("labels pass)") + len("labels pass)")]
    assert table.split("\n\n")[0] in summary and "labels pass)" in summary
    assert "![heatmap.png](heatmap.png)" in summary and "![forget_retain.png](forget_retain.png)" in summary
    assert "nats/token" in summary
    commands = summary.split("## The same, step by step")[1].split("```")[1].strip().splitlines()
    assert [line.split()[1] for line in commands] == ["data", "train", "train", "atlas", "atlas", "unlearn", "view"]
    for line in commands:
        name, rest = split_command(shlex.split(line)[1:])
        parse(name, rest)                                        # each is a valid command line
    assert f"monet view {demo / 'atlas'} --run {demo / 'run'}" in printed
    assert commands[-1] == f"monet view {demo / 'atlas'} --run {demo / 'run'}"
    assert "--split train" in commands[3] and "--ratio" in commands[5]

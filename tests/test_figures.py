"""The unlearning report's figures explain themselves (issue 29): the heatmap has a colour bar with its unit and
each label's grade; the forget-retain panels have units, labelled sweep points and one legend. Checked on the
matplotlib objects drawn from the committed report of reports/code-unlearning (plotting only, no model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.colors import to_rgba
from matplotlib.patches import Rectangle

from monet.experiments.unlearn import GRADE_STYLE, forget_retain_figure, heatmap_figure, summary_rows

REPORT = Path(__file__).resolve().parents[1] / "reports" / "code-unlearning" / "report.json"


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads(REPORT.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_heatmap_has_a_unit_and_grades(report):
    fig = heatmap_figure(report)
    images = [ax for ax in fig.axes if ax.images]
    bars = [ax for ax in fig.axes if not ax.images]
    assert len(images) == 2 and len(bars) == 2                       # Monet and the dense baseline, a bar each
    assert all("nats/token" in bar.get_ylabel() and "Δ loss" in bar.get_ylabel() for bar in bars)
    for ax, result in zip(images, (report["monet"], report["dense_protocol"]), strict=True):
        grades = {label: row["grade"] for label, row in summary_rows(result).items()}
        outlines = {patch.get_gid(): patch for patch in ax.patches if isinstance(patch, Rectangle)}
        for label, grade in grades.items():
            patch = outlines[f"grade:{label}"]
            row = list(result["before"]).index(label)
            assert patch.get_y() == pytest.approx(row - 0.46) and patch.get_x() == pytest.approx(
                list(result["masked"]).index(label) - 0.46)            # the label's own (diagonal) cell
            assert patch.get_edgecolor() == to_rgba(GRADE_STYLE[grade][0])
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks == [f"{label} · {grades[label]}" for label in result["masked"]]
    monet = {label: row["grade"] for label, row in report["summary"].items()}
    assert sorted(set(monet.values())) == ["marginal", "robust"]    # this report: python marginal, the rest robust
    assert len(fig.legends) == 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(GRADE_STYLE)


def test_forget_retain_points_units_and_one_legend(report):
    fig = forget_retain_figure(report)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == list(report["monet"]["masked"])
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in fig.axes)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("Monet" in t for t in legend) and any("dense" in t for t in legend)
    assert "operating point" in legend and any("p95" in t for t in legend)
    monet = [f"≥{r:g}" for r in (*report["sweep"], report["ratio"])]
    dense = [f"{100 * f:.2g}%" for f in report["dense_fractions"]]
    for ax in panels:
        assert "nats/token" in ax.get_xlabel() and "nats/token" in ax.get_ylabel()
        labels = {t.get_gid(): t.get_text() for t in ax.texts}
        assert sorted(t for g, t in labels.items() if g.startswith("point:Monet:")) == sorted(monet)
        assert set(dense) <= {t for g, t in labels.items() if g.startswith("point:dense:")}

"""`monet unlearn`: selection from an atlas, masked evaluation, report files, dense neuron baseline, errors."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import monet
from monet.checkpoint import load_checkpoint
from monet.cli import main
from monet.data import PackedSequences, TokenDataset
from monet.edits import current_weights, neuron_masks
from monet.errors import MonetError
from monet.evaluate import label_window_sets, window_losses
from monet.experiments.protocol_stats import delta_ci
from monet.experiments.unlearn import (
    EvalPlan,
    atlas_label_means,
    choice_scores,
    headword_items,
    multiple_choice_accuracy,
    read_windows,
    select_for_label,
    spaced,
    summary_rows,
    unlearn,
)
from monet.interp.criteria import select_top
from monet.interp.query import Atlas
from monet.interp.units import units_of
from monet.settings import DemoSettings, ToxicitySettings, TrainSettings, UnlearnSettings


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quick demo directory: code corpus, tiny Monet + dense runs, their atlases, a full report."""
    from monet.experiments.demo import run_demo

    out = tmp_path_factory.mktemp("unlearn") / "demo"
    run_demo(DemoSettings(out=str(out), quick=True, baseline=True, quiet=True))
    return out


def _cli(argv: list[str]) -> int:
    return main(argv)


@pytest.mark.slow
def test_report_files_and_consistency(demo: Path) -> None:
    report_dir = demo / "report"
    report = json.loads((report_dir / "report.json").read_text())
    assert sorted(report["files"]) == ["dense_loss_matrix.csv", "forget_retain.png", "heatmap.png",
                                       "loss_matrix.csv", "report.json", "windows.csv.gz"]
    for name in ("heatmap.png", "forget_retain.png"):
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = report["labels"]
    model, _ = load_checkpoint(demo / "run", load_tokenizer=False)
    atlas_labels, means = atlas_label_means(Atlas(demo / "atlas"))
    n = model.config.moe_experts ** 2
    groups = model.config.num_routing_groups
    for target, entry in report["monet"]["masked"].items():
        selection = select_for_label(means, atlas_labels, target, ratio=report["ratio"])
        assert entry["masked_experts"] == selection.total
        assert entry["masking_ratio"] == pytest.approx(selection.total / (groups * n))
        for label in labels:   # delta = masked - unmasked on the same windows, inside its interval
            after = entry["after"][label]
            assert entry["delta"][label] == pytest.approx(after["loss"] - after["before"])
            lo, hi = entry["delta_ci95"][label]
            assert lo <= entry["delta"][label] <= hi
        others = [entry["delta"][label] for label in labels if label != target]
        assert entry["delta_others"] == pytest.approx(np.mean(others))   # each other label weighs the same
        assert entry["delta_target"] == pytest.approx(entry["delta"][target])
        assert entry["after"][target]["tokens"] == report["monet"]["before"][target]["tokens"]   # all windows
        if entry["masked_experts"]:
            assert len(entry["random"]["deltas"]) == len(entry["random"]["others_deltas"]) == report["random_masks"]
            assert entry["random"]["p95"] == pytest.approx(np.percentile(entry["random"]["deltas"], 95))
            assert entry["random"]["comparison"]["masks"] == report["random_masks"]
        worst = max((label for label in labels if label != target), key=lambda label: entry["delta"][label])
        assert entry["worst_other"]["label"] == worst and entry["worst_other"]["delta"] == entry["delta"][worst]
        row = report["summary"][target]
        for field in ("delta_target", "delta_others", "delta_target_ci95", "random_delta_target_p95",
                      "masked_experts", "masking_ratio"):
            assert field in row and field in report["dense"][target], field
        assert row["delta_target"] == entry["delta_target"]
        # The bar and the grade are the report's own numbers put through the rules (whose values are checked
        # by hand in test_summary_rows_apply_the_bar_to_hand_made_entries and test_protocol_stats).
        assert report["bar"]["min_delta"] == 0.10 and report["bar"]["selectivity"] == 5.0
        assert row["grade"] in ("robust", "marginal", "failing")
        assert row["passed"] == (entry["masked_experts"] > 0 and row["random_delta_target_p95"] is not None and all(
            row[check] for check in ("min_delta", "selective", "beats_random")))
        if row["grade"] == "robust":
            assert row["interval_min_delta_lo"] and row["interval_selective_lo"] and row["control_selection_below"]
        dense = report["dense_protocol"]["masked"][target]   # the dense operating point: Monet's share of units
        units = sum(report["dense_protocol"]["masked"][target]["selection"]["selected_per_group"].values())
        assert dense["masked_experts"] == units
        if entry["masked_experts"]:
            want = max(1, round(entry["masking_ratio"] * dense["selection"]["units_per_group"]))
            assert all(c <= want for c in dense["selection"]["selected_per_group"].values())
        assert [p["parameter"] for p in dense["sweep"]] == report["dense_fractions"]
    assert set(report["equal_target"]) <= set(report["monet"]["masked"])
    for result in (report["monet"], report["dense_protocol"]):   # the ceiling: every unit removed
        ceiling = result["ceiling"]
        assert set(ceiling["delta"]) == set(labels) and ceiling["masked_experts"] > 0
        assert all(lo <= ceiling["delta"][label] <= hi for label, (lo, hi) in ceiling["delta_ci95"].items())
    assert report["dense_protocol"]["ceiling"]["masked_experts"] == (model.config.num_hidden_layers
                                                                     * report["dense_protocol"]["masked"][labels[0]]
                                                                     ["selection"]["units_per_group"])
    for target, row in report["summary"].items():
        assert row["ceiling_delta_target"] == report["monet"]["ceiling"]["delta"][target]
    with open(report_dir / "loss_matrix.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == ["unmasked loss", *report["monet"]["masked"]]
    assert [r[0] for r in rows[1:]] == [*labels, "Δ Target", "Δ Others", "random p95"]
    assert float(rows[1][1]) == pytest.approx(report["monet"]["before"][labels[0]]["loss"], abs=1e-4)


def _entry(delta_target, target_ci, delta_others, others_ci, p95=0.05, below=True, masked=10):
    """One masked label of a protocol result, with its control, as `run_protocol` writes it."""
    return {"delta_target": delta_target, "delta_target_ci95": target_ci, "delta_others": delta_others,
            "delta_others_ci95": others_ci, "worst_other": None, "masked_experts": masked, "masking_ratio": 0.01,
            "target_vs_others": None, "random": {"p95": p95, "selection_delta": delta_target,
                                                 "comparison": {"selection_below": below, "p_value": 0.01}}}


def test_summary_rows_apply_the_bar_to_hand_made_entries() -> None:
    """The point bar (Δ target >= 0.10, >= 5 x max(Δ others, 0), > control p95) and the grades on interval
    bounds, on entries whose outcome is worked out by hand."""
    rows = summary_rows({"masked": {
        "robust": _entry(0.30, [0.20, 0.40], 0.01, [-0.01, 0.03]),                # 0.20 >= 0.10 and >= 5 x 0.03
        "wide": _entry(0.30, [0.05, 0.55], 0.01, [-0.01, 0.03]),                  # lower bound under 0.10
        "leaky": _entry(0.30, [0.20, 0.40], 0.05, [0.03, 0.07]),                  # 0.20 < 5 x 0.07; 0.30 >= 5 x 0.05
        "small": _entry(0.08, [0.06, 0.10], 0.0, [-0.01, 0.01]),                  # under 0.10 even as a point
        "control": _entry(0.30, [0.20, 0.40], 0.01, [-0.01, 0.03], p95=0.35, below=False),
        "empty": _entry(0.0, [0.0, 0.0], 0.0, [0.0, 0.0], p95=None, below=None, masked=0),
    }})
    assert {label: row["grade"] for label, row in rows.items()} == {
        "robust": "robust", "wide": "marginal", "leaky": "marginal", "small": "failing", "control": "marginal",
        "empty": "failing"}
    assert {label: row["passed"] for label, row in rows.items()} == {
        "robust": True, "wide": True, "leaky": True, "small": False, "control": False, "empty": False}
    assert rows["control"]["beats_random"] is False and rows["small"]["min_delta"] is False
    assert rows["leaky"]["interval_selective_lo"] is False and rows["wide"]["interval_min_delta_lo"] is False


@pytest.mark.slow
def test_windows_file_recomputes_the_report(demo: Path) -> None:
    """Every reported Δ, its clustered interval and the control's values come back from windows.csv.gz."""
    report = json.loads((demo / "report" / "report.json").read_text())
    rows = read_windows(demo / "report" / "windows.csv.gz")
    dataset = TokenDataset(demo / "data", "validation")
    for model_name, result in (("monet", report["monet"]), ("dense", report["dense_protocol"])):
        mine = [r for r in rows if r["model"] == model_name]
        for label, before in result["before"].items():
            unmasked = [r for r in mine if r["point"] == "unmasked" and r["label"] == label]
            assert np.mean([r["loss_before"] for r in unmasked]) == pytest.approx(before["loss"], abs=1e-9)
            packed = PackedSequences(dataset, report["seq_len"], label=label)
            assert all(dataset.document_label(r["document"]) == label for r in unmasked)
            assert unmasked[0]["document"] == packed.document_of(unmasked[0]["window"])
        for target, entry in result["masked"].items():
            point = [r for r in mine if r["point"] == "operating" and r["masked"] == target]
            on = [r for r in point if r["label"] == target]
            again = delta_ci([r["loss_before"] for r in on], [r["loss_after"] for r in on], seed=report["seed"],
                             clusters=[r["document"] for r in on])
            assert again["delta"] == pytest.approx(entry["delta_target"], abs=1e-9)
            assert again["ci95"] == pytest.approx(entry["delta_target_ci95"], abs=1e-9)
            off = [r for r in point if r["label"] != target]
            joint = delta_ci([r["loss_before"] for r in off], [r["loss_after"] for r in off], seed=report["seed"],
                             clusters=[r["document"] for r in off], strata=[r["label"] for r in off])
            assert joint["ci95"] == pytest.approx(entry["delta_others_ci95"], abs=1e-9)
            if "random" in entry:
                first = [r for r in mine if r["point"] == "control 0" and r["masked"] == target]
                on = [r["loss_after"] - r["loss_before"] for r in first if r["label"] == target]
                assert np.mean(on) == pytest.approx(entry["random"]["deltas"][0], abs=1e-9)
                # The control's windows are a subset of the selection's.
                assert {(r["label"], r["window"]) for r in first} <= {(r["label"], r["window"]) for r in point}


@pytest.mark.slow
def test_masked_evaluation_reproduces_report(demo: Path) -> None:
    report = json.loads((demo / "report" / "report.json").read_text())
    target = max(report["monet"]["masked"], key=lambda t: report["monet"]["masked"][t]["masked_experts"])
    assert report["monet"]["masked"][target]["masked_experts"] > 0
    model, _ = load_checkpoint(demo / "run", load_tokenizer=False)
    labels, means = atlas_label_means(Atlas(demo / "atlas", model=model))
    selection = select_for_label(means, labels, target, ratio=report["ratio"])
    dataset = TokenDataset(demo / "data", "validation")
    packed = PackedSequences(dataset, report["seq_len"], label=target)
    windows = spaced(len(packed), -(-report["eval_tokens"] // report["seq_len"])).tolist()
    before = window_losses(model, packed, indices=windows)
    with units_of(model).masked(selection):
        after = window_losses(model, packed, indices=windows)
    assert all(w is None for w in current_weights(model).values())   # the mask was temporary
    entry = report["monet"]["masked"][target]
    assert float(before.mean()) == pytest.approx(report["monet"]["before"][target]["loss"], abs=1e-5)
    assert float((after - before).mean()) == pytest.approx(entry["delta_target"], abs=1e-5)


def test_mask_edits_equal_the_selections_own_edits() -> None:
    """`units.deletions` (how `MonetExperts.masked` builds a mask, at once) gives the edits and removal tables of
    `Selection.to_edits` (one validated call per expert), bit for bit; a selection of another size is refused alike."""
    from monet.interp.criteria import Selection
    from monet.interp.units import deletions

    rng = np.random.default_rng(0)
    ids = {0: rng.choice(64, 20, replace=False), 1: np.zeros(0, np.int64), 2: np.array([63, 0, 5])}
    selection = Selection(64, 3, ids, criterion="test")
    fast, slow = deletions(selection, 8), selection.to_edits(8)
    assert fast.experts == slow.experts and (fast.num_experts, fast.num_groups) == (slow.num_experts, slow.num_groups)
    assert fast.groups == slow.groups == [0, 2]
    for group in range(3):
        want, got = slow.table(group, 8), fast.table(group, 8)
        assert (got is None and want is None) or got.numpy().tobytes() == want.numpy().tobytes()
    with pytest.raises(MonetError, match="not E\\^2"):
        deletions(selection, 4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["monet", "dense"])
def test_packed_measurement_equals_one_pass_per_label(demo: Path, kind: str) -> None:
    """`EvalPlan.measure` runs the windows of every label in shared forward passes; each window's loss must be
    bitwise the one of the earlier evaluation (one pass per label, and one pass per window), unmasked and
    under a mask, so that batching the protocol's measurements changes no number of the report."""
    model, _ = load_checkpoint(demo / ("run" if kind == "monet" else "dense-run"), load_tokenizer=False)
    atlas = Atlas(demo / ("atlas" if kind == "monet" else "dense-atlas"), model=model)
    labels, means = atlas_label_means(atlas)
    dataset = TokenDataset(demo / "data", "validation")
    sets, _ = label_window_sets(dataset, 32)
    plan = EvalPlan.build(sets, 32, eval_tokens=32 * 7, batch_size=4)   # 7 windows: batches of 4 straddle labels
    picks = {label: plan.positions(label, 32 * (1 + i % 3)) for i, label in enumerate(sets)}
    selection = (select_for_label(means, labels, labels[0], ratio=1.5) if kind == "monet"
                 else select_top(means, 0, 16, normalize=False))
    assert selection.total > 0
    measured = {}
    for masked in (False, True):
        with units_of(model).masked(selection) if masked else contextlib.nullcontext():
            packed = plan.measure(model, picks)
            for label, positions in picks.items():
                ids = plan.windows[label][positions].tolist()
                per_label = window_losses(model, sets[label], plan.batch_size, indices=ids).numpy()
                per_window = np.concatenate([window_losses(model, sets[label], 1, indices=[i]).numpy() for i in ids])
                assert packed[label].tobytes() == per_label.tobytes() == per_window.tobytes(), (label, masked)
        measured[masked] = np.concatenate(list(packed.values()))
    assert not np.array_equal(measured[True], measured[False])   # the mask was in force


@pytest.mark.slow
def test_cli_single_target_and_bad_inputs(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = json.loads((demo / "report" / "report.json").read_text())
    target = max(report["monet"]["masked"], key=lambda t: report["monet"]["masked"][t]["masked_experts"])
    common = [str(demo / "run"), "--data", str(demo / "data"), "--atlas", str(demo / "atlas"), "--eval-tokens", "256",
              "--random-masks", "2", "--random-tokens", "64", "--sweep", "--batch-size", "4", "--quiet"]
    assert _cli(["unlearn", *common, "--target", target, "--out", str(tmp_path / "one")]) == 0
    single = json.loads((tmp_path / "one" / "report.json").read_text())
    assert single["targets"] == [target] and list(single["monet"]["masked"]) == [target]
    assert single["monet"]["masked"][target]["sweep"] == [] and "dense" not in single
    assert "Δ target" in capsys.readouterr().out
    assert _cli(["unlearn", *common, "--target", "fortran", "--out", str(tmp_path / "x")]) == 2
    assert "unknown label 'fortran'" in capsys.readouterr().err
    assert _cli(["unlearn", *common, "--target", target, "--ratio", "1e12", "--out", str(tmp_path / "x")]) == 2
    assert "selection is empty" in capsys.readouterr().err
    assert _cli(["unlearn", *common, "--sweep", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "--sweep ratios must be finite and >= 1" in capsys.readouterr().err
    paths = {"run": str(demo / "run"), "data": str(demo / "data"), "out": str(tmp_path / "x")}
    with pytest.raises(MonetError, match="different model"):
        unlearn(UnlearnSettings(**paths, atlas=str(demo / "dense-atlas"), target=target))
    with pytest.raises(MonetError, match="go together"):
        unlearn(UnlearnSettings(**paths, atlas=str(demo / "atlas"), baseline=str(demo / "dense-run")))
    with pytest.raises(MonetError, match="no atlas"):
        unlearn(UnlearnSettings(**paths, atlas=str(tmp_path / "missing")))
    assert not (tmp_path / "x").exists()   # nothing half-written


@pytest.mark.slow
def test_out_never_deletes_what_it_did_not_create(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common = [str(demo / "run"), "--data", str(demo / "data"), "--atlas", str(demo / "atlas"), "--eval-tokens", "128",
              "--random-masks", "0", "--sweep", "--quiet"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    assert _cli(["unlearn", *common, "--target", "python", "--out", str(precious)]) == 2
    assert "choose another --out" in capsys.readouterr().err   # never a --force hint on a user's folder
    assert (precious / "thesis.tex").read_text() == "years of work" and len(list(precious.iterdir())) == 1
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert _cli(["unlearn", *common, "--target", "python", "--out", str(a_file)]) == 2
    assert a_file.read_text() == "keep me"
    report = tmp_path / "report"
    masked_counts = json.loads((demo / "report" / "report.json").read_text())["monet"]["masked"]
    target = max(masked_counts, key=lambda t: masked_counts[t]["masked_experts"])
    assert _cli(["unlearn", *common, "--target", target, "--out", str(report)]) == 0
    again = [*common, "--target", target, "--eval-tokens", "64", "--out", str(report)]
    assert _cli(["unlearn", *again]) == 0   # its own output: replaced
    assert json.loads((report / "report.json").read_text())["eval_tokens"] == 64


@pytest.mark.parametrize(("rule", "ablation", "named"), [("class-mean", "mean", "class-mean difference"),
                                                         ("attribution", "zero", "attribution")])
@pytest.mark.slow
def test_dense_rules_run_through_the_protocol(demo: Path, tmp_path: Path, rule: str, ablation: str,
                                              named: str) -> None:
    """--dense-rule class-mean --dense-ablation mean (or attribution, zero): the dense baseline selects by
    the rule and ablates as asked; its numbers come back from windows.csv.gz."""
    report = json.loads((demo / "report" / "report.json").read_text())
    target = max(report["monet"]["masked"], key=lambda t: report["monet"]["masked"][t]["masked_experts"])
    out = unlearn(UnlearnSettings(run=str(demo / "run"), data=str(demo / "data"), atlas=str(demo / "atlas"),
                                  out=str(tmp_path / "r"), target=target, eval_tokens=128, others_tokens=64,
                                  random_masks=2, random_tokens=64, sweep=(), batch_size=4, quiet=True,
                                  baseline=str(demo / "dense-run"), baseline_atlas=str(demo / "dense-atlas"),
                                  dense_rule=rule, dense_ablation=ablation, dense_rule_tokens=2_000))
    assert out["dense_rule"] == rule and out["dense_ablation"] == ablation
    entry = out["dense_protocol"]["masked"][target]
    assert named in entry["selection"]["criterion"]
    assert entry["sweep"] and all(named in p["criterion"] for p in entry["sweep"])
    assert np.isfinite(entry["delta_target"]) and np.isfinite(out["dense_protocol"]["ceiling"]["delta"][target])
    rows = [r for r in read_windows(tmp_path / "r" / "windows.csv.gz")
            if r["model"] == "dense" and r["point"] == "operating" and r["label"] == target]
    assert np.mean([r["loss_after"] - r["loss_before"] for r in rows]) == pytest.approx(entry["delta_target"])


def test_neuron_masks_zero_down_proj_inputs() -> None:
    torch.manual_seed(0)
    model = monet.MonetForCausalLM(monet.preset("tiny", mlp_type="dense")).eval()
    ids = torch.randint(3, 256, (2, 7))
    chosen = {0: np.array([1, 5, 9]), 1: np.array([0])}
    with neuron_masks(model, chosen):
        got = model(ids).logits
    reference = monet.MonetForCausalLM(model.config).eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer, neurons in chosen.items():
            reference.model.layers[layer].mlp.down_proj.weight[:, neurons] = 0.0
    torch.testing.assert_close(got, reference(ids).logits)
    torch.testing.assert_close(model(ids).logits, model(ids).logits)   # hooks removed
    assert not torch.allclose(model(ids).logits, got)
    with pytest.raises(MonetError, match="must lie in"):
        with neuron_masks(model, {0: np.array([10_000])}):
            pass
    with pytest.raises(MonetError, match="dense MLP"):
        with neuron_masks(monet.MonetForCausalLM(monet.preset("tiny")), {0: np.array([1])}):
            pass


class _FakeDomains:
    """Just what `headword_items` reads from a TokenDataset."""

    def __init__(self, entries: dict[str, list[tuple[str, str]]]) -> None:
        self.rows = [(label, h, d) for label, pairs in entries.items() for h, d in pairs]

    def documents_with_label(self, label: str) -> np.ndarray:
        return np.array([i for i, row in enumerate(self.rows) if row[0] == label])

    def document_meta(self, i: int) -> dict:
        label, headword, definition = self.rows[i]
        return {"label": label, "headword": headword, "definition": definition}


@pytest.mark.slow
def test_headword_multiple_choice(demo: Path) -> None:
    entries = {"zoology": [(f"beast{i}", f"an animal number {i} with fur") for i in range(6)],
               "law": [("tort", "a civil wrong"), ("writ", "a court order")]}
    items = headword_items(_FakeDomains(entries), "zoology", max_items=4, choices=3)
    assert len(items) == 4
    for item in items:
        assert len(item["choices"]) == 3 and len(set(item["choices"])) == 3
        gold = item["choices"][item["gold"]]
        assert all(c.startswith("beast") for c in item["choices"]) and gold.split("beast")[1] in item["definition"]
    assert headword_items(_FakeDomains(entries), "law", choices=3) == []   # too few headwords for 3 choices

    model, tokenizer = load_checkpoint(demo / "run")
    texts = ["beast1: an animal", "tort: a civil wrong of some length"]
    scores = choice_scores(model, tokenizer, ["beast1", "tort"], texts, batch_size=2, bos_id=tokenizer.bos_token_id)
    for prefix, text, score in zip(["beast1", "tort"], texts, scores, strict=True):
        head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        want = sum(float(logprobs[t - 1, ids[t]]) for t in range(1 + len(head), len(ids)))
        assert score == pytest.approx(want, abs=1e-4)
    accuracy = multiple_choice_accuracy(model, tokenizer, items)
    assert 0.0 <= accuracy <= 1.0


TOXIC_TEXTS = [(f"you stupid idiot shut up {i} damn you", f"t{i}") for i in range(30)] + [
    (f"the file number {i} was saved to the disk without errors", f"n{i}") for i in range(30)]


def test_toxicity_purge_small(tmp_path: Path) -> None:
    pytest.importorskip("profanity_check", reason="alt-profanity-check (extra monet-lm[toxicity]) is not installed")
    from monet.data import build_corpus
    from monet.experiments.toxicity import purge_report, toxicity_correlations, toxicity_metrics
    from monet.train import train

    data = build_corpus("toxicity", tmp_path / "data", max_bytes=100_000, vocab_size=512, progress=False,
                        source_options={"texts": TOXIC_TEXTS}, validation_fraction=0.2)
    labels = TokenDataset(data, "train").labels
    assert labels == ["non-toxic", "toxic"]
    train(TrainSettings(data=str(data), out=str(tmp_path / "run"), preset="tiny", batch_size=4, seq_len=16,
                        max_steps=6, warmup_steps=1, eval_interval=0, save_interval=6, quiet=True))
    model, _ = load_checkpoint(tmp_path / "run", load_tokenizer=False)
    corr = toxicity_correlations(units_of(model), TokenDataset(data, "train"), max_tokens=2_000)
    assert len(corr) == model.config.num_routing_groups and all(np.all(np.abs(c) <= 1 + 1e-9) for c in corr)
    assert toxicity_metrics(np.array([[0.1, 0.7], [0.2, 0.3]])) == {"expected_max_toxicity": pytest.approx(0.5),
                                                                     "toxicity_probability": 0.5}
    report = purge_report(ToxicitySettings(run=str(tmp_path / "run"), data=str(data), out=str(tmp_path / "report"),
                                           thresholds=(0.2, 0.05), prompts=2, samples=2, max_new_tokens=4,
                                           corr_tokens=2_000, max_batches=1, quiet=True))
    assert [row["threshold"] for row in report["rows"]] == [None, 0.2, 0.05]
    ratios = [row["masking_ratio"] for row in report["rows"]]
    assert ratios == sorted(ratios) and all(0 <= r <= 1 for r in ratios)   # lower threshold, more experts
    for row in report["rows"]:
        assert 0.0 <= row["expected_max_toxicity"] <= 1.0 and row["toxicity_probability"] in (0.0, 0.5, 1.0)
    assert json.loads((tmp_path / "report" / "report.json").read_text())["rows"][0]["selected"] == 0

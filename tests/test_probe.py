"""Sparse probing (`monet probe`, monet.interp.probe): a known answer on synthetic units, the token and
document bookkeeping, and the command on tiny Monet and dense models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from atlas_fixtures import save_run, tiny_config

from monet.cli import main
from monet.data import TokenDataset
from monet.errors import MonetError
from monet.interp.probe import candidate_features, label_windows, model_batches, sparse_probe, split_documents
from monet.interp.units import units_of

pytest.importorskip("sklearn", reason="sparse probing needs scikit-learn (pip install 'monet-lm[interp]')")

UNITS = 262_144   # a Monet routing group's experts at E = 512


def synthetic(side: str, labels: int = 3, per_label: int = 400, docs_per_label: int = 10, seed: int = 0):
    """Batches of tokens whose unit 1000 + c fires (score 0.3) exactly on label c's tokens, among 30 noise
    units per token with random scores, and a loud unit 7 on every token whatever its label."""
    rng = np.random.default_rng([seed, side == "test"])
    y = np.repeat(np.arange(labels), per_label)
    docs = y * docs_per_label + rng.integers(0, docs_per_label, len(y)) + (0 if side == "train" else 10_000)
    for first in range(0, len(y), 128):
        lab, doc = y[first:first + 128], docs[first:first + 128]
        n = len(lab)
        noise_tok = np.repeat(np.arange(n), 30)
        noise_unit = rng.integers(2000, UNITS, n * 30)
        token = np.concatenate([np.arange(n), np.arange(n), noise_tok])
        unit = np.concatenate([1000 + lab, np.full(n, 7), noise_unit])
        score = np.concatenate([np.full(n, 0.3), rng.uniform(5, 10, n), rng.exponential(0.2, n * 30)])
        _, first_of_pair = np.unique(token * UNITS + unit, return_index=True)   # one entry per (token, unit)
        yield lab, doc, [(token[first_of_pair], unit[first_of_pair], score[first_of_pair].astype(np.float32))]


@pytest.mark.slow
def test_a_unit_that_determines_the_label_is_found_at_k1() -> None:
    result = sparse_probe(lambda side: synthetic(side), groups=1, units=UNITS, labels=[0, 1, 2], num_labels=3,
                          ks=(1, 2, 5), rounds=200)
    group = result["groups"][0]
    for label in range(3):
        assert group["top_units"][label][0][0] == 1000 + label
    assert group["binary"][1]["accuracy"] == 1.0 and group["multiclass"][1]["accuracy"] == 1.0
    assert group["binary"][1]["ci95"] == [1.0, 1.0]
    assert group["binary"][5]["accuracy"] > 0.97
    random = group["random"][5]
    assert abs(random["accuracy"] - 0.5) < 0.1 and random["ci95"][0] < 0.5 < random["ci95"][1]   # noise units
    assert result["train_examples"] == [400] * 3 and result["majority_rate"] == pytest.approx(1 / 3)


def test_candidate_columns_only() -> None:
    """The second pass keeps only the candidate units' columns (never a units-wide row per token)."""
    candidates = [np.array([7, 1000, 1001])]
    matrices, labels, docs = candidate_features(synthetic("train"), candidates)
    assert matrices[0].shape == (1200, 3) and labels.shape == docs.shape == (1200,)
    assert np.all(matrices[0][:, 0] >= 5) and np.all((matrices[0][:, 1] > 0) == (labels == 0))


def test_documents_never_on_both_sides(corpus: Path) -> None:
    dataset = TokenDataset(corpus, "train")
    train, test, skipped = split_documents(dataset, 0.5, seed=0)
    assert not set(train.tolist()) & set(test.tolist())
    counts = np.bincount(dataset.docs[:, 2], minlength=len(dataset.labels))
    assert skipped == [name for name, n in zip(dataset.labels, counts, strict=True) if n < 2]
    for label in set(range(len(dataset.labels))) - {dataset.labels.index(s) for s in skipped}:
        assert (dataset.docs[test, 2] == label).any() and (dataset.docs[train, 2] == label).any()
    assert split_documents(dataset, 0.5, seed=0)[1].tolist() == test.tolist()   # deterministic
    windows = label_windows(dataset, train, per_label=300, seq_len=32, rng=np.random.default_rng(0))
    assert windows[:, 2].max() <= 32
    for label in set(dataset.docs[train, 2].tolist()):
        rows = windows[dataset.docs[windows[:, 0], 2] == label]
        counted = rows[:, 2].sum() - (rows[:, 1] == 0).sum()   # document-start tokens are not counted
        available = sum(int(dataset.docs[d, 1] - dataset.docs[d, 0]) - 1 for d in train if dataset.docs[d, 2] == label)
        assert counted == min(300, available)


def test_window_pooling_is_the_mean_over_the_window(corpus: Path, tmp_path: Path) -> None:
    from monet.checkpoint import load_checkpoint

    model, _ = load_checkpoint(save_run(tmp_path / "monet", tiny_config(), corpus))
    dataset = TokenDataset(corpus, "train")
    windows = label_windows(dataset, np.arange(dataset.num_documents), 40, 16, np.random.default_rng(0))[:6]
    (labels, docs, groups), = model_batches(units_of(model), dataset, windows, batch_size=6)
    (w_labels, w_docs, w_groups), = model_batches(units_of(model), dataset, windows, batch_size=6, pool="window")
    assert w_docs.tolist() == windows[:, 0].tolist() and w_labels.tolist() == dataset.docs[windows[:, 0], 2].tolist()
    row = np.repeat(np.arange(6), windows[:, 2] - (windows[:, 1] == 0))   # the window of every counted token
    assert (windows[row, 0] == docs).all()
    for (token, unit, score), (window, w_unit, w_score) in zip(groups, w_groups, strict=True):
        dense = np.zeros((6, 64))
        np.add.at(dense, (row[token], unit), score)
        dense /= np.bincount(row, minlength=6)[:, None]
        pooled = np.zeros((6, 64))
        pooled[window, w_unit] = w_score
        assert np.allclose(dense, pooled, atol=1e-6)


@pytest.mark.slow
def test_probe_command_on_tiny_monet_and_dense_models(corpus: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    monet_run = save_run(tmp_path / "monet", tiny_config(), corpus)
    dense_run = save_run(tmp_path / "dense", tiny_config(mlp_type="dense"), corpus)
    args = ["probe", str(monet_run), "--data", str(corpus), "--out", str(tmp_path / "probe"), "--baseline",
            str(dense_run), "--split", "train", "--train-tokens", "300", "--test-tokens", "150", "--ks", "1", "2",
            "5", "--bootstrap", "50", "--seq-len", "32", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| monet (run) | 0 (0,1) | 64 |" in out and "| dense (baseline) | 3 (3) | 64 |" in out
    report = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert (tmp_path / "probe" / "probe.md").read_text() in out
    dataset = TokenDataset(corpus, "train")
    few = [label for label in dataset.labels if len(dataset.documents_with_label(label)) < 2]
    assert report["skipped_labels"] == few   # labels with fewer than two documents cannot be split
    assert report["chance"]["multiclass"] == pytest.approx(1 / (len(dataset.labels) - len(few)))
    monet, dense = report["models"]
    assert [g["layers"] for g in monet["groups"]] == [[0, 1], [2, 3]] and len(dense["groups"]) == 4
    assert monet["train_examples"] == dense["train_examples"]   # the same tokens for both models
    intervals = 0
    for model in report["models"]:
        for group in model["groups"]:
            for key in ("binary", "multiclass", "random"):
                for entry in group[key].values():
                    assert 0 <= entry["accuracy"] <= 1
                    if entry["ci95"] is not None:   # None when a label has a single test document
                        low, high = entry["ci95"]
                        assert 0 <= low <= entry["accuracy"] <= high <= 1
                        intervals += 1
    assert intervals or min(monet["test_documents"].values()) < 2
    assert main(args) == 0                                        # a probe report may be replaced
    assert main([*args[:5], str(tmp_path / "monet"), *args[6:]]) == 2   # not a probe report: refused
    assert "not a probe report" in capsys.readouterr().err


def test_probe_settings_are_checked() -> None:
    from monet.settings import ProbeSettings

    with pytest.raises(MonetError, match="--ks"):
        ProbeSettings(run="r", data="d", out="o", ks=(0,))
    with pytest.raises(MonetError, match="--test-fraction"):
        ProbeSettings(run="r", data="d", out="o", test_fraction=1.0)

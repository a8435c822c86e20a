"""benchmarks/unlearning/retrain.py (issue 23, items 5a and 5c): the corpus without a label, the forgotten
fraction F, the equal-Δ-others interpolation and the half-recovery step."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from monet.data import TokenDataset
from monet.data.storage import write_split
from monet.errors import MonetError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "unlearning" / "retrain.py"


@pytest.fixture(scope="module")
def retrain():
    spec = importlib.util.spec_from_file_location("unlearning_retrain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dataset(path: Path) -> Path:
    """A hand-written two-split dataset: labels a, b, c; train documents a b a c b, validation a b c."""
    path.mkdir()
    labels = ["a", "b", "c"]
    splits = {}
    for split, ids in (("train", [0, 1, 0, 2, 1]), ("validation", [0, 1, 2])):
        tokens = [[1, 10 + i, 20 + j, 2] for j, i in enumerate(ids)]
        metas = [{"label": labels[i], "n": j} for j, i in enumerate(ids)]
        counts = write_split(path, split, tokens, ids, metas, vocab_size=64)
        splits[split] = {**counts, "labels": {labels[i]: {"documents": ids.count(i)} for i in sorted(set(ids))}}
    manifest = {"format_version": 1, "labels": labels, "vocab_size": 64, "splits": splits, "source": "test"}
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "tokenizer.json").write_text("{}")
    return path


def test_without_label_keeps_the_other_documents_in_order(retrain):
    docs = np.array([[0, 4, 0], [4, 8, 1], [8, 12, 0], [12, 16, 2]])
    assert retrain.without_label(docs, 0).tolist() == [1, 3]
    assert retrain.without_label(docs, 5).tolist() == [0, 1, 2, 3]


def test_corpus_without_drops_only_the_labels_training_documents(retrain, tmp_path):
    data = _dataset(tmp_path / "data")
    out = retrain.corpus_without(data, "b", tmp_path / "without-b")
    train, full_train = TokenDataset(out, split="train"), TokenDataset(data, split="train")
    assert train.labels == full_train.labels   # label ids unchanged
    assert [train.document_label(i) for i in range(len(train))] == ["a", "a", "c"]
    assert [train.document(i).tolist() for i in range(len(train))] == [
        full_train.document(i).tolist() for i in (0, 2, 3)]
    assert [train.document_meta(i)["n"] for i in range(len(train))] == [0, 2, 3]
    # Validation and tokenizer: the same bytes.
    for name in ("validation.tokens", "validation.docs.npy", "validation.meta.jsonl", "tokenizer.json"):
        assert (out / name).read_bytes() == (data / name).read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["documents"] == 3 and "b" not in manifest["splits"]["train"]["labels"]
    assert manifest["derived"]["removed_train_label"] == "b" and manifest["derived"]["removed_train_documents"] == 2
    with pytest.raises(MonetError, match="no training document labelled 'b'"):
        retrain.corpus_without(out, "b", tmp_path / "again")
    with pytest.raises(MonetError, match="unknown label"):
        retrain.corpus_without(data, "zz", tmp_path / "zz")


def test_forgotten_fraction(retrain):
    full = np.array([1.0, 2.0, 3.0, 4.0])
    without = full + np.array([0.4, 0.6, 0.5, 0.5])   # gap 0.5 on average
    masked = full + np.array([0.2, 0.3, 0.25, 0.25])  # forgets 0.25: half of it
    result = retrain.forgotten_fraction(full, masked, without, clusters=[0, 0, 1, 1])
    assert result["F"] == pytest.approx(0.5) and result["clusters"] == 2
    assert result["ci95"][0] <= 0.5 <= result["ci95"][1]
    assert retrain.forgotten_fraction(full, without, without)["F"] == pytest.approx(1.0)
    assert retrain.forgotten_fraction(full, full + 1.0, without)["F"] == pytest.approx(2.0)
    assert np.isnan(retrain.forgotten_fraction(full, masked, full)["F"])   # nothing to forget
    with pytest.raises(MonetError, match="same windows"):
        retrain.forgotten_fraction(full, masked[:3], without)


def test_forgotten_fraction_interval_resamples_documents(retrain):
    rng = np.random.default_rng(0)
    full = rng.normal(4, 1, 200)
    # 10 documents of 20 windows: the oracle's gap and the share the mask removes vary by document
    effect = np.repeat(rng.uniform(0.3, 0.7, 10), 20)
    without, masked = full + effect, full + effect * np.repeat(rng.uniform(0.2, 0.8, 10), 20)
    by_window = retrain.forgotten_fraction(full, masked, without)
    by_document = retrain.forgotten_fraction(full, masked, without, clusters=np.repeat(np.arange(10), 20))
    assert by_window["F"] == pytest.approx(by_document["F"])
    width = by_document["ci95"][1] - by_document["ci95"][0]
    assert width > by_window["ci95"][1] - by_window["ci95"][0] and width > 0


def test_target_at_others_interpolates_from_the_origin(retrain):
    points = [{"delta_target": 0.6, "delta_others": 0.10}, {"delta_target": 0.2, "delta_others": 0.02},
              {"delta_target": 0.4, "delta_others": 0.04}]
    at = retrain.target_at_others(points, 0.03)   # between the 0.02 and 0.04 points
    assert at["delta_target"] == pytest.approx(0.3) and (at["lower"], at["upper"]) == (1, 2)
    assert at["weight"] == pytest.approx(0.5)
    at = retrain.target_at_others(points, 0.01)   # between nothing masked (0, 0) and the first point
    assert at["delta_target"] == pytest.approx(0.1) and at["lower"] is None and at["upper"] == 1
    assert retrain.target_at_others(points, 0.04)["delta_target"] == pytest.approx(0.4)
    assert retrain.target_at_others(points, 0.2) is None and retrain.target_at_others(points, -0.01) is None


def test_half_recovery_step(retrain):
    steps = [0, 1, 2, 4, 8]
    assert retrain.half_recovery_step(steps, [5.0, 4.9, 4.6, 4.5, 4.2], full=4.0) == 4   # threshold 4.5
    assert retrain.half_recovery_step(steps, [5.0, 4.9, 4.8, 4.7, 4.6], full=4.0) is None
    assert retrain.half_recovery_step([0], [3.9], full=4.0) is None   # nothing lost
    with pytest.raises(MonetError):
        retrain.half_recovery_step(steps, [5.0], full=4.0)

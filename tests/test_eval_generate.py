"""`monet eval`, `monet generate`, and the lm-evaluation-harness task built from a corpus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from runs import train_run

from monet.checkpoint import load_checkpoint
from monet.cli import main
from monet.errors import MonetError
from monet.evaluate import build_continuation_items, evaluate_checkpoint, window_indices, write_lm_eval_task
from monet.generate import generate_text

FAST = {"preset": "tiny", "batch_size": 4, "seq_len": 32, "warmup_steps": 2, "eval_interval": 0,
        "save_interval": 4, "max_steps": 4}


@pytest.fixture(scope="module")
def run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    train_run(corpus, out, FAST)
    return out


def test_window_indices_spread_over_the_split() -> None:
    assert window_indices(5, 4, None) == [0, 1, 2, 3, 4]
    assert window_indices(100, 2, 2) == [0, 25, 50, 75]
    assert window_indices(3, 8, 1) == [0, 1, 2]


def test_eval_cli_json_per_label(run: Path, corpus: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(run), "--data", str(corpus), "--json", "--max-batches", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seq_len"] == 32 and report["checkpoint"].endswith("step-0000004")
    from monet.data import TokenDataset

    labels = TokenDataset(corpus, "validation").labels
    assert set(report["labels"]) | set(report["skipped_labels"]) == set(labels) and report["labels"]
    for result in [report["overall"], *report["labels"].values()]:
        assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
        assert 0 < result["loss"] < 10 and result["tokens"] > 0
    assert main(["eval", str(run), "--data", str(corpus), "--split", "train", "--max-batches", "1"]) == 0
    table = capsys.readouterr().out
    assert "overall" in table and "ppl" in table


def test_eval_matches_training_validation_loss(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_run(corpus, out, {**FAST, "eval_interval": 4, "eval_batches": 2, "eval_batch_size": 8})
    import csv

    with open(out / "metrics.csv", newline="") as handle:
        last = list(csv.DictReader(handle))[-1]
    report = evaluate_checkpoint(out, corpus, max_batches=2, batch_size=8)
    assert report["overall"]["loss"] == pytest.approx(float(last["val_loss"]), abs=1e-5)


def test_eval_bad_inputs(run: Path, corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", str(run), "--data", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope"), "--data", str(corpus)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_generate_cli_greedy_and_seeded(run: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["generate", str(run), "--prompt", "def main():", "--max-new-tokens", "8"]
    assert main([*args, "--greedy"]) == 0
    first = capsys.readouterr().out
    assert main([*args, "--greedy"]) == 0
    assert capsys.readouterr().out == first and first.startswith("def main():")
    sampled = [*args, "--seed", "3", "--top-k", "20", "--top-p", "0.9", "--temperature", "0.8", "--num-samples", "2"]
    assert main(sampled) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2
    assert main(sampled) == 0
    assert capsys.readouterr().out == out


def test_generate_rejects_bad_options(run: Path) -> None:
    model, tokenizer = load_checkpoint(run)
    with pytest.raises(MonetError, match="temperature"):
        generate_text(model, tokenizer, "x", temperature=0)
    with pytest.raises(MonetError, match="top_p"):
        generate_text(model, tokenizer, "x", top_p=1.5)
    texts = generate_text(model, tokenizer, "import os", max_new_tokens=4, greedy=True, num_samples=2)
    assert len(texts) == 2 and texts[0] == texts[1]
    sampled = generate_text(model, tokenizer, "import os", max_new_tokens=3, seed=0)   # plain sampling
    assert sampled == generate_text(model, tokenizer, "import os", max_new_tokens=3, seed=0)


def test_lm_eval_task_files(corpus: Path, tmp_path: Path) -> None:
    items = build_continuation_items(corpus, split="train", num_items=6, context_tokens=16, continuation_tokens=6)
    assert len(items) == 6
    for item in items:
        assert len(item["choices"]) == 4 and 0 <= item["gold"] < 4 and item["context"]
    out = write_lm_eval_task(corpus, tmp_path / "task", split="train", num_items=6, context_tokens=16,
                             continuation_tokens=6)
    assert (out / "monet_continuation.yaml").is_file()
    assert len((out / "items.jsonl").read_text().splitlines()) == 6
    with pytest.raises(MonetError, match="num_choices"):
        build_continuation_items(corpus, num_choices=1)


@pytest.mark.slow
def test_lm_eval_harness_runs_the_local_task(run: Path, corpus: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed (pip install 'monet-lm[eval]')")
    pytest.importorskip("accelerate", reason="lm-eval's HF backend needs accelerate (pip install 'lm-eval[hf]')")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")   # local files only; never wait on a hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_dir = write_lm_eval_task(corpus, tmp_path / "task", split="train", num_items=8, context_tokens=16,
                                  continuation_tokens=6)
    model, tokenizer = load_checkpoint(run)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=64)
    results = simple_evaluate(model=lm, tasks=["monet_continuation"],
                              task_manager=TaskManager(include_path=str(task_dir)))
    accuracy = results["results"]["monet_continuation"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0

"""Data-parallel training on CPU (gloo, 2 processes via torchrun) equals one process, and resumes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runs import train_run, weights

from monet.checkpoint import latest_checkpoint

# Constant lr (warmup 0, min_lr = lr) so that a run stopped early and extended matches a longer run.
SETTINGS = {"preset": "tiny", "batch_size": 4, "grad_accum": 1, "seq_len": 32, "warmup_steps": 0, "lr": 2e-3,
            "min_lr": 2e-3, "eval_interval": 3, "eval_batches": 1, "eval_batch_size": 4, "save_interval": 3,
            "keep_last": 0}


def torchrun(corpus: Path, run: Path, **extra: object) -> subprocess.CompletedProcess:
    settings = {**SETTINGS, **extra}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "monet", "train", "--data", str(corpus), "--out", str(run),
               *(part for k, v in settings.items() for part in (f"--{k.replace('_', '-')}", str(v)))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_two_processes_resume_and_match_one(corpus: Path, tmp_path: Path) -> None:
    """One torchrun call (process start-up dominates on 2 shared cores): 2 ranks resume a run that one
    process took to step 3, train steps 4-5, and must match one process doing all 5 steps."""
    single = tmp_path / "single"
    train_run(corpus, single, {**SETTINGS, "max_steps": 5})   # one process, the same global batch of 4
    parallel = tmp_path / "ddp"
    train_run(corpus, parallel, {**SETTINGS, "max_steps": 3})

    result = torchrun(corpus, parallel, max_steps=5)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout and result.stdout.count("resuming from") == 1   # rank 0 only

    got, want = rows(parallel), rows(single)
    assert [r["step"] for r in got] == ["1", "2", "3", "4", "5"]
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "lm_loss", "unif_loss", "amb_loss", "lr", "grad_norm", "val_loss"):
            if b[key]:
                assert float(a[key]) == pytest.approx(float(b[key]), abs=2e-5), (a["step"], key)
    ddp_weights = weights(latest_checkpoint(parallel))
    one_weights = weights(latest_checkpoint(single))
    assert set(ddp_weights) == set(one_weights)
    for key, value in one_weights.items():
        assert torch.allclose(ddp_weights[key].float(), value.float(), atol=1e-5), key
    # the router BatchNorm statistics were all-reduced: same running mean as one process
    key = "model.layers.0.router.norm1.running_mean"
    assert torch.allclose(ddp_weights[key], one_weights[key], atol=1e-6)


@pytest.mark.slow
def test_fsdp2_two_processes_match_one(corpus: Path, tmp_path: Path) -> None:
    """FSDP2 (`fully_shard` per decoder layer) with 2 gloo processes gives one process's losses and weights."""
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    train_run(corpus, single, {**SETTINGS, "max_steps": 3})
    result = torchrun(corpus, sharded, max_steps=3, strategy="fsdp")
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(rows(sharded), rows(single), strict=True):
        for key in ("loss", "lm_loss", "unif_loss", "amb_loss", "grad_norm", "val_loss"):
            if b[key]:
                assert float(a[key]) == pytest.approx(float(b[key]), abs=2e-5), (a["step"], key)
    got, want = weights(latest_checkpoint(sharded)), weights(latest_checkpoint(single))
    assert set(got) == set(want)
    assert all(torch.allclose(got[k].float(), want[k].float(), atol=1e-5) for k in want)


@pytest.mark.slow
def test_atlas_sharded_under_torchrun_equals_one_process(corpus: Path, tmp_path: Path) -> None:
    """`monet atlas build` under torchrun: each rank streams a slice, rank 0 merges; the tables equal one pass."""
    import pyarrow.parquet as pq

    run = tmp_path / "run"
    train_run(corpus, run, {**SETTINGS, "max_steps": 1, "save_interval": 1, "eval_interval": 0})
    args = [str(run), "--data", str(corpus), "--max-tokens", "3000", "--top-k", "3", "--seq-len", "32", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "monet", "atlas", "build", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "monet", "atlas", "build", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    for table in ("experts.parquet", "contexts.parquet", "token_index.parquet"):
        a, b = pq.read_table(tmp_path / "one" / table), pq.read_table(tmp_path / "two" / table)
        assert a.column_names == b.column_names and a.num_rows == b.num_rows, table
        for name in a.column_names:
            x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
            if name in ("score_sum", "mean_score", "score", "max_score", "sum_score") or name.startswith("mass_"):
                assert x == pytest.approx(y, rel=1e-5, abs=1e-7), (table, name)
            else:
                assert x == y, (table, name)

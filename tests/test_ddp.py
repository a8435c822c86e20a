"""Data-parallel training on CPU (gloo, 2 processes via torchrun) equals one process, and resumes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monet.checkpoint import latest_checkpoint, read_state_dict
from monet.train import train

# Constant lr (warmup 0, min_lr = lr) so that a run stopped early and extended matches a longer run.
SETTINGS = {"preset": "tiny", "batch_size": 4, "grad_accum": 1, "seq_len": 32, "warmup_steps": 0, "lr": 2e-3,
            "min_lr": 2e-3, "eval_interval": 3, "eval_batches": 1, "eval_batch_size": 4, "save_interval": 3,
            "keep_last": 0}


def torchrun(corpus: Path, run: Path, **extra: object) -> subprocess.CompletedProcess:
    settings = {**SETTINGS, **extra}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "monet.train", "--data", str(corpus), "--out", str(run),
               *(f"{k}={v}" for k, v in settings.items())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_two_processes_resume_and_match_one(corpus: Path, tmp_path: Path) -> None:
    """One torchrun call (process start-up dominates on 2 shared cores): 2 ranks resume a run that one
    process took to step 3, train steps 4-5, and must match one process doing all 5 steps."""
    single = tmp_path / "single"
    train(corpus, single, {**SETTINGS, "max_steps": 5})   # one process, the same global batch of 4
    parallel = tmp_path / "ddp"
    train(corpus, parallel, {**SETTINGS, "max_steps": 3})

    result = torchrun(corpus, parallel, max_steps=5)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stdout and result.stdout.count("resuming from") == 1   # rank 0 only

    got, want = rows(parallel), rows(single)
    assert [r["step"] for r in got] == ["1", "2", "3", "4", "5"]
    for a, b in zip(got, want, strict=True):
        for key in ("loss", "lm_loss", "unif_loss", "amb_loss", "lr", "grad_norm", "val_loss"):
            if b[key]:
                assert float(a[key]) == pytest.approx(float(b[key]), abs=2e-5), (a["step"], key)
    ddp_weights = read_state_dict(latest_checkpoint(parallel))
    one_weights = read_state_dict(latest_checkpoint(single))
    assert set(ddp_weights) == set(one_weights)
    for key, value in one_weights.items():
        assert torch.allclose(ddp_weights[key].float(), value.float(), atol=1e-5), key
    # the router BatchNorm statistics were all-reduced: same running mean as one process
    key = "model.layers.0.router.norm1.running_mean"
    assert torch.allclose(ddp_weights[key], one_weights[key], atol=1e-6)

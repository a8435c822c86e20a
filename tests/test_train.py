"""Training: settings, schedule, data order, exact resume after SIGKILL, NaN guard, frozen routers."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runs import train_run, weights

from monet.checkpoint import latest_checkpoint, list_checkpoints
from monet.errors import MonetError
from monet.settings import parse_assignments as parse_overrides
from monet.train import (
    WindowOrder,
    build_model_config,
    load_settings,
    lr_at,
)

FAST = {"preset": "tiny", "batch_size": 4, "seq_len": 32, "warmup_steps": 2, "eval_interval": 3,
        "eval_batches": 1, "eval_batch_size": 4, "save_interval": 3, "keep_last": 0}
COMPARED = ["step", "loss", "lm_loss", "unif_loss", "amb_loss", "lr", "grad_norm"]


def read_metrics(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def assert_same_rows(got: list[dict[str, str]], want: list[dict[str, str]]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        for key in [*COMPARED, *(k for k in b if k.startswith("val_loss"))]:
            if b[key] == "":
                assert a[key] == "", key
            else:
                assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-6, rel=0), (a["step"], key)


# ---------------------------------------------------------------------------------------------- settings


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(MonetError) as info:
        load_settings(None, {"max_stepz": 3})
    message = str(info.value)
    assert "max_stepz" in message and "max_steps" in message and "moe_dim" in message


def test_overrides_parse_yaml_scalars(tmp_path: Path) -> None:
    assert parse_overrides(["lr=1e-3", "max_steps=20", "freeze_router=true", "model=dense"]) == {
        "lr": 1e-3, "max_steps": 20, "freeze_router": True, "model": "dense"}
    with pytest.raises(MonetError, match="key=value"):
        parse_overrides(["max_steps"])
    config_file = tmp_path / "c.yaml"
    config_file.write_text("max_steps: 7\nlr: 1e-3\nmoe_dim: 4\n")
    settings = load_settings(config_file, {"max_steps": 9})
    assert settings.max_steps == 9 and settings.lr == 1e-3 and settings.model_fields()["moe_dim"] == 4
    config_file.write_text("- not a mapping\n")
    with pytest.raises(MonetError, match="mapping"):
        load_settings(config_file, {})


def test_bad_values_are_clear() -> None:
    with pytest.raises(MonetError, match="batch.size"):
        load_settings(None, {"batch_size": 6, "grad_accum": 4})
    with pytest.raises(MonetError, match="preset"):
        load_settings(None, {"preset": "huge"})
    with pytest.raises(MonetError, match="decompose"):
        load_settings(None, {"decompose": "diagonal"})


def test_model_config_from_settings() -> None:
    vd = build_model_config(load_settings(None, {"moe_dim": 6}), vocab_size=600)
    assert vd.vocab_size == 600 and vd.moe_dim == 6 and vd.mlp_type == "monet"
    hd = build_model_config(load_settings(None, {"decompose": "hd"}), vocab_size=600)
    assert hd.moe_decompose == "horizontal"
    dense = build_model_config(load_settings(None, {"model": "dense"}), vocab_size=600)
    from monet.info import count_parameters

    assert dense.mlp_type == "dense"
    assert abs(count_parameters(dense) - count_parameters(vd.__class__(**{**vd.to_dict(), "moe_dim": 4}))) < (
        3 * dense.hidden_size * dense.num_hidden_layers)
    peer = build_model_config(load_settings(None, {"model": "peer", "preset": "small"}), vocab_size=600)
    assert peer.mlp_type == "peer" and peer.moe_experts == 32
    with pytest.raises(MonetError, match="vocab_size"):
        build_model_config(load_settings(None, {"vocab_size": 1000}), vocab_size=600)


def test_lr_schedule_warmup_then_cosine() -> None:
    s = load_settings(None, {"lr": 1.0, "min_lr": 0.1, "warmup_steps": 4, "max_steps": 14})
    assert [lr_at(i, s) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, s) == pytest.approx(0.55)
    assert lr_at(14, s) == pytest.approx(0.1)
    assert all(lr_at(i, s) >= lr_at(i + 1, s) for i in range(4, 14))


def test_window_order_is_resumable_and_epochs_are_permutations() -> None:
    order = WindowOrder(10, seed=3)
    first = order.take(7)
    state = order.state_dict()
    rest = order.take(13)
    again = WindowOrder(10, seed=3)
    again.load_state_dict(state)
    assert again.take(13) == rest
    epoch0 = first + rest[:3]
    assert sorted(epoch0) == list(range(10)) and sorted(rest[3:13]) == list(range(10))
    assert WindowOrder(10, seed=4).take(10) != epoch0
    with pytest.raises(MonetError, match="data changed"):
        WindowOrder(11, seed=3).load_state_dict(state)


# ---------------------------------------------------------------------------------------------- training


def test_missing_data_dir_is_clear(tmp_path: Path) -> None:
    with pytest.raises(MonetError, match="does not exist"):
        train_run(tmp_path / "nope", tmp_path / "run", dict(FAST, max_steps=1))


def test_train_writes_metrics_checkpoints_and_config(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = train_run(corpus, run, dict(FAST, max_steps=4, keep_last=1))
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    header = list(rows[0])
    assert header[:8] == ["step", "loss", "lm_loss", "unif_loss", "amb_loss", "lr", "grad_norm", "tokens_per_s"]
    assert "val_loss" in header and any(h.startswith("val_loss_") for h in header)
    assert rows[2]["val_loss"] and not rows[1]["val_loss"] and rows[3]["val_loss"]
    assert float(rows[0]["loss"]) == pytest.approx(float(rows[0]["lm_loss"]) + 1e-3 * (
        float(rows[0]["unif_loss"]) + float(rows[0]["amb_loss"])), rel=1e-5)
    assert [step for step, _ in list_checkpoints(run)] == [4]          # keep_last=1
    ckpt = Path(summary["checkpoint"])
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "training_state.pt", "checkpoint.json"):
        assert (ckpt / name).is_file(), name
    state = torch.load(ckpt / "training_state.pt", weights_only=True)
    assert state["step"] == 4 and state["order"]["position"] == 16 and "optimizer" in state and state["rng"]
    assert (run / "config.yaml").read_text().startswith("data:")
    # the same command again: nothing left to do, nothing rewritten
    again = train_run(corpus, run, dict(FAST, max_steps=4, keep_last=1))
    assert again["resumed_from"] == 4 and len(read_metrics(run)) == 4


def test_resume_rejects_a_different_model(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_run(corpus, run, dict(FAST, max_steps=3, eval_interval=0))
    with pytest.raises(MonetError, match="moe_dim"):
        train_run(corpus, run, dict(FAST, max_steps=4, eval_interval=0, moe_dim=6))


def flags(settings: dict) -> list[str]:
    """Command-line flags for a dict of training settings (--max-steps 30 ...)."""
    return [part for k, v in settings.items() for part in (f"--{k.replace('_', '-')}", str(v))]


def _command(corpus: Path, run: Path, **extra: object) -> list[str]:
    settings = {**FAST, "max_steps": 30, **extra}
    return [sys.executable, "-m", "monet", "train", "--data", str(corpus), "--out", str(run), *flags(settings)]


@pytest.mark.slow
def test_exact_resume_after_sigkill(corpus: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_command(corpus, reference), check=True, env=env, capture_output=True, timeout=120)

    run = tmp_path / "killed"
    proc = subprocess.Popen(_command(corpus, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and not list_checkpoints(run):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    done = latest_checkpoint(run)
    assert done is not None and len(read_metrics(run)) < 30, "the run finished before it could be killed"

    # Debris a crash could leave: a half-written temp dir and a damaged newer checkpoint.
    (run / "checkpoints" / ".tmp-step-0000099-999999999-1").mkdir()
    damaged = run / "checkpoints" / "step-0000029"
    shutil.copytree(done, damaged)
    weights_file = damaged / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])

    resumed = subprocess.run(_command(corpus, run), env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {done}" in resumed.stdout
    assert "skipping damaged checkpoint" in resumed.stdout
    assert_same_rows(read_metrics(run), read_metrics(reference))
    final, want = weights(latest_checkpoint(run)), weights(latest_checkpoint(reference))
    assert all(torch.equal(final[k], want[k]) for k in want)
    assert not (run / "checkpoints" / ".tmp-step-0000099-999999999-1").exists()


def test_nan_loss_stops_and_keeps_checkpoint(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from monet.model import MonetForCausalLM

    real = MonetForCausalLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:   # the 5th optimizer step
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MonetForCausalLM, "forward", poisoned)
    run = tmp_path / "run"
    with pytest.raises(MonetError) as info:
        train_run(corpus, run, dict(FAST, max_steps=10, eval_interval=0))
    message = str(info.value)
    assert "non-finite loss" in message and "step 5" in message and "step-0000003" in message
    assert [step for step, _ in list_checkpoints(run)] == [3]
    good = latest_checkpoint(run)
    assert good is not None and json.loads((good / "checkpoint.json").read_text())["step"] == 3
    assert [int(r["step"]) for r in read_metrics(run)] == [1, 2, 3, 4]


def test_nan_gradient_stops(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from monet.model import MonetForCausalLM

    real = MonetForCausalLM.forward

    def nan_gradient(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        weight = next(self.parameters())
        out.loss = out.loss + 0.0 * torch.sqrt(weight.sum() * 0.0)   # finite value, NaN gradient
        return out

    monkeypatch.setattr(MonetForCausalLM, "forward", nan_gradient)
    with pytest.raises(MonetError, match="non-finite gradient norm .* at step 1"):
        train_run(corpus, tmp_path / "run", dict(FAST, max_steps=2, eval_interval=0, grad_clip=0))


def test_huge_learning_rate_is_caught_by_the_cli(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from monet.cli import main

    code = main(["train", "--data", str(corpus), "--out", str(tmp_path / "run"),
                 *flags({**FAST, "max_steps": 30, "lr": 1e30, "warmup_steps": 0, "grad_clip": 0, "eval_interval": 0})])
    assert code == 2
    assert "non-finite" in capsys.readouterr().err


def test_freeze_router_keeps_router_weights_but_updates_statistics(corpus: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_run(corpus, run, dict(FAST, max_steps=1, save_interval=1, eval_interval=0))
    before = weights(latest_checkpoint(run))
    tuned = tmp_path / "tuned"
    train_run(corpus, tuned, dict(FAST, max_steps=2, save_interval=1, eval_interval=0, freeze_router=True,
                              init_from=str(run)))
    after = weights(latest_checkpoint(tuned))
    routers = [k for k in before if ".router.w" in k]
    assert routers and all(torch.equal(before[k], after[k]) for k in routers)
    assert not torch.equal(before["model.layers.0.router.norm1.running_mean"],
                           after["model.layers.0.router.norm1.running_mean"])
    assert not torch.equal(before["model.layers.0.moe.u1.weight"], after["model.layers.0.moe.u1.weight"])
    with pytest.raises(MonetError, match="no Monet routers"):
        train_run(corpus, tmp_path / "dense", dict(FAST, max_steps=1, model="dense", freeze_router=True))


def test_dense_and_peer_train(corpus: Path, tmp_path: Path) -> None:
    for kind in ("dense", "peer"):
        summary = train_run(corpus, tmp_path / kind, dict(FAST, max_steps=2, eval_interval=0, model=kind))
        assert summary["last"]["loss"] > 0 and "unif_loss" not in summary["last"]


def test_cli_help_lists_keys(capsys: pytest.CaptureFixture) -> None:
    from monet.cli import main

    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "max-steps" in out and "torchrun" in out

"""Checkpoint files: atomic writes, damage detection, pruning, and clear errors when loading."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from monet import MonetForCausalLM, preset
from monet.checkpoint import (
    MAX_WEIGHT,
    check_finite_weights,
    checkpoint_problem,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_training_state,
    prune_checkpoints,
    save_checkpoint,
)
from monet.errors import MonetError
from monet.train import rng_state, set_rng_state


@pytest.fixture(scope="module")
def tokenizer_dir(corpus: Path) -> Path:
    """Tokenizer files of the shared small real corpus (see conftest.py)."""
    return corpus


def tiny_model(vocab_size: int = 512) -> MonetForCausalLM:
    torch.manual_seed(0)
    return MonetForCausalLM(preset("tiny", vocab_size=vocab_size)).eval()


def test_round_trip_gives_identical_logits(tmp_path: Path, tokenizer_dir: Path) -> None:
    model = tiny_model()
    state = {"step": 5, "rng": [rng_state()], "optimizer": {"state": {}, "param_groups": []}}
    path = save_checkpoint(tmp_path, 5, model, state, tokenizer_dir=tokenizer_dir)
    assert path.name == "step-0000005" and checkpoint_problem(path) is None
    loaded, tokenizer = load_checkpoint(tmp_path)          # a run directory resolves to its newest checkpoint
    ids = torch.tensor([tokenizer("def main():\n    return 1")["input_ids"]])
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    hf = MonetForCausalLM.from_pretrained(path)            # plain Hugging Face loading works too
    assert torch.allclose(hf(ids).logits, model(ids).logits)
    restored = load_training_state(path)                   # weights_only=True inside
    assert restored["step"] == 5
    set_rng_state(restored["rng"][0])


def test_rng_state_round_trip() -> None:
    import random

    import numpy as np

    saved = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(saved)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_failed_save_leaves_nothing(tmp_path: Path) -> None:
    model = tiny_model()
    bad_state = {"not_serialisable": lambda: None}
    with pytest.raises((pickle.PicklingError, AttributeError)):   # torch.save cannot pickle a local lambda
        save_checkpoint(tmp_path, 1, model, bad_state)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_damage_is_detected_and_skipped(tmp_path: Path) -> None:
    model = tiny_model()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, {"step": step})
    newest = tmp_path / "checkpoints" / "step-0000003"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert "truncated" in checkpoint_problem(newest)
    (tmp_path / "checkpoints" / "step-0000002" / "checkpoint.json").unlink()
    assert "missing" in checkpoint_problem(tmp_path / "checkpoints" / "step-0000002")
    assert latest_checkpoint(tmp_path, warn=False).name == "step-0000001"
    with pytest.raises(MonetError, match="damaged.*truncated"):
        load_checkpoint(newest)


def test_prune_keeps_last_complete_and_sweeps_temp_dirs(tmp_path: Path) -> None:
    model = tiny_model()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, {"step": step})
    (tmp_path / "checkpoints" / ".tmp-step-0000006-999999999-2").mkdir()
    prune_checkpoints(tmp_path, keep_last=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000004", "step-0000005"]


def test_load_errors_are_clear(tmp_path: Path, tokenizer_dir: Path) -> None:
    with pytest.raises(MonetError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(MonetError, match="neither a run directory"):
        load_checkpoint(tmp_path)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(MonetError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "run")

    model = tiny_model()
    # An HF directory without our manifest: truncated weights are still a clear error.
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (plain / name).write_bytes((tokenizer_dir / name).read_bytes())
    load_checkpoint(plain)
    weights = plain / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(MonetError, match="corrupt or truncated"):
        load_checkpoint(plain)
    weights.write_bytes(good)
    (plain / "config.json").write_text("{not json")
    with pytest.raises(MonetError, match="config.json is corrupt"):
        load_checkpoint(plain)


def test_tokenizer_larger_than_model_vocabulary_is_rejected(tmp_path: Path, tokenizer_dir: Path) -> None:
    model = tiny_model(vocab_size=256)                      # the corpus tokenizer has 512 tokens
    path = save_checkpoint(tmp_path, 1, model, tokenizer_dir=tokenizer_dir)
    with pytest.raises(MonetError, match="512 tokens but the model's vocabulary is 256"):
        load_checkpoint(path)


def test_weights_not_matching_config_are_rejected(tmp_path: Path, tokenizer_dir: Path) -> None:
    model = tiny_model()
    path = save_checkpoint(tmp_path, 1, model, tokenizer_dir=tokenizer_dir)
    config = json.loads((path / "config.json").read_text())
    config["moe_dim"] = 6
    (path / "checkpoint.json").unlink()                     # an edited directory, no longer ours
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(MonetError, match="do not match its config.json"):
        load_checkpoint(path)


def test_training_state_missing_or_corrupt(tmp_path: Path) -> None:
    model = tiny_model()
    path = save_checkpoint(tmp_path, 1, model)
    with pytest.raises(MonetError, match="weights only"):
        load_training_state(path)
    (path / "training_state.pt").write_bytes(b"garbage")
    with pytest.raises(MonetError, match="corrupt"):
        load_training_state(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_weight_check_names_the_parameter_and_the_cause(dtype: torch.dtype) -> None:
    model = MonetForCausalLM(preset("tiny")).to(dtype)
    check_finite_weights(model, "ck")   # random weights pass
    name, param = list(model.named_parameters())[3]
    for value, cause in [(float("nan"), "NaN or infinity"), (float("inf"), "NaN or infinity"),
                         (float("-inf"), "NaN or infinity"), (-1e30, "values beyond"), (1e30, "values beyond"),
                         (2 * MAX_WEIGHT, "values beyond")]:
        saved = param.data.view(-1)[-1].item()
        param.data.view(-1)[-1] = value
        with pytest.raises(MonetError, match=f"weight {name} holds {cause}"):
            check_finite_weights(model, "ck")
        param.data.view(-1)[-1] = saved
    param.data.view(-1)[-1] = -MAX_WEIGHT / 2   # large but within the bound
    check_finite_weights(model, "ck")

"""Train a run from a dict of settings (training keys and MonetConfig fields mixed, as YAML configs allow)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from monet.settings import TrainSettings
from monet.train import train


def settings_of(data: Path, out: Path, values: dict[str, Any]) -> TrainSettings:
    fields = {f.name for f in dataclasses.fields(TrainSettings)}
    model = tuple(f"{k}={v}" for k, v in values.items() if k not in fields)
    known = {k: v for k, v in values.items() if k in fields}
    return TrainSettings(data=str(data), out=str(out), set=model, quiet=True, **known)


def train_run(data: Path, out: Path, values: dict[str, Any]) -> dict[str, Any]:
    return train(settings_of(data, out, values))


def weights(checkpoint: Path) -> dict:
    """The tensors of a checkpoint directory (model.safetensors)."""
    from safetensors.torch import load_file

    return load_file(Path(checkpoint) / "model.safetensors")

"""Checkpoints in the Hugging Face layout, written atomically, with the training state beside them.

A checkpoint is a directory `RUN/checkpoints/step-XXXXXXX/` holding `config.json`, `model.safetensors`,
`generation_config.json`, the tokenizer files copied from the data directory, `training_state.pt`
(optimizer, data position, RNG states; loadable with `torch.load(weights_only=True)`) and, written last,
`checkpoint.json` (step and the size of every file). Everything is first written to a hidden temporary
directory and renamed into place, so a killed process leaves either a complete checkpoint or a `.tmp-*`
directory that is ignored (and swept) on resume. `checkpoint.json` lets resume and `load_checkpoint` tell
a complete checkpoint from a damaged one (missing or truncated file) without loading it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig

from monet.config import MonetConfig
from monet.errors import MonetError

CHECKPOINTS = "checkpoints"
MANIFEST = "checkpoint.json"
TRAINING_STATE = "training_state.pt"
WEIGHTS = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "tokenizer.model",
)
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file through a temporary name in the same directory, then rename."""
    _atomic_write_text(Path(path), text)


def _unshared_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors; tensors sharing storage (tied weights) are copied, as safetensors requires."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen:
            tensor = tensor.clone()
        seen.add(pointer)
        out[key] = tensor
    return out


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    config: MonetConfig,
    state_dict: dict[str, torch.Tensor],
    training_state: dict[str, Any] | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `RUN/checkpoints/step-XXXXXXX/` atomically and return its path.

    A stale directory of the same name (left by a damaged earlier attempt) is replaced.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        save_file(_unshared_state_dict(state_dict), str(tmp / WEIGHTS), metadata={"format": "pt"})
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                source = Path(tokenizer_dir) / name
                if source.is_file():
                    shutil.copyfile(source, tmp / name)
        if training_state is not None:
            torch.save(training_state, tmp / TRAINING_STATE)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"step": step, "files": files, **(metadata or {})}
        _atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        if final.exists():
            _remove_dir(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _remove_dir(path: Path) -> None:
    """Rename first, then delete: a kill mid-delete leaves a hidden `.trash-*` dir, never a half checkpoint."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.time_ns()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a complete checkpoint written by `save_checkpoint`, or None when it is."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"{MANIFEST} is missing (the checkpoint was not finished)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, expected {size} (truncated or overwritten)"
    return None


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `step-*` directory under RUN/checkpoints, oldest first (valid or not)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike, warn: bool = True) -> Path | None:
    """The newest complete checkpoint of a run; damaged or partial ones are skipped (with a warning)."""
    for _step, path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if warn:
            print(f"monet: skipping damaged checkpoint {path}: {problem}", flush=True)
    return None


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; remove older ones and leftover temporary dirs."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.name.startswith((".tmp-", ".trash-")) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
    if keep_last <= 0:
        return
    complete = [path for _step, path in list_checkpoints(run_dir) if checkpoint_problem(path) is None]
    for path in complete[:-keep_last]:
        _remove_dir(path)


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """`training_state.pt` of a checkpoint (weights_only: plain types and tensors only)."""
    file = Path(path) / TRAINING_STATE
    if not file.is_file():
        raise MonetError(f"{file} is missing: this checkpoint cannot resume training (it holds weights only)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged pickles
        raise MonetError(
            f"{file} is corrupt ({exc}); delete this checkpoint directory to resume from an older one"
        ) from exc


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single `model.safetensors` or a sharded index)."""
    path = Path(path)
    index = path / f"{WEIGHTS}.index.json"
    if (path / WEIGHTS).is_file():
        files = [path / WEIGHTS]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise MonetError(f"{index} is corrupt ({exc}); re-download or re-save the checkpoint") from exc
        files = [path / name for name in sorted(set(weight_map.values()))]
    else:
        raise MonetError(
            f"{path} has no {WEIGHTS}; a checkpoint directory needs config.json and model.safetensors "
            "(train one with `monet train` or point at a Hugging Face model directory)"
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise MonetError(f"weights file {file} is missing; the checkpoint is incomplete")
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise MonetError(
                f"weights file {file} is corrupt or truncated ({exc}); use another checkpoint or re-save it"
            ) from exc
    return state


def read_config(path: str | os.PathLike) -> MonetConfig:
    """`config.json` of a checkpoint directory as a `MonetConfig`, with clear errors."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise MonetError(f"{file} is missing: {path} is not a checkpoint directory (expected config.json)")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MonetError(f"{file} is corrupt ({exc}); re-save the checkpoint") from exc
    if raw.get("model_type") not in (None, "monet"):
        raise MonetError(f"{file} describes a {raw.get('model_type')!r} model, not a Monet model")
    try:
        return MonetConfig.from_dict({k: v for k, v in raw.items() if k != "transformers_version"})
    except MonetError:
        raise
    except (TypeError, ValueError) as exc:
        raise MonetError(f"{file} is not a valid Monet config ({exc})") from exc


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory (-> its newest complete checkpoint) or a checkpoint directory, checked."""
    path = Path(path)
    if not path.exists():
        raise MonetError(f"{path} does not exist; pass a run directory (RUN) or a checkpoint (RUN/checkpoints/step-*)")
    if not path.is_dir():
        raise MonetError(f"{path} is a file; pass a run directory or a checkpoint directory")
    if (path / "config.json").is_file():
        problem = checkpoint_problem(path) if (path / MANIFEST).is_file() else None
        if problem:
            raise MonetError(f"checkpoint {path} is damaged: {problem}; use another checkpoint")
        return path
    if (path / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(path, warn=False)
        if latest is None:
            raise MonetError(f"run {path} has no complete checkpoint yet; train longer or check {path / CHECKPOINTS}")
        return latest
    raise MonetError(f"{path} is neither a run directory (no checkpoints/) nor a checkpoint (no config.json)")


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device | None = None, load_tokenizer: bool = True
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a run directory (newest checkpoint) or a checkpoint directory.

    Weights are loaded strictly (every key present, no extras), so a mismatched or damaged file is an
    error rather than silently re-initialised weights. The tokenizer must fit the model's vocabulary.
    """
    from monet.model import EXPERT_EDITS_FILE, MonetForCausalLM

    directory = resolve_checkpoint(path)
    config = read_config(directory)
    tokenizer = _load_tokenizer(directory, config) if load_tokenizer else None
    state = read_state_dict(directory)
    model = MonetForCausalLM(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise MonetError(
            f"weights in {directory} do not match its config.json ({str(exc).splitlines()[0]} ...); "
            "the checkpoint is corrupt or its config was edited"
        ) from exc
    if (directory / EXPERT_EDITS_FILE).is_file():   # masks / steering saved with the checkpoint stay applied
        from monet.editing import load_edits

        load_edits(model, directory)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def _load_tokenizer(directory: Path, config: MonetConfig) -> Any:
    from transformers import PreTrainedTokenizerFast

    if not (directory / "tokenizer.json").is_file():
        raise MonetError(
            f"{directory} has no tokenizer.json; copy the tokenizer files of the data directory it was "
            "trained on into it (tokenizer.json, tokenizer_config.json, special_tokens_map.json)"
        )
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory))
    except Exception as exc:  # tokenizers raises its own exception types for damaged JSON
        raise MonetError(f"tokenizer files in {directory} are corrupt ({exc})") from exc
    check_vocab_fits(len(tokenizer), config.vocab_size, where=str(directory))
    return tokenizer


def check_vocab_fits(tokenizer_size: int, model_vocab: int, where: str) -> None:
    """A tokenizer may be smaller than the embedding (padded vocab) but never larger."""
    if tokenizer_size > model_vocab:
        raise MonetError(
            f"tokenizer in {where} has {tokenizer_size} tokens but the model's vocabulary is {model_vocab}: "
            "the tokenizer does not belong to this model (use the tokenizer of the data it was trained on)"
        )


__all__ = [
    "atomic_write_text",
    "check_vocab_fits",
    "checkpoint_problem",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_training_state",
    "prune_checkpoints",
    "read_config",
    "read_state_dict",
    "resolve_checkpoint",
    "save_checkpoint",
    "step_dir_name",
]

"""Checkpoints: the one load/save path of the package (Hugging Face layout, atomic, verified).

`RUN/checkpoints/step-XXXXXXX/` holds what `save_pretrained` writes (expert_edits.safetensors too when
edits are applied), the tokenizer files of the training data, `training_state.pt` (optimizer, data
position, RNG states; loaded with `torch.load(weights_only=True)`) and, written last, `checkpoint.json`:
the step, metadata and, per file, its size and SHA-256. It is filled in a hidden temporary directory and
renamed into place, so a killed process leaves a complete checkpoint or a `.tmp-*` directory (swept on
resume); a damaged one (missing, truncated or altered file) is skipped, with a message naming the problem,
for the previous good one. Loading always goes through `MonetForCausalLM.from_pretrained` (strict: see
`monet.model`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers

from monet.config import MonetConfig
from monet.data import read_manifest as read_data_manifest
from monet.data.tokenizer import has_tokenizer
from monet.data.tokenizer import load_tokenizer as load_data_tokenizer
from monet.errors import MonetError
from monet.io import atomic_write, dumps, printable, replace_directory, sha256_file, stale_temporary, temporary_sibling
from monet.model import MonetForCausalLM

CHECKPOINTS = "checkpoints"
MANIFEST = "checkpoint.json"
TRAINING_STATE = "training_state.pt"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "added_tokens.json", "tokenizer.model",
)
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or load reports from transformers inside the block (our own messages say more)."""
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: MonetForCausalLM,
    training_state: dict[str, Any] | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    metadata: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `RUN/checkpoints/step-XXXXXXX/` atomically and return its path.

    `state_dict` replaces the model's own (e.g. the full state gathered from a sharded model). A stale
    directory of the same name (left by a damaged earlier attempt) is replaced.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = temporary_sibling(final)
    try:
        save_model_files(tmp, model, tokenizer_dir, state_dict)
        if training_state is not None:
            torch.save(training_state, tmp / TRAINING_STATE)
        write_manifest(tmp, {"step": step, **(metadata or {})})
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def save_model_files(directory: str | os.PathLike, model: MonetForCausalLM,
                     tokenizer_dir: str | os.PathLike | None = None,
                     state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Fill `directory` (a temporary one: the caller renames it into place) with what `save_pretrained` writes
    (weights, config.json with the remote-code `auto_map`, the expert edits when any are applied) and the
    tokenizer files of `tokenizer_dir`; `write_manifest` finishes the checkpoint."""
    directory = Path(directory)
    with quiet_transformers():
        model.save_pretrained(directory, state_dict=state_dict)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, directory / name)
    return directory


def write_manifest(directory: str | os.PathLike, metadata: dict[str, Any]) -> None:
    """`checkpoint.json`, written last: `metadata` plus the size and SHA-256 of every other file of the
    directory."""
    directory = Path(directory)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    atomic_write(directory / MANIFEST, dumps({**metadata, "files": files}) + "\n")


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """`checkpoint.json` of a checkpoint directory (None when there is none: a plain HF directory)."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MonetError(f"{file} is unreadable ({exc})") from exc
    for name, entry in files.items():   # plain names of files inside the checkpoint, with their sizes
        if name in ("", ".", "..") or any(c in name for c in "/\\\0") or name.startswith("~"):
            raise MonetError(f"{file} lists {printable(name)!r}, which is not a file inside the checkpoint; "
                             "the manifest is damaged or forged: re-save the checkpoint")
        size = entry if isinstance(entry, int) else entry.get("bytes") if isinstance(entry, dict) else None
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise MonetError(f"{file} gives no valid size for {printable(name)!r}; re-save the checkpoint")
    return manifest


def checkpoint_problem(path: str | os.PathLike, verify: bool = True) -> str | None:
    """Why `path` is not a complete, intact checkpoint written by `save_checkpoint`, or None when it is.

    Sizes are always compared with checkpoint.json; with `verify` the SHA-256 of every file too (a flipped
    byte inside model.safetensors is caught; ~1 s per GB).
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return f"{MANIFEST} is missing (the checkpoint was not finished)"
    try:
        files = read_manifest(path)["files"]
    except MonetError as exc:
        return str(exc)
    for name, entry in files.items():
        size, digest = (entry, None) if isinstance(entry, int) else (entry.get("bytes"), entry.get("sha256"))
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, expected {size} (truncated or overwritten)"
        if verify and digest and sha256_file(file) != digest:
            return f"{name} does not match its SHA-256 in {MANIFEST} (the file was altered or damaged)"
    return None


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `step-*` directory under RUN/checkpoints, oldest first (valid or not)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    matches = ((_STEP_DIR.match(child.name), child) for child in root.iterdir())
    return sorted((int(match.group(1)), child) for match, child in matches if match and child.is_dir())


def latest_checkpoint(run_dir: str | os.PathLike, warn: bool = True, verify: bool = True) -> Path | None:
    """The newest complete checkpoint of a run; damaged or partial ones are skipped (with a message)."""
    for _step, path in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(path, verify)
        if problem is None:
            return path
        if warn:
            print(f"monet: skipping damaged checkpoint {path}: {problem}; using an older one", flush=True)
    return None


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints; remove older ones and leftover temporary dirs."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    for child in root.iterdir():
        if stale_temporary(child.name) and child.is_dir():   # never another live process's temporary
            shutil.rmtree(child, ignore_errors=True)
    if keep_last <= 0:
        return
    complete = [path for _step, path in list_checkpoints(run_dir) if checkpoint_problem(path, verify=False) is None]
    for path in complete[:-keep_last]:
        # Rename first, then delete: a kill mid-delete leaves a hidden `.trash-*` dir, never a half checkpoint.
        trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.time_ns()}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


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


def read_config(path: str | os.PathLike) -> MonetConfig:
    """`config.json` of a checkpoint directory as a `MonetConfig`, with clear errors."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise MonetError(f"{file} is missing: {path} is not a checkpoint directory (expected config.json)")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MonetError(f"{file} is corrupt ({exc}); re-save the checkpoint") from exc
    if not isinstance(raw, dict):
        raise MonetError(f"{file} holds a JSON {type(raw).__name__}, not an object of model settings; re-save the "
                         "checkpoint")
    if raw.get("model_type") not in (None, "monet"):
        raise MonetError(f"{file} describes a {raw.get('model_type')!r} model, not a Monet model")
    try:
        return MonetConfig.from_dict({k: v for k, v in raw.items() if k != "transformers_version"})
    except MonetError:
        raise
    except (TypeError, ValueError) as exc:
        raise MonetError(f"{file} is not a valid Monet config ({exc})") from exc


_NOTED: set[Path] = set()


def _note_unverified(path: Path) -> None:
    """One line, once per directory: a plain Hugging Face checkpoint (a released model) has no checkpoint.json,
    so there are no sizes or hashes to check its files against."""
    key = path.resolve()
    if key not in _NOTED:
        _NOTED.add(key)
        print(f"monet: note: {path} has no {MANIFEST} (a Hugging Face / released checkpoint): its files are loaded "
              "as they are, without our size and SHA-256 checks", file=sys.stderr, flush=True)


def resolve_checkpoint(path: str | os.PathLike, verify: bool = True) -> Path:
    """A run directory (-> its newest complete checkpoint) or a checkpoint directory, checked."""
    path = Path(path)
    if not path.exists():
        raise MonetError(f"{path} does not exist; pass a run directory (RUN) or a checkpoint (RUN/checkpoints/step-*)")
    if not path.is_dir():
        raise MonetError(f"{path} is a file; pass a run directory or a checkpoint directory")
    if (path / "config.json").is_file():
        if not (path / MANIFEST).is_file():
            _note_unverified(path)
        problem = checkpoint_problem(path, verify) if (path / MANIFEST).is_file() else None
        if problem:   # --no-verify skips only the SHA-256 comparison: suggested only where it is the problem
            anyway = " (or --no-verify to load it anyway)" if "SHA-256" in problem else ""
            raise MonetError(f"checkpoint {path} is damaged: {problem}; use another checkpoint{anyway}")
        return path
    if (path / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(path, verify=verify)
        if latest is None:
            raise MonetError(f"run {path} has no complete checkpoint yet; train longer or check {path / CHECKPOINTS}")
        return latest
    raise MonetError(f"{path} is neither a run directory (no checkpoints/) nor a checkpoint (no config.json)")


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device | None = None, load_tokenizer: bool = True,
    verify: bool = True,
) -> tuple[MonetForCausalLM, Any]:
    """(model in eval mode, tokenizer or None) from a run directory (newest checkpoint) or a checkpoint
    directory (ours, or any Hugging Face directory in the Monet layout).

    The checkpoint's files are checked against checkpoint.json (sizes, and SHA-256 unless `verify=False`);
    weights load strictly; expert edits saved with the checkpoint stay applied; the tokenizer must fit the
    model's vocabulary.
    """
    directory = resolve_checkpoint(path, verify)
    config = read_config(directory)
    tokenizer = _load_tokenizer(directory, config) if load_tokenizer else None
    with quiet_transformers():
        model = MonetForCausalLM.from_pretrained(directory, config=config)
    check_finite_weights(model, directory)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


MAX_WEIGHT = 1e6   # no trained weight comes near this; a larger one overflows activations into inf / NaN


def check_finite_weights(model: torch.nn.Module, where: str | os.PathLike) -> None:
    """MonetError naming the first parameter that holds NaN, infinity or a magnitude above `MAX_WEIGHT`:
    such weights only produce `nan` losses and empty generations (the SHA-256 check cannot tell, since a
    file written so matches its own hash)."""
    for name, param in model.named_parameters():
        data = param.detach()
        if not data.numel():
            continue
        # One pass without temporaries (isfinite + abs().max() took ~11 s on an 850M model on this CPU):
        # NaN propagates into aminmax and fails both comparisons; the exact cause is looked up on failure only.
        low, high = torch.aminmax(data)
        if bool(low >= -MAX_WEIGHT) and bool(high <= MAX_WEIGHT):
            continue
        if not bool(torch.isfinite(data).all()):
            raise MonetError(f"{where}: weight {name} holds NaN or infinity; this checkpoint cannot be used")
        raise MonetError(f"{where}: weight {name} holds values beyond {MAX_WEIGHT:g}; this checkpoint is damaged")


def tokenizer_hash(directory: str | os.PathLike) -> str | None:
    """SHA-256 of a directory's tokenizer.json (a checkpoint's or a dataset's), None when it has none."""
    file = Path(directory) / "tokenizer.json"
    return sha256_file(file) if file.is_file() else None


def check_data_fits(checkpoint: str | os.PathLike, data_dir: str | os.PathLike) -> None:
    """MonetError when the dataset was tokenized with another tokenizer than the checkpoint's (the numbers
    a model gives on such data look plausible and mean nothing)."""
    manifest = read_data_manifest(data_dir)
    data_hash = manifest.get("tokenizer_sha256") or tokenizer_hash(data_dir)
    model_hash = tokenizer_hash(checkpoint)
    if data_hash and model_hash and data_hash != model_hash:
        raise MonetError(
            f"the dataset {data_dir} was tokenized with another tokenizer than the model in {checkpoint} "
            f"(tokenizer.json sha256 {data_hash[:12]} vs {model_hash[:12]}): use the data the model was trained "
            "on, or rebuild the data with the model's tokenizer"
        )
    check_vocab_fits(int(manifest["vocab_size"]), read_config(checkpoint).vocab_size, where=str(data_dir))


def trained_seq_len(checkpoint: str | os.PathLike, model: MonetForCausalLM, default: int = 256) -> int:
    """The training sequence length recorded with the checkpoint, else min(default, the model's maximum)."""
    try:
        recorded = (read_manifest(resolve_checkpoint(checkpoint, verify=False)) or {}).get("seq_len")
    except MonetError:   # unresolvable path or unreadable checkpoint.json: fall back to the default
        recorded = None
    limit = getattr(model.config, "max_position_embeddings", default) or default
    if isinstance(recorded, int) and not isinstance(recorded, bool) and 2 <= recorded <= limit:
        return recorded
    return min(default, limit)   # none recorded, or a value the model cannot take (a damaged manifest)


def check_seq_len(seq_len: int, model: MonetForCausalLM) -> None:
    """MonetError when windows of `seq_len` tokens exceed the positions the model was built for (rotary
    positions past max_position_embeddings give a plausible but meaningless loss)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise MonetError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {limit}; use at most that")


def _load_tokenizer(directory: Path, config: MonetConfig) -> Any:
    """The checkpoint's own tokenizer (ours, or a released model's LLaMA-2 tokenizer through AutoTokenizer)."""
    if not has_tokenizer(directory):
        raise MonetError(
            f"{directory} has no tokenizer.json (or tokenizer.model); copy the tokenizer files of the data directory "
            "it was trained on into it (tokenizer.json, tokenizer_config.json, special_tokens_map.json)"
        )
    tokenizer = load_data_tokenizer(directory)
    check_vocab_fits(len(tokenizer), config.vocab_size, where=str(directory))
    return tokenizer


def check_vocab_fits(tokenizer_size: int, model_vocab: int, where: str) -> None:
    """A tokenizer may be smaller than the embedding (padded vocab) but never larger."""
    if tokenizer_size > model_vocab:
        raise MonetError(
            f"tokenizer in {where} has {tokenizer_size} tokens but the model's vocabulary is {model_vocab}: "
            "the tokenizer does not belong to this model (use the tokenizer of the data it was trained on)"
        )

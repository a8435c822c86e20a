"""`monet train`: pretraining loop with exact resume, data-parallel training and a NaN guard.

    monet train --data DIR --out RUN [--config FILE.yaml] [key=value ...]
    torchrun --nproc_per_node N -m monet.train --data DIR --out RUN ...

Settings come from `DEFAULTS` below, then the YAML file, then `key=value` overrides; any `MonetConfig`
field is accepted too (e.g. `moe_dim=4`). `batch_size` is the GLOBAL number of sequences per optimizer
step: it is split into `grad_accum` micro-steps and each micro-step across the data-parallel ranks, so a
run gives the same losses whatever the number of processes (up to float reduction order).

Exact resume: re-running the same command on an existing RUN continues from the newest complete
checkpoint (weights, BatchNorm routing statistics, AdamW moments, position in the shuffled window
order, RNG states) and truncates `metrics.csv` to that step, so the continued run writes the same rows as
an uninterrupted one. Training settings such as `max_steps` or `lr` may change on resume; the model
shape may not.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import io
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm.auto import tqdm

from monet.checkpoint import (
    atomic_write_text,
    latest_checkpoint,
    load_training_state,
    prune_checkpoints,
    read_config,
    read_state_dict,
    resolve_checkpoint,
    save_checkpoint,
)
from monet.config import PRESETS, MonetConfig
from monet.errors import MonetError

# Training settings (model fields are the MonetConfig arguments, see `model_keys()`).
DEFAULTS: dict[str, Any] = {
    "preset": "tiny",          # a name from monet.config.PRESETS
    "model": "monet",          # monet | dense (LLaMA MLP, same total parameters) | peer
    "decompose": None,         # vertical | horizontal (shortcut for moe_decompose)
    "max_steps": 1000,         # optimizer steps
    "batch_size": 8,           # GLOBAL sequences per optimizer step (all ranks, all micro-steps)
    "grad_accum": 1,           # micro-steps per optimizer step
    "seq_len": 128,            # tokens per training sequence
    "lr": 5e-4,                # peak learning rate (paper B.1)
    "min_lr": 5e-5,            # end of the cosine decay
    "warmup_steps": 100,       # linear warmup from 0
    "weight_decay": 0.1,       # AdamW, on matrices only (not norms, biases, router BatchNorm)
    "beta1": 0.9,
    "beta2": 0.95,
    "adam_eps": 1e-8,
    "grad_clip": 1.0,          # max global grad norm; 0 disables clipping (the norm is still checked)
    "dtype": "auto",           # auto (bf16 autocast on CUDA with bf16, else float32) | float32 | bfloat16
    "device": "auto",          # auto | cpu | cuda
    "seed": 0,
    "eval_interval": 100,      # steps between validation passes (and at the last step); 0 = never
    "eval_batches": 8,         # batches per validation pass, overall and per label
    "eval_batch_size": 8,
    "save_interval": 100,      # steps between checkpoints (and at the last step)
    "keep_last": 3,            # checkpoints kept; 0 keeps all
    "freeze_router": False,    # paper B.2: router w1/w2 frozen (BatchNorm statistics still update)
    "init_from": None,         # run or checkpoint whose weights start a NEW run (fine-tuning); same model shape
    "strategy": "ddp",         # ddp | fsdp (GPU; shards MonetDecoderLayer)
    "peer_experts": 32,        # E for model=peer when moe_experts is not given (N = E^2 experts)
}
DECOMPOSE_ALIASES = {"vertical": "vertical", "vd": "vertical", "horizontal": "horizontal", "hd": "horizontal"}
METRIC_COLUMNS = ["step", "loss", "lm_loss", "unif_loss", "amb_loss", "lr", "grad_norm", "tokens_per_s"]
_IGNORED_MODEL_KEYS = {"self", "kwargs", "output_router_probs", "use_cache"}


def model_keys() -> list[str]:
    """MonetConfig fields accepted as overrides."""
    names = inspect.signature(MonetConfig.__init__).parameters
    return [name for name in names if name not in _IGNORED_MODEL_KEYS]


# ----------------------------------------------------------------------------------------------------------
# Settings


def parse_value(raw: str) -> Any:
    """`key=value` values are YAML scalars: 3 -> int, 1e-3 -> float, true -> bool, null -> None."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    # PyYAML reads "1e-3" as a string (YAML 1.1); accept the usual float spellings.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise MonetError(f"expected key=value, got {pair!r} (e.g. max_steps=2000 model=dense)")
        overrides[key.strip()] = parse_value(raw)
    return overrides


def load_settings(config_file: str | os.PathLike | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """DEFAULTS <- YAML file <- overrides; unknown keys are an error listing the valid ones."""
    settings = dict(DEFAULTS)
    layers = []
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise MonetError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise MonetError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise MonetError(f"config file {path} must be a mapping of key: value, got {type(loaded).__name__}")
        loaded = {k: (parse_value(v) if isinstance(v, str) else v) for k, v in loaded.items()}
        layers.append(loaded)
    layers.append(overrides)
    valid = set(DEFAULTS) | set(model_keys())
    for layer in layers:
        unknown = sorted(set(layer) - valid)
        if unknown:
            raise MonetError(
                f"unknown config key(s) {', '.join(unknown)}. Training keys: {', '.join(DEFAULTS)}. "
                f"Model keys (MonetConfig fields): {', '.join(model_keys())}"
            )
        settings.update(layer)
    _check_settings(settings)
    return settings


def _check_settings(s: dict[str, Any]) -> None:
    def integer(name: str, minimum: int) -> None:
        value = s[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise MonetError(f"{name} must be an integer >= {minimum}, got {value!r}")

    for name, minimum in (("max_steps", 1), ("batch_size", 1), ("grad_accum", 1), ("seq_len", 1),
                          ("warmup_steps", 0), ("eval_interval", 0), ("eval_batches", 1), ("eval_batch_size", 1),
                          ("save_interval", 1), ("keep_last", 0), ("seed", 0), ("peer_experts", 1)):
        integer(name, minimum)
    for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "adam_eps", "grad_clip"):
        if not isinstance(s[name], (int, float)) or isinstance(s[name], bool) or s[name] < 0:
            raise MonetError(f"{name} must be a non-negative number, got {s[name]!r}")
    if s["preset"] not in PRESETS:
        raise MonetError(f"unknown preset {s['preset']!r}; available presets: {', '.join(PRESETS)}")
    if s["model"] not in ("monet", "dense", "peer"):
        raise MonetError(f"model must be monet, dense or peer, got {s['model']!r}")
    if s["decompose"] is not None and str(s["decompose"]).lower() not in DECOMPOSE_ALIASES:
        raise MonetError(f"decompose must be vertical (vd) or horizontal (hd), got {s['decompose']!r}")
    if s["dtype"] not in ("auto", "float32", "bfloat16"):
        raise MonetError(f"dtype must be auto, float32 or bfloat16, got {s['dtype']!r}")
    if s["device"] not in ("auto", "cpu", "cuda"):
        raise MonetError(f"device must be auto, cpu or cuda, got {s['device']!r}")
    if s["strategy"] not in ("ddp", "fsdp"):
        raise MonetError(f"strategy must be ddp or fsdp, got {s['strategy']!r}")
    if s["init_from"] is not None and not isinstance(s["init_from"], str):
        raise MonetError(f"init_from must be a path, got {s['init_from']!r}")
    if not isinstance(s["freeze_router"], bool):
        raise MonetError(f"freeze_router must be true or false, got {s['freeze_router']!r}")
    if s["batch_size"] % s["grad_accum"]:
        raise MonetError(f"batch_size {s['batch_size']} is not divisible by grad_accum {s['grad_accum']}")


def build_model_config(settings: dict[str, Any], vocab_size: int) -> MonetConfig:
    """The MonetConfig of a run: preset, then model/decompose shortcuts, then explicit field overrides."""
    fields = {k: v for k, v in settings.items() if k in set(model_keys())}
    if "vocab_size" in fields and fields["vocab_size"] != vocab_size:
        raise MonetError(
            f"vocab_size={fields['vocab_size']} disagrees with the data's tokenizer ({vocab_size} tokens); "
            "drop vocab_size (it is taken from the data) or rebuild the data with that vocabulary"
        )
    base = {**PRESETS[settings["preset"]], "vocab_size": vocab_size}
    if settings["decompose"] is not None:
        base["moe_decompose"] = DECOMPOSE_ALIASES[str(settings["decompose"]).lower()]
    base.update(fields)
    base["mlp_type"] = settings["model"]
    if settings["seq_len"] > base.get("max_position_embeddings", 2048):
        base["max_position_embeddings"] = settings["seq_len"]
    if settings["model"] == "dense" and "intermediate_size" not in fields:
        from monet.info import dense_intermediate_size_matching

        base["intermediate_size"] = dense_intermediate_size_matching(MonetConfig(**{**base, "mlp_type": "monet"}))
    if settings["model"] == "peer" and "moe_experts" not in fields:
        base["moe_experts"] = settings["peer_experts"]
        base["moe_topk"] = min(base.get("moe_topk", 8), settings["peer_experts"])
    return MonetConfig(**base)


# ----------------------------------------------------------------------------------------------------------
# Schedule, data order, RNG


def lr_at(step: int, settings: dict[str, Any]) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr."""
    peak, floor = float(settings["lr"]), float(settings["min_lr"])
    warmup, total = settings["warmup_steps"], settings["max_steps"]
    if step < warmup:
        return peak * (step + 1) / warmup
    if total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


class WindowOrder:
    """Shuffled window indices, epoch after epoch; (epoch, position) is the resumable state.

    Epoch e's permutation comes from a generator seeded with (seed, e) only, so it is the same on every
    rank and after a restart.
    """

    def __init__(self, num_windows: int, seed: int) -> None:
        if num_windows < 1:
            raise MonetError("the training split has no complete window; use a shorter seq_len or more data")
        self.num_windows, self.seed = num_windows, seed
        self.epoch, self.position = 0, 0
        self._perm: torch.Tensor | None = None

    def _permutation(self) -> torch.Tensor:
        if self._perm is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(self.num_windows, generator=generator)
        return self._perm

    def take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            perm = self._permutation()
            chunk = perm[self.position : self.position + count - len(out)].tolist()
            out.extend(chunk)
            self.position += len(chunk)
            if self.position >= self.num_windows:
                self.epoch, self.position, self._perm = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict[str, int]:
        return {"num_windows": self.num_windows, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["num_windows"]) != self.num_windows:
            raise MonetError(
                f"the training data changed since the checkpoint ({state['num_windows']} windows then, "
                f"{self.num_windows} now, e.g. another seq_len or corpus); resume with the same data or use a new --out"
            )
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._perm = None


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain values (loadable with weights_only)."""
    version, py_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    keys = nps["keys"].numpy().astype(np.uint32)
    np.random.set_state((nps["kind"], keys, nps["pos"], nps["has_gauss"], nps["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------------------
# Distributed setup


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device
    autocast_dtype: torch.dtype | None

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1 and RANK)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def setup_runtime(settings: dict[str, Any]) -> Runtime:
    want = settings["device"]
    if want == "cuda" and not torch.cuda.is_available():
        raise MonetError("device=cuda but no CUDA device is available; use device=cpu or device=auto")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    rank, world = 0, 1
    if launched_distributed():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    else:
        device = torch.device("cuda") if use_cuda else torch.device("cpu")
    if settings["strategy"] == "fsdp" and device.type != "cuda":
        raise MonetError("strategy=fsdp needs CUDA devices; use strategy=ddp (the default) on CPU")
    dtype = settings["dtype"]
    if dtype == "auto":
        bf16 = use_cuda and torch.cuda.is_bf16_supported()
        autocast = torch.bfloat16 if bf16 else None
    else:
        autocast = torch.bfloat16 if dtype == "bfloat16" else None
    return Runtime(rank, world, device, autocast)


def _all_reduce_mean(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.world > 1:
        dist.all_reduce(values)
        values = values / runtime.world
    return values


# ----------------------------------------------------------------------------------------------------------
# Model, optimizer, loss


def freeze_routers(model: nn.Module) -> int:
    """Router key matrices w1/w2 stop learning (paper B.2); returns how many tensors were frozen.

    The routers' BatchNorm running statistics are buffers, not parameters: in train mode they keep
    updating from each batch, so the thresholds follow the fine-tuning data.
    """
    frozen = 0
    for name, param in model.named_parameters():
        if ".router.w1." in name or ".router.w2." in name:
            param.requires_grad_(False)
            frozen += 1
    if not frozen:
        raise MonetError("freeze_router=true but this model has no Monet routers (model=dense or peer)")
    return frozen


def build_optimizer(model: nn.Module, settings: dict[str, Any], fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2), none on norms, biases and expert bias tables."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_bias_table = name.endswith((".b", ".b1", ".b2"))
        (decay if param.dim() >= 2 and not is_bias_table else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": float(settings["weight_decay"])},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=float(settings["lr"]), betas=(float(settings["beta1"]), float(settings["beta2"])),
        eps=float(settings["adam_eps"]), fused=fused or None,
    )


def language_model_loss(model: nn.Module, window: torch.Tensor, aux_weight: float) -> dict[str, torch.Tensor]:
    """Loss of a batch of packed windows [B, seq_len + 1]: inputs x[:, :-1], targets x[:, 1:].

    Returns loss = lm_loss + aux_weight * (unif + amb) and the parts (unif/amb absent for dense).
    """
    out = model(input_ids=window[:, :-1], use_cache=False)
    logits = out.logits.float()
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
    parts = {"lm_loss": lm}
    loss = lm
    if out.unif_loss is not None:
        parts["unif_loss"], parts["amb_loss"] = out.unif_loss, out.amb_loss
        loss = lm + aux_weight * (out.unif_loss + out.amb_loss)
    parts["loss"] = loss
    return parts


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------------------
# Metrics file


class MetricsLog:
    """RUN/metrics.csv, one row per step; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, columns: list[str], resume_step: int) -> None:
        self.path, self.columns = path, columns
        kept: list[dict[str, str]] = []
        if resume_step > 0 and path.is_file():
            with open(path, newline="", encoding="utf-8") as handle:
                lines = handle.read().splitlines(keepends=True)
            complete = [line for line in lines if line.endswith("\n")]    # a kill may leave half a line
            for row in csv.DictReader(io.StringIO("".join(complete))):
                try:
                    if int(row["step"]) <= resume_step:
                        kept.append(row)
                except (KeyError, TypeError, ValueError):
                    continue
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(path, buffer.getvalue())

    def append(self, row: dict[str, Any]) -> None:
        buffer = io.StringIO()
        csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n").writerow(
            {k: _fmt(v) for k, v in row.items()}
        )
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(buffer.getvalue())
            handle.flush()


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


# ----------------------------------------------------------------------------------------------------------
# The loop


def _resolved_yaml(settings: dict[str, Any], config: MonetConfig, data_dir: Path) -> str:
    resolved = {"data": str(data_dir), **settings, "resolved_model": _model_fields(config)}
    return yaml.safe_dump(resolved, sort_keys=False)


def _model_fields(config: MonetConfig) -> dict[str, Any]:
    return {key: getattr(config, key) for key in model_keys() if hasattr(config, key)}


def _check_same_model(saved: MonetConfig, current: MonetConfig, run_dir: Path) -> None:
    before, after = _model_fields(saved), _model_fields(current)
    changed = [f"{k}: {before[k]!r} -> {after[k]!r}" for k in after if before.get(k) != after[k]]
    if changed:
        raise MonetError(
            f"{run_dir} holds a run with a different model ({'; '.join(changed)}); resume with the original "
            "settings or train into a new --out directory"
        )


def _label_sets(dataset: Any, seq_len: int) -> dict[str, Any]:
    """Validation windows overall and per label; labels with less than one window are left out."""
    from monet.data import PackedSequences

    sets: dict[str, Any] = {}
    for label in [None, *dataset.labels]:
        try:
            sets["" if label is None else label] = PackedSequences(dataset, seq_len, label=label)
        except MonetError:
            continue
    return sets


def train(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    overrides: dict[str, Any] | None = None,
    config_file: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run; returns a summary (steps, final losses, checkpoint path)."""
    settings = load_settings(config_file, overrides or {})
    data_dir, run_dir = Path(data_dir), Path(out_dir)
    runtime = setup_runtime(settings)
    try:
        return _train(settings, data_dir, run_dir, runtime)
    finally:
        if runtime.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(settings: dict[str, Any], data_dir: Path, run_dir: Path, runtime: Runtime) -> dict[str, Any]:
    from monet.data import PackedSequences, TokenDataset
    from monet.evaluate import evaluate_sets
    from monet.model import MonetForCausalLM

    if not data_dir.is_dir():
        raise MonetError(
            f"data directory {data_dir} does not exist; build one with `monet data build --out {data_dir}`"
        )
    train_set = TokenDataset(data_dir, split="train")
    config = build_model_config(settings, train_set.vocab_size)
    packed = PackedSequences(train_set, settings["seq_len"])
    val_sets: dict[str, Any] = {}
    if settings["eval_interval"]:
        try:
            val_sets = _label_sets(TokenDataset(data_dir, split="validation"), settings["seq_len"])
        except MonetError as exc:
            if runtime.main:
                print(f"monet train: no validation loss ({exc})", flush=True)
    micro = settings["batch_size"] // settings["grad_accum"]
    if micro % runtime.world:
        raise MonetError(
            f"batch_size / grad_accum = {micro} sequences per micro-step cannot be split over {runtime.world} "
            "processes; choose a batch_size divisible by grad_accum x number of processes"
        )
    local = micro // runtime.world

    # Resume point (rank 0 decides; every rank loads the same directory).
    resume = latest_checkpoint(run_dir) if runtime.main and (run_dir / "checkpoints").is_dir() else None
    if runtime.world > 1:
        box = [str(resume) if resume else None]
        dist.broadcast_object_list(box, src=0)
        resume = Path(box[0]) if box[0] else None

    torch.manual_seed(settings["seed"])
    random.seed(settings["seed"])
    np.random.seed(settings["seed"])
    model = MonetForCausalLM(config)
    state: dict[str, Any] | None = None
    if resume is not None:
        _check_same_model(read_config(resume), config, run_dir)
        model.load_state_dict(read_state_dict(resume), strict=True)
        state = load_training_state(resume)
    elif settings["init_from"] is not None:
        source = resolve_checkpoint(settings["init_from"])
        _check_same_model(read_config(source), config, source)
        model.load_state_dict(read_state_dict(source), strict=True)
    if settings["freeze_router"]:
        freeze_routers(model)
    model.to(runtime.device)
    model.train()
    model = _wrap(model, settings, runtime)
    optimizer = build_optimizer(model, settings, fused=runtime.device.type == "cuda")
    order = WindowOrder(len(packed), settings["seed"])
    start_step, tokens_seen = 0, 0
    if state is not None:
        _load_optimizer(model, optimizer, state["optimizer"], settings)
        order.load_state_dict(state["order"])
        start_step, tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        rngs = state.get("rng", [])
        if runtime.rank < len(rngs):
            set_rng_state(rngs[runtime.rank])

    columns = METRIC_COLUMNS + (["val_loss"] + [f"val_loss_{label}" for label in val_sets if label] if val_sets else [])
    log = None
    if runtime.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", _resolved_yaml(settings, config, data_dir))
        log = MetricsLog(run_dir / "metrics.csv", columns, start_step)
        prune_checkpoints(run_dir, 0)   # sweep temporary dirs of a killed run
        if resume is not None:
            print(f"monet train: resuming from {resume} (step {start_step})", flush=True)
    last_good = resume
    aux_weight = float(config.aux_loss_weight)
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = settings["batch_size"] * settings["seq_len"]
    bar = tqdm(total=settings["max_steps"], initial=start_step, disable=not runtime.main, desc="train", unit="step")
    try:   # the progress bar is closed however the loop ends (a NaN stop raises)
        row: dict[str, Any] = {}
        for step in range(start_step + 1, settings["max_steps"] + 1):
            started = time.perf_counter()
            lr = lr_at(step - 1, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            windows = order.take(settings["batch_size"])
            sums = torch.zeros(4, dtype=torch.float64)
            for micro_step in range(settings["grad_accum"]):
                begin = micro_step * micro + runtime.rank * local
                batch = torch.stack([packed[i] for i in windows[begin : begin + local]]).to(runtime.device)
                with _sync_context(model, settings, runtime, last=micro_step == settings["grad_accum"] - 1):
                    with _autocast(runtime):
                        parts = language_model_loss(model, batch, aux_weight)
                    (parts["loss"] / settings["grad_accum"]).backward()
                sums += torch.tensor([float(parts[k].detach()) if k in parts else 0.0
                                      for k in ("loss", "lm_loss", "unif_loss", "amb_loss")], dtype=torch.float64)
            means = _all_reduce_mean(sums.to(runtime.device), runtime).cpu() / settings["grad_accum"]
            max_norm = float(settings["grad_clip"]) if settings["grad_clip"] > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            _guard_finite(step, float(means[0]), grad_norm, last_good)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += tokens_per_step
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            row = {"step": step, "loss": float(means[0]), "lm_loss": float(means[1]), "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": round(tokens_per_step / max(elapsed, 1e-9), 1)}
            if config.mlp_type == "monet":
                row["unif_loss"], row["amb_loss"] = float(means[2]), float(means[3])
            last = step == settings["max_steps"]
            if val_sets and (step % settings["eval_interval"] == 0 or last):
                results = evaluate_sets(_unwrap(model), val_sets, settings["eval_batch_size"], settings["eval_batches"],
                                        runtime.device, runtime.autocast_dtype)
                model.train()
                for label, result in results.items():
                    row["val_loss" if not label else f"val_loss_{label}"] = result["loss"]
            if log is not None:
                log.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if step % settings["save_interval"] == 0 or last:
                last_good = _save(run_dir, step, model, optimizer, order, tokens_seen, config, settings, data_dir,
                                  runtime)
    finally:
        bar.close()
    return {"run_dir": str(run_dir), "steps": settings["max_steps"], "resumed_from": start_step,
            "checkpoint": str(last_good) if last_good else None, "last": row}


def _guard_finite(step: int, loss: float, grad_norm: float, last_good: Path | None) -> None:
    """Stop before the optimizer step when the loss or the gradient is NaN/inf; no checkpoint is written."""
    for what, value in (("loss", loss), ("gradient norm", grad_norm)):
        if not math.isfinite(value):
            kept = f"the last good checkpoint {last_good} is untouched" if last_good else "no checkpoint was written"
            raise MonetError(
                f"non-finite {what} ({value}) at step {step}; training stopped before the update and {kept}. "
                "Lower lr, raise warmup_steps, keep grad_clip on, or check the data, then re-run to resume"
            )


def _autocast(runtime: Runtime) -> contextlib.AbstractContextManager:
    if runtime.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(runtime.device.type, dtype=runtime.autocast_dtype)


def _sync_context(model: nn.Module, settings: dict[str, Any], runtime: Runtime, last: bool):
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if runtime.world == 1 or last:
        if settings["strategy"] == "fsdp" and runtime.world > 1:
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    model.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def _wrap(model: nn.Module, settings: dict[str, Any], runtime: Runtime) -> nn.Module:
    if runtime.world == 1:
        return model
    if settings["strategy"] == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from monet.model import MonetDecoderLayer

        for module in model.modules():
            if isinstance(module, MonetDecoderLayer):
                fully_shard(module)
        fully_shard(model)
        return model
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer, settings: dict[str, Any],
                runtime: Runtime) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if settings["strategy"] == "fsdp" and runtime.world > 1:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)
    return _unwrap(model).state_dict(), optimizer.state_dict()


def _load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any],
                    settings: dict[str, Any]) -> None:
    if settings["strategy"] == "fsdp" and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
        return
    try:
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError) as exc:
        raise MonetError(
            f"the optimizer state of the checkpoint does not fit this run ({exc}); was freeze_router changed? "
            "Resume with the original settings or use a new --out"
        ) from exc


def _save(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, order: WindowOrder,
          tokens_seen: int, config: MonetConfig, settings: dict[str, Any], data_dir: Path, runtime: Runtime) -> Path:
    model_state, optim_state = _full_state(model, optimizer, settings, runtime)
    rngs: list[Any] = [rng_state()]
    if runtime.world > 1:
        rngs = [None] * runtime.world
        dist.all_gather_object(rngs, rng_state())
    path = run_dir / "checkpoints" / f"step-{step:07d}"
    if runtime.main:
        training_state = {"format": 1, "step": step, "tokens_seen": tokens_seen, "order": order.state_dict(),
                          "optimizer": optim_state, "scheduler": {"kind": "warmup_cosine", "step": step,
                                                                  "lr": lr_at(step - 1, settings)},
                          "rng": rngs, "world_size": runtime.world}
        path = save_checkpoint(run_dir, step, config, model_state, training_state, tokenizer_dir=data_dir,
                               metadata={"seq_len": settings["seq_len"], "tokens_seen": tokens_seen})
        prune_checkpoints(run_dir, settings["keep_last"])
    if runtime.world > 1:
        dist.barrier()
    return path


# ----------------------------------------------------------------------------------------------------------
# Command line


def run_train(args: argparse.Namespace) -> int:
    summary = train(args.data, args.out, parse_overrides(args.overrides), args.config)
    if not launched_distributed() or int(os.environ.get("RANK", "0")) == 0:
        last = summary["last"]
        if last:
            print(f"monet train: step {last['step']} loss {last['loss']:.4f}; checkpoint {summary['checkpoint']}")
        else:
            print(f"monet train: already at step {summary['resumed_from']}; nothing to do ({summary['checkpoint']})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train or resume a Monet / dense / PEER language model",
        description=(
            "Train a model on a dataset built with `monet data build`. Re-running the same command on an "
            "existing --out resumes exactly from its newest complete checkpoint. Launch with "
            "`torchrun --nproc_per_node N -m monet.train ...` for data-parallel training."
        ),
        epilog=(
            "Training keys (key=value): " + ", ".join(f"{k}={v}" for k, v in DEFAULTS.items())
            + ". Any MonetConfig field is a key too, e.g. moe_dim=4 aux_loss_weight=0.001. "
            "Example: monet train --data data/code --out runs/vd preset=small max_steps=2000 decompose=vertical"
        ),
    )
    parser.add_argument("--data", required=True, help="dataset directory from `monet data build`")
    parser.add_argument("--out", required=True, help="run directory (created; resumed when it exists)")
    parser.add_argument("--config", default=None, help="YAML file of key: value settings (overridden by key=value)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. max_steps=2000 model=dense")
    parser.set_defaults(handler=run_train)


def main(argv: list[str] | None = None) -> int:
    """`python -m monet.train ...` is `monet train ...`."""
    from monet.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

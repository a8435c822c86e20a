"""`monet train`: pretraining with exact resume, data parallelism (DDP or FSDP2) and a NaN guard.

    monet train --data DIR --out RUN [--config FILE.yaml] [--max-steps 2000 --lr 1e-3 --set moe_dim=4 ...]
    torchrun --nproc_per_node N -m monet train --data DIR --out RUN ...

Settings: a `TrainSettings` (defaults, then the YAML file, then flags). The loss is the model's own (`labels=` in
the forward: lm_loss + λ aux_loss). Exact resume, the data order, the NaN guard and several processes are described
in docs/training.md.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from tqdm.auto import tqdm
from transformers import set_seed

from monet.checkpoint import (
    check_data_fits,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    prune_checkpoints,
    quiet_transformers,
    read_config,
    resolve_checkpoint,
    save_checkpoint,
)
from monet.config import PRESETS, MonetConfig, config_fields, did_you_mean
from monet.data import PackedSequences, TokenDataset
from monet.errors import MonetError
from monet.evaluate import evaluate_sets, label_window_sets
from monet.info import count_parameters, dense_intermediate_size_matching, human
from monet.io import MARKER, atomic_write, check_writable, exclusive_lock, marker_kind
from monet.model import MonetDecoderLayer, MonetForCausalLM
from monet.runtime import resolve_device, start_distributed
from monet.settings import TrainSettings, parse_assignments, yaml_scalar

METRIC_COLUMNS = ["step", "loss", "lm_loss", "unif_loss", "amb_loss", "lr", "grad_norm", "tokens_per_s"]
_RUN_KEYS = {"output_router_probs", "use_cache"}   # MonetConfig fields a run never sets


MAX_CONFIG_BYTES = 1 << 20


def load_settings(config_file: str | os.PathLike | None = None, values: dict[str, Any] | None = None
                  ) -> TrainSettings:
    """`TrainSettings` from a YAML file of key: value, then `values`; keys may be training settings or
    MonetConfig fields (those become `--set` overrides), as in configs/*.yaml. Unknown keys are an error
    listing the valid ones."""
    layers = []
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise MonetError(f"config file {path} does not exist")
        try:
            if path.stat().st_size > MAX_CONFIG_BYTES:
                raise MonetError(f"config file {path} is larger than {MAX_CONFIG_BYTES:,} bytes; a config is short")
            text = path.read_text(encoding="utf-8")
            if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text)):   # a "billion laughs" bomb
                raise MonetError(f"config file {path} uses YAML aliases (*name); write each value out instead")
            loaded = yaml.safe_load(text) or {}
        except UnicodeDecodeError as exc:
            raise MonetError(f"config file {path} is not UTF-8 text ({exc})") from exc
        except yaml.YAMLError as exc:
            raise MonetError(f"config file {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
        if not isinstance(loaded, dict):
            raise MonetError(f"config file {path} must be a mapping of key: value, got {type(loaded).__name__}")
        layers.append({k: yaml_scalar(v) if isinstance(v, str) else v for k, v in loaded.items()})
    layers.append(values or {})
    training = {f.name for f in dataclasses.fields(TrainSettings)}
    merged: dict[str, Any] = {"data": "", "out": ""}
    model: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if key == "set":   # a list of KEY=VALUE, one such string, or a mapping
                if isinstance(value, dict):
                    model.update(value)
                else:
                    model.update(parse_assignments([value] if isinstance(value, str) else list(value or ())))
            elif key in training:
                merged[key] = tuple(value) if isinstance(value, list) else value
            elif key in config_fields() - _RUN_KEYS:
                model[key] = value
            else:
                raise MonetError(f"unknown config key {key!r}. Training keys: {', '.join(sorted(training))}. "
                                 f"Model keys (MonetConfig fields): {', '.join(sorted(config_fields()))}")
    return TrainSettings(**merged, set=tuple(f"{k}={json.dumps(v)}" for k, v in model.items()))


def build_model_config(settings: TrainSettings, vocab_size: int) -> MonetConfig:
    """The MonetConfig of a run: preset, then the model/decompose shortcuts, then `--set` overrides."""
    fields = settings.model_fields()
    unknown = sorted(set(fields) - config_fields() | set(fields) & _RUN_KEYS)
    if unknown:
        hint = did_you_mean(unknown, config_fields() - _RUN_KEYS)
        raise MonetError(f"unknown model field(s) in --set: {', '.join(unknown)}{hint}; MonetConfig fields: "
                         f"{', '.join(sorted(config_fields() - _RUN_KEYS))}")
    if "vocab_size" in fields and fields["vocab_size"] != vocab_size:
        raise MonetError(f"vocab_size={fields['vocab_size']} disagrees with the data's tokenizer ({vocab_size} "
                         "tokens); drop vocab_size (it comes from the data) or rebuild the data with that vocabulary")
    base = {**PRESETS[settings.preset], "vocab_size": vocab_size}
    if settings.decompose is not None:
        base["moe_decompose"] = {"vd": "vertical", "hd": "horizontal"}.get(settings.decompose, settings.decompose)
    base.update(fields)
    base["mlp_type"] = settings.model
    if fields.get("max_position_embeddings", settings.seq_len) < settings.seq_len:
        raise MonetError(f"--set max_position_embeddings={fields['max_position_embeddings']} is shorter than --seq-len "
                         f"{settings.seq_len}; raise it or train with a shorter --seq-len")
    base["max_position_embeddings"] = max(base.get("max_position_embeddings", 2048), settings.seq_len)
    if settings.model == "dense" and "intermediate_size" not in fields:
        base["intermediate_size"] = dense_intermediate_size_matching(MonetConfig(**{**base, "mlp_type": "monet"}))
    if settings.model == "peer" and "moe_experts" not in fields:
        base["moe_experts"] = settings.peer_experts
        base["moe_topk"] = min(base.get("moe_topk", 8), settings.peer_experts)
    return MonetConfig(**base)


def check_memory(config: MonetConfig, runtime: Runtime) -> None:
    """MonetError, before anything is allocated, when training `config` needs more memory than the device has:
    about 16 bytes per parameter (float32 weights and gradients, AdamW's two moments), sharded under FSDP."""
    need = count_parameters(config) * 16 / (runtime.world if runtime.sharded else 1)
    if runtime.device.type == "cuda":
        have = torch.cuda.get_device_properties(runtime.device).total_memory
    else:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > have:
        raise MonetError(f"this model has {human(count_parameters(config))} parameters: training needs about "
                         f"{need / 2**30:,.1f} GiB (weights, gradients and AdamW state), more than the "
                         f"{have / 2**30:,.1f} GiB of {runtime.device}; choose a smaller --preset or --set sizes")


def lr_at(step: int, settings: TrainSettings) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr."""
    peak, floor, warmup, total = settings.lr, settings.min_lr, settings.warmup_steps, settings.max_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / (total - warmup))
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

    def take(self, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            if self._perm is None:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._perm = torch.randperm(self.num_windows, generator=generator)
            chunk = self._perm[self.position : self.position + count - len(out)].tolist()
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
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    nps = state["numpy"]
    keys = nps["keys"].numpy().astype(np.uint32)
    np.random.set_state((nps["kind"], keys, nps["pos"], nps["has_gauss"], nps["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Runtime:
    """Where a run executes: rank and world size (torchrun), device, autocast dtype (None: float32)."""

    rank: int
    world: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    sharded: bool   # FSDP2 over more than one rank

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class Task:
    """What the loop trains when it is not a language model on packed token windows (the default): `monet vision
    train` (monet.vision) passes image–caption pairs and a VisionMonet, and gets this loop's resume, checkpoints,
    NaN guard and data parallelism unchanged. The validation sets are `evaluate.label_window_sets`'."""

    examples: Any   # len() and [i] -> one example
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]   # examples -> the model's keyword arguments (labels too)
    build: Callable[[Path | None, bool], nn.Module]   # (checkpoint or None, resuming?) -> model on the CPU
    val_sets: dict[str, Any] = field(default_factory=dict)


def freeze_routers(model: nn.Module) -> int:
    """Router key matrices w1/w2 stop learning (paper B.2); returns how many tensors were frozen. The routers'
    BatchNorm running statistics are buffers: in train mode they still update, following the fine-tuning data."""
    keys = [param for name, param in model.named_parameters() if ".router.w1." in name or ".router.w2." in name]
    if not keys:
        raise MonetError("--freeze-router but this model has no Monet routers (model=dense or peer)")
    for param in keys:
        param.requires_grad_(False)
    return len(keys)


def build_optimizer(model: nn.Module, settings: TrainSettings, fused: bool = False) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2), none on norms, biases and expert bias tables."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_bias_table = name.endswith((".b", ".b1", ".b2"))
        (decay if param.dim() >= 2 and not is_bias_table else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.beta1, settings.beta2), eps=settings.adam_eps,
                             fused=fused or None)


def _wrap(model: nn.Module, runtime: Runtime) -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` on every decoder layer, then the whole model), under torchrun."""
    if runtime.world == 1:
        return model
    if runtime.sharded:
        for module in model.modules():
            if isinstance(module, MonetDecoderLayer):
                fully_shard(module)
        fully_shard(model)
        return model
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _sync_context(model: nn.Module, runtime: Runtime, last: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation."""
    if runtime.sharded:
        model.set_requires_gradient_sync(last)
    elif runtime.world > 1 and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def _load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any],
                    runtime: Runtime) -> None:
    try:
        if runtime.sharded:
            set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(saved)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise MonetError(f"the optimizer state of the checkpoint does not fit this run ({exc}); was --freeze-router "
                         "changed? Resume with the original settings or use a new --out") from exc


def open_run_dir(run_dir: Path) -> None:
    """Create RUN, or accept an existing one only if it is a training run (never train into, and later
    prune, a folder this command did not create)."""
    check_writable(run_dir)
    if run_dir.exists():
        if not run_dir.is_dir():
            raise MonetError(f"--out {run_dir} is a file; choose a directory for the run")
        is_run = marker_kind(run_dir) == "train" or (run_dir / "checkpoints").is_dir()
        if not is_run and any(run_dir.iterdir()):
            raise MonetError(f"--out {run_dir} exists and is not a training run; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text("train\n", encoding="utf-8")


class MetricsLog:
    """RUN/metrics.csv, one row per step; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, columns: list[str], resume_step: int) -> None:
        self.path, self.columns = path, columns
        kept: list[dict[str, str]] = []
        if resume_step > 0 and path.is_file():
            with open(path, newline="", encoding="utf-8") as handle:
                complete = [line for line in handle if line.endswith("\n")]    # a kill may leave half a line
            for row in csv.DictReader(complete):
                with contextlib.suppress(KeyError, TypeError, ValueError):   # a damaged row is dropped
                    if int(row["step"]) <= resume_step:
                        kept.append(row)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)
        atomic_write(path, buffer.getvalue())

    def append(self, row: dict[str, Any]) -> None:
        """One row, in one write (csv writes floats with repr, None as empty)."""
        with open(self.path, "a", encoding="utf-8") as handle:
            csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n").writerow(row)


def _check_same_model(saved: MonetConfig, current: MonetConfig, where: Path) -> None:
    keys = sorted(config_fields() - _RUN_KEYS)
    changed = [f"{k}: {getattr(saved, k, None)!r} -> {getattr(current, k, None)!r}" for k in keys
               if getattr(saved, k, None) != getattr(current, k, None)]
    if changed:
        raise MonetError(f"{where} holds a model of another shape ({'; '.join(changed)}); resume with the original "
                         "settings or train into a new --out directory")


def train(settings: TrainSettings, task: Task | None = None) -> dict[str, Any]:
    """Train (or resume) the run `settings.out`; returns a summary (steps, last metrics row, checkpoint). `task`
    replaces the language-model data and model (see `Task`)."""
    rank, world, device = start_distributed(resolve_device(settings.device))   # joins torchrun's process group
    bf16 = settings.dtype == "bfloat16" or (settings.dtype == "auto" and device.type == "cuda"
                                            and torch.cuda.is_bf16_supported())
    runtime = Runtime(rank, world, device, torch.bfloat16 if bf16 else None, settings.strategy == "fsdp" and world > 1)
    try:
        # One process per run directory (rank 0 holds the lock): a second `monet train --out RUN` is refused
        # instead of resuming from, and overwriting, the first's checkpoints.
        with exclusive_lock(settings.out) if runtime.main and settings.out else contextlib.nullcontext():
            return _train(settings, Path(settings.data), Path(settings.out), runtime, task)
    finally:
        if runtime.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def language_task(settings: TrainSettings, data_dir: Path, runtime: Runtime) -> Task:
    """The default `Task`: packed token windows of a `monet data build` dataset and a Monet (or baseline) LM."""
    train_set = TokenDataset(data_dir, split="train")
    config = build_model_config(settings, train_set.vocab_size)
    check_memory(config, runtime)
    val_sets: dict[str, Any] = {}
    if settings.eval_interval:
        try:
            val_sets, _ = label_window_sets(TokenDataset(data_dir, split="validation"), settings.seq_len, overall=True)
        except MonetError as exc:
            if runtime.main:
                print(f"monet train: no validation loss ({exc})", flush=True)

    def collate(windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = torch.stack(windows)
        return {"input_ids": batch, "labels": batch}

    def build(source: Path | None, resumed: bool) -> nn.Module:
        if source is None:
            return MonetForCausalLM(config)
        _check_same_model(read_config(source), config, source)
        if resumed:
            check_data_fits(source, data_dir)
        with quiet_transformers():
            return MonetForCausalLM.from_pretrained(source, config=config)

    return Task(PackedSequences(train_set, settings.seq_len), collate, build, val_sets)


def _train(settings: TrainSettings, data_dir: Path, run_dir: Path, runtime: Runtime,
           task: Task | None = None) -> dict[str, Any]:
    if not settings.data or not settings.out:
        raise MonetError("--data (the dataset directory) and --out (the run directory) are required")
    task = task or language_task(settings, data_dir, runtime)
    val_sets = task.val_sets
    micro = settings.batch_size // settings.grad_accum
    if micro % runtime.world:
        raise MonetError(f"--batch-size / --grad-accum = {micro} sequences per micro-step cannot be split over "
                         f"{runtime.world} processes; choose a batch size divisible by grad_accum x processes")
    local = micro // runtime.world

    # Resume from the newest intact checkpoint: rank 0 decides, every rank loads the same directory. When every
    # checkpoint is damaged, stop: starting over would throw the run's metrics away.
    resume = None
    if runtime.main:
        open_run_dir(run_dir)
        resume = latest_checkpoint(run_dir, verify=not settings.no_verify)
        if resume is None and list_checkpoints(run_dir):
            raise MonetError(f"every checkpoint in {run_dir / 'checkpoints'} is damaged (see above), so the run "
                             "cannot resume; restore a checkpoint, or delete the checkpoints to start over")
    if runtime.world > 1:
        box = [resume]
        dist.broadcast_object_list(box, src=0)
        resume = box[0]
    source = resume or (resolve_checkpoint(settings.init_from, not settings.no_verify) if settings.init_from else None)

    set_seed(settings.seed)
    model = task.build(source, resume is not None)
    config = model.config
    if settings.freeze_router:
        freeze_routers(model)
    model.to(runtime.device)
    model.train()
    model = _wrap(model, runtime)
    optimizer = build_optimizer(model, settings, fused=runtime.device.type == "cuda")
    order = WindowOrder(len(task.examples), settings.seed)
    start_step, tokens_seen = 0, 0
    if resume is not None:
        state = load_training_state(resume)
        _load_optimizer(model, optimizer, state["optimizer"], runtime)
        order.load_state_dict(state["order"])
        start_step, tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        rngs = state.get("rng", [])
        if runtime.rank < len(rngs):
            set_rng_state(rngs[runtime.rank])

    val_columns = {label: f"val_loss_{label}" if label else "val_loss" for label in val_sets}
    log = None
    if runtime.main:
        resolved = {**dataclasses.asdict(settings), "set": list(settings.set), "resolved_model": config.to_diff_dict()}
        atomic_write(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        log = MetricsLog(run_dir / "metrics.csv", METRIC_COLUMNS + list(val_columns.values()), start_step)
        prune_checkpoints(run_dir, 0)   # sweep temporary dirs of a killed run
        if resume is not None:
            print(f"monet train: resuming from {resume} (step {start_step})", flush=True)
    last_good = resume
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = settings.batch_size * settings.seq_len
    max_norm = settings.grad_clip if settings.grad_clip > 0 else float("inf")
    row: dict[str, Any] = {}
    with tqdm(total=settings.max_steps, initial=start_step, disable=not runtime.main or settings.quiet,
              desc="train", unit="step") as bar:   # closed however the loop ends (a NaN stop raises)
        for step in range(start_step + 1, settings.max_steps + 1):
            started = time.perf_counter()
            lr = lr_at(step - 1, settings)
            for group in optimizer.param_groups:
                group["lr"] = lr
            windows = order.take(settings.batch_size)
            sums = torch.zeros(4, dtype=torch.float64)
            for micro_step in range(settings.grad_accum):
                begin = micro_step * micro + runtime.rank * local
                batch = task.collate([task.examples[i] for i in windows[begin : begin + local]])
                with (_sync_context(model, runtime, last=micro_step == settings.grad_accum - 1),
                      torch.autocast(runtime.device.type, dtype=runtime.autocast_dtype,
                                     enabled=runtime.autocast_dtype is not None)):
                    out = model(**{k: v.to(runtime.device) for k, v in batch.items()}, use_cache=False)
                    (out.loss / settings.grad_accum).backward()
                parts = (out.loss, out.lm_loss, out.unif_loss, out.amb_loss)
                sums += torch.tensor([float(v.detach()) if v is not None else 0.0 for v in parts], dtype=torch.float64)
            if runtime.world > 1:
                sums = sums.to(runtime.device)   # NCCL reduces GPU tensors
                dist.all_reduce(sums)
            loss, lm_loss, unif_loss, amb_loss = (sums.cpu() / runtime.world / settings.grad_accum).tolist()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            _guard_finite(step, loss, grad_norm, last_good)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += tokens_per_step
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            row = {"step": step, "loss": loss, "lm_loss": lm_loss, "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": round(tokens_per_step / max(elapsed, 1e-9), 1)}
            if getattr(config, "text_config", config).mlp_type == "monet":
                row["unif_loss"], row["amb_loss"] = unif_loss, amb_loss
            last = step == settings.max_steps
            if val_sets and (step % settings.eval_interval == 0 or last):
                results = evaluate_sets(_unwrap(model), val_sets, settings.eval_batch_size, settings.eval_batches,
                                        runtime.device, runtime.autocast_dtype)
                row.update({val_columns[label]: result["loss"] for label, result in results.items()})
                if runtime.main:
                    bar.write(f"step {step}: validation loss {row['val_loss']:.4f}")
            if log is not None:
                log.append(row)
            bar.update(1)
            bar.set_postfix({"loss": f"{row['loss']:.4f}", "tok_s": f"{row['tokens_per_s']:.0f}"})
            if step % settings.save_interval == 0 or last:
                last_good = _save(run_dir, step, model, optimizer, order, tokens_seen, settings, data_dir, runtime)
    return {"run_dir": str(run_dir), "steps": settings.max_steps, "resumed_from": start_step, "rank": runtime.rank,
            "checkpoint": str(last_good) if last_good else None, "last": row}


def _guard_finite(step: int, loss: float, grad_norm: float, last_good: Path | None) -> None:
    """Stop before the optimizer step when the loss or the gradient is NaN/inf; no checkpoint is written."""
    for what, value in (("loss", loss), ("gradient norm", grad_norm)):
        if not math.isfinite(value):
            kept = f"the last good checkpoint {last_good} is untouched" if last_good else "no checkpoint was written"
            raise MonetError(
                f"non-finite {what} ({value}) at step {step}; training stopped before the update and {kept}. "
                "Lower --lr, raise --warmup-steps, keep --grad-clip on, or check the data, then re-run to resume"
            )


def _save(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, order: WindowOrder,
          tokens_seen: int, settings: TrainSettings, data_dir: Path, runtime: Runtime) -> Path:
    if runtime.sharded:   # the whole state, gathered from the shards
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(model, options=options)
        optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    else:
        model_state, optim_state = None, optimizer.state_dict()
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
        path = save_checkpoint(run_dir, step, _unwrap(model), training_state, tokenizer_dir=data_dir,
                               metadata={"seq_len": settings.seq_len, "tokens_seen": tokens_seen},
                               state_dict=model_state)
        prune_checkpoints(run_dir, settings.keep_last)
    if runtime.world > 1:
        dist.barrier()
    return path

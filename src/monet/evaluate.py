"""`monet eval` (docs/training.md): mean next-token loss and perplexity over the trainer's packed windows,
overall and per label, in eval mode and without labels (no auxiliary loss, no collective operation).
Also a local lm-evaluation-harness task built from one of our corpora.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from monet.checkpoint import check_data_fits, check_seq_len, load_checkpoint, resolve_checkpoint, trained_seq_len
from monet.data import PackedSequences, TokenDataset, load_tokenizer
from monet.errors import MonetError
from monet.io import atomic_write
from monet.model import causal_lm_loss
from monet.runtime import resolve_device


def window_indices(total: int, batch_size: int, max_batches: int | None) -> list[int]:
    """All window indices, or `max_batches * batch_size` of them evenly spaced over [0, total) (not the first
    ones: documents are stored label by label, and a limited pass should still see every label)."""
    wanted = total if max_batches is None else min(total, max_batches * batch_size)
    return [int(i * total / wanted) for i in range(wanted)]


@torch.no_grad()
def window_losses(
    model: nn.Module,
    packed: Any,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    indices: Sequence[int] | None = None,
) -> torch.Tensor:
    """Mean token loss of each evaluated window of one `PackedSequences` ([windows], float64, CPU): the
    model's own loss (`causal_lm_loss`) per window, so statistics over windows (bootstrap intervals) come
    from the same numbers as the mean. `indices` picks the windows (default: `max_batches` evenly spaced)."""
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    indices = list(indices) if indices is not None else window_indices(len(packed), batch_size, max_batches)
    losses = []
    for start in tqdm(range(0, len(indices), batch_size), disable=not progress, desc="eval", unit="batch",
                      leave=False):
        batch = torch.stack([packed[i] for i in indices[start : start + batch_size]]).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(input_ids=batch, use_cache=False).logits
        losses.append(causal_lm_loss(logits, batch, reduction="none").double().mean(dim=1).cpu())
    if was_training:
        model.train()
    return torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64)


def evaluate_windows(model: nn.Module, packed: Any, batch_size: int = 8, max_batches: int | None = None,
                     device: torch.device | str | None = None, autocast_dtype: torch.dtype | None = None,
                     progress: bool = False) -> dict[str, float]:
    """Mean token loss, perplexity and token count over the windows of one `PackedSequences` (every window
    has the same number of predicted tokens, so the mean over windows is the mean over tokens)."""
    losses = window_losses(model, packed, batch_size, max_batches, device, autocast_dtype, progress)
    mean = float(losses.mean()) if len(losses) else 0.0
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": len(losses) * packed.seq_len}


def evaluate_sets(model: nn.Module, sets: dict[str, Any], batch_size: int = 8, max_batches: int | None = None,
                  device: torch.device | str | None = None, autocast_dtype: torch.dtype | None = None,
                  progress: bool = False) -> dict[str, dict[str, float]]:
    """`evaluate_windows` for each named window set ("" is the whole split)."""
    return {name: evaluate_windows(model, packed, batch_size, max_batches, device, autocast_dtype, progress)
            for name, packed in sets.items()}


def label_window_sets(dataset: TokenDataset, seq_len: int, overall: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Windows per label (and the whole split under "" with `overall`); labels with less than one window
    are returned separately."""
    sets, skipped = {}, []
    for label in ([None] if overall else []) + list(dataset.labels):
        try:
            sets["" if label is None else label] = PackedSequences(dataset, seq_len, label=label)
        except MonetError:
            skipped.append(label or "(all)")
    return sets, skipped


def evaluate_checkpoint(
    path: str | Path,
    data_dir: str | Path,
    split: str = "validation",
    max_batches: int | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
    device: str | None = "auto",
    progress: bool = False,
    verify: bool = True,
) -> dict[str, Any]:
    """Loss and perplexity per label and overall of a run (newest checkpoint) or checkpoint on a dataset."""
    directory = resolve_checkpoint(path, verify)
    check_data_fits(directory, data_dir)
    model, _ = load_checkpoint(directory, device=resolve_device(device), load_tokenizer=False, verify=False)
    dataset = TokenDataset(data_dir, split=split)
    seq_len = seq_len or trained_seq_len(directory, model)
    check_seq_len(seq_len, model)
    sets, skipped = label_window_sets(dataset, seq_len, overall=True)
    if "" not in sets:
        raise MonetError(f"the {split} split of {data_dir} has less than one window of {seq_len + 1} tokens; "
                         "use a shorter --seq-len or more data")
    results = evaluate_sets(model, sets, batch_size, max_batches, progress=progress)
    overall = results.pop("")
    return {
        "checkpoint": str(directory), "data": str(data_dir), "split": split, "seq_len": seq_len,
        "overall": overall, "labels": results, "skipped_labels": skipped,
    }


def build_continuation_items(
    data_dir: str | Path,
    split: str = "validation",
    num_items: int = 100,
    num_choices: int = 4,
    context_tokens: int = 48,
    continuation_tokens: int = 16,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Multiple-choice items "which text continues this context?": the first `context_tokens` tokens of a
    document, its next `continuation_tokens` tokens, and as distractors spans of the same length from other
    documents of the same label (so the language or domain alone does not give the answer)."""
    if num_choices < 2:
        raise MonetError(f"num_choices must be >= 2, got {num_choices}")
    dataset = TokenDataset(data_dir, split=split)
    tokenizer = load_tokenizer(data_dir)
    rng = random.Random(seed)
    need = 1 + context_tokens + continuation_tokens
    usable: dict[str, list[int]] = {}
    for i in range(dataset.num_documents):
        if len(dataset.document(i)) > need:
            usable.setdefault(dataset.document_label(i), []).append(i)
    labels = [label for label, docs in usable.items() if len(docs) >= num_choices]
    if not labels:
        raise MonetError(
            f"no label of {data_dir} ({split}) has {num_choices} documents longer than {need} tokens; "
            "use a larger corpus, fewer choices or shorter contexts"
        )

    def decode(ids: Any) -> str:
        return tokenizer.decode([int(t) for t in ids], skip_special_tokens=True)

    items = []
    for n in range(num_items):
        label = labels[n % len(labels)]
        doc, *others = rng.sample(usable[label], num_choices)
        tokens = dataset.document(doc)
        context = decode(tokens[1 : 1 + context_tokens])
        gold = decode(tokens[1 + context_tokens : need])
        distractors = []
        for other in others:
            other_tokens = dataset.document(other)
            start = rng.randrange(1, len(other_tokens) - continuation_tokens)
            distractors.append(decode(other_tokens[start : start + continuation_tokens]))
        choices = [gold, *distractors]
        rng.shuffle(choices)
        items.append({"id": n, "label": label, "context": context, "choices": choices, "gold": choices.index(gold)})
    return items


def write_lm_eval_task(
    data_dir: str | Path,
    out_dir: str | Path,
    task_name: str = "monet_continuation",
    **item_options: Any,
) -> Path:
    """Write `out_dir/{task_name}.yaml` + `items.jsonl`, a local lm-eval multiple-choice task, and return
    `out_dir`. Use it with `TaskManager(include_path=out_dir)` and `tasks=[task_name]`; nothing is downloaded."""
    items = build_continuation_items(data_dir, **item_options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_file = (out / "items.jsonl").resolve()
    atomic_write(data_file, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    task = f"""task: {task_name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data_file))}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    atomic_write(out / f"{task_name}.yaml", task)
    return out

"""`monet eval`: validation loss and perplexity, overall and per label.

The loss is the mean next-token cross-entropy over packed windows (`PackedSequences`, the same
windows the trainer uses). With `--max-batches`, windows are taken evenly spaced over the split
rather than from its start, so a limited pass still sees every part of the corpus (documents are
stored label by label). The model runs in eval mode (routing thresholds from the BatchNorm running
statistics) and without labels, so no auxiliary loss and no collective operation is involved.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from monet.errors import MonetError


def window_indices(total: int, batch_size: int, max_batches: int | None) -> list[int]:
    """All window indices, or `max_batches * batch_size` of them evenly spaced over [0, total)."""
    wanted = total if max_batches is None else min(total, max_batches * batch_size)
    if wanted >= total:
        return list(range(total))
    return [int(i * total / wanted) for i in range(wanted)]


@torch.no_grad()
def evaluate_windows(
    model: nn.Module,
    packed: Any,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Mean token loss, perplexity and token count over the windows of one `PackedSequences`."""
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    indices = window_indices(len(packed), batch_size, max_batches)
    total, count = 0.0, 0
    batches = range(0, len(indices), batch_size)
    for start in tqdm(batches, disable=not progress, desc="eval", unit="batch", leave=False):
        batch = torch.stack([packed[i] for i in indices[start : start + batch_size]]).to(device)
        context = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                   else contextlib.nullcontext())
        with context:
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    if was_training:
        model.train()
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": count}


def evaluate_sets(
    model: nn.Module,
    sets: dict[str, Any],
    batch_size: int = 8,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """`evaluate_windows` for each named window set ("" is the whole split)."""
    return {
        name: evaluate_windows(model, packed, batch_size, max_batches, device, autocast_dtype, progress)
        for name, packed in sets.items()
    }


def _seq_len_of(checkpoint: Path, default: int) -> int:
    """The training sequence length recorded in checkpoint.json (falls back to `default`)."""
    try:
        return int(json.loads((checkpoint / "checkpoint.json").read_text(encoding="utf-8"))["seq_len"])
    except (OSError, ValueError, KeyError, TypeError):
        return default


def evaluate_checkpoint(
    path: str | Path,
    data_dir: str | Path,
    split: str = "validation",
    max_batches: int | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
    device: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Loss and perplexity per label and overall of a run (newest checkpoint) or checkpoint on a dataset."""
    from monet.checkpoint import check_vocab_fits, load_checkpoint, resolve_checkpoint
    from monet.data import PackedSequences, TokenDataset

    if not Path(data_dir).is_dir():
        raise MonetError(f"data directory {data_dir} does not exist; build one with `monet data build`")
    directory = resolve_checkpoint(path)
    model, _ = load_checkpoint(directory, load_tokenizer=False)
    dataset = TokenDataset(data_dir, split=split)
    check_vocab_fits(dataset.vocab_size, model.config.vocab_size, where=str(data_dir))
    seq_len = seq_len or _seq_len_of(directory, min(512, model.config.max_position_embeddings))
    device_obj = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device_obj)
    sets: dict[str, Any] = {"": PackedSequences(dataset, seq_len)}
    skipped = []
    for label in dataset.labels:
        try:
            sets[label] = PackedSequences(dataset, seq_len, label=label)
        except MonetError:
            skipped.append(label)
    results = evaluate_sets(model, sets, batch_size, max_batches, device_obj, None, progress)
    overall = results.pop("")
    return {
        "checkpoint": str(directory), "data": str(data_dir), "split": split, "seq_len": seq_len,
        "overall": overall, "labels": results, "skipped_labels": skipped,
    }


def run_eval(args: argparse.Namespace) -> int:
    report = evaluate_checkpoint(
        args.checkpoint, args.data, split=args.split, max_batches=args.max_batches, batch_size=args.batch_size,
        seq_len=args.seq_len, device=args.device, progress=not args.json,
    )
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"checkpoint {report['checkpoint']}  split {report['split']}  seq_len {report['seq_len']}")
    width = max([len("overall"), *(len(label) for label in report["labels"])])
    print(f"{'label':<{width}}  {'loss':>8}  {'ppl':>10}  {'tokens':>9}")
    rows = [("overall", report["overall"]), *report["labels"].items()]
    for name, result in rows:
        print(f"{name:<{width}}  {result['loss']:8.4f}  {result['perplexity']:10.2f}  {result['tokens']:9d}")
    if report["skipped_labels"]:
        print(f"(labels with less than one window, skipped: {', '.join(report['skipped_labels'])})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="validation loss and perplexity per label of a run or checkpoint",
        description="Mean next-token loss and perplexity on a dataset split, overall and for each label.",
    )
    parser.add_argument(
        "checkpoint", metavar="RUN_OR_CHECKPOINT", help="run directory (newest checkpoint) or checkpoint directory"
    )
    parser.add_argument("--data", required=True, help="dataset directory from `monet data build`")
    parser.add_argument("--split", default="validation", choices=["train", "validation"])
    parser.add_argument("--max-batches", type=int, default=None, help="batches per label (evenly spaced windows)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default: the training seq_len)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(handler=run_eval)


# ----------------------------------------------------------------------------------------------------------
# lm-evaluation-harness: a local multiple-choice task built from one of our corpora


def build_continuation_items(
    data_dir: str | Path,
    split: str = "validation",
    num_items: int = 100,
    num_choices: int = 4,
    context_tokens: int = 48,
    continuation_tokens: int = 16,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Multiple-choice items "which text continues this context?" from real documents of a corpus.

    Context: the first `context_tokens` tokens of a document; the right choice: its next
    `continuation_tokens` tokens; the distractors: spans of the same length from other documents with
    the same label (so the choice cannot be made by spotting the language or domain alone).
    """
    import random as _random

    from monet.data import TokenDataset, load_tokenizer

    if num_choices < 2:
        raise MonetError(f"num_choices must be >= 2, got {num_choices}")
    dataset = TokenDataset(data_dir, split=split)
    tokenizer = load_tokenizer(data_dir)
    rng = _random.Random(seed)
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
    """Write `out_dir/{task_name}.yaml` + `items.jsonl`: a local lm-eval multiple-choice task.

    Use it with `lm_eval.tasks.TaskManager(include_path=out_dir)` and `tasks=[task_name]`; nothing is
    downloaded (the `json` dataset builder reads the local file). Returns `out_dir`.
    """
    from monet.checkpoint import atomic_write_text

    items = build_continuation_items(data_dir, **item_options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_file = (out / "items.jsonl").resolve()
    atomic_write_text(data_file, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    task = "\n".join([
        f"task: {task_name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file))}",
        "test_split: test",
        "output_type: multiple_choice",
        "doc_to_text: context",
        "doc_to_choice: choices",
        "doc_to_target: gold",
        'target_delimiter: ""',
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ])
    atomic_write_text(out / f"{task_name}.yaml", task)
    return out

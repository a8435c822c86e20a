"""`monet unlearn`: delete the experts specialised in a label and measure what is lost where (paper §5).

For each target label, the experts whose routing mass is skewed towards it (`ratio` x the next label,
paper D.1/D.2; statistics from an atlas) are masked, and every label of the validation split is
evaluated before and after. The metric is the validation loss per label (masked minus unmasked: a
rise is knowledge lost) and, where the corpus has it (the `domains` corpus), multiple-choice accuracy:
pick a definition's headword among same-domain distractors by the model's log-likelihood.

    monet unlearn RUN --data DIR --atlas ATLAS --all-labels --out REPORT [--ratio 2.0] [--max-batches N]

REPORT/ holds `report.json` (metrics before/after per label, masked experts per group, masking ratio,
`delta_target`, `delta_others`), `loss_matrix.csv` (rows: evaluated label, columns: masked label, as
paper Table 3 / Table 11, with Δ Target and Δ Others rows), `accuracy_matrix.csv` when there is a
multiple-choice task, and `heatmap.png` (like Fig. 3). With `--baseline DENSE_RUN --baseline-atlas A`
the same protocol runs on a dense LLaMA model's MLP neurons (chosen by the same skewness criterion over
per-label activation mass, masked with a forward pre-hook on `down_proj` that zeroes them), and the
report shows both models' Δ Others side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from monet.analysis.criteria import Selection, select_skewed
from monet.errors import MonetError

REPORT_FILE = "report.json"


# ----------------------------------------------------------------------------------------------------------
# Statistics and selection


def atlas_label_means(atlas: Any) -> tuple[list[str], list[np.ndarray]]:
    """(labels, per group [num_labels, units]: mean score per token of each label) from an `Atlas`.

    Labels the atlas saw no token of are dropped (nothing can be said about them, and an all-zero row
    would make every other label look infinitely skewed against it).
    """
    tokens = np.asarray(getattr(atlas, "label_tokens", np.ones(len(atlas.labels))), dtype=np.float64)
    seen = [i for i in range(len(atlas.labels)) if tokens[i] > 0]
    if len(seen) < 2:
        raise MonetError(f"atlas {getattr(atlas, 'path', '')} covers {len(seen)} label(s) with tokens; the skewness "
                         "criterion needs at least 2: rebuild it with more --max-tokens")
    means = []
    for group in atlas.groups:
        if hasattr(atlas, "label_probability"):
            means.append(np.asarray(atlas.label_probability(group), dtype=np.float64))
        else:   # mass rows divided by their totals: the same up to a constant per label
            from monet.analysis.criteria import label_means

            means.append(label_means(atlas.label_mass(group)[1]))
    return [atlas.labels[i] for i in seen], [m[seen] for m in means]


def open_atlas(path: str | os.PathLike, model: nn.Module) -> Any:
    """The atlas at `path`, checked to belong to `model`."""
    from monet.analysis.query import Atlas

    return Atlas(path, model=model)


def select_for_label(means: list[np.ndarray], labels: list[str], target: str, ratio: float = 2.0,
                     min_mass: float = 0.0) -> Selection:
    """Units skewed towards `target` in every group (means are already per-token, so not re-normalised)."""
    if target not in labels:
        raise MonetError(f"unknown label {target!r}; the atlas has tokens of: {', '.join(labels)} (a label of the "
                         "data that the atlas never saw needs an atlas built on more --max-tokens)")
    return select_skewed(means, labels.index(target), ratio=ratio, min_mass=min_mass, normalize=False)


@contextmanager
def masked(model: nn.Module, selection: Selection) -> Iterator[nn.Module]:
    """Delete the selected units inside the block: Monet experts (edits) or dense MLP neurons (hooks)."""
    if getattr(model.config, "mlp_type", "monet") == "monet":
        from monet.editing import edited

        with edited(model, selection.to_edits(int(model.config.moe_experts))):
            yield model
        return
    with neuron_masks(model, selection.ids):
        yield model


@contextmanager
def neuron_masks(model: nn.Module, neurons: dict[int, np.ndarray]) -> Iterator[nn.Module]:
    """Zero the chosen hidden neurons of a dense model's MLPs (layer -> neuron ids) inside the block.

    A forward pre-hook on each layer's `down_proj` multiplies its input, act(gate(x)) * up(x), by a 0/1
    mask, so the neurons contribute nothing (and get no gradient).
    """
    from monet.baselines import DenseMLP

    layers = model.model.layers
    handles = []
    try:
        for index, ids in neurons.items():
            mlp = getattr(layers[index], "mlp", None) if 0 <= index < len(layers) else None
            if not isinstance(mlp, DenseMLP):
                raise MonetError(f"layer {index} has no dense MLP: neuron masks need an mlp_type='dense' model")
            if len(ids) == 0:
                continue
            width = mlp.down_proj.in_features
            if int(np.max(ids)) >= width or int(np.min(ids)) < 0:
                raise MonetError(f"neuron ids of layer {index} must lie in [0, {width})")
            keep = torch.ones(width, dtype=mlp.down_proj.weight.dtype, device=mlp.down_proj.weight.device)
            keep[torch.as_tensor(np.asarray(ids), dtype=torch.long)] = 0.0

            def hook(module, args, keep=keep):
                return (args[0] * keep.to(args[0].dtype),) + tuple(args[1:])

            handles.append(mlp.down_proj.register_forward_pre_hook(hook))
        yield model
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------------------
# Metrics


def label_window_sets(dataset: Any, seq_len: int) -> tuple[dict[str, Any], list[str]]:
    """Validation windows per label; labels with less than one window are returned separately."""
    from monet.data import PackedSequences

    sets, skipped = {}, []
    for label in dataset.labels:
        try:
            sets[label] = PackedSequences(dataset, seq_len, label=label)
        except MonetError:
            skipped.append(label)
    return sets, skipped


def headword_items(dataset: Any, label: str, max_items: int = 40, choices: int = 4, seed: int = 0) -> list[dict]:
    """Multiple-choice items of one domain: a definition and `choices` headwords of that domain."""
    docs = dataset.documents_with_label(label)
    entries = []
    for i in docs.tolist():
        meta = dataset.document_meta(i)
        if meta.get("headword") and meta.get("definition"):
            entries.append((meta["headword"], meta["definition"]))
    headwords = sorted({h for h, _ in entries})
    if len(headwords) < choices:
        return []
    rng = random.Random(f"{seed}:{label}")
    rng.shuffle(entries)
    items = []
    for headword, definition in entries[:max_items]:
        distractors = rng.sample([h for h in headwords if h != headword], choices - 1)
        options = [headword, *distractors]
        rng.shuffle(options)
        items.append({"definition": definition, "choices": options, "gold": options.index(headword)})
    return items


def has_multiple_choice(dataset: Any) -> bool:
    """True when documents carry a headword and a definition (the `domains` corpus)."""
    return dataset.num_documents > 0 and bool(dataset.document_meta(0).get("headword"))


@torch.no_grad()
def choice_scores(model: nn.Module, tokenizer: Any, prefixes: list[str], texts: list[str], batch_size: int = 16,
                  bos_id: int | None = None) -> list[float]:
    """log p(text[len(prefix):] | <s> prefix) for each (prefix, full text) pair, summed over tokens."""
    device = next(model.parameters()).device
    sequences, starts = [], []
    for prefix, text in zip(prefixes, texts, strict=True):
        head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        start = len(head) if full[: len(head)] == head and len(full) > len(head) else 0
        lead = [bos_id] if bos_id is not None else []
        sequences.append(lead + full)
        starts.append(start + len(lead))
    scores = []
    for begin in range(0, len(sequences), batch_size):
        chunk = sequences[begin : begin + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
        # Right padding: causal attention keeps the real tokens' logits exact, no mask needed.
        logprobs = F.log_softmax(model(input_ids=ids.to(device), use_cache=False).logits.float(), dim=-1)
        for row, seq in enumerate(chunk):
            start = max(starts[begin + row], 1)
            targets = torch.tensor(seq[start:], device=device)
            picked = logprobs[row, start - 1 : len(seq) - 1].gather(-1, targets[:, None])
            scores.append(float(picked.sum()))
    return scores


def multiple_choice_accuracy(model: nn.Module, tokenizer: Any, items: list[dict], batch_size: int = 16) -> float:
    """Share of items whose gold headword gives the definition the highest log-likelihood."""
    if not items:
        return float("nan")
    prefixes, texts = [], []
    for item in items:
        for choice in item["choices"]:
            prefixes.append(choice)
            texts.append(f"{choice}: {item['definition']}")
    scores = choice_scores(model, tokenizer, prefixes, texts, batch_size, tokenizer.bos_token_id)
    correct, at = 0, 0
    for item in items:
        count = len(item["choices"])
        best = int(np.argmax(scores[at : at + count]))
        correct += best == item["gold"]
        at += count
    return correct / len(items)


def evaluate_labels(model: nn.Module, sets: dict[str, Any], batch_size: int, max_batches: int | None,
                    mc_items: dict[str, list[dict]] | None = None, tokenizer: Any = None) -> dict[str, dict]:
    """Loss per label (and multiple-choice accuracy where items exist)."""
    from monet.evaluate import evaluate_windows

    device = next(model.parameters()).device
    results = {}
    for label, packed in sets.items():
        result = evaluate_windows(model, packed, batch_size=batch_size, max_batches=max_batches, device=device)
        entry: dict[str, Any] = {"loss": result["loss"], "tokens": result["tokens"]}
        if mc_items and mc_items.get(label):
            entry["accuracy"] = multiple_choice_accuracy(model, tokenizer, mc_items[label], batch_size)
        results[label] = entry
    return results


# ----------------------------------------------------------------------------------------------------------
# The experiment


def run_protocol(model: nn.Module, means: list[np.ndarray], labels: list[str], targets: list[str],
                 sets: dict[str, Any], batch_size: int, max_batches: int | None, ratio: float, min_mass: float,
                 mc_items: dict[str, list[dict]] | None = None, tokenizer: Any = None,
                 progress: bool = True, allow_empty: bool = False) -> dict[str, Any]:
    """Baseline metrics, then for each target: selection, masked metrics, deltas."""
    model.eval()
    before = evaluate_labels(model, sets, batch_size, max_batches, mc_items, tokenizer)
    results: dict[str, Any] = {}
    for target in tqdm(targets, desc="unlearn", unit="label", disable=not progress):
        selection = select_for_label(means, labels, target, ratio, min_mass)
        if selection.total == 0 and not allow_empty:
            raise MonetError(f"no expert is skewed towards {target!r} at ratio {ratio} (min mass {min_mass}): "
                             "the selection is empty; lower --ratio or build the atlas on more tokens")
        if selection.total == 0:
            after = before
        else:
            with masked(model, selection):
                after = evaluate_labels(model, sets, batch_size, max_batches, mc_items, tokenizer)
        results[target] = {"selection": selection.summary(), "after": after,
                           **deltas(before, after, target)}
    return {"before": before, "masked": results}


def deltas(before: dict[str, dict], after: dict[str, dict], target: str) -> dict[str, Any]:
    """Per-label changes and the paper's summary rows: Δ Target and Δ Others (mean over the other labels)."""
    out: dict[str, Any] = {}
    for metric in ("loss", "accuracy"):
        per_label = {label: after[label][metric] - before[label][metric]
                     for label in before if metric in before[label] and metric in after.get(label, {})}
        if not per_label:
            continue
        others = [v for label, v in per_label.items() if label != target and not math.isnan(v)]
        suffix = "" if metric == "loss" else "_accuracy"
        out[f"delta{suffix}"] = per_label
        out[f"delta_target{suffix}"] = per_label.get(target, float("nan"))
        out[f"delta_others{suffix}"] = float(np.mean(others)) if others else float("nan")
    if "delta_target" in out:
        out["target_vs_others"] = target_vs_others(out["delta_target"], out["delta_others"])
    return out


def target_vs_others(delta_target: float, delta_others: float) -> float:
    """Δ target / Δ others: inf when only the target got worse, nan when the target did not."""
    if math.isnan(delta_target) or math.isnan(delta_others) or delta_target <= 0:
        return float("nan")
    return delta_target / delta_others if delta_others > 1e-9 else float("inf")


def unlearn(run: str | os.PathLike, data_dir: str | os.PathLike, atlas: str | os.PathLike, out: str | os.PathLike,
            targets: list[str] | None = None, ratio: float = 2.0, min_mass: float = 0.0,
            max_batches: int | None = 8, batch_size: int = 8, seq_len: int | None = None,
            mc_items: int = 40, baseline_run: str | os.PathLike | None = None,
            baseline_atlas: str | os.PathLike | None = None, device: str | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Run the unlearning protocol (targets None = every label) and write the report directory `out`."""
    from monet.checkpoint import load_checkpoint, resolve_checkpoint
    from monet.data import TokenDataset, load_tokenizer
    from monet.evaluate import _seq_len_of

    if (baseline_run is None) != (baseline_atlas is None):
        raise MonetError("--baseline and --baseline-atlas go together (the dense model and its atlas)")
    checkpoint = resolve_checkpoint(run)
    model, _ = load_checkpoint(checkpoint, device=device or "cpu", load_tokenizer=False)
    if getattr(model.config, "mlp_type", "monet") != "monet":
        raise MonetError(f"{run} is a {model.config.mlp_type} model; pass a Monet run (dense goes in --baseline)")
    dataset = TokenDataset(data_dir, split="validation")
    stats = open_atlas(atlas, model)
    labels, means = atlas_label_means(stats)
    if targets is None:
        targets = [label for label in labels if label in dataset.labels]
    for target in targets:
        if target not in labels:
            raise MonetError(f"unknown label {target!r}; the atlas has tokens of: {', '.join(labels)}")
        if target not in dataset.labels:
            raise MonetError(f"label {target!r} is not in {data_dir}; it has: {', '.join(dataset.labels)}")
    seq_len = seq_len or _seq_len_of(checkpoint, 256)
    sets, skipped = label_window_sets(dataset, seq_len)
    tokenizer = load_tokenizer(data_dir)
    items = ({label: headword_items(dataset, label, mc_items) for label in sets}
             if mc_items > 0 and has_multiple_choice(dataset) else None)
    single = len(targets) == 1
    monet_result = run_protocol(model, means, labels, targets, sets, batch_size, max_batches, ratio, min_mass,
                                items, tokenizer, progress, allow_empty=not single)
    report: dict[str, Any] = {
        "run": str(checkpoint), "data": str(data_dir), "atlas": str(atlas), "split": "validation",
        "seq_len": seq_len, "max_batches": max_batches, "batch_size": batch_size, "ratio": ratio,
        "min_mass": min_mass, "labels": list(sets), "skipped_labels": skipped, "targets": targets,
        "metric": "validation loss (nats/token); delta = masked - unmasked (a rise is knowledge lost)",
        "monet": monet_result, "summary": summary_rows(monet_result),
    }
    if baseline_run is not None:
        dense, _ = load_checkpoint(resolve_checkpoint(baseline_run), device=device or "cpu", load_tokenizer=False)
        if getattr(dense.config, "mlp_type", "monet") != "dense":
            raise MonetError(f"--baseline {baseline_run} is not a dense model (mlp_type={dense.config.mlp_type})")
        dense_labels, dense_means = atlas_label_means(open_atlas(baseline_atlas, dense))
        report["dense"] = run_protocol(dense, dense_means, dense_labels, targets, sets, batch_size, max_batches,
                                       ratio, min_mass, items, tokenizer, progress, allow_empty=True)
        report["dense_run"], report["dense_atlas"] = str(baseline_run), str(baseline_atlas)
        report["dense_summary"] = summary_rows(report["dense"])
    write_report(report, out)
    return report


def summary_rows(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per masked label: Δ target, Δ others, their ratio, masking ratio (what the tables print)."""
    return {target: {"delta_target": entry.get("delta_target", float("nan")),
                     "delta_others": entry.get("delta_others", float("nan")),
                     "target_vs_others": entry.get("target_vs_others", float("nan")),
                     "masking_ratio": entry["selection"]["masking_ratio"],
                     "selected": entry["selection"]["selected"]}
            for target, entry in result["masked"].items()}


# ----------------------------------------------------------------------------------------------------------
# Report files


def metric_matrix(result: dict[str, Any], metric: str = "loss") -> tuple[list[str], list[str], list[list[float]]]:
    """Rows: evaluated labels + Δ Target + Δ Others; columns: None (unmasked) + masked labels."""
    evaluated = list(result["before"])
    masked_labels = list(result["masked"])
    rows = []
    for label in evaluated:
        row = [result["before"][label].get(metric, float("nan"))]
        row += [result["masked"][t]["after"][label].get(metric, float("nan")) for t in masked_labels]
        rows.append(row)
    suffix = "" if metric == "loss" else "_accuracy"
    rows.append([float("nan")] + [result["masked"][t].get(f"delta_target{suffix}", float("nan"))
                                  for t in masked_labels])
    rows.append([float("nan")] + [result["masked"][t].get(f"delta_others{suffix}", float("nan"))
                                  for t in masked_labels])
    return evaluated + ["Δ Target", "Δ Others"], ["None", *masked_labels], rows


def matrix_csv(row_names: list[str], columns: list[str], rows: list[list[float]]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["evaluated \\ masked", *columns])
    for name, row in zip(row_names, rows, strict=True):
        writer.writerow([name, *("" if math.isnan(v) else f"{v:.4f}" for v in row)])
    return buffer.getvalue()


def delta_matrix(result: dict[str, Any], metric: str = "loss") -> tuple[list[str], list[str], np.ndarray]:
    """[evaluated, masked] change of the metric (masked - unmasked)."""
    evaluated, masked_labels = list(result["before"]), list(result["masked"])
    values = np.array([[result["masked"][t]["after"][label].get(metric, np.nan)
                        - result["before"][label].get(metric, np.nan) for t in masked_labels]
                       for label in evaluated], dtype=np.float64)
    return evaluated, masked_labels, values


def plot_heatmap(report: dict[str, Any], path: Path) -> None:
    """Fig. 3-style heatmap(s) of the loss change: rows evaluated label, columns masked label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("Monet", report["monet"])] + ([("Dense LLaMA (neurons)", report["dense"])] if "dense" in report else [])
    mats = [delta_matrix(result) for _, result in panels]
    vmax = max(float(np.nanmax(np.abs(m[2]))) if np.isfinite(m[2]).any() else 1.0 for m in mats) or 1.0
    size = max(len(mats[0][0]), 3)
    fig, axes = plt.subplots(1, len(panels), figsize=(1.0 + 0.75 * size * len(panels), 0.7 * size + 1.5),
                             squeeze=False)
    for ax, (title, _), (evaluated, masked_labels, values) in zip(axes[0], panels, mats, strict=True):
        image = ax.imshow(values, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")   # red: loss rose
        ax.set_xticks(range(len(masked_labels)), masked_labels, rotation=45, ha="right")
        ax.set_yticks(range(len(evaluated)), evaluated)
        ax.set_xlabel("experts masked for")
        ax.set_ylabel("evaluated on")
        ax.set_title(f"{title}: Δ validation loss")
        for r in range(values.shape[0]):
            for c in range(values.shape[1]):
                if np.isfinite(values[r, c]):
                    ax.text(c, r, f"{values[r, c]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(values[r, c]) > 0.6 * vmax else "black")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_report(report: dict[str, Any], out: str | os.PathLike) -> Path:
    """report.json, loss_matrix.csv (+ accuracy_matrix.csv, dense_loss_matrix.csv), heatmap.png; atomically
    (everything goes to OUT.tmp-*, then replaces OUT)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        files = {"loss_matrix.csv": matrix_csv(*metric_matrix(report["monet"], "loss"))}
        if any("accuracy" in v for v in report["monet"]["before"].values()):
            files["accuracy_matrix.csv"] = matrix_csv(*metric_matrix(report["monet"], "accuracy"))
        if "dense" in report:
            files["dense_loss_matrix.csv"] = matrix_csv(*metric_matrix(report["dense"], "loss"))
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        plot_heatmap(report, tmp / "heatmap.png")
        report = {**report, "files": sorted([*files, "heatmap.png", REPORT_FILE])}
        (tmp / REPORT_FILE).write_text(json.dumps(_jsonable(report), indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def format_summary(report: dict[str, Any]) -> str:
    """A plain-text table of Δ Target / Δ Others per masked label (Monet, and dense when present)."""
    dense = report.get("dense_summary", {})
    header = f"{'masked':<12} {'experts':>8} {'ratio%':>7} {'Δ target':>9} {'Δ others':>9} {'x':>7}"
    if dense:
        header += f"  | dense: {'neurons':>8} {'Δ target':>9} {'Δ others':>9}"
    lines = [header]
    for target, row in report["summary"].items():
        line = (f"{target:<12} {row['selected']:>8} {100 * row['masking_ratio']:>7.2f} {_num(row['delta_target'])} "
                f"{_num(row['delta_others'])} {_num(row['target_vs_others'], 7, 1)}")
        if target in dense:
            d = dense[target]
            line += f"  |        {d['selected']:>8} {_num(d['delta_target'])} {_num(d['delta_others'])}"
        lines.append(line)
    return "\n".join(lines)


def _num(value: float | None, width: int = 9, digits: int = 3) -> str:
    """Fixed-width number; '-' for a missing value (JSON null / nan)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'-':>{width}}"
    return f"{value:>{width}.{digits}f}"


# ----------------------------------------------------------------------------------------------------------
# Command line


def run_unlearn(args: argparse.Namespace) -> int:
    targets = None if args.all_labels else [args.target]
    report = unlearn(args.run, args.data, args.atlas, args.out, targets=targets, ratio=args.ratio,
                     min_mass=args.min_mass, max_batches=args.max_batches, batch_size=args.batch_size,
                     seq_len=args.seq_len, mc_items=args.mc_items, baseline_run=args.baseline,
                     baseline_atlas=args.baseline_atlas, device=args.device, progress=not args.quiet)
    print(format_summary(report))
    print(f"report: {Path(args.out) / REPORT_FILE}  heatmap: {Path(args.out) / 'heatmap.png'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "unlearn",
        help="mask the experts specialised in a label and measure the loss on every label",
        description=(
            "Knowledge unlearning (paper §5): experts whose routing mass on a label is at least --ratio times "
            "their mass on any other label (from an atlas) are deleted, and the validation loss of every label "
            "is measured before and after. Writes REPORT/report.json, loss_matrix.csv and heatmap.png."
        ),
        epilog="Example: monet unlearn runs/code --data data/code --atlas atlas/code --all-labels --out reports/u",
    )
    parser.add_argument("run", metavar="RUN", help="Monet run directory (newest checkpoint) or checkpoint directory")
    parser.add_argument("--data", required=True, help="dataset directory (its validation split is evaluated)")
    parser.add_argument("--atlas", required=True, help="atlas of this model (`monet atlas RUN --data DIR --out A`)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--target", metavar="LABEL", help="mask the experts of this label")
    which.add_argument("--all-labels", action="store_true", help="mask each label's experts in turn")
    parser.add_argument("--out", required=True, metavar="REPORT", help="report directory to write")
    parser.add_argument("--ratio", type=float, default=2.0, help="skewness: target mass >= RATIO x next label")
    parser.add_argument("--min-mass", type=float, default=0.0,
                        help="minimum mean score per token on the target label for an expert to be judged")
    parser.add_argument("--max-batches", type=int, default=8, help="evaluation batches per label (evenly spaced)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default: the training seq_len)")
    parser.add_argument("--mc-items", type=int, default=40,
                        help="multiple-choice items per label where the corpus has them (domains); 0 = none")
    parser.add_argument("--baseline", metavar="DENSE_RUN", help="also run the protocol on this dense model's neurons")
    parser.add_argument("--baseline-atlas", metavar="ATLAS", help="the dense model's atlas (neuron label mass)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run_unlearn)


__all__ = [
    "atlas_label_means",
    "deltas",
    "evaluate_labels",
    "headword_items",
    "masked",
    "multiple_choice_accuracy",
    "neuron_masks",
    "register",
    "run_protocol",
    "select_for_label",
    "unlearn",
    "write_report",
]

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

import csv
import io
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from monet.checkpoint import (
    check_data_fits,
    load_checkpoint,
    resolve_checkpoint,
    tokenizer_hash,
    trained_seq_len,
)
from monet.data import TokenDataset, load_tokenizer
from monet.edits import masked
from monet.errors import MonetError
from monet.evaluate import evaluate_windows, label_window_sets
from monet.interp.criteria import Selection, label_means, select_skewed
from monet.interp.query import Atlas
from monet.io import output_directory, write_json
from monet.runtime import resolve_device
from monet.settings import UnlearnSettings

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
            means.append(label_means(atlas.label_mass(group)[1]))
    return [atlas.labels[i] for i in seen], [m[seen] for m in means]


def open_atlas(path: str | Path, model: nn.Module, data_dir: str | Path | None = None) -> Atlas:
    """The atlas at `path`, checked to belong to `model` (and to have been built on data tokenized like
    `data_dir`'s)."""
    atlas = Atlas(path, model=model)
    built_on = atlas.manifest.get("data", {}).get("tokenizer_sha256")
    if data_dir is not None and built_on and built_on != tokenizer_hash(data_dir):
        raise MonetError(f"atlas {path} was built on data with another tokenizer than {data_dir}; build the atlas on "
                         "this data (or pass the data it was built on)")
    return atlas


def select_for_label(means: list[np.ndarray], labels: list[str], target: str, ratio: float = 2.0,
                     min_mass: float = 0.0) -> Selection:
    """Units skewed towards `target` in every group (means are already per-token, so not re-normalised)."""
    if target not in labels:
        raise MonetError(f"unknown label {target!r}; the atlas has tokens of: {', '.join(labels)} (a label of the "
                         "data that the atlas never saw needs an atlas built on more --max-tokens)")
    return select_skewed(means, labels.index(target), ratio=ratio, min_mass=min_mass, normalize=False)


# ----------------------------------------------------------------------------------------------------------
# Metrics


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
                 sets: dict[str, Any], *, batch_size: int, max_batches: int | None, ratio: float, min_mass: float,
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


def unlearn(settings: UnlearnSettings) -> dict[str, Any]:
    """Run the unlearning protocol (every label unless `settings.target`) and write the report directory."""
    checkpoint = resolve_checkpoint(settings.run)
    check_data_fits(checkpoint, settings.data)
    device = resolve_device(settings.device)
    model, _ = load_checkpoint(checkpoint, device=device, load_tokenizer=False, verify=False)
    if getattr(model.config, "mlp_type", "monet") != "monet":
        raise MonetError(f"{settings.run} is a {model.config.mlp_type} model; pass a Monet run "
                         "(a dense model goes in --baseline)")
    dataset = TokenDataset(settings.data, split="validation")
    labels, means = atlas_label_means(open_atlas(settings.atlas, model, settings.data))
    targets = [settings.target] if settings.target else [label for label in labels if label in dataset.labels]
    for target in targets:
        if target not in labels:
            raise MonetError(f"unknown label {target!r}; the atlas has tokens of: {', '.join(labels)}")
        if target not in dataset.labels:
            raise MonetError(f"label {target!r} is not in {settings.data}; it has: {', '.join(dataset.labels)}")
    seq_len = settings.seq_len or trained_seq_len(checkpoint, model)
    sets, skipped = label_window_sets(dataset, seq_len)
    tokenizer = load_tokenizer(settings.data)
    items = ({label: headword_items(dataset, label, settings.mc_items) for label in sets}
             if settings.mc_items > 0 and has_multiple_choice(dataset) else None)
    progress = not settings.quiet
    protocol = dict(batch_size=settings.batch_size, max_batches=settings.max_batches, ratio=settings.ratio,
                    min_mass=settings.min_mass, mc_items=items, tokenizer=tokenizer, progress=progress)
    monet_result = run_protocol(model, means, labels, targets, sets, allow_empty=settings.target is None, **protocol)
    report: dict[str, Any] = {
        "run": str(checkpoint), "data": str(settings.data), "atlas": str(settings.atlas), "split": "validation",
        "seq_len": seq_len, "max_batches": settings.max_batches, "batch_size": settings.batch_size,
        "ratio": settings.ratio, "min_mass": settings.min_mass, "labels": list(sets), "skipped_labels": skipped,
        "targets": targets,
        "metric": "validation loss (nats/token); delta = masked - unmasked (a rise is knowledge lost)",
        "monet": monet_result, "summary": summary_rows(monet_result),
    }
    if settings.baseline is not None:
        dense, _ = load_checkpoint(settings.baseline, device=device, load_tokenizer=False)
        if getattr(dense.config, "mlp_type", "monet") != "dense":
            raise MonetError(f"--baseline {settings.baseline} is not a dense model (mlp_type={dense.config.mlp_type})")
        dense_labels, dense_means = atlas_label_means(open_atlas(settings.baseline_atlas, dense))
        report["dense"] = run_protocol(dense, dense_means, dense_labels, targets, sets, allow_empty=True, **protocol)
        report["dense_run"], report["dense_atlas"] = str(settings.baseline), str(settings.baseline_atlas)
        report["dense_summary"] = summary_rows(report["dense"])
    write_report(report, settings.out, force=settings.force)
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
    import matplotlib.pyplot as plt  # imported late: matplotlib is slow to import and only plots need it

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


def write_report(report: dict[str, Any], out: str | Path, force: bool = False) -> Path:
    """report.json, loss_matrix.csv (+ accuracy_matrix.csv, dense_loss_matrix.csv), heatmap.png, written
    atomically into `out` (which must be free or an earlier unlearning report, unless `force`)."""
    with output_directory(out, "unlearn", force, "an unlearning report") as tmp:
        files = {"loss_matrix.csv": matrix_csv(*metric_matrix(report["monet"], "loss"))}
        if any("accuracy" in v for v in report["monet"]["before"].values()):
            files["accuracy_matrix.csv"] = matrix_csv(*metric_matrix(report["monet"], "accuracy"))
        if "dense" in report:
            files["dense_loss_matrix.csv"] = matrix_csv(*metric_matrix(report["dense"], "loss"))
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        plot_heatmap(report, tmp / "heatmap.png")
        write_json(tmp / REPORT_FILE, {**report, "files": sorted([*files, "heatmap.png", REPORT_FILE])})
    return Path(out)


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


__all__ = [
    "atlas_label_means",
    "deltas",
    "evaluate_labels",
    "headword_items",
    "multiple_choice_accuracy",
    "run_protocol",
    "select_for_label",
    "unlearn",
    "write_report",
]

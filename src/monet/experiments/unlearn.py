"""`monet unlearn`: delete the experts specialised in a label and measure what is lost where (paper §5).

For each target label, the experts whose routing mass is skewed towards it (paper D.1/D.2; statistics from
an atlas) are masked and every label of the validation split is evaluated before and after on the same
windows (a paired Δ, nats/token), with bootstrap CIs, a random-mask control, a selection sweep and, with
`--baseline`, a dense LLaMA's neurons through the same protocol. The protocol and the files of REPORT/
(`report.json` fields, CSV matrices, `heatmap.png`, `forget_retain.png`) are documented in docs/editing.md.

    monet unlearn RUN --data DIR --atlas ATLAS --out REPORT [--baseline D --baseline-atlas DA]
"""

from __future__ import annotations

import csv
import io
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from monet.checkpoint import check_data_fits, load_checkpoint, resolve_checkpoint, tokenizer_hash, trained_seq_len
from monet.data import TokenDataset, load_tokenizer
from monet.edits import masked
from monet.errors import MonetError
from monet.evaluate import label_window_sets, window_indices, window_losses
from monet.experiments.protocol_stats import (
    delta_ci,
    forget_retain_curve,
    others_at_target,
    random_masks,
    random_p95,
    verdict,
)
from monet.interp.criteria import Selection, select_skewed, select_top
from monet.interp.query import Atlas
from monet.io import output_directory, write_json
from monet.runtime import resolve_device
from monet.settings import UnlearnSettings

REPORT_FILE = "report.json"
MIN_DELTA = 0.10      # the bar (issue 9): Δ target of at least 0.10 nats ...
SELECTIVITY = 5.0     # ... and at least 5 x max(mean Δ others, 0)


# ----------------------------------------------------------------------------------------------------------
# Statistics and selection


def atlas_label_means(atlas: Atlas) -> tuple[list[str], list[np.ndarray]]:
    """(labels, per group [num_labels, units]: mean score per token of each label) from an `Atlas`.

    Labels the atlas saw no token of are dropped (nothing can be said about them, and an all-zero row
    would make every other label look infinitely skewed against it).
    """
    seen = np.flatnonzero(atlas.label_tokens > 0)
    if len(seen) < 2:
        raise MonetError(f"atlas {atlas.path} covers {len(seen)} label(s) with tokens; the skewness "
                         "criterion needs at least 2: rebuild it with more --max-tokens")
    return [atlas.labels[i] for i in seen], [atlas.label_probability(group)[seen] for group in atlas.groups]


def evaluation_leak(atlas: Atlas, data_dir: str | Path, name: str = "atlas") -> str | None:
    """A warning when the atlas was built on the validation split of `data_dir`, the text `unlearn` evaluates:
    experts are then selected on the very windows they are judged on, which inflates Δ target."""
    built_on = atlas.manifest.get("data", {})
    if built_on.get("split") != "validation" or not built_on.get("dir"):
        return None
    if Path(built_on["dir"]).resolve() != Path(data_dir).resolve():
        return None
    return (f"the {name} {atlas.path} was built on the validation split of {data_dir}, the split evaluated here: "
            "units are selected on the text they are judged on; rebuild it with `monet atlas build --split train`")


def open_atlas(path: str | Path, model: nn.Module, data_dir: str | Path) -> Atlas:
    """The atlas at `path`, checked to belong to `model` and to have been built on data tokenized like
    `data_dir`'s."""
    atlas = Atlas(path, model=model)
    built_on = atlas.manifest.get("data", {}).get("tokenizer_sha256")
    if built_on and built_on != tokenizer_hash(data_dir):
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
    metas = [dataset.document_meta(i) for i in dataset.documents_with_label(label).tolist()]
    entries = [(meta["headword"], meta["definition"]) for meta in metas
               if meta.get("headword") and meta.get("definition")]
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


@torch.no_grad()
def choice_scores(model: nn.Module, tokenizer: Any, prefixes: list[str], texts: list[str], batch_size: int = 16,
                  bos_id: int | None = None) -> list[float]:
    """log p(text[len(prefix):] | <s> prefix) for each (prefix, full text) pair, summed over tokens."""
    device = next(model.parameters()).device
    lead = [bos_id] if bos_id is not None else []
    sequences, starts = [], []
    for prefix, text in zip(prefixes, texts, strict=True):
        head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        start = len(head) if full[: len(head)] == head and len(full) > len(head) else 0
        sequences.append(lead + full)
        starts.append(start + len(lead))
    scores = []
    for begin in range(0, len(sequences), batch_size):
        chunk = sequences[begin : begin + batch_size]
        ids = pad_sequence([torch.tensor(seq, dtype=torch.long) for seq in chunk], batch_first=True)
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
    prefixes = [choice for item in items for choice in item["choices"]]
    texts = [f"{choice}: {item['definition']}" for item in items for choice in item["choices"]]
    scores = choice_scores(model, tokenizer, prefixes, texts, batch_size, tokenizer.bos_token_id)
    per_item = np.split(np.asarray(scores), np.cumsum([len(item["choices"]) for item in items])[:-1])
    correct = sum(int(np.argmax(row)) == item["gold"] for row, item in zip(per_item, items, strict=True))
    return correct / len(items)


# ----------------------------------------------------------------------------------------------------------
# The evaluation plan: which validation windows each measurement reads


def spaced(count: int, wanted: int) -> np.ndarray:
    """`wanted` positions evenly spaced over range(count) (all of them when wanted >= count)."""
    return np.asarray(window_indices(count, 1, wanted), dtype=np.int64)


@dataclass
class EvalPlan:
    """Validation windows per label. The unmasked loss is measured once on `windows[label]`; every masked
    measurement reads a subset of them (`positions` into that array), so each Δ is paired: the same windows
    before and after the edit."""

    sets: dict[str, Any]                  # label -> PackedSequences of its validation split
    windows: dict[str, np.ndarray]        # label -> window ids of the unmasked measurement
    seq_len: int
    batch_size: int

    @classmethod
    def build(cls, sets: dict[str, Any], seq_len: int, eval_tokens: int, batch_size: int) -> EvalPlan:
        wanted = -(-eval_tokens // seq_len)
        return cls(sets, {label: spaced(len(packed), wanted) for label, packed in sets.items()}, seq_len, batch_size)

    def positions(self, label: str, tokens: int | None) -> np.ndarray:
        """Positions (into `windows[label]`) of `tokens` tokens' worth of windows, evenly spaced; all for None."""
        count = len(self.windows[label])
        return np.arange(count) if tokens is None else spaced(count, -(-tokens // self.seq_len))

    def tokens(self, positions: np.ndarray) -> int:
        return len(positions) * self.seq_len

    def measure(self, model: nn.Module, picks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per-window mean loss of the picked windows of each label (model as it is now, edits included)."""
        return {label: window_losses(model, self.sets[label], self.batch_size,
                                     indices=self.windows[label][positions].tolist()).numpy()
                for label, positions in picks.items()}


@dataclass
class Measure:
    """How much of the validation data one kind of measurement reads (tokens per label; None: all)."""

    target: int | None
    others: int | None


# ----------------------------------------------------------------------------------------------------------
# One edit, measured


def edit_effect(model: nn.Module, plan: EvalPlan, before: dict[str, np.ndarray], selection: Selection, target: str,
                measure: Measure, seed: int = 0) -> dict[str, Any]:
    """Mask `selection`, evaluate the target and the other labels on the windows `measure` asks for, and
    return each label's Δ with a paired bootstrap 95 % CI, Δ target and Δ others (mean over the other
    labels, each weighted equally). `after_target` (per-window losses) stays out of the report."""
    picks = {label: plan.positions(label, measure.target if label == target else measure.others)
             for label in plan.sets}
    prior = {label: before[label][pos] for label, pos in picks.items()}
    if selection.total:
        with masked(model, selection):
            after = plan.measure(model, picks)
    else:
        after = prior
    per_label = {label: delta_ci(prior[label], after[label], seed=seed) for label in picks}
    others = [label for label in picks if label != target]
    if others:
        # Window weights that give every label the same total weight: Δ others is a mean over labels.
        weights = np.concatenate([np.full(len(after[label]), 1.0 / len(after[label])) for label in others])
        joint = delta_ci(np.concatenate([prior[label] for label in others]),
                         np.concatenate([after[label] for label in others]), tokens=weights, seed=seed)
    else:
        joint = {"delta": float("nan"), "ci95": [float("nan"), float("nan")]}
    return {
        "selection": selection.summary(),
        "masked_experts": selection.total,
        "masking_ratio": selection.masking_ratio,
        "delta": {label: d["delta"] for label, d in per_label.items()},
        "delta_ci95": {label: d["ci95"] for label, d in per_label.items()},
        "after": {label: {"loss": float(after[label].mean()), "before": float(prior[label].mean()),
                          "tokens": plan.tokens(picks[label])} for label in picks},
        "delta_target": per_label[target]["delta"],
        "delta_target_ci95": per_label[target]["ci95"],
        "after_target": after[target],
        "delta_others": joint["delta"],
        "delta_others_ci95": joint["ci95"],
        "target_vs_others": target_vs_others(per_label[target]["delta"], joint["delta"]),
    }


def random_control(model: nn.Module, plan: EvalPlan, before: dict[str, np.ndarray], selection: Selection,
                   selected_after: np.ndarray, seen: list[np.ndarray], target: str, count: int, tokens: int,
                   seed: int = 0) -> dict[str, Any]:
    """Δ target of `count` random masks with as many units per group as `selection`, drawn from the units
    seen in the atlas, each on the same `tokens` of the target's windows. Returns their deltas, 95th
    percentile (the bar the selection must clear) and the selection's own Δ on those windows
    (`selected_after`: its per-window losses on all the target's windows)."""
    positions = plan.positions(target, tokens)
    deltas = []
    for ids in random_masks(selection.counts(), seen, n=count, seed=seed):
        control = Selection(selection.units_per_group, selection.groups, ids, criterion="random (seen units)")
        with masked(model, control):
            after = plan.measure(model, {target: positions})[target]
        deltas.append(float((after - before[target][positions]).mean()))
    return {"deltas": deltas, "p95": random_p95(deltas), "tokens": plan.tokens(positions),
            "selection_delta": float((selected_after[positions] - before[target][positions]).mean())}


# ----------------------------------------------------------------------------------------------------------
# The experiment, for one model


@dataclass
class Protocol:
    """What the protocol measures, shared by Monet and the dense baseline."""

    operating: Measure                    # the reported operating point
    sweep: Measure                        # every other point of the forget-retain curve
    random_masks: int
    random_tokens: int
    batch_size: int
    seed: int = 0
    mc_items: dict[str, list[dict]] | None = None
    tokenizer: Any = None
    progress: bool = True


def label_accuracies(model: nn.Module, protocol: Protocol) -> dict[str, float]:
    """Multiple-choice accuracy of each label that has items (the model as it is now, edits included)."""
    return {label: multiple_choice_accuracy(model, protocol.tokenizer, items, protocol.batch_size)
            for label, items in (protocol.mc_items or {}).items() if items}


def run_protocol(model: nn.Module, plan: EvalPlan, targets: list[str], operating: Any, sweep: Any,
                 seen: list[np.ndarray], protocol: Protocol, allow_empty: bool = False) -> dict[str, Any]:
    """Unmasked losses, then for each target: the operating-point selection (`operating(target)`) with its
    per-label Δ and CIs, the random control, and the sweep points (`sweep(target)`: [(parameter, Selection)])."""
    model.eval()
    before = plan.measure(model, {label: plan.positions(label, None) for label in plan.sets})
    result: dict[str, Any] = {"before": {label: {"loss": float(v.mean()), "tokens": plan.tokens(v)}
                                         for label, v in before.items()}, "masked": {}}
    accuracy_before = label_accuracies(model, protocol)
    for label, accuracy in accuracy_before.items():
        result["before"][label]["accuracy"] = accuracy
    for target in tqdm(targets, desc="unlearn", unit="label", disable=not protocol.progress):
        selection = operating(target)
        if selection.total == 0 and not allow_empty:
            raise MonetError(f"no unit is selected for {target!r} ({selection.criterion}): the selection is empty; "
                             "lower --ratio or build the atlas on more tokens")
        entry = edit_effect(model, plan, before, selection, target, protocol.operating, protocol.seed)
        after_target = entry.pop("after_target")
        if selection.total and accuracy_before:
            with masked(model, selection):
                accuracies = label_accuracies(model, protocol)
            for label, accuracy in accuracies.items():
                entry["after"][label]["accuracy"] = accuracy
            entry["delta_accuracy"] = {label: accuracies[label] - accuracy_before[label] for label in accuracies}
        if selection.total and protocol.random_masks:
            entry["random"] = random_control(model, plan, before, selection, after_target, seen, target,
                                             protocol.random_masks, protocol.random_tokens, protocol.seed)
        entry["sweep"] = []
        for parameter, point in sweep(target):
            if point.total:
                effect = edit_effect(model, plan, before, point, target, protocol.sweep, protocol.seed)
                entry["sweep"].append({"parameter": parameter, "criterion": point.criterion,
                                       **{k: effect[k] for k in SWEEP_FIELDS}})
        result["masked"][target] = entry
    return result


SWEEP_FIELDS = ("masked_experts", "masking_ratio", "delta_target", "delta_target_ci95", "delta_others",
                "delta_others_ci95")


def target_vs_others(delta_target: float, delta_others: float) -> float:
    """Δ target / Δ others: inf when only the target got worse, nan when the target did not."""
    if math.isnan(delta_target) or math.isnan(delta_others) or delta_target <= 0:
        return float("nan")
    return delta_target / delta_others if delta_others > 1e-9 else float("inf")


def seen_units(means: list[np.ndarray]) -> list[np.ndarray]:
    """Per group, the units the atlas saw active at least once (the random control's pool)."""
    return [np.flatnonzero(np.asarray(m).sum(axis=0) > 0) for m in means]


def curve_points(entry: dict[str, Any]) -> list[dict[str, float]]:
    """The forget-retain curve of one target: its sweep points and the operating point."""
    points = [*entry.get("sweep", []), *([entry] if entry["masked_experts"] else [])]
    return forget_retain_curve([{key: p[key] for key in ("delta_target", "delta_others", "masking_ratio")}
                                for p in points])


def summary_rows(result: dict[str, Any]) -> dict[str, dict]:
    """Per masked label, the fields the tables print and the issue's bar (`verdict`)."""
    rows = {}
    for target, entry in result["masked"].items():
        control = entry.get("random", {})
        row = {key: entry[key] for key in ("delta_target", "delta_target_ci95", "delta_others", "delta_others_ci95")}
        row |= {"random_delta_target_p95": control.get("p95"),
                "random_selection_delta": control.get("selection_delta")}
        row |= {key: entry[key] for key in ("masked_experts", "masking_ratio", "target_vs_others")}
        if "delta_accuracy" in entry:
            row["delta_accuracy_target"] = entry["delta_accuracy"].get(target)
        if control.get("p95") is not None and entry["masked_experts"]:
            row.update(verdict(entry["delta_target"], entry["delta_others"], control["p95"], MIN_DELTA, SELECTIVITY))
        else:
            row["passed"] = False
        rows[target] = row
    return rows


def equal_target_comparison(monet: dict[str, Any], dense: dict[str, Any]) -> dict[str, dict]:
    """Per label: the dense baseline's Δ others at Monet's operating-point Δ target, read off the dense
    forget-retain curve (None when the dense curve never forgets that much or starts above it)."""
    rows = {}
    for target, entry in monet["masked"].items():
        if target not in dense["masked"] or not entry["masked_experts"]:
            continue
        curve = curve_points(dense["masked"][target])
        rows[target] = {"delta_target": entry["delta_target"], "monet_delta_others": entry["delta_others"],
                        "dense_delta_others": others_at_target(curve, entry["delta_target"]),
                        "dense_max_delta_target": max((p["delta_target"] for p in curve), default=None)}
    return rows


# ----------------------------------------------------------------------------------------------------------
# The command


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
    atlas = open_atlas(settings.atlas, model, settings.data)
    warnings = [evaluation_leak(atlas, settings.data)]
    labels, means = atlas_label_means(atlas)
    targets = [settings.target] if settings.target else [label for label in labels if label in dataset.labels]
    for target in targets:
        if target not in labels:
            raise MonetError(f"unknown label {target!r}; the atlas has tokens of: {', '.join(labels)}")
        if target not in dataset.labels:
            raise MonetError(f"label {target!r} is not in {settings.data}; it has: {', '.join(dataset.labels)}")
    if settings.baseline is not None:   # checked before the long Monet run
        dense_model, _ = load_checkpoint(settings.baseline, device=device, load_tokenizer=False)
        if getattr(dense_model.config, "mlp_type", "monet") != "dense":
            raise MonetError(f"--baseline {settings.baseline} is not a dense model "
                             f"(mlp_type={dense_model.config.mlp_type})")
        dense_atlas = open_atlas(settings.baseline_atlas, dense_model, settings.data)
        warnings.append(evaluation_leak(dense_atlas, settings.data, "dense atlas"))
        dense_labels, dense_means = atlas_label_means(dense_atlas)
        missing = [t for t in targets if t not in dense_labels]
        if missing:
            raise MonetError(f"the dense atlas {settings.baseline_atlas} has no tokens of {', '.join(missing)}; "
                             "rebuild it on more --max-tokens")
    warnings = [warning for warning in warnings if warning]
    for warning in warnings:   # before the long run, so that it can be stopped and the atlas rebuilt
        print(f"monet unlearn: warning: {warning}", file=sys.stderr, flush=True)
    seq_len = settings.seq_len or trained_seq_len(checkpoint, model)
    sets, skipped = label_window_sets(dataset, seq_len)
    plan = EvalPlan.build(sets, seq_len, settings.eval_tokens, settings.batch_size)
    tokenizer = load_tokenizer(settings.data)
    # A multiple-choice task where documents carry a headword and a definition (the `domains` corpus).
    has_items = settings.mc_items > 0 and dataset.num_documents > 0 and dataset.document_meta(0).get("headword")
    items = {label: headword_items(dataset, label, settings.mc_items) for label in sets} if has_items else None
    others_tokens = settings.others_tokens or settings.eval_tokens
    protocol = Protocol(operating=Measure(settings.eval_tokens, others_tokens),
                        sweep=Measure(settings.sweep_tokens, max(settings.sweep_tokens // 4, seq_len)),
                        random_masks=settings.random_masks, random_tokens=settings.random_tokens,
                        batch_size=settings.batch_size, seed=settings.seed, mc_items=items, tokenizer=tokenizer,
                        progress=not settings.quiet)
    monet_result = run_protocol(
        model, plan, targets,
        operating=lambda t: select_for_label(means, labels, t, settings.ratio, settings.min_mass),
        sweep=lambda t: [(r, select_for_label(means, labels, t, r, settings.min_mass)) for r in settings.sweep],
        seen=seen_units(means), protocol=protocol, allow_empty=settings.target is None)
    report: dict[str, Any] = {
        "run": str(checkpoint), "data": str(settings.data), "atlas": str(settings.atlas), "split": "validation",
        "seq_len": seq_len, "batch_size": settings.batch_size, "eval_tokens": settings.eval_tokens,
        "others_tokens": others_tokens, "random_masks": settings.random_masks,
        "random_tokens": settings.random_tokens, "sweep": list(settings.sweep), "sweep_tokens": settings.sweep_tokens,
        "ratio": settings.ratio, "min_mass": settings.min_mass, "seed": settings.seed, "labels": list(sets),
        "skipped_labels": skipped, "targets": targets,
        "metric": "validation loss (nats/token); delta = masked - unmasked on the same windows (a rise is "
                  "knowledge lost); 95 % CIs from a paired bootstrap over windows",
        "bar": {"min_delta": MIN_DELTA, "selectivity": SELECTIVITY,
                "rule": "delta_target >= min_delta, >= selectivity x max(delta_others, 0), > random p95"},
        "monet": monet_result, "summary": summary_rows(monet_result), "warnings": warnings,
    }
    if settings.baseline is not None:
        def dense_top(target: str, share: float) -> Selection:
            units = max(1, round(share * dense_means[0].shape[1]))
            return select_top(dense_means, dense_labels.index(target), units, settings.min_mass, normalize=False)

        def dense_operating(target: str) -> Selection:
            # Equal budget: the same share of units as Monet masked for this label (the paper's skewness
            # criterion selects almost no dense neuron, so the baseline ranks neurons by specificity).
            return dense_top(target, report["summary"].get(target, {}).get("masking_ratio")
                             or settings.dense_fractions[0])

        dense_result = run_protocol(dense_model, plan, targets, dense_operating,
                                    lambda t: [(f, dense_top(t, f)) for f in settings.dense_fractions],
                                    seen_units(dense_means), protocol, allow_empty=True)
        report["dense_protocol"] = dense_result
        report["dense"] = summary_rows(dense_result)
        report["dense_run"], report["dense_atlas"] = str(settings.baseline), str(settings.baseline_atlas)
        report["dense_selection"] = ("top neurons by specificity, as many (share of all MLP neurons) as Monet "
                                     "masked experts for the label; sweep over dense_fractions")
        report["dense_fractions"] = list(settings.dense_fractions)
        report["equal_target"] = equal_target_comparison(monet_result, dense_result)
    write_report(report, settings.out, force=settings.force)
    return report


# ----------------------------------------------------------------------------------------------------------
# Report files


def delta_matrix(result: dict[str, Any], key: str = "delta") -> tuple[list[str], list[str], np.ndarray]:
    """[evaluated, masked] change of loss (`delta`) or accuracy (`delta_accuracy`); nan where not measured."""
    evaluated, masked_labels = list(result["before"]), list(result["masked"])
    values = np.array([[result["masked"][t].get(key, {}).get(label, np.nan) for t in masked_labels]
                       for label in evaluated], dtype=np.float64)
    return evaluated, masked_labels, values


def matrix_csv(result: dict[str, Any], metric: str = "loss") -> str:
    """Rows: evaluated labels, then Δ Target, Δ Others and the random control's p95; columns: the unmasked
    value, then the change when each label's units are masked."""
    evaluated, masked_labels, values = delta_matrix(result, "delta" if metric == "loss" else "delta_accuracy")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["evaluated \\ masked", f"unmasked {metric}", *masked_labels])

    def cell(value: Any) -> str:
        return "" if _missing(value) else f"{value:.4f}"

    for label, row in zip(evaluated, values, strict=True):
        writer.writerow([label, cell(result["before"][label].get(metric)), *map(cell, row)])
    if metric == "loss":
        for name, field_name in (("Δ Target", "delta_target"), ("Δ Others", "delta_others")):
            writer.writerow([name, "", *(cell(result["masked"][t][field_name]) for t in masked_labels)])
        writer.writerow(["random p95", "", *(cell(result["masked"][t].get("random", {}).get("p95"))
                                             for t in masked_labels)])
    return buffer.getvalue()


def _models(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, title, protocol result) of Monet and, when the report has one, the dense baseline."""
    models = [("Monet", "Monet (experts)", report["monet"])]
    if "dense_protocol" in report:
        models.append(("dense", "Dense LLaMA (neurons, equal share)", report["dense_protocol"]))
    return models


def plot_heatmap(report: dict[str, Any], path: Path) -> None:
    """Fig. 3-style heatmap(s) of the loss change: rows evaluated label, columns masked label."""
    from matplotlib.figure import Figure  # imported late: matplotlib is slow to import and only plots need it

    models = _models(report)
    mats = [delta_matrix(result) for _, _, result in models]
    vmax = max(float(np.nanmax(np.abs(m[2]))) if np.isfinite(m[2]).any() else 1.0 for m in mats) or 1.0
    size = max(len(mats[0][0]), 3)
    fig = Figure(figsize=(1.0 + 0.8 * size * len(mats), 0.7 * size + 1.6))
    axes = fig.subplots(1, len(mats), squeeze=False)
    for ax, (_, title, _), (evaluated, masked_labels, values) in zip(axes[0], models, mats, strict=True):
        image = ax.imshow(values, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")   # red: loss rose
        ax.set_xticks(range(len(masked_labels)), masked_labels, rotation=45, ha="right")
        ax.set_yticks(range(len(evaluated)), evaluated)
        ax.set(xlabel="units masked for", ylabel="evaluated on", title=f"{title}: Δ validation loss")
        for (r, c), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(value) > 0.6 * vmax else "black")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_forget_retain(report: dict[str, Any], path: Path) -> None:
    """One panel per target: Δ target (y) against Δ others (x) along each model's selection sweep; the
    operating point is the large marker, the dotted line the random control's p95."""
    from matplotlib.figure import Figure

    targets = list(report["monet"]["masked"])
    cols = min(4, max(1, len(targets)))
    rows = -(-len(targets) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, target in zip(axes.flat, targets, strict=False):
        for (name, _, result), colour in zip(_models(report), ("tab:red", "tab:blue"), strict=False):
            entry = result["masked"][target]
            curve = curve_points(entry)
            if curve:
                ax.plot([p["delta_others"] for p in curve], [p["delta_target"] for p in curve], "o-", ms=3,
                        color=colour, label=name)
            if entry["masked_experts"]:
                ax.plot(entry["delta_others"], entry["delta_target"], "o", ms=8, color=colour, mfc="none")
        p95 = report["monet"]["masked"][target].get("random", {}).get("p95")
        if p95 is not None:
            ax.axhline(p95, color="tab:red", ls=":", lw=1)
        ax.axline((0, 0), slope=SELECTIVITY, color="grey", lw=0.6, ls="--")
        ax.axhline(0, color="black", lw=0.5)
        ax.axvline(0, color="black", lw=0.5)
        ax.set_title(target, fontsize=9)
        ax.set_xlabel("Δ others", fontsize=8)
        ax.set_ylabel("Δ target", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(targets):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"forget-retain (grey: Δ target = {SELECTIVITY:g} x Δ others; dotted: random p95)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(report: dict[str, Any], out: str | Path, force: bool = False) -> Path:
    """report.json, loss_matrix.csv (+ accuracy_matrix.csv, dense_loss_matrix.csv), heatmap.png and
    forget_retain.png, written atomically into `out` (free, or an earlier unlearning report, or `force`)."""
    with output_directory(out, "unlearn", force, "an unlearning report") as tmp:
        files = {"loss_matrix.csv": matrix_csv(report["monet"], "loss")}
        if any("accuracy" in v for v in report["monet"]["before"].values()):
            files["accuracy_matrix.csv"] = matrix_csv(report["monet"], "accuracy")
        if "dense_protocol" in report:
            files["dense_loss_matrix.csv"] = matrix_csv(report["dense_protocol"], "loss")
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        plot_heatmap(report, tmp / "heatmap.png")
        plot_forget_retain(report, tmp / "forget_retain.png")
        names = sorted([*files, "heatmap.png", "forget_retain.png", REPORT_FILE])
        write_json(tmp / REPORT_FILE, {**report, "files": names})
    return Path(out)


def format_summary(report: dict[str, Any]) -> str:
    """A plain-text table per masked label: Monet's Δ target [CI], Δ others, random p95 and the bar, then
    the dense baseline at its operating point and at Monet's Δ target."""
    dense, equal = report.get("dense", {}), report.get("equal_target", {})
    header = (f"{'masked':<12} {'experts':>7} {'%':>5} {'Δ target [95% CI]':>24} {'Δ others':>8} {'x':>6} "
              f"{'rand p95':>8} {'bar':>4}")
    if dense:
        header += f" | dense: {'neurons':>7} {'Δ target':>8} {'Δ others':>8} {'rand p95':>8} | {'@equal Δt':>9}"
    lines = [header]
    for target, row in report["summary"].items():
        ci = row["delta_target_ci95"]
        interval = f"{_num(row['delta_target'], 7)} [{_num(ci[0], 6)},{_num(ci[1], 6)}]"
        line = (f"{target:<12} {row['masked_experts']:>7} {100 * row['masking_ratio']:>5.2f} {interval:>24} "
                f"{_num(row['delta_others'], 8)} {_num(row['target_vs_others'], 6, 1)} "
                f"{_num(row['random_delta_target_p95'], 8)} {'pass' if row.get('passed') else 'FAIL':>4}")
        if target in dense:
            d, at_equal = dense[target], equal.get(target, {}).get("dense_delta_others")
            line += (f" |        {d['masked_experts']:>7} {_num(d['delta_target'], 8)} {_num(d['delta_others'], 8)} "
                     f"{_num(d['random_delta_target_p95'], 8)} | {_num(at_equal, 9)}")
        lines.append(line)
    lines += [f"warning: {warning}" for warning in report.get("warnings", [])]
    return "\n".join(lines)


def _num(value: float | None, width: int = 9, digits: int = 3) -> str:
    """Fixed-width number; '-' for a missing value (JSON null / nan)."""
    return f"{'-':>{width}}" if _missing(value) else f"{value:>{width}.{digits}f}"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


__all__ = ["EvalPlan", "atlas_label_means", "edit_effect", "format_summary", "headword_items",
           "multiple_choice_accuracy", "random_control", "run_protocol", "select_for_label", "summary_rows",
           "unlearn", "write_report"]

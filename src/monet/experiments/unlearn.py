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
import gzip
import hashlib
import io
import math
import platform
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from monet.checkpoint import check_data_fits, load_checkpoint, resolve_checkpoint, tokenizer_hash, trained_seq_len
from monet.data import TokenDataset, load_tokenizer
from monet.data.storage import read_manifest
from monet.errors import MonetError
from monet.evaluate import label_window_sets, window_indices, window_losses
from monet.experiments.benchmarks import HEATMAP as LM_EVAL_HEATMAP
from monet.experiments.benchmarks import plot_accuracy_heatmap, prepare_benchmark, unlearning_accuracy
from monet.experiments.dense_rules import (
    attribution_rises,
    class_mean_difference,
    mean_ablated,
    neuron_attributions,
    neuron_label_means,
    overall_means,
    top_by_score,
)
from monet.experiments.protocol_stats import (
    control_comparison,
    delta_ci,
    forget_retain_curve,
    interval_verdict,
    matched_masks,
    others_at_target,
    random_masks,
    random_p95,
    verdict,
)
from monet.interp.atlas import plan_windows
from monet.interp.criteria import Selection, select_skewed, select_top
from monet.interp.query import Atlas
from monet.interp.units import units_of
from monet.io import output_directory, write_json
from monet.model import causal_lm_loss
from monet.runtime import resolve_device
from monet.settings import UnlearnSettings

REPORT_FILE = "report.json"
WINDOWS_FILE = "windows.csv.gz"
MIN_DELTA = 0.10      # the bar (issue 9): Δ target of at least 0.10 nats ...
SELECTIVITY = 5.0     # ... and at least 5 x max(mean Δ others, 0)
BAR = {"min_delta": MIN_DELTA, "selectivity": SELECTIVITY,
       "rule": "passed (point estimates): delta_target >= min_delta, >= selectivity x max(delta_others, 0), "
               "> the control's p95 of delta_target",
       "grade": "robust: delta_target_ci95[0] >= min_delta and >= selectivity x max(delta_others_ci95[1], 0), "
                "and fewer than 5 % of the control masks forget as much at no more cost to the others "
                "(control p_value < 0.05); marginal: the point estimates clear min_delta and selectivity but "
                "not the bounds; failing: they do not"}
CONTROL_MATCHED = ("masks matched to the selection on the target's routing mass (atlas), decile by decile per "
                   "group, drawn outside the selection; each measured on delta target and delta others on a "
                   "subset of the selection's windows")
CONTROL_UNIFORM = "masks of the same size per group, drawn uniformly from the units seen in the atlas"


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
    """log p(text[len(prefix):] | <s> prefix) for each (prefix, full text) pair, summed over tokens: minus the
    model's own loss (`causal_lm_loss`) summed over the continuation's tokens."""
    device = next(model.parameters()).device
    lead = [bos_id] if bos_id is not None else []
    sequences, starts = [], []
    for prefix, text in zip(prefixes, texts, strict=True):
        head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        start = len(head) if full[: len(head)] == head and len(full) > len(head) else 0
        sequences.append(torch.tensor(lead + full, dtype=torch.long))
        starts.append(max(start + len(lead), 1))         # the first token has nothing to be predicted from
    scores: list[float] = []
    for begin in range(0, len(sequences), batch_size):
        chunk = sequences[begin : begin + batch_size]
        # Right padding: causal attention keeps the real tokens' logits exact, no mask needed.
        ids = pad_sequence(chunk, batch_first=True).to(device)
        losses = causal_lm_loss(model(input_ids=ids, use_cache=False).logits, ids, reduction="none")   # [B, T-1]
        scores += [-float(loss[start - 1 : len(seq) - 1].sum())
                   for loss, seq, start in zip(losses, chunk, starts[begin : begin + batch_size], strict=True)]
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
        """Per-window mean loss of the picked windows of each label (model as it is now, edits included).

        The windows of every label share forward passes (`batch_size` windows each): a control mask reads
        a few windows per label, and one pass over all of them costs much less than one pass per label
        (per-call overhead dominates at one window). Each window's loss is computed from its own row (the
        model is causal and per-sequence; a pass holds at most `batch_size` windows, as before, so the expert path is
        the same), so the values are those of one pass per label: tests/test_unlearn.py checks them bitwise.
        """
        if not picks:
            return {}
        windows = [self.sets[label][int(w)] for label, positions in picks.items()
                   for w in self.windows[label][positions]]
        losses = window_losses(model, windows, self.batch_size, indices=range(len(windows))).numpy()
        counts = [len(positions) for positions in picks.values()]
        return dict(zip(picks, np.split(losses, np.cumsum(counts)[:-1]), strict=True))


@dataclass
class Measure:
    """How much of the validation data one kind of measurement reads (tokens per label; None: all)."""

    target: int | None
    others: int | None


# ----------------------------------------------------------------------------------------------------------
# One edit, measured


def unit_mask(model: nn.Module, selection: Selection) -> Any:
    """The default deletion: `selection`'s units zeroed through the units layer (experts or neurons)."""
    return units_of(model).masked(selection)


def window_documents(plan: EvalPlan, label: str, positions: np.ndarray) -> np.ndarray:
    """The document (index in the validation split) of each picked window of `label`: the bootstrap's
    clusters and the `windows.csv.gz` column that lets a reader recompute every interval."""
    packed = plan.sets[label]
    return np.asarray([packed.document_of(int(i)) for i in plan.windows[label][positions]], dtype=np.int64)


def edit_effect(model: nn.Module, plan: EvalPlan, before: dict[str, np.ndarray], selection: Selection, target: str,
                measure: Measure, seed: int = 0, mask: Any = unit_mask) -> dict[str, Any]:
    """Mask `selection`, evaluate the target and the other labels on the windows `measure` asks for, and
    return each label's Δ with a 95 % CI from a paired bootstrap over documents (windows of one document
    are resampled together), Δ target, Δ others (mean over the other labels, each weighted equally; its
    CI resamples documents within each label) and the worst single other label. `windows` (the picked
    positions, their documents and per-window losses) stays out of report.json: it goes to windows.csv.gz."""
    picks = {label: plan.positions(label, measure.target if label == target else measure.others)
             for label in plan.sets}
    prior = {label: before[label][pos] for label, pos in picks.items()}
    docs = {label: window_documents(plan, label, pos) for label, pos in picks.items()}
    if selection.total:
        with mask(model, selection):
            after = plan.measure(model, picks)
    else:
        after = prior
    per_label = {label: delta_ci(prior[label], after[label], seed=seed, clusters=docs[label]) for label in picks}
    others = [label for label in picks if label != target]
    if others:
        joint = delta_ci(np.concatenate([prior[label] for label in others]),
                         np.concatenate([after[label] for label in others]), seed=seed,
                         clusters=np.concatenate([docs[label] for label in others]),
                         strata=np.concatenate([np.full(len(after[label]), i) for i, label in enumerate(others)]))
        worst = max(others, key=lambda label: per_label[label]["delta"])
    else:
        joint = {"delta": float("nan"), "ci95": [float("nan"), float("nan")]}
        worst = None
    return {
        "selection": selection.summary(),
        "masked_experts": selection.total,
        "masking_ratio": selection.masking_ratio,
        "delta": {label: d["delta"] for label, d in per_label.items()},
        "delta_ci95": {label: d["ci95"] for label, d in per_label.items()},
        "after": {label: {"loss": float(after[label].mean()), "before": float(prior[label].mean()),
                          "tokens": plan.tokens(picks[label]), "documents": per_label[label]["clusters"]}
                  for label in picks},
        "delta_target": per_label[target]["delta"],
        "delta_target_ci95": per_label[target]["ci95"],
        "delta_others": joint["delta"],
        "delta_others_ci95": joint["ci95"],
        "worst_other": None if worst is None else {"label": worst, "delta": per_label[worst]["delta"],
                                                   "ci95": per_label[worst]["ci95"]},
        "target_vs_others": target_vs_others(per_label[target]["delta"], joint["delta"]),
        "windows": {label: {"positions": picks[label], "documents": docs[label], "before": prior[label],
                            "after": after[label]} for label in picks},
    }


def control_positions(windows: dict[str, dict[str, np.ndarray]], target: str, target_tokens: int,
                      others_tokens: int, seq_len: int) -> dict[str, np.ndarray]:
    """Indices (into each label's operating-point windows) that every control mask is measured on: an
    evenly spaced subset, so the selection's own Δ on exactly these windows is known without a re-run."""
    return {label: spaced(len(w["positions"]), -(-(target_tokens if label == target else others_tokens) // seq_len))
            for label, w in windows.items()}


def random_control(model: nn.Module, plan: EvalPlan, before: dict[str, np.ndarray], selection: Selection,
                   windows: dict[str, dict[str, np.ndarray]], pools: list[np.ndarray], target: str, count: int,
                   tokens: int, others_tokens: int, target_mass: list[np.ndarray] | None = None,
                   seed: int = 0, mask: Any = unit_mask) -> dict[str, Any]:
    """`count` control masks, each measured on Δ target AND Δ others on a subset of the selection's own
    windows (`tokens` of the target's, `others_tokens` of each other label's), and the comparison with the
    selection on those same windows (`control_comparison`).

    With `target_mass` (per group, every unit's mass on the target from the atlas) the masks are matched to
    the selection decile by decile of that mass (`matched_masks`): they remove as much of the target's
    routing, so a selection that only picked "units the target uses a lot" is matched by them; without it,
    the same number of units per group drawn uniformly from `pools` (units seen in the atlas)."""
    subset = control_positions(windows, target, tokens, others_tokens, plan.seq_len)
    picks = {label: windows[label]["positions"][index] for label, index in subset.items()}
    others = [label for label in picks if label != target]
    if target_mass is not None:
        masks, overlap = matched_masks(target_mass, pools, selection.ids, n=count, seed=seed)
        criterion = "random, matched on target mass deciles"
    else:
        masks, overlap = random_masks(selection.counts(), pools, n=count, seed=seed), None
        criterion = "random (seen units)"

    def deltas(after: dict[str, np.ndarray]) -> tuple[float, float]:
        change = {label: float((after[label] - before[label][picks[label]]).mean()) for label in picks}
        return change[target], float(np.mean([change[label] for label in others])) if others else float("nan")

    target_deltas, others_deltas, draws = [], [], []
    for ids in masks:
        control = Selection(selection.units_per_group, selection.groups, ids, criterion=criterion)
        with mask(model, control):
            after = plan.measure(model, picks)
        dt, do = deltas(after)
        target_deltas.append(dt)
        others_deltas.append(do)
        draws.append(after)
    own_t, own_o = deltas({label: windows[label]["after"][index] for label, index in subset.items()})
    result = {"criterion": criterion, "deltas": target_deltas, "others_deltas": others_deltas,
              "p95": random_p95(target_deltas), "tokens": plan.tokens(picks[target]),
              "others_tokens": plan.tokens(picks[others[0]]) if others else 0, "overlap": overlap,
              "selection_delta": own_t, "selection_delta_others": own_o}
    if others:
        result["comparison"] = control_comparison(own_t, own_o, target_deltas, others_deltas)
    result["windows"] = {"positions": picks, "after": draws}
    return result


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
    random_others_tokens: int = 64        # tokens per other label each control mask is measured on
    mc_items: dict[str, list[dict]] | None = None
    tokenizer: Any = None
    progress: bool = True
    mask: Any = unit_mask                 # (model, Selection) -> context manager deleting the units

def label_accuracies(model: nn.Module, protocol: Protocol) -> dict[str, float]:
    """Multiple-choice accuracy of each label that has items (the model as it is now, edits included)."""
    return {label: multiple_choice_accuracy(model, protocol.tokenizer, items, protocol.batch_size)
            for label, items in (protocol.mc_items or {}).items() if items}


def run_protocol(model: nn.Module, plan: EvalPlan, targets: list[str], operating: Any, sweep: Any,
                 seen: list[np.ndarray], protocol: Protocol, allow_empty: bool = False,
                 target_mass: Any = None) -> dict[str, Any]:
    """Unmasked losses, then for each target: the operating-point selection (`operating(target)`) with its
    per-label Δ and CIs, the control (matched on `target_mass(target)` when given: per group, each unit's
    mass on the target) and the sweep points (`sweep(target)`: [(parameter, Selection)]). Every per-window
    loss is kept in `result["windows"]` (rows of `WINDOW_COLUMNS` without the model), for windows.csv.gz."""
    model.eval()
    before = plan.measure(model, {label: plan.positions(label, None) for label in plan.sets})
    result: dict[str, Any] = {"before": {label: {"loss": float(v.mean()), "tokens": plan.tokens(v)}
                                         for label, v in before.items()}, "masked": {}}
    rows: list[tuple] = []
    for label, losses in before.items():
        everything = plan.positions(label, None)
        rows += window_rows(plan, "unmasked", "", label, everything, losses, losses)
    accuracy_before = label_accuracies(model, protocol)
    for label, accuracy in accuracy_before.items():
        result["before"][label]["accuracy"] = accuracy
    for target in tqdm(targets, desc="unlearn", unit="label", disable=not protocol.progress):
        selection = operating(target)
        if selection.total == 0 and not allow_empty:
            raise MonetError(f"no unit is selected for {target!r} ({selection.criterion}): the selection is empty; "
                             "lower --ratio or build the atlas on more tokens")
        entry = edit_effect(model, plan, before, selection, target, protocol.operating, protocol.seed, protocol.mask)
        windows = entry.pop("windows")
        for label, w in windows.items():
            rows += window_rows(plan, "operating", target, label, w["positions"], w["before"], w["after"])
        if selection.total and accuracy_before:
            with protocol.mask(model, selection):
                accuracies = label_accuracies(model, protocol)
            for label, accuracy in accuracies.items():
                entry["after"][label]["accuracy"] = accuracy
            entry["delta_accuracy"] = {label: accuracies[label] - accuracy_before[label] for label in accuracies}
        if selection.total and protocol.random_masks:
            control = random_control(model, plan, before, selection, windows, seen, target, protocol.random_masks,
                                     protocol.random_tokens, protocol.random_others_tokens,
                                     target_mass(target) if target_mass else None, protocol.seed, protocol.mask)
            drawn = control.pop("windows")
            for i, after in enumerate(drawn["after"]):
                for label, positions in drawn["positions"].items():
                    rows += window_rows(plan, f"control {i}", target, label, positions, before[label][positions],
                                        after[label])
            entry["random"] = control
        entry["sweep"] = []
        for parameter, point in sweep(target):
            if point.total:
                effect = edit_effect(model, plan, before, point, target, protocol.sweep, protocol.seed, protocol.mask)
                for label, w in effect.pop("windows").items():
                    rows += window_rows(plan, f"sweep {parameter:g}", target, label, w["positions"], w["before"],
                                        w["after"])
                entry["sweep"].append({"parameter": parameter, "criterion": point.criterion,
                                       **{k: effect[k] for k in SWEEP_FIELDS}})
        result["masked"][target] = entry
        if "ceiling" not in result and selection.groups:
            result["ceiling"] = ceiling_effect(model, plan, before, selection, protocol)
    result["windows"] = rows
    return result


def ceiling_effect(model: nn.Module, plan: EvalPlan, before: dict[str, np.ndarray], like: Selection,
                   protocol: Protocol) -> dict[str, Any]:
    """Every unit of every group masked (the whole MLP / every expert removed): each label's Δ on the
    operating point's windows of the other labels, with its clustered CI. The scale a deletion is read
    against: Δ target 0.3 means little when removing everything costs 0.35 and much when it costs 3."""
    everything = Selection(like.units_per_group, like.groups,
                           {g: np.arange(like.units_per_group) for g in range(like.groups)}, criterion="all units")
    picks = {label: plan.positions(label, protocol.operating.others) for label in plan.sets}
    with protocol.mask(model, everything):
        after = plan.measure(model, picks)
    deltas = {label: delta_ci(before[label][pos], after[label], seed=protocol.seed,
                              clusters=window_documents(plan, label, pos)) for label, pos in picks.items()}
    return {"masked_experts": everything.total, "delta": {label: d["delta"] for label, d in deltas.items()},
            "delta_ci95": {label: d["ci95"] for label, d in deltas.items()},
            "tokens": {label: plan.tokens(pos) for label, pos in picks.items()}}


WINDOW_COLUMNS = ("model", "point", "masked", "label", "window", "document", "loss_before", "loss_after")


def window_rows(plan: EvalPlan, point: str, target: str, label: str, positions: np.ndarray, before: np.ndarray,
                after: np.ndarray) -> list[tuple]:
    """One row per window of one measurement: (point, masked label, evaluated label, window index in the
    label's `PackedSequences`, its document in the validation split, loss before, loss after)."""
    documents = window_documents(plan, label, positions)
    return [(point, target, label, int(w), int(d), float(b), float(a))
            for w, d, b, a in zip(plan.windows[label][positions], documents, before, after, strict=True)]


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


def target_mass(means: list[np.ndarray], labels: list[str]) -> Any:
    """target -> per group, every unit's mass on the target (the matched control's matching variable)."""
    return lambda target: [np.asarray(m)[labels.index(target)] for m in means]


def run_provenance(data_dir: str | Path) -> dict[str, Any]:
    """What a replication must hold fixed: versions (torch, numpy, python), threads and the CPU's vector
    instruction set (both change float rounding in matrix products), the tokenizer hash, the corpus lock,
    the corpus's packages (data manifest) and a hash of its documents (`corpus_sha256`: same hash, same
    bytes)."""
    manifest = read_manifest(data_dir)
    digests = []
    for split in ("train", "validation"):
        dataset = TokenDataset(data_dir, split=split)
        digests += [f"{split}:{dataset.document_meta(i).get('sha256', '')}" for i in range(dataset.num_documents)]
    return {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "tokenizer_sha256": manifest.get("tokenizer_sha256"),
            "corpus_sha256": hashlib.sha256("\n".join(digests).encode()).hexdigest(),
            "corpus_lock_sha256": manifest.get("lock_sha256"), "packages": manifest.get("provenance", [])}


def curve_points(entry: dict[str, Any]) -> list[dict[str, float]]:
    """The forget-retain curve of one target: its sweep points and the operating point."""
    points = [*entry.get("sweep", []), *([entry] if entry["masked_experts"] else [])]
    return forget_retain_curve([{key: p[key] for key in ("delta_target", "delta_others", "masking_ratio")}
                                for p in points])


def summary_rows(result: dict[str, Any]) -> dict[str, dict]:
    """Per masked label, the fields the tables print, the point-estimate bar (`verdict`: `passed`) and the
    bar on interval bounds with its grade (`interval_verdict`: robust / marginal / failing)."""
    rows = {}
    for target, entry in result["masked"].items():
        control = entry.get("random", {})
        comparison = control.get("comparison", {})
        row = {key: entry[key] for key in ("delta_target", "delta_target_ci95", "delta_others", "delta_others_ci95")}
        row["worst_other"] = entry.get("worst_other")
        row |= {"random_delta_target_p95": control.get("p95"),
                "random_selection_delta": control.get("selection_delta"),
                "control_others_near": comparison.get("others_near"),
                "control_selection_others": comparison.get("selection_delta_others"),
                "control_p_value": comparison.get("p_value"),
                "control_selection_below": comparison.get("selection_below")}
        row |= {key: entry[key] for key in ("masked_experts", "masking_ratio", "target_vs_others")}
        if "delta_accuracy" in entry:
            row["delta_accuracy_target"] = entry["delta_accuracy"].get(target)
        if control.get("p95") is not None and entry["masked_experts"]:
            row.update(verdict(entry["delta_target"], entry["delta_others"], control["p95"], MIN_DELTA, SELECTIVITY))
        else:
            row["passed"] = False
        bounds = interval_verdict(entry["delta_target_ci95"], entry["delta_others_ci95"], entry["delta_target"],
                                  entry["delta_others"], comparison.get("selection_below") if entry["masked_experts"]
                                  else None, MIN_DELTA, SELECTIVITY)
        row |= {"interval_" + key: value for key, value in bounds.items() if key != "grade"}
        row["grade"] = bounds["grade"] if entry["masked_experts"] else "failing"
        ceiling = result.get("ceiling", {}).get("delta", {}).get(target)
        row["ceiling_delta_target"] = ceiling
        row["target_share_of_ceiling"] = (entry["delta_target"] / ceiling if ceiling and ceiling > 0 else None)
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
    units_of(model, "monet", settings.run, hint=": pass a Monet run (a dense model goes in --baseline)")
    dataset = TokenDataset(settings.data, split="validation")
    if not dataset.manifest.get("labelled", True):   # `data build --source files` without --label-field
        raise MonetError(f"{settings.data} has no labels, so there is nothing to unlearn; rebuild it with "
                         "--label-field NAME (or a folder per label)")
    atlas = open_atlas(settings.atlas, model, settings.data)
    warnings = [evaluation_leak(atlas, settings.data)]
    labels, means = atlas_label_means(atlas)
    targets = [settings.target] if settings.target else [label for label in labels if label in dataset.labels]
    for target in targets:
        if target not in labels:
            raise MonetError(f"unknown label {target!r}; the atlas has tokens of: {', '.join(labels)}")
        if target not in dataset.labels:
            raise MonetError(f"label {target!r} is not in {settings.data}; it has: {', '.join(dataset.labels)}")
    benchmark = prepare_benchmark(settings.lm_eval_task, settings.lm_eval_include_path, targets)   # fail early
    if settings.baseline is not None:   # checked before the long Monet run
        dense_model, _ = load_checkpoint(settings.baseline, device=device, load_tokenizer=False)
        units_of(dense_model, "dense", f"--baseline {settings.baseline}")
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
                        random_others_tokens=settings.random_others_tokens,
                        batch_size=settings.batch_size, seed=settings.seed, mc_items=items, tokenizer=tokenizer,
                        progress=not settings.quiet)
    monet_result = run_protocol(
        model, plan, targets,
        operating=lambda t: select_for_label(means, labels, t, settings.ratio, settings.min_mass),
        sweep=lambda t: [(r, select_for_label(means, labels, t, r, settings.min_mass)) for r in settings.sweep],
        seen=seen_units(means), protocol=protocol, allow_empty=settings.target is None,
        target_mass=None if settings.uniform_control else target_mass(means, labels))
    windows = {"monet": monet_result.pop("windows")}
    report: dict[str, Any] = {
        "run": str(checkpoint), "data": str(settings.data), "atlas": str(settings.atlas), "split": "validation",
        "seq_len": seq_len, "batch_size": settings.batch_size, "eval_tokens": settings.eval_tokens,
        "others_tokens": others_tokens, "random_masks": settings.random_masks,
        "random_tokens": settings.random_tokens, "random_others_tokens": settings.random_others_tokens,
        "control": CONTROL_UNIFORM if settings.uniform_control else CONTROL_MATCHED,
        "sweep": list(settings.sweep), "sweep_tokens": settings.sweep_tokens,
        "ratio": settings.ratio, "min_mass": settings.min_mass, "seed": settings.seed, "labels": list(sets),
        "skipped_labels": skipped, "targets": targets,
        "metric": "validation loss (nats/token); delta = masked - unmasked on the same windows (a rise is "
                  "knowledge lost); 95 % CIs from a paired bootstrap over documents (the windows of one "
                  "document resampled together; Δ others: documents resampled within each other label)",
        "bar": BAR,
        "provenance": run_provenance(settings.data),
        "monet": monet_result, "summary": summary_rows(monet_result), "warnings": warnings,
    }
    if benchmark is not None:   # the paper's metric: lm-eval task accuracy of the edited model (Figure 3)
        report["lm_eval"] = unlearning_accuracy(
            model, tokenizer, targets, lambda t: select_for_label(means, labels, t, settings.ratio, settings.min_mass),
            seen_units(means), benchmark, settings.lm_eval_random_masks, settings.batch_size, settings.lm_eval_limit,
            settings.seed)
    if settings.baseline is not None:
        rule = dense_rule(settings, dense_model, seq_len)

        def dense_top(target: str, share: float) -> Selection:
            units = max(1, round(share * dense_means[0].shape[1]))
            if rule is not None and rule["select"] is not None:
                return rule["select"](target, units)
            return select_top(dense_means, dense_labels.index(target), units, settings.min_mass, normalize=False)

        def dense_operating(target: str) -> Selection:
            # Equal budget: the same share of units as Monet masked for this label (the paper's skewness
            # criterion selects almost no dense neuron, so the baseline ranks neurons by specificity).
            return dense_top(target, report["summary"].get(target, {}).get("masking_ratio")
                             or settings.dense_fractions[0])

        dense_protocol = replace(protocol, mask=rule["mask"]) if rule is not None else protocol
        dense_result = run_protocol(dense_model, plan, targets, dense_operating,
                                    lambda t: [(f, dense_top(t, f)) for f in settings.dense_fractions],
                                    seen_units(dense_means), dense_protocol, allow_empty=True,
                                    target_mass=None if settings.uniform_control
                                    else target_mass(dense_means, dense_labels))
        windows["dense"] = dense_result.pop("windows")
        report["dense_protocol"] = dense_result
        report["dense"] = summary_rows(dense_result)
        report["dense_run"], report["dense_atlas"] = str(settings.baseline), str(settings.baseline_atlas)
        report["dense_selection"] = (f"top neurons by {settings.dense_rule}, as many (share of all MLP neurons) as "
                                     "Monet masked experts for the label; sweep over dense_fractions")
        report["dense_rule"], report["dense_ablation"] = settings.dense_rule, settings.dense_ablation
        report["dense_fractions"] = list(settings.dense_fractions)
        report["equal_target"] = equal_target_comparison(monet_result, dense_result)
    write_report(report, settings.out, force=settings.force, windows=windows)
    return report


def dense_rule(settings: UnlearnSettings, model: nn.Module, seq_len: int) -> dict[str, Any] | None:
    """The dense baseline's rule when it is not the default (specificity, zero ablation): {"select":
    (target, n) -> Selection, "mask": (model, Selection) -> context}; signed neuron means (and, for the
    attribution rule, activation x gradient) are measured on `dense_rule_tokens` training tokens spread over
    every label (`dense_rules`)."""
    if settings.dense_rule == "specificity" and settings.dense_ablation == "zero":
        return None
    train = TokenDataset(settings.data, split="train")
    windows = plan_windows(train.docs, seq_len, settings.dense_rule_tokens)
    means, counts = neuron_label_means(model, train, windows, settings.batch_size)
    width, layers = means[0].shape[1], len(means)
    centre = overall_means(means, counts) if settings.dense_ablation == "mean" else None
    if settings.dense_rule == "attribution":   # the estimated rise under the ablation actually applied
        means = attribution_rises(*neuron_attributions(model, train, windows, settings.batch_size), centre)
    name = {"class-mean": "class-mean difference", "attribution": "attribution (target rise - others')"}

    def select(target: str, n: int) -> Selection:
        scores = [class_mean_difference(m, train.labels.index(target), counts) for m in means]
        return Selection(width, layers, top_by_score(scores, n),
                         criterion=f"top {n} by {name[settings.dense_rule]}")

    if centre is not None:
        def mask(model: nn.Module, selection: Selection) -> Any:
            return mean_ablated(model, selection.ids, centre)
    else:
        mask = unit_mask
    return {"select": select if settings.dense_rule in name else None, "mask": mask}


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


# How a grade is drawn: the outline of a label's own (diagonal) cell in the heatmap (colour, line style).
GRADE_STYLE = {"robust": ("tab:green", "-"), "marginal": ("tab:orange", "--"), "failing": ("black", ":")}
LOSS_UNIT = "nats/token"


def _grades(report: dict[str, Any], result: dict[str, Any]) -> dict[str, str]:
    """Per masked label, the grade of the bar on interval bounds (robust / marginal / failing), as the table."""
    rows = report.get("summary") if result is report["monet"] and "summary" in report else summary_rows(result)
    return {label: row.get("grade", "failing") for label, row in rows.items()}


def heatmap_figure(report: dict[str, Any]) -> Any:
    """Fig. 3-style heatmap(s) of the loss change (a matplotlib Figure): rows evaluated label, columns masked
    label, one colour scale (the colour bar, in nats/token); each label's own cell is outlined by its grade
    and the grade is written under its column."""
    from matplotlib.figure import Figure  # imported late: matplotlib is slow to import and only plots need it
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    models = _models(report)
    mats = [delta_matrix(result) for _, _, result in models]
    vmax = max(float(np.nanmax(np.abs(m[2]))) if np.isfinite(m[2]).any() else 1.0 for m in mats) or 1.0
    size = max(len(mats[0][0]), 3)
    fig = Figure(figsize=(1.0 + 0.8 * size * len(mats), 0.7 * size + 2.4))
    axes = fig.subplots(1, len(mats), squeeze=False)
    for ax, (_, title, result), (evaluated, masked_labels, values) in zip(axes[0], models, mats, strict=True):
        image = ax.imshow(values, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")   # red: loss rose
        grades = _grades(report, result)
        ax.set_xticks(range(len(masked_labels)),
                      [f"{label} · {grades[label]}" if label in grades else label for label in masked_labels],
                      rotation=45, ha="right")
        ax.set_yticks(range(len(evaluated)), evaluated)
        ax.set(xlabel="units masked for (grade)", ylabel="evaluated on", title=f"{title}: Δ validation loss")
        for (r, c), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(value) > 0.6 * vmax else "black")
        for c, label in enumerate(masked_labels):
            if label in grades and label in evaluated:
                colour, style = GRADE_STYLE[grades[label]]
                ax.add_patch(Rectangle((c - 0.46, evaluated.index(label) - 0.46), 0.92, 0.92, fill=False,
                                       edgecolor=colour, linestyle=style, linewidth=2.2, gid=f"grade:{label}"))
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        bar.set_label(f"Δ loss ({LOSS_UNIT}, masked − unmasked)")
    handles = [Line2D([], [], color=colour, linestyle=style, linewidth=2.2, label=grade)
               for grade, (colour, style) in GRADE_STYLE.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
               title="own cell outlined by the label's grade (Δ target's interval against the bar)", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def plot_heatmap(report: dict[str, Any], path: Path) -> None:
    heatmap_figure(report).savefig(path, dpi=110)


def _point_names(report: dict[str, Any], model: str, entry: dict[str, Any]) -> dict[tuple[float, float], str]:
    """(Δ others, Δ target) -> what each point of a sweep is: Monet's skewness ratio (≥ r), the dense
    baseline's share of neurons (%: its sweep's fractions; at the operating point, Monet's share)."""
    points = [*entry.get("sweep", []), *([{**entry, "operating": True}] if entry["masked_experts"] else [])]
    names = {}
    for point in points:
        parameter = report.get("ratio") if point.get("operating") else point.get("parameter")
        if model == "Monet" and parameter is not None:
            name = f"≥{parameter:g}"
        else:
            share = point["masking_ratio"] if point.get("operating") or parameter is None else parameter
            name = f"{100 * share:.2g}%"
        names[(point["delta_others"], point["delta_target"])] = name
    return names


def forget_retain_figure(report: dict[str, Any]) -> Any:
    """One panel per target (a matplotlib Figure): Δ target (y) against Δ others (x), both in nats/token,
    along each model's selection sweep, each point labelled (Monet: its skewness ratio; dense: its share of
    neurons); the operating point is ringed, the dotted line is the random control's p95, the dashed one the
    bar's selectivity; one legend for all panels."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    targets = list(report["monet"]["masked"])
    cols = min(4, max(1, len(targets)))
    rows = -(-len(targets) // cols)
    fig = Figure(figsize=(3.4 * cols, 3.0 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    models = list(zip(_models(report), ("tab:red", "tab:blue"), strict=False))
    for ax, target in zip(axes.flat, targets, strict=False):
        for (name, _, result), colour in models:
            entry = result["masked"][target]
            curve = curve_points(entry)
            names = _point_names(report, name, entry)
            if curve:
                xs, ys = [p["delta_others"] for p in curve], [p["delta_target"] for p in curve]
                ax.plot(xs, ys, "o-", ms=3, color=colour)
            operating = (entry["delta_others"], entry["delta_target"]) if entry["masked_experts"] else None
            for (x, y), text in names.items():   # the operating point's label above-left: sweep points lie near
                ax.annotate(text, (x, y), xytext=(-5, 4) if (x, y) == operating else (4, -4),
                            textcoords="offset points", fontsize=6, color=colour,
                            ha="right" if (x, y) == operating else "left", gid=f"point:{name}:{text}")
            if operating is not None:
                ax.plot(*operating, "o", ms=8, color=colour, mfc="none")
        p95 = report["monet"]["masked"][target].get("random", {}).get("p95")
        if p95 is not None:
            ax.axhline(p95, color="tab:red", ls=":", lw=1)
        ax.axline((0, 0), slope=SELECTIVITY, color="grey", lw=0.6, ls="--")
        ax.axhline(0, color="black", lw=0.5)
        ax.axvline(0, color="black", lw=0.5)
        ax.margins(x=0.15)
        ax.set_title(target, fontsize=9)
        ax.set_xlabel(f"Δ others ({LOSS_UNIT})", fontsize=8)
        ax.set_ylabel(f"Δ target ({LOSS_UNIT})", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(targets):]:
        ax.axis("off")
    handles = [Line2D([], [], color=colour, marker="o", ms=3,
                      label=f"{name} sweep (" + ("skewness ratio ≥ r" if name == "Monet" else "% of neurons") + ")")
               for (name, _, _), colour in models]
    handles += [Line2D([], [], color="grey", marker="o", ms=8, mfc="none", ls="none", label="operating point"),
                Line2D([], [], color="tab:red", ls=":", lw=1, label="random control p95 (Monet)"),
                Line2D([], [], color="grey", ls="--", lw=0.6, label=f"Δ target = {SELECTIVITY:g} × Δ others")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=7, frameon=False)
    fig.suptitle("Forget–retain: forgetting (Δ target) against collateral damage (Δ others); up and to the left "
                 "is better", fontsize=9)
    fig.tight_layout(rect=(0, 0.35 / (3.0 * rows + 0.6), 1, 1))
    return fig


def plot_forget_retain(report: dict[str, Any], path: Path) -> None:
    forget_retain_figure(report).savefig(path, dpi=110)


def windows_csv(windows: dict[str, list[tuple]]) -> bytes:
    """windows.csv.gz: one row per (model, measurement, window), `WINDOW_COLUMNS`; every Δ and interval of
    report.json can be recomputed from it (tests/test_unlearn.py does)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(WINDOW_COLUMNS)
    for model_name, rows in windows.items():
        writer.writerows((model_name, *row[:-2], repr(row[-2]), repr(row[-1])) for row in rows)
    return gzip.compress(buffer.getvalue().encode("utf-8"), mtime=0)


def read_windows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a windows.csv.gz, typed (ints, floats)."""
    with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["window"], row["document"] = int(row["window"]), int(row["document"])
        row["loss_before"], row["loss_after"] = float(row["loss_before"]), float(row["loss_after"])
    return rows


def write_report(report: dict[str, Any], out: str | Path, force: bool = False,
                 windows: dict[str, list[tuple]] | None = None) -> Path:
    """report.json, loss_matrix.csv (+ accuracy_matrix.csv, dense_loss_matrix.csv), heatmap.png,
    forget_retain.png and (given `windows`) windows.csv.gz, written atomically into `out` (free, or an
    earlier unlearning report, or `force`)."""
    with output_directory(out, "unlearn", force, "an unlearning report") as tmp:
        if windows:
            (tmp / WINDOWS_FILE).write_bytes(windows_csv(windows))
        files = {"loss_matrix.csv": matrix_csv(report["monet"], "loss")}
        if any("accuracy" in v for v in report["monet"]["before"].values()):
            files["accuracy_matrix.csv"] = matrix_csv(report["monet"], "accuracy")
        if "dense_protocol" in report:
            files["dense_loss_matrix.csv"] = matrix_csv(report["dense_protocol"], "loss")
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        plot_heatmap(report, tmp / "heatmap.png")
        plot_forget_retain(report, tmp / "forget_retain.png")
        if "lm_eval" in report:
            plot_accuracy_heatmap(report["lm_eval"], tmp / LM_EVAL_HEATMAP)
        names = sorted([*files, "heatmap.png", "forget_retain.png", REPORT_FILE, *([WINDOWS_FILE] if windows else []),
                        *([LM_EVAL_HEATMAP] if "lm_eval" in report else [])])
        write_json(tmp / REPORT_FILE, {**report, "files": names})
    return Path(out)


def format_summary(report: dict[str, Any]) -> str:
    """A plain-text table per masked label: Monet's Δ target and Δ others with their clustered CIs, the
    worst single other label, the control (the selection's Δ others beside the matched masks' at a similar
    Δ target, on the same windows, and the share of masks that do at least as well), and the grade; then
    the dense baseline at its operating point and at Monet's Δ target. A legend follows the table."""
    dense, equal = report.get("dense", {}), report.get("equal_target", {})
    header = (f"{'masked':<11} {'%':>5} {'Δ target [95% CI]':>22} {'Δ others [95% CI]':>22} {'worst other':>17} "
              f"{'ctl: sel':>8} {'rand':>6} {'p':>5} {'grade':>8}")
    if dense:
        header += f" | dense: {'%':>5} {'Δ target':>8} {'Δ others':>8} | {'@equal Δt':>9}"
    lines = [header]
    for target, row in report["summary"].items():
        ci, oci = row["delta_target_ci95"], row["delta_others_ci95"]
        interval = f"{_num(row['delta_target'], 6)} [{_num(ci[0], 6)},{_num(ci[1], 6)}]"
        others = f"{_num(row['delta_others'], 6)} [{_num(oci[0], 6)},{_num(oci[1], 6)}]"
        worst = row.get("worst_other") or {}
        worst_text = f"{worst.get('label', '-')[:10]} {_num(worst.get('delta'), 6)}" if worst else "-"
        line = (f"{target:<11} {100 * row['masking_ratio']:>5.2f} {interval:>22} {others:>22} {worst_text:>17} "
                f"{_num(row.get('control_selection_others'), 8)} {_num(row.get('control_others_near'), 6)} "
                f"{_num(row.get('control_p_value'), 5, 2)} {row.get('grade', '-'):>8}")
        if target in dense:
            d, at_equal = dense[target], equal.get(target, {}).get("dense_delta_others")
            line += (f" |        {100 * d['masking_ratio']:>5.2f} {_num(d['delta_target'], 8)} "
                     f"{_num(d['delta_others'], 8)} | {_num(at_equal, 9)}")
        lines.append(line)
    grades = [row.get("grade") for row in report["summary"].values()]
    lines += ["", "Δ = validation loss after masking minus before (nats/token); 95 % CIs resample documents. "
              "worst other = the other label that lost most.",
              "ctl = the control: the selection's Δ others on the control's windows, beside the median Δ others "
              "of the random masks (matched on the target's routing mass) closest to it in Δ target; p = share "
              "of masks that forget as much at no more cost.",
              f"grade: robust = Δ target's lower bound >= {MIN_DELTA:g} and >= {SELECTIVITY:g} x Δ others' upper "
              "bound, and p < 0.05; marginal = only the point estimates clear the bars; failing = they do not "
              f"({grades.count('robust')} robust, {grades.count('marginal')} marginal, "
              f"{grades.count('failing')} failing of {len(grades)})."]
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

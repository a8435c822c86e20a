"""Retrain oracle and relearning (issue 23, items 5a and 5c): how much of a language does a deletion remove,
measured against a model that never saw it, and how fast does the language come back?

    OMP_NUM_THREADS=1 python benchmarks/unlearning/retrain.py --demo DEMO --out OUT --labels go python
        [--stage train|measure|relearn|all] [--dense-rule attribution]

DEMO is a finished `monet demo` directory (data/, run/, dense-run/, atlas/, report/): its Monet and dense
models are the "full" models. For each label of `--labels`, the same two models are trained again with the
demo's own training settings (read from its run's config.yaml: preset, steps, seed, learning rate, aux
weight...) on the corpus minus that label's TRAINING documents (`corpus_without`; validation, tokenizer and
label list untouched): the "without" models, the oracle of a perfect deletion.

measure (item 5a). For each label, on the demo's validation windows (paired: the same windows everywhere):
* L_without - L_full on the target (what a perfect deletion would cost there) with its CI (bootstrap
  clustered by document, `protocol_stats.delta_ci`), and on the others (the price of never seeing it);
* Monet: the skewness selection (`select_for_label` on the demo atlas) at the report's ratio (the operating
  point) and a sweep of ratios; dense: the attribution rule (`dense_rules`, zero ablation) at a sweep of
  neuron shares. Each point measured by the protocol's `edit_effect` (paired Δ, clustered CIs);
* the forgotten fraction F = Δt_mask / (L_without - L_full) on the target (`forgotten_fraction`, with a
  clustered bootstrap of the ratio), for Monet at its operating point and for dense at the same Δ others
  (its sweep interpolated, `target_at_others`; the per-window losses interpolated alike).

relearn (item 5c). Fine-tune on the target's training text (`PackedSequences` of that label, AdamW at a
constant `--relearn-lr`, batch and window as in training) and measure the target's validation loss every
`--relearn-every` steps; `half_recovery_step` counts the steps until half of the lost loss (L_start - L_full)
is back. Models: the full Monet with its mask on (masked experts stay masked: the edit is applied during the
fine-tune), the full dense model with the attribution rule's mask at Monet's Δ others (neurons stay zeroed),
and both retrained-without models (how fast each learns a language it never saw); as a reference, the full
model without a mask fine-tuned as long (the same text improves a model that lost nothing too).

Writes OUT/retrain.json (every number, CIs, curves) and OUT/retrain.md (the tables).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from monet.checkpoint import latest_checkpoint, load_checkpoint
from monet.data import TokenDataset
from monet.data.storage import MANIFEST, PackedSequences, read_manifest, write_split
from monet.errors import MonetError
from monet.evaluate import label_window_sets
from monet.experiments.dense_rules import attribution_rises, class_mean_difference, neuron_attributions, top_by_score
from monet.experiments.protocol_stats import delta_ci
from monet.experiments.unlearn import (
    EvalPlan,
    Measure,
    atlas_label_means,
    edit_effect,
    open_atlas,
    select_for_label,
    window_documents,
)
from monet.interp.atlas import plan_windows
from monet.interp.criteria import Selection
from monet.interp.units import units_of
from monet.io import atomic_write, output_directory, write_json
from monet.settings import TrainSettings
from monet.train import WindowOrder, build_optimizer, train

# Evaluated fine-tuning steps (dense early, where recovery is fast); the last is --relearn-steps.
RELEARN_SCHEDULE = (1, 2, 3, 4, 6, 8, 10, 13, 16, 20, 25, 30, 40, 50, 60, 80, 100, 130, 160, 200)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# The corpus without a label


def without_label(docs: np.ndarray, label_id: int) -> np.ndarray:
    """Indices of the documents (rows of a split's [n, 3] (start, end, label id) table) not labelled
    `label_id`, in stream order."""
    docs = np.asarray(docs)
    return np.flatnonzero(docs[:, 2] != label_id)


def corpus_without(data: str | Path, label: str, out: str | Path) -> Path:
    """A copy of the dataset `data` whose TRAINING split lacks every document of `label`; the validation
    split, the tokenizer and the label list (so label ids) are the same files, so a model trained on it is
    evaluated on exactly the windows the full model is. The manifest records what was removed."""
    data, out = Path(data), Path(out)
    train_set = TokenDataset(data, split="train")
    keep = without_label(train_set.docs, train_set.label_id(label))
    if len(keep) == train_set.num_documents:
        raise MonetError(f"{data} has no training document labelled {label!r}; nothing to remove")
    manifest = read_manifest(data)
    with output_directory(out, "data build", force=True, noun="a dataset directory") as tmp:
        tokens = [train_set.document(int(i)) for i in keep]
        metas = [train_set.document_meta(int(i)) for i in keep]
        counts = write_split(tmp, "train", tokens, train_set.docs[keep, 2], metas, train_set.vocab_size)
        for name in ("validation.tokens", "validation.docs.npy", "validation.meta.jsonl", *TOKENIZER_FILES):
            if (data / name).is_file():
                shutil.copyfile(data / name, tmp / name)
        split = dict(manifest["splits"]["train"], **counts)
        split["labels"] = {k: v for k, v in split.get("labels", {}).items() if k != label}
        manifest = {**manifest, "splits": {**manifest["splits"], "train": split},
                    "derived": {"from": str(data.resolve()), "removed_train_label": label,
                                "removed_train_documents": int(train_set.num_documents - len(keep))}}
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return out


# ----------------------------------------------------------------------------------------------------------
# Training with the demo's settings


def demo_train_settings(run: str | Path, data: str | Path, out: str | Path) -> TrainSettings:
    """The TrainSettings the demo's run was trained with (its config.yaml), on other data and another out."""
    saved = yaml.safe_load((Path(run) / "config.yaml").read_text(encoding="utf-8"))
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    values = {k: v for k, v in saved.items() if k in names and k not in ("data", "out", "init_from")}
    values["set"] = tuple(values.get("set") or ())
    return TrainSettings(**{**values, "data": str(data), "out": str(out), "quiet": True})


def trained(run: Path, steps: int) -> Path | None:
    """The run's final checkpoint when it reached `steps`, else None."""
    if not (run / "checkpoints").is_dir():
        return None
    latest = latest_checkpoint(run, warn=False)
    return latest if latest is not None and latest.name.endswith(f"{steps:07d}") else None



# ----------------------------------------------------------------------------------------------------------
# The oracle's statistics (pure)


def forgotten_fraction(full: np.ndarray, masked: np.ndarray, without: np.ndarray, clusters: np.ndarray | None = None,
                       reps: int = 2000, seed: int = 0) -> dict[str, Any]:
    """F = Δt_mask / (L_without - L_full) on the same target windows: mean(masked - full) / mean(without -
    full), each argument one mean loss per window (equal token counts). F = 1: the deletion removed as much
    as never training on the language; F > 1: more (it also broke what the language shares with the
    others). The 95 % interval resamples whole documents (`clusters`, one per window; windows of one file
    are correlated) and recomputes the ratio of sums; nan when the oracle's gap is not positive."""
    full, masked, without = (np.asarray(x, dtype=np.float64) for x in (full, masked, without))
    if not full.shape == masked.shape == without.shape or full.ndim != 1 or full.size == 0:
        raise MonetError("full, masked and without need one loss per window, the same windows")
    ids, member = np.unique(np.arange(full.size) if clusters is None else np.asarray(clusters), return_inverse=True)
    forgot = np.bincount(member, weights=masked - full, minlength=ids.size)
    gap = np.bincount(member, weights=without - full, minlength=ids.size)
    if gap.sum() <= 0:
        return {"F": float("nan"), "ci95": [float("nan"), float("nan")], "clusters": int(ids.size)}
    index = np.random.default_rng(seed).integers(0, ids.size, size=(reps, ids.size))
    num, den = forgot[index].sum(axis=1), gap[index].sum(axis=1)
    ratios = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    value = float(forgot.sum() / gap.sum())
    lo, hi = np.nanpercentile(ratios, [2.5, 97.5])
    return {"F": value, "ci95": [float(min(lo, value)), float(max(hi, value))], "clusters": int(ids.size)}


def target_at_others(points: list[dict[str, float]], level: float) -> dict[str, Any] | None:
    """Where a forget-retain curve reaches Δ others = `level`: the curve is (0, 0) (nothing masked) then the
    points ({"delta_target", "delta_others"}) sorted by Δ others; between the two points around `level`
    (the first such pair), Δ target is interpolated linearly. Returns {"delta_target", "lower", "upper",
    "weight"}: indices into `points` (None for the origin) and the weight of `upper`, so per-window losses
    can be interpolated the same way; None when `level` is beyond the curve (or negative)."""
    if not np.isfinite(level) or level < 0:
        return None
    order = sorted(range(len(points)), key=lambda i: (points[i]["delta_others"], points[i]["delta_target"]))
    nodes: list[tuple[int | None, float, float]] = [(None, 0.0, 0.0)]
    nodes += [(i, points[i]["delta_others"], points[i]["delta_target"]) for i in order]
    for (i, x0, y0), (j, x1, y1) in zip(nodes, nodes[1:], strict=False):
        if x0 <= level <= x1:
            weight = 0.0 if x1 == x0 else (level - x0) / (x1 - x0)
            return {"delta_target": y0 + weight * (y1 - y0), "lower": i, "upper": j, "weight": weight}
    return None


def half_recovery_step(steps: list[int], losses: list[float], full: float) -> int | None:
    """The first evaluated fine-tuning step at which half of the lost loss is back: loss <= full + (start -
    full) / 2, with start the loss at steps[0] (before fine-tuning). None when it never is (or nothing was
    lost: start <= full)."""
    if len(steps) != len(losses) or not steps:
        raise MonetError("half_recovery_step needs one loss per evaluated step")
    start = losses[0]
    if not start > full:
        return None
    threshold = full + (start - full) / 2
    return next((step for step, loss in zip(steps, losses, strict=True) if loss <= threshold), None)


def train_without(demo: Path, out: Path, label: str, kinds: tuple[str, ...]) -> dict[str, Path]:
    """The demo's models trained again on the corpus without `label` (skipped when already trained)."""
    data = out / f"data-without-{label}"
    if not (data / MANIFEST).is_file():
        corpus_without(demo / "data", label, data)
    runs = {}
    for kind in kinds:
        source = demo / ("run" if kind == "monet" else "dense-run")
        run = out / f"{kind}-without-{label}"
        settings = demo_train_settings(source, data, run)
        if trained(run, settings.max_steps) is None:
            log(f"training {run.name} ({settings.preset}, {settings.max_steps} steps, seed {settings.seed})")
            started = time.process_time()
            train(settings)
            log(f"{run.name}: {time.process_time() - started:.0f} CPU-s")
        runs[kind] = run
    return runs



# ----------------------------------------------------------------------------------------------------------
# 5a: the forgotten fraction


def load_eval(path: Path) -> torch.nn.Module:
    model, _ = load_checkpoint(path, device="cpu", load_tokenizer=False)
    return model.eval()


def window_docs(plan: EvalPlan, label: str) -> np.ndarray:
    return window_documents(plan, label, plan.positions(label, None))


def oracle_gap(plan: EvalPlan, full: dict[str, np.ndarray], without: dict[str, np.ndarray], target: str,
               seed: int) -> dict[str, Any]:
    """L_without - L_full on the target's windows and on the others' (paired, CIs clustered by document)."""
    others = [label for label in plan.sets if label != target]
    gap = delta_ci(full[target], without[target], seed=seed, clusters=window_docs(plan, target))
    rest = delta_ci(np.concatenate([full[k] for k in others]), np.concatenate([without[k] for k in others]),
                    seed=seed, clusters=np.concatenate([window_docs(plan, k) for k in others]),
                    strata=np.concatenate([np.full(len(full[k]), i) for i, k in enumerate(others)]))
    return {"target": {"delta": gap["delta"], "ci95": gap["ci95"], "documents": gap["clusters"]},
            "others": {"delta": rest["delta"], "ci95": rest["ci95"]},
            "loss_full": float(full[target].mean()), "loss_without": float(without[target].mean())}


def sweep(model: torch.nn.Module, plan: EvalPlan, before: dict[str, np.ndarray], target: str,
          selections: list[tuple[str, Selection]], seed: int) -> list[dict[str, Any]]:
    """`edit_effect` of each selection: every target window, the plan's windows of the others."""
    points = []
    for name, selection in selections:
        effect = edit_effect(model, plan, before, selection, target, Measure(None, None), seed)
        points.append({"point": name, "units": selection.total, "masking_ratio": selection.masking_ratio,
                       "delta_target": effect["delta_target"], "delta_target_ci95": effect["delta_target_ci95"],
                       "delta_others": effect["delta_others"], "delta_others_ci95": effect["delta_others_ci95"],
                       "worst_other": effect["worst_other"],
                       "after_target": effect["windows"][target]["after"]})
        log(f"  {target} {name}: {selection.total} units, Δt {effect['delta_target']:+.3f} "
            f"Δo {effect['delta_others']:+.3f}")
    return points


def fraction_at(points: list[dict[str, Any]], level: float, full: np.ndarray, without: np.ndarray,
                docs: np.ndarray, seed: int) -> dict[str, Any] | None:
    """F of a sweep at Δ others = `level`: Δ target interpolated (`target_at_others`), the per-window target
    losses interpolated with the same weight, and the ratio's clustered bootstrap."""
    where = target_at_others(points, level)
    if where is None:
        return None
    lower = full if where["lower"] is None else points[where["lower"]]["after_target"]
    upper = points[where["upper"]]["after_target"]
    masked = (1 - where["weight"]) * lower + where["weight"] * upper
    fraction = forgotten_fraction(full, masked, without, docs, seed=seed)
    shares = [0.0 if where["lower"] is None else points[where["lower"]]["masking_ratio"],
              points[where["upper"]]["masking_ratio"]]
    share = (1 - where["weight"]) * shares[0] + where["weight"] * shares[1]
    return {"delta_others": level, "delta_target": where["delta_target"], "F": fraction["F"],
            "F_ci95": fraction["ci95"], "masking_ratio": share,
            "between": [None if where["lower"] is None else points[where["lower"]]["point"],
                        points[where["upper"]]["point"]]}


def monet_rule(demo: Path, model: torch.nn.Module, min_mass: float) -> Any:
    """(target, ratio) -> Monet's skewness selection on the demo atlas, as `monet unlearn` selects it."""
    atlas_labels, means = atlas_label_means(open_atlas(demo / "atlas", model, demo / "data"))
    return lambda target, ratio: select_for_label(means, atlas_labels, target, ratio, min_mass)


def dense_rule(demo: Path, model: torch.nn.Module, seq_len: int, batch: int, tokens: int) -> tuple[Any, int]:
    """((target, n) -> the attribution rule's top n neurons per layer (zero ablation), neurons per layer), the
    rule measured on `tokens` training tokens spread over the labels (as `monet unlearn --dense-rule
    attribution`)."""
    train_set = TokenDataset(demo / "data", split="train")
    ag, g, terms = neuron_attributions(model, train_set, plan_windows(train_set.docs, seq_len, tokens), batch)
    rises = attribution_rises(ag, g, terms, None)
    width, layers = rises[0].shape[1], len(rises)

    def select(target: str, n: int) -> Selection:
        # `terms` (loss terms per label) stands in for the token counts: labels without tokens are left out
        scores = [class_mean_difference(r, train_set.labels.index(target), terms) for r in rises]
        return Selection(width, layers, top_by_score(scores, n), criterion=f"top {n} by attribution")

    return select, width


def measure(demo: Path, out: Path, labels: list[str], kind: str, args: argparse.Namespace,
            monet: dict[str, Any] | None = None) -> dict[str, Any]:
    """One model kind's part of 5a and 5c: per target the oracle's gap, the sweep, F (Monet: at its operating
    point; dense: at the Δ others of Monet's operating point, `monet[target]["operating"]`) and the relearning
    curves (dense: the attribution mask of as many neurons as that Δ others takes, interpolated)."""
    report = json.loads((demo / "report" / "report.json").read_text())
    seq_len, batch, seed, ratio = report["seq_len"], report["batch_size"], report["seed"], report["ratio"]
    sets, _ = label_window_sets(TokenDataset(demo / "data", split="validation"), seq_len)
    full_plan = EvalPlan.build(sets, seq_len, args.eval_tokens, batch)
    # A target is read on every window of the plan, another label on `others_tokens` of them (evenly spaced).
    keep = {label: full_plan.positions(label, args.others_tokens) for label in sets}
    read = {label: full_plan.positions(label, None) if label in labels else keep[label] for label in sets}
    source = demo / ("run" if kind == "monet" else "dense-run")
    model = load_eval(source)
    started = time.process_time()
    before_all = full_plan.measure(model, read)
    if kind == "monet":
        pick = monet_rule(demo, model, report["min_mass"])

        def selections(target: str) -> list[tuple[str, Selection]]:
            return [(f"ratio {r:g}", pick(target, r)) for r in sorted({*args.ratios, ratio}, reverse=True)]
    else:
        pick, width = dense_rule(demo, model, seq_len, batch, args.rule_tokens)

        def selections(target: str) -> list[tuple[str, Selection]]:
            return [(f"{f:.1%} of neurons", pick(target, max(1, round(f * width)))) for f in sorted(args.fractions)]

    results: dict[str, Any] = {}
    for target in labels:
        # The target's windows, all; the others', the `keep` subset (the same ones before and after).
        plan = EvalPlan(sets, {label: full_plan.windows[label][slice(None) if label == target else keep[label]]
                               for label in sets}, seq_len, batch)
        before = {label: before_all[label] if label == target or label not in labels
                  else before_all[label][keep[label]] for label in sets}
        without = load_eval(out / f"{kind}-without-{target}")
        after_without = plan.measure(without, {label: plan.positions(label, None) for label in sets})
        gap = oracle_gap(plan, before, after_without, target, seed)
        log(f"{kind} {target}: L_without - L_full {gap['target']['delta']:+.3f} (others {gap['others']['delta']:+.3f})")
        points = sweep(model, plan, before, target, selections(target), seed)
        docs = window_docs(plan, target)
        entry = {"oracle": gap, "points": points,
                 "windows": {"docs": docs, "full": before[target], "without": after_without[target]}}
        if kind == "monet":
            operating = next(p for p in points if p["point"] == f"ratio {ratio:g}")
            fraction = forgotten_fraction(before[target], operating["after_target"], after_without[target], docs,
                                          seed=seed)
            entry["operating"] = {key: operating[key] for key in ("point", "delta_target", "delta_others",
                                                                  "masking_ratio")}
            entry["operating"].update(F=fraction["F"], F_ci95=fraction["ci95"])
            mask = pick(target, ratio)
            what = f"ratio {ratio:g}, {mask.total} experts"
        else:
            operating = monet[target]["operating"]
            at = fraction_at(points, max(operating["delta_others"], 0.0), before[target], after_without[target], docs,
                             seed)
            entry["at_monet_others"] = at
            # Beyond the dense sweep: Monet's share of units instead.
            n = max(1, round((at["masking_ratio"] if at else operating["masking_ratio"]) * width))
            mask = pick(target, n)
            what = f"attribution, {n} neurons per layer"
            # The relearning mask itself, measured (the interpolated F above is between two sweep points).
            point = sweep(model, plan, before, target, [(what, mask)], seed)[0]
            entry["relearn_mask"] = {k: v for k, v in point.items() if k != "after_target"}
        if not args.no_relearn:
            entry["relearn"] = relearn(demo, out, kind, target, mask, what, args)
        results[target] = entry
    log(f"{kind}: {time.process_time() - started:.0f} CPU-s")
    return results


# ----------------------------------------------------------------------------------------------------------
# 5c: relearning


def fine_tune_curve(model: torch.nn.Module, examples: PackedSequences, evaluate: Any, settings: TrainSettings,
                    schedule: list[int], full_loss: float, mask: Any = None) -> dict[str, Any]:
    """Fine-tune `model` on `examples` (windows in the training loop's seeded order, `settings`' batch size,
    learning rate held constant, gradient clipping and weight decay as in training) with `mask` (a context:
    the deletion) on throughout, evaluating `evaluate(model)` (the target's validation loss) at step 0 and at
    each step of `schedule`; stops once half of the lost loss (against `full_loss`) is back."""
    order = WindowOrder(len(examples), settings.seed)
    optimizer = build_optimizer(model, settings)
    params = [p for p in model.parameters() if p.requires_grad]
    started = time.process_time()
    with mask if mask is not None else contextlib.nullcontext():
        steps, losses = [0], [evaluate(model)]
        for step in range(1, max(schedule) + 1):
            model.train()
            batch = torch.stack([examples[i] for i in order.take(settings.batch_size)])
            out = model(input_ids=batch, labels=batch, use_cache=False)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step in schedule:
                model.eval()
                steps.append(step)
                losses.append(evaluate(model))
                if half_recovery_step(steps, losses, full_loss) is not None:
                    break
    model.eval()
    return {"steps": steps, "losses": losses, "full_loss": full_loss, "start_gap": losses[0] - full_loss,
            "half_recovery_step": half_recovery_step(steps, losses, full_loss), "max_steps": max(schedule),
            "cpu_s": time.process_time() - started}


def relearn(demo: Path, out: Path, kind: str, target: str, mask: Selection, what: str, args: argparse.Namespace
            ) -> dict[str, Any]:
    """5c for one model kind and target: the full model fine-tuned with `mask` on, and the retrained-without
    model fine-tuned, on the target's training text; both read on the same validation windows."""
    report = json.loads((demo / "report" / "report.json").read_text())
    seq_len, batch = report["seq_len"], report["batch_size"]
    sets, _ = label_window_sets(TokenDataset(demo / "data", split="validation"), seq_len)
    plan = EvalPlan.build(sets, seq_len, args.eval_tokens, batch)
    picks = {target: plan.positions(target, args.relearn_tokens)}

    def evaluate(model: torch.nn.Module) -> float:
        return float(plan.measure(model, picks)[target].mean())

    examples = PackedSequences(TokenDataset(demo / "data", split="train"), seq_len, label=target)
    schedule = [s for s in RELEARN_SCHEDULE if s < args.relearn_steps] + [args.relearn_steps]
    source = demo / ("run" if kind == "monet" else "dense-run")
    settings = replace(demo_train_settings(source, demo / "data", out / "unused"), lr=args.relearn_lr)
    full_model = load_eval(source)
    full_loss = evaluate(full_model)
    result: dict[str, Any] = {"eval_tokens": plan.tokens(picks[target]), "train_windows": len(examples),
                              "lr": args.relearn_lr, "mask": what}
    log(f"relearn {kind} {target}: masked ({what})")
    result["masked"] = fine_tune_curve(full_model, examples, evaluate, settings, schedule, full_loss,
                                       units_of(full_model).masked(mask))
    log(f"  half back at step {result['masked']['half_recovery_step']} (gap {result['masked']['start_gap']:+.3f})")
    log(f"relearn {kind} {target}: retrained without")
    result["without"] = fine_tune_curve(load_eval(out / f"{kind}-without-{target}"), examples, evaluate, settings,
                                        schedule, full_loss)
    log(f"  half back at step {result['without']['half_recovery_step']} (gap {result['without']['start_gap']:+.3f})")
    # The reference: the full model itself fine-tuned as long (the same text also helps a model that lost
    # nothing; "half back" above counts that gain too).
    longest = max(result["masked"]["steps"][-1], result["without"]["steps"][-1])
    if longest:
        result["full"] = fine_tune_curve(load_eval(source), examples, evaluate, settings,
                                         [s for s in schedule if s <= longest], full_loss)
        log(f"  full model fine-tuned: {result['full']['losses'][-1] - full_loss:+.3f} after {longest} steps")
    return result


# ----------------------------------------------------------------------------------------------------------
# Output


def plain(value: Any) -> Any:
    """JSON-ready: arrays as lists, floats rounded to 6 digits, private ("_") keys dropped."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, (float, np.floating)):
        return round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _ci(value: float | None, ci: list[float | None]) -> str:
    if value is None or None in ci or not np.isfinite(value):   # nan is written as null
        return "-"
    return f"{value:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def markdown(parts: dict[str, Any], labels: list[str]) -> str:
    lines = ["| label | model | L_without - L_full: target | others | mask | Δ target | Δ others | F |",
             "|---|---|---|---|---|---|---|---|"]
    for target in labels:
        for kind in ("monet", "dense"):
            entry = parts[kind][target]
            gap = entry["oracle"]
            if kind == "monet":
                at = entry["operating"]
                mask = f"{at['point']} (operating point, {at['masking_ratio']:.1%} of experts)"
            else:
                at = entry["at_monet_others"]
                mask = ("never reaches Monet's Δ others" if at is None else
                        f"attribution, {at['masking_ratio']:.2%} of neurons (interpolated: {at['between'][0]} - "
                        f"{at['between'][1]})")
            cells = "- | - | -" if at is None else \
                f"{at['delta_target']:+.3f} | {at['delta_others']:+.3f} | {_ci(at['F'], at['F_ci95'])}"
            lines.append(f"| {target} | {kind} | {_ci(gap['target']['delta'], gap['target']['ci95'])} | "
                         f"{_ci(gap['others']['delta'], gap['others']['ci95'])} | {mask} | {cells} |")
    lines += ["", "Sweeps (Δ target / Δ others; CIs in the JSON):", ""]
    for target in labels:
        for kind in ("monet", "dense"):
            points = ", ".join(f"{p['point']}: {p['delta_target']:+.3f} / {p['delta_others']:+.3f}"
                               for p in parts[kind][target]["points"])
            lines.append(f"* {target}, {kind}: {points}")
    if any("relearn" in parts[kind][t] for kind in ("monet", "dense") for t in labels):
        lines += ["", "| label | model | start of the fine-tune | lost loss at step 0 | steps to half back | "
                  "target loss at evaluated steps |", "|---|---|---|---|---|---|"]
        for target in labels:
            for kind in ("monet", "dense"):
                result = parts[kind][target].get("relearn")
                if result is None:
                    continue
                for start, name in (("masked", f"full model, mask on ({result['mask']})"),
                                    ("without", "retrained without"), ("full", "full model, no mask (reference)")):
                    curve = result.get(start)
                    if curve is None:
                        continue
                    half = curve["half_recovery_step"]
                    trace = ", ".join(f"{s}: {v:.3f}" for s, v in zip(curve["steps"], curve["losses"], strict=True))
                    lines.append(f"| {target} | {kind} | {name} | {curve['start_gap']:+.3f} | "
                                 f"{half if half is not None else '> ' + str(curve['max_steps'])} | {trace} |")
    return "\n".join(lines) + "\n"

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--labels", nargs="+", required=True)
    parser.add_argument("--stage", choices=["train", "monet", "dense", "report", "all"], default="all",
                        help="train: the without models; monet / dense: that model's measurements (dense after "
                             "monet: it is read at Monet's Δ others), written to OUT/part-KIND.json; report: "
                             "OUT/retrain.json and .md from the parts; all: everything in order")
    parser.add_argument("--kinds", nargs="+", choices=["monet", "dense"], default=["monet", "dense"],
                        help="models to train in the train stage")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="target validation tokens per label")
    parser.add_argument("--others-tokens", type=int, default=2048, help="validation tokens per other label")
    parser.add_argument("--ratios", type=float, nargs="+", default=[3.0, 2.0, 1.25],
                        help="Monet sweep ratios (the report's operating ratio is added)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.035, 0.05, 0.08, 0.15],
                        help="dense sweep: shares of each layer's neurons")
    parser.add_argument("--rule-tokens", type=int, default=40_000, help="training tokens for the attribution rule")
    parser.add_argument("--relearn-steps", type=int, default=80)
    parser.add_argument("--relearn-lr", type=float, default=5e-4)
    parser.add_argument("--relearn-tokens", type=int, default=2048, help="target validation tokens per evaluation")
    parser.add_argument("--no-relearn", action="store_true")
    args = parser.parse_args(argv)
    demo, out = Path(args.demo), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = ["train", "monet", "dense", "report"] if args.stage == "all" else [args.stage]
    if "train" in stages:
        for label in args.labels:
            train_without(demo, out, label, tuple(args.kinds))
    for kind in ("monet", "dense"):
        if kind in stages:
            monet = json.loads((out / "part-monet.json").read_text())["results"] if kind == "dense" else None
            started = time.perf_counter()
            results = measure(demo, out, args.labels, kind, args, monet)
            write_json(out / f"part-{kind}.json", plain({
                "command": " ".join(sys.argv), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "settings": {k: v for k, v in vars(args).items() if k not in ("demo", "out", "stage")},
                "wall_s": time.perf_counter() - started, "results": results}))
    if "report" in stages:
        parts = {kind: json.loads((out / f"part-{kind}.json").read_text()) for kind in ("monet", "dense")}
        write_json(out / "retrain.json", {
            "demo": str(demo), "labels": args.labels,
            "train": {kind: dataclasses.asdict(demo_train_settings(demo / ("run" if kind == "monet" else "dense-run"),
                                                                   "DATA", "OUT")) for kind in ("monet", "dense")},
            **{kind: part for kind, part in parts.items()}})
        text = markdown({kind: part["results"] for kind, part in parts.items()}, args.labels)
        atomic_write(out / "retrain.md", text)
        print(text)
    return 0

if __name__ == "__main__":
    sys.exit(main())

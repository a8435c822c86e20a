"""Monet against fairer baselines on one finished demo: dense rules and an SAE (issue 23, item 4; not run in CI).

    python benchmarks/unlearning/baselines.py --demo DEMO --out OUT [--dense attribution:zero attribution:mean]
                                              [--fractions 0.15 0.4] [--sae-latents 1024 --sae-k 32] [--no-sae]

DEMO is a `monet demo` directory (data/, run/, dense-run/, report/). Monet's numbers are read from its
report (nothing Monet is re-run); each baseline is measured by the protocol's own `unlearn.edit_effect`
(paired Δ, CIs clustered by document) on the report's windows, every point sized like the report's sweep
points (the report's sweep_tokens of the target, a quarter of that per other label: a subset of the operating point's
windows): per target label the same share of units as Monet masked, and a sweep over --fractions. Baselines:

* dense rules `RULE:ABLATION` (`--dense`): neurons ranked by `attribution` (activation x gradient, the
  estimated loss rise on the target minus the others' mean) or `class-mean` (signed class-mean difference),
  deleted by zero or mean ablation; the report's own dense baseline (specificity, zero) is read from it;
* `sae`: a TopK SAE per layer trained on the dense model's MLP output (`monet.experiments.sae`), latents
  ranked by the class-mean difference of their activations, deleted by removing their decoder terms (the
  SAE error kept); its reconstruction cost (every MLP output replaced by the reconstruction) is measured on
  the same windows.

No control masks are drawn and no ceiling is measured (the comparison is along forget-retain curves; the
report has the dense ceiling). Writes OUT/baselines.json and OUT/baselines.md: per label Monet's Δ target
and Δ others, and each baseline's Δ others at Monet's Δ target (interpolated on its curve, which starts at
(0, 0): nothing deleted), its operating point and its largest Δ target.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from monet.checkpoint import load_checkpoint
from monet.data import TokenDataset
from monet.evaluate import label_window_sets
from monet.experiments.dense_rules import (
    attribution_rises,
    class_mean_difference,
    mean_ablated,
    neuron_attributions,
    neuron_label_means,
    overall_means,
    top_by_score,
)
from monet.experiments.protocol_stats import delta_ci, others_at_target
from monet.experiments.sae import (
    latent_label_means,
    mlp_outputs,
    sae_deleted,
    sae_reconstructed,
    save_saes,
    train_sae,
)
from monet.experiments.unlearn import (
    SWEEP_FIELDS,
    EvalPlan,
    Measure,
    curve_points,
    edit_effect,
    unit_mask,
    window_documents,
)
from monet.interp.atlas import plan_windows
from monet.interp.criteria import Selection
from monet.io import write_json


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def measured_before(model, plan: EvalPlan, measure: Measure, targets: list[str]) -> dict[str, np.ndarray]:
    """The unmasked per-window losses of every window a `measure`-sized edit reads (NaN elsewhere: never read)."""
    needed = {label: np.union1d(plan.positions(label, measure.target) if label in targets else [],
                                plan.positions(label, measure.others)).astype(np.int64) for label in plan.sets}
    losses = plan.measure(model, needed)
    before = {}
    for label, positions in needed.items():
        before[label] = np.full(len(plan.windows[label]), np.nan)
        before[label][positions] = losses[label]
    return before


def run_baseline(name: str, model, plan: EvalPlan, before: dict, targets: list[str], shares: dict[str, float],
                 fractions: list[float], width: int, layers: int, scores, mask, measure: Measure, seed: int) -> dict:
    """One baseline on the forget-retain curve: per target the units with the highest `scores(target)`, as
    many as Monet masked ("operating") and each share of `fractions` ("sweep"), every point measured like
    the report's sweep points (`measure`) with clustered CIs (`unlearn.edit_effect`)."""
    def top(target: str, share: float) -> Selection:
        n = max(1, round(share * width))
        return Selection(width, layers, top_by_score(scores(target), n), criterion=f"top {n} by {name}")

    started = time.perf_counter()
    masked = {}
    for target in targets:
        points = [(f, edit_effect(model, plan, before, top(target, f), target, measure, seed, mask))
                  for f in [shares[target], *fractions]]
        for _, point in points:
            point.pop("windows")
        masked[target] = {**points[0][1], "sweep": [{"parameter": f, **{k: p[k] for k in SWEEP_FIELDS}}
                                                    for f, p in points[1:]]}
        log(f"{name} {target}: operating {masked[target]['delta_target']:+.3f} / {masked[target]['delta_others']:+.3f}")
    seconds = time.perf_counter() - started
    log(f"{name}: {seconds:.0f} s")
    return {"masked": masked, "seconds": seconds}


def compare(monet: dict, baselines: dict[str, dict]) -> dict[str, dict]:
    """Per label: Monet's operating point and each baseline's Δ others at Monet's Δ target."""
    rows = {}
    for target, entry in monet["masked"].items():
        row = {"monet": {k: entry[k] for k in ("delta_target", "delta_target_ci95", "delta_others",
                                                 "delta_others_ci95", "masking_ratio")}}
        for name, result in baselines.items():
            if target not in result["masked"]:
                continue
            own = result["masked"][target]
            curve = [{"delta_target": 0.0, "delta_others": 0.0, "masking_ratio": 0.0}, *curve_points(own)]
            row[name] = {"others_at_monet_target": others_at_target(curve, entry["delta_target"]),
                         "max_delta_target": max(p["delta_target"] for p in curve),
                         "operating": {k: own[k] for k in ("delta_target", "delta_target_ci95", "delta_others",
                                                           "delta_others_ci95", "masking_ratio")},
                         "curve": curve}
        rows[target] = row
    return rows


def markdown(comparison: dict, names: list[str], reconstruction: dict | None) -> str:
    def num(value):
        return "-" if value is None else f"{value:+.3f}"

    head = "| label | Monet Δ target | Monet Δ others | " + " | ".join(
        f"{n}: Δ others at Monet's Δ target (max Δ target)" for n in names) + " |"
    lines = [head, "|" + "---|" * (3 + len(names))]
    for label, row in comparison.items():
        cells = [label, num(row["monet"]["delta_target"]), num(row["monet"]["delta_others"])]
        for n in names:
            cell = row.get(n)
            cells.append("-" if cell is None else
                         f"{num(cell['others_at_monet_target'])} ({num(cell['max_delta_target'])})")
        lines.append("| " + " | ".join(cells) + " |")
    monet_others = [row["monet"]["delta_others"] for row in comparison.values()]
    cells = ["mean (labels reached)", "", num(float(np.mean(monet_others)))]
    for n in names:
        reached = [(row[n]["others_at_monet_target"], row["monet"]["delta_others"]) for row in comparison.values()
                   if n in row and row[n]["others_at_monet_target"] is not None]
        if reached:
            theirs, ours = (num(float(np.mean(column))) for column in zip(*reached, strict=True))
            cells.append(f"{theirs} vs Monet {ours} ({len(reached)}/{len(comparison)})")
        else:
            cells.append(f"- (0/{len(comparison)})")
    lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Operating point (the same share of units as Monet masked): Δ target / Δ others", "",
              "| label | Monet | " + " | ".join(names) + " |", "|" + "---|" * (2 + len(names))]
    for label, row in comparison.items():
        cells = [label, f"{num(row['monet']['delta_target'])} / {num(row['monet']['delta_others'])}"]
        for n in names:
            op = row.get(n, {}).get("operating")
            cells.append("-" if op is None else f"{num(op['delta_target'])} / {num(op['delta_others'])}")
        lines.append("| " + " | ".join(cells) + " |")
    if reconstruction:
        lines += ["", f"SAE reconstruction cost (every MLP output replaced by its reconstruction): mean Δ over "
                      f"labels {num(reconstruction['mean'])}; per label: " + ", ".join(
                          f"{k} {num(v['delta'])} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]"
                          for k, v in reconstruction["labels"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", required=True, help="a finished `monet demo` directory")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dense", nargs="*", default=["attribution:zero", "attribution:mean"])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.1, 0.3, 0.5])
    parser.add_argument("--rule-tokens", type=int, default=40_000, help="training tokens for the rules' statistics")
    parser.add_argument("--no-sae", action="store_true")
    parser.add_argument("--sae-tokens", type=int, default=80_000, help="training tokens of MLP outputs per layer")
    parser.add_argument("--sae-latents", type=int, default=1024)
    parser.add_argument("--sae-k", type=int, default=32)
    parser.add_argument("--sae-steps", type=int, default=500)
    parser.add_argument("--sae-batch", type=int, default=512)
    parser.add_argument("--targets", nargs="*", default=None, help="labels (default: the report's)")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="only combine these earlier OUT directories' baselines.json into OUT (nothing is run)")
    args = parser.parse_args(argv)

    demo, out = Path(args.demo), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = json.loads((demo / "report" / "report.json").read_text())
    if args.merge:
        runs = [json.loads((Path(d) / "baselines.json").read_text()) for d in args.merge]
        results = {name: result for run in runs for name, result in run["results"].items()}
        reconstruction = next((run["sae_reconstruction"] for run in runs if run.get("sae_reconstruction")), None)
        comparison = compare(report["monet"], results)
        write_json(out / "baselines.json", {"demo": str(demo), "command": " ".join(sys.argv), "merged": args.merge,
                                            "commands": [run["command"] for run in runs], "results": results,
                                            "comparison": comparison, "sae_reconstruction": reconstruction})
        text = markdown(comparison, list(results), reconstruction)
        (out / "baselines.md").write_text(text)
        print(text)
        return 0
    targets = args.targets or list(report["monet"]["masked"])
    shares = {t: report["summary"][t]["masking_ratio"] for t in targets}
    model, _ = load_checkpoint(demo / "dense-run", device="cpu", load_tokenizer=False)
    model.eval()
    data = demo / "data"
    sets, _ = label_window_sets(TokenDataset(data, split="validation"), report["seq_len"])
    plan = EvalPlan.build(sets, report["seq_len"], report["eval_tokens"], report["batch_size"])
    # Every baseline point is measured like the report's sweep points (its target windows are a subset of
    # the operating point's): a fifth of the cost, which a shared 2-core machine needs.
    measure = Measure(report["sweep_tokens"], max(report["sweep_tokens"] // 4, report["seq_len"]))
    before = measured_before(model, plan, measure, targets)
    train = TokenDataset(data, split="train")
    windows = plan_windows(train.docs, report["seq_len"], args.rule_tokens)
    layers = len(model.model.layers)
    width = model.model.layers[0].mlp.down_proj.in_features
    log(f"threads {torch.get_num_threads()}; targets {targets}")

    results: dict[str, dict] = {"specificity:zero (report)": report["dense_protocol"]}
    means, counts = neuron_label_means(model, train, windows, report["batch_size"])
    centre = overall_means(means, counts)
    attributions = None
    for spec in args.dense:
        rule, ablation = spec.split(":")
        if rule == "attribution":
            if attributions is None:
                attributions = neuron_attributions(model, train, windows, report["batch_size"])
                log("attributions measured")
            statistic = attribution_rises(*attributions, centre if ablation == "mean" else None)
        elif rule == "class-mean":
            statistic = means
        else:
            raise SystemExit(f"unknown dense rule {rule!r} (attribution, class-mean)")

        def scores(target: str, statistic=statistic) -> list[np.ndarray]:
            return [class_mean_difference(s, train.labels.index(target), counts) for s in statistic]

        def mask(m, selection: Selection):
            return mean_ablated(m, selection.ids, centre)

        results[spec] = run_baseline(spec, model, plan, before, targets, shares, args.fractions, width, layers,
                                     scores, mask if ablation == "mean" else unit_mask, measure, report["seed"])
        write_json(out / "baselines.partial.json", {"results": results})

    reconstruction = None
    if not args.no_sae:
        activations = mlp_outputs(model, train, plan_windows(train.docs, report["seq_len"], args.sae_tokens),
                                  report["batch_size"])
        saes, stats = [], []
        for layer, x in enumerate(activations):
            started = time.perf_counter()
            sae, stat = train_sae(x, args.sae_latents, args.sae_k, args.sae_steps, args.sae_batch, seed=layer)
            stat["seconds"] = time.perf_counter() - started
            saes.append(sae.eval())
            stats.append(stat)
            log(f"SAE layer {layer}: {stat}")
        save_saes(saes, out / "sae", stats)
        everything = {label: plan.positions(label, measure.target if label in targets else measure.others)
                      for label in plan.sets}
        with sae_reconstructed(model, saes):
            after = plan.measure(model, everything)
        labels = {label: delta_ci(before[label][pos], after[label], seed=report["seed"],
                                  clusters=window_documents(plan, label, pos)) for label, pos in everything.items()}
        reconstruction = {"labels": {k: {"delta": v["delta"], "ci95": v["ci95"]} for k, v in labels.items()},
                          "mean": float(np.mean([v["delta"] for v in labels.values()])),
                          "tokens_per_label": measure.target, "training": stats,
                          "config": {"latents": args.sae_latents, "k": args.sae_k, "steps": args.sae_steps,
                                     "batch": args.sae_batch, "tokens": args.sae_tokens}}
        log(f"SAE reconstruction cost: mean {reconstruction['mean']:+.3f}")
        latent_means, latent_counts = latent_label_means(model, saes, train, windows, report["batch_size"])

        def sae_scores(target: str) -> list[np.ndarray]:
            return [class_mean_difference(m, train.labels.index(target), latent_counts) for m in latent_means]

        results["sae"] = run_baseline("sae", model, plan, before, targets, shares, args.fractions, args.sae_latents,
                                      layers, sae_scores, lambda m, selection: sae_deleted(m, saes, selection.ids),
                                      measure, report["seed"])

    comparison = compare(report["monet"], results)
    write_json(out / "baselines.json", {"demo": str(demo), "command": " ".join(sys.argv), "targets": targets,
                                        "fractions": args.fractions, "threads": torch.get_num_threads(),
                                        "results": results, "comparison": comparison,
                                        "sae_reconstruction": reconstruction})
    (out / "baselines.partial.json").unlink(missing_ok=True)   # kept only while later baselines could fail
    text = markdown(comparison, list(results), reconstruction)
    (out / "baselines.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

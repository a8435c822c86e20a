"""The retrain oracle's control: the demo's model trained again on the FULL corpus by retrain.py's own
procedure (same settings, same code path, one thread), so that L_without - L_full can be read between two
runs that differ only in the removed documents (and run-to-run noise), not against the demo's own run.

    OMP_NUM_THREADS=1 python benchmarks/unlearning/retrain_control.py --demo DEMO --out OUT --labels python
        [--kinds monet dense] [--stage train|measure|all]

OUT is retrain.py's OUT (its `KIND-without-LABEL` runs and `part-KIND.json` are read). train: OUT/KIND-full-
retrained. measure: on exactly retrain.py's windows (same --eval-tokens / --others-tokens), per label, the
oracle gap three ways (without - demo full, without - retrained full, retrained full - demo full: the last
is the noise between two full-corpus runs) and, for Monet, F with the retrained run as the full model: the
demo mask's per-window Δ (masked - demo full) over (without - retrained full). Writes OUT/control.json
(keys: "second full" = the retrained run, or the --reference run).

--reference LABEL=DIR reads DIR/KIND-without-LABEL (another label's retrain.py run) as a second "full"
model instead of training one: it saw all of the target's documents but took another training trajectory,
so its gap to the target's without-run prices the target apart from the full run's own trajectory (LABEL's
windows are left out of the others, where that run lacks LABEL). Writes OUT/control-LABEL.json then.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

from monet.data import TokenDataset
from monet.evaluate import label_window_sets
from monet.experiments.unlearn import EvalPlan
from monet.io import write_json
from monet.train import train

_spec = importlib.util.spec_from_file_location("unlearning_retrain", Path(__file__).with_name("retrain.py"))
retrain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(retrain)


def train_full(demo: Path, out: Path, kind: str) -> Path:
    run = out / f"{kind}-full-retrained"
    settings = retrain.demo_train_settings(demo / ("run" if kind == "monet" else "dense-run"), demo / "data", run)
    if retrain.trained(run, settings.max_steps) is None:
        retrain.log(f"training {run.name} ({settings.preset}, {settings.max_steps} steps, seed {settings.seed})")
        started = time.process_time()
        train(settings)
        retrain.log(f"{run.name}: {time.process_time() - started:.0f} CPU-s")
    return run


def measure(demo: Path, out: Path, labels: list[str], kind: str, args: argparse.Namespace,
            reference: tuple[str, Path] | None = None) -> dict:
    # retrain.measure's windows, rebuilt the same way (the target's all, the others' evenly spaced subset).
    report = json.loads((demo / "report" / "report.json").read_text())
    seq_len, batch, seed = report["seq_len"], report["batch_size"], report["seed"]
    sets, _ = label_window_sets(TokenDataset(demo / "data", split="validation"), seq_len)
    full_plan = EvalPlan.build(sets, seq_len, args.eval_tokens, batch)
    keep = {label: full_plan.positions(label, args.others_tokens) for label in sets}
    part_file = out / f"part-{kind}.json"
    if not part_file.is_file():
        raise SystemExit(f"{part_file} not found: OUT must be a finished `retrain.py --out OUT` directory")
    part = json.loads(part_file.read_text())["results"]
    demo_model = retrain.load_eval(demo / ("run" if kind == "monet" else "dense-run"))
    again = retrain.load_eval(out / f"{kind}-full-retrained" if reference is None else
                              reference[1] / f"{kind}-without-{reference[0]}")
    if reference is not None:
        sets = {label: packed for label, packed in sets.items() if label != reference[0]}
    results = {}
    for target in labels:
        plan = EvalPlan(sets, {label: full_plan.windows[label][slice(None) if label == target else keep[label]]
                               for label in sets}, seq_len, batch)
        every = {label: plan.positions(label, None) for label in sets}
        full, rerun = plan.measure(demo_model, every), plan.measure(again, every)
        without = plan.measure(retrain.load_eval(out / f"{kind}-without-{target}"), every)
        # The saved per-window losses must be these windows' (a check that the plan was rebuilt alike).
        saved = part[target]["windows"]
        if not np.allclose(saved["full"], full[target], atol=1e-4):
            raise SystemExit(f"{kind} {target}: the rebuilt windows differ from part-{kind}.json's")
        entry = {"without_minus_demo_full": retrain.oracle_gap(plan, full, without, target, seed),
                 "without_minus_second_full": retrain.oracle_gap(plan, rerun, without, target, seed),
                 "second_full_minus_demo_full": retrain.oracle_gap(plan, full, rerun, target, seed)}
        if kind == "monet":
            operating = next(p for p in part[target]["points"] if p["point"] == part[target]["operating"]["point"])
            forgot = np.asarray(operating["after_target"]) - full[target]
            # The demo mask's per-window loss rise added to the retrained run: F against that run's gap.
            entry["F_vs_second_full"] = retrain.forgotten_fraction(
                rerun[target], rerun[target] + forgot, without[target], np.asarray(saved["docs"]), seed=seed)
        for name, gap in entry.items():
            if "target" in gap:
                retrain.log(f"{kind} {target} {name}: target {gap['target']['delta']:+.3f} "
                            f"{gap['target']['ci95']}, others {gap['others']['delta']:+.3f} {gap['others']['ci95']}")
        results[target] = entry
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--labels", nargs="+", required=True)
    parser.add_argument("--kinds", nargs="+", choices=["monet", "dense"], default=["monet", "dense"])
    parser.add_argument("--stage", choices=["train", "measure", "all"], default="all")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="as retrain.py's")
    parser.add_argument("--others-tokens", type=int, default=2048, help="as retrain.py's")
    parser.add_argument("--reference", help="LABEL=DIR: DIR/KIND-without-LABEL as the second full model")
    args = parser.parse_args(argv)
    demo, out = Path(args.demo), Path(args.out)
    if not (demo / "report" / "report.json").is_file():
        parser.error(f"--demo {demo} is not a finished `monet demo` directory (no report/report.json)")
    reference = None
    if args.reference:
        if "=" not in args.reference:
            parser.error(f"--reference takes LABEL=DIR (a retrain.py --out with DIR/KIND-without-LABEL), "
                         f"got {args.reference!r}")
        label, where = args.reference.split("=", 1)
        reference = (label, Path(where))
    if args.stage in ("train", "all") and reference is None:
        for kind in args.kinds:
            train_full(demo, out, kind)
    if args.stage in ("measure", "all"):
        name = "control.json" if reference is None else f"control-{reference[0]}.json"
        write_json(out / name, retrain.plain(
            {"command": " ".join(sys.argv), **{kind: measure(demo, out, args.labels, kind, args, reference)
                                               for kind in args.kinds}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

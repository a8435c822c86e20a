"""One control mask's measurement of `monet unlearn`, one pass per label (before) against shared passes
(`EvalPlan.measure`, after), interleaved in one process, on a demo's run (issue 24, item 3).

Per round and target label: the demo's control windows (4 of the target, 1 of each other label, windows of
64 tokens) under a matched control mask, measured both ways; thread CPU time (robust to a loaded machine)
and wall time, and a check that both give bitwise the same losses.

    PYTHONPATH=src python benchmarks/unlearn_passes.py --demo /work/artifacts/demo-int --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from monet.checkpoint import load_checkpoint, resolve_checkpoint
from monet.data import TokenDataset
from monet.evaluate import label_window_sets, window_losses
from monet.experiments.protocol_stats import matched_masks
from monet.experiments.unlearn import (
    EvalPlan,
    atlas_label_means,
    control_positions,
    seen_units,
    select_for_label,
)
from monet.interp.criteria import Selection
from monet.interp.query import Atlas
from monet.interp.units import units_of


def one_pass_per_label(model, plan: EvalPlan, picks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The measurement before the change: one `window_losses` call per label."""
    return {label: window_losses(model, plan.sets[label], plan.batch_size,
                                 indices=plan.windows[label][positions].tolist()).numpy()
            for label, positions in picks.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="/work/artifacts/demo-int")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_checkpoint(resolve_checkpoint(f"{args.demo}/run"), device="cpu", load_tokenizer=False,
                               verify=False)
    model.eval()
    labels, means = atlas_label_means(Atlas(f"{args.demo}/atlas", model=model))
    sets, _ = label_window_sets(TokenDataset(f"{args.demo}/data", split="validation"), 64)
    plan = EvalPlan.build(sets, 64, 16_384, 16)                       # the demo's protocol sizes
    units = units_of(model)
    ways = {"one pass per label": lambda picks: one_pass_per_label(model, plan, picks),
            "shared passes": lambda picks: plan.measure(model, picks)}
    times: dict[str, dict[str, list[float]]] = {way: {"cpu": [], "wall": []} for way in ways}
    load_start = list(os.getloadavg())
    for round_ in range(args.rounds):
        for target in labels:
            selection = select_for_label(means, labels, target, 1.5)
            operating = {label: {"positions": plan.positions(label, 16_384 if label == target else 4_096)}
                         for label in sets}
            subset = control_positions(operating, target, 256, 64, 64)
            picks = {label: operating[label]["positions"][index] for label, index in subset.items()}
            masks, _ = matched_masks([m[labels.index(target)] for m in means], seen_units(means), selection.ids,
                                     n=1, seed=round_)
            control = Selection(selection.units_per_group, selection.groups, masks[0], criterion="control")
            results = {}
            with units.masked(control), torch.no_grad():
                order = list(ways) if round_ % 2 == 0 else list(ways)[::-1]      # alternate who goes first
                for way in order:
                    wall, cpu = time.perf_counter(), time.thread_time()
                    results[way] = ways[way](picks)
                    times[way]["cpu"].append(time.thread_time() - cpu)
                    times[way]["wall"].append(time.perf_counter() - wall)
            a, b = (np.concatenate(list(r.values())) for r in results.values())
            assert a.tobytes() == b.tobytes(), f"losses differ for {target}"
    command = f"PYTHONPATH=src python benchmarks/unlearn_passes.py --demo {args.demo} --rounds {args.rounds}"
    report = {"command": command,
              "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
              "measurements": args.rounds * len(labels), "bitwise_equal": True,
              "median_s": {way: {clock: statistics.median(v) for clock, v in t.items()} for way, t in times.items()}}
    before, after = (report["median_s"][way]["cpu"] for way in ways)
    report["cpu_ratio_after_vs_before"] = after / before
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()

"""The demo's unlearning protocol over several training seeds: mean ± sd per label (not run in CI).

    python benchmarks/unlearning/run.py --out /tmp/unlearning-seeds [--seeds 0 1 2] [--existing 0=monet-demo]
                                        [--source code] [--write benchmarks/unlearning]

Each seed is one `monet demo --seed S` (its own directory under --out: corpus, Monet and dense runs,
atlases, report; finished steps are reused, so an interrupted benchmark continues). `--existing S=DIR`
takes a finished demo directory for seed S instead of running it. The corpus and the protocol's random
draws are the same for every seed; only the models' training seed changes. Writes results.json (every
seed's summary rows and the aggregate) and RESULTS.md (the table) into --write.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

FIELDS = ("delta_target", "delta_others", "random_delta_target_p95", "masking_ratio")


def run_seed(seed: int, out: Path, source: str) -> Path:
    directory = out / f"seed-{seed}"
    if not (directory / "report" / "report.json").is_file():
        command = [sys.executable, "-m", "monet", "demo", "--out", str(directory), "--source", source,
                   "--seed", str(seed), "--quiet"]
        print("$", " ".join(command), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True)
        print(f"seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return directory


def mean_sd(values: list[float]) -> dict[str, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def aggregate(reports: dict[int, dict]) -> dict:
    labels = list(next(iter(reports.values()))["summary"])
    result = {}
    for model in ("summary", "dense"):
        rows = {}
        for label in labels:
            per_seed = [r[model][label] for r in reports.values() if label in r.get(model, {})]
            if not per_seed:
                continue
            rows[label] = {field: mean_sd([row.get(field) for row in per_seed]) for field in FIELDS}
            rows[label]["passed"] = sum(bool(row.get("passed")) for row in per_seed)
            rows[label]["seeds"] = len(per_seed)
        result["monet" if model == "summary" else "dense"] = rows
    equal = {}
    for label in labels:
        pairs = [r["equal_target"][label] for r in reports.values() if label in r.get("equal_target", {})]
        if pairs:
            equal[label] = {"monet_delta_others": mean_sd([p["monet_delta_others"] for p in pairs]),
                            "dense_delta_others": mean_sd([p["dense_delta_others"] for p in pairs]),
                            "dense_reached": sum(p["dense_delta_others"] is not None for p in pairs)}
    result["equal_target"] = equal
    return result


def fmt(stat: dict[str, float], digits: int = 3) -> str:
    if not stat["n"]:
        return "-"
    return f"{stat['mean']:+.{digits}f} ± {stat['sd']:.{digits}f}"


def markdown(result: dict, seeds: list[int], command: str) -> str:
    lines = [f"# Unlearning over {len(seeds)} training seeds ({', '.join(map(str, seeds))})", "",
             f"Command: `{command}`", "",
             "Δ = validation loss after masking minus before (nats/token), mean ± sd over seeds; bar = Δ target",
             ">= 0.10, >= 5 x max(Δ others, 0) and > the random control's p95 (seeds passing / seeds).", "",
             "| label | Monet Δ target | Δ others | random p95 | masked % | bar | dense Δ target | dense Δ others |"
             " dense Δ others at Monet's Δ target |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, row in result["monet"].items():
        dense = result["dense"].get(label)
        equal = result["equal_target"].get(label)
        ratio = row["masking_ratio"]
        at_equal = (f"{fmt(equal['dense_delta_others'])} ({equal['dense_reached']}/{row['seeds']} reached)"
                    if equal else "-")
        lines.append(
            f"| {label} | {fmt(row['delta_target'])} | {fmt(row['delta_others'])} | "
            f"{fmt(row['random_delta_target_p95'])} | {100 * ratio['mean']:.2f} | {row['passed']}/{row['seeds']} | "
            f"{fmt(dense['delta_target']) if dense else '-'} | {fmt(dense['delta_others']) if dense else '-'} | "
            f"{at_equal} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--existing", nargs="*", default=[], help="SEED=DIR: a finished demo directory for a seed")
    parser.add_argument("--source", default="code", choices=["code", "languages", "domains"])
    parser.add_argument("--write", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    existing = {}
    for item in args.existing:
        seed, _, directory = item.partition("=")
        if not seed.isdigit() or not directory:
            parser.error(f"--existing takes SEED=DIR (e.g. 0=monet-demo), got {item!r}")
        existing[int(seed)] = Path(directory)
    reports = {}
    for seed in args.seeds:
        directory = existing.get(seed) or run_seed(seed, args.out, args.source)
        reports[seed] = json.loads((directory / "report" / "report.json").read_text(encoding="utf-8"))
    result = aggregate(reports)
    command = "python benchmarks/unlearning/run.py " + " ".join(sys.argv[1:])
    args.write.mkdir(parents=True, exist_ok=True)
    (args.write / "results.json").write_text(json.dumps(
        {"command": command, "source": args.source, "seeds": args.seeds, "aggregate": result,
         "per_seed": {str(s): {"summary": r["summary"], "dense": r.get("dense"), "equal_target": r.get("equal_target")}
                      for s, r in reports.items()}}, indent=1, default=str) + "\n", encoding="utf-8")
    text = markdown(result, args.seeds, command)
    (args.write / "RESULTS.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Monosemanticity of Monet experts vs dense LLaMA neurons trained on the same data (paper §5.1: 2.2% vs 6%).

    python benchmarks/monosemanticity.py DATA MONET_RUN DENSE_RUN [--max-tokens 100000] [--out FILE.json]

For each model, `monet.interp.monosemanticity.measure` streams `max-tokens` training tokens (balanced
across labels) and reports, per routing group (Monet) or layer (dense), the mean label purity and entropy of
units seen at least 10 times and the share of units specialised in each label (mean score on the label
>= 2x every other label).
"""

from __future__ import annotations

import argparse
import json

from monet.checkpoint import load_checkpoint
from monet.data import TokenDataset
from monet.interp.monosemanticity import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("runs", nargs="+", help="run or checkpoint directories (Monet and/or dense)")
    parser.add_argument("--max-tokens", type=int, default=100_000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dataset = TokenDataset(args.data, "train")
    results = {}
    for run in args.runs:
        model, _ = load_checkpoint(run)
        report = measure(model, dataset, max_tokens=args.max_tokens, seq_len=128, progress=False)
        keys = ("group", "units", "units_seen", "mean_purity", "mean_entropy_bits", "mean_specialised_share")
        results[run] = {"kind": report["kind"], "tokens": report["tokens"],
                        "mean_specialised_share": report["mean_specialised_share"],
                        "mean_purity": report["mean_purity"],
                        "groups": [{k: g[k] for k in keys} for g in report["groups"]]}
        print(run, json.dumps(results[run]), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()

"""Masked vs unmasked evaluation: time ratio and the largest tensor per token (never N = E^2 values).

    .venv/bin/python benchmarks/masking.py [--preset small] [--tokens 2048] [--repeats 7] [--json OUT]

A model of the preset (random weights: the cost of the masked path does not depend on training) runs
an evaluation forward (no grad) on the same batch, unmasked and with 0.1%, 1% and 15% of every
group's experts deleted, in interleaved order (A, B, C, D, A, B, ...), after a warm-up. Reported: the
median time of each case, its min-max, the ratio to the unmasked median, and, from one traced
forward per case, the largest tensor created (elements) divided by the number of tokens, next to N.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch.overrides import TorchFunctionMode

import monet
from monet.edits import ExpertEdits, apply_edits, clear_edits


class LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch function returns inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def random_edits(config, fraction: float, seed: int = 0) -> ExpertEdits:
    n = config.moe_experts ** 2
    generator = torch.Generator().manual_seed(seed)
    edits = ExpertEdits(num_experts=config.moe_experts, num_groups=config.num_routing_groups)
    count = max(1, int(round(fraction * n)))
    for group in range(config.num_routing_groups):
        edits.delete(group, torch.randperm(n, generator=generator)[:count].tolist())
    return edits


@torch.no_grad()
def forward(model, ids) -> None:
    model(input_ids=ids, use_cache=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per forward (batch x 128)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config = monet.preset(args.preset)
    model = monet.MonetForCausalLM(config).eval()
    seq = min(128, args.tokens)
    ids = torch.randint(0, config.vocab_size, (max(1, args.tokens // seq), seq))
    tokens = ids.numel()
    cases = {"unmasked": None, **{f"masked {f * 100:g}%": random_edits(config, f) for f in (0.001, 0.01, 0.15)}}

    def run(name: str) -> float:
        clear_edits(model)
        if cases[name] is not None:
            apply_edits(model, cases[name])
        started = time.perf_counter()
        forward(model, ids)
        return time.perf_counter() - started

    largest = {}
    for name in cases:          # warm-up + trace of the largest tensor
        run(name)
        clear_edits(model)
        if cases[name] is not None:
            apply_edits(model, cases[name])
        with LargestTensor() as trace:
            forward(model, ids)
        largest[name] = trace.largest
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name in cases:
            times[name].append(run(name))
    clear_edits(model)

    base = statistics.median(times["unmasked"])
    n = config.moe_experts ** 2
    results = {
        "preset": args.preset, "tokens": tokens, "repeats": args.repeats, "experts_per_group_N": n,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()),
        "cases": {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                         "ratio_to_unmasked": statistics.median(t) / base,
                         "largest_tensor_per_token": largest[name] / tokens}
                  for name, t in times.items()},
    }
    print(f"{args.preset}: {tokens} tokens, N = {n:,} experts per group, load {results['loadavg'][0]:.1f}")
    print(f"{'case':<16} {'median s':>9} {'min-max s':>15} {'ratio':>6} {'largest/token':>14}")
    for name, row in results["cases"].items():
        print(f"{name:<16} {row['median_s']:>9.3f} {row['min_s']:>7.3f}-{row['max_s']:<7.3f} "
              f"{row['ratio_to_unmasked']:>6.2f} {row['largest_tensor_per_token']:>14,.0f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

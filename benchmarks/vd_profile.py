"""Why the VD block's sparse forward stays above 0.5x the dense MLP on the CPU (issue 24, item 4).

Per released shape: the VD expert layer on the sparse path, its router and routing structure (`prep`, both
per group of `moe_groups` layers) and the dense relu^2 MLP of equal width, timed interleaved (the block
ratio of `monet bench`: (vd + (router + prep) / moe_groups) / dense), then one torch.profiler table of
the VD forward with its self time grouped by kind of work, beside the work each path does: multiply-adds
per token and bytes of gathered / scattered rows per token (float32).

    PYTHONPATH=src python benchmarks/vd_profile.py --repeats 5 --clock cpu --json benchmarks/vd_profile.json
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

import torch
from torch import nn

from monet import sparse
from monet.config import preset
from monet.experiments import bench
from monet.io import write_json
from monet.model import MonetRouter, build_experts

# Self CPU time of the VD forward's operators, by what the operator does on this path (monet.sparse).
KINDS = {"aten::index_select": "gather rows of x per half", "aten::index": "gather rows of x per half",
         "aten::addmm": "per-half matmuls", "aten::mm": "per-half matmuls",
         "aten::scatter_add_": "scatter products onto tokens", "aten::index_add_": "scatter products onto tokens",
         "aten::cat": "concatenate pair inputs", "aten::copy_": "copies", "aten::_embedding_bag_forward_only": "bags",
         "aten::embedding_bag": "bags"}


def work(config, g1: torch.Tensor, g2: torch.Tensor) -> dict:
    """Multiply-adds and moved bytes per token of the dense MLP and of the VD sparse path (from the routing)."""
    d, experts, half = config.hidden_size, config.moe_experts, config.moe_dim // 2
    tokens = g1.shape[-3] * (g1.shape[0] if g1.dim() == 4 else 1)
    pairs = [float((g > 0).any(-2).sum()) / tokens for g in (g1, g2)]          # active halves per token
    dense_macs = 2 * d * experts * config.moe_dim
    # Up: a(half) = sigma(U x) of width m/2 per pair; down: [m/2 | m/2 | 1] -> d/2 per pair, both sides.
    sparse_macs = sum(p * (d * half + (2 * half + 1) * d // 2) for p in pairs)
    # The gather copies d floats per pair (then the matmul reads them again); the scatter adds d/2 per pair.
    return {"active_halves_per_token": pairs, "dense_macs_per_token": dense_macs,
            "sparse_macs_per_token": sparse_macs, "macs_ratio": sparse_macs / dense_macs,
            "gathered_bytes_per_token": 4 * d * sum(pairs), "scattered_bytes_per_token": 4 * (d // 2) * sum(pairs),
            "dense_weight_bytes": 4 * 2 * d * experts * config.moe_dim}


def profile_table(fn, rows: int = 12) -> tuple[str, dict[str, float]]:
    with torch.no_grad(), torch.profiler.profile() as prof:
        fn()
    events = prof.key_averages()
    kinds: dict[str, float] = defaultdict(float)
    total = sum(e.self_cpu_time_total for e in events)
    for e in events:
        kinds[KINDS.get(e.key, "other")] += e.self_cpu_time_total / total
    ranked = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
    return events.table(sort_by="self_cpu_time_total", row_limit=rows), ranked


def profile_shape(name: str, args: argparse.Namespace, timer: bench.Timer) -> dict:
    """Times, work and the VD forward's profile of one released shape."""
    config = preset(name)
    d, width = config.hidden_size, config.moe_experts * config.moe_dim
    x = torch.randn(1, args.tokens, d)
    mlp = bench._init(nn.Sequential(nn.Linear(d, width), bench._ReLU2(), nn.Linear(width, d, bias=False)), 0)
    router = bench._init(MonetRouter(config), 1).train()
    vd = bench._init(build_experts(bench._with(config, moe_decompose="vertical")), 2)
    with torch.no_grad():
        g1, g2 = router(x)
    forced = sparse.expert_path("sparse")
    cases = {"dense": lambda: mlp(x), "router": lambda: router(x), "prep": lambda: sparse.sparse_routing(g1, g2),
             "vd": forced(lambda: vd(x, g1, g2))}
    with torch.no_grad():
        times = {k: bench.summarise(v) for k, v in bench.interleaved(cases, args.repeats, 1, timer).items()}
    med = {k: v["median_ms"] for k, v in times.items()}
    shared = (med["router"] + med["prep"]) / config.moe_groups
    table, kinds = profile_table(cases["vd"])
    dense_table, _ = profile_table(cases["dense"], rows=6)
    return {"times": times, "work": work(config, g1, g2), "moe_groups": config.moe_groups,
            "sparse_vs_dense": (med["vd"] + shared) / med["dense"], "vd_vs_dense": med["vd"] / med["dense"],
            "router_and_prep_share": shared / med["dense"], "vd_self_time_by_kind": kinds,
            "vd_profile": table, "dense_profile": dense_table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["monet-vd-850m", "monet-vd-1.4b"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    timer = bench.Timer(torch.device("cpu"), args.clock)
    report: dict = {"machine": bench.machine_info(), "load_average_start": list(os.getloadavg()),
                    "command": "PYTHONPATH=src python benchmarks/vd_profile.py " + " ".join(
                        f"--{k} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items() if v),
                    "shapes": {}}
    for name in args.shapes:
        shape = report["shapes"][name] = profile_shape(name, args, timer)
        print(name, json.dumps({k: v for k, v in shape.items() if "profile" not in k}, indent=1), flush=True)
        print(shape["vd_profile"], flush=True)
    report["load_average_end"] = list(os.getloadavg())
    if args.json:
        write_json(args.json, report)


if __name__ == "__main__":
    main()

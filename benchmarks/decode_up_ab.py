"""The decode path's up-projection at one token, before and after (issue 24): the kept halves' rows of U
gathered into one matrix for one product ("gather", what `monet.sparse._kept_up` still does for 2-8 tokens)
against one product per half read in place, each half indexed per call ("indexed", the loop of the first
change) or read through views kept on the layer ("per_half", what `_kept_up` does at one token on the CPU
now), interleaved in one process with the dense MLP of equal width, thread CPU time, at the released 850M and
1.4B layer shapes, HD and VD. Prints each case's median (ms) and its ratio to the dense MLP.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/decode_up_ab.py --rounds 31 [--json OUT]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from monet import sparse
from monet.config import preset
from monet.experiments import bench
from monet.io import write_json
from monet.model import MonetRouter, RoutingGroup, build_experts

PER_HALF = sparse._kept_up


def gather_up(layer, linear, x2: torch.Tensor, halves: torch.Tensor) -> torch.Tensor:
    """The earlier one-token up-projection: the kept rows copied into one matrix, one product."""
    weight = linear.weight.unflatten(0, (layer.experts, -1)).index_select(0, halves)
    bias = linear.bias.view(layer.experts, -1).index_select(0, halves)
    return layer.act(F.linear(x2, weight.flatten(0, 1), bias.view(-1))).view(x2.shape[0], halves.numel(), -1)


def indexed_up(layer, linear, x2: torch.Tensor, halves: torch.Tensor) -> torch.Tensor:
    """The first one-token loop: one product per half, the half's rows indexed on every call."""
    weight = linear.weight.unflatten(0, (layer.experts, -1))
    bias = linear.bias.view(layer.experts, -1)
    products = [torch.addmv(bias[i], weight[i], x2[0]) for i in halves.tolist()]
    return layer.act(torch.stack(products)).view(1, halves.numel(), -1)


def using(up: Callable, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        sparse._kept_up = up
        try:
            return fn()
        finally:
            sparse._kept_up = PER_HALF
    return run


def _first_layer_call(layer: nn.Module, token: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    return layer(token, g1, g2, group=RoutingGroup(g1, g2))


def calibrated_router(config, x: torch.Tensor) -> MonetRouter:
    """An eval router whose running statistics are x's, so each head keeps about k halves."""
    router = bench._init(MonetRouter(config), 1).train()
    with torch.no_grad():
        for norm in (router.norm1, router.norm2):
            norm.momentum = 1.0
        router(x)
    return router.eval()


def one_token(name: str) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """At a released shape: the dense MLP of equal width, an eval router calibrated on 4,096 random tokens, one
    token, and its routing (g1, g2)."""
    config = preset(name)
    d, width = config.hidden_size, config.moe_experts * config.moe_dim
    mlp = bench._init(nn.Sequential(nn.Linear(d, width), bench._ReLU2(), nn.Linear(width, d, bias=False)), 0)
    router = calibrated_router(config, torch.randn(1, 4096, d))
    token = torch.randn(1, 1, d, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        g1, g2 = router(token)
    return mlp, router, token, g1, g2


def over_dense(times: dict[str, list[float]]) -> dict:
    """Median ms per case and each case's median over the dense MLP's (case "dense")."""
    medians = {case: 1e3 * statistics.median(seconds) for case, seconds in times.items()}
    return {"median_ms": medians,
            "vs_dense": {case: ms / medians["dense"] for case, ms in medians.items() if case != "dense"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    timer = bench.Timer(torch.device("cpu"), "cpu")
    report: dict = {"machine": bench.machine_info(), "rounds": args.rounds, "shapes": {}}
    for name in ("monet-vd-850m", "monet-vd-1.4b"):
        config = preset(name)
        mlp, _, token, g1, g2 = one_token(name)
        cases: dict[str, Callable[[], object]] = {"dense": functools.partial(mlp, token)}
        equal = {}
        for kind, decompose in (("hd", "horizontal"), ("vd", "vertical")):
            layer = bench._init(build_experts(bench._with(config, moe_decompose=decompose)), 2)
            with torch.no_grad(), sparse.expert_path("decode"):
                fresh_group = functools.partial(_first_layer_call, layer, token, g1, g2)
                before, indexed = using(gather_up, fresh_group)(), using(indexed_up, fresh_group)()
                after = fresh_group()
            equal[kind] = {"bitwise": bool(torch.equal(before, after)),
                           "max_abs_difference": float((before - after).abs().max()),
                           "indexed_bitwise": bool(torch.equal(indexed, after))}
            group = RoutingGroup(g1, g2)            # the plan built once, as for a group's other layers
            for tag, up in (("gather", gather_up), ("indexed", indexed_up), ("per_half", PER_HALF)):
                cases[f"{kind}_{tag}"] = using(up, functools.partial(layer, token, g1, g2, group=group))
        with torch.no_grad(), sparse.expert_path("decode"):
            times = bench.interleaved(cases, args.rounds, 2, timer)
        report["shapes"][name] = {**over_dense(times), "equal": equal}
    if args.json:
        write_json(args.json, report)
    print(json.dumps(report["shapes"], indent=1))


if __name__ == "__main__":
    main()

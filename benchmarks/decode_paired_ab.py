"""One decode layer at one token, before and after the change of 2026-12-08 (issue 24): "before" reads VD's four
output projections through four embedding bags over column-major weights and computes each kept half's up
projection with `addmv`; "after" is `monet.sparse` now (VD: V11|V12 and V21|V22 in paired tables, one bag
per side, `sparse.paired_columns`; both: `torch.mv` per half and one bias gather), and the eval router with
its cut recomputed per call ("router_before") or kept (`MonetRouter.eval_cut`). Interleaved in one process
with the dense MLP of equal width, thread CPU time, one of a group's other layers (the plan built), at the
released 850M and 1.4B shapes, HD and VD. Prints each case's median (ms), its ratio to the dense MLP and
the largest difference between before and after.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/decode_paired_ab.py --rounds 41 [--json OUT]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
from collections.abc import Callable

import torch
from decode_up_ab import one_token, over_dense
from torch import nn

from monet import sparse
from monet.config import preset
from monet.experiments import bench
from monet.io import write_json
from monet.model import MonetRouter, RoutingGroup, build_experts

AFTER_UP = sparse._kept_up
KEPT_CUT = MonetRouter.eval_cut


def recomputed_cut(router: MonetRouter, norm: nn.BatchNorm1d, dtype: torch.dtype) -> torch.Tensor:
    """The eval cut before: computed from the running statistics on every call."""
    return router.cut(norm.running_mean.to(dtype), norm.running_var.to(dtype), norm.eps)


def router_before(router: MonetRouter, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    MonetRouter.eval_cut = recomputed_cut
    try:
        return router(x)
    finally:
        MonetRouter.eval_cut = KEPT_CUT


def addmv_up(layer, linear, x2: torch.Tensor, halves: torch.Tensor) -> torch.Tensor:
    """The one-token up-projection before: b_i + U_i x by `addmv` per half."""
    weights = sparse._half_views(layer, linear)
    biases = linear.bias.view(layer.experts, -1)
    products = [torch.addmv(biases[i], weights[i], x2[0]) for i in halves.tolist()]
    return layer.act(torch.stack(products)).view(1, halves.numel(), -1)


def vd_before(layer, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, group: RoutingGroup) -> torch.Tensor:
    """`sparse.vd_decode` before (unedited): six embedding bags, four over column-major weights."""
    plan = group.kept_halves(g1, g2)
    x2 = x.reshape(-1, x.shape[-1])
    routing = plan.restrict(g1, g2, x.dtype, None)
    h1, h2 = addmv_up(layer, layer.u1, x2, plan.first), addmv_up(layer, layer.u2, x2, plan.second)
    cross12 = torch.bmm(routing.g1.transpose(1, 2), torch.bmm(routing.g2, h2))
    cross21 = torch.bmm(routing.g2.transpose(1, 2), torch.bmm(routing.g1, h1))
    top = (sparse._kept_project(plan, layer.v11.weight, routing.s1.unsqueeze(-1) * h1, 1)
           + sparse._kept_project(plan, layer.v12.weight, cross12, 1)
           + sparse._kept_bias(plan, layer.b1, routing.bias1, 1))
    bottom = (sparse._kept_project(plan, layer.v21.weight, cross21, 2)
              + sparse._kept_project(plan, layer.v22.weight, routing.s2.unsqueeze(-1) * h2, 2)
              + sparse._kept_bias(plan, layer.b2, routing.bias2, 2))
    return torch.cat((top, bottom), dim=-1).view(x.shape)


def hd_before(layer, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor, group: RoutingGroup) -> torch.Tensor:
    """HD's layer with the up-projection before (`addmv` per half); the rest is unchanged."""
    sparse._kept_up = addmv_up
    try:
        return layer(x, g1, g2, group=group)
    finally:
        sparse._kept_up = AFTER_UP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    timer = bench.Timer(torch.device("cpu"), "cpu")
    report: dict = {"machine": bench.machine_info(), "rounds": args.rounds, "shapes": {}}
    for name in ("monet-vd-850m", "monet-vd-1.4b"):
        config = preset(name)
        mlp, router, token, g1, g2 = one_token(name)
        cases: dict[str, Callable[[], object]] = {"dense": functools.partial(mlp, token),
                                                  "router_before": functools.partial(router_before, router, token),
                                                  "router_after": functools.partial(router, token)}
        with torch.no_grad():
            before_routing, after_routing = router_before(router, token), router(token)
            same_routing = all(torch.equal(a, b) for a, b in zip(before_routing, after_routing, strict=True))
        difference = {}
        for kind, decompose, before in (("hd", "horizontal", hd_before), ("vd", "vertical", vd_before)):
            layer = bench._init(build_experts(bench._with(config, moe_decompose=decompose)), 2)
            with torch.no_grad():
                for p in layer.parameters():        # non-zero biases, so that the comparison covers them
                    p.add_(0.01 * torch.randn_like(p))
            # Two copies: the first call of each lays its output projections out its own way (column-major
            # or paired), and one layer's two layouts would undo each other on every call.
            layer_before = copy.deepcopy(layer)
            group_before, group_after = RoutingGroup(g1, g2), RoutingGroup(g1, g2)
            with torch.no_grad(), sparse.expert_path("decode"):
                old = before(layer_before, token, g1, g2, group_before)
                new = layer(token, g1, g2, group=group_after)
            difference[kind] = float((old - new).abs().max())
            cases[f"{kind}_before"] = functools.partial(before, layer_before, token, g1, g2, group_before)
            cases[f"{kind}_after"] = functools.partial(layer, token, g1, g2, group=group_after)
        with torch.no_grad(), sparse.expert_path("decode"):
            times = bench.interleaved(cases, args.rounds, 2, timer)
        report["shapes"][name] = {**over_dense(times), "max_abs_difference": difference,
                                  "router_bitwise_equal": same_routing}
    if args.json:
        write_json(args.json, report)
    print(json.dumps(report["shapes"], indent=1))


if __name__ == "__main__":
    main()

"""The `decode` section of `monet bench` alone, at the released layer shapes (minutes instead of the whole
suite's half hour): per shape, HD and VD, 1 and 4 sequences, the experts on the decode path (as the first
layer of a routing group, which builds the plan, and as one of the others) and on the dense path, the eval
router and the dense MLP, interleaved; prints the section and `decode_vs_dense` (`bench.decode_step`) as JSON.

    PYTHONPATH=src python benchmarks/decode.py --repeats 7 --clock cpu [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from torch import nn

from monet.config import preset
from monet.experiments import bench
from monet.io import write_json
from monet.model import MonetRouter, build_experts
from monet.settings import BenchSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["monet-vd-850m", "monet-vd-1.4b"])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens that calibrate the eval router")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = BenchSettings(repeats=args.repeats, clock=args.clock, tokens=args.tokens)
    timer = bench.Timer(torch.device("cpu"), args.clock)
    report: dict = {"machine": bench.machine_info(), "load_average_start": list(os.getloadavg()), "shapes": {},
                    "ratios": {"decode_vs_dense": {}, "decode_batch4_vs_dense": {}}}
    for name in args.shapes:
        config = preset(name)
        d, width = config.hidden_size, config.moe_experts * config.moe_dim
        x = torch.randn(1, args.tokens, d)
        mlp = bench._init(nn.Sequential(nn.Linear(d, width), bench._ReLU2(), nn.Linear(width, d, bias=False)), 0)
        router = bench._init(MonetRouter(config), 1).train()
        layers = {kind: bench._init(build_experts(bench._with(config, moe_decompose=decompose)), 2)
                  for kind, decompose in (("hd", "horizontal"), ("vd", "vertical"))}
        result = bench.bench_decode(layers, mlp, router, x, settings, timer)
        report["shapes"][name] = result
        for kind in layers:
            for ratio, batch in (("decode_vs_dense", 1), ("decode_batch4_vs_dense", 4)):
                report["ratios"][ratio][f"{name}/{kind}"] = bench.decode_step(result, kind, batch, config.moe_groups)
    report["load_average_end"] = list(os.getloadavg())
    if args.json:
        write_json(args.json, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

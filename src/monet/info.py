"""Model sizes: parameter counts of real modules built on the meta device, and the paper's Table 1.

`monet info --preset NAME [--set key=value ...] [--json]` prints parameters by part and the expert count.
`monet info --compare --dim D --experts N --heads H --moe-dim M [--topk K] [--json]` compares one layer of
SMoE, PEER, Monet-HD and Monet-VD at N experts (Table 1 and appendix A.2): parameters counted from
the modules themselves, retrieval cost (multiply-adds per token to choose experts) from A.2.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import torch
from torch import nn

from monet.baselines import PEERLayer, SMoELayer
from monet.config import PRESETS, MonetConfig, preset
from monet.errors import MonetError
from monet.experts import MonetHorizontalExperts, MonetVerticalExperts
from monet.routing import MonetRouter


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameters_by_part(config: MonetConfig) -> dict[str, int]:
    """Parameters of `MonetForCausalLM(config)`, split into parts, counted on the meta device."""
    from monet.model import MonetForCausalLM

    with torch.device("meta"):
        model = MonetForCausalLM(config)
    parts = {"embeddings": 0, "attention": 0, "experts": 0, "routers": 0, "norms": 0, "lm_head": 0}
    for name, param in model.named_parameters():
        if name.startswith("model.embed_tokens"):
            part = "embeddings"
        elif name.startswith("lm_head"):
            part = "lm_head"
        elif ".self_attn." in name:
            part = "attention"
        elif ".router." in name:
            part = "routers"
        elif ".moe." in name or ".mlp." in name:
            part = "experts"
        else:
            part = "norms"
        parts[part] += param.numel()
    return parts


def count_parameters(config: MonetConfig) -> int:
    """Total parameters of `MonetForCausalLM(config)` (tied embeddings counted once)."""
    return sum(parameters_by_part(config).values())


def experts_per_layer(config: MonetConfig) -> int:
    return 0 if config.mlp_type == "dense" else config.moe_experts**2


def dense_intermediate_size_matching(config: MonetConfig) -> int:
    """The width of a dense LLaMA MLP whose model has the same total parameters as `config`'s Monet."""
    target = count_parameters(config)
    base = count_parameters(MonetConfig(**{**config.to_diff_dict(), "mlp_type": "dense", "intermediate_size": 1}))
    per_unit = 3 * config.hidden_size * config.num_hidden_layers   # gate, up, down columns per unit of width
    return max(1, round((target - base) / per_unit) + 1)


def compare_layers(dim: int, experts: int, heads: int, moe_dim: int, topk: int = 8) -> dict[str, Any]:
    """One layer of each architecture at N = `experts`, H heads, expert width m (Table 1, A.2)."""
    side = math.isqrt(experts)
    if side * side != experts:
        raise MonetError(f"--experts must be a perfect square N = E^2 for product keys, got {experts}")
    if moe_dim % 2 or dim % 2:
        raise MonetError("--dim and --moe-dim must be even (vertical decomposition splits both in two)")
    config = MonetConfig(
        hidden_size=dim, num_attention_heads=1, num_hidden_layers=1, vocab_size=8, bos_token_id=None,
        eos_token_id=None, moe_experts=side,
        moe_heads=heads, moe_dim=moe_dim, moe_topk=min(topk, side), moe_groups=1,
    )
    with torch.device("meta"):
        router = _numel(MonetRouter(config))
        layers = {
            "smoe": _numel(SMoELayer(dim, experts, moe_dim, topk)),
            "peer": _numel(PEERLayer(MonetConfig(**{**config.to_diff_dict(), "mlp_type": "peer"}))),
            "monet-hd": _numel(MonetHorizontalExperts(config)) + router,
            "monet-vd": _numel(MonetVerticalExperts(config)) + router,
        }
    retrieval = {
        "smoe": experts * dim,                              # O(N d): score every expert
        "peer": (2 * side * (dim // 2) + topk**2 * dim) * heads,  # O((sqrt(N) + k^2) H d)
        "monet-hd": 2 * side * dim * heads,                 # O(sqrt(N) H d): two key sets, no k^2 step
        "monet-vd": 2 * side * dim * heads,
    }
    return {
        "dim": dim, "experts": experts, "heads": heads, "moe_dim": moe_dim, "topk": topk,
        "per_layer_parameters": layers,
        "router_parameters_included": router,
        "retrieval_cost_per_token": retrieval,
        "complexity": {
            "smoe": {"retrieval": "O(N d)", "parameters": "O(N m d)"},
            "peer": {"retrieval": "O((sqrt(N) + k^2) H d)", "parameters": "O(N d)"},
            "monet-hd": {"retrieval": "O(sqrt(N) H d)", "parameters": "O(sqrt(N) m d)"},
            "monet-vd": {"retrieval": "O(sqrt(N) H d)", "parameters": "O(sqrt(N) m d)"},
        },
    }


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings -> dict, values parsed as JSON where possible (numbers, true/false, null)."""
    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise MonetError(f"expected key=value, got {pair!r}")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


def describe(config: MonetConfig, name: str | None = None) -> dict[str, Any]:
    parts = parameters_by_part(config)
    return {
        "preset": name,
        "parameters": sum(parts.values()),
        "parameters_by_part": parts,
        "experts_per_layer": experts_per_layer(config),
        "layers": config.num_hidden_layers,
        "routing_layers": config.num_routing_groups if config.mlp_type == "monet" else 0,
        "mlp_type": config.mlp_type,
        "decomposition": config.moe_decompose if config.mlp_type == "monet" else None,
    }


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3f}{unit}"
    return str(n)


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")


def run_info(args: argparse.Namespace) -> int:
    if args.compare:
        missing = [f for f in ("dim", "experts", "heads", "moe_dim") if getattr(args, f) is None]
        if missing:
            raise MonetError("--compare needs " + ", ".join("--" + m.replace("_", "-") for m in missing))
        result = compare_layers(args.dim, args.experts, args.heads, args.moe_dim, args.topk)
        if args.json:
            print(json.dumps(result, indent=2))
            return 0
        print(f"One layer at d={args.dim}, N={args.experts:,} experts, H={args.heads}, m={args.moe_dim}, k={args.topk}")
        rows = [("architecture", "parameters / retrieval multiply-adds per token")]
        for arch, params in result["per_layer_parameters"].items():
            rows.append((arch, f"{_human(params)} params / {_human(result['retrieval_cost_per_token'][arch])}"))
        _print_table(rows)
        return 0
    name = args.preset or "small"
    config = preset(name, **parse_overrides(args.set or []))
    result = describe(config, name)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = [("preset", name), ("total parameters", f"{result['parameters']:,} ({_human(result['parameters'])})")]
    rows += [(f"  {part}", f"{count:,}") for part, count in result["parameters_by_part"].items()]
    rows += [
        ("experts per layer", f"{result['experts_per_layer']:,}"),
        ("layers / routing layers", f"{result['layers']} / {result['routing_layers']}"),
        ("decomposition", str(result["decomposition"])),
        ("hidden / heads / kv heads",
         f"{config.hidden_size} / {config.num_attention_heads} / {config.num_key_value_heads}"),
        ("moe E / m / H / k / groups",
         f"{config.moe_experts} / {config.moe_dim} / {config.moe_heads} / {config.moe_topk} / {config.moe_groups}"),
    ]
    _print_table(rows)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="parameter counts and expert counts of a preset, or the paper's Table 1 comparison",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=list(PRESETS), help="named shape (default: small)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    parser.add_argument("--compare", action="store_true", help="compare SMoE, PEER, Monet-HD, Monet-VD layers")
    parser.add_argument("--dim", type=int, help="hidden size d (with --compare)")
    parser.add_argument("--experts", type=int, help="number of experts N, a perfect square (with --compare)")
    parser.add_argument("--heads", type=int, help="routing heads H (with --compare)")
    parser.add_argument("--moe-dim", dest="moe_dim", type=int, help="expert hidden width m (with --compare)")
    parser.add_argument("--topk", type=int, default=8, help="experts kept per head k (with --compare; default 8)")
    parser.set_defaults(handler=run_info)

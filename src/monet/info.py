"""Model sizes (`monet info`): parameter counts of real modules built on the meta device, by part for a
preset, and for one layer of SMoE, PEER, Monet-HD and Monet-VD at N experts (`--compare`: the paper's
Table 1, with the retrieval cost of appendix A.2 in multiply-adds per token).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from monet.config import MonetConfig, preset
from monet.errors import MonetError
from monet.model import (
    MonetForCausalLM,
    MonetHorizontalExperts,
    MonetRouter,
    MonetVerticalExperts,
    PEERLayer,
    activation,
)


class SMoELayer(nn.Module):
    """Conventional sparse MoE (eq. 1-2): N experts V_i sigma(U_i x), top-k of N router scores. A readable
    reference for the size comparison (its parameters grow like N m d), not a decoder option."""

    def __init__(self, dim: int, experts: int, expert_dim: int, topk: int, act: str = "relu2") -> None:
        super().__init__()
        self.topk = topk
        self.router = nn.Linear(dim, experts, bias=False)                       # expert embeddings w_i
        self.up = nn.Parameter(torch.empty(experts, expert_dim, dim))           # U_i
        self.down = nn.Parameter(torch.empty(experts, dim, expert_dim))         # V_i
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, ids = self.router(x).float().topk(self.topk, dim=-1)
        g = torch.softmax(scores, dim=-1).to(x.dtype)                           # [..., k]
        hidden = self.act(torch.einsum("...kmd,...d->...km", self.up[ids], x))
        return torch.einsum("...k,...kdm,...km->...d", g, self.down[ids], hidden)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# (substring of a parameter's name, part), first match wins; anything else is a norm
PARTS = (("model.embed_tokens", "embeddings"), ("lm_head", "lm_head"), (".self_attn.", "attention"),
         (".router.", "routers"), (".moe.", "experts"), (".mlp.", "experts"))


def parameters_by_part(config: MonetConfig) -> dict[str, int]:
    """Parameters of `MonetForCausalLM(config)`, split into parts, counted on the meta device."""
    with torch.device("meta"):
        model = MonetForCausalLM(config)
    parts = dict.fromkeys(("embeddings", "attention", "experts", "routers", "norms", "lm_head"), 0)
    for name, param in model.named_parameters():
        parts[next((part for key, part in PARTS if key in name), "norms")] += param.numel()
    return parts


def count_parameters(config: MonetConfig) -> int:
    """Total parameters of `MonetForCausalLM(config)` (tied embeddings counted once)."""
    return sum(parameters_by_part(config).values())


def dense_intermediate_size_matching(config: MonetConfig) -> int:
    """The width of a dense LLaMA MLP whose model has the same total parameters as `config`'s Monet."""
    target = count_parameters(config)
    base = count_parameters(MonetConfig(**{**config.to_diff_dict(), "mlp_type": "dense", "intermediate_size": 1}))
    per_unit = 3 * config.hidden_size * config.num_hidden_layers   # gate, up, down columns per unit of width
    return max(1, round((target - base) / per_unit) + 1)


def compare_layers(dim: int, experts: int, heads: int, moe_dim: int, topk: int = 8) -> dict[str, Any]:
    """One layer of each architecture at N = `experts`, H heads, expert width m (Table 1, A.2).

    Monet-VD splits d and m in two halves; where either is odd (e.g. PEER's single-neuron experts,
    m = 1) it is reported as not applicable instead of failing the whole comparison.
    """
    side = math.isqrt(experts)
    if side * side != experts:
        raise MonetError(f"--experts must be a perfect square N = E^2 for product keys, got {experts}")
    config = MonetConfig(
        hidden_size=dim, num_attention_heads=1, num_hidden_layers=1, vocab_size=8, bos_token_id=None,
        eos_token_id=None, moe_experts=side, moe_heads=heads, moe_dim=moe_dim, moe_topk=min(topk, side),
        moe_groups=1, moe_decompose="horizontal",
    )
    vd_defined = moe_dim % 2 == 0 and dim % 2 == 0
    with torch.device("meta"):
        router = _numel(MonetRouter(config))
        layers: dict[str, Any] = {
            "smoe": _numel(SMoELayer(dim, experts, moe_dim, topk)),
            "peer": _numel(PEERLayer(config)) if dim % 2 == 0 else "needs an even --dim (PEER splits the query)",
            "monet-hd": _numel(MonetHorizontalExperts(config)) + router,
            "monet-vd": _numel(MonetVerticalExperts(config)) + router if vd_defined
            else "vertical decomposition splits d and m in two halves: needs even --dim and --moe-dim",
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


def describe(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sizes of a preset (with config overrides): parameters by part, experts per layer, routing layers."""
    config = preset(name, **(overrides or {}))
    parts = parameters_by_part(config)
    return {
        "preset": name,
        "parameters": sum(parts.values()),
        "parameters_by_part": parts,
        "experts_per_layer": 0 if config.mlp_type == "dense" else config.moe_experts**2,
        "layers": config.num_hidden_layers,
        "routing_layers": config.num_routing_groups if config.mlp_type == "monet" else 0,
        "mlp_type": config.mlp_type,
        "decomposition": config.moe_decompose if config.mlp_type == "monet" else None,
        "shape": {key: getattr(config, key) for key in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                         "moe_experts", "moe_dim", "moe_heads", "moe_topk",
                                                         "moe_groups")},
    }


def describe_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """`describe`'s result as (name, value) rows for a terminal."""
    shape = result["shape"]
    rows = [("preset", result["preset"]),
            ("total parameters", f"{result['parameters']:,} ({human(result['parameters'])})")]
    rows += [(f"  {part}", f"{count:,}") for part, count in result["parameters_by_part"].items()]
    return rows + [
        ("experts per layer", f"{result['experts_per_layer']:,}"),
        ("layers / routing layers", f"{result['layers']} / {result['routing_layers']}"),
        ("decomposition", str(result["decomposition"])),
        ("hidden / heads / kv heads",
         f"{shape['hidden_size']} / {shape['num_attention_heads']} / {shape['num_key_value_heads']}"),
        ("moe E / m / H / k / groups", " / ".join(str(shape[k]) for k in ("moe_experts", "moe_dim", "moe_heads",
                                                                        "moe_topk", "moe_groups"))),
    ]


def human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3f}{unit}"
    return str(n)

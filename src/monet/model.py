"""The Monet model, top to bottom: router, experts, decoder, Hugging Face classes.

A LLaMA decoder (RMSNorm, rotary attention with grouped-query heads and SDPA, untied head) whose MLP is
replaced by Monet experts (paper §3): 1. `MonetRouter` and the auxiliary losses (eq. 9, 16-17);
2. `MonetHorizontalExperts` (HD, eq. 6-12) and `MonetVerticalExperts` (VD, eq. 13-15, A.1), with the
`DenseMLP` and `PEERLayer` baselines (`mlp_type`); 3. the decoder and the Hugging Face classes.

State-dict keys are the official ones, so a directory written by the official modeling code loads with
`MonetForCausalLM.from_pretrained(dir)`. With `output_router_probs=True` the output carries one entry per
decoder layer: the (g1, g2) pair ([B, T, H, E] each) on routing layers, None on layers that reuse the
group's routing (the official convention). Exact fast paths live beside this file in `monet.ops` and
`monet.sparse`.

A routing group (`moe_groups` consecutive layers sharing one router) travels down the decoder as one
`RoutingGroup`: the routing its first layer computed, the group's one edit table (held by its router) and
the sparse structure of its routing, built by the first layer that needs it and reused by the others.

Host syncs: the forward pass has none on its main path (so `torch.compile(model)` captures it whole and a
GPU never waits), except where data decide a shape: the expert-edit correction gathers only the edited
active pairs (`ops.edited_entries`), and a 2D attention mask is checked once for padding so that unpadded
batches keep SDPA's causal fast path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from statistics import NormalDist

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import ModelOutput

from monet import edits, ops, remote_code, sparse
from monet.config import MonetConfig
from monet.errors import MonetError
from monet.runtime import distributed

Routing = tuple[torch.Tensor, torch.Tensor]
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


# ----------------------------------------------------------------------------------------------------------
# 1. Routing (eq. 9, 16-17)


def routing_threshold(topk: int, experts: int) -> float:
    """sigma = Phi^-1(1 - k/E): if the normalised logits were Gaussian, about k of E would pass.
    With k = E every entry is kept (sigma = -inf)."""
    return float("-inf") if topk >= experts else NormalDist().inv_cdf(1.0 - topk / experts)


class MonetRouter(nn.Module):
    """Two key sets (w1 for bottom/left halves, w2 for top/right), H heads, BatchNorm thresholds.

    For each token and head, the E logits of each side are normalised with BatchNorm statistics (per
    head, over all tokens and all E entries: batch statistics in training, running statistics in eval)
    and entries whose normalised logit reaches min(the head's best, sigma) are kept, so a head keeps at
    least one entry. The kept entries get a softmax of their RAW logits (float32), the others exactly 0,
    so each head's g sums to 1 — the fact the factored expert sums rely on. Only the keep/drop decision
    depends on the statistics, and a comparison has no gradient: they are computed without autograd and,
    under data parallelism, over the global batch (`ops.batch_statistics`).

    The router is the one module of its routing group, so it also holds the group's edit table
    (`edit_weights`, see "Editing" below; not saved with the weights).
    """

    def __init__(self, config: MonetConfig) -> None:
        super().__init__()
        self.heads, self.experts = config.moe_heads, config.moe_experts
        self.threshold = routing_threshold(config.moe_topk, config.moe_experts)
        self.w1 = nn.Linear(config.hidden_size, self.heads * self.experts, bias=False)
        self.w2 = nn.Linear(config.hidden_size, self.heads * self.experts, bias=False)
        # affine=False BatchNorm modules only hold the running statistics (official key names).
        self.norm1 = nn.BatchNorm1d(self.heads, affine=False)
        self.norm2 = nn.BatchNorm1d(self.heads, affine=False)
        self.register_buffer("edit_weights", None, persistent=False)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> Routing:
        """x [B, T, d] -> (g1, g2), each [B, T, H, E] in float32 (float64 for float64 input), rows summing
        to 1 per head. `token_mask` [B, T] (False = padding) keeps padding out of the batch statistics."""
        return self.gate(x, self.w1, self.norm1, token_mask), self.gate(x, self.w2, self.norm2, token_mask)

    def gate(self, x: torch.Tensor, keys: nn.Linear, norm: nn.BatchNorm1d,
             token_mask: torch.Tensor | None) -> torch.Tensor:
        """Keeps the entries whose normalised logit (z - mean) / sqrt(var + eps) reaches min(the head's best,
        sigma). Normalising is monotone, so the test is done on the raw logits as
        z >= min(max z, mean + sigma * sqrt(var + eps)): one cut per head, no normalised copy."""
        tracked = torch.is_grad_enabled()
        with torch.no_grad():   # the logits only choose entries here; their gradient flows in KeptSoftmax
            dtype = torch.promote_types(x.dtype, torch.float32)
            z = F.linear(x, keys.weight).view(*x.shape[:-1], self.heads, self.experts).to(dtype)
            if self.training:
                count, mean, var = ops.batch_statistics(z, token_mask)
                if not ops.recomputing_in_backward():   # activation checkpointing replays the forward once more
                    ops.update_running_statistics(norm, count, mean, var)
                cut = self.cut(mean, var, norm.eps)
            else:
                cut = self.eval_cut(norm, dtype)
            bar = torch.minimum(z.amax(dim=-1, keepdim=True), cut)
            if not tracked:                    # decoding, evaluation: KeptSoftmax's forward, fewer ops
                return torch.softmax(z.masked_fill_(z < bar, float("-inf")), dim=-1)
            keep = z >= bar
        return ops.KeptSoftmax.apply(x, keys.weight, z, keep)

    def cut(self, mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
        """mean + sigma * sqrt(var + eps) per head, [H, 1] (-inf when k = E)."""
        return (mean + self.threshold * torch.sqrt(var + eps))[:, None]

    def eval_cut(self, norm: nn.BatchNorm1d, dtype: torch.dtype) -> torch.Tensor:
        """The cut of `gate` from the running statistics, [H, 1] in dtype, kept until they change (another tensor,
        or an in-place update: its `_version`): at one token of the released shapes its small ops took 0.4-0.5 ms
        of the router's 5.0-7.0 ms (docs/performance.md, "Decode results")."""
        mean, var = norm.running_mean, norm.running_var
        if torch.compiler.is_compiling():          # a compiled graph computes it once anyway; no data pointers there
            return self.cut(mean.to(dtype), var.to(dtype), norm.eps)
        key = (id(mean), mean._version, mean.data_ptr(), id(var), var._version, var.data_ptr(), dtype, self.threshold,
               norm.eps)
        cache = self.__dict__.setdefault("_eval_cuts", {})
        entry = cache.get(id(norm))
        if entry is None or entry[0] != key:       # the entry holds mean and var, so their ids are not reused
            with torch.inference_mode(False):      # a normal tensor, usable later outside inference mode too
                entry = cache[id(norm)] = key, self.cut(mean.to(dtype), var.to(dtype), norm.eps), (mean, var)
        return entry[1]

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_eval_cuts", None)          # moved or cast: new statistics tensors
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        return {key: value for key, value in super().__getstate__().items() if key != "_eval_cuts"}


@dataclass(eq=False)
class RoutingGroup:
    """One routing group as the decoder passes it down its layers: the routing (g1, g2) of its first layer,
    the group's edit table (its router's `edit_weights`; None: unedited) and the sparse structure of the
    routing (`monet.sparse.Routing`) or its kept halves (`monet.sparse.KeptHalves`, the decode path), built by
    the first layer that takes that path and reused by the group's other layers."""

    g1: torch.Tensor
    g2: torch.Tensor
    edit_weights: torch.Tensor | None = None
    structures: dict[torch.dtype, sparse.Routing] = field(default_factory=dict, repr=False)
    halves: sparse.KeptHalves | None = field(default=None, repr=False)
    edits: dict[torch.dtype, tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False)

    def sparse_routing(self, g1: torch.Tensor, g2: torch.Tensor, dtype: torch.dtype) -> sparse.Routing:
        """The sparse structure of (g1, g2) with values in dtype, gathered again on every call (each layer has
        its own autograd graph). Built once per dtype for the group's own routing; a routing that is not the
        group's (a hook replaced a layer's g1, g2) gets a structure of its own."""
        g1c, g2c = g1.to(dtype), g2.to(dtype)
        if g1 is not self.g1 or g2 is not self.g2:
            return sparse.sparse_routing(g1c, g2c, self.edit_weights)
        if dtype not in self.structures:
            self.structures[dtype] = sparse.sparse_routing(g1c, g2c, self.edit_weights)
            return self.structures[dtype]
        return self.structures[dtype].bind(g1c, g2c)

    def edited_pairs(self, g1: torch.Tensor, g2: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The dense path's edited active pairs: `ops.edited_entries` of (g1, g2) in dtype against the group's
        edit table. Every layer of a group reads the same pairs, so without autograd (evaluation: the
        unlearning protocol's masked passes) they are enumerated once per dtype for the group's own routing;
        a tracked call (each layer has its own graph) or another routing enumerates them again."""
        tracked = torch.is_grad_enabled() and (g1.requires_grad or g2.requires_grad)
        reusable = not tracked and g1 is self.g1 and g2 is self.g2
        if reusable and dtype in self.edits:
            return self.edits[dtype]
        pairs = ops.edited_entries(g1.to(dtype), g2.to(dtype), self.edit_weights)
        if reusable:
            self.edits[dtype] = pairs
        return pairs

    def kept_halves(self, g1: torch.Tensor, g2: torch.Tensor) -> sparse.KeptHalves:
        """The kept halves of (g1, g2) for the decode path, built once for the group's own routing (the plan
        keeps its index lists and, without autograd, its restricted routing for the group's other layers); a
        routing that is not the group's gets a plan of its own."""
        if g1 is not self.g1 or g2 is not self.g2:
            return sparse.kept_halves(g1, g2)
        if self.halves is None:
            self.halves = sparse.kept_halves(g1, g2)
        return self.halves


def token_mean(g: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Routing probabilities averaged over (non-padding) tokens: [..., H, E] -> [H, E].

    Across data-parallel ranks the sums are all-reduced with autograd, so the loss is the global
    batch's and its gradient matches a single device.
    """
    flat = g.reshape(-1, *g.shape[-2:])
    weight = torch.ones(flat.shape[0], dtype=g.dtype, device=g.device) if token_mask is None \
        else token_mask.reshape(-1).to(g.dtype)
    total = (weight[:, None, None] * flat).sum(dim=0)
    count = weight.sum()
    if distributed():
        total, count = ops.AllReduceSum.apply(total), ops.AllReduceSum.apply(count.detach())
    return total / count.clamp_min(1.0)


def uniformity_loss(g1: torch.Tensor, g2: torch.Tensor, token_mask: torch.Tensor | None = None,
                    eps: float = 1e-6) -> torch.Tensor:
    """Eq. 16 with g-hat read as the routing probability averaged over the batch's tokens.

    L_unif = -1/(2HE) * sum_{h,i} log(mean_t g1_thi + eps) - (same for g2). Up to the constant log E
    this is KL(uniform || mean routing), minimal when every half is used equally; eps guards log 0.
    """
    return -sum(torch.log(token_mean(g, token_mask) + eps).mean() for g in (g1, g2)) / 2


def ambiguity_loss(g1: torch.Tensor, g2: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 17 read as 1/(2H) * sum_h (1 - max_i g1_hi) + (same for g2), averaged over tokens.

    The printed equation carries a leading minus sign, but the text says minimising it makes each
    token pick its experts with high confidence; that is the sign used here (the loss is >= 0 and
    falls as the largest routing probability of each head rises towards 1).
    """
    per_token = ((1 - g1.amax(dim=-1)).mean(dim=-1) + (1 - g2.amax(dim=-1)).mean(dim=-1)) / 2
    if token_mask is None:
        return per_token.mean()
    weight = token_mask.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------------------------------------
# 2. Experts (eq. 6-15)
#
# Each layer holds E bottom/left halves and E top/right halves; expert (i, j) combines half i with half j,
# so N = E^2 experts cost O(E) parameters. The layer output is the routing-weighted sum over all N experts,
# but it is never expanded: the sums over i, j and the heads are reordered so that only E-sized routing
# vectors (g1, g2 per head) meet the E*m hidden units (exact because each head's g1, g2 sum to 1).
# Hidden units are laid out expert-major ([E, m]). Shapes: x [B, T, d]; g1, g2 [B, T, H, E]; out [B, T, d].
#
# Editing (masking, steering; `monet.edits`): a routing group may carry an edit table (`RoutingGroup`), an
# [E*E] table holding for expert (i, j) at i*E + j the fraction of its term to remove (1 deletes it, 1 - alpha
# scales it by alpha). Only each token's active (i, j) pairs are looked up: their terms g1_hi g2_hj E_ij(x)
# are subtracted from the E-sized intermediate sums before the output projections, so an edited forward stays
# exact. The expert layers take (x, g1, g2) positionally (the hook points of docs/tools.md) and the group as a
# keyword; called alone, without a group, they compute the unedited layer.


def activation(name: str):
    """The expert nonlinearity by its Hugging Face name; the released models use "relu2", relu(x)^2."""
    return ACT2FN[name]


class ExpertLayer(nn.Module):
    """What the two expert layers share beyond their math: moving or casting one (`to`, `half`, ...: `_apply`)
    drops the decode path's per-half views of its weights (`monet.sparse._half_views`) and VD's paired output
    tables (`monet.sparse.paired_columns`), which would keep the old weights alive; copying or pickling one
    leaves them out."""

    CACHES = ("_half_views", "_paired_columns")

    def _apply(self, fn, recurse=True):
        for cache in self.CACHES:
            self.__dict__.pop(cache, None)
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the caches behind (a deep copy would hold a second copy of the weights)."""
        return {key: value for key, value in super().__getstate__().items() if key not in self.CACHES}


class MonetHorizontalExperts(ExpertLayer):
    """MoHDE: E_ij(x) = V_j sigma(U_i x + b1_i) + b2_j (eq. 6), summed as eq. 12.

    `u` holds every U_i and b1_i (d -> E*m with bias), `v` every V_j (E*m -> d), `b` every b2_j ([E, d]).
    """

    def __init__(self, config: MonetConfig) -> None:
        super().__init__()
        self.experts, self.expert_dim = config.moe_experts, config.moe_dim
        width = self.experts * self.expert_dim
        self.act = activation(config.hidden_act)
        self.u = nn.Linear(config.hidden_size, width)
        self.v = nn.Linear(width, config.hidden_size, bias=False)
        self.b = nn.Parameter(torch.zeros(self.experts, config.hidden_size))

    def forward(self, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor,
                group: RoutingGroup | None = None) -> torch.Tensor:
        group = RoutingGroup(g1, g2) if group is None else group
        plan = sparse.choose(self, x, g1, g2, partial(group.sparse_routing, g1, g2, x.dtype),
                             partial(group.kept_halves, g1, g2))
        if isinstance(plan, sparse.Routing):         # only the active (token, half) pairs (monet.sparse), same value
            return sparse.hd_forward(self, x, plan)
        table = group.edit_weights
        if plan is not None:                          # decoding: the same sum over the kept halves' weights only
            return sparse.hd_decode(self, x, g1, g2, plan, table)
        edits = None if table is None else group.edited_pairs(g1, g2, x.dtype)
        g1, g2 = g1.to(x.dtype), g2.to(x.dtype)
        hidden = self.act(self.u(x)).unflatten(-1, (g1.shape[-1], self.expert_dim))   # sigma(U_i x + b1_i) [B, T, E, m]
        top_input, bias_weight = ops.hd_mix(hidden, g1, g2)
        if edits is not None:
            token, i, j, c = edits
            # Remove c_ij (V_j sigma(U_i x + b1_i) + b2_j) for every edited active pair.
            top_input = sparse.add_rows(top_input, token, j, -c.unsqueeze(-1) * sparse.gather_rows(hidden, token, i))
            bias_weight = sparse.add_rows(bias_weight, token, j, -c)
        return self.v(top_input.flatten(-2)) + bias_weight @ self.b


class MonetVerticalExperts(ExpertLayer):
    """MoVDE (eq. 13-15): each expert's first layer is split into a left half (from i) and a right
    half (from j), and its second layer into four blocks, giving the six terms of appendix A.1:

        top    = V11_i s(U1_i x) + V12_i s(U2_j x) + b12_i     (X11 + X12 + X13)
        bottom = V21_j s(U1_i x) + V22_j s(U2_j x) + b22_j     (X21 + X22 + X23)

    `u1`/`u2` hold U1_i, b11_i / U2_j, b21_j (d -> E*m/2 with bias), `v11`, `v12`, `v21`, `v22` the
    blocks (E*m/2 -> d/2), `b1` the b12_i and `b2` the b22_j ([E, d/2]).
    """

    def __init__(self, config: MonetConfig) -> None:
        super().__init__()
        self.experts, self.half_dim = config.moe_experts, config.moe_dim // 2
        width, half_out = self.experts * self.half_dim, config.hidden_size // 2
        self.act = activation(config.hidden_act)
        self.u1, self.u2 = (nn.Linear(config.hidden_size, width) for _ in range(2))
        self.v11, self.v12, self.v21, self.v22 = (nn.Linear(width, half_out, bias=False) for _ in range(4))
        self.b1, self.b2 = (nn.Parameter(torch.zeros(self.experts, half_out)) for _ in range(2))
        self.register_state_dict_post_hook(_unshare_paired_columns)

    def forward(self, x: torch.Tensor, g1: torch.Tensor, g2: torch.Tensor,
                group: RoutingGroup | None = None) -> torch.Tensor:
        group = RoutingGroup(g1, g2) if group is None else group
        plan = sparse.choose(self, x, g1, g2, partial(group.sparse_routing, g1, g2, x.dtype),
                             partial(group.kept_halves, g1, g2))
        if isinstance(plan, sparse.Routing):         # only the active (token, half) pairs (monet.sparse), same value
            return sparse.vd_forward(self, x, plan)
        table = group.edit_weights
        if plan is not None:                          # decoding: the same sum over the kept halves' weights only
            return sparse.vd_decode(self, x, g1, g2, plan, table)
        edits = None if table is None else group.edited_pairs(g1, g2, x.dtype)
        g1, g2 = g1.to(x.dtype), g2.to(x.dtype)
        h1 = self.act(self.u1(x)).unflatten(-1, (g1.shape[-1], self.half_dim))   # sigma(U1_i x + b11_i) [B, T, E, m/2]
        h2 = self.act(self.u2(x)).unflatten(-1, (g2.shape[-1], self.half_dim))   # sigma(U2_j x + b21_j)
        straight1, straight2, cross12, cross21, s1, s2 = ops.vd_mix(h1, h2, g1, g2)
        if edits is not None:
            token, i, j, c = edits
            # Remove c_ij E_ij(x): row sums over j and column sums over i of c, and the cross terms.
            rows = sparse.add_rows(torch.zeros_like(s1), token, i, c)
            cols = sparse.add_rows(torch.zeros_like(s2), token, j, c)
            straight1 = straight1 - rows.unsqueeze(-1) * h1
            straight2 = straight2 - cols.unsqueeze(-1) * h2
            cross12 = sparse.add_rows(cross12, token, i, -c.unsqueeze(-1) * sparse.gather_rows(h2, token, j))
            cross21 = sparse.add_rows(cross21, token, j, -c.unsqueeze(-1) * sparse.gather_rows(h1, token, i))
            s1, s2 = s1 - rows, s2 - cols
        top = self.v11(straight1.flatten(-2)) + self.v12(cross12.flatten(-2)) + s1 @ self.b1
        bottom = self.v21(cross21.flatten(-2)) + self.v22(straight2.flatten(-2)) + s2 @ self.b2
        return torch.cat((top, bottom), dim=-1)


def _unshare_paired_columns(layer: MonetVerticalExperts, state_dict: dict, prefix: str, metadata: dict) -> None:
    """After decoding, V11|V12 and V21|V22 share one table each (`monet.sparse.paired_columns`); state dicts get
    contiguous copies of them, since safetensors and `save_pretrained` refuse tensors that share memory."""
    if layer.__dict__.get("_paired_columns"):
        for name in ("v11", "v12", "v21", "v22"):
            key = f"{prefix}{name}.weight"
            if key in state_dict and not isinstance(state_dict[key], nn.Parameter):
                state_dict[key] = state_dict[key].contiguous()


def build_experts(config: MonetConfig) -> nn.Module:
    """The expert layer of `config`'s decomposition: HD (`moe_decompose="horizontal"`) or VD."""
    return (MonetHorizontalExperts if config.moe_decompose == "horizontal" else MonetVerticalExperts)(config)


def expert_output(moe: nn.Module, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """E_ij(x) [..., d], what one expert writes, from its two halves (eq. 6 for HD, A.1 for VD; see the
    classes' docstrings); nothing of size N is formed."""
    if isinstance(moe, MonetHorizontalExperts):
        m = moe.expert_dim
        rows = slice(i * m, (i + 1) * m)
        hidden = moe.act(x @ moe.u.weight[rows].T + moe.u.bias[rows])
        return hidden @ moe.v.weight[:, j * m:(j + 1) * m].T + moe.b[j]
    if isinstance(moe, MonetVerticalExperts):
        h = moe.half_dim
        block_i, block_j = slice(i * h, (i + 1) * h), slice(j * h, (j + 1) * h)
        left = moe.act(x @ moe.u1.weight[block_i].T + moe.u1.bias[block_i])
        right = moe.act(x @ moe.u2.weight[block_j].T + moe.u2.bias[block_j])
        top = left @ moe.v11.weight[:, block_i].T + right @ moe.v12.weight[:, block_i].T
        bottom = left @ moe.v21.weight[:, block_j].T + right @ moe.v22.weight[:, block_j].T
        return torch.cat((top + moe.b1[i], bottom + moe.b2[j]), dim=-1)
    raise MonetError(f"{type(moe).__name__} is not a Monet expert layer")


# ----------------------------------------------------------------------------------------------------------
# Baselines for the same decoder (so comparisons change one thing only)


class DenseMLP(nn.Module):
    """The LLaMA gated MLP (the paper's dense baseline): down(act(gate(x)) * up(x)), width `intermediate_size`."""

    def __init__(self, config: MonetConfig) -> None:
        super().__init__()
        bias = bool(config.mlp_bias)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = activation(config.dense_hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PEERLayer(nn.Module):
    """PEER (eq. 3-5): N = E^2 single-neuron experts u_ij, v_ij in R^d retrieved with product keys,
    PEER(x) = sum_h sum_{(i,j) in K_h} g_hij v_ij sigma(u_ij . x).

    Per head: score the E sub-keys of each half of x (eq. 3), take the top-k of each, score the k^2
    candidate pairs by the sum of their sub-key scores and keep the top k (eq. 4), softmax them.
    """

    def __init__(self, config: MonetConfig) -> None:
        super().__init__()
        self.heads, self.experts, self.topk = config.moe_heads, config.moe_experts, config.moe_topk
        half = config.hidden_size // 2
        self.key1 = nn.Linear(half, self.heads * self.experts, bias=False)
        self.key2 = nn.Linear(half, self.heads * self.experts, bias=False)
        self.expert_in = nn.Embedding(self.experts**2, config.hidden_size)    # u_ij
        self.expert_out = nn.Embedding(self.experts**2, config.hidden_size)   # v_ij
        self.act = activation(config.hidden_act)

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids i*E + j [B, T, H, k] and their routing scores g [B, T, H, k]."""
        x1, x2 = x.chunk(2, dim=-1)
        shape = (*x.shape[:-1], self.heads, self.experts)
        s1, i1 = self.key1(x1).view(shape).float().topk(self.topk, dim=-1)
        s2, i2 = self.key2(x2).view(shape).float().topk(self.topk, dim=-1)
        pair_scores = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)          # [..., H, k*k]
        pair_ids = (i1.unsqueeze(-1) * self.experts + i2.unsqueeze(-2)).flatten(-2)
        scores, best = pair_scores.topk(self.topk, dim=-1)
        return pair_ids.gather(-1, best), torch.softmax(scores, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, g = self.retrieve(x)
        u = self.expert_in(ids)                                                    # [B, T, H, k, d]
        hidden = self.act((u * x[..., None, None, :]).sum(-1)) * g.to(x.dtype)     # [B, T, H, k]
        return (hidden.unsqueeze(-1) * self.expert_out(ids)).sum(dim=(-3, -2))


# ----------------------------------------------------------------------------------------------------------
# 3. The decoder


@dataclass
class MonetModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_probs: tuple[Routing | None, ...] | None = None
    unif_loss: torch.FloatTensor | None = None
    amb_loss: torch.FloatTensor | None = None


@dataclass
class MonetCausalLMOutputWithPast(ModelOutput):
    loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_probs: tuple[Routing | None, ...] | None = None
    lm_loss: torch.FloatTensor | None = None
    unif_loss: torch.FloatTensor | None = None
    amb_loss: torch.FloatTensor | None = None


class MonetRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class MonetRotaryEmbedding(nn.Module):
    """RoPE (LLaMA layout: the two halves of each head are rotated together)."""

    def __init__(self, config: MonetConfig) -> None:
        super().__init__()
        scaling = getattr(config, "rope_parameters", None) or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "linear"):
            raise MonetError(f"rope_scaling type {kind!r} is not supported; use None or 'linear'")
        self.scale = float(scaling["factor"]) if kind == "linear" else 1.0
        self.theta = float(scaling.get("rope_theta", config.rope_theta))
        self.inv_freq = nn.Buffer(rope_inverse_frequencies(self.theta, config.head_dim), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = (position_ids[..., None].float() / self.scale) * self.inv_freq.to(x.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def rope_inverse_frequencies(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, head_dim]; cos/sin [B, T, head_dim]. Rotates (first, second) half by half."""
    first, second = x.chunk(2, dim=-1)
    return x * cos.unsqueeze(1) + torch.cat((-second, first), dim=-1) * sin.unsqueeze(1)


class MonetAttention(nn.Module):
    def __init__(self, config: MonetConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.dropout = config.attention_dropout
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = x.shape
        q, k, v = (proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if self.kv_heads != self.heads:
            k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions:
            scores = (q @ k.transpose(-1, -2)) / self.head_dim**0.5
            scores = scores + (attn_mask if attn_mask is not None else causal_bias(length, k.shape[-2], x))
            weights = F.dropout(torch.softmax(scores.float(), dim=-1).to(q.dtype), dropout, self.training)
            out = weights @ v
        else:
            causal = attn_mask is None and length == k.shape[-2] and length > 1
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=causal)
        out = out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim)
        return self.o_proj(out), weights


def causal_bias(q_len: int, kv_len: int, like: torch.Tensor) -> torch.Tensor:
    """Additive causal mask [q, kv] for queries at the last q_len of kv_len positions."""
    bias = torch.full((q_len, kv_len), torch.finfo(like.dtype).min, dtype=like.dtype, device=like.device)
    return bias.triu(kv_len - q_len + 1)   # query t (at kv_len - q_len + t) sees keys up to its own position


def attention_bias(attention_mask: torch.Tensor | None, q_len: int, kv_len: int,
                   like: torch.Tensor) -> torch.Tensor | None:
    """Additive mask [B, 1, q, kv] for causal attention over a cache of kv_len positions, with padding.

    Returns None when plain causal attention is exact, letting SDPA use its fast path. A padded query
    row that can see nothing gets a uniform (finite) mask instead of NaNs; its output is never used.
    """
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[-1] != kv_len):
        raise MonetError(f"attention_mask must be [batch, past + current length] = [*, {kv_len}], got "
                         f"{tuple(attention_mask.shape)}")
    if attention_mask is None or bool(attention_mask.all()):   # one host sync, only when a mask is given
        return None if q_len in (1, kv_len) else causal_bias(q_len, kv_len, like)[None, None]
    padding = ~attention_mask.bool()[:, None, None, :]
    return causal_bias(q_len, kv_len, like)[None, None].masked_fill(padding, torch.finfo(like.dtype).min)


class MonetDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MonetConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = MonetAttention(config, layer_idx)
        self.input_layernorm = MonetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MonetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.mlp_type == "monet":
            self.moe = build_experts(config)
            if config.is_routing_layer(layer_idx):
                self.router = MonetRouter(config)
        else:
            self.mlp = DenseMLP(config) if config.mlp_type == "dense" else PEERLayer(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        group: RoutingGroup | None = None,
        token_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, RoutingGroup | None]:
        """`group` is the routing group of the layers before (None before the first). Returns (hidden_states,
        attention weights or None, the group this layer's router starts or None)."""
        attended, weights = self.self_attn(
            self.input_layernorm(hidden_states), rotary, attn_mask, past_key_values, output_attentions
        )
        hidden_states = hidden_states + attended
        normed = self.post_attention_layernorm(hidden_states)
        new_group = None
        if hasattr(self, "router"):
            group = new_group = RoutingGroup(*self.router(normed, token_mask), self.router.edit_weights)
        if hasattr(self, "moe"):
            update = self.moe(normed, group.g1, group.g2, group=group)
        else:
            update = self.mlp(normed)
        return hidden_states + update, weights, new_group


class MonetPreTrainedModel(PreTrainedModel):
    config_class = MonetConfig
    config: MonetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MonetDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, MonetRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, nn.BatchNorm1d):
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, (MonetHorizontalExperts, MonetVerticalExperts)):
            for bias in module.parameters(recurse=False):   # b (HD); b1, b2 (VD)
                init.zeros_(bias)
        elif isinstance(module, MonetRotaryEmbedding):
            init.copy_(module.inv_freq, rope_inverse_frequencies(module.theta, self.config.head_dim))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Hugging Face `from_pretrained`, strict: missing, misshapen or unexpected tensors, or a damaged
        file, raise `MonetError` naming them instead of silently re-initialising weights (transformers'
        own loading report, `output_loading_info`, says which). Expert edits saved beside the weights
        (`expert_edits.safetensors`) are applied again."""
        path = Path(pretrained_model_name_or_path)
        want_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("ignore_mismatched_sizes", True)   # reported below, with names, not raised deep inside
        kwargs.setdefault("use_safetensors", True)           # never unpickle weights
        if not path.is_dir() and (str(pretrained_model_name_or_path).startswith((".", "/", "~")) or path.exists()):
            raise MonetError(f"no checkpoint directory at {path}")
        if path.is_dir() and not any((path / name).is_file() for name in WEIGHT_FILES):
            raise MonetError(f"{path} has no model.safetensors (nor a sharded index); Monet loads safetensors weights "
                             "only (convert a pickled checkpoint with safetensors.torch.save_file)")
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args,
                                                  output_loading_info=True, **kwargs)
        except MonetError:
            raise
        except Exception as exc:  # transformers and safetensors raise many types for damaged files
            raise MonetError(f"could not load the checkpoint at {pretrained_model_name_or_path}: the weights are "
                             f"corrupt or truncated, or config.json is unreadable ({type(exc).__name__}: {exc}); "
                             "re-save or re-copy it") from exc
        check_loading_info(info, path)
        if path.is_dir() and edits.edits_path(path).is_file():
            edits.load_edits(model, path)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Hugging Face `save_pretrained`, plus the expert edits (masks, steering) when any are applied, and
        the remote-code shim (`modeling_monet_lm.py` + `auto_map`, see `monet.remote_code`) that lets clients
        which never `import monet` load the directory with `trust_remote_code=True`."""
        with remote_code.auto_map_for_saving(self):
            super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            remote_code.write_shim(save_directory)
        if any(getattr(m, "edit_weights", None) is not None for m in self.modules()):
            edits.save_edits(self, save_directory)
        else:
            edits.edits_path(save_directory).unlink(missing_ok=True)   # a stale file would re-apply old edits


def check_loading_info(info: dict, path: Path) -> None:
    """MonetError listing the tensors transformers could not match with the config (see `from_pretrained`)."""
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("rotary_emb.inv_freq"))
    unexpected = sorted(info.get("unexpected_keys", ()))
    misshapen = [f"{key}: checkpoint {list(found)}, config {list(wanted)}"
                 for key, found, wanted in sorted(info.get("mismatched_keys", ()))]
    problems = []
    for what, names in (("missing", missing), ("misshapen", misshapen), ("unexpected", unexpected)):
        if names:
            more = " ..." if len(names) > 8 else ""
            problems.append(f"{what} tensors ({len(names)}): {'; '.join(names[:8])}{more}")
    if problems:
        raise MonetError(f"the weights in {path} do not match its config.json — " + " | ".join(problems)
                         + ". Check that config.json belongs to these weights (hidden_size, moe_* fields, moe_groups).")


class MonetModel(MonetPreTrainedModel):
    def __init__(self, config: MonetConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(MonetDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MonetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MonetRotaryEmbedding(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_probs: bool | None = None,
        output_aux_loss: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> MonetModelOutputWithPast | tuple:
        config = self.config
        # transformers 5.25 renamed past_key_values to `cache`: its generate passes the cache under that name.
        past_key_values = cache if past_key_values is None else past_key_values
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_router_probs = config.output_router_probs if output_router_probs is None else output_router_probs
        use_cache = (config.use_cache and not self.training) if use_cache is None else use_cache
        return_dict = config.return_dict if return_dict is None else return_dict
        output_aux_loss = self.training if output_aux_loss is None else output_aux_loss
        if (input_ids is None) == (inputs_embeds is None):
            raise MonetError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            check_token_ids(input_ids, config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)

        batch, length = inputs_embeds.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = positions(attention_mask, past, length, inputs_embeds.device).expand(batch, -1)
        hidden_states = inputs_embeds
        attn_mask = attention_bias(attention_mask, length, past + length, hidden_states)
        rotary = self.rotary_emb(hidden_states, position_ids)
        # Padding stays out of the routing statistics and aux losses (a 2D mask over this step's tokens).
        token_mask = attention_mask[:, -length:].bool() if attention_mask is not None else None

        all_hidden = () if output_hidden_states else None
        all_attn = () if output_attentions else None
        all_routing = () if output_router_probs else None
        unif, amb, group = [], [], None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states, weights, new_group = layer(
                hidden_states, rotary, attn_mask, past_key_values, group, token_mask, output_attentions
            )
            if new_group is not None:
                group = new_group
                if output_aux_loss:
                    unif.append(uniformity_loss(group.g1, group.g2, token_mask))
                    amb.append(ambiguity_loss(group.g1, group.g2, token_mask))
            if output_attentions:
                all_attn += (weights,)
            if output_router_probs:
                all_routing += (None if new_group is None else (new_group.g1, new_group.g2),)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)

        output = MonetModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden,
            attentions=all_attn,
            router_probs=all_routing,
            unif_loss=torch.stack(unif).mean() if unif else None,
            amb_loss=torch.stack(amb).mean() if amb else None,
        )
        return output if return_dict else output.to_tuple()


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Out-of-range ids would fail deep inside the embedding (a device-side assert on a GPU). Checked for CPU
    tensors only, where it costs no device sync, and never while compiling."""
    if input_ids.device.type != "cpu" or torch.compiler.is_compiling() or not input_ids.numel():
        return
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        raise MonetError(f"token ids must lie in [0, {vocab_size}) for this model's vocabulary, got [{low}, {high}]: "
                         "does the tokenizer match the checkpoint?")


def positions(attention_mask: torch.Tensor | None, past: int, length: int, device: torch.device) -> torch.Tensor:
    """Rotary positions; with a 2D padding mask each row counts only its real tokens (left padding)."""
    if attention_mask is not None and attention_mask.dim() == 2:
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -length:]
    return torch.arange(past, past + length, device=device)[None]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: logits [B, T, V] predict labels[:, 1:] (-100 ignored).

    The one loss of the package: the model's `lm_loss`, training and evaluation all use it. `reduction`
    "none" gives [B, T - 1] per-token losses (0 at ignored positions), e.g. for per-window statistics.
    """
    targets = labels[:, 1:].to(logits.device)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100, reduction=reduction)
    return loss.view(targets.shape) if reduction == "none" else loss


class MonetForCausalLM(MonetPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MonetConfig) -> None:
        super().__init__(config)
        self.model = MonetModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_probs: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> MonetCausalLMOutputWithPast | tuple:
        """Causal LM forward. `labels` are the input ids (shifted inside); -100 is ignored. `cache` is
        transformers' newer name for `past_key_values` (its generate uses it from 5.25 on)."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_router_probs=output_router_probs,
            output_aux_loss=self.training or labels is not None,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states).float()

        loss = lm_loss = aux_loss = None
        if outputs.unif_loss is not None:
            aux_loss = outputs.unif_loss + outputs.amb_loss
        if labels is not None:
            lm_loss = causal_lm_loss(logits, labels)
            loss = lm_loss if aux_loss is None else lm_loss + self.config.aux_loss_weight * aux_loss
        output = MonetCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_probs=outputs.router_probs,
            lm_loss=lm_loss,
            unif_loss=outputs.unif_loss,
            amb_loss=outputs.amb_loss,
        )
        return output if return_dict else output.to_tuple()


# `AutoModelForCausalLM.from_pretrained(dir)` works for `model_type: monet` once this module is imported
# (`import monet` does it).
AutoConfig.register("monet", MonetConfig, exist_ok=True)
AutoModel.register(MonetConfig, MonetModel, exist_ok=True)
AutoModelForCausalLM.register(MonetConfig, MonetForCausalLM, exist_ok=True)
# `register` fills the class mappings only; clients that ask "is this model_type a causal LM?" read the name
# table (lm-eval's HF backend, which otherwise warns "neither marked as CausalLM or Seq2SeqLM").
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(MonetConfig.model_type, MonetForCausalLM.__name__)

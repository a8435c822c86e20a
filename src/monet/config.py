"""`MonetConfig` and named presets.

The field names and defaults follow the official release (a LLaMA config plus the `moe_*` fields), so
a `config.json` written by the official modeling code loads unchanged. Fields we add for training
and baselines (`aux_loss_weight`, `mlp_type`, `dense_hidden_act`) have defaults that leave official
checkpoints untouched.
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import PretrainedConfig

from monet.errors import MonetError
from monet.presets import PRESETS

DECOMPOSITIONS = ("vertical", "horizontal")
MLP_TYPES = ("monet", "dense", "peer")


class MonetConfig(PretrainedConfig):
    """Configuration of a Monet decoder (paper Table 6 for the released shapes).

    Expert fields: `moe_experts` is E = sqrt(N), the number of bottom (left) and of top (right)
    halves; `moe_dim` is m, the hidden width of one expert; `moe_heads` is H; `moe_topk` is k, the
    expected number of halves kept per head and side; `moe_groups` is how many consecutive layers
    share one router (layer l routes when l % moe_groups == 0).

    `mlp_type` swaps the feed-forward block for the baselines of the same decoder: "dense" (a
    LLaMA gated MLP of width `intermediate_size`) or "peer" (product-key retrieval of N = E^2
    single-neuron experts, paper eq. 3-5, reusing the `moe_*` fields).
    """

    model_type = "monet"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        hidden_act: str = "relu2",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        pretraining_tp: int = 1,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        mlp_bias: bool | None = None,
        moe_dim: int = 8,
        moe_heads: int = 8,
        moe_experts: int = 512,
        moe_topk: int = 32,
        moe_groups: int = 4,
        moe_decompose: str = "vertical",
        output_router_probs: bool = False,
        aux_loss_weight: float = 1e-3,
        mlp_type: str = "monet",
        dense_hidden_act: str = "silu",
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.pretraining_tp = pretraining_tp
        self.rope_theta = rope_theta
        # transformers 5 stores the LLaMA-era `rope_scaling` as `rope_parameters` (same dict).
        self.rope_parameters = rope_scaling if rope_scaling is not None else kwargs.pop("rope_parameters", None)
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.moe_dim = moe_dim
        self.moe_heads = moe_heads
        self.moe_experts = moe_experts
        self.moe_topk = moe_topk
        self.moe_groups = moe_groups
        self.moe_decompose = moe_decompose
        self.output_router_probs = output_router_probs
        self.aux_loss_weight = aux_loss_weight
        self.mlp_type = mlp_type
        self.dense_hidden_act = dense_hidden_act
        # Later LLaMA configs may carry head_dim; Monet always uses hidden_size / num_attention_heads.
        head_dim = kwargs.pop("head_dim", None)
        if head_dim is not None and head_dim * num_attention_heads != hidden_size:
            raise MonetError(f"head_dim {head_dim} x num_attention_heads {num_attention_heads} != hidden_size "
                             f"{hidden_size}; Monet attention heads are hidden_size / num_attention_heads wide")
        self.validate_monet()   # before transformers' own validators, so users see our messages
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_experts(self) -> int:
        """N = E^2 experts per layer."""
        return self.moe_experts**2

    # Routing groups and their layers: the one place that maps one to the other.

    def is_routing_layer(self, layer_idx: int) -> bool:
        """Layer l computes routing when l % moe_groups == 0; later layers of its group reuse it."""
        return layer_idx % self.moe_groups == 0

    def group_layers(self, group: int) -> range:
        """The decoder layers of routing group g (the last group may be shorter)."""
        return range(group * self.moe_groups, min((group + 1) * self.moe_groups, self.num_hidden_layers))

    @property
    def num_routing_groups(self) -> int:
        return -(-self.num_hidden_layers // self.moe_groups)

    def validate_monet(self) -> None:
        """Check shapes that would otherwise fail deep inside torch; raise `MonetError` with the fix."""
        sizes = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "moe_dim", "moe_heads", "moe_experts", "moe_topk", "moe_groups"]
        for name in sizes + (["intermediate_size"] if self.mlp_type == "dense" else []):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MonetError(f"{name} must be a positive integer, got {value!r}")
            if value > SIZE_LIMITS.get(name, 1 << 20):   # before anything is built: a huge size would hang, not fail
                raise MonetError(f"{name} must be at most {SIZE_LIMITS.get(name, 1 << 20):,} (far beyond any "
                                 f"trained model), got {value:,}")
        from transformers.activations import ACT2FN  # the names the model's `activation` accepts

        for name in ("hidden_act", "dense_hidden_act"):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in ACT2FN:
                raise MonetError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(sorted(ACT2FN))}")
        if self.mlp_type not in MLP_TYPES:
            raise MonetError(f"unknown mlp_type {self.mlp_type!r}; choose one of {', '.join(MLP_TYPES)}")
        if self.moe_decompose not in DECOMPOSITIONS:
            raise MonetError(f"unknown moe_decompose {self.moe_decompose!r}; "
                             "choose 'vertical' (VD) or 'horizontal' (HD)")
        vertical = self.mlp_type == "monet" and self.moe_decompose == "vertical"
        for name, what in (("hidden_size", "the hidden size"), ("moe_dim", "each expert's width")):
            if vertical and getattr(self, name) % 2:
                raise MonetError(f"vertical decomposition splits {what} in two halves, so {name} must be even "
                                 f"(got {getattr(self, name)}); use an even {name} or moe_decompose='horizontal'")
        if self.hidden_size % self.num_attention_heads:
            raise MonetError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}; pick sizes whose ratio is the attention head width")
        if self.num_attention_heads % self.num_key_value_heads:
            raise MonetError(f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                             f"{self.num_key_value_heads} (grouped-query attention shares each key/value head evenly)")
        if self.head_dim % 2:
            raise MonetError(f"attention head width {self.head_dim} must be even for rotary embeddings")
        if self.moe_topk > self.moe_experts:
            raise MonetError(f"moe_topk ({self.moe_topk}) cannot exceed moe_experts ({self.moe_experts}): a head keeps "
                             "k of the E halves on each side")
        if self.mlp_type == "peer" and self.hidden_size % 2:
            raise MonetError(f"PEER splits the query in two halves: hidden_size must be even, got {self.hidden_size}")


# Upper bounds of the shape fields (default 2^20), far above every released model (Monet-4.1B: 32 layers, d=3072,
# E=512), so that a typo such as num_hidden_layers=1000000 is refused at once instead of building for hours.
SIZE_LIMITS = {"num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024, "moe_heads": 1024,
               "moe_groups": 1024, "moe_experts": 1 << 14, "moe_topk": 1 << 14, "hidden_size": 1 << 16,
               "moe_dim": 1 << 16, "vocab_size": 1 << 24}


def preset(name: str, **overrides: Any) -> MonetConfig:
    """Build the `MonetConfig` of a named preset, with any field overridden.

    >>> preset("monet-vd-1.4b").moe_experts
    512
    """
    key = name.lower()
    if key not in PRESETS:
        raise MonetError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - config_fields())
    if unknown:
        valid = ", ".join(sorted(config_fields()))
        raise MonetError(f"unknown config field(s) {', '.join(unknown)}{did_you_mean(unknown, config_fields())}; "
                         f"valid fields: {valid}")
    return MonetConfig(**{**PRESETS[key], **overrides})


def did_you_mean(unknown: list[str], valid: set[str]) -> str:
    """' (did you mean moe_experts?)' for the close matches of misspelt field names, else ''."""
    import difflib

    close = [match for name in unknown for match in difflib.get_close_matches(name, sorted(valid), n=1)]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def config_fields() -> set[str]:
    """The fields `MonetConfig` takes by name (the official ones plus ours)."""
    return {p for p in inspect.signature(MonetConfig.__init__).parameters if p not in ("self", "kwargs")}

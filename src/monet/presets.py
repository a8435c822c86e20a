"""Named model shapes: the released checkpoints (paper Table 6) and CPU-sized ones. Plain data, no imports,
so the command line can list and check them without loading transformers; `monet.config.preset(name)`
turns one into a `MonetConfig`."""

from __future__ import annotations


def _released(layers: int, dim: int, heads: int, moe_dim: int, moe_heads: int, decompose: str) -> dict:
    return dict(
        vocab_size=32000, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, moe_dim=moe_dim, moe_heads=moe_heads, moe_experts=512, moe_topk=8,
        moe_groups=4, moe_decompose=decompose, max_position_embeddings=2048, tie_word_embeddings=False,
    )


# Paper Table 6 (850M, 1.4B, 4.1B) plus CPU-sized shapes. `small` keeps the full 262,144 experts
# per layer (E = 512) with a narrow expert width, so interpretability work sees the real expert count.
PRESETS: dict[str, dict] = {
    "monet-vd-850m": _released(24, 1536, 12, 12, 6, "vertical"),
    "monet-vd-1.4b": _released(24, 2048, 16, 16, 8, "vertical"),
    "monet-vd-4.1b": _released(32, 3072, 24, 24, 12, "vertical"),
    "monet-hd-850m": _released(24, 1536, 12, 12, 6, "horizontal"),
    "monet-hd-1.4b": _released(24, 2048, 16, 16, 8, "horizontal"),
    "monet-hd-4.1b": _released(32, 3072, 24, 24, 12, "horizontal"),
    "codemonet-vd-1.4b": _released(24, 2048, 16, 16, 8, "vertical"),
    "tiny": dict(
        vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        moe_dim=4, moe_heads=2, moe_experts=8, moe_topk=2, moe_groups=2, moe_decompose="vertical",
        max_position_embeddings=128, intermediate_size=64,
    ),
    "small": dict(
        vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        moe_dim=2, moe_heads=4, moe_experts=512, moe_topk=8, moe_groups=2, moe_decompose="vertical",
        max_position_embeddings=512,
    ),
}

"""The Monet decoder and its Hugging Face classes.

A LLaMA decoder (RMSNorm, rotary attention with grouped-query heads and SDPA, untied head) whose MLP
is replaced by Monet experts. Layer l computes routing when l % moe_groups == 0 and the following
layers of its group reuse that (g1, g2). The state-dict keys are the official ones, so a directory
written by the official modeling code loads with `MonetForCausalLM.from_pretrained(dir)`.

Outputs follow Hugging Face conventions plus the official `router_probs`: with
`output_router_probs=True`, one entry per decoder layer, the (g1, g2) pair ([B, T, H, E] each) on
routing layers and None on layers that reuse the group's routing (as the official code returns).
With labels, `loss = lm_loss + aux_loss_weight * aux_loss`, where aux_loss is the mean over routing
layers of the uniformity and ambiguity losses (eq. 16-18, see `monet.routing`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from monet.baselines import DenseMLP, PEERLayer
from monet.config import MonetConfig
from monet.errors import MonetError
from monet.experts import MonetHorizontalExperts, MonetVerticalExperts, build_experts
from monet.routing import MonetRouter, ambiguity_loss, apply_padding_to_mask, uniformity_loss

Routing = tuple[torch.Tensor, torch.Tensor]
EXPERT_EDITS_FILE = "expert_edits.safetensors"   # written by `monet.editing`, beside model.safetensors


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
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MonetRotaryEmbedding(nn.Module):
    """RoPE (LLaMA layout: the two halves of each head are rotated together)."""

    def __init__(self, config: MonetConfig) -> None:
        super().__init__()
        self.scale = 1.0
        scaling = getattr(config, "rope_parameters", None) or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "linear":
            self.scale = float(scaling["factor"])
        elif kind != "default":
            raise MonetError(f"rope_scaling type {kind!r} is not supported; use None or 'linear'")
        self.theta = float(scaling.get("rope_theta", config.rope_theta))
        dim = config.head_dim
        self.inv_freq = nn.Buffer(rope_inverse_frequencies(self.theta, dim), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = (position_ids[..., None].float() / self.scale) * self.inv_freq.to(x.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def rope_inverse_frequencies(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, head_dim]; cos/sin [B, T, head_dim]."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class MonetAttention(nn.Module):
    def __init__(self, config: MonetConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim
        )
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
        q = self.q_proj(x).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if output_attentions:
            scores = (q @ k.transpose(-1, -2)) / self.head_dim**0.5
            scores = scores + (attn_mask if attn_mask is not None else _causal_bias(length, k.shape[-2], x))
            weights = F.dropout(torch.softmax(scores.float(), dim=-1).to(q.dtype), dropout, self.training)
            out = weights @ v
        else:
            causal = attn_mask is None and length == k.shape[-2] and length > 1
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=causal)
        out = out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim)
        return self.o_proj(out), weights


def _causal_bias(q_len: int, kv_len: int, like: torch.Tensor) -> torch.Tensor:
    """Additive causal mask [q, kv] for queries at the last q_len of kv_len positions."""
    queries = kv_len - q_len + torch.arange(q_len, device=like.device)
    allowed = torch.arange(kv_len, device=like.device)[None, :] <= queries[:, None]
    bias = torch.zeros(q_len, kv_len, dtype=like.dtype, device=like.device)
    return bias.masked_fill(~allowed, torch.finfo(like.dtype).min)


def build_attention_bias(
    attention_mask: torch.Tensor | None, q_len: int, kv_len: int, like: torch.Tensor
) -> torch.Tensor | None:
    """Additive mask [B, 1, q, kv] for causal attention over a cache of kv_len positions, with padding.

    Returns None when plain causal attention is exact (no padding), letting SDPA use its fast path.
    A padded query row that can see nothing gets a uniform (finite) mask instead of NaNs; its output
    is never used.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None if q_len in (1, kv_len) else _causal_bias(q_len, kv_len, like)[None, None]
    if attention_mask.dim() != 2 or attention_mask.shape[-1] != kv_len:
        raise MonetError(
            f"attention_mask must be [batch, past + current length] = [*, {kv_len}], got {tuple(attention_mask.shape)}"
        )
    bias = _causal_bias(q_len, kv_len, like)[None, None]
    padding = ~attention_mask.bool()[:, None, None, :]
    return bias.masked_fill(padding, torch.finfo(like.dtype).min)


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
        elif config.mlp_type == "dense":
            self.mlp = DenseMLP(config)
        else:
            self.mlp = PEERLayer(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        previous_routing: Routing | None = None,
        token_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Routing | None]:
        """Returns (hidden_states, attention weights or None, this layer's new routing or None)."""
        attended, weights = self.self_attn(
            self.input_layernorm(hidden_states), rotary, attn_mask, past_key_values, output_attentions
        )
        hidden_states = hidden_states + attended
        normed = self.post_attention_layernorm(hidden_states)
        routing = None
        if hasattr(self, "moe"):
            routing = self.router(normed, token_mask) if hasattr(self, "router") else None
            g1, g2 = routing if routing is not None else previous_routing
            update = self.moe(normed, g1, g2)
        else:
            update = self.mlp(normed)
        return hidden_states + update, weights, routing


class MonetPreTrainedModel(PreTrainedModel):
    config_class = MonetConfig
    config: MonetConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MonetDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_attention_backend = False

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
        elif isinstance(module, MonetHorizontalExperts):
            init.zeros_(module.b)
        elif isinstance(module, MonetVerticalExperts):
            init.zeros_(module.b1)
            init.zeros_(module.b2)
        elif isinstance(module, MonetRotaryEmbedding):
            init.copy_(module.inv_freq, rope_inverse_frequencies(module.theta, self.config.head_dim))


    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Hugging Face `from_pretrained`, strict: a local checkpoint whose tensors are missing,
        misshapen, unexpected or unreadable raises `MonetError` naming them, instead of silently
        re-initialising weights."""
        path = Path(pretrained_model_name_or_path)
        want_info = kwargs.pop("output_loading_info", False)
        if path.is_dir():
            config = kwargs.get("config")
            if not isinstance(config, MonetConfig):
                if not (path / "config.json").is_file():
                    raise MonetError(f"{path} has no config.json: is it a checkpoint directory (HF layout)?")
                config = _load_config(path)
            validate_checkpoint(path, config)
        elif str(pretrained_model_name_or_path).startswith((".", "/", "~")) or path.exists():
            raise MonetError(f"no checkpoint directory at {path}")
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except (OSError, RuntimeError) as exc:
            raise MonetError(f"could not load the checkpoint at {pretrained_model_name_or_path}: {exc}") from exc
        if path.is_dir() and (path / EXPERT_EDITS_FILE).is_file():
            from monet.editing import load_edits  # persistent expert masks / steering saved beside the weights

            load_edits(model, path)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """Hugging Face `save_pretrained`, plus the expert edits (masks, steering) when any are applied."""
        super().save_pretrained(save_directory, *args, **kwargs)
        edits_path = Path(save_directory) / EXPERT_EDITS_FILE
        if any(getattr(m, "edit_weights", None) is not None for m in self.modules()):
            from monet.editing import save_edits

            save_edits(self, save_directory)
        elif edits_path.exists():
            edits_path.unlink()   # a stale file from an earlier save would re-apply old edits


def _load_config(path: Path) -> MonetConfig:
    try:
        return MonetConfig.from_pretrained(path)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise MonetError(f"{path / 'config.json'} is not a readable Monet config: {exc}") from exc


def _checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from safetensors headers only (single file or sharded index)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise MonetError(
            f"{path} has no model.safetensors (nor a sharded index); Monet loads safetensors weights only "
            "(convert a pickled checkpoint with safetensors.torch.save_file)"
        )
    shapes = {}
    for name in files:
        try:
            with safe_open(str(path / name), framework="pt") as handle:
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        except Exception as exc:  # safetensors raises its own error type for a damaged header
            raise MonetError(f"{path / name} is corrupt or truncated ({exc}); re-save or re-copy it") from exc
    return shapes


def validate_checkpoint(path: Path, config: MonetConfig) -> None:
    """Compare a checkpoint's tensors with what `config` builds; raise `MonetError` listing problems."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MonetForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    found = _checkpoint_shapes(path)
    found = {k: v for k, v in found.items() if not k.endswith("rotary_emb.inv_freq")}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - {"lm_head.weight"})
    misshapen = [f"{k}: checkpoint {list(found[k])}, config {list(expected[k])}"
                 for k in sorted(set(expected) & set(found)) if found[k] != expected[k]]
    problems = []
    if missing:
        more = " ..." if len(missing) > 8 else ""
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:8])}{more}")
    if misshapen:
        problems.append(f"misshapen tensors ({len(misshapen)}): {'; '.join(misshapen[:8])}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:8])}")
    if problems:
        raise MonetError(
            f"checkpoint {path} does not match its config.json — " + " | ".join(problems)
            + ". Check that config.json belongs to these weights (hidden_size, moe_* fields, moe_groups)."
        )


class MonetModel(MonetPreTrainedModel):
    def __init__(self, config: MonetConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(MonetDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MonetRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MonetRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

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
        **kwargs,
    ) -> MonetModelOutputWithPast | tuple:
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_router_probs = config.output_router_probs if output_router_probs is None else output_router_probs
        use_cache = (config.use_cache and not self.training) if use_cache is None else use_cache
        return_dict = config.return_dict if return_dict is None else return_dict
        output_aux_loss = self.training if output_aux_loss is None else output_aux_loss
        if (input_ids is None) == (inputs_embeds is None):
            raise MonetError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            _check_token_ids(input_ids, config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)

        batch, length = inputs_embeds.shape[:2]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = _positions(attention_mask, past, length, inputs_embeds.device).expand(batch, -1)
        hidden_states = inputs_embeds
        attn_mask = build_attention_bias(attention_mask, length, past + length, hidden_states)
        rotary = self.rotary_emb(hidden_states, position_ids)
        token_mask = apply_padding_to_mask(attention_mask, inputs_embeds.shape)

        all_hidden = () if output_hidden_states else None
        all_attn = () if output_attentions else None
        all_routing = () if output_router_probs else None
        unif, amb, routing = [], [], None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states, weights, new_routing = layer(
                hidden_states, rotary, attn_mask, past_key_values, routing, token_mask, output_attentions
            )
            if new_routing is not None:
                routing = new_routing
                if output_aux_loss:
                    unif.append(uniformity_loss(*routing, token_mask))
                    amb.append(ambiguity_loss(*routing, token_mask))
            if output_attentions:
                all_attn += (weights,)
            if output_router_probs:
                all_routing += (new_routing,)
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


def _check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if input_ids.numel() and (int(input_ids.max()) >= vocab_size or int(input_ids.min()) < 0):
        raise MonetError(
            f"token ids must lie in [0, {vocab_size}) for this model's vocabulary, got "
            f"[{int(input_ids.min())}, {int(input_ids.max())}]: does the tokenizer match the checkpoint?"
        )


def _positions(attention_mask: torch.Tensor | None, past: int, length: int, device: torch.device) -> torch.Tensor:
    """Rotary positions; with a padding mask, each row counts only its real tokens (left padding)."""
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.clamp_min(0)[:, -length:]
    return torch.arange(past, past + length, device=device)[None]


class MonetForCausalLM(MonetPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MonetConfig) -> None:
        super().__init__(config)
        self.model = MonetModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

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
        **kwargs,
    ) -> MonetCausalLMOutputWithPast | tuple:
        """Causal LM forward. `labels` are the input ids (shifted inside); -100 is ignored."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
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
            lm_loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
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

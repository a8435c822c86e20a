"""What an expert writes, and self-explanation (paper §4.3, Fig. 2).

`expert_output` evaluates one expert E_ij(x) from its two halves in factored form (nothing of size
N is formed). `expert_logits` averages an expert's output over the normed hidden states of its top
contexts (summed over the layers of its routing group, since expert (g, id) has a term in each) and
reads it through the final norm's gain and the unembedding: the tokens it promotes and suppresses.

`explain_expert` is the paper's self-explanation prompt
"Q: What is the meaning of the word X? A: Sure! The meaning of the word X is " with X the averaged
input embedding of the expert's top activating tokens, fed as `inputs_embeds`. Its answers mean
something only for a chat-tuned model (the paper used Monet-1.4B Chat).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from monet.errors import MonetError
from monet.experts import MonetHorizontalExperts, MonetVerticalExperts

EXPLAIN_PROMPT = "Q: What is the meaning of the word X? A: Sure! The meaning of the word X is "
CHAT_NOTE = ("note: self-explanation is meaningful only for chat-tuned models (the paper used Monet-1.4B "
             "Chat); on a base model these samples are mostly continuations, not descriptions.")


def expert_output(moe: torch.nn.Module, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """E_ij(x) [..., d] of one expert from its halves: HD V_j s(U_i x + b1_i) + b2_j; VD the concatenation
    [V11_i s(U1_i x) + V12_i s(U2_j x) + b12_i ; V21_j s(U1_i x) + V22_j s(U2_j x) + b22_j] (biases inside s)."""
    if isinstance(moe, MonetHorizontalExperts):
        m = moe.expert_dim
        rows = slice(i * m, (i + 1) * m)
        hidden = moe.act(x @ moe.u.weight[rows].T + moe.u.bias[rows])
        return hidden @ moe.v.weight[:, j * m:(j + 1) * m].T + moe.b[j]
    if isinstance(moe, MonetVerticalExperts):
        h = moe.half_dim
        left = moe.act(x @ moe.u1.weight[i * h:(i + 1) * h].T + moe.u1.bias[i * h:(i + 1) * h])     # s(U1_i x)
        right = moe.act(x @ moe.u2.weight[j * h:(j + 1) * h].T + moe.u2.bias[j * h:(j + 1) * h])    # s(U2_j x)
        block_i, block_j = slice(i * h, (i + 1) * h), slice(j * h, (j + 1) * h)
        top = left @ moe.v11.weight[:, block_i].T + right @ moe.v12.weight[:, block_i].T
        bottom = left @ moe.v21.weight[:, block_j].T + right @ moe.v22.weight[:, block_j].T
        return torch.cat((top + moe.b1[i], bottom + moe.b2[j]), dim=-1)
    raise MonetError(f"{type(moe).__name__} is not a Monet expert layer")


def group_layers(model: torch.nn.Module, group: int) -> list[int]:
    """Decoder layers whose expert terms belong to routing group `group` (dense: the layer itself)."""
    config = model.config
    if getattr(config, "mlp_type", "monet") != "monet":
        return [group]
    size = config.moe_groups
    return [layer for layer in range(config.num_hidden_layers) if layer // size == group]


def context_prefixes(atlas, group: int, expert: int, k: int, dataset=None) -> list[list[int]]:
    """Token ids the model saw up to and including each top context's activating token: the exact window
    of the build when the dataset is available, else the stored window around the token."""
    seq_len = int(atlas.manifest["options"]["seq_len"])
    out = []
    for ctx in atlas.top_contexts(group, expert, k):
        if dataset is not None:
            doc = dataset.document(int(ctx["doc"]))
            start = (int(ctx["pos"]) // seq_len) * seq_len
            out.append([int(t) for t in doc[start:int(ctx["pos"]) + 1]])
        else:
            out.append(ctx["tokens"][:ctx["target"] + 1])
    return out


def _open_dataset(atlas):
    from monet.data import TokenDataset

    data = atlas.manifest.get("data", {})
    try:
        return TokenDataset(data["dir"], data["split"]) if Path(data.get("dir", "")).is_dir() else None
    except MonetError:
        return None


@torch.no_grad()
def expert_direction(model: torch.nn.Module, atlas, group: int, expert: int, k: int = 10,
                     dataset: Any = None) -> torch.Tensor:
    """The expert's output [d], averaged over its top contexts and summed over its group's layers."""
    atlas.check_expert(group, expert)
    layers = [model.model.layers[layer] for layer in group_layers(model, group)]
    if atlas.manifest["kind"] == "dense":
        weight = layers[0].mlp.down_proj.weight[:, expert]
        return weight * max(float(atlas.expert(group, expert)["max_score"]), 1e-6)
    prefixes = context_prefixes(atlas, group, expert, k, dataset if dataset is not None else _open_dataset(atlas))
    if not prefixes:
        raise MonetError(f"expert {group}:{expert} has no contexts in this atlas, so it has no measured output")
    experts_per_side = model.config.moe_experts
    i, j = divmod(int(expert), experts_per_side)
    device = next(model.parameters()).device
    total = torch.zeros(model.config.hidden_size, device=device)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.moe.register_forward_hook(lambda mod, args, out, n=n: inputs.__setitem__(n, args[0][0, -1]))
             for n, layer in enumerate(layers)]
    try:
        for prefix in prefixes:
            model(input_ids=torch.tensor([prefix], device=device), use_cache=False)
            for n, layer in enumerate(layers):
                total += expert_output(layer.moe, inputs[n].float(), i, j).float()
    finally:
        for hook in hooks:
            hook.remove()
    return total / len(prefixes)


@torch.no_grad()
def expert_logits(model: torch.nn.Module, atlas, group: int, expert: int, n: int = 10, k: int = 10,
                  dataset: Any = None) -> dict[str, list]:
    """Tokens the expert promotes and suppresses: top/bottom of W_U (norm_gain * direction)."""
    direction = expert_direction(model, atlas, group, expert, k, dataset)
    gain = model.model.norm.weight.float()
    logits = model.lm_head.weight.float() @ (gain * direction)
    n = min(n, logits.numel())
    up, down = logits.topk(n), (-logits).topk(n)
    piece = atlas.piece
    return {"pos_str": [piece(t) for t in up.indices.tolist()], "pos_values": up.values.tolist(),
            "neg_str": [piece(t) for t in down.indices.tolist()], "neg_values": (-down.values).tolist()}


# ------------------------------------------------------------------------------------------ explain

def explanation_inputs(model: torch.nn.Module, tokenizer: Any, vector: torch.Tensor,
                       prompt: str = EXPLAIN_PROMPT) -> torch.Tensor:
    """inputs_embeds [1, T, d] of the prompt with each "X" replaced by `vector`."""
    if "X" not in prompt:
        raise MonetError("the explanation prompt needs an X placeholder")
    embed = model.get_input_embeddings()
    pieces = prompt.split("X")
    bos = tokenizer.bos_token_id
    parts = [embed.weight[[bos]]] if bos is not None else []
    for n, text in enumerate(pieces):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        if ids:
            parts.append(embed.weight[ids])
        if n < len(pieces) - 1:
            parts.append(vector.to(embed.weight.dtype)[None])
    return torch.cat(parts)[None]


@torch.no_grad()
def explain_expert(model: torch.nn.Module, tokenizer: Any, atlas, group: int, expert: int, samples: int = 5,
                   max_new_tokens: int = 24, temperature: float = 1.0, k: int = 10,
                   seed: int | None = None) -> list[str]:
    """Sample `samples` self-descriptions of the expert (see module docstring)."""
    if samples < 1 or max_new_tokens < 1:
        raise MonetError("--samples and --max-new-tokens must be at least 1")
    contexts = atlas.top_contexts(group, expert, k)
    if not contexts:
        raise MonetError(f"expert {group}:{expert} has no contexts in this atlas; pick one with examples")
    embed = model.get_input_embeddings()
    vector = embed.weight[[c["token"] for c in contexts]].mean(dim=0)
    inputs = explanation_inputs(model, tokenizer, vector).expand(samples, -1, -1)
    if seed is not None:
        torch.manual_seed(seed)
    model.eval()
    out = model(inputs_embeds=inputs, use_cache=True)
    past, generated = out.past_key_values, []
    eos = tokenizer.eos_token_id
    logits = out.logits[:, -1]
    done = torch.zeros(samples, dtype=torch.bool)
    for _ in range(max_new_tokens):
        probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)
        token = torch.multinomial(probs, 1)
        generated.append(token)
        if eos is not None:
            done |= token[:, 0].cpu() == eos
            if bool(done.all()):
                break
        out = model(input_ids=token, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    rows = torch.cat(generated, dim=1).tolist()
    texts = []
    for row in rows:
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


__all__ = ["CHAT_NOTE", "EXPLAIN_PROMPT", "expert_direction", "expert_logits", "expert_output", "explain_expert",
           "explanation_inputs", "group_layers"]

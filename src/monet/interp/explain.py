"""What an expert writes, and self-explanation (paper §4.3, Fig. 2); see docs/atlas.md.

`expert_logits`: the expert's output (`monet.model.expert_output`) on the normed hidden states of its top
contexts, averaged, summed over the layers of its routing group (expert (g, id) has a term in each), read
through the final norm's gain and the unembedding. `explain_expert`: the paper's prompt with X the mean input
embedding of the expert's top activating tokens, fed as `inputs_embeds`; meaningful only for a chat-tuned model.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from monet.checkpoint import load_checkpoint
from monet.errors import MonetError
from monet.generate import generate_tokens
from monet.interp.query import Atlas, parse_expert
from monet.interp.units import units_of
from monet.runtime import resolve_device
from monet.settings import ExplainCommand

EXPLAIN_PROMPT = "Q: What is the meaning of the word X? A: Sure! The meaning of the word X is "
CHAT_NOTE = ("note: self-explanation is meaningful only for chat-tuned models (the paper used Monet-1.4B "
             "Chat); on a base model these samples are mostly continuations, not descriptions.")


def context_prefixes(atlas, group: int, expert: int, k: int) -> list[list[int]]:
    """Token ids the model saw up to and including each top context's activating token: the exact window
    of the build when the atlas's corpus is still there, else the stored window around the token."""
    try:
        dataset = atlas.dataset()
    except MonetError:
        dataset = None
    contexts = atlas.top_contexts(group, expert, k)
    if dataset is None:
        return [ctx["tokens"][:ctx["target"] + 1] for ctx in contexts]
    seq_len = int(atlas.manifest["options"]["seq_len"])
    out = []
    for ctx in contexts:
        pos = int(ctx["pos"])
        out.append(dataset.document(int(ctx["doc"]))[pos - pos % seq_len:pos + 1].tolist())
    return out


def expert_direction(model: torch.nn.Module, atlas, group: int, expert: int, k: int = 10) -> torch.Tensor:
    """The expert's output [d], averaged over its top contexts and summed over its group's layers (a dense
    neuron: its down-projection column times its largest score; `units.Units.output_direction`)."""
    atlas.check_expert(group, expert)
    return units_of(model).output_direction(group, expert, lambda: context_prefixes(atlas, group, expert, k),
                                            float(atlas.expert(group, expert)["max_score"]))


@torch.no_grad()
def expert_logits(model: torch.nn.Module, atlas, group: int, expert: int, n: int = 10, k: int = 10,
                  direction: torch.Tensor | None = None) -> dict[str, list]:
    """Tokens the expert promotes and suppresses: top/bottom of W_U (norm_gain * direction); `direction` is
    `expert_direction(model, atlas, group, expert, k)`, computed here unless the caller has it already."""
    if direction is None:
        direction = expert_direction(model, atlas, group, expert, k)
    logits = model.lm_head.weight.float() @ (model.model.norm.weight.float() * direction)
    n = min(n, logits.numel())
    up, down = logits.topk(n), (-logits).topk(n)
    return {"pos_str": [atlas.piece(t) for t in up.indices.tolist()], "pos_values": up.values.tolist(),
            "neg_str": [atlas.piece(t) for t in down.indices.tolist()], "neg_values": (-down.values).tolist()}


# ------------------------------------------------------------------------------------------ explain

def explanation_inputs(model: torch.nn.Module, tokenizer: Any, vector: torch.Tensor,
                       prompt: str = EXPLAIN_PROMPT) -> torch.Tensor:
    """inputs_embeds [1, T, d] of the prompt with each "X" replaced by `vector`."""
    if "X" not in prompt:
        raise MonetError("the explanation prompt needs an X placeholder")
    weight = model.get_input_embeddings().weight
    bos = tokenizer.bos_token_id
    parts = [weight[[bos]]] if bos is not None else []
    for n, text in enumerate(prompt.split("X")):
        if n:
            parts.append(vector.to(weight.dtype)[None])
        if text:
            parts.append(weight[tokenizer(text, add_special_tokens=False)["input_ids"]])
    return torch.cat(parts)[None]


@torch.no_grad()
def explain_expert(model: torch.nn.Module, tokenizer: Any, atlas, group: int, expert: int, samples: int = 5,
                   max_new_tokens: int = 24, temperature: float = 1.0, k: int = 10,
                   seed: int | None = None) -> list[str]:
    """Sample `samples` self-descriptions of the expert (see module docstring)."""
    if samples < 1:
        raise MonetError(f"samples must be at least 1, got {samples}")
    contexts = atlas.top_contexts(group, expert, k)
    if not contexts:
        raise MonetError(f"expert {group}:{expert} has no contexts in this atlas; pick one with examples")
    vector = model.get_input_embeddings().weight[[c["token"] for c in contexts]].mean(dim=0)
    inputs = explanation_inputs(model, tokenizer, vector).expand(samples, -1, -1)
    rows = generate_tokens(model, tokenizer, inputs_embeds=inputs, max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed).tolist()
    eos = tokenizer.eos_token_id
    return [tokenizer.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True).strip()
            for row in rows]


def explain_command(cmd: ExplainCommand) -> list[str]:
    """`monet explain`: load the atlas and its model, print the chat-model note, sample descriptions."""
    atlas = Atlas(cmd.atlas)
    group, expert = parse_expert(cmd.expert, atlas)
    model, tokenizer = load_checkpoint(cmd.run, resolve_device(cmd.device))
    atlas.check_model(model)
    print(CHAT_NOTE, file=sys.stderr)
    return explain_expert(model, tokenizer, atlas, group, expert, samples=cmd.samples,
                          max_new_tokens=cmd.max_new_tokens, temperature=cmd.temperature, seed=cmd.seed)


__all__ = ["CHAT_NOTE", "EXPLAIN_PROMPT", "expert_direction", "expert_logits", "explain_command", "explain_expert",
           "explanation_inputs"]

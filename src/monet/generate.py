"""Generation: the one sampling path of the package (Hugging Face `generate` with a KV cache), used by
`monet generate`, toxicity purging and self-explanation. Prompts start with `<s>` as every training
document does; generation stops at `</s>` or after `max_new_tokens`; expert edits stay applied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import TextStreamer

from monet.errors import MonetError


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of `prompt`, starting with the BOS token."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


@torch.no_grad()
def generate_tokens(
    model: Any,
    tokenizer: Any,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    greedy: bool = False,
    seed: int | None = None,
    streamer: Any = None,
) -> torch.Tensor:
    """New token ids [batch, <= max_new_tokens] after each row of `input_ids` [batch, T] (or of the prompt
    embeddings `inputs_embeds` [batch, T, d]); finished rows are padded with the pad (or EOS) token."""
    if max_new_tokens < 1:
        raise MonetError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not greedy and temperature <= 0:
        raise MonetError(f"temperature must be > 0 (or use greedy decoding), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise MonetError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise MonetError(f"top_k must be >= 1, got {top_k}")
    if seed is not None:
        torch.manual_seed(seed)
    prompt = input_ids if input_ids is not None else inputs_embeds
    mask = torch.ones(prompt.shape[:2], dtype=torch.long, device=prompt.device)
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": not greedy, "attention_mask": mask,
                               "eos_token_id": tokenizer.eos_token_id,
                               "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                               else tokenizer.eos_token_id, "streamer": streamer}
    if not greedy:
        options.update(temperature=temperature, top_p=top_p if top_p is not None else 1.0, top_k=top_k or 0)
    model.eval()
    if input_ids is None:
        return model.generate(inputs_embeds=inputs_embeds, **options)   # only the new tokens come back
    return model.generate(input_ids=input_ids, **options)[:, input_ids.shape[1]:]


def generate_text(model: Any, tokenizer: Any, prompt: str, num_samples: int = 1,
                  stream: Callable[[str], None] | None = None, **options: Any) -> list[str]:
    """`num_samples` continuations of `prompt` (prompt included), decoded without special tokens.
    `options` are those of `generate_tokens` (max_new_tokens, temperature, top_p, top_k, greedy, seed).
    With `stream` and one sample, the text is also passed to `stream` piece by piece as it is generated (a
    long generation shows progress; the pieces join to the returned text)."""
    if num_samples < 1:
        raise MonetError(f"num_samples must be >= 1, got {num_samples}")
    device = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(tokenizer, prompt)] * num_samples, dtype=torch.long, device=device)
    streamer = _Streamer(tokenizer, stream) if stream is not None and num_samples == 1 else None
    new = generate_tokens(model, tokenizer, input_ids=ids, streamer=streamer, **options)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in torch.cat((ids, new), dim=1)]


class _Streamer(TextStreamer):
    """Hugging Face's TextStreamer (decodes at word boundaries) handing each finished piece to a callback."""

    def __init__(self, tokenizer: Any, callback: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_special_tokens=True)
        self.callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.callback(text)

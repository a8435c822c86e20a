"""`monet generate`: sample text from a run or checkpoint (Hugging Face `generate`, with a KV cache).

Prompts get the beginning-of-sequence token the data pipeline puts before every document (`<s>`)
when the tokenizer does not add it itself, so the model sees what it was trained on. Generation stops
at `</s>` or after `max_new_tokens`.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from monet.checkpoint import load_checkpoint
from monet.errors import MonetError


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of `prompt`, starting with the BOS token."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + list(ids)


@torch.no_grad()
def generate_text(
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    greedy: bool = False,
    seed: int | None = None,
    num_samples: int = 1,
) -> list[str]:
    """`num_samples` continuations of `prompt` (prompt included), decoded without special tokens."""
    if max_new_tokens < 1:
        raise MonetError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_samples < 1:
        raise MonetError(f"num_samples must be >= 1, got {num_samples}")
    if not greedy and temperature <= 0:
        raise MonetError(f"temperature must be > 0 (or use --greedy), got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise MonetError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise MonetError(f"top_k must be >= 1, got {top_k}")
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(tokenizer, prompt)] * num_samples, dtype=torch.long, device=device)
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": not greedy,
                               "eos_token_id": tokenizer.eos_token_id,
                               "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                               else tokenizer.eos_token_id}
    if not greedy:
        options.update(temperature=temperature, top_p=top_p if top_p is not None else 1.0, top_k=top_k or 0)
    model.eval()
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in output]


def run_generate(args: argparse.Namespace) -> int:
    from monet.editing import apply_steer_args

    model, tokenizer = load_checkpoint(args.checkpoint, device=args.device)
    apply_steer_args(model, args)
    samples = generate_text(
        model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, greedy=args.greedy, seed=args.seed, num_samples=args.num_samples,
    )
    for i, text in enumerate(samples):
        if len(samples) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from a run or checkpoint",
        description="Continue a prompt with a trained model (sampling by default, --greedy for argmax).",
    )
    parser.add_argument(
        "checkpoint", metavar="RUN_OR_CHECKPOINT", help="run directory (newest checkpoint) or checkpoint directory"
    )
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (e.g. 0.9)")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--greedy", action="store_true", help="always take the most likely token")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    from monet.editing import add_steer_arguments

    add_steer_arguments(parser)
    parser.set_defaults(handler=run_generate)


__all__ = ["encode_prompt", "generate_text", "load_checkpoint"]

"""Kept halves per (token, head) of a Monet checkpoint on real text: how many routing rows would exceed the
kernel path's static capacity K (`monet.sparse.KERNEL_CAPACITY`, $MONET_KERNEL_CAPACITY).

    PYTHONPATH=src python benchmarks/kernel_capacity.py CHECKPOINT DATA_DIR [--tokens 4096] [--init]

Runs one forward over the first --tokens validation tokens (rows of 512) in training mode (batch statistics)
and in eval mode (running statistics) and prints, over every (token, head, side, routing group), the mean and
maximum kept count and how many exceed 16, 32 and 64. --init: the checkpoint's config with fresh weights.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import monet
from monet.model import MonetRouter


def kept_counts(model: monet.MonetForCausalLM, ids: torch.Tensor, train: bool) -> torch.Tensor:
    counts: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda module, args, out: counts.extend((g > 0).sum(-1).flatten() for g in out))
             for m in model.modules() if isinstance(m, MonetRouter)]
    model.train(train)
    with torch.no_grad():
        model.model(ids)
    for hook in hooks:
        hook.remove()
    return torch.cat(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("data")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--init", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = monet.MonetForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    if args.init:
        model = monet.MonetForCausalLM(model.config)
    tokens = np.load(f"{args.data}/validation.tokens", mmap_mode="r")
    ids = torch.from_numpy(tokens[: args.tokens // 512 * 512].astype(np.int64)).view(-1, 512)
    for mode in ("train", "eval"):
        counts = kept_counts(model, ids, mode == "train").float()
        over = ", ".join(f"> {k}: {int((counts > k).sum())}" for k in (16, 32, 64))
        print(f"{mode}: {counts.numel()} rows, mean {counts.mean():.2f}, max {int(counts.max())}, {over}")


if __name__ == "__main__":
    main()

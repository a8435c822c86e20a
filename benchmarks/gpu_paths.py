"""GPU checks and figures for the paths the CPU test suite cannot see: host syncs, compile, sparse experts.

    PYTHONPATH=src python benchmarks/gpu_paths.py [--tokens 4096] [--repeats 7] [--json OUT]

Needs a CUDA device (exits with a clear message otherwise). Models have random weights (the checks and
the costs do not depend on training). For each shape (the `small` preset and a 2-layer slice of the
released 850M HD and VD shapes) it reports:

1. Host syncs: one eval forward (no cache, no attention mask) and one training forward + backward under
   `torch.cuda.set_sync_debug_mode("warn")`; every synchronising CUDA call warns, and the warnings are
   counted with the source line that raised them. The model's docstring promises none on the main path.
   The training step runs twice, with the router's backward dense (the default off the CPU) and sparse
   (`ops.SPARSE_BACKWARD_OFF_CPU`, the CPU's choice), and the two are timed side by side.
2. Compile: `torch.compile(model, fullgraph=True)` (inductor) of the eval forward; the largest logit
   difference to eager (over all tokens, and over the tokens that no routing flip reaches: see
   `compare`) and the eager / compiled time ratio (medians of interleaved repeats).
3. Sparse experts on CUDA (`monet.sparse`, forced; the automatic rule keeps GPUs on the dense path): the
   largest difference of the logits (as in 2) and of every parameter gradient to the dense path in
   float32 and float64, and the dense / sparse time ratio of forward + backward (medians of interleaved repeats).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

import monet
from monet import ops, sparse

SHAPES = {
    "small": dict(name="small"),
    "vd-850m x2 layers": dict(name="monet-vd-850m", num_hidden_layers=2, moe_groups=1),
    "hd-850m x2 layers": dict(name="monet-hd-850m", num_hidden_layers=2, moe_groups=1),
}


def build(shape: dict, dtype: torch.dtype) -> monet.MonetForCausalLM:
    torch.manual_seed(0)
    overrides = {key: value for key, value in shape.items() if key != "name"}
    return monet.MonetForCausalLM(monet.preset(shape["name"], **overrides)).to("cuda", dtype)


def syncs_during(step) -> list[str]:
    """The source lines of every synchronising CUDA call `step()` makes."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in caught
            if "synchroniz" in str(w.message)]


def timed(step) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    step()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def interleaved(steps: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each step, run A, B, A, B, ... after one warm-up each."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(timed(step))
    return {name: statistics.median(values) for name, values in times.items()}


def check_syncs(model, ids, repeats: int) -> dict:
    """Syncs of an eval forward, and syncs and time of a training step with the router's backward dense
    (the default off the CPU) and sparse (`ops.SPARSE_BACKWARD_OFF_CPU`, as on the CPU)."""
    model.eval()
    with torch.no_grad():
        eval_syncs = syncs_during(lambda: model(input_ids=ids, use_cache=False))
    model.train()

    def train_step(sparse_router_backward: bool):
        def step():
            ops.SPARSE_BACKWARD_OFF_CPU = sparse_router_backward
            try:
                model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            finally:
                ops.SPARSE_BACKWARD_OFF_CPU = False
                model.zero_grad(set_to_none=True)
        return step

    report = {"eval_forward": sorted(set(eval_syncs)), "eval_forward_count": len(eval_syncs)}
    for name, sparse_router_backward in (("train_step", False), ("train_step_sparse_router_backward", True)):
        syncs = syncs_during(train_step(sparse_router_backward))
        report[name] = sorted(set(syncs))
        report[f"{name}_count"] = len(syncs)
    seconds = interleaved({"dense": train_step(False), "sparse": train_step(True)}, repeats)
    report["train_step_s"] = {"router_backward_dense": seconds["dense"], "router_backward_sparse": seconds["sparse"],
                              "sparse_over_dense": seconds["sparse"] / seconds["dense"]}
    return report


def kept_sets(router_probs) -> list[torch.Tensor]:
    """The kept (head, half) entries of every routing layer: g > 0, [B, T, H, E] bool each."""
    return [g > 0 for pair in router_probs if pair is not None for g in pair]


def compare(want, got) -> dict:
    """Largest logit difference, over all tokens and over the tokens no routing flip can reach.

    The top-k thresholds are hard cuts (eq. 9): a score within rounding of its threshold may be kept by one
    computation and dropped by the other, which changes that token's output by a whole expert's share, and
    attention carries the change to the later tokens of its sequence. Unaffected tokens: no flip in any
    layer at or before their position.
    """
    flipped = torch.zeros(want.logits.shape[:2], dtype=torch.bool, device=want.logits.device)
    for a, b in zip(kept_sets(want.router_probs), kept_sets(got.router_probs), strict=True):
        flipped |= (a != b).flatten(2).any(-1)
    reached = flipped.cummax(dim=1).values
    diff = (got.logits.float() - want.logits.float()).abs().amax(-1)
    scale = want.logits.abs().max()
    return {"max_rel_logit_diff": (diff.max() / scale).item(),
            "tokens_with_a_routing_flip": flipped.float().mean().item(),
            "tokens_reached_by_a_flip": reached.float().mean().item(),
            "max_rel_logit_diff_unaffected": (diff[~reached].max() / scale).item() if (~reached).any() else 0.0}


def check_compile(model, ids, repeats: int) -> dict:
    model.eval()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        report = compare(model(input_ids=ids, use_cache=False, output_router_probs=True),
                         compiled(input_ids=ids, use_cache=False, output_router_probs=True))
        seconds = interleaved({"eager": lambda: model(input_ids=ids, use_cache=False),
                               "compiled": lambda: compiled(input_ids=ids, use_cache=False)}, repeats)
    return {**report, "eager_s": seconds["eager"], "compiled_s": seconds["compiled"],
            "eager_over_compiled": seconds["eager"] / seconds["compiled"]}


def forward_backward(model, ids, path: str):
    model.zero_grad(set_to_none=True)
    with sparse.expert_path(path):
        out = model(input_ids=ids, use_cache=False, output_router_probs=True)
        out.logits.float().square().mean().backward()
    return out, {name: p.grad.detach().clone() for name, p in model.named_parameters()
                             if p.grad is not None}


def check_sparse(shape: dict, ids, repeats: int) -> dict:
    report = {}
    for dtype in (torch.float64, torch.float32):
        model = build(shape, dtype).train()
        dense_out, dense_grads = forward_backward(model, ids, "dense")
        sparse_out, sparse_grads = forward_backward(model, ids, "sparse")
        worst = max(((b - dense_grads[name]).abs().max() / dense_grads[name].abs().max().clamp_min(1e-30)).item()
                    for name, b in sparse_grads.items())
        report[str(dtype).removeprefix("torch.")] = {
            **compare(dense_out, sparse_out),
            "max_rel_grad_diff": worst,
            "same_grad_names": sorted(dense_grads) == sorted(sparse_grads),
        }
    seconds = interleaved({"dense": lambda: forward_backward(model, ids, "dense"),
                           "sparse": lambda: forward_backward(model, ids, "sparse")}, repeats)
    report["float32_fwd_bwd"] = {**seconds, "dense_over_sparse": seconds["dense"] / seconds["sparse"]}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch (batch of 512-token rows)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_paths.py needs a CUDA device; the CPU paths are covered by the test suite.")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens}
    for label, shape in SHAPES.items():
        model = build(shape, torch.float32)
        seq = min(512, model.config.max_position_embeddings)
        ids = torch.randint(0, model.config.vocab_size, (max(1, args.tokens // seq), seq), device="cuda")
        report[label] = {"syncs": check_syncs(model, ids, args.repeats),
                         "compile": check_compile(model, ids, args.repeats),
                         "sparse": check_sparse(shape, ids, args.repeats)}
        print(label, json.dumps(report[label], indent=1), flush=True)
        del model
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()

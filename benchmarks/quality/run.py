"""Quality comparison: Monet-VD, Monet-HD, dense LLaMA (equal total parameters) and PEER on the same tokens.

    python benchmarks/quality/run.py --steps 100 --batch-size 8 --seq-len 64

Builds the `code` corpus (labels = programming languages) into the cache, trains each model with the
`small` preset for the same step budget (hence the same tokens, in the same order: same seed), then
measures validation loss overall and per language with `monet.evaluate`. Writes `results.json` and
regenerates the table in `README.md` next to this file. Models run one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from monet.experiments.bench import machine_info

HERE = Path(__file__).resolve().parent
MODELS = {
    "monet-vd": {"model": "monet", "decompose": "vertical"},
    "monet-hd": {"model": "monet", "decompose": "horizontal"},
    "dense": {"model": "dense"},
    "peer": {"model": "peer", "peer_experts": 48},   # N = 48^2 experts: about the same total parameters
}


def run_model(name: str, data: Path, out: Path, args: argparse.Namespace) -> dict:
    from monet.evaluate import evaluate_checkpoint
    from monet.info import count_parameters
    from monet.train import build_model_config, load_settings, train

    settings = {"preset": "small", **MODELS[name], "max_steps": args.steps, "batch_size": args.batch_size,
                "seq_len": args.seq_len, "lr": args.lr, "min_lr": args.lr / 10,
                "warmup_steps": max(1, args.steps // 10),
                "eval_interval": 0, "save_interval": args.steps, "keep_last": 1, "seed": args.seed}
    started = time.perf_counter()
    summary = train(data, out / name, settings)
    seconds = time.perf_counter() - started
    from monet.data import TokenDataset

    config = build_model_config(load_settings(None, settings), TokenDataset(data, "train").vocab_size)
    report = evaluate_checkpoint(out / name, data, max_batches=args.eval_batches, batch_size=8)
    tokens = args.steps * args.batch_size * args.seq_len
    return {
        "settings": settings, "parameters": count_parameters(config), "steps": args.steps, "tokens": tokens,
        "train_seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
        "final_train_loss": summary["last"]["lm_loss"] if summary["last"] else None,
        "val_loss": report["overall"]["loss"],
        "val_loss_per_label": {label: r["loss"] for label, r in report["labels"].items()},
        "moe_experts": config.moe_experts if config.mlp_type != "dense" else None,
        "intermediate_size": config.intermediate_size if config.mlp_type == "dense" else None,
    }


def table(results: dict) -> str:
    models = list(results["models"])
    labels = sorted({label for m in models for label in results["models"][m]["val_loss_per_label"]})
    head = ["model", "params", "tokens/s", "train loss", "val loss", *labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in models:
        r = results["models"][name]
        cells = [name, f"{r['parameters'] / 1e6:.2f}M", f"{r['tokens_per_s']:.0f}",
                 f"{r['final_train_loss']:.3f}", f"**{r['val_loss']:.3f}**",
                 *(f"{r['val_loss_per_label'].get(label, float('nan')):.3f}" for label in labels)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_readme(results: dict) -> None:
    text = (HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").is_file() else ""
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    m = results["machine"]
    block = (f"{start}\nMachine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}"
             f"{', ' + m['gpu'] if m['gpu'] != 'none (CPU only)' else ''}. Command: `{results['command']}`. "
             f"Each model: {results['steps']} steps x {results['batch_size']} sequences x {results['seq_len']} "
             f"tokens = {results['tokens']:,} training tokens; validation loss on up to "
             f"{results['eval_batches']} batches of 8 windows per label.\n\n{table(results)}\n{end}")
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = HERE / ".README.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, HERE / "README.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per model (the step budget)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-bytes", type=int, default=4_000_000, help="corpus size")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--work", default=None, help="corpus and runs directory (default: $MONET_CACHE/bench-quality)")
    args = parser.parse_args(argv)

    from monet.data import build_corpus
    from monet.data.packages import cache_dir

    work = Path(args.work) if args.work else cache_dir() / "bench-quality"
    data = work / f"code-{args.max_bytes}-{args.vocab_size}"
    if not (data / "manifest.json").is_file():
        build_corpus("code", data, max_bytes=args.max_bytes, vocab_size=args.vocab_size)
    runs = work / f"runs-{args.steps}x{args.batch_size}x{args.seq_len}-seed{args.seed}"
    command = "python benchmarks/quality/run.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    results = {"command": command.strip(), "machine": machine_info(), "steps": args.steps,
               "batch_size": args.batch_size,
               "seq_len": args.seq_len, "tokens": args.steps * args.batch_size * args.seq_len,
               "eval_batches": args.eval_batches, "corpus": {"source": "code", "max_bytes": args.max_bytes,
                                                             "vocab_size": args.vocab_size}, "models": {}}
    for name in args.models.split(","):
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        print(f"=== {name}", flush=True)
        results["models"][name] = run_model(name, data, runs, args)
        print(json.dumps(results["models"][name], indent=1), flush=True)
        out = HERE / "results.json"
        (HERE / ".results.json.tmp").write_text(json.dumps(results, indent=2) + "\n")
        os.replace(HERE / ".results.json.tmp", out)
    write_readme(results)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

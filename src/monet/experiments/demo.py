"""`monet demo`: the whole path on a fresh machine, in minutes on a CPU.

1. build the `code` corpus from source files already on disk (Python stdlib, C/C++ headers, npm's
   JavaScript, Perl, shell, Vim script, Tcl; no network);
2. train a small Monet on it (`small` preset: 262,144 experts per routing group, narrow experts);
3. build the expert atlas (on the TRAIN split: expert statistics come from text the evaluation never sees);
4. unlearn each language (mask its skewed experts, measure every language's validation loss);
5. print a summary table and where the report, heatmap and viewer command are.

Each step writes its output atomically and is skipped when its output is already complete, so
re-running the command continues where it stopped. `--quick` runs a tiny version (tiny preset, a few
hundred KB of code, a few training steps) used by the tests; `--baseline` also trains a dense LLaMA of
matching size and runs the same deletion protocol on its MLP neurons.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monet.checkpoint import latest_checkpoint, load_checkpoint
from monet.data import build_corpus
from monet.experiments.unlearn import REPORT_FILE, format_summary, unlearn
from monet.interp.atlas import build_atlas
from monet.io import MARKER, check_output, marker_kind
from monet.settings import AtlasOptions, DemoSettings, TrainSettings, UnlearnSettings
from monet.train import train


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run: the `small` preset (E = 512, so 262,144 experts per routing group) trained on
    ~256k tokens: minutes on 2 free CPU cores (much longer when the cores are shared)."""

    max_bytes: int = 4_000_000
    vocab_size: int = 2048
    train: tuple[tuple[str, Any], ...] = (
        ("preset", "small"), ("max_steps", 500), ("batch_size", 8), ("seq_len", 64), ("lr", 2e-3),
        ("warmup_steps", 20), ("eval_interval", 0), ("save_interval", 100), ("keep_last", 1),
    )
    atlas_tokens: int = 150_000
    atlas_top_k: int = 10
    eval_batches: int = 4
    eval_batch_size: int = 8
    ratio: float = 2.0


QUICK = DemoPlan(
    max_bytes=300_000, vocab_size=512,
    train=(("preset", "tiny"), ("max_steps", 12), ("batch_size", 4), ("seq_len", 32), ("warmup_steps", 2),
           ("eval_interval", 0), ("save_interval", 12), ("keep_last", 1)),
    atlas_tokens=20_000, atlas_top_k=3, eval_batches=1, eval_batch_size=4,
)


def _step(name: str, done: bool) -> float:
    print(f"[monet demo] {name}{' (already done, reused)' if done else ''}", flush=True)
    return time.perf_counter()


def run_demo(settings: DemoSettings, plan: DemoPlan | None = None) -> dict[str, Any]:
    """Run (or resume) the demo in `settings.out`; returns the unlearning report."""
    plan = plan or (QUICK if settings.quick else DemoPlan())
    out = Path(settings.out).expanduser()
    if marker_kind(out) != "demo":
        check_output(out, "demo", settings.force, "a demo directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("demo\n", encoding="utf-8")
    data, run, atlas, report_dir = out / "data", out / "run", out / "atlas", out / "report"
    progress = not settings.quiet
    timings: dict[str, float] = {}

    started = _step("1/4 building the code corpus from files on this machine", (data / "manifest.json").is_file())
    build_corpus("code", data, max_bytes=plan.max_bytes, vocab_size=plan.vocab_size, progress=progress)
    timings["data_s"] = time.perf_counter() - started

    models = [("Monet", run, atlas, "monet")]
    if settings.baseline:
        models.append(("dense baseline", out / "dense-run", out / "dense-atlas", "dense"))
    steps = dict(plan.train)["max_steps"]
    for name, run_dir, _, kind in models:
        latest = latest_checkpoint(run_dir, warn=False) if (run_dir / "checkpoints").is_dir() else None
        finished = latest is not None and latest.name.endswith(f"{steps:07d}")
        started = _step(f"2/4 training the {name} ({dict(plan.train)['preset']} preset, {steps} steps)", finished)
        if not finished:
            train(TrainSettings(data=str(data), out=str(run_dir), model=kind, quiet=not progress, **dict(plan.train)))
        timings[f"train_{run_dir.name}_s"] = time.perf_counter() - started

    for name, run_dir, atlas_dir, _ in models:
        done = (atlas_dir / "manifest.json").is_file()
        started = _step(f"3/4 building the {name} atlas ({plan.atlas_tokens:,} training tokens)", done)
        if not done:
            model, tokenizer = load_checkpoint(run_dir)
            options = AtlasOptions(max_tokens=plan.atlas_tokens, top_k=plan.atlas_top_k, split="train",
                                   batch_size=16, seq_len=dict(plan.train)["seq_len"])
            build_atlas(model, tokenizer, data, atlas_dir, options, force=True, progress=progress, run=str(run_dir))
        timings[f"atlas_{atlas_dir.name}_s"] = time.perf_counter() - started

    done = (report_dir / REPORT_FILE).is_file()
    started = _step("4/4 unlearning each language (mask its experts, evaluate every language)", done)
    if done:
        report = json.loads((report_dir / REPORT_FILE).read_text(encoding="utf-8"))
    else:
        dense = ({"baseline": str(out / "dense-run"), "baseline_atlas": str(out / "dense-atlas")}
                 if settings.baseline else {})
        report = unlearn(UnlearnSettings(run=str(run), data=str(data), atlas=str(atlas), out=str(report_dir),
                                         ratio=plan.ratio, max_batches=plan.eval_batches,
                                         batch_size=plan.eval_batch_size, quiet=not progress, force=True, **dense))
    timings["unlearn_s"] = time.perf_counter() - started

    print()
    print(format_summary(report))
    print()
    print("Δ = validation loss after masking minus before (nats/token); x = Δ target / mean Δ of the other languages")
    print(f"report:   {report_dir / REPORT_FILE}")
    print(f"matrix:   {report_dir / 'loss_matrix.csv'}")
    print(f"heatmap:  {report_dir / 'heatmap.png'}")
    print(f"viewer:   monet view {atlas}")
    print(f"timings:  {', '.join(f'{k} {v:.0f}' for k, v in timings.items())}")
    return report

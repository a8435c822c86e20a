"""The `monet` command line: each command is a settings class of `monet.settings` (tyro turns its fields
into `--flags`, their docstrings into help) and a handler that calls the library. Handlers import the
library lazily, on purpose: `--help` and `--version` load neither torch nor transformers (docs/cli.md).
A `MonetError` is printed as one line, `monet COMMAND: error: ...` (exit 2); `--debug` adds the traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monet import __version__
from monet import settings as S
from monet.errors import MonetError
from monet.io import check_output, command_inputs, dumps, printable

HELP = """usage: monet [--version] [--debug] COMMAND [options]

Monet: train, load, inspect and edit Mixture-of-Monosemantic-Experts language models.

commands:
{commands}

`monet COMMAND --help` describes a command and every option with its default."""


def run_info(cmd: S.InfoCommand) -> None:
    from monet import info

    if cmd.compare:
        result = info.compare_layers(cmd.dim, cmd.experts, cmd.heads, cmd.moe_dim, cmd.topk)
        if cmd.json:
            return print(dumps(result))
        print(f"One layer at d={cmd.dim}, N={cmd.experts:,} experts, H={cmd.heads}, m={cmd.moe_dim}, k={cmd.topk}")
        rows = [("architecture", "parameters / retrieval multiply-adds per token")]
        for arch, params in result["per_layer_parameters"].items():
            cost = result["retrieval_cost_per_token"][arch]
            rows.append((arch, "not applicable: " + params if isinstance(params, str)
                         else f"{info.human(params)} params / {info.human(cost)}"))
        return print_rows(rows)
    result = info.describe(cmd.preset, S.parse_assignments(cmd.set))
    if cmd.json:
        return print(dumps(result))
    print_rows(info.describe_rows(result))


def run_data_build(cmd: S.DataBuild) -> None:
    from monet.data import build_corpus, read_manifest
    from monet.data.build import build_files_corpus, format_table

    if (Path(cmd.out) / "manifest.json").is_file() and not cmd.force:
        read_manifest(cmd.out)
        return print(printable(f"{cmd.out} already holds a complete dataset; pass --force to rebuild it"))
    if cmd.source == "lm-eval":
        from monet.data.build import build_task_corpus

        path = build_task_corpus(list(cmd.task), cmd.out, cmd.tokenizer, include_path=cmd.lm_eval_include_path,
                                 split=cmd.lm_eval_split, vocab_size=cmd.vocab_size, seed=cmd.seed,
                                 max_bytes=S.parse_size(cmd.max_bytes) if cmd.max_bytes else None, fetch=cmd.fetch,
                                 cache_dir=cmd.cache_dir, force=cmd.force, progress=not cmd.quiet,
                                 validation_fraction=cmd.validation_fraction)
        print(printable(format_table(read_manifest(path))))
        return print(printable(f"wrote {path}"))
    if cmd.source == "files":
        path = build_files_corpus(list(cmd.from_), cmd.out, cmd.tokenizer, text_field=cmd.text_field,
                                  label_field=cmd.label_field, vocab_size=cmd.vocab_size, seed=cmd.seed,
                                  max_bytes=S.parse_size(cmd.max_bytes) if cmd.max_bytes else None,
                                  fetch=cmd.fetch, cache_dir=cmd.cache_dir, force=cmd.force, progress=not cmd.quiet,
                                  validation_fraction=cmd.validation_fraction)
        print(format_table(read_manifest(path)))
        return print(f"wrote {path}")
    path = build_corpus(cmd.source, cmd.out, max_bytes=S.parse_size(cmd.max_bytes) if cmd.max_bytes else None,
                        vocab_size=cmd.vocab_size, tokenizer=cmd.tokenizer, seed=cmd.seed, fetch=cmd.fetch,
                        cache_dir=cmd.cache_dir, force=cmd.force, progress=not cmd.quiet,
                        validation_fraction=cmd.validation_fraction, allow_drift=cmd.allow_drift,
                        source_options={"languages": list(cmd.labels)} if cmd.labels else None)
    print(printable(format_table(read_manifest(path))))
    print(printable(f"wrote {path}"))


def run_data_info(cmd: S.DataInfo) -> None:
    from monet.data import read_manifest
    from monet.data.build import format_table

    manifest = read_manifest(cmd.dir)
    print(dumps(manifest) if cmd.json else printable(format_table(manifest)))


def run_train(cmd: S.TrainSettings) -> None:
    from monet.train import train

    summary = train(cmd)
    if summary["rank"] == 0:
        last = summary["last"]
        if last:
            val = f", validation loss {last['val_loss']:.4f}" if last.get("val_loss") is not None else ""
            print(f"monet train: step {last['step']} loss {last['loss']:.4f}{val}; checkpoint {summary['checkpoint']}")
        else:
            print(f"monet train: already at step {summary['resumed_from']}; nothing to do ({summary['checkpoint']})")


def run_eval(cmd: S.EvalCommand) -> None:
    from monet.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(cmd.run, cmd.data, split=cmd.split, max_batches=cmd.max_batches,
                                 batch_size=cmd.batch_size, seq_len=cmd.seq_len, device=cmd.device,
                                 progress=not cmd.json, verify=not cmd.no_verify)
    if cmd.json:
        return print(dumps(report))
    report = printable(report)   # label names and paths come from files: shown, never interpreted
    print(f"checkpoint {report['checkpoint']}  split {report['split']}  seq_len {report['seq_len']}")
    width = max(map(len, ["overall", *report["labels"]]))
    print(f"{'label':<{width}}  {'loss':>8}  {'ppl':>10}  {'tokens':>9}")
    for name, result in [("overall", report["overall"]), *report["labels"].items()]:
        print(f"{name:<{width}}  {result['loss']:8.4f}  {result['perplexity']:10.2f}  {result['tokens']:9d}")
    if report["skipped_labels"]:
        print(f"(labels with less than one window, skipped: {', '.join(report['skipped_labels'])})")


def run_generate(cmd: S.GenerateCommand) -> None:
    from monet.checkpoint import load_checkpoint
    from monet.edits import apply_steering
    from monet.generate import generate_text
    from monet.runtime import resolve_device

    model, tokenizer = load_checkpoint(cmd.run, device=resolve_device(cmd.device), verify=not cmd.no_verify)
    apply_steering(model, cmd.steer, cmd.edits)
    ignored = ", ".join(S.flag_name(name) for name in ("temperature", "top_p", "top_k")
                        if cmd.greedy and getattr(cmd, name) != S.GenerateCommand.__dataclass_fields__[name].default)
    if ignored:
        print(f"monet generate: note: --greedy takes the most likely token; {ignored} ignored", file=sys.stderr)

    def show(piece: str) -> None:   # model output: shown, never interpreted by the terminal
        print(printable(piece), end="", flush=True)

    samples = generate_text(model, tokenizer, cmd.prompt, max_new_tokens=cmd.max_new_tokens,
                            temperature=cmd.temperature, top_p=cmd.top_p, top_k=cmd.top_k, greedy=cmd.greedy,
                            seed=cmd.seed, num_samples=cmd.num_samples, stream=show if cmd.num_samples == 1 else None)
    if cmd.num_samples == 1:
        return print()
    for i, text in enumerate(samples):
        print(f"--- sample {i + 1} ---")
        print(printable(text))


def run_atlas_build(cmd: S.AtlasBuild) -> None:
    from monet.interp.atlas import build_atlas_command
    from monet.interp.image_examples import vision_atlas_parts  # a VisionMonet checkpoint: + its image tokens

    build_atlas_command(cmd, vision=vision_atlas_parts)


def run_atlas_query(cmd: S.AtlasQuery) -> None:
    from monet.checkpoint import load_checkpoint
    from monet.interp.explain import expert_logits
    from monet.interp.query import Atlas, experts_for_text, format_context, parse_expert

    atlas = Atlas(cmd.atlas)
    model = tokenizer = None
    if cmd.run:
        model, tokenizer = load_checkpoint(cmd.run)
        atlas.check_model(model)
    lines: list[str] = []
    if cmd.expert:
        group, expert = parse_expert(cmd.expert, atlas)
        result: Any = {**atlas.expert(group, expert), "contexts": atlas.top_contexts(group, expert, cmd.top)}
        if model is not None:
            result["logits"] = expert_logits(model, atlas, group, expert)
        shares = sorted(result["label_share"].items(), key=lambda kv: -kv[1])
        lines += [f"expert {result['id']}: {result['count']:,} activations, density {result['density']:.2e}, "
                  f"mean score {result['mean_score']:.4f}, max {result['max_percent']:.1f}%",
                  "labels: " + ", ".join(f"{label} {100 * share:.1f}%" for label, share in shares)]
        lines += [f"  {ctx['percent']:6.2f}%  {ctx['label']:<12} {format_context(ctx)}" for ctx in result["contexts"]]
        if atlas.has_images:   # a VisionMonet atlas (format 3): the expert's top images, at their best patch
            result["images"] = atlas.image_examples(group, expert, cmd.top)
            lines.append(f"top images ({len(result['images'])}; patch = row, column of the "
                         f"{atlas.manifest['images']['grid']}x{atlas.manifest['images']['grid']} grid):")
            lines += [f"  {im['percent']:6.2f}%  {im['label']:<12} image {im['image']} ({im['id']}) patch "
                      f"{im['patch']} (row {im['row']}, col {im['col']}): {im['caption'][:70]}"
                      for im in result["images"]]
        result["bands"] = atlas.band_samples(group, expert)
        for band in result["bands"]:
            lines.append(f"band {band['low_percent']:.3g}-{band['high_percent']:.3g}%: {100 * band['share']:.1f}% of "
                         f"its activations ({band['count']:,}), e.g.")
            lines += [f"  {ctx['percent']:6.2f}%  {ctx['label']:<12} {format_context(ctx)}" for ctx in band["contexts"]]
        if "logits" in result:
            lines += ["promotes:   " + " ".join(repr(t) for t in result["logits"]["pos_str"]),
                      "suppresses: " + " ".join(repr(t) for t in result["logits"]["neg_str"])]
    elif cmd.token is not None:
        result = atlas.experts_for_token(cmd.token, cmd.top)
        lines += [f"  {r['id']:>14}  {r['contexts']} of its top contexts on {r['piece']!r}, "
                  f"best {r['max_percent']:.1f}%"
                  for r in result] or [f"no expert has {cmd.token!r} among its top contexts"]
    elif cmd.contains is not None:
        result = atlas.experts_for_substring(cmd.contains, cmd.top)
        lines.append(f"{result['tokens']:,} vocabulary tokens contain {cmd.contains!r}")
        lines += [f"  {r['id']:>14}  {r['contexts']} of its top contexts on "
                  f"{', '.join(repr(p) for p in r['pieces'])}, best {r['max_percent']:.1f}%" for r in result["experts"]]
    elif cmd.label is not None:
        result = atlas.experts_for_label(cmd.label, cmd.top, cmd.min_count)
        lines += [f"  {r['id']:>14}  skewness {r['skewness']:.2f}  ({r['count']:,} activations)" for r in result]
    else:
        if model is None:
            raise MonetError("--text needs the model: pass --run RUN (the run the atlas was built from)")
        result = experts_for_text(model, tokenizer, cmd.text, n=min(cmd.top, 5))
        for entry in result:
            groups = "  |  ".join(" ".join(f"{g}:{e} {p:.0f}%" for e, p in experts)
                                  for g, experts in enumerate(entry["groups"]))
            lines.append(f"  {entry['piece']!r:>14}  {groups}")
    if cmd.json:
        return print(dumps(result))
    print(printable("\n".join(lines)))


def run_atlas_export(cmd: S.AtlasExport) -> None:
    from monet.interp.export import export_command

    print(printable(f"wrote {export_command(cmd)}"))


def run_explain(cmd: S.ExplainCommand) -> None:
    from monet.interp.explain import explain_command

    for n, text in enumerate(explain_command(cmd), 1):
        print(f"{n}. {printable(text)}")


def run_probe(cmd: S.ProbeSettings) -> None:
    from monet.interp.probe import REPORT_JSON, REPORT_MD, probe_command

    report = probe_command(cmd)
    out = Path(cmd.out)
    print(printable((out / REPORT_MD).read_text(encoding="utf-8")))
    print(printable(f"report: {out / REPORT_JSON}  table: {out / REPORT_MD}  ({len(report['models'])} model(s))"))
    if cmd.format == "saebench":
        from monet.interp.saebench import write_saebench

        paths = write_saebench(report, out, cmd.seed)
        print(f"SAEBench sparse-probing results: {', '.join(str(p) for p in paths)}")


def run_autointerp(cmd: S.AutointerpSettings) -> None:
    from monet.interp.autointerp import SUMMARY_MD, autointerp

    autointerp(cmd)
    out = Path(cmd.out)
    print(printable((out / SUMMARY_MD).read_text(encoding="utf-8")))
    print(f"scores: {out / 'scores.parquet'}  summary: {out / 'summary.json'}  histogram: {out / 'histogram.png'}")


def run_unlearn(cmd: S.UnlearnSettings) -> None:
    from monet.experiments.unlearn import REPORT_FILE, format_summary, unlearn

    report = unlearn(cmd)
    print(printable(format_summary(report)))
    print(printable(f"report: {Path(cmd.out) / REPORT_FILE}  heatmap: {Path(cmd.out) / 'heatmap.png'}"))


def run_edits_export(cmd: S.EditsExport) -> None:
    from monet.experiments.export import export_command

    out = export_command(cmd)
    print(printable(f"wrote {out}; evaluate it with: lm_eval --model hf --model_args "
                    f"pretrained={out},trust_remote_code=True --tasks TASK"))


def run_toxicity(cmd: S.ToxicitySettings) -> None:
    from monet.experiments.toxicity import format_rows, purge_report

    print(printable(format_rows(purge_report(cmd))))
    print(printable(f"report: {Path(cmd.out) / 'report.json'}"))


def library(target: str) -> Callable[[Any], None]:
    """A handler that imports "module:function" when it runs and calls the function with the settings."""
    module, function = target.split(":")
    return lambda cmd: getattr(importlib.import_module(module), function)(cmd)


# name -> (settings class, handler)
COMMANDS: dict[str, tuple[type, Callable[[Any], None]]] = {
    "demo": (S.DemoSettings, library("monet.experiments.demo:run_demo")),
    "info": (S.InfoCommand, run_info),
    "data build": (S.DataBuild, run_data_build),
    "data info": (S.DataInfo, run_data_info),
    "train": (S.TrainSettings, run_train),
    "eval": (S.EvalCommand, run_eval),
    "generate": (S.GenerateCommand, run_generate),
    "atlas build": (S.AtlasBuild, run_atlas_build),
    "atlas query": (S.AtlasQuery, run_atlas_query),
    "atlas export": (S.AtlasExport, run_atlas_export),
    "view": (S.ViewCommand, library("monet.interp.viewer.server:view_command")),
    "explain": (S.ExplainCommand, run_explain),
    "probe": (S.ProbeSettings, run_probe),
    "autointerp": (S.AutointerpSettings, run_autointerp),
    "unlearn": (S.UnlearnSettings, run_unlearn),
    "toxicity": (S.ToxicitySettings, run_toxicity),
    "edits export": (S.EditsExport, run_edits_export),
    "bench": (S.BenchSettings, library("monet.experiments.bench:bench_command")),
    "vision train": (S.VisionTrainSettings, library("monet.vision:train_command")),
    "vision caption": (S.VisionCaptionSettings, library("monet.vision:caption_command")),
}


def print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")


def command_list(names: list[str], prefix: str = "") -> str:
    """One line per command: its name and the first line of its settings class's docstring."""
    width = max(len(name) for name in names)
    summaries = [(COMMANDS[name][0].__doc__ or "").strip().splitlines()[0].rstrip(".") for name in names]
    return "\n".join(f"  {prefix}{name:<{width}}  {summary}" for name, summary in zip(names, summaries, strict=True))


def split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    """("data build", rest) from ["data", "build", ...]; (None, argv) when no command is named."""
    if argv and argv[0] in COMMANDS:
        return argv[0], argv[1:]
    if len(argv) > 1 and f"{argv[0]} {argv[1]}" in COMMANDS:
        return f"{argv[0]} {argv[1]}", argv[2:]
    return None, argv


def merge_repeated(argv: list[str], flags: set[str]) -> list[str]:
    """`--steer A --steer B` -> `--steer A B` for the list options `flags`: argparse keeps only the last
    occurrence of an option, which would silently drop every earlier `--steer` or `--set`."""
    values: dict[str, list[str]] = {}
    rest: list[str] = []
    at = 0
    while at < len(argv):
        flag, sep, inline = argv[at].partition("=")
        at += 1
        if flag not in flags:
            rest.append(argv[at - 1])
            continue
        if flag not in values:
            values[flag] = []
            rest.append(flag)            # the merged values go where the option first appeared
        if sep:
            values[flag].append(inline)
        while at < len(argv) and not argv[at].startswith("--") and argv[at] != "-h":
            values[flag].append(argv[at])
            at += 1
    return [part for arg in rest for part in ([arg, *values[arg]] if arg in values else [arg])]


def parse(name: str, argv: list[str]) -> Any:
    """The settings object of command `name` from its arguments (tyro), checked (one-line MonetError)."""
    import dataclasses

    import tyro

    cls, _ = COMMANDS[name]
    lists = {S.flag_name(spec.name) for spec in dataclasses.fields(cls) if str(spec.type).startswith("tuple")}
    argv = merge_repeated(argv, lists)
    defaults: dict[str, Any] = {}
    with S.deferred_checks():
        if name == "train" and "--config" in argv:
            at = argv.index("--config")
            if at + 1 >= len(argv):
                raise MonetError("--config needs a YAML file")
            from monet.train import load_settings

            defaults["default"] = load_settings(argv[at + 1])
            argv = argv[:at] + argv[at + 2:]
        settings = tyro.cli(cls, args=argv, prog=f"monet {name}", config=(tyro.conf.FlagCreatePairsOff,), **defaults)
    settings.check()
    return settings


OUTPUT_FIELDS = ("out", "json", "markdown")   # settings fields naming what a command writes
# command -> (marker kind, noun, replace_own) of its output directory, as its library function writes it
OUTPUTS = {"data build": ("data build", "a dataset", True), "atlas build": ("atlas build", "an atlas", False),
           "probe": ("probe", "a probe report", True), "unlearn": ("unlearn", "an unlearning report", True),
           "toxicity": ("toxicity", "a toxicity report", True),
           "edits export": ("edits export", "an exported checkpoint", True)}


def input_paths(settings: Any) -> list[str]:
    """Every path-like option value of a command other than its outputs (run, data, atlas, edits, cache...):
    `monet.io.check_output` refuses an --out that is one of them, holds one or lies inside one."""
    values = [getattr(settings, f.name) for f in dataclasses.fields(settings) if f.name not in OUTPUT_FIELDS]
    flat = [item for value in values for item in (value if isinstance(value, (tuple, list)) else (value,))]
    return [str(v) for v in flat if isinstance(v, (str, Path)) and str(v) and "\0" not in str(v)]


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` says the disk is full: OSError ENOSPC / EDQUOT, or what torch.save (RuntimeError "file
    write failed") and safetensors (an IoError with code 28) raise when it is."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(exc)
    return any(sign in text for sign in ("No space left on device", "code: 28", "StorageFull", "file write failed"))


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure: MemoryError, torch's "can't allocate memory" / CUDA OOM."""
    text = str(exc)
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()))


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush stays quiet."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
    if argv[:1] in (["--version"], ["-V"]):
        print(f"monet {__version__}")
        return 0
    name, rest = split_command(argv)
    try:
        if name is None:
            if argv[:1] in ([], ["-h"], ["--help"]):
                print(HELP.format(commands=command_list(list(COMMANDS))))
                return 0 if argv else 2
            subcommands = [command for command in COMMANDS if command.startswith(argv[0] + " ")]   # `monet atlas`
            if not subcommands:
                raise MonetError(f"unknown command {argv[0]!r}; see `monet --help` for the list")
            asked = argv[1:2] in (["-h"], ["--help"])
            stream = sys.stdout if asked else sys.stderr
            print(f"usage: monet {argv[0]} SUBCOMMAND [options]\n\nsubcommands:", file=stream)
            print(command_list(subcommands, "monet "), file=stream)
            return 0 if asked else 2
        settings = parse(name, rest)
        with command_inputs(input_paths(settings)):
            if name in OUTPUTS and getattr(settings, "out", None):   # refused before any work, not after it
                kind, noun, replace_own = OUTPUTS[name]
                check_output(settings.out, kind, force=settings.force, noun=noun, replace_own=replace_own)
            COMMANDS[name][1](settings)
        sys.stdout.flush()   # inside the try: a closed pipe is reported here, not at exit
        return 0
    except SystemExit as exc:   # tyro: --help (0) or a malformed option (2, already explained)
        return exc.code if isinstance(exc.code, int) else 2
    except BrokenPipeError:   # `monet atlas query ... | head`: the reader has all it wants; stop quietly
        _silence_stdout()
        return 0
    except Exception as exc:   # a fixable mistake, or the machine refused (disk full, rights); else a bug
        if not isinstance(exc, (MonetError, OSError)) and not disk_full(exc) and not out_of_memory(exc):
            raise
        if debug:
            traceback.print_exc()
        resume = " (training resumes from its last checkpoint)" if name == "train" else ""
        message = ("a file could not be written: the disk (or quota) is full; free space or choose another --out, "
                   f"then run the command again{resume}") if disk_full(exc) else str(exc)
        if out_of_memory(exc):
            message = ("out of memory; lower --batch-size (or the sizes asked for: tokens, samples, --set shape "
                       f"fields), or use a larger device{resume}")
        hint = "" if isinstance(exc, MonetError) or disk_full(exc) or out_of_memory(exc) or debug \
            else " (--debug shows where)"
        # file names and corpus text inside messages are shown, never interpreted by the terminal
        print(printable(f"monet{' ' + name if name else ''}: error: {message}{hint}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = " (run the same command again to resume from the last checkpoint)" if name == "train" else ""
        print(f"monet {name}: interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`monet atlas`, `monet atlas query`, `monet atlas export`, `monet view`, `monet explain`.

`monet atlas` takes either a run (build) or the word `query`/`export` first; the three forms have
their own parsers, picked by that first word, so each keeps a specific `--help`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from monet.errors import MonetError

ATLAS_USAGE = """usage:
  monet atlas RUN --data DIR --out ATLAS [--max-tokens N] [--top-k K] [--split S] [--batch-size B] [--seq-len L]
  monet atlas query ATLAS (--expert G:ID | --token TEXT | --text TEXT --run RUN | --label NAME) [--json]
  monet atlas export ATLAS --expert G:ID --out FILE.json [--run RUN]

Build the expert atlas of a model (top-activating contexts and label statistics of every expert of every
routing group), query it, or export one expert page as JSON. `monet atlas RUN --help`,
`monet atlas query --help` and `monet atlas export --help` describe each form."""


# ------------------------------------------------------------------------------------------- parsers

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="monet atlas",
        description="Stream a labelled corpus through a model and store, for every expert of every routing "
                    "group, its top-K contexts, activation count and density, mean score, score histogram and "
                    "routing mass per label. Memory stays bounded whatever the corpus size.",
    )
    p.add_argument("run", metavar="RUN", help="run directory (newest checkpoint) or checkpoint directory")
    p.add_argument("--data", required=True, help="dataset directory built by `monet data build`")
    p.add_argument("--out", required=True, help="atlas directory to write (written as OUT.tmp, then renamed)")
    p.add_argument("--max-tokens", type=int, default=1_000_000,
                   help="tokens to process; documents are taken round-robin over labels (0 = all)")
    p.add_argument("--top-k", type=int, default=10, help="contexts kept per expert")
    p.add_argument("--split", choices=("validation", "train"), default="validation")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (documents are cut into windows)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda under torchrun, else cpu)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def query_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="monet atlas query",
        description="Ask an atlas: an expert's top contexts (activating token in [[ ]], score as a percentage "
                    "of the token's routing mass), counts and label histogram; the experts of a token, of a "
                    "label (skewness, paper §5.1), or of each token of a text (needs --run).",
    )
    p.add_argument("atlas", metavar="ATLAS", help="atlas directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--expert", metavar="G:ID", help="one expert: routing group and expert id i*E+j")
    what.add_argument("--token", metavar="TEXT", help="experts most often active on this vocabulary token (or id)")
    what.add_argument("--text", metavar="TEXT", help="run the model (--run) on TEXT and list each token's experts")
    what.add_argument("--label", metavar="NAME", help="experts most specific to a label")
    p.add_argument("--run", metavar="RUN", help="the model the atlas was built from (promoted tokens, --text)")
    p.add_argument("-n", "--top", type=int, default=10, help="how many contexts / experts to list")
    p.add_argument("--min-count", type=int, default=10, help="--label: minimum activations of an expert")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="monet atlas export",
        description="Write one expert page as JSON in a shape close to Neuronpedia feature data (docs/atlas.md).",
    )
    p.add_argument("atlas", metavar="ATLAS", help="atlas directory")
    p.add_argument("--expert", required=True, metavar="G:ID", help="routing group and expert id")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--run", metavar="RUN", help="the atlas's model: adds promoted/suppressed tokens")
    p.add_argument("-n", "--top", type=int, default=None, help="contexts to include (default: all stored)")
    return p


# ------------------------------------------------------------------------------------------ handlers

def _load_model(run: str, device: str | None = None):
    from monet.checkpoint import load_checkpoint

    return load_checkpoint(run, device=device)


def _init_distributed() -> str | None:
    """Under torchrun, start the process group; returns the device of this rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return "cpu"


def run_build(args: argparse.Namespace) -> int:
    from monet.analysis.atlas import AtlasOptions, build_atlas

    device = _init_distributed() or args.device
    model, tokenizer = _load_model(args.run, device)
    options = AtlasOptions(max_tokens=args.max_tokens or None, top_k=args.top_k, split=args.split,
                           batch_size=args.batch_size, seq_len=args.seq_len)
    out = build_atlas(model, tokenizer, args.data, args.out, options, force=args.force,
                      progress=not args.quiet, run=args.run)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        from monet.analysis.query import Atlas

        atlas = Atlas(out)
        print(f"wrote {out}: {atlas.manifest['tokens']:,} tokens, {len(atlas.groups)} groups x "
              f"{atlas.num_experts:,} experts, labels {', '.join(atlas.labels)} "
              f"({atlas.manifest['build_seconds']} s)")
    return 0


def expert_result(atlas, group: int, expert: int, n: int, model) -> dict[str, Any]:
    """Statistics, top contexts and (with the model) promoted/suppressed tokens of one expert."""
    result = {**atlas.expert(group, expert), "contexts": atlas.top_contexts(group, expert, n)}
    if model is not None:
        from monet.analysis.explain import expert_logits

        result["logits"] = expert_logits(model, atlas, group, expert)
    return result


def _show_expert(result: dict[str, Any]) -> None:
    from monet.analysis.query import format_context

    print(f"expert {result['id']}: {result['count']:,} activations, density {result['density']:.2e}, "
          f"mean score {result['mean_score']:.4f}, max {result['max_percent']:.1f}%")
    shares = sorted(result["label_share"].items(), key=lambda kv: -kv[1])
    print("labels: " + ", ".join(f"{label} {100 * share:.1f}%" for label, share in shares))
    for ctx in result["contexts"]:
        print(f"  {ctx['percent']:6.2f}%  {ctx['label']:<12} {format_context(ctx)}")
    if "logits" in result:
        print("promotes:   " + " ".join(repr(t) for t in result["logits"]["pos_str"]))
        print("suppresses: " + " ".join(repr(t) for t in result["logits"]["neg_str"]))


def run_query(args: argparse.Namespace) -> int:
    from monet.analysis.query import Atlas, experts_for_text, parse_expert

    show = not args.json
    atlas = Atlas(args.atlas)
    model = tokenizer = None
    if args.run:
        model, tokenizer = _load_model(args.run)
        atlas.check_model(model)
    if args.expert:
        group, expert = parse_expert(args.expert, atlas)
        result: Any = expert_result(atlas, group, expert, args.top, model)
        if show:
            _show_expert(result)
    elif args.token is not None:
        result = atlas.experts_for_token(args.token, args.top)
        if show:
            if not result:
                print(f"no expert has {args.token!r} among its top contexts")
            for r in result:
                print(f"  {r['id']:>14}  {r['contexts']} of its top contexts on {r['piece']!r}, "
                      f"best {r['max_percent']:.1f}%")
    elif args.label is not None:
        result = atlas.experts_for_label(args.label, args.top, args.min_count)
        if show:
            for r in result:
                print(f"  {r['id']:>14}  skewness {r['skewness']:.2f}  ({r['count']:,} activations)")
    else:
        if model is None:
            raise MonetError("--text needs the model: pass --run RUN (the run the atlas was built from)")
        result = experts_for_text(model, tokenizer, args.text, n=min(args.top, 5))
        if show:
            for entry in result:
                groups = "  |  ".join(" ".join(f"{g}:{e} {p:.0f}%" for e, p in experts)
                                      for g, experts in enumerate(entry["groups"]))
                print(f"  {entry['piece']!r:>14}  {groups}")
    if not show:
        from monet.analysis.query import json_safe

        print(json.dumps(json_safe(result), indent=2, ensure_ascii=False, allow_nan=False))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from monet.analysis.export import expert_page, write_json
    from monet.analysis.query import Atlas, parse_expert

    atlas = Atlas(args.atlas)
    group, expert = parse_expert(args.expert, atlas)
    model = None
    if args.run:
        model, _ = _load_model(args.run)
        atlas.check_model(model)
    path = write_json(args.out, expert_page(atlas, group, expert, model, args.top))
    print(f"wrote {path}")
    return 0


def run_atlas(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if args.help or not argv:
        print(ATLAS_USAGE)
        return 0 if args.help else 2
    forms = {"query": (query_parser, run_query), "export": (export_parser, run_export)}
    make, handler = forms.get(argv[0], (build_parser, run_build))
    rest = argv[1:] if argv[0] in forms else argv
    return handler(make().parse_args(rest))


def run_view(args: argparse.Namespace) -> int:
    from monet.analysis.query import Atlas
    from monet.viewer.server import serve

    atlas = Atlas(args.atlas)
    model = None
    if args.run:
        model, _ = _load_model(args.run)
        atlas.check_model(model)
    serve(atlas, host=args.host, port=args.port, model=model)
    return 0


def run_explain(args: argparse.Namespace) -> int:
    from monet.analysis.explain import CHAT_NOTE, explain_expert
    from monet.analysis.query import Atlas, parse_expert

    atlas = Atlas(args.atlas)
    group, expert = parse_expert(args.expert, atlas)
    model, tokenizer = _load_model(args.run, args.device)
    atlas.check_model(model)
    print(CHAT_NOTE, file=sys.stderr)
    texts = explain_expert(model, tokenizer, atlas, group, expert, samples=args.samples,
                           max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    for n, text in enumerate(texts, 1):
        print(f"{n}. {text}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    atlas = subparsers.add_parser(
        "atlas", add_help=False, help="build, query or export the expert atlas",
        description=ATLAS_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    atlas.add_argument("-h", "--help", action="store_true", help="show this help")
    atlas.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    atlas.set_defaults(handler=run_atlas)

    view = subparsers.add_parser(
        "view", help="browse an atlas in a local web viewer",
        description="Serve a small web viewer of an atlas (standard-library http.server, 127.0.0.1 by default): "
                    "group/expert pickers, a random interesting expert, top contexts with the activating token "
                    "highlighted, the label histogram, search by token, and a URL per expert (/#/expert/G/ID).",
    )
    view.add_argument("atlas", metavar="ATLAS", help="atlas directory")
    view.add_argument("--port", type=int, default=8765, help="port (0 picks a free one)")
    view.add_argument("--host", default="127.0.0.1", help="interface to bind (default: local only)")
    view.add_argument("--run", metavar="RUN", help="the atlas's model: adds promoted/suppressed tokens")
    view.set_defaults(handler=run_view)

    explain = subparsers.add_parser(
        "explain", help="let the model describe an expert (self-explanation, paper §4.3)",
        description="Prompt 'Q: What is the meaning of the word X? A: Sure! The meaning of the word X is ' with "
                    "X the averaged input embedding of the expert's top activating tokens, and sample answers. "
                    "Meaningful only for chat-tuned models (the paper used Monet-1.4B Chat).",
    )
    explain.add_argument("run", metavar="RUN", help="run or checkpoint directory (the atlas's model)")
    explain.add_argument("--atlas", required=True, help="atlas directory built from RUN")
    explain.add_argument("--expert", required=True, metavar="G:ID", help="routing group and expert id")
    explain.add_argument("--samples", type=int, default=5, help="descriptions to sample")
    explain.add_argument("--max-new-tokens", type=int, default=24)
    explain.add_argument("--temperature", type=float, default=1.0)
    explain.add_argument("--seed", type=int, default=None)
    explain.add_argument("--device", default=None, help="cpu or cuda")
    explain.set_defaults(handler=run_explain)


__all__ = ["register"]

"""``monet data build`` and ``monet data info``."""

from __future__ import annotations

import argparse
import json
import re

from monet.data.build import SOURCES, TOKENIZERS, build_corpus
from monet.data.storage import MANIFEST, SPLITS, read_manifest
from monet.data.tokenizer import DEFAULT_VOCAB_SIZE

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """Bytes from ``8000000``, ``8M``, ``500k`` or ``64KiB``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match[2].lower() if match else ""
    if unit not in _UNITS and unit.endswith("b"):
        unit = unit[:-1]  # "8MB" means "8M"
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 8000000, 8M, 500k, 64KiB)")
    return int(float(match[1]) * _UNITS[unit])


def register(subparsers) -> None:
    data = subparsers.add_parser(
        "data",
        help="build and inspect labelled token datasets",
        description="Build labelled corpora from text that ships in local packages, and inspect them.",
    )
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(handler=lambda args: data.print_help() or 2)

    defaults = ", ".join(f"{name} {size // 10**6} MB" for name, (_, size) in SOURCES.items())
    build = commands.add_parser(
        "build",
        help="build one labelled corpus and its tokenizer",
        description=(
            "Collect labelled documents from local packages (code: programming languages; domains: GCIDE "
            "subject tags; languages: gettext translations; toxicity: classifier-scored English), "
            "deduplicate, balance labels, split train/validation by content hash, train a byte-level BPE "
            "and write memory-mapped tokens. The directory appears only when the build is complete."
        ),
    )
    build.add_argument("--source", required=True, choices=list(SOURCES), help="which corpus to build")
    build.add_argument("--out", required=True, help="output dataset directory")
    build.add_argument(
        "--max-bytes", type=parse_size, default=None, help=f"text budget over all labels (defaults: {defaults})"
    )
    build.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="BPE vocabulary size (bpe only)")
    build.add_argument("--tokenizer", choices=TOKENIZERS, default="bpe", help="train a BPE or use GPT-2's vocabulary")
    build.add_argument(
        "--fetch", action="store_true", help="download optional Debian/npm packages into the cache (apt-get, npm)"
    )
    build.add_argument("--seed", type=int, default=0, help="which documents fill each label's budget")
    build.add_argument("--cache-dir", default=None, help="package cache (default $MONET_CACHE or ~/.cache/monet)")
    build.add_argument("--force", action="store_true", help="rebuild even if --out already holds a dataset")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(handler=run_build)

    info = commands.add_parser(
        "info", help="documents and tokens per label and split", description="Summarise a built dataset."
    )
    info.add_argument("dir", help="dataset directory")
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")
    info.set_defaults(handler=run_info)


def run_build(args: argparse.Namespace) -> int:
    from pathlib import Path

    out = Path(args.out)
    if (out / MANIFEST).is_file() and not args.force:
        read_manifest(out)
        print(f"{out} already holds a complete dataset; pass --force to rebuild it")
        return 0
    path = build_corpus(
        args.source,
        out,
        max_bytes=args.max_bytes,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        seed=args.seed,
        fetch=args.fetch,
        cache_dir=args.cache_dir,
        force=args.force,
        progress=not args.quiet,
    )
    print(format_table(read_manifest(path)))
    print(f"wrote {path}")
    return 0


def format_table(manifest: dict) -> str:
    """Documents and tokens per label and split, as an aligned text table."""
    header = ["label"] + [f"{split} {what}" for split in SPLITS for what in ("docs", "tokens")]
    rows = []
    for label in manifest["labels"] + ["total"]:
        row = [label]
        for split in SPLITS:
            info = manifest["splits"].get(split, {})
            entry = info if label == "total" else info.get("labels", {}).get(label, {})
            row += [f"{entry.get('documents', 0):,}", f"{entry.get('tokens', 0):,}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    title = (
        f"source {manifest['source']} · tokenizer {manifest.get('tokenizer', '?')} · vocab {manifest['vocab_size']:,}"
        f" · {len(manifest['labels'])} labels"
    )
    rule = "-" * len(line(header))
    return "\n".join([title, line(header), rule, *(line(r) for r in rows[:-1]), rule, line(rows[-1])])


def run_info(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.dir)
    if args.json:
        print(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False))
    else:
        print(format_table(manifest))
    return 0

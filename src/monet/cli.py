"""The `monet` command line: one entry point, one subcommand per capability.

Each area of the package owns its subcommands through a `register(subparsers)` function, so this
file stays a thin table of contents. A subcommand's handler receives the parsed arguments and
returns an exit code; user-facing failures raise `MonetError`, printed as one clear line.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from monet.errors import MonetError

# Modules that add subcommands, in the order `monet --help` lists them.
_COMMAND_MODULES = [
    "monet.demo",
    "monet.info",
    "monet.data.cli",
    "monet.train",
    "monet.evaluate",
    "monet.generation",
    "monet.analysis.cli",
    "monet.unlearn",
    "monet.toxicity_eval",
    "monet.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monet",
        description="Monet: train, load, inspect and edit Mixture-of-Monosemantic-Experts language models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that area is not part of this build yet
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except MonetError as exc:
        print(f"monet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"monet {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

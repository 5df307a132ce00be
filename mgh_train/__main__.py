"""Command line: ``python -m mgh_train [SUBCOMMAND]``; with no subcommand it runs ``demo``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import demo

SUBCOMMANDS = ("demo",)
DEFAULT_SUBCOMMAND = "demo"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mgh_train",
        description="mgh: LLM text embedders with hard negatives and anchor-token-aware pooling.",
    )
    commands = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    demo_parser = commands.add_parser(
        "demo", help="ATA pooling and InfoNCE on an embedded toy batch (default)", description=demo.__doc__
    )
    demo.add_arguments(demo_parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        argv = [DEFAULT_SUBCOMMAND, *argv]
    args = parser.parse_args(argv)
    return demo.run(args)


if __name__ == "__main__":
    sys.exit(main())

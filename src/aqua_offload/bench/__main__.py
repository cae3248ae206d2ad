"""Command line of the benchmarks: ``python -m aqua_offload.bench copy [--quick] [--json PATH]``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from . import copy

__all__ = ["build_parser", "main"]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser, one subcommand per benchmark."""
    parser = argparse.ArgumentParser(
        prog=prog or "python -m aqua_offload.bench",
        description="aqua_offload benchmarks (method: docs/benchmarks.md).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("copy", help="copy bandwidth of offload/fetch vs the raw copy",
                       description=(copy.__doc__ or "").split("\n\n")[0])
    copy.add_arguments(p)
    p.set_defaults(func=copy.run_from_args)
    return parser


def main(argv: Sequence[str | os.PathLike[str]] | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return the exit status."""
    args = build_parser(prog).parse_args(None if argv is None else [os.fspath(a) for a in argv])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

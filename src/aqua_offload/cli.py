"""The ``aqua-offload`` console script (also ``python -m aqua_offload``).

Subcommands: ``info`` (backend, GPUs, peer access, NVLink, pools, versions), ``bench`` (the
benchmarks of :mod:`aqua_offload.bench`), ``sim`` (the simulator, :mod:`aqua_offload.sim`) and
``lending`` (the cross-process lending ledger, :mod:`aqua_offload.lending`) and ``lend`` (a
lender of the remote tier over NIXL, :mod:`aqua_offload.remote`). Each subcommand
module owns its arguments (``add_arguments``/``run``); this file only assembles them, so
``aqua-offload bench copy ...`` and ``python -m aqua_offload.bench copy ...`` are one
implementation.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["build_parser", "main"]


def _info(args: argparse.Namespace) -> int:
    from .sysinfo import format_info, info

    data = info()
    if args.json is None:
        print(format_info(data))
    elif str(args.json) == "-":
        print(json.dumps(data, indent=2))
    else:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(data, indent=2) + "\n")
        except OSError as exc:
            print(f"aqua-offload info: {exc}", file=sys.stderr)
            return 2
        print(format_info(data))
        print(f"\nwrote {args.json}")
    return 0


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``aqua-offload``: one subcommand each, every one setting ``func``."""
    from . import __version__
    from .bench.__main__ import DESCRIPTION, add_benchmarks

    parser = argparse.ArgumentParser(
        prog=prog or "aqua-offload",
        description="aqua_offload: tensor offload to peer GPUs and pinned host memory.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("info", help="backend, GPUs, peer access, NVLink, pools, versions",
                       description="What aqua_offload sees on this machine.")
    p.add_argument("--json", type=Path, metavar="PATH",
                   help="also write it as JSON to PATH ('-': only JSON, on stdout)")
    p.set_defaults(func=_info)
    p = sub.add_parser("bench", help="run a benchmark (copy, tiers, hf, burst, remote)",
                       description=DESCRIPTION)
    add_benchmarks(p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK"))
    for name, module, text in (
            ("sim", "aqua_offload.sim.__main__",
             "simulate an N-GPU server: TTFT and throughput per policy and tier"),
            ("lending", "aqua_offload.lending.__main__",
             "show the cross-process lending ledger: offers, leases, pending reclaims"),
            ("lend", "aqua_offload.remote.__main__",
             "lend host or GPU memory over NIXL, or GPU memory through the ledger")):
        mod = importlib.import_module(module)
        # the docstring's first paragraph, without its reST literal quotes
        description = (mod.__doc__ or text).split("\n\n")[0].replace("``", "")
        p = sub.add_parser(name, help=text, description=description)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def main(argv: Sequence[str | os.PathLike[str]] | None = None, prog: str | None = None) -> int:
    """Run ``aqua-offload`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Exit status: 0 on success, 1 when a benchmark verified wrong results, 2 for a usage error,
    130 when interrupted (Ctrl-C).
    """
    parser = build_parser(prog)
    args = parser.parse_args(None if argv is None else [os.fspath(a) for a in argv])
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return _interrupted(parser.prog)


def _interrupted(prog: str) -> int:
    """Ctrl-C ended a command: say so in one line and give the shell's status for SIGINT.

    What ran was cleaned up on the way out (managers close in their ``with`` blocks); a
    traceback from wherever the signal landed would tell the user nothing."""
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())

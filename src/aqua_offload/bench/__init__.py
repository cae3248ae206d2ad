"""Benchmarks of aqua_offload (they report numbers; the tests assert behaviour).

Run them from the command line, ``python -m aqua_offload.bench copy [--quick] [--json PATH]``,
or call :func:`main` with the same arguments. See docs/benchmarks.md.
"""

from __future__ import annotations

import os
from typing import Sequence

__all__ = ["main"]


def main(argv: Sequence[str | os.PathLike[str]] | None = None, prog: str | None = None) -> int:
    """Run a benchmark subcommand (``["copy", "--quick"]``); return the exit status."""
    from .__main__ import main as _main  # imported late: ``-m aqua_offload.bench`` runs it itself

    return _main(argv, prog)

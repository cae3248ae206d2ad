"""Where a command writes its results (``--json``, ``--plot``), checked before a long run starts:
a benchmark or a simulation of minutes must not be lost to a bad path at its end. Used by
``aqua-offload bench`` and ``aqua-offload sim`` alike."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["output_problem", "plot_problem"]


def output_problem(path: Path, what: str) -> str | None:
    """Why ``path`` cannot be written (its parent folders are made first), or None.

    Parameters
    ----------
    path : Path
        The file the command will write.
    what : str
        The option that named it (``"--json"``), for the message.
    """
    if path.is_dir():
        return f"{what} {path}: is a directory"
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"{what} {path}: cannot create {parent}: {exc.strerror or exc}"
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and
                                                     not os.access(path, os.W_OK)):
        return f"{what} {path}: not writable"
    return None


def plot_problem(path: Path) -> str | None:
    """Why no plot can be saved to ``path``, or None: matplotlib missing, or a suffix that
    names no format it writes (``savefig`` infers the format from the suffix)."""
    try:
        import matplotlib  # noqa: F401  (first: the package itself, whatever is cached below)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "--plot needs matplotlib (pip install matplotlib)"
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        return (f"--plot {path}: unknown image format {path.suffix or '(no suffix)'!r} "
                f"(matplotlib writes {', '.join('.' + f for f in sorted(formats))})")
    return None

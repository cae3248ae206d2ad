"""``--plot PATH``: a benchmark's results drawn into a PNG with matplotlib.

- copy: bandwidth against size, one line per method, one panel per direction (log-log), and
  the copy-while-matmul ratios as bars;
- tiers and hf: the ratio to the baseline (tiers) or tokens/s (hf) per method, as bars;
- burst: the TTFT CDF of each policy and tier.

matplotlib is imported here, lazily, and drawn through its object API (``Figure`` with the Agg
canvas), so a plot never touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import math
import os
import textwrap
from typing import Any, Callable

__all__ = ["plot_result", "require_matplotlib"]


def require_matplotlib() -> None:
    """Raise ImportError, saying how to install it, unless matplotlib can be imported."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise ImportError("matplotlib is not installed (pip install matplotlib)") from None


def _figure(panels: int, title: str) -> tuple[Any, list[Any]]:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(max(5.2 * cols, 8.0), 3.8 * rows + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(panels)]
    fig.suptitle("\n".join(textwrap.wrap(title, 40 * cols if cols > 1 else 90)), fontsize=10)
    return fig, axes


def _title(result: dict[str, Any], what: str) -> str:
    label = f" [{result['label']}]" if result.get("label") else ""
    return f"aqua_offload {what}: {result['device']}, {result['backend']} backend{label}"


def _size_tick(x: float, _pos: object) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if x >= scale:
            return f"{x / scale:g}{unit}"
    return f"{x:g}"


def _copy(result: dict[str, Any]) -> Any:
    rows = result["rows"]
    sweep = [d for d in dict.fromkeys(r["direction"] for r in rows)
             if not d.startswith("overlap_")]
    overlap = [r for r in rows if r["direction"].startswith("overlap_")]
    fig, axes = _figure(len(sweep) + bool(overlap), _title(result, "copy bandwidth"))
    from matplotlib.ticker import FuncFormatter  # after _figure: it reports a missing matplotlib
    for ax, d in zip(axes, sweep):
        mine = [r for r in rows if r["direction"] == d]
        for method in dict.fromkeys(r["method"] for r in mine):
            pts = sorted((r["bytes"], r["gbps"]) for r in mine if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                    label=method)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(_size_tick))
        ax.set_yscale("log")
        ax.set_title(d + (f"\n{result['notes'][d]}" if d in result.get("notes", {}) else ""),
                     fontsize=8)
        ax.set_xlabel("bytes")
        ax.set_ylabel("GB/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if overlap:
        ax = axes[len(sweep)]
        ax.bar([f"{r['direction'][8:]}\n{r['method']}" for r in overlap],
               [r["ratio"] for r in overlap])
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title("copy while a matmul runs: ratio to alone", fontsize=8)
        ax.tick_params(axis="x", labelsize=6)
    return fig


def _bars(result: dict[str, Any], what: str, key: str, label: Callable[[dict], str]) -> Any:
    fig, (ax,) = _figure(1, _title(result, what))
    rows = result["rows"]
    ax.bar([label(r) for r in rows], [r[key] for r in rows])
    ax.set_ylabel(key)
    ax.tick_params(axis="x", labelsize=7, rotation=20)
    return fig


def _burst(result: dict[str, Any]) -> Any:
    fig, (ax,) = _figure(1, _title(result, "TTFT under a burst"))
    for name, ttfts in result["requests"].items():
        xs = sorted(ttfts)
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post",
                label=name.replace("/None", ""))
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


_DRAW: dict[str, Callable[[dict[str, Any]], Any]] = {
    "copy": _copy,
    "tiers": lambda r: _bars(r, "tiers (ratio to baseline)", "ratio",
                             lambda row: f"{row['direction']}\n{row['method']}"),
    "hf": lambda r: _bars(r, "generate tokens/s", "tok_s", lambda row: row["method"]),
    "burst": _burst,
}


def plot_result(kind: str, result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Draw the result of benchmark ``kind`` ("copy", "tiers", "hf" or "burst") into ``path``.

    Raises
    ------
    ImportError
        matplotlib is not installed.
    ValueError
        An unknown ``kind``.
    """
    if kind not in _DRAW:
        raise ValueError(f"no plot for benchmark {kind!r} (available: {', '.join(_DRAW)})")
    fig = _DRAW[kind](result)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)

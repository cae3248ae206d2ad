"""Reporting simulation results: a text table, a JSON document and a plot.

The JSON document is ``{"scenario": name, "results": [row, ...], "config": {...},
"details": [...]}``; every row has exactly the keys ``policy``, ``tier``, ``ttft_p50_s``,
``ttft_p99_s``, ``throughput_tok_s``, ``paged_bytes``, ``paging_s``. matplotlib is imported
only by :func:`write_plot`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from ..sizes import format_size
from .scenario import Scenario
from .simulate import RunResult

__all__ = ["format_table", "to_json", "write_plot", "PlotError"]


class PlotError(RuntimeError):
    """The plot could not be made (matplotlib missing)."""


def _baseline(results: Sequence[RunResult]) -> RunResult | None:
    return next((r for r in results if r.policy == "admission"), None)


def format_table(results: Sequence[RunResult], title: str = "") -> str:
    """One line per (policy, tier); gains are relative to ``admission`` in the same run."""
    base = _baseline(results)
    lines = [title] if title else []
    lines.append(f"{'policy':<9} {'tier':<5} {'TTFT p50':>9} {'TTFT p99':>9} {'tok/s':>9} "
                 f"{'paged':>11} {'paging':>9} {'stall':>9} {'preempt':>8} {'p99 gain':>9} "
                 f"{'tput':>6}")
    for r in results:
        gain = f"{base.ttft_p99_s / r.ttft_p99_s:>8.2f}x" if base and r.ttft_p99_s > 0 else \
            f"{'-':>9}"
        ratio = f"{r.throughput_tok_s / base.throughput_tok_s:>6.2f}" if base else f"{'-':>6}"
        lines.append(f"{r.policy:<9} {r.tier or '-':<5} {r.ttft_p50_s:>8.2f}s "
                     f"{r.ttft_p99_s:>8.2f}s {r.throughput_tok_s:>9.0f} "
                     f"{format_size(r.paged_bytes):>11} {r.paging_s:>8.1f}s {r.stall_s:>8.1f}s "
                     f"{r.preemptions:>8} {gain} {ratio}")
    lines.append("TTFT percentiles are nearest-rank; p99 gain = admission p99 / this p99; tput = "
                 "throughput / admission's; paging = summed copy time; stall = summed time "
                 "resumed requests waited from their grant to joining a batch (memory, "
                 "page-in, the iteration in flight).")
    return "\n".join(lines)


def to_json(scenario: Scenario, results: Sequence[RunResult]) -> dict[str, Any]:
    """The JSON document of a run (module docstring)."""
    config = {
        "description": scenario.description,
        "gpus": [dataclasses.asdict(g) for g in scenario.gpus],
        "models": {k: dataclasses.asdict(m) for k, m in scenario.models.items()},
        "gpu_spec": dataclasses.asdict(scenario.gpu_spec),
        "links": dataclasses.asdict(scenario.links),
        "reclaims": [dataclasses.asdict(r) for r in scenario.reclaims],
        "quantum_s": scenario.quantum_s, "seed": scenario.seed, "prefetch": scenario.prefetch,
        "ttft_percentiles": "nearest-rank",
        "emulated": "simulation (no hardware involved)",
    }
    return {"scenario": scenario.name, "results": [r.row() for r in results], "config": config,
            "details": [r.details() for r in results]}


def write_plot(path: str | Path, results: Sequence[RunResult], title: str = "") -> Path:
    """TTFT CDF per (policy, tier) and a bar chart of TTFT p99, as one image."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed; must precede pyplot
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("--plot needs matplotlib (pip install matplotlib)") from None
    path = Path(path)
    fig, (ax_cdf, ax_bar) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = []
    for r in results:
        label = r.policy if r.tier is None else f"{r.policy}/{r.tier}"
        labels.append(label)
        n = len(r.ttft_s)
        ax_cdf.step(r.ttft_s, [(k + 1) / n for k in range(n)], where="post", label=label)
    ax_cdf.set_xscale("log")
    ax_cdf.set_xlabel("TTFT (s, log scale)")
    ax_cdf.set_ylabel("fraction of requests")
    ax_cdf.set_title("TTFT CDF")
    ax_cdf.grid(True, which="both", alpha=0.3)
    ax_cdf.legend(fontsize=8)
    ax_bar.bar(labels, [r.ttft_p99_s for r in results], color="tab:blue")
    ax_bar.set_ylabel("TTFT p99 (s)")
    ax_bar.set_title("TTFT p99 (nearest rank)")
    ax_bar.tick_params(axis="x", rotation=30)
    fig.suptitle(f"{title} (simulated)" if title else "simulated")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

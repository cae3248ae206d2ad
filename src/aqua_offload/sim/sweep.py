"""The regime map: admission control vs time slicing over a grid of workloads.

Note [Sweep cells]
One cell is one workload on one consumer GPU beside one producer GPU that lends memory (the
paper-burst server cut to one consumer: its four consumers are independent under round-robin
routing, so one is the same experiment at a quarter of the cost). The axes:

- ``requests``: the burst size (arrivals spread over ``window_s``);
- ``prompts`` and ``outputs``: inclusive uniform ranges of prompt and output tokens;
- ``pressures``: KV demand / KV capacity, where the demand is the sum over the burst of
  (prompt + output) x kv_bytes_per_token (what the whole burst would reserve at once) and the
  capacity is what the consumer has for KV. The consumer's memory is set to weights +
  reserved + demand / pressure, so pressure 1 means the whole burst fits at once and
  pressure 8 means an eighth of it does. The capacity is never below the largest request's
  need (an engine cannot serve a request that does not fit); ``pressure`` in the output is
  the one actually simulated.

Every cell runs admission control, fcfs, and rr and fair with host and peer paging on the same
trace; ``p50_gain`` and ``p99_gain`` are admission's TTFT percentile over the configuration's,
``throughput_ratio`` the configuration's throughput over admission's (> 1: faster).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import multiprocessing
import multiprocessing.context
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable, Iterator, Sequence

from ..errors import InvalidArgumentError
from ..sizes import format_size
from .roofline import GPUSpec, ModelSpec
from .scenario import GPUConfig, LinkSpec, Scenario, TraceSpec
from .simulate import RunResult, configurations, simulate
from .trace import burst_trace

__all__ = ["SweepBase", "SweepGrid", "QUICK_GRID", "DEFAULT_GRID", "cell_scenario", "run_cell",
           "run_sweep", "summarize_sweep", "format_sweep", "write_heatmaps", "config_label"]

GiB = 1 << 30
THRESHOLDS = (2.0, 5.0, 10.0, 20.0)


@dataclass(frozen=True)
class SweepBase:
    """What every cell shares: the model, the GPUs, the links and the scheduler knobs
    (defaults: Llama-2-13B in BF16 on an H100 SXM, a producer lending 64 GiB over NVLink,
    quantum 250 ms, bursts arriving within 1 s: the paper-burst settings)."""

    model: ModelSpec = ModelSpec("llama-13b", 13.0e9, 26_000_000_000, 819_200)
    gpu_spec: GPUSpec = GPUSpec()
    links: LinkSpec = LinkSpec()
    reserved_bytes: int = 4 * GiB
    gpu_memory_bytes: int = 80 * GiB  # the lender's memory, and the real GPU size cells are
    # checked against (``fits_gpu``)
    lends_bytes: int = 64 * GiB
    max_batch: int = 256
    max_prefill_tokens: int = 8192
    quantum_s: float = 0.25
    window_s: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class SweepGrid:
    """The axes of the map (Note [Sweep cells])."""

    requests: tuple[int, ...]
    prompts: tuple[tuple[int, int], ...]
    outputs: tuple[tuple[int, int], ...]
    pressures: tuple[float, ...]
    policies: tuple[str, ...] = ("admission", "fcfs", "rr", "fair")
    tiers: tuple[str, ...] = ("host", "peer")

    def __post_init__(self) -> None:
        for name in ("requests", "prompts", "outputs", "pressures"):
            if not getattr(self, name):
                raise InvalidArgumentError(f"sweep: the {name} axis is empty")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.requests):
            raise InvalidArgumentError(f"sweep: requests must be integers >= 1, got "
                                       f"{self.requests!r}")
        for name in ("prompts", "outputs"):
            for lo, hi in getattr(self, name):
                if not 1 <= lo <= hi:
                    raise InvalidArgumentError(f"sweep: {name} ranges need 1 <= low <= high, "
                                               f"got {(lo, hi)!r}")
        if any(not (p > 0 and math.isfinite(p)) for p in self.pressures):
            raise InvalidArgumentError(f"sweep: pressures must be finite and > 0, got "
                                       f"{self.pressures!r}")
        if "admission" not in self.policies:
            raise InvalidArgumentError("sweep: admission is the baseline of every gain; keep it")

    def cells(self) -> list[tuple[int, tuple[int, int], tuple[int, int], float]]:
        """(requests, prompt range, output range, pressure), pressure varying fastest."""
        return list(itertools.product(self.requests, self.prompts, self.outputs,
                                      self.pressures))


# Quick: 12 cells, a few seconds. Default: 108 cells, a few minutes on two cores.
QUICK_GRID = SweepGrid(requests=(64,), prompts=((64, 256), (512, 2048)),
                       outputs=((64, 128), (512, 1024)), pressures=(1.0, 4.0, 8.0))
DEFAULT_GRID = SweepGrid(requests=(32, 128, 512), prompts=((64, 256), (256, 1024), (1024, 4096)),
                         outputs=((32, 96), (192, 320), (768, 1280)),
                         pressures=(1.0, 2.0, 4.0, 8.0))


def config_label(policy: str, tier: str | None) -> str:
    """``admission``, ``fcfs``, ``rr/host``, ``fair/peer``, ..."""
    return policy if tier is None else f"{policy}/{tier}"


def cell_scenario(base: SweepBase, requests: int, prompt: tuple[int, int],
                  output: tuple[int, int], pressure: float,
                  policies: Sequence[str] = ("admission",), tiers: Sequence[str] = ("host",)
                  ) -> tuple[Scenario, dict[str, Any]]:
    """The scenario of one cell and its memory figures (Note [Sweep cells])."""
    m = base.model
    trace = burst_trace(requests, prompt, output, window_s=base.window_s, seed=base.seed,
                        model=m.name)
    needs = [m.request_bytes(r.prompt_tokens + r.output_tokens) for r in trace]
    demand = sum(needs)
    capacity = max(math.ceil(demand / pressure), max(needs))
    lender = ModelSpec("lender", 1.24e9, 2_480_000_000, 32_768)
    gpus = (GPUConfig(0, m.weights_bytes + base.reserved_bytes + capacity, m.name,
                      reserved_bytes=base.reserved_bytes, max_batch=base.max_batch,
                      max_prefill_tokens=base.max_prefill_tokens),
            GPUConfig(1, base.gpu_memory_bytes, "lender", base.lends_bytes,
                      base.reserved_bytes))
    # The lender serves no traffic here: its own model only sets its memory layout.
    if lender.weights_bytes + base.lends_bytes + base.reserved_bytes > base.gpu_memory_bytes:
        raise InvalidArgumentError("sweep: the lender's loan does not fit in its memory")
    sc = Scenario(name=f"sweep-{requests}-{prompt[0]}-{prompt[1]}-{output[0]}-{output[1]}-"
                       f"{pressure:g}",
                  gpus=gpus, models={m.name: m, "lender": lender},
                  traces=(TraceSpec("burst", requests, prompt, output, window_s=base.window_s,
                                    model=m.name),),
                  gpu_spec=base.gpu_spec, links=base.links, quantum_s=base.quantum_s,
                  policies=tuple(policies), tiers=tuple(tiers), seed=base.seed)
    # Whether a real 80 GiB GPU could hold this capacity next to the weights: the map also
    # covers larger (hypothetical) memories, so that pressure and burst size vary apart.
    fits = m.weights_bytes + base.reserved_bytes + capacity <= base.gpu_memory_bytes
    return sc, {"kv_demand_bytes": demand, "kv_capacity_bytes": capacity,
                "pressure": demand / capacity, "fits_gpu": fits}


def _row(r: RunResult, base: RunResult) -> dict[str, Any]:
    return {"ttft_p50_s": r.ttft_p50_s, "ttft_p99_s": r.ttft_p99_s,
            "throughput_tok_s": r.throughput_tok_s,
            "p50_gain": base.ttft_p50_s / r.ttft_p50_s,
            "p99_gain": base.ttft_p99_s / r.ttft_p99_s,
            "throughput_ratio": r.throughput_tok_s / base.throughput_tok_s,
            "preemptions": r.preemptions, "paged_bytes": r.paged_bytes,
            "fallback_bytes": r.fallback_bytes}


def run_cell(base: SweepBase, grid: SweepGrid,
             cell: tuple[int, tuple[int, int], tuple[int, int], float]) -> dict[str, Any]:
    """Simulate every configuration of one cell; the cell's JSON record."""
    requests, prompt, output, pressure = cell
    sc, memory = cell_scenario(base, requests, prompt, output, pressure, grid.policies,
                               grid.tiers)
    trace = sc.trace()
    runs = [simulate(sc, p, t, trace) for p, t in configurations(grid.policies, grid.tiers)]
    admission = runs[0]  # configurations() keeps the order of policies: admission first
    results = {config_label(r.policy, r.tier): _row(r, admission) for r in runs}
    sliced = {k: v for k, v in results.items() if k not in ("admission", "fcfs")}
    best = max(sliced, key=lambda k: sliced[k]["p99_gain"]) if sliced else "admission"
    return {"requests": requests, "prompt_tokens": list(prompt), "output_tokens": list(output),
            "pressure_target": pressure, **memory, "results": results,
            "best": {"config": best, "p99_gain": results[best]["p99_gain"],
                     "throughput_ratio": results[best]["throughput_ratio"]}}


def _cell_job(args: tuple[SweepBase, SweepGrid, Any]) -> dict[str, Any]:
    return run_cell(*args)


def _workers() -> multiprocessing.context.BaseContext:
    """Worker processes started by a fork server that imported this module once: not forked
    from the caller, whose threads (the library's, NIXL's, torch's) may hold locks at fork;
    Python 3.14 makes it the default on Linux. Spawn where there is no fork server."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    _start_fork_server()
    return ctx


def _start_fork_server() -> None:
    """Start the fork server with SIGINT ignored, a setting its exec keeps: it ignores SIGINT
    itself only after importing its preload (torch: a second or more), and a Ctrl-C in that
    time printed its KeyboardInterrupt traceback. Its workers inherit the setting too."""
    from multiprocessing import forkserver

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is None):  # a handler we could not put back
        return  # (the pool starts it; the workers' initializer still ignores SIGINT)
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()  # a Ctrl-C within these milliseconds is lost
    finally:
        signal.signal(signal.SIGINT, old)


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C (sent to the whole process group) to the caller, which stops the
    sweep; each worker would otherwise print a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold a Ctrl-C back until the block ends, then deliver it: interrupted while it starts
    a worker, the pool loses track of a child the fork server already made, which then
    fails, with a traceback, to read what the pool had sent it after the caller exited."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is None):
        yield
        return
    caught: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if caught:
            signal.raise_signal(signal.SIGINT)  # now, to the handler the caller had


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """End the cells still running: a shutdown would wait for them (and for the one queued
    behind them), seconds to minutes after Ctrl-C, since the workers ignore SIGINT."""
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14
    if terminate is not None:
        terminate()
        return
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr when tqdm is installed and ``enabled``; else None (silently)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="sweep", unit="cell", file=sys.stderr, leave=False)


def run_sweep(grid: SweepGrid = DEFAULT_GRID, base: SweepBase = SweepBase(), *, jobs: int = 1,
              progress: bool = True) -> dict[str, Any]:
    """Run every cell of ``grid`` (``jobs`` worker processes); the sweep's JSON document:
    ``{"axes", "base", "configs", "cells", "summary"}``."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InvalidArgumentError(f"jobs must be an integer >= 1, got {jobs!r}")
    cells = grid.cells()
    bar = _progress(len(cells), progress)
    out: list[dict[str, Any]] = []
    try:
        if jobs == 1 or len(cells) == 1:
            for c in cells:
                out.append(run_cell(base, grid, c))
                if bar is not None:
                    bar.update(1)
        else:
            pool = ProcessPoolExecutor(max_workers=jobs, mp_context=_workers(),
                                       initializer=_ignore_sigint)
            try:
                with _sigint_deferred():  # submits every cell and starts the workers
                    records = pool.map(_cell_job, [(base, grid, c) for c in cells])
                for rec in records:
                    out.append(rec)
                    if bar is not None:
                        bar.update(1)
            except BaseException:
                _stop_workers(pool)  # Ctrl-C or a failed cell: the sweep's result is lost
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if bar is not None:
            bar.close()
    doc = {"axes": {"requests": list(grid.requests), "prompt_tokens": [list(p) for p in
                                                                       grid.prompts],
                    "output_tokens": [list(o) for o in grid.outputs],
                    "pressure": list(grid.pressures)},
           "base": _base_json(base),
           "configs": [config_label(p, t) for p, t in configurations(grid.policies, grid.tiers)],
           "cells": out, "emulated": "simulation (no hardware involved)"}
    doc["summary"] = summarize_sweep(doc)
    return doc


def _base_json(base: SweepBase) -> dict[str, Any]:
    d = asdict(base)
    d["ttft_percentiles"] = "nearest-rank"
    return d


def _label(cell: dict[str, Any]) -> str:
    p, o = cell["prompt_tokens"], cell["output_tokens"]
    return f"{cell['requests']} req, prompt {p[0]}-{p[1]}, out {o[0]}-{o[1]}"


def summarize_sweep(doc: dict[str, Any]) -> dict[str, Any]:
    """Per time-sliced configuration: how many cells pass each gain threshold (2x, 5x, 10x,
    20x on TTFT p99), the largest gain and its cell, and the cells where the throughput ratio
    falls under 0.8 (paging costs more than a fifth)."""
    configs = [c for c in doc["configs"] if c not in ("admission", "fcfs")]
    out: dict[str, Any] = {}
    for c in configs:
        gains = [(cell["results"][c]["p99_gain"], cell) for cell in doc["cells"]]
        top, top_cell = max(gains, key=lambda g: g[0])
        out[c] = {
            "cells": len(gains),
            **{f"p99_gain_ge_{t:g}x": sum(1 for g, _ in gains if g >= t) for t in THRESHOLDS},
            "max_p99_gain": top, "max_at": {"cell": _label(top_cell),
                                           "pressure": top_cell["pressure"]},
            "throughput_ratio_min": min(cell["results"][c]["throughput_ratio"]
                                        for cell in doc["cells"]),
            "throughput_below_0.8": sum(1 for cell in doc["cells"]
                                        if cell["results"][c]["throughput_ratio"] < 0.8)}
    return out


def format_sweep(doc: dict[str, Any]) -> str:
    """A text table: one line per cell, TTFT p99 gain and throughput ratio per configuration."""
    configs = [c for c in doc["configs"] if c != "admission"]
    head = f"{'cell':<40} {'press':>5} {'adm p99':>8} " + " ".join(
        f"{c:>16}" for c in configs)
    lines = ["regime map (simulated): TTFT p99 gain over admission / throughput ratio", head]
    for cell in doc["cells"]:
        adm = cell["results"]["admission"]["ttft_p99_s"]
        vals = " ".join(f"{cell['results'][c]['p99_gain']:>8.2f}x/"
                        f"{cell['results'][c]['throughput_ratio']:<6.2f}" for c in configs)
        lines.append(f"{_label(cell):<40} {cell['pressure']:>5.2f} {adm:>7.2f}s {vals}")
    lines.append("")
    for c, s in doc["summary"].items():
        lines.append(f"{c:<10} p99 gain >=2x in {s['p99_gain_ge_2x']}/{s['cells']} cells, "
                     f">=5x {s['p99_gain_ge_5x']}, >=10x {s['p99_gain_ge_10x']}, >=20x "
                     f"{s['p99_gain_ge_20x']}; max {s['max_p99_gain']:.1f}x at "
                     f"{s['max_at']['cell']}, pressure {s['max_at']['pressure']:.2f}; "
                     f"throughput ratio min {s['throughput_ratio_min']:.2f}")
    b = doc["base"]
    lines.append(f"base: {b['model']['name']}, quantum {b['quantum_s'] * 1e3:g} ms, burst window "
                 f"{b['window_s']:g} s, max_batch {b['max_batch']}, lender loan "
                 f"{format_size(b['lends_bytes'])}; gains relative to admission control")
    return "\n".join(lines)


def write_heatmaps(path: Any, doc: dict[str, Any], configs: Sequence[str] | None = None,
                   dpi: int = 90) -> None:
    """Heatmaps (rows: TTFT p99 gain, p50 gain, throughput ratio; columns: the time-sliced
    configurations, or ``configs``; y: workload, x: memory pressure) as one image. Imports
    matplotlib."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm, TwoSlopeNorm

    configs = list(configs or [c for c in doc["configs"] if c not in ("admission", "fcfs")])
    pressures = doc["axes"]["pressure"]
    rows_lbl: list[str] = []
    for cell in doc["cells"]:
        if _label(cell) not in rows_lbl:
            rows_lbl.append(_label(cell))
    metrics = (("p99_gain", "TTFT p99 gain"), ("p50_gain", "TTFT p50 gain"),
               ("throughput_ratio", "throughput ratio"))
    fig, axes = plt.subplots(len(metrics), len(configs), squeeze=False, layout="constrained",
                             figsize=(3.0 * len(configs) + 3.0, 0.3 * len(rows_lbl) * 3 + 2.5))
    annotate = len(rows_lbl) * len(pressures) <= 120
    cell_fits = [[True] * len(pressures) for _ in rows_lbl]
    for cell in doc["cells"]:
        cell_fits[rows_lbl.index(_label(cell))][pressures.index(cell["pressure_target"])] = \
            cell["fits_gpu"]
    for i, (key, title) in enumerate(metrics):
        grids = {}
        for c in configs:
            g = [[math.nan] * len(pressures) for _ in rows_lbl]
            for cell in doc["cells"]:
                g[rows_lbl.index(_label(cell))][pressures.index(cell["pressure_target"])] = \
                    cell["results"][c][key]
            grids[c] = g
        vals = [v for g in grids.values() for row in g for v in row if not math.isnan(v)]
        if key == "throughput_ratio":
            norm: Any = TwoSlopeNorm(1.0, min(min(vals), 0.99), max(max(vals), 1.01))
            cmap = "RdBu"
        else:
            norm, cmap = LogNorm(max(min(vals), 0.1), max(max(vals), 1.01)), "viridis"
        for j, c in enumerate(configs):
            ax = axes[i][j]
            im = ax.imshow(grids[c], aspect="auto", norm=norm, cmap=cmap)
            ax.set_xticks(range(len(pressures)), [f"{p:g}" for p in pressures], fontsize=7)
            ax.set_yticks(range(len(rows_lbl)), rows_lbl if j == 0 else [], fontsize=6)
            ax.set_title(f"{c}: {title}", fontsize=8)
            if i == len(metrics) - 1:
                ax.set_xlabel("memory pressure (KV demand / capacity)", fontsize=7)
            if annotate:
                for y, row in enumerate(grids[c]):
                    for x, v in enumerate(row):
                        star = "" if cell_fits[y][x] else "*"
                        ax.text(x, y, f"{v:.2f}{star}" if key == "throughput_ratio" else
                                f"{v:.1f}{star}", ha="center", va="center", fontsize=5,
                                color="w" if key != "throughput_ratio" else "k")
        fig.colorbar(im, ax=list(axes[i]), shrink=0.8)
    fig.suptitle("regime map, simulated: gains over admission control (* = KV capacity "
                 "larger than one GPU holds)", fontsize=10)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def iter_regimes(doc: dict[str, Any], threshold: float) -> Iterator[dict[str, Any]]:
    """The cells where some time-sliced configuration passes ``threshold`` x on TTFT p99."""
    for cell in doc["cells"]:
        if cell["best"]["p99_gain"] >= threshold:
            yield cell


def grid_with(grid: SweepGrid, **changes: Iterable[Any]) -> SweepGrid:
    """``grid`` with some axes replaced (None values are ignored)."""
    return replace(grid, **{k: tuple(v) for k, v in changes.items() if v is not None})


"""Copy microbenchmark: aqua_offload's copies against the raw copy of the same bytes.

Method (DESIGN.md section 8, after NVIDIA nvbandwidth; see :mod:`.measure`): sources hold
random bytes; each method is warmed up, then timed ``samples`` times, a sample being a batch of
copies (many for small sizes) divided by their count; rows report the median sample and its
min/max; afterwards the output is compared bitwise with the source (a mismatch raises
:class:`VerificationError`). ``ratio = baseline median / median`` against the row's ``baseline``
(same direction and size, same run): above 1 is faster than the baseline, 0.95 is 95% of its
bandwidth. ``gbps = bytes / median_s / 1e9``; a ``bidirectional`` row counts the bytes of both
directions.

Directions and methods are described in :mod:`.copy_cases`; the copy-while-matmul experiment
(``overlap_copy``, ``overlap_compute``) in :mod:`.overlap`. CUDA samples are timed with
``torch.cuda.Event`` pairs on the current stream, which the library orders its copies on;
emulation samples with ``time.perf_counter`` (snapshot offloads and fetches return complete
there).
"""

from __future__ import annotations

import statistics
from typing import Any, Sequence

import torch

from ..manager import OffloadManager
from ..sizes import format_size, parse_size
from .copy_cases import BATCH_COUNT, BIDI, cuda_cases, emulation_cases
from .measure import (EMULATION_LABEL, Case, Progress, Timer, VerificationError, cuda_timer,
                      host_timer, inner_count, measure)
from .models import bench_device, device_label
from .overlap import BACKGROUND_COPIES, overlap_bytes, overlap_rows

__all__ = ["run_copy_benchmark", "format_table", "VerificationError", "EMULATION_LABEL",
           "PEER_LABEL"]

PEER_LABEL = "peer (same device: emulates the code path, not NVLink)"
FULL_SIZES = {"emulation": [(4 << 10) * 4**i for i in range(9)],   # 4 KiB .. 256 MiB
              "cuda": [(4 << 10) * 4**i for i in range(10)]}       # 4 KiB .. 1 GiB
QUICK_SIZES = [4 << 10, 256 << 10, 4 << 20, 64 << 20]
_ALIGN = 256            # the pools' block alignment
DIRECTION_NOTES = {
    "bidirectional": "a D2H and an H2D copy at once; bytes and GB/s count both",
    "overlap_copy": "ratio: the share of the copy bandwidth kept while matmuls run",
    "overlap_compute": "ratio: matmul time alone / next to copies (1 / slowdown); "
                       "bytes: one matmul's operands",
}


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _pool_bytes(nbytes: list[int], overlap: int) -> int:
    """Room for the most live blocks any case holds, so no copy ever spills to another tier:
    a bidirectional batch (k offloaded + k waiting to be fetched), batches of BATCH_COUNT
    parts, and the overlap experiment's background copies."""
    per_size = max(2 * inner_count(n) * max(_aligned(n), BATCH_COUNT * _aligned(n // BATCH_COUNT))
                   for n in nbytes)
    return per_size + (BACKGROUND_COPIES + 2) * _aligned(overlap) + (1 << 20)


def _cuda_peer(index: int) -> tuple[int, bool]:
    """The peer-tier device: another GPU this one can access directly, else the same GPU."""
    for p in range(torch.cuda.device_count()):
        if p != index and torch.cuda.can_device_access_peer(index, p):
            return p, True
    return index, False


def run_copy_benchmark(sizes: Sequence[int | str] | None = None, *, backend: str = "auto",
                       quick: bool = False, samples: int | None = None, warmup: int = 1,
                       progress: bool = False, overlap: bool = True) -> dict[str, Any]:
    """Run the copy benchmark and return its results.

    Parameters
    ----------
    sizes : sequence of int or str, optional
        Copy sizes (``4096``, ``"64MiB"``). Default: 4 KiB .. 256 MiB (emulation) or 1 GiB (cuda)
        in powers of 4; with ``quick``, 4 KiB, 256 KiB, 4 MiB and 64 MiB.
    backend : {"auto", "emulation", "cuda"}
        ``"auto"``: cuda when a GPU is usable, else emulation.
    quick, samples, warmup, progress
        Fewer sizes and samples; timed samples per point (>= 3, default 7, 5 with ``quick``);
        untimed batches first; a progress bar on stderr.
    overlap : bool
        Also run the copy-while-matmul experiment (at the largest size, clamped to 16 .. 64 MiB).

    Returns
    -------
    dict
        ``{"device", "backend", "label", "rows", "notes", "config"}`` (``label``: the
        emulation label or None; ``notes``: a label per direction); each row has ``method``,
        ``direction``, ``bytes``, ``median_s``, ``min_s``, ``max_s``, ``gbps``
        (bytes / median_s / 1e9), ``baseline``, ``ratio`` (baseline median_s / median_s),
        ``device``, ``backend``.

    Raises
    ------
    VerificationError
        A copy produced wrong bytes.
    """
    if backend not in ("auto", *FULL_SIZES):
        raise ValueError(f"backend must be 'auto', 'emulation' or 'cuda', got {backend!r}")
    backend, tdev = bench_device(backend)
    samples = (5 if quick else 7) if samples is None else samples
    nbytes = [parse_size(s, name="size") for s in sizes or (QUICK_SIZES if quick
                                                            else FULL_SIZES[backend])]
    if samples < 3 or warmup < 0 or min(nbytes) <= 0:
        raise ValueError(f"need samples >= 3, warmup >= 0 and sizes > 0, got {samples}, "
                         f"{warmup} and {nbytes}")
    overlap_n = overlap_bytes(nbytes) if overlap else 0
    pool = _pool_bytes(nbytes, overlap_n)
    notes: dict[str, str] = {}
    managers: list[OffloadManager] = []
    try:
        if backend == "cuda":
            index = tdev.index
            peer, real = _cuda_peer(index)
            managers.append(OffloadManager(device=index, peers=None, host_bytes=pool))
            managers.append(OffloadManager(device=index, peers=[peer], peer_bytes=pool,
                                           host_bytes=0))
            notes = {d: (f"peer: cuda:{peer}, {torch.cuda.get_device_name(peer)}" if real
                         else PEER_LABEL) for d in ("device_to_peer", "peer_to_device")}
            extra: tuple[Any, ...] = (torch.device("cuda", peer),)
        else:
            managers.append(OffloadManager(device="cpu", peers=None, host_bytes=pool))
            managers.append(OffloadManager(device="cpu", peers=["emu:1"], peer_bytes=pool,
                                           host_bytes=0))
            extra = ()
        device = device_label(tdev)
        timer = cuda_timer if backend == "cuda" else host_timer
        cases = cuda_cases if backend == "cuda" else emulation_cases
        bar = Progress(len(nbytes) + bool(overlap_n), progress)
        try:
            rows = []
            for n in nbytes:
                rows += _measure_size(n, cases(n, *managers, *extra), timer, samples, warmup,
                                      device, backend, bar)
            if overlap_n:
                bar.begin(f"{format_size(overlap_n)} copy while a matmul runs")
                rows += overlap_rows(backend, managers[0], overlap_n, samples, warmup, timer,
                                     device)
                bar.end()
        finally:
            bar.close()
    finally:
        for m in managers:
            m.close()
    notes.update(DIRECTION_NOTES)
    return {"device": device, "backend": backend,
            "label": EMULATION_LABEL if backend == "emulation" else None, "rows": rows,
            "notes": notes,
            "config": {"sizes": nbytes, "samples": samples, "warmup": warmup,
                       "batch_count": BATCH_COUNT, "overlap_bytes": overlap_n}}


def _measure_size(n: int, cases: list[Case], timer: Timer, samples: int, warmup: int,
                  device: str, backend: str, bar: Progress) -> list[dict[str, Any]]:
    """Measure every case at size ``n``; one row per case and direction."""
    measured = []
    for case in cases:
        bar.begin(f"{format_size(n)} {'/'.join(case.directions)} {case.method}")
        measured.append((case, measure(case, timer, n, samples, warmup)))
    bar.end()
    median = {(d, c.method): statistics.median(t) for c, t in measured for d in c.directions}
    rows = []
    for c, t in measured:
        for d in c.directions:
            moved = 2 * n if d == BIDI else n  # both directions' bytes
            rows.append({"method": c.method, "direction": d, "bytes": moved,
                         "median_s": median[d, c.method], "min_s": min(t), "max_s": max(t),
                         "gbps": moved / median[d, c.method] / 1e9, "baseline": c.baseline,
                         "ratio": median[d, c.baseline] / median[d, c.method],
                         "device": device, "backend": backend})
    return rows


def format_table(result: dict[str, Any]) -> str:
    """The result as a readable table, grouped by direction."""
    lines = []
    if result.get("label"):
        lines.append(f"*** {result['label']} ***")
    lines.append(f"device: {result['device']}   backend: {result['backend']}   "
                 "ratio = baseline median / median (>1: faster than the baseline)")
    header = (f"{'size':>10} {'method':<22} {'median':>10} {'min':>10} {'max':>10} "
              f"{'GB/s':>8} {'ratio':>7}")
    directions = list(dict.fromkeys(r["direction"] for r in result["rows"]))
    for d in directions:
        rows = [r for r in result["rows"] if r["direction"] == d]
        note = result.get("notes", {}).get(d)
        lines += ["", f"== {d} (baseline: {rows[0]['baseline']})" + (f"  [{note}]" if note else ""),
                  header]
        for r in sorted(rows, key=lambda r: r["bytes"]):  # stable: keeps the method order
            lines.append(f"{format_size(r['bytes']):>10} {r['method']:<22} "
                         f"{_us(r['median_s'])} {_us(r['min_s'])} {_us(r['max_s'])} "
                         f"{r['gbps']:>8.2f} {r['ratio']:>7.2f}")
    return "\n".join(lines)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:>8.1f}us"

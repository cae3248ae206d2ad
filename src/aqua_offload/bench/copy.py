"""Copy microbenchmark: aqua_offload's copies against the raw copy of the same bytes.

Method (DESIGN.md section 8, after NVIDIA nvbandwidth): sources hold random bytes; each method
is warmed up, then timed ``samples`` times, a sample being a batch of copies (many for small
sizes) divided by their count; rows report the median sample and its min/max; afterwards the
output is compared bitwise with the source (a mismatch raises :class:`VerificationError`).
``ratio = baseline median / median`` against the row's ``baseline`` method (same direction and
size, same run): above 1 is faster than the baseline, 0.95 is 95% of its bandwidth.

- emulation: ``time.perf_counter`` (snapshot offloads and fetches return complete there);
  ``offload`` and ``fetch`` vs one ``numpy_copy`` of the same bytes; ``roundtrip`` (offload then
  fetch: two copies) vs ``numpy_copy_x2`` (the same bytes copied there and back by numpy).
- cuda: ``torch.cuda.Event`` pairs on the current stream, which the library orders its copies
  on; ``device_to_host``/``host_to_device`` (pinned host tier) vs ``raw_memcpy`` (the core's
  unchunked copy on the current stream, device <-> pinned tensor), with ``torch_to_nonblocking``
  too; ``device_to_peer``/``peer_to_device`` on a same-device peer (the code path, not NVLink)
  vs a raw device-to-device copy.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..devices import cuda_usable
from ..handle import Handle
from ..manager import OffloadManager
from ..sizes import format_size, parse_size

__all__ = ["run_copy_benchmark", "format_table", "VerificationError", "EMULATION_LABEL",
           "PEER_LABEL"]

EMULATION_LABEL = "EMULATION backend (host memory, not a GPU)"
PEER_LABEL = "peer (same device: emulates the code path, not NVLink)"
FULL_SIZES = {"emulation": [(4 << 10) * 4**i for i in range(9)],   # 4 KiB .. 256 MiB
              "cuda": [(4 << 10) * 4**i for i in range(10)]}       # 4 KiB .. 1 GiB
QUICK_SIZES = [4 << 10, 256 << 10, 4 << 20, 64 << 20]
BATCH_BYTES = 16 << 20  # bytes copied per sample at least, for small sizes...
MAX_INNER = 256         # ...but at most this many copies per sample
_ALIGN = 256            # the pools' block alignment


class VerificationError(AssertionError):
    """A benchmarked copy produced wrong bytes."""


@dataclass
class _Case:
    """One method measured at one size; rows are emitted for each of its directions."""

    method: str
    directions: tuple[str, ...]
    baseline: str
    issue: Callable[[int], None]                        # timed: n copies
    verify: Callable[[], None]                          # after timing
    reset: Callable[[], None] = lambda: None            # before warm-up: scribble the output
    prepare: Callable[[int], None] = lambda k: None     # untimed, before each batch
    finish: Callable[[], None] = lambda: None           # untimed, after each batch


def _check(out: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # also for pinned host outputs of asynchronous copies
    if not torch.equal(out, expected):
        bad = (out != expected).nonzero()
        raise VerificationError(f"{what}: {bad.numel()} of {expected.numel()} bytes differ after "
                                f"timing (first at byte {int(bad[0])}); the copy is wrong")


def _free_all(m: OffloadManager, handles: list[Handle]) -> None:
    while handles:
        m.free(handles.pop())


def _check_tier(handles: list[Handle], tier: str, what: str) -> None:
    wrong = [h.tier for h in handles if h.tier != tier]
    if wrong:  # a spill to another tier would time the wrong path
        raise RuntimeError(f"{what}: a copy landed on the {wrong[0]} tier, not {tier}; the pools "
                           "are too small for this benchmark")


def _copy_case(method: str, directions: tuple[str, ...], baseline: str, copy: Callable[[], Any],
               out: torch.Tensor, expected: torch.Tensor, what: str) -> _Case:
    def issue(k: int) -> None:
        for _ in range(k):
            copy()
    return _Case(method, directions, baseline, issue, reset=out.zero_,
                 verify=lambda: _check(out, expected, what))


def _offload_case(m: OffloadManager, src: torch.Tensor, out: torch.Tensor,
                  directions: tuple[str, ...], baseline: str, tier: str, what: str) -> _Case:
    """Snapshot offloads; the last handle of a batch is kept to verify its bytes by fetching."""
    live: list[Handle] = []

    def issue(k: int) -> None:
        for _ in range(k):
            live.append(m.offload(src, release=False))

    def finish() -> None:
        _check_tier(live, tier, what)
        last = live.pop()
        _free_all(m, live)
        live.append(last)

    def verify() -> None:
        last = live.pop()
        _free_all(m, live)
        out.zero_()
        m.fetch(last, out=out)
        _check(out, src, what)

    return _Case("aqua_offload", directions, baseline, issue, verify,
                 prepare=lambda k: _free_all(m, live), finish=finish)


def _fetch_case(m: OffloadManager, src: torch.Tensor, out: torch.Tensor,
                directions: tuple[str, ...], baseline: str, tier: str, what: str) -> _Case:
    """Fetches into ``out=`` of handles offloaded (untimed) before each batch."""
    pending: list[Handle] = []

    def prepare(k: int) -> None:
        pending[:] = [m.offload(src, release=False) for _ in range(k)]
        _check_tier(pending, tier, what)

    def issue(k: int) -> None:
        for h in pending:
            m.fetch(h, out=out)

    return _Case("aqua_offload", directions, baseline, issue, reset=out.zero_, prepare=prepare,
                 finish=pending.clear, verify=lambda: _check(out, src, what))


def _random_bytes(n: int, seed: int) -> torch.Tensor:
    # Allocated by torch, like the tensors users offload (numpy's allocator differs: huge pages).
    t = torch.empty(n, dtype=torch.uint8)
    t.numpy()[:] = np.frombuffer(np.random.default_rng(seed).bytes(n), dtype=np.uint8)
    return t


def _emulation_cases(n: int, m: OffloadManager) -> list[_Case]:
    src = _random_bytes(n, seed=n)
    out = torch.empty(n, dtype=torch.uint8)
    src_np, out_np = src.numpy(), out.numpy()
    size = format_size(n)
    tmp_np = np.empty_like(src_np)

    def there_and_back() -> None:
        np.copyto(tmp_np, src_np)
        np.copyto(out_np, tmp_np)

    return [
        _copy_case("numpy_copy", ("offload", "fetch"), "numpy_copy",
                   lambda: np.copyto(out_np, src_np), out, src, f"numpy_copy {size}"),
        _copy_case("numpy_copy_x2", ("roundtrip",), "numpy_copy_x2", there_and_back, out, src,
                   f"numpy_copy_x2 {size}"),
        _offload_case(m, src, out, ("offload",), "numpy_copy", "peer", f"offload {size}"),
        _fetch_case(m, src, out, ("fetch",), "numpy_copy", "peer", f"fetch {size}"),
        _copy_case("aqua_offload", ("roundtrip",), "numpy_copy_x2",
                   lambda: m.fetch(m.offload(src, release=False), out=out), out, src,
                   f"roundtrip {size}"),
    ]


def _cuda_cases(n: int, host_m: OffloadManager, peer_m: OffloadManager) -> list[_Case]:
    dev = host_m.device
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=dev)
    out = torch.empty_like(src)
    h_src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    h_src.copy_(src)  # the same bytes as src, in pinned memory
    h_out = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    raw = host_m._store.raw_copy  # unchunked copy on the given stream: the baseline

    def stream() -> int:
        return int(torch.cuda.current_stream(dev).cuda_stream)

    d2h, h2d, size = ("device_to_host",), ("host_to_device",), format_size(n)
    return [
        _copy_case("raw_memcpy", d2h, "raw_memcpy",
                   lambda: raw(h_out.data_ptr(), src.data_ptr(), n, stream()), h_out, h_src,
                   f"raw_memcpy D2H {size}"),
        _copy_case("torch_to_nonblocking", d2h, "raw_memcpy",
                   lambda: h_out.copy_(src, non_blocking=True), h_out, h_src,
                   f"torch_to_nonblocking D2H {size}"),
        _offload_case(host_m, src, out, d2h, "raw_memcpy", "host", f"offload D2H {size}"),
        _copy_case("raw_memcpy", h2d, "raw_memcpy",
                   lambda: raw(out.data_ptr(), h_src.data_ptr(), n, stream()), out, src,
                   f"raw_memcpy H2D {size}"),
        _copy_case("torch_to_nonblocking", h2d, "raw_memcpy",
                   lambda: out.copy_(h_src, non_blocking=True), out, src,
                   f"torch_to_nonblocking H2D {size}"),
        _fetch_case(host_m, src, out, h2d, "raw_memcpy", "host", f"fetch H2D {size}"),
        _copy_case("raw_memcpy", ("device_to_peer", "peer_to_device"), "raw_memcpy",
                   lambda: raw(out.data_ptr(), src.data_ptr(), n, stream()), out, src,
                   f"raw_memcpy D2D {size}"),
        _offload_case(peer_m, src, out, ("device_to_peer",), "raw_memcpy", "peer",
                      f"offload same-device peer {size}"),
        _fetch_case(peer_m, src, out, ("peer_to_device",), "raw_memcpy", "peer",
                    f"fetch same-device peer {size}"),
    ]


def _host_timer(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _cuda_timer(fn: Callable[[], None]) -> float:
    stream = torch.cuda.current_stream()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    stream.synchronize()  # nothing earlier (e.g. a batch's untimed preparation) is in the sample
    start.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _inner(n: int) -> int:
    return max(1, min(MAX_INNER, BATCH_BYTES // n))


def _measure(case: _Case, timer: Callable[[Callable[[], None]], float], n: int, samples: int,
             warmup: int) -> list[float]:
    """Seconds per copy of each sample (warm-up batches dropped); verifies after timing."""
    k = _inner(n)
    case.reset()
    times = []
    for i in range(warmup + samples):
        case.prepare(k)
        elapsed = timer(lambda: case.issue(k))
        case.finish()
        if i >= warmup:
            times.append(elapsed / k)
    case.verify()
    return times


class _Progress:
    """tqdm when installed, else a counter on stderr; ``begin`` names the case being measured."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._total, self._done, self._enabled, self._bar = total, 0, enabled, None
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=total, file=sys.stderr, leave=False, disable=not enabled)
        except ImportError:
            pass

    def begin(self, label: str) -> None:
        if self._bar is not None:
            self._bar.set_description(label)
        elif self._enabled:
            print(f"\r[{self._done + 1}/{self._total}] {label:<56}", end="", file=sys.stderr,
                  flush=True)

    def end(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.update()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._enabled:
            sys.stderr.write("\r" + " " * 72 + "\r")


def run_copy_benchmark(sizes: Sequence[int | str] | None = None, *, backend: str = "auto",
                       quick: bool = False, samples: int | None = None, warmup: int = 1,
                       progress: bool = False) -> dict[str, Any]:
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
        untimed batches first; progress on stderr.

    Returns
    -------
    dict
        ``{"device", "backend", "label", "rows", "notes", "config"}`` (``label``: the
        emulation label or None; ``notes``: labels per direction); each row has ``method``,
        ``direction``, ``bytes``, ``median_s``, ``min_s``, ``max_s``, ``gbps``
        (bytes / median_s / 1e9), ``baseline``, ``ratio`` (baseline median_s / median_s),
        ``device``, ``backend``.

    Raises
    ------
    VerificationError
        A copy produced wrong bytes.
    """
    if backend == "auto":
        backend = "cuda" if cuda_usable() else "emulation"
    if backend not in FULL_SIZES:
        raise ValueError(f"backend must be 'auto', 'emulation' or 'cuda', got {backend!r}")
    samples = (5 if quick else 7) if samples is None else samples
    nbytes = [parse_size(s, name="size") for s in sizes or (QUICK_SIZES if quick
                                                            else FULL_SIZES[backend])]
    if samples < 3 or warmup < 0 or min(nbytes) <= 0:
        raise ValueError(f"need samples >= 3, warmup >= 0 and sizes > 0, got {samples}, "
                         f"{warmup} and {nbytes}")
    # Room for the largest batch of live blocks, so no copy ever spills to another tier.
    pool = max(_inner(n) * -(-n // _ALIGN) * _ALIGN for n in nbytes) + (1 << 20)
    managers: list[OffloadManager] = []
    try:
        if backend == "cuda":
            index = torch.cuda.current_device()
            managers.append(OffloadManager(device=index, peers=None, host_bytes=pool))
            managers.append(OffloadManager(device=index, peers=[index], peer_bytes=pool,
                                           host_bytes=0))
            device = torch.cuda.get_device_name(index)
        else:
            managers.append(OffloadManager(device="cpu", peers="auto", peer_bytes=pool,
                                           host_bytes=pool))
            device = f"{platform.machine() or 'cpu'} CPU x{os.cpu_count()} (emulation)"
        rows = _run_sizes(backend, managers, device, nbytes, samples, warmup, progress)
    finally:
        for m in managers:
            m.close()
    return {"device": device, "backend": backend,
            "label": EMULATION_LABEL if backend == "emulation" else None, "rows": rows,
            "notes": {"device_to_peer": PEER_LABEL, "peer_to_device": PEER_LABEL}
            if backend == "cuda" else {},
            "config": {"sizes": nbytes, "samples": samples, "warmup": warmup}}


def _run_sizes(backend: str, managers: list[OffloadManager], device: str, nbytes: list[int],
               samples: int, warmup: int, progress: bool) -> list[dict[str, Any]]:
    timer = _cuda_timer if backend == "cuda" else _host_timer
    rows: list[dict[str, Any]] = []
    bar = _Progress(len(nbytes) * (9 if backend == "cuda" else 4), progress)
    try:
        for n in nbytes:
            cases = _cuda_cases(n, *managers) if backend == "cuda" else \
                _emulation_cases(n, managers[0])
            rows += _measure_size(n, cases, timer, samples, warmup, device, backend, bar)
            del cases  # drop this size's buffers before allocating the next
    finally:
        bar.close()
    return rows


def _measure_size(n: int, cases: list[_Case], timer: Callable[[Callable[[], None]], float],
                  samples: int, warmup: int, device: str, backend: str,
                  bar: _Progress) -> list[dict[str, Any]]:
    """Measure every case at size ``n``; one row per case and direction."""
    measured = []
    for case in cases:
        bar.begin(f"{format_size(n)} {'/'.join(case.directions)} {case.method}")
        measured.append((case, _measure(case, timer, n, samples, warmup)))
        bar.end()
    median = {(d, c.method): statistics.median(t) for c, t in measured for d in c.directions}
    return [{"method": c.method, "direction": d, "bytes": n, "median_s": median[d, c.method],
             "min_s": min(t), "max_s": max(t), "gbps": n / median[d, c.method] / 1e9,
             "baseline": c.baseline, "ratio": median[d, c.baseline] / median[d, c.method],
             "device": device, "backend": backend}
            for c, t in measured for d in c.directions]


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

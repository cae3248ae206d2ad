"""Copy while a matmul runs: the bandwidth a page-out keeps next to compute, and what it costs
the compute (the situation of a time-sliced GPU: one workload pages out while another runs).

Two experiments at one size (the largest of the sweep, clamped to 16 .. 64 MiB: past the copy
engine's steady state, and long enough for the background to cover a batch):

- ``overlap_copy``: ``aqua_offload`` to the host tier alone (the baseline) and while matmuls run
  (``aqua_offload+matmul``); ``ratio`` = the share of the bandwidth kept.
- ``overlap_compute``: a batch of matmuls alone (``matmul``, the baseline) and while offloads
  run (``matmul+aqua_offload``); ``ratio`` = alone / with = 1 / slowdown. ``bytes`` of these
  rows are the operand bytes one matmul reads and writes.

The background runs for the whole of each timed batch: on CUDA it is enqueued on a side stream
before the batch, sized from the foreground's time alone (twice it, plus one), and drained
after the batch, untimed; on emulation it is a thread that loops until the batch ends. Each
foreground is verified after timing: copies, and the matmul's result against the one computed
alone, bitwise (the same GEMM on the same inputs). On emulation the experiment runs torch with one
intra-op thread: the background thread's own OpenMP team would otherwise oversubscribe a small
machine and make the numbers about OpenMP spinning rather than about copies.
"""

from __future__ import annotations

import math
import statistics
import threading
from typing import Any, Callable

import torch

from ..manager import OffloadManager
from .copy_cases import offload_case
from .measure import Case, Timer, VerificationError, measure, random_bytes, row
from .models import cpu_threads

__all__ = ["BACKGROUND_COPIES", "overlap_bytes", "overlap_rows"]

OVERLAP_MIN_BYTES, OVERLAP_MAX_BYTES = 16 << 20, 64 << 20
BACKGROUND_COPIES = 10  # at most in flight on CUDA: the host pool needs room for them (+ 2)
MATMUL = {"cuda": (8192, torch.bfloat16), "emulation": (512, torch.float32)}


class _Background:
    """Work that runs while a foreground batch is timed (see the module docstring)."""

    def __init__(self, cuda: bool, device: torch.device, work: Callable[[], None],
                 unit_s: float, max_units: int) -> None:
        self._cuda, self._work, self._unit_s, self._max = cuda, work, unit_s, max_units
        self._stream = torch.cuda.Stream(device) if cuda else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: list[BaseException] = []

    def start(self, foreground_s: float) -> None:
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                for _ in range(min(self._max, math.ceil(2 * foreground_s / self._unit_s) + 1)):
                    self._work()
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="aqua-bench-background")
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._work()
        except BaseException as exc:  # re-raised by stop() on the benchmark's thread
            self._error.append(exc)

    def stop(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._error:
            raise self._error.pop()


def _with_background(case: Case, bg: _Background, foreground_s: float, method: str) -> Case:
    def prepare(k: int) -> None:
        case.prepare(k)
        bg.start(foreground_s * k)

    def finish() -> None:
        bg.stop()
        case.finish()

    return Case(method, case.directions, case.method, case.issue, case.verify, case.reset,
                prepare, finish)


def overlap_bytes(sizes: list[int]) -> int:
    """The size the experiment runs at, given the sweep's sizes."""
    return min(max(max(sizes), OVERLAP_MIN_BYTES), OVERLAP_MAX_BYTES)


def overlap_rows(backend: str, m: OffloadManager, n: int, samples: int, warmup: int,
                 timer: Timer, device: str) -> list[dict[str, Any]]:
    """Measure both experiments with ``m`` (which has a host tier) at ``n`` bytes."""
    with cpu_threads(m.device, 1):
        return _overlap_rows(backend, m, n, samples, warmup, timer, device)


def _overlap_rows(backend: str, m: OffloadManager, n: int, samples: int, warmup: int,
                  timer: Timer, device: str) -> list[dict[str, Any]]:
    cuda = backend == "cuda"
    dim, dtype = MATMUL[backend]
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(dim, dim, generator=gen).to(m.device, dtype)
    b = torch.randn(dim, dim, generator=gen).to(m.device, dtype)
    c = torch.empty_like(a)
    expected = a @ b
    src = random_bytes(n, seed=3 * n + 1).to(m.device)
    out, bg_src = torch.empty_like(src), random_bytes(n, seed=3 * n + 2).to(m.device)

    def verify_matmul() -> None:
        if not torch.equal(c, expected):
            raise VerificationError("matmul next to copies gave a different result")

    def matmuls(k: int) -> None:
        for _ in range(k):
            torch.mm(a, b, out=c)

    def offload_and_free() -> None:
        m.free(m.offload(bg_src, release=False))  # a freed block is reused only after its copy

    copy = offload_case(m, src, out, "overlap_copy", "host", f"overlap copy {n}")
    mm = Case("matmul", ("overlap_compute",), "matmul", matmuls, verify_matmul)
    # Alone first; the matmul batch is sized to span about four copies.
    copy_alone = measure(copy, timer, n, samples, warmup, inner=1)
    one_mm = statistics.median(measure(mm, timer, 1, 3, 1, inner=1))
    k_mm = max(1, round(4 * statistics.median(copy_alone) / one_mm))
    mm_alone = measure(mm, timer, 1, samples, warmup, inner=k_mm)
    copy_with = measure(
        _with_background(copy, _Background(cuda, m.device, lambda: matmuls(1), one_mm, 1 << 10),
                         statistics.median(copy_alone), "aqua_offload+matmul"),
        timer, n, samples, warmup, inner=1)
    mm_with = measure(
        _with_background(mm, _Background(cuda, m.device, offload_and_free,
                                         statistics.median(copy_alone), BACKGROUND_COPIES),
                         statistics.median(mm_alone), "matmul+aqua_offload"),
        timer, 1, samples, warmup, inner=k_mm)
    mm_bytes = 3 * dim * dim * a.element_size()
    base_copy, base_mm = statistics.median(copy_alone), statistics.median(mm_alone)
    return [row("aqua_offload", "overlap_copy", n, copy_alone, "aqua_offload", base_copy,
                device, backend),
            row("aqua_offload+matmul", "overlap_copy", n, copy_with, "aqua_offload", base_copy,
                device, backend),
            row("matmul", "overlap_compute", mm_bytes, mm_alone, "matmul", base_mm, device,
                backend),
            row("matmul+aqua_offload", "overlap_compute", mm_bytes, mm_with, "matmul", base_mm,
                device, backend)]

"""The measurement method shared by the benchmarks (DESIGN.md section 8, after NVIDIA nvbandwidth).

A :class:`Case` is one method measured at one size. :func:`measure` warms it up, times
``samples`` batches of copies (a batch is many copies when they are small, so a sample is well
above the timer's resolution), divides each by its count, then verifies the output bitwise.
Work a batch needs that is not the measured copy (offloading the handles a fetch batch fetches,
freeing the handles an offload batch made) runs in ``prepare``/``finish``, outside the timing.

Timers: :func:`cuda_timer` records a pair of ``torch.cuda.Event`` on the current stream, after
synchronizing it so that nothing earlier is in the sample; a method that uses other streams
must order them after the start (``wait_stream``) and order the current stream after them
before it returns. :func:`host_timer` is ``time.perf_counter`` (the emulation backend, whose
snapshot offloads and fetches return complete).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["Case", "EMULATION_LABEL", "Progress", "VerificationError", "check_equal",
           "cuda_timer", "host_timer", "inner_count", "measure", "random_bytes", "row"]

EMULATION_LABEL = "EMULATION backend (host memory, not a GPU)"
BATCH_BYTES = 16 << 20  # bytes copied per sample at least, for small sizes...
MAX_INNER = 256         # ...but at most this many copies per sample

Timer = Callable[[Callable[[], None]], float]


class VerificationError(AssertionError):
    """A benchmarked copy produced wrong bytes."""


@dataclass
class Case:
    """One method measured at one size; a row is emitted for each of its directions."""

    method: str
    directions: tuple[str, ...]
    baseline: str
    issue: Callable[[int], None]                        # timed: n copies
    verify: Callable[[], None]                          # after timing
    reset: Callable[[], None] = lambda: None            # untimed, before each batch: scribble
                                                        # the output
    prepare: Callable[[int], None] = lambda k: None     # untimed, before each batch
    finish: Callable[[], None] = lambda: None           # untimed, after each batch


def check_equal(out: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Raise :class:`VerificationError` unless ``out`` holds the bytes of ``expected``."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # also for pinned host outputs of asynchronous copies
    out = out.to(expected.device)
    if not torch.equal(out, expected):
        bad = (out != expected).flatten().nonzero()
        first = int(bad[0]) if bad.numel() else -1
        raise VerificationError(f"{what}: {bad.numel()} of {expected.numel()} bytes differ after "
                                f"timing (first at byte {first}); the copy is wrong")


def random_bytes(n: int, seed: int) -> torch.Tensor:
    """``n`` random bytes in a CPU tensor (never zeros: DESIGN.md section 8)."""
    # Allocated by torch, like the tensors users offload (numpy's allocator differs: huge pages).
    t = torch.empty(n, dtype=torch.uint8)
    t.numpy()[:] = np.frombuffer(np.random.default_rng(seed).bytes(n), dtype=np.uint8)
    return t


def host_timer(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cuda_timer(fn: Callable[[], None]) -> float:
    stream = torch.cuda.current_stream()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    stream.synchronize()  # nothing earlier (e.g. a batch's untimed preparation) is in the sample
    start.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def inner_count(n: int) -> int:
    """Copies of ``n`` bytes per sample."""
    return max(1, min(MAX_INNER, BATCH_BYTES // max(n, 1)))


def measure(case: Case, timer: Timer, n: int, samples: int, warmup: int,
            inner: int | None = None) -> list[float]:
    """Seconds per copy of each sample (warm-up batches dropped); verifies after timing."""
    k = inner_count(n) if inner is None else inner
    times = []
    for i in range(warmup + samples):
        case.reset()  # every batch: a later wrong copy cannot hide behind an earlier right one
        case.prepare(k)
        elapsed = timer(lambda: case.issue(k))
        case.finish()
        if i >= warmup:
            times.append(elapsed / k)
    case.verify()
    return times


def row(method: str, direction: str, nbytes: int, times: list[float], baseline: str,
        base_median: float, device: str, backend: str) -> dict[str, Any]:
    """One result row: ``gbps = bytes / median_s / 1e9``, ``ratio = baseline median / median``."""
    med = statistics.median(times)
    return {"method": method, "direction": direction, "bytes": nbytes, "median_s": med,
            "min_s": min(times), "max_s": max(times), "gbps": nbytes / med / 1e9,
            "baseline": baseline, "ratio": base_median / med, "device": device,
            "backend": backend}


class Progress:
    """tqdm when installed, else a counter on stderr; ``begin`` names the step being measured."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._total, self._done, self._enabled, self._bar = total, 0, enabled, None
        if not enabled:
            return
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=total, file=sys.stderr, leave=False)
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

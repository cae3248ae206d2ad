"""Elastic lending: lend what a device has free above a reserve, take it back when it is needed.

A :class:`ReserveWatcher` polls a free-memory function (the device's, or any function a test
injects) and keeps the lender's arena at "whatever is free above ``keep``": it grows the arena
by whole segments when at least one more segment is free above the reserve, and reclaims
(Note [Reclaim] of :mod:`.lender`) as soon as free memory falls below it. Memory already on its
way back (pending reclaims) counts as returned, so one shortage is not reclaimed twice.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Callable

from ..errors import InvalidArgumentError, OffloadError
from ..sizes import parse_size
from .lender import Lender

if TYPE_CHECKING:
    from .ledger_lending import LedgerLender

__all__ = ["ReserveWatcher", "host_free_memory", "cuda_free_memory"]


def host_free_memory() -> int:
    """Bytes of host memory available to new allocations (``MemAvailable`` in /proc/meminfo)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise InvalidArgumentError("/proc/meminfo has no MemAvailable: pass free_memory=")


def cuda_free_memory(device: int) -> Callable[[], int]:
    """A function returning the free memory of CUDA ``device`` (``torch.cuda.mem_get_info``)."""
    def free() -> int:
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    return free


class ReserveWatcher:
    """Keep ``lender``'s arena at the free memory above ``keep``.

    Parameters
    ----------
    lender : Lender or LedgerLender
        The lender whose arena grows and shrinks: a NIXL :class:`~.lender.Lender`, or a
        :class:`~.ledger_lending.LedgerLender` whose offers in the lending ledger do (pass
        its ``free_memory(device_free)`` as ``free_memory``).
    keep : int or str
        Reserve the device keeps for itself.
    free_memory : callable
        ``free_memory() -> int``: free bytes of the device now (memory the arena already holds
        is not free).
    max_bytes : int or str, optional
        Never lend more than this in all.
    interval_s : float
        Poll period of :meth:`start`'s thread.
    """

    def __init__(self, lender: Lender | LedgerLender, keep: int | str,
                 free_memory: Callable[[], int], *,
                 max_bytes: int | str | None = None, interval_s: float = 1.0) -> None:
        self.lender = lender
        self.keep = parse_size(keep, name="keep")
        self.max_bytes = None if max_bytes is None else parse_size(max_bytes, name="max_bytes")
        if not callable(free_memory):
            raise InvalidArgumentError("free_memory must be callable")
        if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not (
                0 < interval_s < 86400):
            raise InvalidArgumentError(f"interval_s must be positive, got {interval_s!r}")
        self.free_memory = free_memory
        self.interval_s = float(interval_s)
        self.stats = {"steps": 0, "grown_bytes": 0, "reclaim_asks": 0, "asked_bytes": 0,
                      "errors": 0, "last_free": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self) -> str:
        """One decision: ``"grow"``, ``"reclaim"`` or ``"steady"``."""
        free = int(self.free_memory())
        seg = self.lender.segment_bytes
        st = self.lender.stats()
        self.stats["steps"] += 1
        self.stats["last_free"] = free
        if free < self.keep:
            deficit = self.keep - free - st["reclaim_pending_bytes"]
            if deficit > 0 and st["lendable_bytes"] > 0:
                ticket = self.lender.reclaim(min(deficit, st["lendable_bytes"]))
                self.stats["reclaim_asks"] += 1
                self.stats["asked_bytes"] += ticket.nbytes
                return "reclaim"
            return "steady"
        spare = free - self.keep
        if self.max_bytes is not None:
            spare = min(spare, self.max_bytes - st["arena_bytes"])
        if spare >= seg:
            try:
                added = self.lender.grow(spare)
            except OffloadError:  # the device said free, the allocator disagreed: next time
                self.stats["errors"] += 1
                return "steady"
            self.stats["grown_bytes"] += added
            return "grow" if added else "steady"
        return "steady"

    def start(self) -> "ReserveWatcher":
        """Step every ``interval_s`` in a background thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="aqua-remote-reserve",
                                            daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a failing probe must not stop the watcher
                self.stats["errors"] += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

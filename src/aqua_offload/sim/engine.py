"""Discrete-event engine: a simulated clock and a queue of timed callbacks.

Note [Event order]
Events run in order of (time, priority, sequence number). The sequence number is the order of
scheduling, so two events at the same time and priority run first-scheduled-first: a run is a
pure function of its inputs (no dict or set order, no wall clock, no randomness here). The
clock only moves forward: scheduling into the past is an error, because it would mean a
component computed a completion time from stale state.

Cancelled events stay in the heap and are skipped when they reach the top (lazy deletion),
which keeps ``cancel`` O(1); links reschedule their next completion on every change, so
cancellation is the common case.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable

from ..errors import InvalidArgumentError

__all__ = ["Event", "EventEngine"]


class Event:
    """A scheduled callback (returned by :meth:`EventEngine.schedule`; pass it to ``cancel``)."""

    __slots__ = ("time", "priority", "seq", "fn", "args", "cancelled")

    def __init__(self, time: float, priority: int, seq: int, fn: Callable[..., Any],
                 args: tuple[Any, ...]) -> None:
        self.time = time
        self.priority = priority
        self.seq = seq
        self.fn = fn
        self.args = args
        self.cancelled = False

    def __lt__(self, other: "Event") -> bool:
        return (self.time, self.priority, self.seq) < (other.time, other.priority, other.seq)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"<Event t={self.time:.9f} prio={self.priority} #{self.seq} {name}>"


class EventEngine:
    """The simulated clock (:attr:`now`, seconds) and its event queue."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)
        self._heap: list[Event] = []
        self._seq = itertools.count()
        self.processed = 0

    def schedule_at(self, time: float, fn: Callable[..., Any], *args: Any,
                    priority: int = 0) -> Event:
        """Run ``fn(*args)`` at simulated ``time`` (>= now). Lower ``priority`` runs first
        among events at the same time."""
        if not time >= self.now:  # also rejects NaN
            raise InvalidArgumentError(
                f"cannot schedule an event at t={time!r}: the clock is at {self.now!r}")
        ev = Event(float(time), priority, next(self._seq), fn, args)
        heapq.heappush(self._heap, ev)
        return ev

    def schedule(self, delay: float, fn: Callable[..., Any], *args: Any,
                 priority: int = 0) -> Event:
        """Run ``fn(*args)`` ``delay`` seconds from now (``delay >= 0``)."""
        if not delay >= 0:
            raise InvalidArgumentError(f"delay must be >= 0, got {delay!r}")
        return self.schedule_at(self.now + delay, fn, *args, priority=priority)

    @staticmethod
    def cancel(event: Event | None) -> None:
        """Forget a scheduled event (no effect if it already ran or is None)."""
        if event is not None:
            event.cancelled = True

    def pending(self) -> int:
        """Events still to run (cancelled ones excluded)."""
        return sum(1 for ev in self._heap if not ev.cancelled)

    def step(self) -> bool:
        """Run the next event; False when none is left."""
        while self._heap:
            ev = heapq.heappop(self._heap)
            if ev.cancelled:
                continue
            self.now = ev.time
            self.processed += 1
            ev.fn(*ev.args)
            return True
        return False

    def run(self, until: float | None = None, max_events: int | None = None) -> float:
        """Run events in order until none is left, the next one lies after ``until`` (the
        clock then stops at ``until``), or ``max_events`` ran. Returns the clock."""
        ran = 0
        while self._heap:
            top = self._heap[0]
            if top.cancelled:
                heapq.heappop(self._heap)
                continue
            if until is not None and top.time > until:
                self.now = max(self.now, float(until))
                return self.now
            if max_events is not None and ran >= max_events:
                return self.now
            self.step()
            ran += 1
        if until is not None:
            self.now = max(self.now, float(until))
        return self.now

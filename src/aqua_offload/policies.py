"""Scheduling policies of the time slicer: pure, clock-free classes (the simulator reuses them).

A policy orders the *waiting* slices and decides when the running one should yield. It never
sleeps, locks or reads a clock: the caller passes run times in seconds. All methods are O(log n).

- ``fair``: CFS on virtual runtime (run time / weight) with a real priority queue. A newcomer
  starts at the current minimum virtual runtime, so it runs promptly but cannot starve slices
  that have been waiting (it gets no credit for the time before it arrived). Service is
  proportional to weight.
- ``rr``: round robin: a preempted slice goes to the back of a FIFO.
- ``fcfs``: first come, first served, run to completion (no preemption): the baseline.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
from abc import ABC, abstractmethod
from typing import Any, Hashable

from .errors import InvalidArgumentError

__all__ = ["SchedulingPolicy", "FairPolicy", "RoundRobinPolicy", "FCFSPolicy", "make_policy",
           "POLICY_NAMES"]


class SchedulingPolicy(ABC):
    """Orders waiting tasks. A task is any hashable the caller chooses (the slicer uses its
    ``Slice`` objects, the simulator its requests)."""

    name: str = ""
    preemptive: bool = True

    @abstractmethod
    def add(self, task: Hashable, weight: float = 1.0, running: Hashable | None = None) -> None:
        """A new task arrives; it waits until picked. ``running`` is the task holding the
        device (already charged up to now), if any."""

    @abstractmethod
    def requeue(self, task: Hashable) -> None:
        """A task that ran (and was charged) waits again."""

    @abstractmethod
    def pick(self) -> Hashable | None:
        """Remove and return the waiting task to run next (None if none waits)."""

    @abstractmethod
    def peek(self) -> Hashable | None:
        """The task ``pick`` would return, without removing it."""

    @abstractmethod
    def remove(self, task: Hashable) -> None:
        """Forget a task (finished, failed or cancelled), waiting or not."""

    @abstractmethod
    def waiting(self) -> int:
        """How many tasks wait."""

    def charge(self, task: Hashable, ran_s: float) -> None:
        """Account ``ran_s`` seconds of running to ``task``."""

    def should_yield(self, ran_in_turn_s: float, quantum_s: float) -> bool:
        """Whether the running task should give the device up at a yield point."""
        return self.preemptive and self.waiting() > 0 and ran_in_turn_s >= quantum_s

    def vruntime(self, task: Hashable) -> float:
        """Service received so far, as the policy counts it (for reports)."""
        return 0.0


class FairPolicy(SchedulingPolicy):
    """Completely fair scheduling on virtual runtime (run time / weight)."""

    name = "fair"

    def __init__(self) -> None:
        self._vr: dict[Hashable, float] = {}
        self._weight: dict[Hashable, float] = {}
        self._heap: list[tuple[float, int, Hashable]] = []
        self._queued: dict[Hashable, int] = {}  # task -> seq of its live heap entry
        self._seq = itertools.count()
        self._min_vr = 0.0  # never decreases: newcomers start here

    def _push(self, task: Hashable) -> None:
        seq = next(self._seq)
        self._queued[task] = seq
        heapq.heappush(self._heap, (self._vr[task], seq, task))

    def _clean(self) -> None:  # drop entries of removed or re-pushed tasks (lazy deletion)
        while self._heap and self._queued.get(self._heap[0][2]) != self._heap[0][1]:
            heapq.heappop(self._heap)

    def add(self, task: Hashable, weight: float = 1.0, running: Hashable | None = None) -> None:
        if task in self._vr:
            raise InvalidArgumentError(f"task {task!r} is already scheduled")
        self._weight[task] = _check_weight(weight)
        self._vr[task] = self._current_min(running)
        self._push(task)

    def _current_min(self, running: Hashable | None = None) -> float:
        """CFS's min_vruntime: the least of the running and the leftmost waiting task's virtual
        runtime, never decreasing."""
        self._clean()
        candidates = [self._heap[0][0]] if self._heap else []
        if running is not None and running in self._vr:
            candidates.append(self._vr[running])
        if candidates:
            self._min_vr = max(self._min_vr, min(candidates))
        return self._min_vr

    def requeue(self, task: Hashable) -> None:
        # A task that ran keeps what it was charged (no lift to the others' level: that would
        # erase weights and never pay back an overlong turn); only a long sleeper is lifted.
        self._vr[task] = max(self._vr[task], self._min_vr)
        self._push(task)

    def pick(self) -> Hashable | None:
        self._clean()
        if not self._heap:
            return None
        vr, _, task = heapq.heappop(self._heap)
        del self._queued[task]
        self._min_vr = max(self._min_vr, vr)
        return task

    def peek(self) -> Hashable | None:
        self._clean()
        return self._heap[0][2] if self._heap else None

    def remove(self, task: Hashable) -> None:
        self._queued.pop(task, None)
        self._vr.pop(task, None)
        self._weight.pop(task, None)

    def waiting(self) -> int:
        return len(self._queued)

    def charge(self, task: Hashable, ran_s: float) -> None:
        self._vr[task] += _check_run_time(ran_s) / self._weight[task]

    def vruntime(self, task: Hashable) -> float:
        return self._vr.get(task, 0.0)


class RoundRobinPolicy(SchedulingPolicy):
    """Round robin: FIFO order, a preempted task goes to the back."""

    name = "rr"

    def __init__(self) -> None:
        self._queue: collections.OrderedDict[Hashable, None] = collections.OrderedDict()
        self._known: set[Hashable] = set()
        self._ran: dict[Hashable, float] = {}

    def add(self, task: Hashable, weight: float = 1.0, running: Hashable | None = None) -> None:
        _check_weight(weight)
        if task in self._known:
            raise InvalidArgumentError(f"task {task!r} is already scheduled")
        self._known.add(task)
        self._ran[task] = 0.0
        self._queue[task] = None

    def requeue(self, task: Hashable) -> None:
        self._queue[task] = None

    def pick(self) -> Hashable | None:
        if not self._queue:
            return None
        return self._queue.popitem(last=False)[0]

    def peek(self) -> Hashable | None:
        return next(iter(self._queue), None)

    def remove(self, task: Hashable) -> None:
        self._queue.pop(task, None)
        self._known.discard(task)
        self._ran.pop(task, None)

    def waiting(self) -> int:
        return len(self._queue)

    def charge(self, task: Hashable, ran_s: float) -> None:
        self._ran[task] += _check_run_time(ran_s)

    def vruntime(self, task: Hashable) -> float:
        return self._ran.get(task, 0.0)


class FCFSPolicy(RoundRobinPolicy):
    """First come, first served; a task runs to completion (never asked to yield)."""

    name = "fcfs"
    preemptive = False


POLICY_NAMES = ("fair", "rr", "fcfs")
_POLICIES: dict[str, type[SchedulingPolicy]] = {
    "fair": FairPolicy, "rr": RoundRobinPolicy, "fcfs": FCFSPolicy}


def make_policy(policy: str | SchedulingPolicy) -> SchedulingPolicy:
    """A policy instance from its name (``"fair"``, ``"rr"``, ``"fcfs"``) or as given."""
    if isinstance(policy, SchedulingPolicy):
        return policy
    if not isinstance(policy, str) or policy not in _POLICIES:
        raise InvalidArgumentError(
            f"unknown scheduling policy {policy!r} (available: {', '.join(POLICY_NAMES)})")
    return _POLICIES[policy]()


def _as_float(value: Any) -> float | None:
    """A real number as a float (None for a bool, a non-number or an int too large)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range (2**1024)
        return None


MIN_WEIGHT = 1e-12  # run time / weight stays finite (1e-320 made it inf: every such task tied)


def _check_weight(weight: Any) -> float:
    w = _as_float(weight)
    if w is None or not 0 < w < math.inf:
        raise InvalidArgumentError(f"weight must be a positive finite number, got {weight!r}")
    if w < MIN_WEIGHT:
        raise InvalidArgumentError(f"weight must be at least {MIN_WEIGHT:g} (a virtual runtime "
                                   f"of run time / weight must stay finite), got {weight!r}")
    return w


def _check_run_time(ran_s: Any) -> float:
    r = _as_float(ran_s)
    if r is None or not 0 <= r < math.inf:
        raise InvalidArgumentError(f"run time must be a finite number >= 0, got {ran_s!r}")
    return r

"""TimeSlicer: fair, preemptive time-slicing of PyTorch workloads running in threads.

Each workload runs in its own thread inside ``with slicer.slice(state=..., name=...) as s:`` and
calls ``s.checkpoint()`` at yield points (or passes ``hooks=model`` to get one per forward call).
At most one slice runs at a time. At a yield point, if the slice's quantum expired and others
wait, the policy picks who runs next; the yielding slice pages its state out (unless a memory
budget lets it stay resident), waits for its turn, and pages it back in before ``checkpoint()``
returns: the workload resumes with every tensor where it was, same objects, same bytes.

Note [Who pages what]
A slice's tensors are only ever paged by the slice's own thread, on that thread's current
stream: that orders the copies after the slice's own last kernels (DESIGN.md section 4). A
parked thread does not just sleep: it serves requests the slicer posts for it (page out to meet
the memory budget, prefetch because it runs next) and then goes back to waiting.

Note [Turns]
``_running`` names the slice holding the turn; it is set when the turn is *granted*, before the
thread wakes, so exactly one slice holds it at any time. A slice gives the turn away only from
its own thread (checkpoint, exit); a slice that fails while waiting never held it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Iterator

import torch

from .errors import InvalidArgumentError, OffloadError, OutOfMemoryError
from .handle import Handle
from .manager import OffloadManager
from .policies import SchedulingPolicy, make_policy
from .sizes import parse_size
from .state import collect_tensors

__all__ = ["TimeSlicer", "Slice", "SlicerClosedError"]


class SlicerClosedError(OffloadError):
    """The slicer was closed while this slice waited for its turn (its state was restored)."""


class Slice:
    """One workload's membership in a :class:`TimeSlicer` (made by ``TimeSlicer.slice``).

    Attributes
    ----------
    name, weight : str, float
    run_s, wait_s : float
        Time holding the turn, and time waiting for it (arrival included).
    preemptions : int
        Times the slice yielded the turn to another.
    bytes_paged_out, bytes_paged_in : int
    time_to_first_run_s : float or None
        From entering the slice to its first turn (the TTFT analogue).
    """

    _aqua_not_state = True  # never walked as part of a workload state (state.py)

    def __init__(self, slicer: "TimeSlicer", state: Any, name: str, weight: float) -> None:
        self.slicer = slicer
        self.state = state
        self.name = name
        self.weight = weight
        self.run_s = 0.0
        self.wait_s = 0.0
        self.preemptions = 0
        self.bytes_paged_out = 0
        self.bytes_paged_in = 0
        self.time_to_first_run_s: float | None = None
        self.status = "waiting"  # waiting | running | done | failed
        self._arrival = 0.0
        self._turn_start = 0.0  # when its current turn began (for the quantum)
        self._charged_at = 0.0  # run time before this was charged to the policy
        self._wait_start = 0.0
        self._granted = False
        self._thread = threading.get_ident()
        self._handles: list[Handle] | None = None  # paged-out state
        self._resident_bytes = 0
        self._last_run = 0.0
        self._want_page_out = False
        self._want_prefetch = False

    def checkpoint(self) -> None:
        """A yield point: returns at once unless the quantum expired and others wait; then
        pages the state out (as needed), waits for the turn and pages it back in."""
        self.slicer._checkpoint(self)

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight, "status": self.status,
                "run_s": self.run_s, "wait_s": self.wait_s, "preemptions": self.preemptions,
                "bytes_paged_out": self.bytes_paged_out, "bytes_paged_in": self.bytes_paged_in,
                "time_to_first_run_s": self.time_to_first_run_s}

    def __repr__(self) -> str:
        return f"<Slice {self.name!r} {self.status} run={self.run_s:.3f}s wait={self.wait_s:.3f}s>"


class TimeSlicer:
    """Time-slices workloads (threads) on one device with a fair scheduler.

    Parameters
    ----------
    quantum_ms : float
        How long a slice runs before it yields at its next checkpoint, if others wait.
    manager : OffloadManager, optional
        Where preempted state is paged out; default: the module's manager of the state's device.
    policy : {"fair", "rr", "fcfs"} or SchedulingPolicy
        ``fair`` (CFS on run time / weight), ``rr`` (round robin), ``fcfs`` (run to completion).
    memory_budget : int or str, optional
        Bytes of preempted state allowed to stay resident; the least recently run are paged
        out beyond it. None: every preempted slice is paged out.
    clock : callable, optional
        Seconds as a float (default ``time.monotonic``); injectable for tests.
    parameters : bool
        Page out ``nn.Module`` parameters too (default: buffers only).
    """

    _aqua_not_state = True  # never walked as part of a workload state (state.py)

    def __init__(self, quantum_ms: float = 20.0, manager: OffloadManager | None = None,
                 policy: str | SchedulingPolicy = "fair", memory_budget: int | str | None = None,
                 clock: Callable[[], float] = time.monotonic, parameters: bool = False) -> None:
        if isinstance(quantum_ms, bool) or not isinstance(quantum_ms, (int, float)) \
                or not quantum_ms >= 0:
            raise InvalidArgumentError(f"quantum_ms must be a number >= 0, got {quantum_ms!r}")
        if manager is not None and not isinstance(manager, OffloadManager):
            raise InvalidArgumentError(f"manager must be an OffloadManager, got {manager!r}")
        self.quantum_s = float(quantum_ms) / 1e3
        self.manager = manager
        self.policy = make_policy(policy)
        self.memory_budget = None if memory_budget is None else \
            parse_size(memory_budget, name="memory_budget")
        self.parameters = parameters
        self._clock = clock
        self._cv = threading.Condition()
        self._running: Slice | None = None  # LOCK: _cv (Note [Turns])
        self._slices: list[Slice] = []      # LOCK: _cv
        self._finished: list[Slice] = []    # LOCK: _cv
        self._local = threading.local()
        self._closed = False

    # -- entering and leaving --------------------------------------------------------------
    @contextlib.contextmanager
    def slice(self, state: Any = None, name: str | None = None, weight: float = 1.0,
              hooks: torch.nn.Module | None = None) -> Iterator[Slice]:
        """Run the body as a time-sliced workload (use it inside the workload's thread).

        Parameters
        ----------
        state : object
            What to page out when preempted (see :mod:`aqua_offload.state`).
        name : str, optional
        weight : float
            Share of the device under ``fair`` (a weight-2 slice gets twice the service).
        hooks : nn.Module, optional
            Install a forward pre-hook: every forward call of the module in this thread is a
            yield point (a HF ``generate`` loop gets one per token). Removed on exit.
        """
        if getattr(self._local, "slice", None) is not None:
            raise InvalidArgumentError("nested slices: this thread is already inside a slice")
        s = Slice(self, state, name or f"slice-{id(state):x}", weight)
        with self._cv:
            if self._closed:
                raise SlicerClosedError("the TimeSlicer is closed")
            now = self._clock()
            if self._running is not None:  # charge it up to now: the newcomer starts level
                self._charge_locked(self._running, now)
            self.policy.add(s, weight, running=self._running)  # validates the weight
            s._arrival = s._wait_start = now
            self._slices.append(s)
            if self._running is None:
                self._grant_next_locked()
        self._local.slice = s
        handle = None
        try:
            self._wait_for_turn(s)
            if hooks is not None:
                handle = hooks.register_forward_pre_hook(self._hook_for(s))
            yield s
        except BaseException:
            self._leave(s, failed=True)
            raise
        else:
            self._leave(s, failed=False)
        finally:
            if handle is not None:
                handle.remove()
            self._local.slice = None

    def _hook_for(self, s: Slice) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            if getattr(self._local, "slice", None) is s:  # a shared model: only this thread's
                s.checkpoint()
        return hook

    def _charge_locked(self, s: Slice, now: float) -> None:
        if s.status != "running":  # granted but still paging in (or paging out): not running
            return
        ran = max(0.0, now - s._charged_at)
        s.run_s += ran
        self.policy.charge(s, ran)
        s._charged_at = now

    def _leave(self, s: Slice, failed: bool) -> None:
        now = self._clock()
        with self._cv:
            self.policy.remove(s)  # first: the turn must not go back to a leaving slice
            if self._running is s:
                if s.status == "running":
                    s.run_s += max(0.0, now - s._charged_at)
                self._grant_next_locked()
            s.status = "failed" if failed else "done"
            self._slices.remove(s)
            self._finished.append(s)
            self._cv.notify_all()
        if s._handles is not None:  # failed while paged out: restore, never lose data
            self._page_in(s)
        s.state = None  # a finished slice keeps its stats, not its workload's memory

    # -- turns -----------------------------------------------------------------------------
    def _grant_next_locked(self) -> None:
        if self._closed:  # waiting slices raise SlicerClosedError instead of running
            self._running = None
            self._cv.notify_all()
            return
        nxt = self.policy.pick()
        self._running = nxt
        if nxt is not None:
            nxt._granted = True
            self._cv.notify_all()

    def _wait_for_turn(self, s: Slice) -> None:
        """Park until granted, serving page-out/prefetch requests; then page in and run."""
        with self._cv:
            while not s._granted:
                if self._closed:
                    raise SlicerClosedError(f"the TimeSlicer was closed while {s.name!r} waited")
                if s._want_page_out or s._want_prefetch:
                    out, pre = s._want_page_out, s._want_prefetch
                    s._want_page_out = s._want_prefetch = False
                    self._cv.release()
                    try:
                        if out:
                            self._page_out(s)
                        if pre:
                            self._prefetch(s)
                    finally:
                        self._cv.acquire()
                    continue
                self._cv.wait()
            s._granted = False
            s._want_page_out = s._want_prefetch = False  # stale requests of the wait that ended
            now = self._clock()
            s.wait_s += now - s._wait_start
            if s.time_to_first_run_s is None:
                s.time_to_first_run_s = now - s._arrival
        if s._handles is not None:
            self._page_in(s)
        with self._cv:
            s.status = "running"
            s._turn_start = s._charged_at = self._clock()
            self._ask_next_to_prefetch_locked()

    def _checkpoint(self, s: Slice) -> None:
        if getattr(self._local, "slice", None) is not s:
            raise InvalidArgumentError("checkpoint() called outside its slice (another thread, "
                                       "or after the slice ended)")
        now = self._clock()
        with self._cv:
            if self._running is not s:
                raise InvalidArgumentError("checkpoint(): this slice does not hold the turn")
            if self._closed or not self.policy.should_yield(now - s._turn_start, self.quantum_s):
                return  # closed: the running slice finishes its work normally
            self._charge_locked(s, now)
            self.policy.requeue(s)
            if self.policy.peek() is s:  # still first in line: keep running
                self.policy.pick()
                s._turn_start = now
                return
            s.preemptions += 1
            s.status = "waiting"
            s._last_run = s._wait_start = now
            page_out_now = self.memory_budget is None
        if page_out_now:
            self._page_out(s)
        else:  # only the owner walks its state (Note [Who pages what]); the budget reads this
            s._resident_bytes = sum(t.untyped_storage().nbytes() for t in self._tensors(s))
        with self._cv:
            self._grant_next_locked()
            if self.memory_budget is not None:
                self._enforce_budget_locked()
        self._wait_for_turn(s)

    def _enforce_budget_locked(self) -> None:
        """Ask the least recently run preempted slices to page out until the rest fits."""
        resident = [x for x in self._slices if x is not self._running and x.status == "waiting"
                    and x._handles is None and x.time_to_first_run_s is not None]
        total = sum(x._resident_bytes for x in resident)
        for x in sorted(resident, key=lambda x: x._last_run):
            if total <= self.memory_budget:
                break
            x._want_page_out = True
            total -= x._resident_bytes
        self._cv.notify_all()

    def _ask_next_to_prefetch_locked(self) -> None:
        nxt = self.policy.peek()
        if nxt is not None and nxt._handles is not None:
            nxt._want_prefetch = True
            self._cv.notify_all()

    # -- paging (always in the slice's own thread: Note [Who pages what]) --------------------
    def _tensors(self, s: Slice) -> list[torch.Tensor]:
        if s.state is None:
            return []
        device = self._manager_for(s).device
        return [t for t in collect_tensors(s.state, device, parameters=self.parameters)
                if t.untyped_storage().nbytes() > 0]

    def _manager_for(self, s: Slice) -> OffloadManager:
        if self.manager is not None:
            return self.manager
        from . import default_manager  # the module's manager of the state's device
        found = [t for t in collect_tensors(s.state, None, parameters=self.parameters)
                 if t.device.type != "meta"]  # shape-only placeholders live nowhere
        return default_manager(found[0].device if found else None)

    def _page_out(self, s: Slice) -> None:
        if s._handles is not None or s.state is None:
            return
        preempt = getattr(s.state, "aqua_preempt", None)
        if callable(preempt):  # e.g. OffloadedCache drops its prefetched layer
            preempt()
        m = self._manager_for(s)
        tensors = self._tensors(s)
        try:
            handles = m.offload_many(tensors, release=True)
        except OutOfMemoryError:
            return  # nowhere to put it: the state stays resident, nothing lost
        s._handles = handles
        s.bytes_paged_out += sum(h.nbytes for h in handles)

    def _prefetch(self, s: Slice) -> None:
        if s._handles:
            m = self._manager_for(s)
            for h in s._handles:
                m.prefetch(h)

    def _page_in(self, s: Slice) -> None:
        handles, s._handles = s._handles, None
        if handles:
            self._manager_for(s).fetch_many(handles)
            s.bytes_paged_in += sum(h.nbytes for h in handles)

    # -- reporting and lifetime ------------------------------------------------------------
    @property
    def running(self) -> Slice | None:
        """The slice holding the turn."""
        return self._running

    def stats(self) -> dict[str, Any]:
        """Per-slice accounting (``slices``) and totals."""
        with self._cv:
            slices = [x.stats() for x in self._finished + self._slices]
        return {"policy": self.policy.name, "quantum_ms": self.quantum_s * 1e3,
                "slices": slices,
                "preemptions": sum(x["preemptions"] for x in slices),
                "bytes_paged_out": sum(x["bytes_paged_out"] for x in slices),
                "bytes_paged_in": sum(x["bytes_paged_in"] for x in slices),
                "running": self._running.name if self._running else None}

    def close(self) -> None:
        """Refuse new slices; slices waiting for a turn raise SlicerClosedError (after their
        state is paged back in). The running slice finishes normally."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def __enter__(self) -> "TimeSlicer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

Note [Admission]
A state is checked when its slice enters, before anything changes (no slice admitted, no policy
change, nobody charged), so that a bad state fails in ``slice()`` rather than at the first
preemption, in another slice's turn:
  - every tensor that would be paged (on the manager's device, parameters as the slicer says)
    can be paged out in place: strided, not quantized, not nested, a resizable storage
    (``UnpageableStateError``);
  - no storage is also in another live slice's state (``SharedStateError``): paging it out with
    one slice would pull it from under the other one, which may be running. Views count (the
    storage is compared). A model shared by the slices is fine where nothing of it is paged
    (``parameters=False`` and no buffers in the states).
Each slice keeps the storages its owner's last walk found (at entry, then at each preemption),
as weak references: a slice never walks another's state (Note [Who pages what]), and a record
whose tensor died or moved to another storage is stale, not a match (storage addresses are
reused). A storage a running slice added since its last walk is not seen: the check is as good
as those records.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import weakref
from typing import Any, Callable, Iterator

import torch

from .errors import InvalidArgumentError, OffloadError, OutOfMemoryError
from .handle import Handle
from .manager import OffloadManager
from .policies import SchedulingPolicy, _as_float, _check_weight, make_policy
from .sizes import parse_size
from .state import Path, collect_tensor_paths, collect_tensors, format_path, walk_tensors
from .storage import is_offloaded, not_sole_owner

__all__ = ["TimeSlicer", "Slice", "SlicerClosedError", "SharedStateError",
           "UnpageableStateError"]


class SlicerClosedError(OffloadError):
    """The slicer was closed while this slice waited for its turn (its state was restored)."""


class SharedStateError(InvalidArgumentError):
    """A slice's state shares a storage with another live slice's state (Note [Admission]).

    Attributes ``path`` (in the entering state), ``other_slice`` (its name) and ``other_path``
    (in that slice's state) say where, as ``state['kv'][3]``-style expressions.
    """


class UnpageableStateError(InvalidArgumentError):
    """A tensor of a slice's state cannot be paged out in place (Note [Admission]).

    Attributes ``path`` (where in the state) and ``reason`` (why: quantized, nested, ...).
    """


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
        # Storages of its state as its owner last saw them: key -> (path, weakref to the
        # tensor that stood for the storage) (Note [Admission]).
        self._storages: dict[int, tuple[Path, weakref.ref]] = {}

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
        How long a slice runs before it yields at its next checkpoint, if others wait: finite,
        >= 0. 0 yields at every checkpoint while others wait (for a slice that must never be
        preempted, use ``policy="fcfs"``).
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

    Raises
    ------
    InvalidArgumentError
        A bad argument (nothing is created).
    """

    _aqua_not_state = True  # never walked as part of a workload state (state.py)

    def __init__(self, quantum_ms: float = 20.0, manager: OffloadManager | None = None,
                 policy: str | SchedulingPolicy = "fair", memory_budget: int | str | None = None,
                 clock: Callable[[], float] = time.monotonic, parameters: bool = False) -> None:
        quantum = _as_float(quantum_ms)
        if quantum is None or not 0 <= quantum < math.inf:
            raise InvalidArgumentError(
                f"quantum_ms must be a finite number >= 0 (0: yield at every checkpoint while "
                f"others wait; policy='fcfs' never preempts), got {quantum_ms!r}")
        if manager is not None and not isinstance(manager, OffloadManager):
            raise InvalidArgumentError(f"manager must be an OffloadManager, got {manager!r}")
        if not isinstance(parameters, bool):
            raise InvalidArgumentError(f"parameters must be a bool, got {parameters!r}")
        if not callable(clock):
            raise InvalidArgumentError(f"clock must be callable, got {clock!r}")
        self.quantum_s = quantum / 1e3
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
            What to page out when preempted (see :mod:`aqua_offload.state`). Checked on entry
            (Note [Admission]).
        name : str, optional
        weight : float
            Share of the device under ``fair`` (a weight-2 slice gets twice the service):
            positive and finite.
        hooks : nn.Module, optional
            Install a forward pre-hook: every forward call of the module in this thread is a
            yield point (a HF ``generate`` loop gets one per token). Removed on exit.

        Raises
        ------
        UnpageableStateError, SharedStateError
            The state cannot be time-sliced (Note [Admission]); nothing changed.
        InvalidArgumentError
            A bad name, weight or hooks, or a nested slice; nothing changed.
        SlicerClosedError
            The slicer is closed, or was closed while the slice waited for its turn.
        """
        if getattr(self._local, "slice", None) is not None:
            raise InvalidArgumentError("nested slices: this thread is already inside a slice")
        if name is not None and not isinstance(name, str):
            raise InvalidArgumentError(f"name must be a str, got {type(name).__name__}")
        weight = _check_weight(weight)
        if hooks is not None and not isinstance(hooks, torch.nn.Module):
            raise InvalidArgumentError(f"hooks must be an nn.Module, got {type(hooks).__name__}")
        if self._closed:  # checked again below, under the lock: this only skips the walk
            raise SlicerClosedError("the TimeSlicer is closed")
        s = Slice(self, state, name or f"slice-{id(state):x}", weight)
        shared = self._admission_walk(s)
        with self._cv:
            if self._closed:
                raise SlicerClosedError("the TimeSlicer is closed")
            self._check_shared_locked(s, shared)
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

    def _admission_walk(self, s: Slice) -> dict[int, Path]:
        """Check that ``s.state`` can be paged and record its storages (Note [Admission]);
        return those that count for sharing (the storages holding bytes or paged out)."""
        if s.state is None:
            return {}
        found = list(walk_tensors(s.state, parameters=self.parameters))
        if self.manager is not None:
            device = self.manager.device
        else:  # the device _manager_for would pick, without creating its manager now
            device = next((t.device for _, t in found
                           if t.layout == torch.strided and t.device.type != "meta"), None)
        record: dict[int, tuple[Path, weakref.ref]] = {}
        shared: dict[int, Path] = {}
        for path, t in found:
            if t.device != device:
                continue  # stays where it is (state.py)
            why = _unpageable_reason(t)
            if why is not None:
                where = format_path(path)
                raise UnpageableStateError(
                    f"slice {s.name!r}: {where} cannot be paged out when the slice is "
                    f"preempted: {why}; keep it out of the slice's state", path=where,
                    reason=why)
            st = t.untyped_storage()
            key = st._cdata
            if key not in record:
                record[key] = (path, weakref.ref(t))
                if st.nbytes() > 0 or is_offloaded(t):  # an empty storage is never paged
                    shared[key] = path
        s._storages = record
        return shared

    def _check_shared_locked(self, s: Slice, shared: dict[int, Path]) -> None:
        if not shared:
            return
        for other in self._slices:
            record = other._storages  # once: its owner may replace it meanwhile (unlocked)
            common = shared.keys() & record.keys()
            for key in (k for k in shared if k in common):  # the first in s's walk order
                other_path, ref = record[key]
                t = ref()
                if t is None or t.untyped_storage()._cdata != key:
                    continue  # stale: that tensor died or moved (Note [Admission])
                where, there = format_path(shared[key]), format_path(other_path)
                raise SharedStateError(
                    f"slice {s.name!r}: {where} shares its storage with {there} of the live "
                    f"slice {other.name!r}: paging it out with one slice would pull it from "
                    "under the other. Give each slice its own tensors (a shared model belongs "
                    "in hooks=, not in the state)", path=where, other_slice=other.name,
                    other_path=there)

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
        s._storages = {}

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
        found = collect_tensor_paths(s.state, device, parameters=self.parameters)
        s._storages = {key: (path, weakref.ref(t)) for key, path, t in found}  # Note [Admission]
        return [t for _, _, t in found if t.untyped_storage().nbytes() > 0]

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


def _unpageable_reason(t: torch.Tensor) -> str | None:
    """Why the slicer could not page ``t`` out in place (``offload(release=True)``), or None.
    The manager refuses the same tensors; this says so at slice entry (Note [Admission])."""
    if t.is_quantized:
        return f"it is a quantized tensor ({t.dtype}), which cannot be offloaded"
    if t.is_nested:
        return "it is a nested tensor, which cannot be offloaded"
    if t.layout != torch.strided:
        return f"its layout is {t.layout}; only strided (dense) tensors can be offloaded"
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError) as exc:  # tensor subclasses
        return f"it has no storage of its own ({type(t).__name__}: {exc})"
    if st.nbytes() > 0:  # (an empty storage is never paged)
        return not_sole_owner(t)
    return None

"""The gate every public call of an OffloadManager passes, and that close() shuts.

Note [Calls and close]
Every public call runs inside ``with CallGate.call():``, which registers a token that lives
exactly as long as that ``with`` statement (a WeakSet: no decrement to miss when an interrupt
lands in a ``finally``). ``close()`` first refuses new calls (``ClosedError``), then waits
until the calls in progress returned, and only then restores the paged-out tensors (one batch)
and closes the core, which frees every pool. So a tensor whose offload succeeded is always
restored, and close() never races a fetch of the same handle. ``internal`` calls (the lending
consumer's) still run while close() restores, until close() stops them.

A close() interrupted before it could say so (Note [Interrupted batches] in manager.py) leaves
``closing`` set with no one closing: the next close() takes over when the recorded closer is
its own thread or dead. A forked child sees the parent's manager as closed: it has none of its
threads or memory.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from typing import Iterator

from .errors import ClosedError

__all__ = ["CallGate"]


class _Call:
    """A public call in progress: the token ``with gate.call(...)`` holds, alive exactly as long
    as the ``with`` block (the statement keeps its ``__exit__`` until the block ends, however
    it ends). A class, not a generator context manager: a third of the cost, per call."""

    __slots__ = ("__weakref__",)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None  # nothing to undo: the token dies as the statement lets go of it


class CallGate:
    """Calls in progress, and the closing and closed states of one manager."""

    def __init__(self) -> None:
        self.pid = os.getpid()  # a forked child cannot use it
        self._calls: weakref.WeakSet[_Call] = weakref.WeakSet()  # LOCK: _cv
        # An RLock, as Condition's default: a Handle finalizer run inside quiet() may call in
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self.closing = False  # LOCK: _cv
        self._closer = threading.current_thread()  # LOCK: _cv; the thread closing
        self.closed = False

    def foreign(self) -> bool:
        """This is a forked child of the process that made the manager."""
        return os.getpid() != self.pid

    def call(self, what: str, internal: bool = False) -> _Call:
        """A public call in progress, for a ``with`` statement: ``ClosedError`` once the manager
        closes (or in a child)."""
        if os.getpid() != self.pid:
            raise ClosedError(f"{what}: this OffloadManager belongs to process {self.pid}; a "
                              "forked child cannot use it (make a new one in the child)")
        with self._lock:  # the condition's own lock: entered in C
            if self.closed or (self.closing and not internal):
                raise ClosedError(f"{what}: this OffloadManager is closed")
            call = _Call(); self._calls.add(call)  # noqa: E702 - one line, no interrupt between
        return call  # dies with the caller's `with` statement (or with this frame, if cut short)

    def begin_close(self) -> bool:
        """Refuse new calls and wait for those in progress. False if the manager is closed
        already (another thread's close() finished meanwhile): nothing left to do."""
        me = threading.current_thread()
        with self._cv:
            while self.closing and self._closer is not me and self._closer.is_alive():
                self._cv.wait(0.05)  # another thread closes: wait for it
            if self.closed:
                return False
            self.closing, self._closer = True, me
        try:
            with self._cv:
                while self._busy():  # a token dies with its frame: polled, no callback runs then
                    self._cv.wait(0.005)
        except BaseException:
            self.abort_close()
            raise
        return True

    def _busy(self) -> bool:
        # Live tokens only: len() of a WeakSet also counts a dead one whose removal callback an
        # interrupt cut short, which would stay forever.
        return any(True for _ in self._calls)

    @contextlib.contextmanager
    def quiet(self) -> Iterator[bool]:
        """True while no call is in progress and none can start (a new call waits until the
        block ends): the manager's handles are all made and adopted (Note [Orphans] in
        manager.py). False when a call runs, or the manager closes or is a forked child's."""
        with self._cv:
            yield not (self.closing or self.closed or self.foreign() or self._busy())

    def abort_close(self) -> None:
        """A close() that raised: the manager serves again."""
        with self._cv:
            self.closing = False
            self._cv.notify_all()

    def end_close(self) -> None:
        with self._cv:
            self.closed, self.closing = True, False
            self._cv.notify_all()

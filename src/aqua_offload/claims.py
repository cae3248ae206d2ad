"""Claiming handles for a call: a Handle (or a paged-out tensor standing for one) of this manager,
live, locked for the call, and its interrupted prefetch settled (Note [Pending prefetches] in
prefetching.py)."""

from __future__ import annotations

import _thread
import contextlib
import operator
from itertools import repeat
from operator import is_
from typing import TYPE_CHECKING, Any, Iterator

import torch

from . import prefetching, storage
from .errors import ClosedError, InvalidHandleError
from .handle import LIVE, Handle

if TYPE_CHECKING:
    from .manager import OffloadManager

__all__ = ["own", "claim", "take", "let_go"]

_by_id = operator.attrgetter("_id")
_lock_of = operator.attrgetter("_lock")
_manager_of = operator.attrgetter("_manager")
_state_of = operator.attrgetter("_state")
_pending_of = operator.attrgetter("_pending")
_LIVE = frozenset(LIVE)
# Every Handle._lock is a _thread.RLock: its methods unbound cost half a methodcaller's
_acquire = _thread.RLock.acquire
_release = _thread.RLock.release


def own(m: "OffloadManager", handle: Any, what: str) -> Handle:
    """``handle`` as a live Handle of ``m``, or a typed error naming ``what``."""
    if isinstance(handle, torch.Tensor):
        found = storage.owner(handle)
        if found is None:
            raise InvalidHandleError(f"{what}: this tensor is not paged out")
        handle = found
    if not isinstance(handle, Handle):
        raise InvalidHandleError(f"{what} expects a Handle, got {type(handle).__name__}")
    if handle._manager is not m:
        raise InvalidHandleError(f"{what}: the handle belongs to another OffloadManager")
    if not handle._live():
        if handle._state == "closed":
            raise ClosedError(f"{what}: the handle's manager was closed")
        raise InvalidHandleError(f"{what}: the handle was already {handle._state}")
    return handle


@contextlib.contextmanager
def claim(m: "OffloadManager", handles: list[Any], what: str) -> Iterator[list[Handle]]:
    """Hold the handles' locks (in a fixed order) and check them under the locks: the Python
    side of a handle (prefetch buffer, state) changes with its C++ entry at once."""
    locks: list[Any] = []
    taken: list[bool] = []
    try:
        try:
            yield take(m, handles, what, locks, taken)
        finally:
            let_go(locks, taken)
    finally:
        let_go(locks, taken)  # nothing left, unless the line above was interrupted


def take(m: "OffloadManager", handles: list[Any], what: str, locks: list[Any],
         taken: list[bool]) -> list[Handle]:
    """:func:`claim`'s work, for a caller that lets go itself (the hot fetch path, where a
    generator context manager costs more than the rest of a small call): fills ``locks``
    with the handles' locks and ``taken`` with one entry per lock acquired, returns the
    checked handles. The caller runs ``let_go(locks, taken)`` in a ``finally``, and again in
    an outer ``finally`` (an interrupt at the inner one's line would leave them all held)."""
    # A live Handle of m passes at once (checked by C loops over a batch: they pay from a few
    # handles on); anything else gets own()'s checks and errors, in order.
    if len(handles) > 4 and _plain(m, handles):
        hs = list(handles)
    else:
        hs = [h if type(h) is Handle and h._manager is m and h._state in LIVE
              else own(m, h, what) for h in handles]
    # Locks in the order of the handles' ids, so that no two calls can each hold a lock the
    # other waits for. A batch usually comes in that order (offload_many's): checked by C
    # loops, then locked as it is; a handle listed twice is then locked twice, which an RLock
    # allows (and let_go releases each acquire). (One line each: the locks listed, then taken.)
    locks[:] = map(_lock_of, hs if len(hs) < 2 or _ascending(hs) else
                   sorted(set(hs), key=_by_id))  # (a Handle hashes by identity)
    # The locks are taken and let go by C loops (no Python line runs between two of them, so
    # a traced interrupt cannot split one off); `taken` counts them even if an acquire is
    # interrupted partway, so exactly those are released.
    taken.extend(map(_acquire, locks))
    if not set(map(_state_of, hs)) <= _LIVE:  # ended by another thread meanwhile
        hs = [own(m, h, what) for h in hs]  # raises the typed error
    if not all(map(is_, map(_pending_of, hs), repeat(None))):
        for h in hs:
            if h._pending is not None:
                prefetching.settle(m, h)
    return hs


def _ascending(hs: list[Handle]) -> bool:
    """The handles' ids never decrease along the list (C loops)."""
    ids = list(map(_by_id, hs))
    return ids == sorted(ids)


def _plain(m: "OffloadManager", handles: list[Any]) -> bool:
    """Every entry is a Handle (not a subclass) of ``m`` in a live state."""
    return (set(map(type, handles)) <= {Handle} and set(map(_manager_of, handles)) <= {m}
            and set(map(_state_of, handles)) <= _LIVE)


def let_go(locks: list[Any], taken: list[bool]) -> None:
    """Release the first ``len(taken)`` locks and empty ``taken``, in one line: done once,
    whatever interrupts before or after it."""
    # (any() runs the releases in C, each returning None: a third of the cost of draining them
    # into a deque)
    todo, taken[:] = locks[:len(taken)], (); any(map(_release, todo))  # noqa: E702

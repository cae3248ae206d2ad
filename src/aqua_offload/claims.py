"""Claiming handles for a call: a Handle (or a paged-out tensor standing for one) of this manager,
live, locked for the call, and its interrupted prefetch settled (Note [Pending prefetches] in
prefetching.py)."""

from __future__ import annotations

import collections
import contextlib
import functools
import operator
from typing import TYPE_CHECKING, Any, Iterator

import torch

from . import prefetching, storage
from .errors import ClosedError, InvalidHandleError
from .handle import LIVE, Handle

if TYPE_CHECKING:
    from .manager import OffloadManager

__all__ = ["own", "claim"]

_by_id = operator.attrgetter("_id")
_acquire = operator.methodcaller("acquire")
_release = operator.methodcaller("release")
_drain = functools.partial(collections.deque, maxlen=0)  # runs an iterator in C


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
    # A live Handle of m passes at once; anything else gets own()'s checks and errors, in order.
    hs = [h if type(h) is Handle and h._manager is m and h._state in LIVE else own(m, h, what)
          for h in handles]
    locks = [h._lock for h in sorted({id(h): h for h in hs}.values(), key=_by_id)]
    # The locks are taken and let go by C loops (no Python line runs between two of them, so
    # a traced interrupt cannot split one off); `taken` counts them even if an acquire is
    # interrupted partway, so exactly those are released. Let go twice over: an interrupt at
    # the line of the inner `finally` (the last line a call runs) would leave them all held.
    taken: list[bool] = []
    try:
        try:
            taken.extend(map(_acquire, locks))
            if any(h._state not in LIVE for h in hs):  # ended by another thread meanwhile
                hs = [own(m, h, what) for h in hs]  # raises the typed error
            for h in hs:
                if h._pending is not None:
                    prefetching.settle(m, h)
            yield hs
        finally:
            _let_go(locks, taken)
    finally:
        _let_go(locks, taken)  # nothing left, unless the line above was interrupted


def _let_go(locks: list[Any], taken: list[bool]) -> None:
    """Release the first ``len(taken)`` locks and empty ``taken``, in one line: done once,
    whatever interrupts before or after it."""
    todo, taken[:] = locks[:len(taken)], (); _drain(map(_release, todo))  # noqa: E702

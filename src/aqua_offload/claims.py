"""Claiming handles for a call: a Handle (or a paged-out tensor standing for one) of this manager,
live, locked for the call, and its interrupted prefetch settled (Note [Pending prefetches] in
prefetching.py)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

import torch

from . import prefetching, storage
from .errors import ClosedError, InvalidHandleError
from .handle import Handle

if TYPE_CHECKING:
    from .manager import OffloadManager

__all__ = ["own", "claim"]


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
    hs = [own(m, h, what) for h in handles]
    with contextlib.ExitStack() as stack:
        for h in sorted({id(h): h for h in hs}.values(), key=lambda h: h._id):
            stack.enter_context(h._lock)
        hs = [own(m, h, what) for h in hs]
        for h in hs:
            prefetching.settle(m, h)
        yield hs

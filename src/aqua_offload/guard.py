"""``debug_guard``: turn a touch of a paged-out tensor into a clear error instead of a crash.

Note [Guarding every thread]
A TorchDispatchMode is thread-local: entered in one thread, it guards that thread only. The
process-wide switch (``debug_guard(all_threads=True)``, or ``AQUA_OFFLOAD_DEBUG_GUARD=1`` in the
environment at import) enters a guard in the calling thread and asks every thread started
afterwards to enter one first (``threading.setprofile``: a profile function that enters the
guard on the thread's first event and removes itself). On Python >= 3.12 threads already
running are reached too (``threading.setprofile_all_threads``: each enters the guard at its next
Python event, e.g. a pool worker when it picks up its next task); on older Pythons they are not,
so turn it on before starting workers (or set the environment variable). Threads started with
the low-level ``_thread`` module are only reached if they run when the switch is turned on (3.12+).
A thread guarded this way stays guarded for the rest of its life.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import torch

from . import storage
from .errors import PagedOutError

__all__ = ["debug_guard"]

ENV = "AQUA_OFFLOAD_DEBUG_GUARD"


class debug_guard(TorchDispatchMode):
    """Context manager: raise :class:`PagedOutError` before any torch operation reads or writes
    a tensor whose storage is paged out (or discarded: paged out and its handle freed), or
    writes the source of a deferred snapshot not yet fenced.

    Torch does not bounds-check a storage resized to zero bytes, so without it such a touch
    crashes the process (CPU) or faults the CUDA context (GPU). The guard costs one dictionary
    lookup per tensor argument of every operation, so use it while debugging.

    Parameters
    ----------
    all_threads : bool
        Also guard every thread started from now on, until the context exits (Note [Guarding
        every thread]); ``AQUA_OFFLOAD_DEBUG_GUARD=1`` turns this on for the whole process.

    Examples
    --------
    >>> with aq.debug_guard():
    ...     h = m.offload(t)
    ...     t.sum()          # raises PagedOutError instead of crashing
    """

    def __init__(self, all_threads: bool = False) -> None:
        super().__init__()
        self.all_threads = bool(all_threads)
        self._previous_profile: Any = None

    def __enter__(self) -> "debug_guard":
        if self.all_threads:
            self._previous_profile = threading.getprofile()
            _guarded.add(threading.get_ident())  # this thread enters below, not by the hook
            threading.setprofile(_enter_in_new_thread)
            if hasattr(threading, "setprofile_all_threads"):  # 3.12+: running threads too
                threading.setprofile_all_threads(_enter_in_new_thread)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        if self.all_threads:
            threading.setprofile(self._previous_profile)
            if hasattr(threading, "setprofile_all_threads"):  # threads not reached yet: no more
                threading.setprofile_all_threads(self._previous_profile)
            _guarded.discard(threading.get_ident())
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if storage.any_offloaded():
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and not leaf.is_meta:
                    unsafe = storage.unsafe_to_touch(leaf)
                    if unsafe is not None:
                        raise PagedOutError(
                            f"{func} would touch a tensor of shape {tuple(leaf.shape)} whose "
                            f"storage is {unsafe}" + (
                                "; fetch its handle first (aqua_offload.fetch)"
                                if unsafe == "paged out" else
                                ": its handle was freed (or its manager closed without "
                                "restoring), so its data is gone"))
        if storage.any_deferred():
            for leaf in _written(func, args, kwargs):
                if storage.deferred_unfenced(leaf):
                    raise PagedOutError(
                        f"{func} would write a tensor of shape {tuple(leaf.shape)} whose snapshot "
                        "(offload(..., fence='deferred')) may still be copying it; call "
                        "handle.fence() first (Note [Deferred snapshots])")
        return func(*args, **kwargs)


_guarded: set[int] = set()  # threads that entered an all_threads guard themselves


def _enter_in_new_thread(frame: Any, event: str, arg: Any) -> None:
    """A thread's first profile event under the switch: guard it for the rest of its life."""
    sys.setprofile(None)
    if threading.get_ident() not in _guarded:
        debug_guard().__enter__()


def _written(func: Any, args: Any, kwargs: Any) -> list[torch.Tensor]:
    """The tensor arguments an operator writes (in place or out=), from its schema."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        value = kwargs.get(a.name) if a.kwarg_only or i >= len(args) else args[i]
        out.extend(v for v in tree_leaves(value) if isinstance(v, torch.Tensor))
    return out


def _from_environment() -> None:
    if os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        debug_guard(all_threads=True).__enter__()  # for the life of the process

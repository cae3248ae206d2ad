"""Snapshots (``offload(t, release=False)``): one core call per batch, fenced at once or deferred.

Note [Deferred snapshots] in storage.py says what a deferred fence promises; here the source's
memory is kept alive until the copy read it (holders.py, on both backends), and a base consumed
by an incremental snapshot hands what it kept alive to the new handle, whose copy the core
orders after the base's. Interrupted batches: Note [Interrupted batches] in manager.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from . import paging, storage
from .devices import current_stream
from .handle import Handle

if TYPE_CHECKING:
    from .manager import OffloadManager

__all__ = ["take"]


def take(m: "OffloadManager", tensors: list[torch.Tensor], prio: float,
         bases: list[Handle | None], base_ids: list[int], fence: str,
         specs: list[Any]) -> list[Handle]:
    """Snapshot every tensor in one core call (fenced now or deferred); arrays carry ``specs``
    to be rebuilt at fetch."""
    srcs = [storage.snapshot_source(t) for t in tensors]
    sizes = [s.numel() * s.element_size() for s in srcs]
    got: list[tuple[int, int]] = []  # filled by the core before it returns
    handles: list[Handle | None] = [None] * len(tensors)

    def finish() -> None:  # idempotent (Note [Interrupted batches] in manager.py)
        for i, ((cid, tier), t, src, n, spec) in enumerate(zip(got, tensors, srcs, sizes, specs)):
            if handles[i] is None:
                handles[i] = m._new_handle(cid, tier, t, nbytes=n, release=False, priority=prio)
                handles[i]._array = spec
            handles[i]._adopted = True  # (Note [Orphans] in manager.py)
            if fence == "deferred" and n and handles[i]._deferred is None:
                _defer_fence(m, handles[i], t, src, tier)
            if bases[i] is not None:  # consumed: the new copy completes after the base's (the
                m._holders.transfer(bases[i]._id, cid)  # core orders it), so what the base
                bases[i]._end("freed")                    # kept alive waits for the new one

    try:
        # A temporary source may be dropped after the call: with fence "now" the current
        # stream (its allocation stream) waits for the copy; "deferred" keeps it alive.
        m._store.offload_many(
            [(s.data_ptr() if n else 0, n, prio, b) for s, n, b in zip(srcs, sizes, base_ids)],
            current_stream(m.device), fence == "now", got)
        finish()
    except BaseException:
        if got:  # accepted: finish, then the caller never sees these handles and they free
            finish()  # their blocks as they die
        raise
    return handles

def _defer_fence(m: "OffloadManager", handle: Handle, tensor: torch.Tensor, src: torch.Tensor,
                 tier: int) -> None:
    """A deferred snapshot: the source's memory must outlive the copy (the caller may drop
    it), and the source is registered so debug_guard can catch a write before fence()."""
    handle._deferred = storage.defer(tensor, handle)  # a key: the handle never pins tensor
    paging.keep_alive(m, handle._id, tier, src, dropped_now=False)


"""Snapshots (``offload(t, release=False)``): one core call per batch, fenced at once or deferred.

Note [Deferred snapshots] in storage.py says what a deferred fence promises; here the source's
memory is kept alive until the copy read it (holders.py, on both backends), and a base consumed
by an incremental snapshot hands what it kept alive to the new handle, whose copy the core
orders after the base's. Interrupted batches: Note [Interrupted batches] in manager.py.
"""

from __future__ import annotations

import operator
import weakref
from itertools import repeat
from typing import TYPE_CHECKING, Any

import torch

from . import paging, storage
from .devices import current_stream
from .handle import Handle

if TYPE_CHECKING:
    from .manager import OffloadManager

__all__ = ["take"]


def take(m: "OffloadManager", tensors: list[torch.Tensor], dtypes: list[torch.dtype],
         prio: float, bases: list[Handle | None], base_ids: list[int], fence: str,
         specs: list[Any]) -> list[Handle]:
    """Snapshot every tensor in one core call (fenced now or deferred); arrays carry ``specs``
    to be rebuilt at fetch. ``dtypes``: the tensors' (checks.check_offload)."""
    srcs = storage.snapshot_sources(tensors, dtypes)
    sizes = list(map(_nbytes_of, srcs))
    if len(srcs) > 4 and all(sizes):  # a batch, by C loops (torch's method unbound if it can)
        ptrs = map(torch.Tensor.data_ptr if set(map(type, srcs)) <= _TENSOR else _data_ptr, srcs)
        items = list(zip(ptrs, sizes, repeat(prio), base_ids))
    else:
        items = [(s.data_ptr() if n else 0, n, prio, b) for s, n, b in zip(srcs, sizes, base_ids)]
    deferred = fence == "deferred"
    got: list[tuple[int, int]] = []  # filled by the core before it returns
    made: list[Handle] = []  # every handle at once (one line), or none yet
    try:
        # A temporary source may be dropped after the call: with fence "now" the current
        # stream (its allocation stream) waits for the copy; "deferred" keeps it alive.
        m._store.offload_many(items, current_stream(m.device), not deferred, got)
        _finish(m, got, made, tensors, dtypes, srcs, sizes, prio, specs, bases, deferred)
    except BaseException:
        if got:  # accepted: finish; the caller never sees these handles, which free their
            # blocks as they die
            _finish(m, got, made, tensors, dtypes, srcs, sizes, prio, specs, bases, deferred)
        raise
    return made


def _finish(m: "OffloadManager", got: list[tuple[int, int]], made: list[Handle],
            tensors: list[torch.Tensor], dtypes: list[torch.dtype], srcs: list[torch.Tensor],
            sizes: list[int], prio: float, specs: list[Any], bases: list[Handle | None],
            deferred: bool) -> None:
    """The Python side of a batch the core accepted (``got``): its handles in ``made``.
    Idempotent (Note [Interrupted batches] in manager.py)."""
    if not made:  # an interrupt inside leaves it empty: the re-run makes them all again
        made[:] = _new_handles(m, got, tensors, dtypes, sizes, prio, specs)
    for h in made:  # once stored: adopted by a re-run, whatever interrupts
        h._adopted = True  # (Note [Orphans] in manager.py)
    if deferred:
        for h, (_cid, tier), t, src, n in zip(made, got, tensors, srcs, sizes):
            if n and h._deferred is None:
                _defer_fence(m, h, t, src, tier)
    if bases.count(None) != len(bases):
        for h, b in zip(made, bases):
            if b is not None:  # consumed: the new copy completes after the base's (the core
                m._holders.transfer(b._id, h._id)  # orders it), so what the base kept
                b._end("freed")                    # alive waits for the new one


_nbytes_of = operator.attrgetter("nbytes")
_TENSOR = {torch.Tensor}
_data_ptr = operator.methodcaller("data_ptr")


def _new_handles(m: "OffloadManager", got: list[tuple[int, int]], tensors: list[Any],
                 dtypes: list[torch.dtype], sizes: list[int], priority: float,
                 specs: list[Any]) -> list[Handle]:
    """``m._new_handle`` of each snapshot the core made (``(core id, tier)`` in ``got``),
    ``specs`` the arrays' (None for a tensor). Not yet adopted."""
    tiers, table = m._tiers, m._handles
    made = []  # (a loop: as fast as a comprehension for a batch, faster for one)
    for (cid, tier), t, dtype, n, spec in zip(got, tensors, dtypes, sizes, specs):
        kind, location = tiers[tier]
        h = Handle(m, cid, n, t.shape, dtype, False, None, None, kind, location, priority,
                   None, spec)  # (positional: see Handle.__init__)
        table[cid] = weakref.ref(h)
        made.append(h)
    return made


def _defer_fence(m: "OffloadManager", handle: Handle, tensor: torch.Tensor, src: torch.Tensor,
                 tier: int) -> None:
    """A deferred snapshot: the source's memory must outlive the copy (the caller may drop
    it), and the source is registered so debug_guard can catch a write before fence()."""
    handle._deferred = storage.defer(tensor, handle)  # a key: the handle never pins tensor
    paging.keep_alive(m, handle._id, tier, src, dropped_now=False)


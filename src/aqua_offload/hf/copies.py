"""Copies of an OffloadedCache.

Note [Copies]
``copy.deepcopy(cache)`` (transformers' prefix reuse: compute a prompt once, deep-copy it per
continuation) gives a cache on the same manager that owns its own handles: every segment is
fetched and offloaded again as a new snapshot, in one batched call each; resident parts (the
tails, layers that stay resident) are copied as tensors. Handles themselves refuse to be copied
(two owners would free one block twice). The source must not be in use meanwhile (its lock is
held by the caller).
"""

from __future__ import annotations

import copy
import threading
from typing import TYPE_CHECKING, Any

from .layers import adopt

if TYPE_CHECKING:
    from .cache import OffloadedCache, _Slot

__all__ = ["deep_copy"]

_OWN = {"_lock", "_slots", "_manager", "layers"}


def deep_copy(cache: "OffloadedCache", memo: dict[int, Any]) -> "OffloadedCache":
    """An independent copy of ``cache`` on the same manager (Note [Copies])."""
    new = type(cache).__new__(type(cache))
    memo[id(cache)] = new
    for name, value in cache.__dict__.items():
        if name not in _OWN:
            new.__dict__[name] = copy.deepcopy(value, memo)
    new._manager = cache._manager  # shared: the copy lives in the same tiers
    new._lock = threading.RLock()
    new.layers = []
    for i, layer in enumerate(cache.layers):
        borrowed = layer.__dict__.pop("_aq_borrowed", None)  # a read's leftover: not data
        try:
            twin = copy.deepcopy(layer, memo)
        finally:
            if borrowed is not None:
                layer.__dict__["_aq_borrowed"] = borrowed
        if "_aq_cache" in twin.__dict__:
            adopt(twin, new, i, new._offload_sliding)
        new.layers.append(twin)
    new._slots = _copy_slots(cache)
    return new


def _copy_slots(cache: "OffloadedCache") -> list["_Slot"]:
    from .cache import _Segment, _Slot

    segs = [(i, seg) for i, slot in enumerate(cache._slots) for seg in slot.segments]
    slots = [_Slot(tokens=slot.tokens,
                   tail=None if slot.tail is None else (slot.tail[0].clone(),
                                                        slot.tail[1].clone()))
             for slot in cache._slots]
    if not segs:
        return slots
    manager = cache._manager_of([seg.handle for _, seg in segs])
    bufs = manager.fetch_many([seg.handle for _, seg in segs], keep=True)
    for slot in cache._slots:
        slot.prefetched = False  # the fetch consumed the prefetches
    cache.bytes_fetched += sum(seg.handle.nbytes for _, seg in segs)
    # Fresh buffers, never written again: the snapshots need no fence.
    handles = manager.offload_many(bufs, release=False, priority=cache._priority,
                                   fence="deferred")
    for (i, seg), h in zip(segs, handles):
        slots[i].segments.append(_Segment(h, seg.tokens))
    return slots

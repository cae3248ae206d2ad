"""The paging registry's strong references to storage objects, on torch whose cyclic garbage
collector can clear the weak references of a storage that is still in use (torch <= 2.9).

Note [Storage objects and the cyclic GC]
The paging registry watches each paged storage's Python object with a weak reference, and
drops the storage's entry when that object dies (Note [Paging registry] in storage.py). On
torch 2.9 and older, Python's cyclic collector can find a storage object unreachable while
tensors still use its StorageImpl. One reference cycle holding the object is enough; an
exception's traceback holding the storage object in a frame is one. The collector then clears
the object's weak references and runs their callbacks, and torch resurrects the object. The
watch would report a death that did not happen: the live paged-out storage loses its entry,
``is_offloaded`` turns False, and its handle can die and free the only copy of the bytes.
That was seen here: the Hypothesis state machine lost a paged-out tensor's bytes on torch 2.3.
torch 2.10 and newer keep a storage object that C++ still uses out of the collector's reach;
probes of 2.3.1, 2.7.1, 2.8.0 and 2.9.1 cleared the weak reference, 2.10.0, 2.11.0, 2.13.0
and 2.15.0 did not (tests/test_storage_pins.py checks the running torch).

Where torch is affected (:data:`ENABLED`), the registry also holds every registered storage's
Python object strongly, here (and every storage exported to numpy or DLPack, whose mark a
collected cycle could clear the same way), so the collector never finds it unreachable. That
would keep a paged-out storage alive after its last tensor died, and with it its handle's tier
bytes (a tensor dropped while paged out gives them back, Note [Paging registry]). So a sweep
lets go of the storages no tensor uses any more and whose object nothing else holds (use count
1, the reference of the object held here), which then die as on newer torch, and their
watches drop their entries. :func:`storage.reserve` runs one once as many storages were held
since the last one as are held now (amortized O(1) per release); ``OffloadManager.synchronize``
and ``close`` run one always, and an offload that finds no tier with room runs one before it
tries once more (dropped tensors' bytes would otherwise run the tiers out). On torch 2.9 and
older a paged-out tensor dropped with its handle therefore gives its tier bytes back at the
next sweep, not at once.

Every function here is called with ``storage._lock`` held.
"""

from __future__ import annotations

import re
from sys import getrefcount

import torch

__all__ = ["ENABLED", "affected", "hold", "let_go", "sweep"]


def affected(version: str) -> bool:
    """Whether torch ``version`` lets the cyclic collector clear a live storage's weak
    references (Note [Storage objects and the cyclic GC])."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return found is not None and (int(found[1]), int(found[2])) < (2, 10)


ENABLED = affected(torch.__version__)

_held: dict[int, torch.UntypedStorage] = {}  # StorageImpl address -> its storage object
_use_count = getattr(torch._C, "_storage_Use_Count", None)
MIN_SWEEP = 64
_since_sweep = 0  # storages held since the last sweep


def hold(keys: list[int], stores: list[torch.UntypedStorage]) -> None:
    """Hold each storage object of ``stores`` (registered at ``keys``)."""
    global _since_sweep
    _held.update(zip(keys, stores))
    _since_sweep += len(stores)


def let_go(key: int) -> torch.UntypedStorage | None:
    """Stop holding the storage at ``key``; returns it, for the caller to drop outside the
    lock (its death runs the registry's callback)."""
    return _held.pop(key, None)


def sweep(force: bool = False) -> list[torch.UntypedStorage]:
    """Let go of the storages no tensor uses any more and whose object nothing else holds,
    when due (or ``force``); returns them, for the caller to drop outside the lock. Due once
    as many storages were held since the last sweep as are held now (at least
    :data:`MIN_SWEEP`): a sweep's cost is spread over as many releases, and what dropped
    paged-out tensors hold is bounded by the releases between two sweeps;
    ``OffloadManager.synchronize`` forces one. Never where torch has no use count (then a
    storage is held until unregistered)."""
    global _since_sweep
    if (not force and _since_sweep < max(MIN_SWEEP, len(_held))) or _use_count is None:
        return []
    _since_sweep = 0
    unused = [key for key, n in _references(_held) if n <= _ONLY_HELD
              and _use_count(_held[key]._cdata) <= 1]
    return [_held.pop(key) for key in unused]


def _references(held: dict[int, object]) -> list[tuple[int, int]]:
    """(key, references to its object) of each of ``held``."""
    return [(key, getrefcount(s)) for key, s in held.items()]


# The references an object that ``held`` alone holds has in _references (its own: the loop's,
# the call's...). One with more is held elsewhere too (e.g. ``s = t.untyped_storage()``): a
# tensor can be made on it again (``set_``), so it is no storage no tensor uses; let go, the
# collector could then clear its watch while that tensor lives.
_ONLY_HELD = _references({0: object()})[0][1]

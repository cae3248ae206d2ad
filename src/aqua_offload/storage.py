"""Paging a tensor's whole storage out and back in place.

Note [In-place paging]
``release=True`` must page out *every* view of a storage and keep object identities, so it acts
on the StorageImpl, not on a tensor: ``UntypedStorage._swap_data_ptr_`` moves the storage's
memory into a zero-byte *holder* storage, leaving the original storage empty (0 bytes) for
every tensor that views it. Fetching allocates fresh memory, copies into it, and swaps it in.

The holder owns the old memory, which the offload copy may still be reading. It must outlive
that copy (DESIGN.md section 4):
  - CUDA: ``record_stream(copy_stream)`` on the holder, then drop it; the caching allocator
    hands the block to new work only after the copy stream passed that point.
  - emulation: the handle keeps the holder until the copy's event completed (the manager reaps
    holders on later calls, and in wait/fetch/free/synchronize).

A module-wide registry maps each paged-out storage to its handle, so a second ``release`` of
the same storage (through any view, from any manager) is refused, ``is_offloaded`` answers,
and a paged-out tensor can always be fetched back even if its handle was dropped.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

import torch

from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from .handle import Handle

__all__ = ["is_offloaded"]

_lock = threading.Lock()
_registry: dict[int, Any] = {}  # StorageImpl address -> Handle (or a reservation token)


def storage_key(t: torch.Tensor) -> int:
    return int(t.untyped_storage()._cdata)


def is_offloaded(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage is paged out (offloaded with ``release=True``, not yet fetched).

    Touching such a tensor reads freed memory: on the CPU it can crash the process, on a GPU it
    faults the CUDA context. Fetch it first, or run under :func:`aqua_offload.debug_guard`.
    """
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"is_offloaded expects a torch.Tensor, got {type(t).__name__}")
    return storage_key(t) in _registry


def any_offloaded() -> bool:
    return bool(_registry)


def owner(t: torch.Tensor) -> "Handle | None":
    """The handle holding ``t``'s paged-out storage, if any."""
    found = _registry.get(storage_key(t))
    return None if found is None or isinstance(found, _Reservation) else found


class _Reservation:
    """Placeholder while an offload of the storage is being submitted."""


def reserve(t: torch.Tensor, what: str) -> tuple[int, _Reservation]:
    key = storage_key(t)
    token = _Reservation()
    with _lock:
        if key in _registry:
            raise InvalidArgumentError(
                f"{what}: the tensor's storage is already paged out (or being paged out); fetch "
                "its handle first")
        _registry[key] = token
    return key, token


def commit(key: int, token: _Reservation, handle: "Handle") -> None:
    with _lock:
        assert _registry.get(key) is token
        _registry[key] = handle


def unregister(key: int, expected: Any) -> None:
    with _lock:
        if _registry.get(key) is expected:
            del _registry[key]


def swap_out(storage: torch.UntypedStorage) -> torch.UntypedStorage:
    """Move ``storage``'s memory into a new holder storage; ``storage`` is left with 0 bytes."""
    holder = torch.UntypedStorage(0, device=storage.device)
    storage._swap_data_ptr_(holder)
    return holder


def swap_in(storage: torch.UntypedStorage, filled: torch.UntypedStorage) -> None:
    """Give the empty ``storage`` the memory of ``filled`` (which is left with 0 bytes)."""
    storage._swap_data_ptr_(filled)


# Note [Deferred snapshots]
# offload(t, release=False, fence="deferred") does not make the current stream wait for the
# copy; the caller promises to call handle.fence() before it writes t again. Sources with such
# a copy unfenced are registered here (StorageImpl address -> handles) so debug_guard can turn
# a premature write into an error. The source's memory itself is kept alive by the manager
# (record_stream on CUDA, a holder on emulation), whatever the caller does.
_deferred: dict[int, list[Any]] = {}  # storage key -> weak references to unfenced handles


def defer(t: torch.Tensor, handle: Any) -> int:
    """Register ``t``'s storage as the source of ``handle``'s unfenced copy; returns the key."""
    key = storage_key(t)
    with _lock:
        _deferred.setdefault(key, []).append(weakref.ref(handle))
    return key


def undefer(key: int, handle: Any) -> None:
    with _lock:
        waiting = _deferred.get(key)
        if waiting is None:
            return
        waiting[:] = [r for r in waiting if r() is not None and r() is not handle]
        if not waiting:
            del _deferred[key]


def any_deferred() -> bool:
    return bool(_deferred)


def deferred_unfenced(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage is the source of a deferred snapshot not yet fenced."""
    waiting = _deferred.get(storage_key(t))
    return waiting is not None and any(r() is not None for r in waiting)


def snapshot_source(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes a snapshot copies: lazy conjugate/negative views and strides materialised."""
    if is_offloaded(tensor):
        raise InvalidArgumentError("offload(release=False): the tensor's storage is paged out; "
                                   "fetch its handle first")
    return tensor.resolve_conj().resolve_neg().contiguous()

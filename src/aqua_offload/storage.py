"""Paging a tensor's whole storage out and back in place, and the registry of paged storages.

Note [In-place paging]
``release=True`` must page out *every* view of a storage and keep object identities, so it acts
on the StorageImpl, not on a tensor: ``UntypedStorage._swap_data_ptr_`` moves the storage's
memory into a zero-byte *holder* storage, leaving the original storage empty (0 bytes) for
every tensor that views it. Fetching allocates fresh memory, copies into it, and swaps it in.

The holder owns the old memory, which the offload copy may still be reading. It must outlive
that copy (DESIGN.md section 4): ``record_stream(copy_stream)`` on CUDA, a holder kept until
the copy's event completed on emulation (holders.py).

Only memory the storage owns alone can be paged out this way: a storage shared with another
process (``share_memory_()``, a file mapping) or aliased by an array that reached it through
DLPack or the buffer protocol (numpy, CuPy, JAX) would be detached, and the other side would
write into freed memory. Such storages are refused (:func:`check_sole_owner`); snapshots of
them are fine.

Note [Paging registry]
A module-wide registry maps each paged storage (by StorageImpl address) to its handle, so a
second ``release`` of the same storage (through any view, from any manager) is refused,
``is_offloaded`` answers, and a paged-out tensor can always be fetched even if its handle was
dropped. The registry holds the handle; the handle holds its storage weakly. A weak reference
with a callback on the storage's Python object (:class:`_Watch`; torch preserves the object
exactly as long as the StorageImpl lives) drops the entry when the last tensor of the storage
dies: a paged-out tensor dropped with its handle then gives its tier bytes back. (Not
``weakref.finalize``: ten times the cost, paid per storage by a batch of small tensors.) A
released storage whose handle was freed (or closed without restoring) stays registered as
*discarded* until it dies: it has no data, touching it would crash, so the guard refuses it and
so does a new offload. On torch 2.9 and older the registry also holds the storage objects
strongly (Note [Storage objects and the cyclic GC] in storage_pins.py).
"""

from __future__ import annotations

import operator
import os
import threading
import weakref
from itertools import repeat
from operator import is_, is_not
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch.utils._python_dispatch import _disable_current_modes

from . import storage_pins as pins
from .errors import InvalidArgumentError, PagedOutError

if TYPE_CHECKING:
    from .handle import Handle

__all__ = ["is_offloaded", "is_discarded"]

_lock = threading.RLock()  # dropping an entry can run a Handle's __del__, which frees
_registry: dict[int, Any] = {}  # StorageImpl address -> Handle, reservation or _Discarded
_watched: dict[int, "_Watch"] = {}  # address -> the weak reference watching its storage object


def _after_fork_in_child() -> None:
    # A thread of the parent may hold the lock at fork (a batch holds it while it reserves its
    # storages): no thread of the child ever lets it go, and the child's first release, or its
    # first paged-out tensor to die, would hang. The child starts with a free one.
    global _lock
    _lock = threading.RLock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Discarded:
    """The storage's data is gone (Note [Paging registry]); ``storage`` is a weak reference,
    so a new storage at a reused address is never mistaken for it."""

    def __init__(self, storage: torch.UntypedStorage) -> None:
        self.storage = weakref.ref(storage)


class _Reservation:
    """Placeholder while an offload of the storage is being submitted (one per batch)."""


class _Watch(weakref.ref):
    """A weak reference to a paged storage's Python object whose callback drops the storage's
    registry entry when the object dies (Note [Paging registry])."""

    __slots__ = ("key",)


def storage_key(t: torch.Tensor) -> int:
    return int(t.untyped_storage()._cdata)


def _entry(t: torch.Tensor) -> Any:
    """The registry entry of ``t``'s storage, if it is really this storage's (an address can be
    reused by a new storage before a dead one's entry is gone)."""
    s = t.untyped_storage()
    entry = _registry.get(int(s._cdata))
    if isinstance(entry, _Discarded):
        return entry if entry.storage() is s else None
    if entry is not None and not isinstance(entry, _Reservation):
        ref = entry._storage
        return entry if ref is None or ref() is s else None
    return entry


def is_offloaded(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage is paged out (offloaded with ``release=True``, not yet fetched).

    Touching such a tensor reads freed memory: on the CPU it can crash the process, on a GPU it
    faults the CUDA context. Fetch it first, or run under :func:`aqua_offload.debug_guard`.
    """
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"is_offloaded expects a torch.Tensor, got {type(t).__name__}")
    return _type_of(_entry(t)) == "handle"


def is_discarded(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage was paged out and its handle freed (or its manager closed without
    restoring): the data is gone and the storage has 0 bytes; touching it would crash."""
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(f"is_discarded expects a torch.Tensor, got {type(t).__name__}")
    return isinstance(_entry(t), _Discarded)


def _type_of(entry: Any) -> str | None:
    if entry is None:
        return None
    if isinstance(entry, _Discarded):
        return "discarded"
    return "reserved" if isinstance(entry, _Reservation) else "handle"


def any_offloaded() -> bool:
    return bool(_registry)


_UNSAFE = {"handle": "paged out", "discarded": "discarded"}


def unsafe_to_touch(t: torch.Tensor) -> str | None:
    """``"paged out"`` or ``"discarded"`` when touching ``t`` would read freed memory."""
    if t.untyped_storage()._cdata not in _registry:  # the usual answer, at once
        return None
    return _UNSAFE.get(_type_of(_entry(t)) or "")


def owner(t: torch.Tensor) -> "Handle | None":
    """The handle holding ``t``'s paged-out storage, if any."""
    found = _entry(t)
    return found if _type_of(found) == "handle" else None


def handles_of(manager: Any) -> list["Handle"]:
    """Every paged-out storage's handle that belongs to ``manager``."""
    with _lock:
        return [h for h in list(_registry.values())
                if _type_of(h) == "handle" and h._manager is manager]


def reserve(stores: list[torch.UntypedStorage], what: str, reserved: list[tuple[int, Any]],
            watches: list["_Watch"]) -> None:
    """Check (:func:`check_sole_owner`) and reserve each storage for a release, in order,
    appending ``(key, token)`` to ``reserved`` *before* registering it: an interrupt or an error
    anywhere leaves nothing the caller cannot undo with :func:`unregister` (Note [Interrupted
    batches] in manager.py). One lock and one token for the whole batch. The weak reference
    watching each storage (made now if it has none: a storage that stays unregistered keeps
    it until it dies, harmlessly) is appended to ``watches``, for its handle to use as its own.
    Errors name the call as ``what(release=True)``.
    """
    token = _Reservation()
    # The usual batch (sole owners, none registered, none twice) passes C loops over it, and
    # is reserved by two C calls (each done or not: no Python line between two storages);
    # anything else, or a few storages, takes the loop below, which finds the first problem,
    # with its message.
    keys = list(map(_cdata_of, stores)) if len(stores) > 4 else None
    stale: list[Any] = []  # dead storages' entries at reused addresses: dropped outside the lock
    with _lock:
        if pins.ENABLED:  # (Note [Storage objects and the cyclic GC] in storage_pins.py)
            stale += pins.sweep()
        if (keys is not None and all(map(_resizable, stores)) and _exported.isdisjoint(keys)
                and (not any(map(_is_shared, stores)) or not any(map(_shared, stores)))
                and _registry.keys().isdisjoint(keys) and len(set(keys)) == len(keys)):
            reserved.extend(zip(keys, repeat(token)))
            _registry.update(zip(keys, repeat(token)))
            if pins.ENABLED:
                pins.hold(keys, stores)
            ws = list(map(_watched.get, keys))
            if all(map(is_not, ws, repeat(None))) and all(map(is_, map(_referent, ws), stores)):
                watches.extend(ws)  # watched since an earlier release: the same weak references
                return
            for s, key, w in zip(stores, keys, ws):
                if w is None or w() is not s:
                    w = _Watch(s, _storage_died); w.key = key; _watched[key] = w  # noqa: E702
                watches.append(w)
            return
        for s in stores:
            key = s._cdata
            if not s.resizable() or _shared(s) or key in _exported:  # _not_sole_owner
                raise InvalidArgumentError(
                    f"{what}(release=True): {_not_sole_owner(s)}; use release=False")
            entry = _registry.get(key)
            if entry is not None:
                if isinstance(entry, _Discarded):
                    if entry.storage() is s:
                        raise InvalidArgumentError(
                            f"{what}(release=True): the tensor's storage was paged out and its "
                            "handle freed (or its manager closed without restoring): its data is "
                            "gone; make a new tensor")
                elif isinstance(entry, _Reservation) or entry._storage is None \
                        or entry._storage() is s:
                    raise InvalidArgumentError(
                        f"{what}(release=True): the tensor's storage is already paged out (or "
                        "being paged out); fetch its handle first")
                stale.append(entry)
            reserved.append((key, token))
            _registry[key] = token
            if pins.ENABLED:
                pins.hold([key], [s])
            w = _watched.get(key)
            if w is None or w() is not s:  # (a dead one: its callback was interrupted)
                # one line: no traced interrupt between making the watch and keeping it
                w = _Watch(s, _storage_died); w.key = key; _watched[key] = w  # noqa: E702
            watches.append(w)
    del stale


def commit(reserved: list[tuple[int, Any]], handles: list["Handle"]) -> None:
    """The reserved storages are paged out now, each held by its handle (Note [Paging
    registry]; :func:`reserve` watches them). Idempotent."""
    with _lock:
        for (key, token), handle in zip(reserved, handles):
            if _registry.get(key) is token:
                _registry[key] = handle


def _storage_died(watch: _Watch) -> None:
    entry = None
    try:
        key = watch.key
        with _lock:
            # Only the current watch of the address speaks for its entry. A storage object
            # can die after its StorageImpl did (kept in a reference cycle, e.g. by an
            # exception's traceback, and collected late: seen on torch 2.3), when a live
            # storage at the reused address is registered with a watch of its own.
            if _watched.get(key) is not watch:
                return
            del _watched[key]
            if not isinstance(_registry.get(key), _Reservation):
                entry = _registry.pop(key, None)
    except Exception:  # noqa: BLE001 - interpreter teardown: the module is half gone
        return
    del entry  # outside the lock: the handle may die now, and its __del__ frees its block


def sweep_pins() -> bool:
    """Let go of the held storage objects no tensor uses any more (torch <= 2.9; Note
    [Storage objects and the cyclic GC] in storage_pins.py); a no-op elsewhere. Whether it
    let go of any."""
    if not pins.ENABLED:
        return False
    with _lock:
        gone = pins.sweep(force=True)
    found = bool(gone)
    gone.clear()  # outside the lock: their deaths drop their entries, and handles die
    return found


def unregister(key: int, expected: Any) -> None:
    held = None
    with _lock:
        entry = _registry.pop(key) if _registry.get(key) is expected else None
        if entry is not None and pins.ENABLED:
            held = pins.let_go(key)
    del entry, held


def unregister_many(pairs: Iterable[tuple[int, Any]]) -> None:
    """:func:`unregister` of each ``(key, expected)``, under one lock."""
    entries = []  # dropped outside the lock
    with _lock:
        for key, expected in pairs:  # a loop: an interrupted comprehension can skip the
            if _registry.get(key) is expected:  # lock's exit on 3.12 (paging.page_out)
                entries.append(_registry.pop(key))
                if pins.ENABLED:
                    entries.append(pins.let_go(key))
    del entries


def discard(key: int, expected: Any) -> None:
    """The storage's data is gone for good (its handle was freed): keep it marked until it dies."""
    with _lock:  # (the caller holds ``expected``: it cannot die in here)
        if _registry.get(key) is expected:
            storage = expected._storage() if expected._storage is not None else None
            if storage is not None:  # replaced in one step: an interrupt between a pop and a
                _registry[key] = _Discarded(storage)  # new entry left it unmarked, touchable
            else:  # (dead: nothing held for it)
                del _registry[key]


def not_sole_owner(t: torch.Tensor) -> str | None:
    """Why other owners can reach ``t``'s storage (Note [In-place paging]), or None."""
    return _not_sole_owner(t.untyped_storage())


def _shared(s: torch.UntypedStorage) -> bool:
    # torch answers is_shared() True for every CUDA storage (CUDA IPC needs no marking), so
    # only host storages carry the mark of share_memory_() or a file mapping.
    return s.device.type == "cpu" and s.is_shared()


def _not_sole_owner(s: torch.UntypedStorage) -> str | None:
    if not s.resizable():
        return ("this storage is not owned by torch's allocator alone (made by "
                "torch.from_numpy, from_dlpack or from a buffer, or exposed by tensor.numpy()), "
                "so it cannot be paged out in place")
    if _shared(s):
        return ("this storage is shared with other processes (share_memory_() or a file "
                "mapping): paging it out would hide their writes")
    if s._cdata in _exported:
        return ("this storage was exported through DLPack or __cuda_array_interface__ "
                "(numpy, CuPy, JAX...): the alias would write into freed memory")
    return None


def check_sole_owner(t: torch.Tensor, what: str) -> None:
    """Refuse a storage that other owners can reach (Note [In-place paging])."""
    why = not_sole_owner(t)
    if why is not None:
        raise InvalidArgumentError(f"{what}: {why}; use release=False")


# Note [Exported storages]
# torch marks a storage non-resizable when tensor.numpy() exposes it, which check_sole_owner
# sees; it does nothing when a tensor is exported through DLPack (np.from_dlpack, CuPy, JAX) or
# __cuda_array_interface__. So importing aqua_offload wraps those two exports to remember the
# storage (until it dies, as torch's own mark lasts), and a release of it is refused. Exports
# made before aqua_offload was imported are not seen.
_exported: set[int] = set()


def _mark_exported(t: torch.Tensor) -> None:
    try:
        storage = t.untyped_storage()
    except Exception:  # not a plain tensor (sparse, meta...): nothing we could page out anyway
        return
    key = int(storage._cdata)
    with _lock:
        fresh = key not in _exported
        _exported.add(key)
        if fresh and pins.ENABLED:  # (a collected cycle could clear the mark: storage_pins)
            pins.hold([key], [storage])
    if fresh:
        weakref.finalize(storage, _exported.discard, key)


def _unsafe_or_none(t: Any) -> str | None:
    """:func:`unsafe_to_touch` for the wrappers below, which see every tensor: one without a
    storage of its own (a sparse, meta or wrapper subclass tensor) is never ours."""
    if not isinstance(t, torch.Tensor) or not any_offloaded():
        return None
    try:
        return unsafe_to_touch(t)
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _refuse_unsafe(t: Any, what: str) -> None:
    """Note [Never exported while paged out]."""
    unsafe = _unsafe_or_none(t)
    if unsafe is not None:
        raise PagedOutError(f"{what} of a tensor of shape {tuple(t.shape)} whose storage is "
                            f"{unsafe}: it would expose freed memory (or save nothing); "
                            "fetch its handle first (aqua_offload.fetch)")


def _wrap_exports() -> None:
    # Note [Never exported while paged out]
    # Beyond remembering exports (Note [Exported storages]), the same wrappers refuse to export a
    # paged-out or discarded storage (an alias of freed memory), pickling and torch.save refuse
    # it (they would save 0 bytes as if they were the data), and repr() shows what it is
    # instead of reading freed memory: torch's printing turns dispatch modes off, so
    # debug_guard cannot see it, and a print of a paged-out tensor was a segfault.
    if getattr(torch.Tensor.__dlpack__, "_aqua_wrapped", False):
        return
    dlpack = torch.Tensor.__dlpack__

    def __dlpack__(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        _refuse_unsafe(self, "a DLPack export")
        _mark_exported(self)
        return dlpack(self, *args, **kwargs)

    __dlpack__._aqua_wrapped = True  # type: ignore[attr-defined]
    __dlpack__.__doc__ = dlpack.__doc__
    torch.Tensor.__dlpack__ = __dlpack__  # type: ignore[method-assign]
    cai = torch.Tensor.__dict__.get("__cuda_array_interface__")
    if isinstance(cai, property) and cai.fget is not None:
        getter = cai.fget

        def interface(self: torch.Tensor) -> Any:
            _refuse_unsafe(self, "__cuda_array_interface__")
            _mark_exported(self)
            return getter(self)

        torch.Tensor.__cuda_array_interface__ = property(interface, doc=cai.__doc__)  # type: ignore[misc]
    import torch.utils.dlpack as tud

    to_dlpack = tud.to_dlpack

    def wrapped_to_dlpack(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        _refuse_unsafe(tensor, "a DLPack export")
        _mark_exported(tensor)
        return to_dlpack(tensor, *args, **kwargs)

    wrapped_to_dlpack.__doc__ = to_dlpack.__doc__
    tud.to_dlpack = wrapped_to_dlpack
    if getattr(torch, "to_dlpack", None) is to_dlpack:  # the same function, re-exported
        torch.to_dlpack = wrapped_to_dlpack
    reduce_ex = torch.Tensor.__reduce_ex__

    def __reduce_ex__(self: torch.Tensor, protocol: Any) -> Any:
        _refuse_unsafe(self, "pickling (or torch.save)")
        return reduce_ex(self, protocol)

    torch.Tensor.__reduce_ex__ = __reduce_ex__  # type: ignore[method-assign]
    tensor_repr = torch.Tensor.__repr__

    def __repr__(self: torch.Tensor, *args: Any, **kwargs: Any) -> str:
        unsafe = _unsafe_or_none(self)
        if unsafe is not None:
            return (f"tensor(<{unsafe} by aqua_offload>, shape={tuple(self.shape)}, "
                    f"dtype={self.dtype}, device={self.device})")
        return tensor_repr(self, *args, **kwargs)

    torch.Tensor.__repr__ = __repr__  # type: ignore[method-assign]


_wrap_exports()


# Note [Without _swap_data_ptr_]
# torch 2.11 and older have no UntypedStorage._swap_data_ptr_. There a release frees the
# storage's memory in place (resize_(0)) instead of handing it to a holder: on CUDA after
# record_stream(copy stream), so the caching allocator reuses it only once the copy read it;
# on emulation after waiting for the copy (paging.py). A fetch gives the storage its memory
# back first (:func:`regrow`: resize_, on the current stream, before the core records its
# event) and the core fetches straight into it: the bytes are needed once and copied once (a
# fresh buffer and a copy into the storage would need a large state twice, on a GPU that is
# full when it pages state in). If the core's fetch does not happen (an error, an interrupt
# before it), the caller pages the regrown storages out again (:func:`shrink`: nothing ran
# into them, Note [Abort rule] of the core). A prefetched release still copies its prefetch
# buffer into the storage (:func:`swap_in`); that copy and the resize_ before it are two
# calls, so swap_in is idempotent and a re-run after an interrupt (Note [Interrupted batches]
# in manager.py) does it again whatever the storage's size (:func:`to_swap_in`); with
# _swap_data_ptr_ each step is one C call.
CAN_SWAP = hasattr(torch.UntypedStorage, "_swap_data_ptr_")


def to_swap_in(storage: torch.UntypedStorage, nbytes: int) -> bool:
    """Whether a fetch of a release of ``nbytes`` still has to give ``storage`` its bytes:
    it is still empty, or (Note [Without _swap_data_ptr_]) the copy may not have run."""
    return nbytes != 0 and (storage.nbytes() == 0 or not CAN_SWAP)


_swap_data_ptr = getattr(torch.UntypedStorage, "_swap_data_ptr_", None)  # (returns None)
_nbytes = torch.UntypedStorage.nbytes


def swap_out(storage: torch.UntypedStorage, holder: torch.UntypedStorage) -> None:
    """Move ``storage``'s memory into the empty ``holder``; ``storage`` is left with 0 bytes.
    One C call: it either happened or not (the caller made ``holder`` beforehand). Only where
    :data:`CAN_SWAP` (else see paging.py)."""
    storage._swap_data_ptr_(holder)


def swap_out_many(stores: list[torch.UntypedStorage], holders: list[torch.UntypedStorage],
                  sizes: list[int]) -> None:
    """:func:`swap_out` of each storage of ``sizes[i]`` bytes into ``holders[i]``, unless it
    has none or is swapped out already (idempotent). Only where :data:`CAN_SWAP`."""
    if len(stores) > 4 and all(sizes) and all(map(_nbytes, stores)):  # none swapped yet: one
        any(map(_swap_data_ptr, stores, holders))  # C loop (all or none, but for an error: the
        return                                     # loop below)
    for s, holder, n in zip(stores, holders, sizes):
        if n and s.nbytes() != 0:
            swap_out(s, holder)


def swap_in(storage: torch.UntypedStorage, filled: torch.UntypedStorage) -> None:
    """Give the empty ``storage`` the bytes of ``filled``: its memory where :data:`CAN_SWAP`
    (``filled`` is left with 0 bytes), else a copy on the current stream (nothing when the
    core fetched into ``storage`` itself, :func:`regrow`)."""
    if CAN_SWAP:
        storage._swap_data_ptr_(filled)
    elif filled._cdata != storage._cdata:
        if storage.nbytes() != filled.nbytes():
            storage.resize_(filled.nbytes())
        with _disable_current_modes():  # (a debug_guard would see a paged-out storage)
            storage.copy_(filled)


def regrow(storage: torch.UntypedStorage, nbytes: int) -> None:
    """Give a paged-out storage ``nbytes`` of memory for a fetch to fill (Note [Without
    _swap_data_ptr_]); allocated on the current stream (CUDA)."""
    with _disable_current_modes():  # (a debug_guard would see a paged-out storage)
        storage.resize_(nbytes)


def shrink(stores: list[torch.UntypedStorage]) -> None:
    """Page storages :func:`regrow` gave memory out again: the fetch they were for did not
    happen, so nothing was written into them (Note [Without _swap_data_ptr_])."""
    if stores:
        with _disable_current_modes():
            for s in stores:
                s.resize_(0)


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


def undefer_handle(handle: Any) -> None:
    """The source of ``handle`` (a deferred snapshot) needs no fence any more: a fetch ordered
    the current stream after the offload copy, or the snapshot is dropped (whatever the copy
    reads then no longer matters; the source's memory is kept alive regardless)."""
    if handle._deferred is not None:
        undefer(handle._deferred, handle)
        handle._deferred = None


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


def snapshot_sources(tensors: list[torch.Tensor],
                     dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    """:func:`snapshot_source` of each tensor (the first refusal raises), by C loops over the
    batch when none is paged out, discarded, conjugated or negated (the usual case).
    ``dtypes``: the tensors' (only a complex tensor can be a lazy conjugate)."""
    if len(tensors) == 1:  # (the loops cost more than they save for one)
        return [snapshot_source(tensors[0])]
    if _registry and not _registry.keys().isdisjoint(map(_cdata_of, map(_untyped, tensors))):
        return [snapshot_source(t) for t in tensors]  # (all_touchable, inline)
    complex_ = not _REAL.issuperset(dtypes)
    if set(map(type, tensors)) <= _TENSOR:  # torch's methods unbound: half the cost
        if (complex_ and any(map(torch.Tensor.is_conj, tensors))) \
                or any(map(torch.Tensor.is_neg, tensors)):
            return [snapshot_source(t) for t in tensors]
        return list(map(torch.Tensor.contiguous, tensors))
    if (complex_ and any(map(_is_conj, tensors))) or any(map(_is_neg, tensors)):  # (a
        return [snapshot_source(t) for t in tensors]                            # subclass's own)
    return list(map(_contiguous, tensors))


def all_touchable(tensors: list[torch.Tensor]) -> bool:
    """True when no tensor's storage is in the registry (so :func:`unsafe_to_touch` says None
    for each): the usual answer, from C loops. False means: ask each."""
    return not _registry or _registry.keys().isdisjoint(map(_cdata_of, map(_untyped, tensors)))


_TENSOR = {torch.Tensor}
_cdata_of = operator.attrgetter("_cdata")
_resizable = torch.UntypedStorage.resizable  # (unbound: the storages are torch's own type)
_is_shared = torch.UntypedStorage.is_shared
_referent = weakref.ref.__call__
_untyped = operator.methodcaller("untyped_storage")
_is_conj = operator.methodcaller("is_conj")
# dtypes whose tensors are never lazy conjugates (one not listed is checked)
_REAL = frozenset(t for t in vars(torch).values()
                  if isinstance(t, torch.dtype) and not t.is_complex)
_is_neg = operator.methodcaller("is_neg")
_contiguous = operator.methodcaller("contiguous")


def snapshot_source(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes a snapshot copies: lazy conjugate/negative views and strides materialised."""
    unsafe = unsafe_to_touch(tensor)
    if unsafe == "paged out":
        raise InvalidArgumentError("offload(release=False): the tensor's storage is paged out; "
                                   "fetch its handle first")
    if unsafe == "discarded":
        raise InvalidArgumentError("offload(release=False): the tensor's storage was discarded "
                                   "(its handle freed): its data is gone")
    return tensor.resolve_conj().resolve_neg().contiguous()

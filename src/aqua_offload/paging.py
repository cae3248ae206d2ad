"""The manager's side of in-place paging (Note [In-place paging] in storage.py), and of every
fetch.

After the core accepted a batch of releases, each storage is swapped out and its memory kept
alive for the copy still reading it; after the core fetched a batch, each handle's Python side
is finished (a release's storage swapped back in, a snapshot or array returned). Both steps are
idempotent per handle, so an interrupted batch is finished from its exception handler (Note
[Interrupted batches] in manager.py).
"""

from __future__ import annotations

import operator
from itertools import repeat
from operator import is_, is_not
from typing import TYPE_CHECKING, Any

import torch

from . import arrays, prefetching, storage
from .checks import check_out, check_outs
from .devices import current_stream
from .errors import InvalidArgumentError, InvalidHandleError
from .handle import Handle

if TYPE_CHECKING:
    from .manager import OffloadManager

__all__ = ["page_out", "page_in", "fetch_claimed", "destination", "destinations",
           "plain_snapshots", "restore", "restore_all", "keep_alive", "keep_alive_many", "forget"]


def page_out(m: "OffloadManager", tensors: list[torch.Tensor], dtypes: list[torch.dtype],
             prio: float, bases: list[Handle | None], base_ids: list[int],
             what: str) -> list[Handle]:
    """Release: reserve every storage, let the core copy them, then swap each out (``dtypes``:
    the tensors', checks.check_offload)."""
    # (C loops over the batch; torch's methods unbound when every tensor is torch's own type)
    stores = list(map(torch.Tensor.untyped_storage if set(map(type, tensors)) <= _TENSOR
                      else _untyped, tensors))
    # Empty holders made beforehand, so that swapping a storage out is one C call. On CUDA a
    # holder is an empty tensor, swapped through its storage: record_stream takes the tensor
    # as it is (a bare storage would need a tensor made around it, per storage). On the CPU
    # a bare storage, made below (once reserve() has refused storages without an allocator,
    # such as numpy's, on which s.new() crashes). On CUDA without _swap_data_ptr_ (torch <=
    # 2.11) none: the storage itself is freed after record_stream (_free_after_copy).
    holders: list[Any] = []
    holder_stores: list[torch.UntypedStorage] = []
    if m._cuda and storage.CAN_SWAP:
        holders = [torch.empty(0, dtype=torch.uint8, device=m.device) for _ in stores]
        holder_stores = list(map(torch.Tensor.untyped_storage, holders))
    sizes = list(map(_storage_nbytes, stores))
    reserved: list[tuple[int, Any]] = []
    watches: list[Any] = []  # the registry's weak reference to each storage
    got: list[tuple[int, int]] = []  # filled by the core before it returns
    handles: list[Handle | None] = [None] * len(tensors)

    def finish() -> None:  # idempotent (Note [Interrupted batches])
        if None in handles:  # all made at once (one line), or none yet
            handles[:] = m._new_handle(got, tensors, dtypes, sizes, prio, reserved, watches)
        for h in handles:  # once stored: adopted by a re-run, whatever interrupts
            h._adopted = True  # (Note [Orphans] in manager.py)
        if storage.CAN_SWAP:
            storage.swap_out_many(stores, holder_stores, sizes)
        else:
            for i, (cid, tier) in enumerate(got):
                if sizes[i] and stores[i].nbytes() != 0:
                    _free_after_copy(m, stores[i], cid, tier)
        storage.commit(reserved, handles)  # type: ignore[arg-type]
        keep_alive_many(m, got, holders, sizes)
        if bases.count(None) != len(bases):
            for i, (cid, _tier) in enumerate(got):
                if bases[i] is not None:  # consumed (see snapshots.take)
                    m._holders.transfer(bases[i]._id, cid)
                    bases[i]._end("freed")

    # Built before anything is reserved: on Python 3.12 an exception raised inside an inlined
    # comprehension by a trace function can skip the handler below (seen with 3.12.1).
    items = list(zip(map(_storage_data_ptr, stores), sizes, repeat(prio), base_ids))
    stream = current_stream(m.device)
    try:
        storage.reserve(stores, what, reserved, watches)
        if not m._cuda:  # (s.new(): half the cost of torch.UntypedStorage(), which parses)
            holders = holder_stores = list(map(torch.UntypedStorage.new, stores))
        m._store.offload_many(items, stream, False, got)
        finish()
    except BaseException:
        if got:  # the core accepted the batch: every tensor ends paged out
            finish()
        else:  # nothing was swapped: the data is where it was
            storage.unregister_many(reserved)
        raise
    return handles  # type: ignore[return-value]


_untyped = operator.methodcaller("untyped_storage")
_storage_nbytes = torch.UntypedStorage.nbytes  # (unbound: storages are torch's own type)
_storage_data_ptr = torch.UntypedStorage.data_ptr


def _free_after_copy(m: "OffloadManager", s: torch.UntypedStorage, core_id: int,
                     tier: int) -> None:
    """Release without ``_swap_data_ptr_`` (Note [Without _swap_data_ptr_] in storage.py):
    free ``s``'s memory once the offload copy of ``core_id`` no longer reads it."""
    if m._cuda:
        m._record_stream(s, m._stream(tier, "to_tier"))
    else:
        m._store.wait(core_id)
    s.resize_(0)


def keep_alive(m: "OffloadManager", core_id: int, tier: int, memory: Any,
               dropped_now: bool) -> None:
    """``memory`` may still be read by the offload copy of ``core_id``: keep it until then.
    On CUDA, memory ``dropped_now`` (a paged-out storage's holder) is handed to the
    allocator with record_stream: it records its event at once. Memory the caller may keep
    (a deferred snapshot's source) is held here instead: record_stream would make its
    eventual free record on a copy stream close() may have destroyed by then."""
    if m._cuda and dropped_now:
        m._record_stream(memory, m._stream(tier, "to_tier"))
    else:
        m._holders.hold(core_id, memory)

def keep_alive_many(m: "OffloadManager", got: list[tuple[int, int]], holders: list[Any],
                    sizes: list[int]) -> None:
    """:func:`keep_alive` of the holder of each paged-out storage (dropped now), by the
    ``(core_id, tier)`` of its copy in ``got``; a storage of 0 ``sizes`` has nothing to keep.
    Holders under one lock."""
    if m._cuda:
        for (core_id, tier), memory, n in zip(got, holders, sizes):
            if n:
                m._record_stream(memory, m._stream(tier, "to_tier"))
    elif all(sizes):
        m._holders.hold_many(map(_first, got), holders)
    else:
        m._holders.hold_many([cid for (cid, _tier), n in zip(got, sizes) if n],
                             [memory for memory, n in zip(holders, sizes) if n])


def forget(m: "OffloadManager", got: list[tuple[int, int]]) -> None:
    """Drop core handles no Python handle was made for (an interrupted batch)."""
    for cid, _tier in got:
        try:
            m._store.wait(cid)  # its copy may read memory the caller is about to drop
            m._store.free(cid)
        except Exception:
            pass


def page_in(h: Handle, dest: Any) -> torch.Tensor:
    """After the core fetched release handle ``h`` into ``dest`` (a storage, or a prefetch
    buffer): its storage gets ``dest``'s memory (every view sees the data again); returns the
    tensor fetch returns. Idempotent; :func:`restore_all` ends the handle afterwards."""
    filled = dest if isinstance(dest, torch.UntypedStorage) else dest.untyped_storage()
    s = h._storage() if h._storage is not None else None
    if s is None:  # every tensor of it is gone: a new one on the fetched bytes
        s = filled
    elif storage.to_swap_in(s, h.nbytes):
        storage.swap_in(s, filled)
    return h._restored_tensor(s)


def fetch_claimed(m: "OffloadManager", handles: list[Handle], outs: list[Any], keep: bool,
                  what: str) -> list[Any]:
    """The fetch of the claimed ``handles`` (``OffloadManager._fetch`` holds their locks):
    checked, fetched by the core in one call, each finished by :func:`restore_all`."""
    n = len(handles)
    if n > 1 and len(set(map(id, handles))) != n:
        raise InvalidArgumentError(f"{what}: a handle is listed twice")
    if len(outs) != n:
        raise InvalidArgumentError(f"{what}: outs must have one entry per handle")
    # A batch is checked by C loops first (check_outs); one handle at once by the loop. A
    # batch of tensor snapshots neither prefetched nor deferred (``plain``, the usual one) is
    # also fetched and finished by C loops.
    plain = n > 4 and plain_snapshots(handles)
    if n < 4 or "kept" in map(_state_of, handles) or not check_outs(handles, outs, m.device,
                                                                    plain):
        for h, o in zip(handles, outs):  # the first problem, in order, with its message
            if h._state == "kept":
                raise InvalidHandleError(
                    f"{what}: this handle is the kept copy of a tensor already restored; use "
                    "it as offload(..., base=h) or free it")
            if o is not None:
                if h.release or h._array is not None:
                    raise InvalidArgumentError(f"{what}: out= is for tensor snapshots; a "
                                               "released tensor is restored in place")
                check_out(o, h, m.device)
    done: list[bool] = []
    dests: list[Any] = []
    results: list[Any] = [None] * n
    ids = list(map(_id_of, handles))
    regrown: list[torch.UntypedStorage] = []  # (Note [Without _swap_data_ptr_] in storage.py)
    try:
        dests = destinations(m, handles, outs, plain, regrown)
        kinds = set(map(type, dests)) if n > 4 else None
        # (fresh storages are releases' own: no prefetch buffer, a tensor, among them)
        if n > 4 and (plain or kinds <= _STORAGE
                      or all(map(is_, map(_prefetch_of, handles), repeat(None)))) \
                and all(map(_nbytes_of, handles)):
            # a batch, by C loops (torch's method unbound where it can: half the cost)
            ptrs = list(map(torch.Tensor.data_ptr if kinds <= _TENSOR else
                            _storage_data_ptr if kinds <= _STORAGE else _data_ptr, dests))
        else:  # a loop: on Python 3.12.1 an exception a tracer raised in an inlined
            # comprehension here skipped the handler below, so the interrupt sweeps of the
            # tests failed (CPython's tracing: a signal's KeyboardInterrupt was handled)
            ptrs = []
            for h, d in zip(handles, dests):
                ptrs.append(0 if h._prefetch is not None or not h.nbytes else d.data_ptr())
        m._store.fetch_many(ids, ptrs, current_stream(m.device), keep, done)
        restore_all(m, handles, dests, outs, keep, results, plain, ids)
    except BaseException:
        if done:  # the core fetched them: finish the Python side regardless
            restore_all(m, handles, dests, outs, keep, results, plain, ids)
        else:  # nothing was fetched: the storages given memory for it are paged out again
            storage.shrink(regrown)
        raise
    return results


def destinations(m: "OffloadManager", handles: list[Handle], outs: list[torch.Tensor | None],
                 plain: bool = False, regrown: list[torch.UntypedStorage] | None = None
                 ) -> list[Any]:
    """:func:`destination` of each handle, in order (the first refusal raises). ``plain``:
    :func:`plain_snapshots` holds. Without ``_swap_data_ptr_`` a release's live storage is
    its own destination (Note [Without _swap_data_ptr_] in storage.py): it gets its memory
    back here, and is listed in ``regrown`` first, for the caller to page out again if the
    fetch does not happen."""
    if all(map(is_not, outs, repeat(None))):  # (only snapshots take an out: checked before)
        if plain or all(map(is_, map(_prefetch_of, handles), repeat(None))):
            return list(outs)  # snapshots fetched into their outs, in one C loop
    cuda, device = m._cuda, m.device
    in_place = not storage.CAN_SWAP
    dests: list[Any] = []
    for h, out in zip(handles, outs):
        if h._prefetch is None:  # the common cases, inline
            if h.release:
                s = h._storage() if h._storage is not None else None
                if s is not None and s.nbytes() != 0:
                    raise InvalidArgumentError(_RESIZED)
                if in_place and s is not None and h.nbytes:
                    if regrown is not None:
                        regrown.append(s)
                    storage.regrow(s, h.nbytes)
                    dests.append(s)
                    continue
                dests.append(_EMPTY.new().resize_(h.nbytes) if not cuda  # (_fresh, inline)
                             else _fresh(h.nbytes, device, cuda))
            else:
                dests.append(torch.empty(h.shape, dtype=h.dtype, device=device)
                             if out is None else out)
        else:
            dests.append(destination(h, out, device))
    return dests


_RESIZED = "fetch: the paged-out storage was resized meanwhile; refusing to overwrite it"


def _fresh(nbytes: int, device: torch.device, cuda: bool) -> torch.UntypedStorage:
    """New memory for a release's storage, allocated on the current stream. On the CPU a bare
    storage (a fraction of the cost of a tensor); on CUDA through a tensor, whose device guard
    puts it on ``device`` even when another device is current."""
    if cuda:
        return torch.empty(nbytes, dtype=torch.uint8, device=device).untyped_storage()
    return _EMPTY.new().resize_(nbytes)


# What fresh CPU storages are made from: torch.UntypedStorage(n) is the same storage (the
# default CPU allocator) at twice the cost of new() and resize_(), as it parses its arguments.
_EMPTY = torch.UntypedStorage()


def destination(h: Handle, out: torch.Tensor | None, device: torch.device) -> Any:
    """Where the core fetches ``h``: its prefetch buffer, fresh bytes for a release's storage
    (allocated on the current stream before the core records its event), ``out``, or a new
    tensor of the snapshot's shape."""
    if h.release:  # checked before a prefetch buffer too: its fetch would drop the bytes
        s = h._storage() if h._storage is not None else None
        if s is not None and s.nbytes() != 0:
            raise InvalidArgumentError(_RESIZED)
    if h._prefetch is not None:
        return h._prefetch
    if h.release:
        return _fresh(h.nbytes, device, device.type == "cuda")
    if out is not None:
        return out
    return torch.empty(h.shape, dtype=h.dtype, device=device)


def restore_all(m: "OffloadManager", handles: list[Handle], dests: list[Any],
                outs: list[torch.Tensor | None], keep: bool, results: list[Any],
                plain: bool, ids: list[int]) -> None:
    """After the core fetched every handle into its destination: the Python side, each handle
    once (``results[i]`` None until then), then the handles end (only once every result is
    kept: a handle ended before its result would be re-run without its weak references), then
    the registry lets their storages go. Idempotent (Note [Interrupted batches] in manager.py).
    ``plain``: :func:`plain_snapshots` held when the fetch began; ``ids``: the handles'."""
    m._holders.drop_many(ids)  # the fetch ordered the caller after the copy
    if plain and all(map(is_, outs, dests)) and all(map(is_, results, repeat(None))):
        # Tensor snapshots fetched into their outs: restore() in short, and _end() of a handle
        # that holds nothing else (the manager's table left in one C loop, then the state); an
        # interrupt after the first line leaves the rest to the loops below (whose _end()
        # leaves the table again: harmless, as the core has dropped these ids already)
        results[:] = dests
        if not keep:
            list(map(m._handles.pop, ids, repeat(None)))
            for h in handles:
                h._state = "fetched"
        return
    swap_in, to_swap_in = storage.swap_in, storage.to_swap_in  # (looked up once)
    untyped = torch.UntypedStorage
    for i, (h, dest) in enumerate(zip(handles, dests)):
        if results[i] is None:
            if not h.release and h._prefetch is None and h._deferred is None \
                    and h._array is None and (outs[i] is None or outs[i] is dest):
                results[i] = dest  # a tensor snapshot in its out or a new tensor: restore()
                continue           # in short
            # page_in, inline for the common case: fresh bytes (not a prefetch buffer, which a
            # re-run after an interrupt inside restore() finds here with _prefetch dropped)
            # for a tensor that lives (so does its storage)
            if h.release and h._prefetch is None and h._deferred is None and type(dest) is untyped:
                tensor = h._tensor() if h._tensor is not None else None
                s = h._storage() if h._storage is not None else None
                if tensor is None or s is None:
                    results[i] = page_in(h, dest)
                    continue
                if to_swap_in(s, h.nbytes):
                    swap_in(s, dest)
                results[i] = tensor
            else:
                results[i] = restore(m, h, dest, outs[i])
    for h in handles:
        if h._state == "live":
            if not keep:
                h._end("fetched")
            elif h.release:
                h._state = "kept"
    if any(map(_release_of, handles)):  # (a snapshot's key, None, is never registered)
        storage.unregister_many(zip(map(_key_of, handles), handles))


def plain_snapshots(handles: list[Handle]) -> bool:
    """Every handle is a snapshot of a tensor, neither prefetched nor deferred (C loops). Under
    the handles' locks it stays so until they end."""
    return (not any(map(_release_of, handles))
            and all(map(is_, map(_prefetch_of, handles), repeat(None)))
            and all(map(is_, map(_deferred_of, handles), repeat(None)))
            and all(map(is_, map(_array_of, handles), repeat(None))))


_id_of = operator.attrgetter("_id")
_first = operator.itemgetter(0)
_state_of = operator.attrgetter("_state")
_nbytes_of = operator.attrgetter("nbytes")
_data_ptr = operator.methodcaller("data_ptr")  # a tensor's or a storage's
_TENSOR = {torch.Tensor}
_prefetch_of = operator.attrgetter("_prefetch")
_deferred_of = operator.attrgetter("_deferred")
_array_of = operator.attrgetter("_array")
_release_of = operator.attrgetter("release")
_key_of = operator.attrgetter("_key")
_STORAGE = {torch.UntypedStorage}


def restore(m: "OffloadManager", h: Handle, dest: Any, out: torch.Tensor | None) -> Any:
    """:func:`restore_all`'s step for one handle (prefetched, deferred or a snapshot)."""
    if h._prefetch is not None:
        if m._cuda:  # the prefetch buffer is used on the current stream from now on
            current = torch.cuda.current_stream(m.device)
            if current != h._prefetch_stream:
                m._record_stream(h._prefetch, current)
        prefetching.drop(m, h)
    storage.undefer_handle(h)
    if h.release:
        return page_in(h, dest)
    result = out.copy_(dest) if out is not None and out is not dest else dest
    return arrays.from_bytes(result, h._array) if h._array is not None else result

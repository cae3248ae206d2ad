"""Handle: what ``OffloadManager.offload`` returns, and the only way back to the bytes.

Note [Handle lifecycle]
A handle is in one of five states, and only its manager moves it (under the handle's lock):

    live --fetch(keep=True) of a release--> kept --fetch/free--> fetched | freed
    live --fetch--> fetched      live --free--> freed      any live state --close()--> closed

``live`` and ``kept`` hold bytes in a tier (the core's entry); the others are terminal and every
call on them is a typed error (``ready()``/``wait()`` of a fetched handle are no-ops). A release
handle refers to its tensor and storage *weakly*: the storage registry (storage.py) holds the
handle while the storage lives, so a paged-out tensor can always be fetched through it, and a
paged-out tensor dropped together with its handle gives its tier bytes back.
"""

from __future__ import annotations

import _thread
import weakref
from typing import TYPE_CHECKING, Any

import torch

from .errors import InvalidArgumentError, InvalidHandleError

if TYPE_CHECKING:
    from .manager import OffloadManager

__all__ = ["Handle"]

LIVE = ("live", "kept")


class Handle:
    """An offloaded tensor (``release=True``: its whole storage) or snapshot (``release=False``).

    Attributes
    ----------
    nbytes : int
        Bytes held in the tier: the whole storage for a release, the tensor's bytes for a snapshot.
    shape, dtype : torch.Size, torch.dtype
        Of the offloaded tensor.
    release : bool
        Whether the source storage was paged out (and ``fetch`` restores it in place).
    priority : float
        Eviction priority (lower leaves a full tier first).
    """

    _aqua_not_state = True  # never walked as part of a workload state (state.py)

    __slots__ = ("_manager", "_id", "nbytes", "shape", "dtype", "release", "priority", "_state",
                 "_tensor", "_storage", "_layout", "_key", "_tier", "_location", "_prefetch",
                 "_prefetch_tier", "_prefetch_stream", "_pending", "_deferred", "_array", "_lock",
                 "_adopted", "__weakref__")

    def __init__(self, manager: "OffloadManager", core_id: int, nbytes: int,
                 shape: torch.Size, dtype: torch.dtype, release: bool,
                 tensor: torch.Tensor | None, key: int | None, tier: str, location: str,
                 priority: float = 0.0, storage_ref: Any = None, array: Any = None) -> None:
        # (Positional arguments and chained stores: a batch makes one handle per tensor, and
        # a call by keywords cost as much as the rest of making one.)
        self._manager = manager
        self._id = core_id
        self.nbytes = nbytes
        self.shape = shape
        self.dtype = dtype
        self.release = release
        self.priority = priority
        self._state = "live"
        # release=True: weak references to the tensor fetch returns and to its storage (the
        # registry's own, ``storage_ref``, when the caller has it), and the tensor's offset and
        # strides (its shape is ``shape``), to rebuild a tensor on the storage if the object
        # itself is gone. (Each object a handle keeps is one more for the garbage collector's
        # full collections, which a batch of thousands of handles brings on.)
        self._tensor: Any
        self._storage: Any
        self._layout: tuple[int, tuple[int, ...]] | None
        if tensor is None:
            self._tensor = self._storage = self._layout = None
        else:
            self._tensor = weakref.ref(tensor)
            self._storage = (weakref.ref(tensor.untyped_storage()) if storage_ref is None
                             else storage_ref)
            self._layout = (tensor.storage_offset(), tensor.stride())
        self._key = key  # release=True: registry key of its storage
        self._tier = tier
        self._location = location
        # _prefetch: destination of a prefetch in flight; _prefetch_stream: the torch stream
        # its buffer belongs to (CUDA); _pending: (buffer, stream) of a prefetch whose core
        # call may have happened, kept alive until the manager settles it (Note [Interrupted
        # batches] in manager.py); _deferred: storage key of a fence="deferred" snapshot's
        # source
        self._prefetch: torch.Tensor | None
        self._prefetch_stream: Any
        self._pending: tuple[torch.Tensor, Any] | None
        self._deferred: int | None
        self._prefetch = self._prefetch_stream = self._pending = self._deferred = None
        self._prefetch_tier = 0
        self._array: Any = array  # a snapshot of a numpy/CuPy/DLPack array: how to rebuild it
        self._lock = _thread.RLock()  # serialises fetch/prefetch/free of this handle
        # Set once the call that made it returns it (Note [Orphans] in manager.py): a handle an
        # interrupt dropped before that never frees the block its call's finish() re-adopts.
        self._adopted = False

    # -- state ---------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``"in_flight"`` (copy running), ``"offloaded"``, ``"fetching"``, ``"fetched"``,
        ``"freed"`` or ``"closed"`` (its manager was closed)."""
        if self._state not in LIVE:
            return self._state
        if self._manager.closed or self._manager._gate.foreign():  # (no lock of a forked child)
            return "closed"
        store = self._manager._store
        try:
            state = store.info(self._id)[0]
            if state == "in_flight" and store.ready(self._id):  # non-blocking refresh
                state = "offloaded"
        except InvalidHandleError:  # finished in another thread a moment ago
            return self._state if self._state not in LIVE else "freed"
        except Exception:  # the manager closed under us
            return self._state if self._state not in LIVE else "closed"
        return "in_flight" if state == "submitting" else state

    @property
    def tier(self) -> str:
        """``"peer"`` (another GPU's memory), ``"host"`` (pinned host memory) or ``"remote"``
        (a lender, managers with ``remote=``). A handle can move down the cascade (eviction,
        reclaim) while it lives."""
        self._refresh_tier()
        return self._tier

    @property
    def location(self) -> str:
        """Where the bytes live: ``"cuda:N"`` for a peer GPU, ``"emu:N"`` for an emulated peer,
        ``"cpu"`` for pinned host memory, ``"host:port"`` for a lender."""
        self._refresh_tier()
        return self._location

    def _refresh_tier(self) -> None:
        if self._state in LIVE and not self._manager._gate.foreign():
            try:
                tier = self._manager._store.info(self._id)[1]
            except Exception:  # gone a moment ago, or the manager closed
                return
            self._tier, self._location = self._manager._tiers[tier]

    @property
    def manager(self) -> "OffloadManager":
        return self._manager

    @property
    def _kept(self) -> bool:
        return self._state == "kept"

    def _live(self) -> bool:
        return self._state in LIVE

    def ready(self) -> bool:
        """Whether the offload copy has completed (never blocks). True once fetched."""
        return self._manager._ready(self)

    def wait(self) -> None:
        """Block (GIL released) until the offload copy has completed."""
        self._manager._wait(self)

    def free(self) -> None:
        """Drop the offloaded bytes (see :meth:`OffloadManager.free`)."""
        self._manager.free(self)

    def prefetch(self) -> "Handle":
        """Start the copy back now (see :meth:`OffloadManager.prefetch`)."""
        return self._manager.prefetch(self)

    def fence(self) -> None:
        """A snapshot taken with ``fence="deferred"``: make the current stream wait until the
        copy has read the source, so the source may be written again. No host sync; a no-op
        for other handles, and once the handle was fetched or freed."""
        self._manager._fence(self)

    def _end(self, state: str) -> None:
        """Enter a terminal state (the manager calls this once the core agreed) and leave the
        manager's table (Note [Orphans] in orphans.py: the core has dropped this id)."""
        self._state = state
        if self._deferred is not None:
            self._manager._undefer(self)
        self._tensor = self._storage = None
        self._prefetch = self._pending = None
        self._manager._handles.pop(self._id, None)

    def _restored_tensor(self, storage: torch.UntypedStorage) -> torch.Tensor:
        """The tensor fetch returns for a release: the original object if it is alive, else a
        new tensor of its layout on the (restored) storage."""
        tensor = self._tensor() if self._tensor is not None else None
        if tensor is not None:
            return tensor
        offset, stride = self._layout
        return torch.empty(0, dtype=self.dtype, device=storage.device).set_(
            storage, offset, self.shape, stride)

    # -- copies and pickling: a handle owns tier bytes; two owners would free them twice ----
    def __copy__(self) -> "Handle":
        raise InvalidArgumentError("a Handle cannot be copied: it owns its tier bytes (share the "
                                   "object itself, or fetch(h, keep=True) and offload again)")

    def __deepcopy__(self, memo: dict) -> "Handle":
        return self.__copy__()

    def __reduce__(self) -> Any:
        raise InvalidArgumentError("a Handle cannot be pickled: its bytes live in this process's "
                                   "memory tiers")

    def __del__(self) -> None:
        # An ended handle left the manager's table as it ended (_end; a fetched batch of
        # snapshots, paging.restore_all), so there is nothing to do: one check, for the common
        # case (every handle of a fetched batch dies here).
        if self._state in LIVE:
            self._die()

    def _die(self) -> None:
        # Nobody can reach this live handle any more, so nobody can fetch it: give its block
        # back. (A release handle is held by the storage registry while its tensor lives.)
        try:
            if self._adopted:
                self._manager._discard(self)
        except Exception:  # interpreter shutdown, closed manager: nothing to give back to
            pass
        try:  # leave the manager's table (a later Handle made for the same id stays in it)
            table = self._manager._handles
            ref = table.get(self._id)
            if ref is not None and ref() in (self, None):  # None: weakrefs cleared by the GC
                table.pop(self._id, None)
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self) -> str:
        kind = "kept copy" if self._kept else ("release" if self.release else "snapshot")
        return (f"<aqua_offload.Handle {self.state} {kind} {tuple(self.shape)} {self.dtype} "
                f"{self.nbytes} B on {self.tier} {self.location}>")


def check_priority(priority: Any) -> float:
    """An eviction priority: any real number, infinities included (lower is evicted first);
    not NaN, not a bool, not an int too large for a float."""
    if isinstance(priority, bool) or not isinstance(priority, (int, float)):
        raise InvalidArgumentError(f"priority must be a number, got {priority!r}")
    try:
        value = float(priority)
    except OverflowError:
        raise InvalidArgumentError(f"priority {priority!r} does not fit a float") from None
    if value != value:
        raise InvalidArgumentError("priority must not be NaN")
    return value

"""Handle: what ``OffloadManager.offload`` returns, and the only way back to the bytes."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import torch

from .errors import InvalidArgumentError, InvalidHandleError

if TYPE_CHECKING:
    from .manager import OffloadManager

__all__ = ["Handle"]

_TERMINAL = ("fetched", "freed")


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
    """

    _aqua_not_state = True  # never walked as part of a workload state (state.py)

    __slots__ = ("_manager", "_id", "nbytes", "shape", "dtype", "release", "priority", "_tensor",
                 "_key", "_holder", "_terminal", "_tier", "_location", "_prefetch",
                 "_prefetch_tier", "_prefetch_stream", "_kept", "_deferred", "_lock",
                 "__weakref__")

    def __init__(self, manager: "OffloadManager", core_id: int, *, nbytes: int,
                 shape: torch.Size, dtype: torch.dtype, release: bool,
                 tensor: torch.Tensor | None, key: int | None, tier: str, location: str,
                 priority: float = 0.0) -> None:
        self._manager = manager
        self._id = core_id
        self.nbytes = nbytes
        self.shape = shape
        self.dtype = dtype
        self.release = release
        self._tensor = tensor  # release=True: the tensor fetch restores and returns
        self._key = key  # release=True: registry key of its storage
        self._holder: Any = None  # emulation: the paged-out memory, kept until the copy completes
        self._terminal: str | None = None
        self._tier = tier
        self._location = location
        self.priority = priority
        self._prefetch: torch.Tensor | None = None  # destination of a prefetch in flight
        self._prefetch_tier = 0
        self._prefetch_stream: Any = None  # torch stream the prefetch buffer belongs to (CUDA)
        self._lock = threading.RLock()  # serialises fetch/prefetch/free of this handle
        self._kept = False  # a release fetched with keep=True: the tier copy outlives it
        self._deferred: int | None = None  # storage key of a fence="deferred" snapshot's source

    # -- state ---------------------------------------------------------------------------
    @property
    def state(self) -> str:
        """``"in_flight"`` (copy running), ``"offloaded"``, ``"fetching"``, ``"fetched"`` or
        ``"freed"``."""
        if self._terminal is not None:
            return self._terminal
        store = self._manager._store
        try:
            state = store.info(self._id)[0]
            if state == "in_flight" and store.ready(self._id):  # non-blocking refresh
                state = "offloaded"
        except InvalidHandleError:  # finished in another thread a moment ago
            return self._terminal or "freed"
        return "in_flight" if state == "submitting" else state

    @property
    def tier(self) -> str:
        """``"peer"`` (another GPU's memory) or ``"host"`` (pinned host memory). A handle can
        move down the cascade (eviction, reclaim) while it lives."""
        self._refresh_tier()
        return self._tier

    @property
    def location(self) -> str:
        """Where the bytes live: ``"cuda:N"`` for a peer GPU, ``"emu:N"`` for an emulated peer,
        ``"cpu"`` for pinned host memory."""
        self._refresh_tier()
        return self._location

    def _refresh_tier(self) -> None:
        if self._terminal is None:
            try:
                tier = self._manager._store.info(self._id)[1]
            except InvalidHandleError:
                return
            self._tier, self._location = self._manager._tiers[tier]

    @property
    def manager(self) -> "OffloadManager":
        return self._manager

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

    def _finish(self, state: str) -> None:
        self._terminal = state
        if self._deferred is not None:
            self._manager._undefer(self)
        self._tensor = None
        self._holder = None
        self._prefetch = None

    def __del__(self) -> None:
        # A snapshot (or kept copy) nobody can reach any more can never be fetched: give its
        # block back. (Released storages stay registered: their handles are never collected.)
        try:
            if self._terminal is None and (not self.release or self._kept):
                self._manager._discard(self)
        except Exception:  # interpreter shutdown, closed manager: nothing to give back to
            pass

    def __repr__(self) -> str:
        kind = "kept copy" if self._kept else ("release" if self.release else "snapshot")
        return (f"<aqua_offload.Handle {self.state} {kind} {tuple(self.shape)} {self.dtype} "
                f"{self.nbytes} B on {self.tier} {self.location}>")


def check_priority(priority: Any) -> float:
    """An eviction priority: any real number (lower is evicted first), not NaN, not a bool."""
    if isinstance(priority, bool) or not isinstance(priority, (int, float)):
        raise InvalidArgumentError(f"priority must be a number, got {priority!r}")
    value = float(priority)
    if value != value:
        raise InvalidArgumentError("priority must not be NaN")
    return value

"""OffloadManager: torch tensors in, handles out, and back.

Note [Stream ordering, Python side]
The C++ store (cpp/src/store.cpp, Note [Stream ordering]) fences every copy with events on the
stream passed in; this layer's job is to pass the *user's current torch stream* and to manage
torch memory around the copies:
  - offload: the copy waits for work already enqueued on the current stream. A snapshot
    (release=False) also makes the current stream wait for the copy, so later writes to the
    source cannot race it; no host sync either way.
  - release=True: the source memory lives on in a holder until the copy finished
    (Note [In-place paging] in storage.py): record_stream on CUDA, a reaped holder on emulation.
  - fetch: the destination is allocated on the current stream *before* the store records the
    event the copy waits on; the current stream then waits for the copy. If the store raises,
    it has already drained its copy stream, so dropping the destination is safe.
On the emulation backend the "current stream" is the calling thread (torch CPU ops are
synchronous), so waiting on it blocks that thread: fetch and snapshots return complete, while
release offloads still return at once with the copy running on a worker thread.

Calls in progress and close(): Note [Calls and close] in calls.py.

Handles no object stands for any more: Note [Orphans] in orphans.py.

Note [Interrupted batches]
A batch is all or nothing even when an asynchronous exception (KeyboardInterrupt) lands inside
it. Before the core accepted a batch, the handler undoes the Python side (reservations, and the
core's handles if the core had already made them: the bindings append them to a list before
returning, so none can be lost in between). Once the core accepted it, the Python side is
finished regardless (``finish()`` is idempotent and runs again from the handler): every tensor
ends paged out and fetchable, or fetched and restored. Prefetches: Note [Pending prefetches]
in prefetching.py.
"""

from __future__ import annotations

import atexit
import contextlib
import weakref
from typing import Any, ContextManager, Iterable, Mapping, Sequence

import torch

from . import _core, claims, orphans, paging, prefetching, snapshots, storage
from .devices import (DeviceLike, current_stream, external_stream, parse_peer, record_stream,
                      resolve_device)
from .errors import InvalidArgumentError, OutOfMemoryError, RemoteLostError
from .handle import Handle, check_priority as _check_priority
from .calls import CallGate
from .checks import as_list, check_base, check_offload
from .holders import HolderWatch
from .peer_budget import peer_pools
from .sizes import parse_size

__all__ = ["OffloadManager", "live_managers"]

POLICIES = tuple(_core.eviction_policies())
# Defaults sized for the backend: a GPU server lends GiBs; emulation arenas are pre-faulted host
# memory on small machines, so they stay small unless asked for.
_DEFAULT_BYTES = {"cuda": ("8GiB", "16GiB"), "emulation": ("64MiB", "256MiB")}
# CUDA: chunk copies so a fetch can overtake a long offload on a shared copy engine. Emulation
# has no shared engine (one worker thread per stream), and glibc's memcpy switches to its faster
# non-temporal path only for copies of hundreds of MiB, so whole copies are the fast choice.
_DEFAULT_CHUNK = {"cuda": _core.default_chunk_bytes, "emulation": 1 << 40}
_live: "weakref.WeakSet[OffloadManager]" = weakref.WeakSet()
_NO_CALL = contextlib.nullcontext()  # close()'s own fetch: close() shut the gate already


def live_managers() -> list["OffloadManager"]:
    """Every manager not yet closed."""
    return [m for m in list(_live) if not m.closed]


class OffloadManager:
    """Offloads tensors of one device to peer-GPU memory and pinned host memory, and back.

    Parameters
    ----------
    device : str, int, torch.device or None
        Device of the tensors: ``"cuda:N"`` (CUDA backend) or ``"cpu"`` (emulation backend:
        CPU tensors, emulated peer and host tiers). ``None``: the current GPU if there is one,
        else ``"cpu"``.
    peers : "auto", "lent", None, device or list of devices
        Peer GPUs lending memory, fastest first. ``"auto"``: every other GPU the device can
        reach as a peer. ``"lent"``: lease what other processes offer
        (:mod:`aqua_offload.lending`), growing and giving back as they ask; see
        ``stats()["lending"]``. ``None``: no peer tier (pinned host only).
    peer_bytes : int, str or mapping
        Pool size on each peer (``"8GiB"``), or a budget per peer (``{"cuda:1": "20GiB"}``),
        whose keys are the peers when ``peers="auto"``. Default 8 GiB (64 MiB on emulation).
        With ``peers="lent"``: the most to lease per device (default: no limit).
    host_bytes : int or str
        Pinned host pool size, allocated once at exactly this size. 0 disables the host tier.
        Default 16 GiB (256 MiB on emulation).
    policy : str
        Which handles leave a full tier first (they move down the cascade, never lost):
        ``"lru"`` (default: least recently offloaded or prefetched), ``"fifo"`` (first
        offloaded), ``"largest"`` (fewest migrations to free a large range). A handle's
        ``priority`` comes first: lower priority is evicted first.
    chunk_bytes : int or str, optional
        Copies larger than this are enqueued in pieces of this size: 32 MiB by default on CUDA;
        whole copies by default on emulation.
    remote : str or list of str, optional
        Lenders (``"host:port"``, :mod:`aqua_offload.remote`) below the other tiers: when they
        are full, their least recently offloaded handles spill there (docs/remote.md). What
        only a lender holds is lost if it dies (``fetch`` raises ``RemoteLostError``).
    remote_token : bytes or str, optional
        The lenders' token (default: ``$AQUA_OFFLOAD_REMOTE_TOKEN``).
    remote_deadline_s : float
        Longest wait for any remote request or transfer.
    remote_order : str
        ``"below_host"`` (default): peer, host, then the lenders; ``"above_host"``: peer, the
        lenders, then host memory (docs/remote.md).
    remote_copies : int
        2: every handle on the lenders has a copy on two of them, so one lender's death loses
        nothing (needs two lenders); 1 (default): one copy.

    Notes
    -----
    All memory is reserved here, once; ``offload`` and ``fetch`` never allocate device or
    pinned memory. A manager is a context manager; ``close()`` pages every released tensor
    back in, then frees every pool before it returns.
    """

    _aqua_not_state = True  # never walked as part of a workload state (state.py)

    def __init__(self, device: DeviceLike | None = None, peers: Any = "auto",
                 peer_bytes: int | str | Mapping[Any, int | str] | None = None,
                 host_bytes: int | str | None = None, policy: str = "lru",
                 chunk_bytes: int | str | None = None, remote: str | Sequence[str] | None = None,
                 remote_token: bytes | str | None = None, remote_deadline_s: float = 5.0,
                 remote_order: str = "below_host", remote_copies: int = 1) -> None:
        backend, index, tdevice = resolve_device(device)
        if remote is None and (remote_order != "below_host" or remote_copies != 1):
            raise InvalidArgumentError("remote_order and remote_copies go with remote=[...]")
        if not isinstance(policy, str) or policy not in POLICIES:
            raise InvalidArgumentError(f"unknown eviction policy {policy!r} (available: {', '.join(POLICIES)})")
        default_peer, default_host = _DEFAULT_BYTES[backend]
        self._peer_budgets: list[dict[str, Any]] = []
        lent = isinstance(peers, str) and peers.strip().lower() == "lent"
        if lent:  # 0-byte peer tiers, grown by leases (lending/consumer.py)
            from .lending.consumer import lent_peer_specs
            peer_specs = lent_peer_specs(backend, index)
        else:
            peer_specs, self._peer_budgets = peer_pools(backend, index, peers, peer_bytes,
                                                        default_peer)
        host = parse_size(default_host if host_bytes is None else host_bytes, name="host_bytes")
        chunk = _DEFAULT_CHUNK[backend] if chunk_bytes is None else parse_size(chunk_bytes, name="chunk_bytes")
        self._store = _core.Store(backend, index, peer_specs, host, chunk, policy)
        self._remote: Any = None
        if remote is not None:  # lenders below the core's tiers, same ids (remote/tier.py)
            from .remote.tier import RemoteTier
            try:
                self._store = self._remote = RemoteTier(self._store, tdevice, remote,
                                                        remote_token, remote_deadline_s,
                                                        remote_order, remote_copies)
            except BaseException:
                self._store.close()
                raise
        self.device = tdevice
        self.policy = policy
        self._cuda = backend == "cuda"
        self._tiers = [(self._store.tier_kind(t), self._store.tier_location(t))
                       for t in range(self._store.tier_count)]
        self._ext_streams: dict[tuple[int, str], Any] = {}
        self._holders = HolderWatch(self._store.ready)  # emulation (holders.py)
        self._gate = CallGate()  # calls in progress, closing, closed (calls.py)
        # core id -> weak reference to its live Handle, dropped as it ends (Note [Orphans] in
        # orphans.py; a dead reference counts as none). Not a WeakValueDictionary: its
        # pure-Python references cost more than the rest of making a handle.
        self._handles: dict[int, weakref.ref[Handle]] = {}
        # handle id -> bytes of its prefetch buffer (prefetching.py); no lock: an interrupt
        # inside `with lock:` can leave the lock held, and dict updates are atomic
        self._prefetched: dict[int, int] = {}
        self._lending: Any = None
        _live.add(self)
        if lent:
            from .lending.consumer import attach
            self._lending = attach(self, peer_bytes)

    # -- offload -------------------------------------------------------------------------
    def offload(self, tensor: Any, release: bool = True, *, priority: float = 0.0,
                base: Handle | None = None, fence: str = "now") -> Handle:
        """Start copying ``tensor`` to the fastest tier with room; return at once.

        Parameters
        ----------
        tensor : torch.Tensor or array
            A strided tensor on this manager's device, any dtype and shape; or (snapshots only)
            a numpy array, a CuPy array or any DLPack exporter, fetched back as the same kind of
            array (:mod:`aqua_offload.arrays`).
        release : bool
            True: page out the tensor's whole storage (every view of it); the tensor must not
            be touched until fetched (see :func:`is_offloaded`, :func:`debug_guard`). Only a
            storage torch owns alone can be released (not shared with another process, not
            exported to numpy/CuPy/JAX). False: take a snapshot; the tensor stays valid and
            ``fetch`` returns a new one.
        priority : float
            Eviction priority: when a tier is full, lower priorities move down first.
        base : Handle, optional
            Incremental offload of append-only state: a live handle (e.g. kept by
            ``fetch(h, keep=True)``) whose bytes are a prefix of this offload's bytes. The
            tensor must be contiguous (a transposed or strided view is refused: its bytes are
            not in the base's order); that its first bytes equal the base's is the caller's
            contract, not checked. Only the new suffix is copied when ``base``'s block has
            room; ``base`` is consumed.
        fence : {"now", "deferred"}
            Snapshots only. ``"now"`` (default): the current stream waits for the copy, so any
            later write to ``tensor`` is safe, as with ``tensor.to("cpu", non_blocking=True)``.
            ``"deferred"``: the current stream does not wait, so the copy overlaps later work;
            call :meth:`Handle.fence` before writing ``tensor`` again (a write before it may
            be copied; :func:`debug_guard` raises on one). Fetching or freeing fences too.

        Raises
        ------
        OutOfMemoryError
            No tier has room, even after eviction; the tensor is untouched.
        InvalidArgumentError
            Wrong device or layout, the storage is already paged out, discarded or shared, a
            bad priority or base.
        """
        return self._offload([tensor], release, priority, [base], fence, "offload")[0]

    def offload_many(self, tensors: Sequence[Any], release: bool = True, *,
                     priority: float = 0.0, fence: str = "now") -> list[Handle]:
        """Offload every tensor in one call into the core: one event on the current stream and
        one batched submission per tier, so many small tensors cost about one copy of their
        total size. All or nothing: on an error (or an interrupt) nothing is offloaded.
        ``release``, ``priority`` and ``fence`` as for :meth:`offload`."""
        tensors = as_list(tensors, "offload_many")
        return self._offload(tensors, release, priority, [None] * len(tensors), fence,
                             "offload_many")

    def _offload(self, tensors: list[Any], release: bool, priority: float,
                 bases: list[Handle | None], fence: str, what: str) -> list[Handle]:
        """The one offload path (a single offload is a batch of one)."""
        with self._gate.call(what):
            prio = _check_priority(priority)
            specs, dtypes = check_offload(tensors, release, fence, self.device, what)
            base_ids = ([0] * len(bases) if bases.count(None) == len(bases) else
                        [0 if b is None else self._check_base(b, t)._id
                         for b, t in zip(bases, tensors)])
            self._holders.reap()
            for retry in (True, False):
                try:
                    if release:
                        return paging.page_out(self, tensors, dtypes, prio, bases, base_ids,
                                               what)
                    return snapshots.take(self, tensors, dtypes, prio, bases, base_ids, fence,
                                          specs)
                except OutOfMemoryError:  # (nothing offloaded: all or nothing)
                    # torch <= 2.9: paged-out tensors dropped since the last sweep still hold
                    # their tier bytes (Note [Storage objects and the cyclic GC])
                    if not retry or not storage.sweep_pins():
                        raise
            raise AssertionError("unreachable")

    def _fence(self, handle: Handle) -> None:
        """Order the current stream after the copy that read a deferred snapshot's source."""
        with handle._lock:
            if handle._deferred is None:
                return
            if handle._live():
                with self._gate.call("fence"):
                    self._store.fence_source(handle._id, current_stream(self.device))
            self._undefer(handle)

    _undefer = staticmethod(storage.undefer_handle)

    def _new_handle(self, got: list[tuple[int, int]], tensors: list[torch.Tensor],
                    dtypes: list[torch.dtype], sizes: list[int], priority: float,
                    reserved: list[tuple[int, Any]], watches: list[Any]) -> list[Handle]:
        """The Handles of a batch of releases the core accepted (one call per batch), one per
        ``(core id, tier)`` in ``got``, not yet adopted: ``reserved`` has their storages'
        registry keys, ``watches`` the registry's weak references to them (paging.page_out).
        Snapshots: snapshots.py."""
        tiers, table, ref = self._tiers, self._handles, weakref.ref
        made = []  # (a loop: as fast as a comprehension for a batch, faster for one)
        for (cid, tier), t, dtype, n, (key, _token), w in zip(got, tensors, dtypes, sizes,
                                                             reserved, watches):
            kind, location = tiers[tier]  # where the copy went (Handle.tier stays live)
            h = Handle(self, cid, n, t.shape, dtype, True, t, key, kind, location, priority,
                       w)  # (positional: see Handle)
            table[cid] = ref(h)
            made.append(h)
        return made

    # -- fetch ---------------------------------------------------------------------------
    def fetch(self, handle: Handle | torch.Tensor, out: torch.Tensor | None = None, *,
              keep: bool = False) -> Any:
        """Copy the handle's bytes back to this device, ordered before later work on the
        current stream.

        Parameters
        ----------
        handle : Handle or torch.Tensor
            A handle of this manager, or a paged-out tensor (its handle is looked up).
        out : torch.Tensor, optional
            Snapshots only: a contiguous tensor of the same shape and dtype to fetch into.
        keep : bool
            Keep the tier's copy: the handle stays live, e.g. as the ``base`` of the next
            incremental offload. A kept snapshot can be fetched again; a kept release can
            serve as ``base`` or be freed.

        Returns
        -------
        torch.Tensor or array
            For a release: the original tensor object (or, if it is gone, a tensor of its
            layout on the restored storage), its storage restored in place (every view sees
            the data again). For a snapshot: ``out`` or a new contiguous tensor; for an array,
            an array of the same library, dtype and shape.
        """
        return self._fetch([handle], [out], keep, "fetch")[0]

    def fetch_many(self, handles: Iterable[Handle | torch.Tensor],
                   outs: Sequence[torch.Tensor | None] | None = None, *,
                   keep: bool = False) -> list[Any]:
        """Fetch every handle in one call into the core (one event, one batched submission per
        tier). All handles (and ``outs``, one per handle, ``None`` or a tensor as for
        ``fetch(out=)``, snapshots only) are checked before any is fetched; all or nothing,
        also when interrupted. ``keep`` as for :meth:`fetch`, for every handle."""
        handles = as_list(handles, "fetch_many")
        return self._fetch(handles, [None] * len(handles) if outs is None else list(outs), keep,
                           "fetch_many")

    def _fetch(self, handles: list[Any], outs: list[Any], keep: bool, what: str,
               closing: bool = False) -> list[Any]:
        """The one fetch path (a single fetch is a batch of one)."""
        with (_NO_CALL if closing else self._gate.call(what)):
            # claims.claim() spelled out: its generator context manager costs as much as the
            # rest of a small fetch (the same double `finally`, see claims.take)
            locks: list[Any] = []
            taken: list[bool] = []
            try:
                try:
                    return paging.fetch_claimed(self, claims.take(self, handles, what, locks,
                                                                  taken), outs, keep, what)
                finally:
                    claims.let_go(locks, taken)
            finally:
                if taken:  # nothing left, unless the line above was interrupted
                    claims.let_go(locks, taken)

    def prefetch(self, handle: Handle | torch.Tensor) -> Handle:
        """Start copying the handle back now, into memory allocated on the current stream, and
        return at once; a later ``fetch`` only waits for it (no second copy). The destination
        is counted in ``stats()["prefetched_bytes"]`` and given back if the handle is freed."""
        return self.prefetch_many([handle])[0]

    def prefetch_many(self, handles: Iterable[Handle | torch.Tensor]) -> list[Handle]:
        """:meth:`prefetch` every handle in one call into the core (all are checked first);
        already prefetched ones are left as they are."""
        with self._gate.call("prefetch"), self._claim(as_list(handles, "prefetch_many"), "prefetch") as handles:
            prefetching.start(self, handles)
            return handles

    # -- free, waits, lending, stats -----------------------------------------------------
    def free(self, handle: Handle | torch.Tensor) -> None:
        """Drop the handle's offloaded bytes without fetching them. For a release, the data is
        gone: the tensor keeps an empty storage, marked *discarded* (:func:`is_discarded`; the
        guard refuses it, and so does a new offload of it)."""
        with self._gate.call("free"), self._claim([handle], "free") as (handle,):
            if self._holders.holding(handle._id) or (handle._prefetch is not None
                                                      and not self._cuda):
                self._store.wait(handle._id)  # emulation: a copy may still use the memory

            def finish() -> None:  # idempotent (Note [Interrupted batches])
                self._holders.drop(handle._id)
                if handle._prefetch is not None and self._cuda:  # reused after the copy into it
                    self._record_stream(handle._prefetch,
                                        self._stream(handle._prefetch_tier, "prefetch"))
                prefetching.drop(self, handle)
                if handle.release and not handle._kept and handle._key is not None:
                    storage.discard(handle._key, handle)
                handle._end("freed")

            try:
                self._store.free(handle._id)
                finish()
            except BaseException:
                if handle._live() and not self._store.contains(handle._id):
                    finish()  # the core freed it: the tensor is discarded, whatever interrupted
                raise

    def _discard(self, handle: Handle) -> None:
        """Handle.__del__: nobody can fetch it any more."""
        gate = self._gate
        if not gate.closed and not gate.closing and handle._live() and not gate.foreign():
            self.free(handle)

    def _ready(self, handle: Handle) -> bool:
        if handle._state == "fetched":
            return True
        with self._gate.call("ready"):
            return bool(self._store.ready(self._own(handle, "ready")._id))

    def _wait(self, handle: Handle) -> None:
        if handle._state == "fetched":
            return
        with self._gate.call("wait"):
            self._store.wait(self._own(handle, "wait")._id)
            self._holders.drop(handle._id)

    def lend(self, device: DeviceLike, nbytes: int | str) -> int:
        """Grow the pool on peer ``device`` by ``nbytes`` (a new segment, allocated now).

        Returns
        -------
        int
            The peer tier's capacity afterwards, in bytes.
        """
        self._check_manual("lend")
        return self._lend(device, nbytes)

    def _lend(self, device: DeviceLike, nbytes: int | str) -> int:
        with self._gate.call("lend", internal=True):
            n = parse_size(nbytes, name="lend nbytes")
            if n == 0:
                raise InvalidArgumentError("lend: 0 bytes")
            return int(self._store.lend(parse_peer(device, self._store.backend), n))

    def reclaim(self, device: DeviceLike, nbytes: int | str | None = None) -> int:
        """Take memory back from the pool on peer ``device``: whole segments, newest first,
        covering at least ``nbytes`` (everything when None). Every handle living there first
        moves down the cascade; nothing is lost. Blocks until the memory is freed; safe while
        other threads offload and fetch. The latency is reported in ``stats()``.

        Returns
        -------
        int
            Bytes handed back (whole segments: possibly more than asked).

        Raises
        ------
        InvalidArgumentError
            More than is lent, an unknown device, a reclaim of it already in progress, or a
            manager with ``peers="lent"`` (its leases are lent and reclaimed by their lenders).
        OutOfMemoryError
            The lower tiers cannot take the handles; nothing was reclaimed.
        """
        self._check_manual("reclaim")
        return self._reclaim(device, nbytes)

    def _reclaim(self, device: DeviceLike, nbytes: int | str | None = None) -> int:
        with self._gate.call("reclaim", internal=True):
            n = None if nbytes is None else parse_size(nbytes, name="reclaim nbytes")
            return int(self._store.reclaim(parse_peer(device, self._store.backend), n))

    def _check_manual(self, what: str) -> None:
        if self._lending is not None:
            raise InvalidArgumentError(
                f"{what}: this manager leases its peer memory (peers='lent'); the lenders grow "
                "and reclaim it (aqua_offload.lending), by hand it would be granted twice")

    def synchronize(self) -> None:
        """Block until every copy issued by this manager has completed."""
        with self._gate.call("synchronize"):
            self._store.synchronize()
            self._holders.reap()
        storage.sweep_pins()  # (torch <= 2.9: dropped paged-out tensors' bytes come back)
        orphans.free(self)

    def stats(self) -> dict[str, Any]:
        """Counters and per-tier pool statistics; see docs/stats.md for every key.

        Returns
        -------
        dict
            ``backend``, ``device``, ``policy``, ``tiers`` (per tier: ``tier``, ``location``,
            ``capacity``, ``used``, ``peak``, ``free``, ``largest_free``, ``fragmentation``,
            ``blocks``, ``free_ranges``, ``segments``, ``lent_segments``, ``fenced``,
            ``handles``), operation counters, bytes moved per direction, evictions,
            migrations, batch paths, lending and reclaim latency, ``prefetched_bytes``,
            ``peer_budgets``, ``closed``. Sizes in bytes. After ``close()`` the tiers are empty.
        """
        if self._gate.foreign():  # a forked child: closed to it, and no lock of the parent's
            s = {"backend": self._store.backend, "device": str(self.device), "closed": True,
                 "forked_child": True, "policy": self.policy, "tiers": [], "live_handles": 0}
            if self._lending is not None:
                s["lending"] = self._lending.stats()  # "detached"
            return s
        if not self._gate.closed:
            self._holders.reap()  # drops finished holders
            orphans.free(self)
        s = self._store.stats()
        s["backend"] = self._store.backend
        s["device"] = str(self.device)
        s["policy"] = self.policy
        s["closed"] = self._gate.closed
        s["prefetched_bytes"] = sum(list(self._prefetched.values()))
        s["peer_budgets"] = [dict(b) for b in self._peer_budgets]
        s["reclaim_last_gbps"] = (s["reclaim_last_bytes_moved"] / s["reclaim_last_s"] / 1e9
                                  if s["reclaim_last_s"] > 0 else 0.0)
        if self._lending is not None:
            s["lending"] = self._lending.stats()
        return s

    # -- lifetime (Note [Calls and close]) ------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._gate.closed

    def close(self, restore: bool = True) -> None:
        """Refuse new calls, wait for the calls in progress, then (with ``restore``, the
        default) fetch every tensor this manager paged out, and free every pool segment before
        returning. Leftover handles are ``"closed"``: calls on them raise :class:`ClosedError`.
        Without ``restore`` (at exit), paged-out tensors are left discarded."""
        if self._gate.foreign():  # a forked child: the parent's memory, not ours to touch
            self._gate.closed = True
            return
        if not self._gate.begin_close():
            return
        try:
            if restore:  # (torch <= 2.9: no fetch of what dropped paged-out tensors leave held)
                storage.sweep_pins()
            for last in (False, True):  # a lender found lost meanwhile: once more without it
                if not restore or self._store.closed:
                    break
                pending = [h for h in storage.handles_of(self) if h._live() and not h._kept
                           and not (self._remote is not None and self._remote.lost(h._id))]
                try:
                    if pending:
                        self._fetch(pending, [None] * len(pending), False, "close", closing=True)
                    break
                except RemoteLostError:
                    if last or self._remote is None:
                        raise
            if self._lending is not None:  # after the last step that can fail: no reclaim/lend
                self._lending.stop()  # after this one, yet a close that raised keeps serving
        except BaseException:
            self._gate.abort_close()
            raise
        # From here on every step is idempotent: a close interrupted below is finished by the
        # next one (the core's close returns at once the second time).
        self._store.close()  # frees every pool: copies are done, holders are free now
        for h in storage.handles_of(self):  # restore=False: their data is gone
            storage.discard(h._key, h)
            h._end("closed")
        for ref in list(self._handles.values()):  # snapshots (a deferred one lets its source go)
            h = ref()
            if h is not None and h._live():
                h._end("closed")
        self._holders.clear()
        if self._lending is not None:  # the leased memory is freed now: give the leases back
            self._lending.close()
        self._prefetched.clear()
        self._gate.end_close()

    def __enter__(self) -> "OffloadManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        tiers = ", ".join(f"{k} {loc}" for k, loc in self._tiers)
        state = "closed" if self._gate.closed else self._store.backend
        return f"<aqua_offload.OffloadManager {self.device} [{tiers}] {state}>"

    # -- helpers -------------------------------------------------------------------------
    def _own(self, handle: Any, what: str) -> Handle:
        return claims.own(self, handle, what)

    def _check_base(self, base: Any, tensor: torch.Tensor) -> Handle:
        return check_base(claims.own(self, base, "offload(base=)"), tensor)

    def _claim(self, handles: list[Any], what: str) -> ContextManager[list[Handle]]:
        return claims.claim(self, handles, what)

    def _stream(self, tier: int, lane: str) -> Any:
        """A torch view of one of the core's copy streams (CUDA only), for record_stream."""
        key = (tier, lane)
        stream = self._ext_streams.get(key)
        if stream is None:
            stream = self._ext_streams[key] = external_stream(
                self._store.copy_stream(tier, lane), self.device)
        return stream

    _record_stream = staticmethod(record_stream)


@atexit.register
def _close_all() -> None:
    # At exit: wait for copies and free pools before the CUDA runtime unloads. No restore:
    # the process is ending.
    for m in live_managers():
        try:
            m.close(restore=False)
        except Exception:
            pass

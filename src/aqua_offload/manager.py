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
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import threading
import weakref
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from . import _core, storage
from .storage import snapshot_source as _snapshot_source
from .devices import (DeviceLike, current_stream, external_stream, parse_peer, record_stream,
                      resolve_device, resolve_peers)
from .errors import InvalidArgumentError, InvalidHandleError, OffloadError
from .handle import Handle, check_priority as _check_priority
from .peer_budget import auto_budgets
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

    Notes
    -----
    All memory is reserved here, once; ``offload`` and ``fetch`` never allocate device or
    pinned memory. A manager is a context manager; ``close()`` pages every released tensor
    back in before giving the memory up.
    """

    _aqua_not_state = True  # never walked as part of a workload state (state.py)

    def __init__(self, device: DeviceLike | None = None, peers: Any = "auto",
                 peer_bytes: int | str | Mapping[Any, int | str] | None = None,
                 host_bytes: int | str | None = None, policy: str = "lru",
                 chunk_bytes: int | str | None = None) -> None:
        backend, index, tdevice = resolve_device(device)
        if not isinstance(policy, str) or policy not in POLICIES:
            raise InvalidArgumentError(f"unknown eviction policy {policy!r} (available: {', '.join(POLICIES)})")
        default_peer, default_host = _DEFAULT_BYTES[backend]
        self._peer_budgets: list[dict[str, Any]] = []
        lent = isinstance(peers, str) and peers.strip().lower() == "lent"
        if lent:  # 0-byte peer tiers, grown by leases (lending/consumer.py)
            from .lending.consumer import lent_peer_specs
            peer_specs = lent_peer_specs(backend, index)
        else:
            auto = isinstance(peers, str) and peers.strip().lower() == "auto"
            if isinstance(peer_bytes, Mapping):
                budgets = {parse_peer(k, backend): parse_size(v, name=f"peer_bytes[{k!r}]")
                           for k, v in peer_bytes.items()}
                peer_list = list(budgets) if auto else resolve_peers(peers, backend, index)
                missing = [p for p in peer_list if p not in budgets]
                if missing:
                    raise InvalidArgumentError(f"peer_bytes has no budget for peer(s) {missing}")
            else:
                size = parse_size(default_peer if peer_bytes is None else peer_bytes,
                                  name="peer_bytes")
                peer_list = resolve_peers(peers, backend, index)
                budgets = {p: size for p in peer_list}
            if auto:  # what each peer can spare (peer_budget.py)
                peer_specs, self._peer_budgets = auto_budgets(backend, peer_list, budgets)
            else:
                peer_specs = [(p, budgets[p]) for p in peer_list]
        host = parse_size(default_host if host_bytes is None else host_bytes, name="host_bytes")
        chunk = _DEFAULT_CHUNK[backend] if chunk_bytes is None else parse_size(chunk_bytes, name="chunk_bytes")
        self._store = _core.Store(backend, index, peer_specs, host, chunk, policy)
        self.device = tdevice
        self.policy = policy
        self._cuda = backend == "cuda"
        self._tiers = [(self._store.tier_kind(t), self._store.tier_location(t))
                       for t in range(self._store.tier_count)]
        self._ext_streams: dict[int, Any] = {}
        self._holders: collections.deque[Handle] = collections.deque()
        self._holders_lock = threading.RLock()  # a reaped holder may drop its handle: __del__
        self._released: dict[int, Handle] = {}  # core id -> live release=True handle
        self._released_lock = threading.Lock()
        self._prefetched_bytes = 0
        self._closed = False
        self._lending: Any = None
        _live.add(self)
        if lent:
            from .lending.consumer import attach
            self._lending = attach(self, peer_bytes)

    # -- offload -------------------------------------------------------------------------
    def offload(self, tensor: torch.Tensor, release: bool = True, *, priority: float = 0.0,
                base: Handle | None = None, fence: str = "now") -> Handle:
        """Start copying ``tensor`` to the fastest tier with room; return at once.

        Parameters
        ----------
        tensor : torch.Tensor
            A strided tensor on this manager's device, any dtype and shape.
        release : bool
            True: page out the tensor's whole storage (every view of it); the tensor must not
            be touched until fetched (see :func:`is_offloaded`, :func:`debug_guard`).
            False: take a snapshot; the tensor stays valid and ``fetch`` returns a new one.
        priority : float
            Eviction priority: when a tier is full, lower priorities move down first.
        base : Handle, optional
            Incremental offload of append-only state: a live handle (e.g. kept by
            ``fetch(h, keep=True)``) whose bytes are a prefix of this offload's bytes. Only the
            new suffix is copied when ``base``'s block has room; ``base`` is consumed.
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
            Wrong device or layout, the storage is already paged out, a bad priority or base.
        """
        bases = None if base is None else [base]
        return self._offload([tensor], release, priority, bases, fence, "offload")[0]

    def offload_many(self, tensors: Sequence[torch.Tensor], release: bool = True, *,
                     priority: float = 0.0, fence: str = "now") -> list[Handle]:
        """Offload every tensor in one call into the core: one event on the current stream and
        one batched submission per tier, so many small tensors cost about one copy of their
        total size. All or nothing: on an error nothing is offloaded. ``release``,
        ``priority`` and ``fence`` as for :meth:`offload`."""
        return self._offload(list(tensors), release, priority, None, fence, "offload_many")

    def _offload(self, tensors: list[torch.Tensor], release: bool, priority: float,
                 bases: list[Handle | None] | None, fence: str, what: str) -> list[Handle]:
        """The one offload path (a single offload is a batch of one)."""
        self._check_open()
        for t in tensors:
            self._check_tensor(t, what)
        prio = _check_priority(priority)
        if fence not in ("now", "deferred"):
            raise InvalidArgumentError(f"{what}: fence must be 'now' or 'deferred', got {fence!r}")
        if fence == "deferred" and release:
            raise InvalidArgumentError(f"{what}: fence='deferred' is for snapshots "
                                       "(release=False); a released tensor is never written")
        base_ids = [0 if b is None else self._own(b, "offload(base=)")._id
                    for b in (bases or [None] * len(tensors))]
        self._reap_holders()
        stream = current_stream(self.device)
        if not release:
            srcs = [_snapshot_source(t) for t in tensors]
            sizes = [s.numel() * s.element_size() for s in srcs]
            # A temporary source may be dropped after the call: with fence "now" the current
            # stream (its allocation stream) waits for the copy; "deferred" keeps it alive below.
            got = self._store.offload_many(
                [(s.data_ptr() if n else 0, n, prio, b) for s, n, b in zip(srcs, sizes, base_ids)],
                stream, fence == "now")
            handles = []
            for (cid, tier), t, src, n, b in zip(got, tensors, srcs, sizes, bases or [None] * len(tensors)):
                if b is not None:
                    self._consumed(b)
                h = self._new_handle(cid, tier, t, nbytes=n, release=False, key=None,
                                     priority=prio)
                if fence == "deferred" and n:
                    self._defer_fence(h, t, src, tier)
                handles.append(h)
            return handles
        reserved: list[tuple[int, Any]] = []
        try:
            for t in tensors:
                if not t.untyped_storage().resizable():
                    raise InvalidArgumentError(
                        f"{what}(release=True): this storage is not owned by torch's allocator "
                        "(e.g. made by torch.from_numpy or from a buffer), so it cannot be paged "
                        "out in place; use release=False")
                reserved.append(storage.reserve(t, f"{what}(release=True)"))
            stores = [t.untyped_storage() for t in tensors]
            got = self._store.offload_many(
                [(s.data_ptr(), s.nbytes(), prio, b) for s, b in zip(stores, base_ids)],
                stream, False)
        except BaseException:
            for key, token in reserved:
                storage.unregister(key, token)
            raise
        return [self._paged_out(cid, tier, t, key, token, prio, b)
                for (cid, tier), t, (key, token), b
                in zip(got, tensors, reserved, bases or [None] * len(tensors))]

    def _defer_fence(self, handle: Handle, tensor: torch.Tensor, src: torch.Tensor,
                     tier: int) -> None:
        """A deferred snapshot: the source's memory must outlive the copy (the caller may drop
        it), and the source is registered so debug_guard can catch a write before fence()."""
        handle._deferred = storage.defer(tensor, handle)  # a key: the handle never pins tensor
        if self._cuda:
            self._record_stream(src, self._stream(tier, "to_tier"))
        else:
            handle._holder = src
            with self._holders_lock:
                self._holders.append(handle)

    def _fence(self, handle: Handle) -> None:
        """Order the current stream after the copy that read a deferred snapshot's source."""
        with handle._lock:
            if handle._deferred is None:
                return
            if handle._terminal is None:
                self._check_open()
                self._store.fence_source(handle._id, current_stream(self.device))
            self._undefer(handle)

    @staticmethod
    def _undefer(handle: Handle) -> None:
        """The source of a deferred snapshot needs no fence any more: a fetch ordered the
        current stream after the offload copy, or the snapshot is dropped (whatever the copy
        reads then no longer matters; the source's memory is kept alive regardless)."""
        if handle._deferred is not None:
            storage.undefer(handle._deferred, handle)
            handle._deferred = None

    def _paged_out(self, core_id: int, tier: int, tensor: torch.Tensor, key: int, token: Any,
                   prio: float, base: Handle | None) -> Handle:
        """After the store accepted a release: page the storage out and protect its memory."""
        if base is not None:
            self._consumed(base)
        src = tensor.untyped_storage()
        handle = self._new_handle(core_id, tier, tensor, nbytes=src.nbytes(), release=True,
                                  key=key, priority=prio)
        holder = storage.swap_out(src)
        storage.commit(key, token, handle)
        with self._released_lock:
            self._released[core_id] = handle
        if not holder.nbytes():
            return handle
        if self._cuda:  # the allocator reuses the memory only after the copy stream passed here
            self._record_stream(holder, self._stream(tier, "to_tier"))
        else:
            handle._holder = holder
            with self._holders_lock:
                self._holders.append(handle)
        return handle

    def _new_handle(self, core_id: int, tier: int, tensor: torch.Tensor, *, nbytes: int,
                    release: bool, key: int | None, priority: float) -> Handle:
        kind, location = self._tiers[tier]  # where the copy went (Handle.tier stays live)
        return Handle(self, core_id, nbytes=nbytes, shape=tensor.shape, dtype=tensor.dtype,
                      release=release, tensor=tensor if release else None, key=key,
                      tier=kind, location=location, priority=priority)

    # -- fetch ---------------------------------------------------------------------------
    def fetch(self, handle: Handle | torch.Tensor, out: torch.Tensor | None = None, *,
              keep: bool = False) -> torch.Tensor:
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
        torch.Tensor
            For a release: the original tensor object, its storage restored in place (every
            view sees the data again). For a snapshot: ``out`` or a new contiguous tensor.
        """
        return self._fetch([handle], [out], keep, "fetch")[0]

    def fetch_many(self, handles: Iterable[Handle | torch.Tensor],
                   outs: Sequence[torch.Tensor | None] | None = None, *,
                   keep: bool = False) -> list[torch.Tensor]:
        """Fetch every handle in one call into the core (one event, one batched submission per
        tier). All handles (and ``outs``, one per handle, ``None`` or a tensor as for
        ``fetch(out=)``, snapshots only) are checked before any is fetched. ``keep`` as for
        :meth:`fetch`, for every handle."""
        handles = list(handles)
        return self._fetch(handles, [None] * len(handles) if outs is None else list(outs), keep,
                           "fetch_many")

    def _fetch(self, handles: list[Any], outs: list[torch.Tensor | None], keep: bool,
               what: str) -> list[torch.Tensor]:
        """The one fetch path (a single fetch is a batch of one)."""
        self._check_open()
        with self._claim(handles, what) as handles:
            if len({id(h) for h in handles}) != len(handles):
                raise InvalidArgumentError(f"{what}: a handle is listed twice")
            if len(outs) != len(handles):
                raise InvalidArgumentError(f"{what}: outs must have one entry per handle")
            for h, o in zip(handles, outs):
                if h._kept:
                    raise InvalidHandleError(
                        f"{what}: this handle is the kept copy of a tensor already restored; use "
                        "it as offload(..., base=h) or free it")
                if o is not None:
                    if h.release:
                        raise InvalidArgumentError(f"{what}: out= is for snapshots; a released "
                                                   "tensor is restored in place")
                    self._check_out(o, h)
            dests = []
            for h, o in zip(handles, outs):
                if h.release:
                    dests.append(self._release_destination(h, h._tensor))
                elif h._prefetch is not None:
                    dests.append(h._prefetch)
                else:
                    dests.append(o if o is not None else
                                 torch.empty(h.shape, dtype=h.dtype, device=self.device))
            ptrs = [0 if h._prefetch is not None or not h.nbytes else d.data_ptr()
                    for h, d in zip(handles, dests)]
            self._store.fetch_many([h._id for h in handles], ptrs, current_stream(self.device),
                                   keep)
            results = []
            for h, d, o in zip(handles, dests, outs):
                self._adopt_prefetch(h)
                prefetched = h._prefetch is not None
                self._drop_prefetch(h)
                self._undefer(h)  # the fetch ordered the current stream after the offload copy
                if h.release:
                    tensor = h._tensor
                    storage.swap_in(tensor.untyped_storage(), d.untyped_storage())
                    if keep:
                        self._unpage(h)
                        h._kept = True
                    else:
                        self._retire(h, "fetched")
                    results.append(tensor)
                    continue
                if not keep:
                    h._finish("fetched")
                results.append(o.copy_(d) if prefetched and o is not None else d)
            return results

    def prefetch(self, handle: Handle | torch.Tensor) -> Handle:
        """Start copying the handle back now, into memory allocated on the current stream, and
        return at once; a later ``fetch`` only waits for it (no second copy). The destination
        is counted in ``stats()["prefetched_bytes"]`` and given back if the handle is freed."""
        return self.prefetch_many([handle])[0]

    def prefetch_many(self, handles: Iterable[Handle | torch.Tensor]) -> list[Handle]:
        """:meth:`prefetch` every handle in one call into the core (all are checked first);
        already prefetched ones are left as they are."""
        self._check_open()
        with self._claim(list(handles), "prefetch") as handles:
            if any(h._kept for h in handles):
                raise InvalidHandleError("prefetch: a kept copy of a restored tensor")
            todo = list({id(h): h for h in handles if h._prefetch is None}.values())
            bufs = [torch.empty(h.nbytes, dtype=torch.uint8, device=self.device) if h.release
                    else torch.empty(h.shape, dtype=h.dtype, device=self.device) for h in todo]
            tiers = self._store.prefetch_many(
                [h._id for h in todo], [b.data_ptr() if h.nbytes else 0 for h, b in zip(todo, bufs)],
                current_stream(self.device))
            stream = torch.cuda.current_stream(self.device) if self._cuda else None
            for h, buf, tier in zip(todo, bufs, tiers):
                h._prefetch = buf
                h._prefetch_tier = tier
                h._prefetch_stream = stream
                with self._holders_lock:
                    self._prefetched_bytes += h.nbytes
            return handles

    def _release_destination(self, handle: Handle, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().nbytes() != 0:
            if not self._store.contains(handle._id):  # fetched a moment ago by another thread
                raise InvalidHandleError("fetch: the handle was already fetched")
            raise InvalidArgumentError("fetch: the paged-out storage was resized meanwhile; "
                                       "refusing to overwrite it")
        if handle._prefetch is not None:
            return handle._prefetch
        return torch.empty(handle.nbytes, dtype=torch.uint8, device=self.device)

    def _adopt_prefetch(self, handle: Handle) -> None:
        """The prefetch buffer is used on the current stream from now on; if that is not the
        stream it was allocated on, tell the caching allocator (CUDA)."""
        if handle._prefetch is not None and self._cuda:
            current = torch.cuda.current_stream(self.device)
            if current != handle._prefetch_stream:
                self._record_stream(handle._prefetch, current)

    def _drop_prefetch(self, handle: Handle) -> None:
        if handle._prefetch is None:
            return
        handle._prefetch = None
        with self._holders_lock:
            self._prefetched_bytes -= handle.nbytes

    # -- free, waits, lending, stats -----------------------------------------------------
    def free(self, handle: Handle | torch.Tensor) -> None:
        """Drop the handle's offloaded bytes without fetching them. For a release, the tensor
        keeps its empty storage: its data is gone."""
        self._check_open()
        with self._claim([handle], "free") as (handle,):
            if handle._holder is not None or (handle._prefetch is not None and not self._cuda):
                self._store.wait(handle._id)  # emulation: a copy may still use the holder/buffer
            self._store.free(handle._id)
            if handle._prefetch is not None and self._cuda:  # reused after the copy into it
                self._record_stream(handle._prefetch,
                                    self._stream(handle._prefetch_tier, "prefetch"))
            self._drop_prefetch(handle)
            self._undefer(handle)
            self._retire(handle, "freed")

    def _discard(self, handle: Handle) -> None:
        if not self._closed and handle._terminal is None:
            self.free(handle)

    def _ready(self, handle: Handle) -> bool:
        if handle._terminal == "fetched":
            return True
        self._own(handle, "ready")
        return bool(self._store.ready(handle._id))

    def _wait(self, handle: Handle) -> None:
        if handle._terminal == "fetched":
            return
        self._own(handle, "wait")
        self._store.wait(handle._id)
        handle._holder = None

    def lend(self, device: DeviceLike, nbytes: int | str) -> int:
        """Grow the pool on peer ``device`` by ``nbytes`` (a new segment, allocated now).

        Returns
        -------
        int
            The peer tier's capacity afterwards, in bytes.
        """
        self._check_open()
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
            More than is lent, an unknown device, or a reclaim of it already in progress.
        OutOfMemoryError
            The lower tiers cannot take the handles; nothing was reclaimed.
        """
        self._check_open()
        n = None if nbytes is None else parse_size(nbytes, name="reclaim nbytes")
        return int(self._store.reclaim(parse_peer(device, self._store.backend), n))

    def synchronize(self) -> None:
        """Block until every copy issued by this manager has completed."""
        self._check_open()
        self._store.synchronize()
        self._reap_holders()

    def stats(self) -> dict[str, Any]:
        """Counters and per-tier pool statistics; see docs/stats.md for every key.

        Returns
        -------
        dict
            ``backend``, ``device``, ``policy``, ``tiers`` (per tier: ``tier``, ``location``,
            ``capacity``, ``used``, ``peak``, ``free``, ``largest_free``, ``fragmentation``,
            ``blocks``, ``free_ranges``, ``segments``, ``lent_segments``, ``fenced``,
            ``handles``), operation counters, bytes moved per direction, evictions,
            migrations, lending and reclaim latency, ``prefetched_bytes``. Sizes in bytes.
        """
        self._reap_holders()  # drops finished holders, and with them unreachable handles
        s = self._store.stats()
        s["backend"] = self._store.backend
        s["device"] = str(self.device)
        s["policy"] = self.policy
        s["prefetched_bytes"] = self._prefetched_bytes
        s["peer_budgets"] = [dict(b) for b in self._peer_budgets]
        s["reclaim_last_gbps"] = (s["reclaim_last_bytes_moved"] / s["reclaim_last_s"] / 1e9
                                  if s["reclaim_last_s"] > 0 else 0.0)
        if self._lending is not None:
            s["lending"] = self._lending.stats()
        return s

    # -- lifetime ------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, restore: bool = True) -> None:
        """Release the pools. With ``restore`` (default), every tensor paged out by this
        manager is fetched back first, so no data is lost; other handles become invalid."""
        if self._closed:
            return
        if restore:
            with self._released_lock:
                pending = list(self._released.values())
            for h in pending:
                if h._terminal is None:
                    self.fetch(h)
        if self._lending is not None:  # after the last step that can fail: no reclaim/lend
            self._lending.stop()  # after this one, yet a close that raised keeps serving
        self._closed = True
        self._store.close()  # waits for every copy: holders and prefetch buffers are free now
        with self._released_lock:
            for h in self._released.values():
                storage.unregister(h._key, h)
                h._finish("freed")
            self._released.clear()
        with self._holders_lock:
            self._holders.clear()
            self._prefetched_bytes = 0
        if self._lending is not None:  # the leased memory is freed now: give the leases back
            self._lending.close()

    def __enter__(self) -> "OffloadManager":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        tiers = ", ".join(f"{k} {loc}" for k, loc in self._tiers)
        state = "closed" if self._closed else self._store.backend
        return f"<aqua_offload.OffloadManager {self.device} [{tiers}] {state}>"

    # -- helpers -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise OffloadError("this OffloadManager is closed")

    def _check_tensor(self, t: Any, what: str) -> None:
        if not isinstance(t, torch.Tensor):
            raise InvalidArgumentError(f"{what} expects a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided or t.is_quantized or t.is_nested:
            raise InvalidArgumentError(f"{what}: only strided (dense) tensors can be offloaded, "
                                       f"got layout {t.layout}")
        if t.device != self.device:
            raise InvalidArgumentError(f"{what}: tensor is on {t.device}, this manager serves "
                                       f"{self.device}")

    def _check_out(self, out: Any, handle: Handle) -> None:
        if not isinstance(out, torch.Tensor):
            raise InvalidArgumentError(f"fetch: out must be a torch.Tensor, got {type(out).__name__}")
        if out.device != self.device or out.dtype != handle.dtype or out.shape != handle.shape:
            raise InvalidArgumentError(
                f"fetch: out is {tuple(out.shape)} {out.dtype} on {out.device}; the handle needs "
                f"{tuple(handle.shape)} {handle.dtype} on {self.device}")
        if not out.is_contiguous() or storage.is_offloaded(out):
            raise InvalidArgumentError("fetch: out must be contiguous and not paged out")

    def _own(self, handle: Any, what: str) -> Handle:
        if isinstance(handle, torch.Tensor):
            found = storage.owner(handle)
            if found is None:
                raise InvalidHandleError(f"{what}: this tensor is not paged out")
            handle = found
        if not isinstance(handle, Handle):
            raise InvalidHandleError(f"{what} expects a Handle, got {type(handle).__name__}")
        if handle._manager is not self:
            raise InvalidHandleError(f"{what}: the handle belongs to another OffloadManager")
        if handle._terminal is not None:
            raise InvalidHandleError(f"{what}: the handle was already {handle._terminal}")
        if what == "offload(base=)":
            if handle.release and not handle._kept:
                raise InvalidArgumentError(
                    "offload(base=): the base still holds a paged-out tensor; pass a snapshot "
                    "or a copy kept by fetch(h, keep=True)")
            if handle._prefetch is not None:
                raise InvalidArgumentError("offload(base=): the base has a prefetch in flight; "
                                           "fetch or free it first")
        return handle

    @contextlib.contextmanager
    def _claim(self, handles: list[Any], what: str) -> Iterator[list[Handle]]:
        """Hold the handles' locks (in a fixed order) and check them under the locks: the Python
        side of a handle (prefetch buffer, terminal state) changes with its C++ entry at once."""
        hs = [self._own(h, what) for h in handles]
        with contextlib.ExitStack() as stack:
            for h in sorted({id(h): h for h in hs}.values(), key=lambda h: h._id):
                stack.enter_context(h._lock)
            yield [self._own(h, what) for h in hs]

    def _consumed(self, base: Handle) -> None:
        """``base`` was taken over by an incremental offload."""
        base._finish("freed")

    def _unpage(self, handle: Handle) -> None:
        """A released tensor is back in place; its handle may live on as a kept copy."""
        storage.unregister(handle._key, handle)
        with self._released_lock:
            self._released.pop(handle._id, None)
        handle._tensor = None

    def _retire(self, handle: Handle, state: str) -> None:
        if handle.release and not handle._kept:
            self._unpage(handle)
        handle._finish(state)

    def _reap_holders(self) -> None:
        """Drop holders (emulation, release=True) whose copy has completed."""
        if not self._holders:
            return
        with self._holders_lock:
            while self._holders:
                h = self._holders[0]
                if h._holder is not None and h._terminal is None:
                    try:
                        if not self._store.ready(h._id):
                            break
                    except InvalidHandleError:
                        pass  # fetched or freed by another thread a moment ago: copy is done
                h._holder = None
                self._holders.popleft()

    def _stream(self, tier: int, direction: str) -> Any:
        """A torch view of one of the core's copy streams (CUDA only), for record_stream."""
        key = (tier, direction)
        stream = self._ext_streams.get(key)
        if stream is None:
            stream = self._ext_streams[key] = external_stream(
                self._store.copy_stream(tier, direction), self.device)
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

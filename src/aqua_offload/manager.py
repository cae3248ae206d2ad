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
import threading
import weakref
from typing import Any, Iterable, Mapping, Sequence

import torch

from . import _core, storage
from .devices import DeviceLike, current_stream, parse_peer, resolve_device, resolve_peers
from .errors import InvalidArgumentError, InvalidHandleError, OffloadError
from .handle import Handle
from .sizes import parse_size

__all__ = ["OffloadManager", "live_managers"]

POLICIES = ("lru",)
# Defaults sized for the backend: a GPU server lends GiBs; emulation arenas are pre-faulted host
# memory on small machines, so they stay small unless asked for.
_DEFAULT_BYTES = {"cuda": ("8GiB", "16GiB"), "emulation": ("64MiB", "256MiB")}
# CUDA: chunk copies so a fetch can overtake a long offload on a shared copy engine. Emulation
# has no shared engine (one worker thread per stream), and glibc's memcpy switches to its faster
# non-temporal path only for copies of hundreds of MiB, so whole copies are the fast choice.
_DEFAULT_CHUNK = {"cuda": 32 << 20, "emulation": 1 << 40}
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
    peers : "auto", None, device or list of devices
        Peer GPUs lending memory, fastest first. ``"auto"``: every other GPU the device can
        reach as a peer. ``None``: no peer tier (pinned host only).
    peer_bytes : int, str or mapping
        Pool size on each peer (``"8GiB"``), or a budget per peer (``{"cuda:1": "20GiB"}``),
        whose keys are the peers when ``peers="auto"``. Default 8 GiB (64 MiB on emulation).
    host_bytes : int or str
        Pinned host pool size, allocated once at exactly this size. 0 disables the host tier.
        Default 16 GiB (256 MiB on emulation).
    policy : str
        Eviction policy name (``"lru"``).
    chunk_bytes : int or str, optional
        Copies larger than this are enqueued in pieces of this size: 32 MiB by default on CUDA;
        whole copies by default on emulation.

    Notes
    -----
    All memory is reserved here, once; ``offload`` and ``fetch`` never allocate device or
    pinned memory. A manager is a context manager; ``close()`` pages every released tensor
    back in before giving the memory up.
    """

    def __init__(self, device: DeviceLike | None = None, peers: Any = "auto",
                 peer_bytes: int | str | Mapping[Any, int | str] | None = None,
                 host_bytes: int | str | None = None, policy: str = "lru",
                 chunk_bytes: int | str | None = None) -> None:
        backend, index, tdevice = resolve_device(device)
        if not isinstance(policy, str) or policy not in POLICIES:
            raise InvalidArgumentError(f"unknown eviction policy {policy!r} (available: {', '.join(POLICIES)})")
        default_peer, default_host = _DEFAULT_BYTES[backend]
        if isinstance(peer_bytes, Mapping):
            budgets = {parse_peer(k, backend): parse_size(v, name=f"peer_bytes[{k!r}]")
                       for k, v in peer_bytes.items()}
            peer_list = list(budgets) if (isinstance(peers, str) and peers == "auto") \
                else resolve_peers(peers, backend, index)
            missing = [p for p in peer_list if p not in budgets]
            if missing:
                raise InvalidArgumentError(f"peer_bytes has no budget for peer(s) {missing}")
            peer_specs = [(p, budgets[p]) for p in peer_list]
        else:
            size = parse_size(default_peer if peer_bytes is None else peer_bytes, name="peer_bytes")
            peer_specs = [(p, size) for p in resolve_peers(peers, backend, index)]
        host = parse_size(default_host if host_bytes is None else host_bytes, name="host_bytes")
        chunk = _DEFAULT_CHUNK[backend] if chunk_bytes is None else parse_size(chunk_bytes, name="chunk_bytes")
        self._store = _core.Store(backend, index, peer_specs, host, chunk)
        self.device = tdevice
        self.policy = policy
        self._cuda = backend == "cuda"
        self._tiers = [(self._store.tier_kind(t), self._store.tier_location(t))
                       for t in range(self._store.tier_count)]
        self._ext_streams: dict[int, Any] = {}
        self._holders: collections.deque[Handle] = collections.deque()
        self._holders_lock = threading.Lock()
        self._released: dict[int, Handle] = {}  # core id -> live release=True handle
        self._released_lock = threading.Lock()
        self._closed = False
        _live.add(self)

    # -- offload -------------------------------------------------------------------------
    def offload(self, tensor: torch.Tensor, release: bool = True) -> Handle:
        """Start copying ``tensor`` to the fastest tier with room; return at once.

        Parameters
        ----------
        tensor : torch.Tensor
            A strided tensor on this manager's device, any dtype and shape.
        release : bool
            True: page out the tensor's whole storage (every view of it); the tensor must not
            be touched until fetched (see :func:`is_offloaded`, :func:`debug_guard`).
            False: take a snapshot; the tensor stays valid and ``fetch`` returns a new one.

        Raises
        ------
        OutOfMemoryError
            No tier has room; the tensor is untouched.
        InvalidArgumentError
            Wrong device or layout, or the storage is already paged out.
        """
        self._check_open()
        self._check_tensor(tensor, "offload")
        self._reap_holders()
        if release:
            return self._offload_release(tensor)
        return self._offload_snapshot(tensor)

    def _offload_release(self, tensor: torch.Tensor) -> Handle:
        store = tensor.untyped_storage()
        if not store.resizable():
            raise InvalidArgumentError(
                "offload(release=True): this storage is not owned by torch's allocator (e.g. made "
                "by torch.from_numpy or from a buffer), so it cannot be paged out in place; use "
                "release=False")
        key, token = storage.reserve(tensor, "offload(release=True)")
        try:
            core_id = self._store.offload(store.data_ptr(), store.nbytes(),
                                          current_stream(self.device), False)
        except BaseException:
            storage.unregister(key, token)
            raise
        handle = self._new_handle(core_id, tensor, nbytes=store.nbytes(), release=True, key=key)
        holder = storage.swap_out(store)
        storage.commit(key, token, handle)
        with self._released_lock:
            self._released[core_id] = handle
        if self._cuda:
            if holder.nbytes():
                stream = self._copy_stream(self._store.info(core_id)[1])
                torch.empty(0, dtype=torch.uint8, device=self.device).set_(holder).record_stream(stream)
        elif holder.nbytes():
            handle._holder = holder
            with self._holders_lock:
                self._holders.append(handle)
        return handle

    def _offload_snapshot(self, tensor: torch.Tensor) -> Handle:
        if storage.is_offloaded(tensor):
            raise InvalidArgumentError("offload(release=False): the tensor's storage is paged out; "
                                       "fetch its handle first")
        # Materialise lazy conjugate/negative views and strides: the tier holds plain bytes.
        src = tensor.resolve_conj().resolve_neg().contiguous()
        nbytes = src.numel() * src.element_size()
        core_id = self._store.offload(src.data_ptr() if nbytes else 0, nbytes,
                                      current_stream(self.device), True)
        # `src`, if a temporary, may be dropped now: the current stream (its allocation stream)
        # waits for the copy, so its memory is reused only after the copy read it.
        return self._new_handle(core_id, tensor, nbytes=nbytes, release=False, key=None)

    def _new_handle(self, core_id: int, tensor: torch.Tensor, *, nbytes: int, release: bool,
                    key: int | None) -> Handle:
        _, tier, _ = self._store.info(core_id)
        kind, location = self._tiers[tier]
        return Handle(self, core_id, nbytes=nbytes, shape=tensor.shape, dtype=tensor.dtype,
                      release=release, tensor=tensor if release else None, key=key,
                      tier=kind, location=location)

    def offload_many(self, tensors: Sequence[torch.Tensor], release: bool = True) -> list[Handle]:
        """Offload each tensor; all or nothing: on an error, those already offloaded are
        fetched back (release) or freed (snapshots) before the error propagates."""
        tensors = list(tensors)
        for t in tensors:
            self._check_tensor(t, "offload_many")
        done: list[Handle] = []
        try:
            for t in tensors:
                done.append(self.offload(t, release=release))
        except BaseException:
            for h in reversed(done):
                (self.fetch if release else self.free)(h)
            raise
        return done

    # -- fetch ---------------------------------------------------------------------------
    def fetch(self, handle: Handle | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy the handle's bytes back to this device, ordered before later work on the
        current stream; consumes the handle.

        Parameters
        ----------
        handle : Handle or torch.Tensor
            A handle of this manager, or a paged-out tensor (its handle is looked up).
        out : torch.Tensor, optional
            Snapshots only: a contiguous tensor of the same shape and dtype to fetch into.

        Returns
        -------
        torch.Tensor
            For a release: the original tensor object, its storage restored in place (every
            view sees the data again). For a snapshot: ``out`` or a new contiguous tensor.
        """
        self._check_open()
        handle = self._own(handle, "fetch")
        stream = current_stream(self.device)
        if handle.release:
            if out is not None:
                raise InvalidArgumentError("fetch: out= is for snapshots; a released tensor is "
                                           "restored in place")
            tensor = handle._tensor
            store = tensor.untyped_storage()
            if store.nbytes() != 0:
                raise InvalidArgumentError("fetch: the paged-out storage was resized meanwhile; "
                                           "refusing to overwrite it")
            fresh = torch.empty(handle.nbytes, dtype=torch.uint8, device=self.device)
            self._store.fetch(handle._id, fresh.data_ptr() if handle.nbytes else 0, stream)
            storage.swap_in(store, fresh.untyped_storage())
            self._retire(handle, "fetched")
            return tensor
        if out is None:
            out = torch.empty(handle.shape, dtype=handle.dtype, device=self.device)
        else:
            self._check_out(out, handle)
        self._store.fetch(handle._id, out.data_ptr() if handle.nbytes else 0, stream)
        handle._finish("fetched")
        return out

    def fetch_many(self, handles: Iterable[Handle | torch.Tensor]) -> list[torch.Tensor]:
        """Fetch each handle, in order. All handles are checked before any is fetched."""
        handles = [self._own(h, "fetch_many") for h in handles]
        if len({id(h) for h in handles}) != len(handles):
            raise InvalidArgumentError("fetch_many: a handle is listed twice")
        return [self.fetch(h) for h in handles]

    # -- free, waits, stats --------------------------------------------------------------
    def free(self, handle: Handle | torch.Tensor) -> None:
        """Drop the handle's offloaded bytes without fetching them. For a release, the tensor
        keeps its empty storage: its data is gone."""
        self._check_open()
        handle = self._own(handle, "free")
        if handle._holder is not None:  # emulation: the copy may still read the holder
            self._store.wait(handle._id)
        self._store.free(handle._id)
        self._retire(handle, "freed")

    def _discard(self, handle: Handle) -> None:
        if not self._closed and handle._terminal is None:
            self._store.free(handle._id)
            handle._finish("freed")

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

    def synchronize(self) -> None:
        """Block until every copy issued by this manager has completed."""
        self._check_open()
        self._store.synchronize()
        self._reap_holders()

    def stats(self) -> dict[str, Any]:
        """Counters and per-tier pool statistics.

        Returns
        -------
        dict
            ``backend``, ``device``, ``tiers`` (per tier: ``tier``, ``location``, ``capacity``,
            ``used``, ``peak``, ``free``, ``largest_free``, ``fragmentation``, ``blocks``,
            ``free_ranges``, ``pending`` (bytes awaiting deferred reuse), ``handles``),
            ``offloads``, ``fetches``, ``frees``, ``bytes_offloaded``, ``bytes_fetched``,
            ``live_handles``, ``events_created``. All sizes in bytes.
        """
        s = self._store.stats()
        s["backend"] = self._store.backend
        s["device"] = str(self.device)
        return s

    # -- lifetime ------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, restore: bool = True) -> None:
        """Release the pools. With ``restore`` (default), every tensor paged out by this
        manager is fetched back first, so no data is lost; snapshot handles become invalid."""
        if self._closed:
            return
        if restore:
            with self._released_lock:
                pending = list(self._released.values())
            for h in pending:
                if h._terminal is None:
                    self.fetch(h)
        self._closed = True
        self._store.close()
        with self._released_lock:
            for h in self._released.values():
                storage.unregister(h._key, h)
                h._finish("freed")
            self._released.clear()
        with self._holders_lock:
            self._holders.clear()

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
        return handle

    def _retire(self, handle: Handle, state: str) -> None:
        if handle.release:
            storage.unregister(handle._key, handle)
            with self._released_lock:
                self._released.pop(handle._id, None)
        handle._finish(state)

    def _reap_holders(self) -> None:
        """Drop holders (emulation, release=True) whose copy has completed."""
        if not self._holders:
            return
        with self._holders_lock:
            while self._holders:
                h = self._holders[0]
                if h._holder is not None and h._terminal is None and not self._store.ready(h._id):
                    break
                h._holder = None
                self._holders.popleft()

    def _copy_stream(self, tier: int) -> Any:
        stream = self._ext_streams.get(tier)
        if stream is None:
            ptr = self._store.copy_stream(tier, "to_tier")
            stream = torch.cuda.ExternalStream(ptr, device=self.device)
            self._ext_streams[tier] = stream
        return stream


@atexit.register
def _close_all() -> None:
    # At exit: wait for copies and free pools before the CUDA runtime unloads. No restore:
    # the process is ending.
    for m in live_managers():
        try:
            m.close(restore=False)
        except Exception:
            pass

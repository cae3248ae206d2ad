"""The manager's remote tier: the core's tiers, then memory that lenders serve over NIXL.

:class:`RemoteTier` stands in for the core's ``Store`` in an ``OffloadManager`` made with
``remote=[...]``: it has the same methods, and the ids it hands out stay valid whichever tier
holds their bytes, so the manager's paging, snapshot, prefetch and fetch paths run unchanged.

Note [Remote placement]
    An offload goes to the core first. When the core's tiers are full (``OutOfMemoryError``),
    handles of the core's bottom tier are *spilled*, the lowest priority first, then the least
    recently offloaded: the core
    copies them out (``fetch(keep=True)``) into a local buffer, one ``write`` per staging
    round sends them to one lender (placement: the first lender, in the order given, with
    room for the whole round), and only then does the core free them; a spill that fails
    leaves them in the core. The offload is retried; if it still does not fit, the batch goes
    to a lender directly. A handle's bytes live in exactly one place: a core tier, or a range
    of one block of one lender: the handles of one batch share a block (Note [Packed blocks]
    in packing.py), small batches a lender's open slab (Note [Slabs] in placement.py). Spill
    copies count in the core's ``fetches``/``bytes_fetched``.

Note [Tier order]
    ``order="below_host"`` (the default) puts the lenders below every core tier: a batch goes
    to the core, and only when the core is full (after its own eviction, peer to host) does
    anything go to a lender (spilled, else direct). ``"above_host"`` puts them between the
    peers and host memory: a batch the peer tiers can take as they are (their free space, no
    eviction) goes to the core, which places it on a peer; any other goes to a lender
    directly, and to the core (host memory, with its eviction) only when no lender can hold
    it. Handles placed on the host that way stay there; a full core still spills its
    bottom tier to the lenders. The order is by placement, not a re-sort of what is placed.

Note [Staging]
    in staging.py: every remote transfer passes through one buffer registered once with
    every client, in rounds of one ``write`` (or one ``read`` per lender).

Note [Remote locks]
    ``_lock`` guards the tables and is never held while bytes move. An id in ``_busy`` is being
    moved or used by one call (a fetch, a free, a spill, a reclaim); others wait for it
    (``_cv``), and a spill skips it. The staging lock is held for one round, which includes a
    transfer under the client's deadline. Order: ids first, then staging, then the client's
    own locks. The reclaim callback (the client's thread) takes the same order, and gives up
    with a refusal when its ids stay busy past the deadline, so it never deadlocks with a call
    that waits for a transfer.

Note [Remote faults]
    A lender that dies or stops answering makes its client *lost* (Note [Failure] in
    client.py). Its handles stay live: ``fetch`` raises ``RemoteLostError`` at once (checked
    before anything moves, so a mixed batch changes nothing), ``free`` drops them, and
    ``stats()["remote"]`` counts them. The other lenders and the core's tiers keep working.
    What only that lender held is gone.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..devices import current_stream
from ..errors import (InvalidArgumentError, InvalidHandleError, OffloadError, OutOfMemoryError,
                      RemoteLostError)
from . import migration
from .client import RemoteClient
from .items import RemoteBlock
from . import placement, replicas, spilling, tier_stats
from .packing import Packs
from .protocol import TOKEN_ENV
from .staging import Staging

__all__ = ["RemoteTier", "STAGING_BYTES", "ORDERS"]

ORDERS = ("below_host", "above_host")  # Note [Tier order]

STAGING_BYTES = 64 << 20  # per manager; registered once with each lender's client
_FIRST_REMOTE_ID = 1 << 62  # ids of handles born remote; the core counts up from 1


@dataclass(slots=True)  # one object per remote handle, no __dict__: fewer for the GC to track
class _Remote:
    """Where a handle's bytes are on a lender: ``nbytes`` at ``offset`` in ``block``, which
    other handles of its batch may share (Note [Packed blocks]). ``block`` is None for 0
    bytes, or once a prefetch copied the bytes out and a reclaim took the block (the
    prefetch buffer holds them)."""

    client: int
    block: RemoteBlock | None
    nbytes: int
    priority: float = 0.0
    offset: int = 0
    prefetched: bool = False
    mirror: tuple[int, RemoteBlock, int] | None = None  # (client, block, offset): Note [Replicas]


class RemoteTier:
    """The core's Store plus remote lenders (Note [Remote placement]).

    Parameters
    ----------
    core : aqua_offload._core.Store
        The manager's store; closed by :meth:`close`.
    device : torch.device
        The manager's device (staging is pinned when it is a GPU).
    addresses : str or sequence of str
        Lenders, ``"host:port"``, in order of preference.
    token : bytes, str or None
        The lenders' shared secret; None: the ``AQUA_OFFLOAD_REMOTE_TOKEN`` environment variable.
    deadline_s : float
        Longest wait for any request or transfer of a lender.
    order : str
        ``"below_host"``: the lenders come after every core tier (peer, host, remote);
        ``"above_host"``: after the peers, before host memory (peer, remote, host). See Note
        [Tier order].
    copies : int
        1, or 2: every handle on the lenders has a copy on two of them (Note [Replicas] in
        replicas.py; needs two lenders).

    Raises
    ------
    InvalidArgumentError
        No address, a malformed or repeated address, no token, a bad deadline, order or
        number of copies.
    RemoteConnectError, RemoteAuthError, RemoteVersionError, RemoteProtocolError
        A lender cannot be used; the clients made so far are closed (the core is not).
    BackendError
        NIXL cannot be loaded.
    """

    def __init__(self, core: Any, device: torch.device, addresses: str | Sequence[str],
                 token: bytes | str | None, deadline_s: float = 5.0,
                 order: str = "below_host", copies: int = 1) -> None:
        if order not in ORDERS:
            raise InvalidArgumentError(f"remote_order must be one of {', '.join(ORDERS)}, got "
                                       f"{order!r}")
        self.order = order
        if isinstance(addresses, str):
            addresses = [addresses]
        addresses = list(addresses) if isinstance(addresses, (list, tuple)) else None
        if not addresses or any(not isinstance(a, str) for a in addresses):
            raise InvalidArgumentError("remote: a list of lender addresses 'host:port'")
        if len(set(addresses)) != len(addresses):
            raise InvalidArgumentError("remote: a lender is listed twice")
        if type(copies) is not int or copies not in (1, 2):
            raise InvalidArgumentError(f"remote_copies must be 1 or 2, got {copies!r}")
        if copies > len(addresses):
            raise InvalidArgumentError(f"remote_copies={copies} needs as many lenders, got "
                                       f"{len(addresses)}")
        self.copies = copies
        if token is None:
            token = os.environ.get(TOKEN_ENV)
            if token is None:
                raise InvalidArgumentError(f"remote: pass remote_token= or set {TOKEN_ENV}")
        self._core = core
        self._cuda = device.type == "cuda"
        self.device = device
        self._base = core.tier_count  # remote tier indices follow the core's
        # Note [Remote locks]; reentrant: a Handle dying (its __del__ frees it) may run anywhere
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        # held from a migration's core offload until its ids are aliased (live_ids)
        self._ids_lock = threading.Lock()
        self._remote: dict[int, _Remote] = {}  # LOCK: _lock; id -> where on a lender
        self._alias: dict[int, int] = {}  # LOCK: _lock; id -> core id, when they differ
        self._lru = spilling.SpillOrder()  # LOCK: _lock; core-held ids in spill order
        self._capacities: list[int] | None = None  # the core's tiers' (spilling.could_fit)
        self._busy: set[int] = set()  # LOCK: _lock
        # placements per (client, block id) not yet in _remote: a reclaim waits for them
        self._in_transit: collections.Counter[tuple[int, int]] = collections.Counter()  # LOCK
        self._packs = Packs()  # LOCK: _lock; handles per block (Note [Packed blocks])
        self._slabs: dict[int, placement.Slab] = {}  # LOCK: _lock; open slab per lender
        self._cache: dict[int, list[RemoteBlock]] = {}  # LOCK: _lock; Note [Block cache]
        self._asked: dict[int, set[int]] = {}  # LOCK: _lock; block ids reclaims named
        self._ids = itertools.count(_FIRST_REMOTE_ID)
        self._stats = {"spills": 0, "spilled_handles": 0, "spilled_bytes": 0,
                       "direct_offloads": 0, "remote_fetches": 0, "reclaims": 0,
                       "reclaimed_handles": 0, "reclaim_refusals": 0, "reclaim_last_s": 0.0,
                       "reclaim_max_s": 0.0, "lost_freed": 0}  # LOCK: _lock
        # the core's top-level counters for the calls on handles the lenders hold, added to
        # the core's in stats() (tier_stats.py; their offloads are direct_offloads above)
        self._counts = dict.fromkeys(("bytes_offloaded", "fetches", "bytes_fetched",
                                      "prefetches", "frees"), 0)  # LOCK: _lock
        self.clients: list[RemoteClient] = []
        try:
            for i, address in enumerate(addresses):
                self.clients.append(RemoteClient(
                    address, token, deadline_s,
                    on_reclaim=lambda blocks, i=i: migration.on_reclaim(self, i, blocks)))
            self._stage = Staging(self.clients, device, core, STAGING_BYTES)
        except BaseException:
            for c in self.clients:
                c.close()
            raise

    # -- the Store interface: what the manager calls ----------------------------------------
    @property
    def tier_count(self) -> int:
        return self._base + len(self.clients)

    def tier_kind(self, tier: int) -> str:
        return "remote" if tier >= self._base else self._core.tier_kind(tier)

    def tier_location(self, tier: int) -> str:
        return (self.clients[tier - self._base].address if tier >= self._base
                else self._core.tier_location(tier))

    def copy_stream(self, tier: int, lane: str) -> int:
        # remote copies are synchronous: any stream of the core is ordered after them
        return self._core.copy_stream(min(tier, self._base - 1), lane)

    # The core's attributes that take no handle id pass through; one that does must be
    # translated here (ids of migrated or remote handles are not the core's).
    _PASS = frozenset({"raw_copy", "closed", "backend", "emulation",
                       "device", "policy", "chunk_bytes"})

    def __getattr__(self, name: str) -> Any:
        if name not in RemoteTier._PASS:
            raise AttributeError(f"RemoteTier does not pass {name!r} to the core (an id-taking "
                                 "method needs its translation)")
        return getattr(self._core, name)

    def offload_many(self, items: list[tuple[int, int, float, int]], stream: int,
                     fence_user: bool, out: list | None = None) -> list[tuple[int, int]]:
        """The core's offload_many; spills to a lender or offloads there when the core is full."""
        items = list(items)
        bases = [b for _, _, _, b in items if b]
        with self._using(bases):
            with self._lock:
                remote_bases = [b for b in bases if b in self._remote]
                core_items = [(s, n, p, 0 if b in self._remote else self._alias.get(b, b)
                               ) if b else (s, n, p, 0) for s, n, p, b in items] if bases else items
            sizes = [n for _, n, _, _ in items]
            if not spilling.could_fit(self, sizes):  # the core can never hold it
                return self._to_lenders(items, bases, remote_bases, stream, out)
            if self.order == "above_host" and not self._fits_peers(sizes):
                try:  # Note [Tier order]: a lender before host memory
                    return self._to_lenders(items, bases, remote_bases, stream, out)
                except OutOfMemoryError:
                    pass  # no lender can hold it: the core's tiers after all
            try:
                got = self._core.offload_many(core_items, stream, fence_user, out)
            except OutOfMemoryError as oom:
                try:
                    if not spilling.spill(self, sum(sizes), stream, set(bases)):
                        raise oom
                    got = self._core.offload_many(core_items, stream, fence_user, out)
                except OutOfMemoryError:
                    return self._to_lenders(items, bases, remote_bases, stream, out)
            with self._lock:
                for (cid, _), (_, _, p, _) in zip(got, items):
                    self._lru[cid] = p  # the priority, for a spill (the core's info lacks it)
                for b in bases:  # the core consumed the core bases
                    if b not in remote_bases:
                        self._alias.pop(b, None)
                        self._lru.pop(b, None)
            self._consume(remote_bases, core=False)  # copied in full from the tensor
            return got

    def fetch_many(self, ids: list[int], dsts: list[int], stream: int, keep: bool = False,
                   done: list | None = None) -> None:
        """The core's fetch_many over both kinds of ids; all or nothing (remote bytes are
        read first, blocks freed only after the core's part succeeded)."""
        ids = list(ids)
        with self._using(ids):
            with self._lock:
                get = self._remote.get
                where = [get(i) for i in ids]
                remote = [(r, d) for r, d in zip(where, dsts) if r is not None]
                cids = [self._alias.get(i, i) for i, r in zip(ids, where) if r is None
                        ] if len(remote) < len(ids) else []
            if keep and any(r.prefetched and r.nbytes and (
                    r.block is None or not replicas.alive(self, replicas.source(self, r)[0]))
                    for r, _ in remote):
                raise InvalidArgumentError(
                    "fetch(keep=True): a lender reclaimed this handle's block, or was lost, "
                    "while it was prefetched, so the prefetch holds its only copy; fetch it "
                    "without keep")
            self._read(remote, stream)
            read = sum(r.nbytes for r, _ in remote if not r.prefetched)  # (a prefetch counted)
            if cids:
                self._core.fetch_many(cids, [d for r, d in zip(where, dsts) if r is None],
                                      stream, keep)
            with self._lock:
                self._counts["fetches"] += len(remote)
                self._counts["bytes_fetched"] += read
            if done is not None:  # at once, as the core's binding does: from here on the
                done.append(True)  # caller finishes the batch even if interrupted
            if not keep:  # the bytes are here now: emptied blocks go back, one request a lender
                with self._lock:
                    self._stats["remote_fetches"] += len(remote)
                self._release([r for r, _ in remote])
                self._forget(ids)
            else:  # the prefetch buffers were handed out: a later fetch reads again
                with self._lock:
                    for r, _ in remote:
                        r.prefetched = False

    def prefetch_many(self, ids: list[int], dsts: list[int], stream: int) -> list[int]:
        """Remote bytes are read into the buffers now; core ids are prefetched by the core."""
        ids = list(ids)
        with self._using(ids):
            with self._lock:
                where = [self._remote.get(i) for i in ids]
            self._read([(r, d) for r, d in zip(where, dsts) if r is not None], stream)
            core = [(self._alias.get(i, i), d) for i, r, d in zip(ids, where, dsts) if r is None]
            tiers = iter(self._core.prefetch_many([c for c, _ in core], [d for _, d in core],
                                                  stream) if core else [])
            with self._lock:
                new = [r for r in where if r is not None and not r.prefetched and r.nbytes]
                self._counts["prefetches"] += len(new)
                self._counts["bytes_fetched"] += sum(r.nbytes for r in new)
                for r in where:
                    if r is not None:
                        r.prefetched = True
            return [self._base + replicas.source(self, r)[0] if r is not None else next(tiers)
                    for r in where]

    def lend(self, device: int, nbytes: int) -> int:
        """The core's lend of peer memory (its tiers' capacities change)."""
        self._capacities = None
        try:
            return int(self._core.lend(device, nbytes))
        finally:
            self._capacities = None

    def reclaim(self, device: int, nbytes: int | None = None) -> int:
        """The core's reclaim of a peer; when the tiers below cannot take its handles, the
        bottom tier spills to a lender first."""
        self._capacities = None  # (again in the finally below: they change with it)
        try:
            return self._reclaim(device, nbytes)
        finally:
            self._capacities = None

    def _reclaim(self, device: int, nbytes: int | None) -> int:
        try:
            return int(self._core.reclaim(device, nbytes))
        except OutOfMemoryError as oom:
            if not spilling.spill(self, oom.requested or nbytes or 1, current_stream(self.device),
                               set()):
                raise
        return int(self._core.reclaim(device, nbytes))

    def free(self, handle: int) -> None:
        with self._using([handle]):
            with self._lock:
                r = self._remote.get(handle)
            if r is None:
                self._core.free(self._alias.get(handle, handle))
            else:
                self._release([r])
                with self._lock:
                    self._counts["frees"] += 1
            self._forget([handle])

    def synchronize(self) -> None:
        """The core's synchronize; then every block given back (not waited for) has reached
        its lender: one round trip per live lender, answered after the frees before it."""
        self._core.synchronize()
        for c in self.clients:
            if c.lost is None:
                with contextlib.suppress(OffloadError):
                    c.ping()

    def ready(self, handle: int) -> bool:
        if handle in self._remote:
            return True
        try:
            return bool(self._core.ready(self._alias.get(handle, handle)))
        except InvalidHandleError:
            if handle in self._remote:  # spilled meanwhile
                return True
            raise

    def wait(self, handle: int) -> None:
        if self.ready(handle):
            return
        try:
            self._core.wait(self._alias.get(handle, handle))
        except InvalidHandleError:
            if handle not in self._remote:
                raise

    def contains(self, handle: int) -> bool:
        return handle in self._remote or self._core.contains(self._alias.get(handle, handle))

    def info(self, handle: int) -> tuple[str, int, int, bool]:
        for _ in range(2):  # a spill may move it between the two looks
            r = self._remote.get(handle)
            if r is not None:
                return ("offloaded", self._base + replicas.source(self, r)[0], r.nbytes,
                        r.prefetched)
            try:
                return self._core.info(self._alias.get(handle, handle))
            except InvalidHandleError:
                if handle not in self._remote:
                    raise
        raise InvalidHandleError(f"handle {handle} is not live")

    def live_ids(self) -> list[int]:
        """Every live id, core and remote (the manager's orphan check compares them with its
        Handles): a core id made by a reclaim's migration is reported under its handle's id,
        and never before it is registered (``_ids_lock``)."""
        with self._ids_lock:
            core = self._core.live_ids()
            with self._lock:
                back = {c: h for h, c in self._alias.items()}
                remote = list(self._remote)
        return list(dict.fromkeys([back.get(c, c) for c in core] + remote))

    def fence_source(self, handle: int, stream: int) -> None:
        if handle not in self._remote:  # a spill's fetch already ordered after the copy
            self._core.fence_source(self._alias.get(handle, handle), stream)

    def stats(self) -> dict[str, Any]:
        """The core's stats, a ``remote`` entry per lender in ``tiers``, and ``remote``
        (tier_stats.py)."""
        return tier_stats.stats(self)

    def close(self) -> None:
        """Close the core, then every client (the lenders free what this manager held)."""
        try:
            self._core.close()
        finally:
            for c in self.clients:
                c.close()
            with self._lock:
                self._remote.clear()
                self._alias.clear()
                self._lru.clear()
                self._packs.clear()
                self._slabs.clear()
                self._cache.clear()

    # -- what the manager asks besides the Store interface ----------------------------------
    def lost(self, handle: int) -> bool:
        """Whether the handle's bytes were only on a lender that is lost."""
        r = self._remote.get(handle)
        return r is not None and self._gone(r)

    # -- ids in use ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _using(self, ids: Sequence[int], timeout: float | None = None) -> Iterator[None]:
        """Hold ``ids`` busy for one call (Note [Remote locks]); waits while others hold them."""
        wanted = set(ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while wanted & self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError("the handles stay busy")
                self._cv.wait(left)
            self._busy |= wanted
        try:
            yield
        finally:
            with self._cv:
                self._busy -= wanted
                self._cv.notify_all()

    def _forget(self, ids: Sequence[int]) -> None:
        with self._lock:
            pop = self._remote.pop
            for i in ids:
                pop(i, None)
            if self._alias:  # (empty unless a reclaim migrated handles into the core)
                for i in ids:
                    self._alias.pop(i, None)
            if self._lru:  # (empty unless the core holds handles)
                for i in ids:
                    self._lru.pop(i, None)

    def _consume(self, bases: list[int], core: bool) -> None:
        """Bases of an incremental offload that was copied in full: their bytes are dropped."""
        if not bases:
            return
        for b in bases:
            with contextlib.suppress(OffloadError):
                if core:
                    self._core.free(self._alias.get(b, b))
                else:
                    r = self._remote.get(b)
                    if r is not None:
                        self._release([r])
        self._forget(bases)

    def _gone(self, r: _Remote) -> bool:
        """Whether no live copy of the entry's bytes is left (a prefetch buffer counts)."""
        if r.prefetched:  # its fetch reads the prefetch buffer, not a lender (_read)
            return False
        client, block, _ = replicas.source(self, r)
        return block is not None and not replicas.alive(self, client)

    def _read(self, entries: list[tuple[_Remote, int]], stream: int) -> None:
        """Read each entry's bytes (from a live copy, Note [Replicas]) to its pointer, unless a
        prefetch already holds them; ``RemoteLostError`` before anything moves if a copy is
        needed and none lives. A lender found lost during the read is read around once, from
        the other copies."""
        for attempt in range(2):
            reads = []
            lost = [c.lost is not None for c in self.clients]
            for r, d in entries:
                if r.prefetched or r.block is None:
                    continue
                if r.mirror is None:  # (replicas.source, inline: a batch may be thousands)
                    client, block, offset = r.client, r.block, r.offset
                else:
                    client, block, offset = replicas.source(self, r)
                if lost[client]:
                    c = self.clients[client]
                    raise RemoteLostError(f"the lender at {c.address} is lost ({c.lost}): the "
                                          f"bytes it held are gone", address=c.address,
                                          reason=c.lost)
                reads.append((client, block, offset, r.nbytes, d))
            try:
                self._stage.read_into(reads, stream)
                return
            except RemoteLostError:
                if attempt or self.copies == 1:
                    raise

    def _release(self, entries: list[_Remote]) -> None:
        """The entries let go of their blocks (Note [Packed blocks]; an open slab gets their
        ranges back, Note [Slabs]); the blocks no handle uses any more are cached or go back
        (Note [Block cache]). The caller forgets the entries."""
        held: dict[tuple[int, int], list] = {}  # (client, block id) -> [block, handles]
        ranges: dict[int, list[tuple[int, int]]] = {}  # client -> ranges of its open slab
        with self._lock:
            slab_ids = {i: s.block.id for i, s in self._slabs.items()}
            for r in entries:
                first = (r.client, r.block, r.offset)
                for client, block, offset in (first,) if r.mirror is None else (first, r.mirror):
                    if block is None:
                        continue
                    key = (client, block.id)
                    if slab_ids.get(client) == key[1] and r.nbytes:
                        ranges.setdefault(client, []).append((offset, r.nbytes))
                    e = held.get(key)
                    if e is None:
                        held[key] = [block, 1]
                    else:
                        e[1] += 1
            slabs = self._slabs
            for client, rs in ranges.items():  # a batch's ranges, merged first: one give
                slabs[client].give_all(rs)
            empty: dict[int, list[RemoteBlock]] = {}
            for (client, _), (block, k) in held.items():
                if self._packs.drop_n(client, block, k):
                    empty.setdefault(client, []).append(block)
        for i, blocks in empty.items():
            placement.recycle(self, i, blocks)

    def _fits_peers(self, sizes: list[int]) -> bool:
        """Whether the core's peer tiers can take the batch as they are (Note [Tier order])."""
        peers = [t for t in self._core.stats()["tiers"] if t["tier"] == "peer"]
        return bool(peers) and sum(sizes) <= sum(t["free"] for t in peers) and max(
            sizes, default=0) <= max(t["largest_free"] for t in peers)

    def _to_lenders(self, items: list[tuple[int, int, float, int]], bases: list[int],
                    remote_bases: list[int], stream: int, out: list | None
                    ) -> list[tuple[int, int]]:
        """The batch to a lender in full; its incremental bases are consumed after."""
        got = self._direct(items, stream, out)
        self._consume([b for b in bases if b not in remote_bases], core=True)
        self._consume(remote_bases, core=False)
        return got

    def _direct(self, items: list[tuple[int, int, float, int]], stream: int,
                out: list | None) -> list[tuple[int, int]]:
        """Offload the batch to one lender in full (bases included: their bytes are the
        tensor's prefix); ``OutOfMemoryError`` if none holds it. The results are appended to
        ``out`` with the entries, as the core does (Note [Interrupted batches] in manager.py)."""
        sizes = [n for _, n, _, _ in items if n]
        srcs = [s for s, n, _, _ in items if n]
        for attempt in range(2):  # a lender lost under the write: placed again without it
            try:
                got = replicas.place_and_write(self, sizes, lambda client, where: (
                    self._stage.write_from(client, [(b, off, s, n) for (b, off), s, n
                                                    in zip(where, srcs, sizes)], stream)))
                break
            except RemoteLostError:
                if attempt:
                    raise
        copies = [iter(where) for _, _, where in got]
        client, tier = got[0][0], self._base + got[0][0]
        hids = list(itertools.islice(self._ids, len(items)))
        done = [(h, tier) for h in hids]
        if len(got) == 1 and len(sizes) == len(items):  # one copy, no empty tensor
            entries = [_Remote(client, b, n, p, off) for (b, off), (_, n, p, _)
                       in zip(got[0][2], items)]
        else:
            entries = []
            for _, n, p, _ in items:
                b, off = next(copies[0]) if n else (None, 0)
                m = next(copies[1]) if n and len(got) > 1 else None
                entries.append(_Remote(client, b, n, p, off, False,
                                       m and (got[1][0], m[0], m[1])))
        with self._lock:
            self._remote.update(zip(hids, entries))
            if out is not None:
                out.extend(done)
            self._stats["direct_offloads"] += len(items)
            self._counts["bytes_offloaded"] += sum(sizes)
        for client, blocks, _ in got:
            placement.settled(self, client, blocks)
        return done

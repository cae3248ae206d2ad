"""The simulated server: GPUs, their links, lent memory, and the paging traffic between them.

Note [Topology]
Every GPU has a PCIe link to host memory (two channels: ``gpuN.pcie.d2h``, ``gpuN.pcie.h2d``)
and an NVLink port to the NVSwitch (``gpuN.nvlink.out``, ``gpuN.nvlink.in``). A copy from GPU a
to GPU b crosses a's egress and b's ingress, so two consumers paging into one producer share
its ingress. Host memory and the switch are not bottlenecks (not modelled); host capacity is
unlimited. Paging never splits a request's state: it lands whole on one lender (the one with
the most free lent bytes, lowest index on ties; never the paging GPU's own loan, when a GPU
both serves and lends; only a lender in the same ``nvlink_domain``: GPUs of different domains
have no NVLink between them) or, if none has room, on the host.

Note [Streams]
Copies between one pair of endpoints (this GPU to the host, this GPU to that peer, and back)
run in FIFO order on one stream, as the library issues them (one copy stream per direction and
device pair; copies in one direction serialize anyway). Streams run concurrently and share
channels as the network decides (Note [Bandwidth sharing] in links.py). FIFO also frees a
preempted request's memory as soon as *its* copy is done, instead of all at the end.

Note [Reclaim]
A lender taking memory back first stops new placements beyond its reduced loan, then migrates
placements (oldest first) to the host over its own PCIe link until what stays fits; the bytes
are returned to the lender as each migration completes. A placement whose page-out is still in
flight migrates once it has landed; one being paged in is left alone (the page-in frees it).
Placements already migrating (an earlier reclaim) or being paged in free themselves, so they
count against the excess: two reclaims of n bytes each migrate about 2n, not more. A
page-in requested mid-migration waits for the migration, then reads from the host. No state
is ever dropped: every byte paged out is either paged in or still placed at the end.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

from .engine import EventEngine
from .links import Network, Transfer
from .scenario import GPUConfig, LinkSpec

__all__ = ["Placement", "LentPool", "Server"]


class Placement:
    """Where one paged-out request state lives (``tier`` "host" or "peer" on ``lender``)."""

    __slots__ = ("nbytes", "tier", "lender", "ready", "doomed", "reading", "waiters")

    def __init__(self, nbytes: int, tier: str, lender: int | None) -> None:
        self.nbytes = nbytes
        self.tier = tier
        self.lender = lender
        self.ready = False      # bytes have landed (page-out or migration done)
        self.doomed = False     # must migrate to host as soon as it lands (reclaim)
        self.reading = False    # a page-in is in flight
        self.waiters: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        where = f"peer gpu{self.lender}" if self.tier == "peer" else "host"
        return f"<Placement {self.nbytes} B on {where}{'' if self.ready else ' (moving)'}>"


class LentPool:
    """Memory one producer lends: ``capacity`` (current loan) and ``used`` bytes."""

    def __init__(self, gpu: int, capacity: int) -> None:
        self.gpu = gpu
        self.capacity = capacity
        self.used = 0
        self.placements: list[Placement] = []  # in order of placement (oldest first)

    @property
    def free(self) -> int:
        return self.capacity - self.used


class Server:
    """GPUs and links of one machine, and the paging operations the engines call."""

    def __init__(self, engine: EventEngine, gpus: tuple[GPUConfig, ...], links: LinkSpec) -> None:
        self.engine = engine
        self.gpus = gpus
        self._domain = {g.index: g.nvlink_domain for g in gpus}
        self.net = Network(engine)
        for g in gpus:
            self.net.add_channel(f"gpu{g.index}.pcie.d2h", links.pcie_bytes_per_s,
                                 links.pcie_latency_s)
            self.net.add_channel(f"gpu{g.index}.pcie.h2d", links.pcie_bytes_per_s,
                                 links.pcie_latency_s)
            # Latency is charged once per transfer: put it on the egress channel only.
            self.net.add_channel(f"gpu{g.index}.nvlink.out", links.nvlink_bytes_per_s,
                                 links.nvlink_latency_s)
            self.net.add_channel(f"gpu{g.index}.nvlink.in", links.nvlink_bytes_per_s, 0.0)
        self.pools = {g.index: LentPool(g.index, g.lends_bytes) for g in gpus if g.lends_bytes}
        self.paged_out_bytes = 0
        self.paged_in_bytes = 0
        self.migrated_bytes = 0
        self.fallback_bytes = 0   # asked for the peer tier, landed on host
        self.paging_s = 0.0       # sum of copy times from issue on their stream to completion
        self.transfers = 0
        self._streams: dict[tuple[str, str], deque[tuple[int, list[str], Any, str]]] = {}

    # -- paging -----------------------------------------------------------------------------------
    def page_out(self, gpu: int, nbytes: int, tier: str,
                 on_done: Callable[[], None] | None = None) -> Placement:
        """Start copying ``nbytes`` of GPU ``gpu``'s state to ``tier`` ("host" or "peer";
        "peer" falls back to host when no lender has room). Returns the placement at once;
        ``on_done`` runs when the copy completed (the source memory may be reused then)."""
        pool = self._choose_pool(nbytes, gpu) if tier == "peer" else None
        if pool is None:
            if tier == "peer":
                self.fallback_bytes += nbytes
            p = Placement(nbytes, "host", None)
            path = [f"gpu{gpu}.pcie.d2h"]
        else:
            p = Placement(nbytes, "peer", pool.gpu)
            pool.used += nbytes
            pool.placements.append(p)
            path = [f"gpu{gpu}.nvlink.out", f"gpu{pool.gpu}.nvlink.in"]
        self.paged_out_bytes += nbytes
        def landed(_t: Transfer) -> None:
            if on_done is not None:
                on_done()
            self._landed(p)
        self._send(nbytes, path, landed, "page-out")
        return p

    def page_in(self, p: Placement, gpu: int, on_done: Callable[[], None]) -> None:
        """Copy the placement back to GPU ``gpu`` (after it has landed), free it, then call
        ``on_done``."""
        if not p.ready:
            p.waiters.append(lambda: self.page_in(p, gpu, on_done))
            return
        p.reading = True
        if p.tier == "peer":
            path = [f"gpu{p.lender}.nvlink.out", f"gpu{gpu}.nvlink.in"]
        else:
            path = [f"gpu{gpu}.pcie.h2d"]

        def done(_t: Transfer) -> None:
            self._release(p)
            on_done()
        self.paged_in_bytes += p.nbytes
        self._send(p.nbytes, path, done, "page-in")

    def reclaim(self, gpu: int, nbytes: int | None) -> int:
        """Lender ``gpu`` takes back ``nbytes`` (None: its whole loan); see Note [Reclaim].
        Returns the bytes this call starts migrating to host (placements already leaving,
        migrating or being paged in, are not counted again)."""
        pool = self.pools[gpu]
        take = pool.capacity if nbytes is None else min(nbytes, pool.capacity)
        pool.capacity -= take
        leaving = sum(p.nbytes for p in pool.placements if p.reading or p.doomed)
        excess = pool.used - leaving - pool.capacity
        moving = 0
        for p in list(pool.placements):
            if moving >= excess:
                break
            if p.reading or p.doomed:
                continue
            moving += p.nbytes
            p.doomed = True
            if p.ready:
                self._migrate(p)
        return moving

    # -- internals -----------------------------------------------------------------------------
    def _choose_pool(self, nbytes: int, gpu: int) -> LentPool | None:
        best = None
        domain = self._domain[gpu]
        for pool in self.pools.values():  # GPU order: ties go to the lowest index
            if pool.gpu == gpu:  # its own loan: paging into itself would free nothing
                continue
            if self._domain[pool.gpu] != domain:  # no NVLink path between them
                continue
            if pool.free >= nbytes and (best is None or pool.free > best.free):
                best = pool
        return best

    def _send(self, nbytes: int, path: list[str], done: Callable[[Transfer], None],
              tag: str) -> None:
        """Queue a copy on the stream of its (source, destination) pair (Note [Streams])."""
        key = (path[0], path[-1])
        queue = self._streams.setdefault(key, deque())
        queue.append((nbytes, path, done, tag))
        self.transfers += 1
        if len(queue) == 1:
            self._issue(key)

    def _issue(self, key: tuple[str, str]) -> None:
        nbytes, path, done, tag = self._streams[key][0]

        def finish(t: Transfer) -> None:
            self.paging_s += t.duration_s or 0.0
            self._streams[key].popleft()
            if self._streams[key]:
                self._issue(key)
            done(t)
        self.net.transfer(nbytes, path, finish, tag)

    def _landed(self, p: Placement) -> None:
        if p.doomed:
            self._migrate(p)
            return
        p.ready = True
        waiters, p.waiters = p.waiters, []
        for w in waiters:
            w()

    def _migrate(self, p: Placement) -> None:
        p.ready = False
        self.migrated_bytes += p.nbytes

        def moved(_t: Transfer) -> None:
            self._release(p)  # the lender's bytes are free only now
            p.tier, p.lender, p.doomed = "host", None, False
            self._landed(p)
        self._send(p.nbytes, [f"gpu{p.lender}.pcie.d2h"], moved, "migrate")

    def _release(self, p: Placement) -> None:
        if p.tier == "peer" and p.lender is not None:
            pool = self.pools[p.lender]
            pool.used -= p.nbytes
            pool.placements.remove(p)

    def placed_bytes(self) -> int:
        """Bytes in lent pools now (0 at the end of a run that paged everything back in)."""
        return sum(pool.used for pool in self.pools.values())

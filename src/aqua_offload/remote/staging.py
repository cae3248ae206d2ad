"""The remote tier's staging buffer: local memory registered once with every lender's client,
through which every remote transfer of a manager passes.

Note [Staging]
    NIXL moves bytes between registered memory only, and registering costs a system call and
    pinning per region, so the buffer is registered once per client (pinned host memory on
    CUDA, plain memory on emulation). Every transfer is a round: copy into the buffer and one
    ``write`` of the whole round, or one ``read`` of the round per lender and copy out. A
    batch larger than the buffer takes several rounds; one tensor larger than it is cut into
    pieces. The lock is held for one round, a transfer under the client's deadline included.
    Copies in and out are one call into the core per round, with the GIL released (memcpy on
    emulation; on CUDA the core's copies in one batched submission on the caller's stream,
    waited for on that stream alone: NIXL must not touch the buffer before the copy ended,
    and a device-wide synchronize would also wait for every other stream's work, e.g. another
    workload's kernels; on torch's legacy default stream the wait also covers earlier work of
    the process's blocking streams, as everything on that stream does, but not torch's side
    streams or the core's, which are non-blocking).
    Within a round, items that are contiguous both in the buffer and in one block (the
    handles of a packed batch, Note [Packed blocks] in packing.py) are merged into one NIXL
    descriptor.

    A host-memory piece of at least ``DIRECT_BYTES`` skips the buffer: its own memory is
    registered for the call (~10 us with UCX on host memory, against a copy of megabytes),
    all such pieces of a call move in one transfer per lender, registered in one NIXL call
    before it and deregistered in one after (:meth:`RemoteClient.write_memory`).
    GPU memory always goes through the pinned buffer: registering device memory needs
    GPUDirect RDMA, which nothing here has tested. A registration NIXL refuses falls back to
    the buffer.
"""

from __future__ import annotations

import itertools
import operator
import threading
from typing import Any, Callable, Iterator, Sequence

import torch

from .. import _core
from .client import RemoteClient
from .items import RemoteBlock

__all__ = ["Staging", "merge", "DIRECT_BYTES"]

DIRECT_BYTES = 4 << 20  # host pieces from this size are registered in place (Note [Staging])


def merge(items: list[tuple[tuple[Any, int], RemoteBlock, int, int]]
          ) -> list[tuple[tuple[Any, int], RemoteBlock, int, int]]:
    """Transfer items ``((region, local offset), block, block offset, bytes)`` with each run
    of items contiguous on both sides (same region, same block) merged into one."""
    out: list[tuple[tuple[Any, int], RemoteBlock, int, int]] = []
    for (region, off), b, boff, n in items:
        if out:
            (pr, poff), pb, pboff, pn = out[-1]
            if (poff + pn == off and pboff + pn == boff and pr is region
                    and (pb is b or pb == b)):
                out[-1] = ((pr, poff), pb, pboff, pn + n)
                continue
        out.append(((region, off), b, boff, n))
    return out


class Staging:
    """``nbytes`` of local memory registered with each of ``clients``.

    Parameters
    ----------
    clients : list of RemoteClient
        One region is registered with each; index ``i`` of the methods names ``clients[i]``.
    device : torch.device
        The manager's device: pinned memory and the core's copies when it is a GPU.
    core : _core.Store
        The manager's core: its ``raw_copy_many`` and ``synchronize_stream`` (used on CUDA).
    nbytes : int
        Size of the buffer.
    """

    def __init__(self, clients: Sequence[RemoteClient], device: torch.device, core: Any,
                 nbytes: int) -> None:
        self.clients = list(clients)
        self.device = device
        self._cuda = device.type == "cuda"
        self._raw_copy_many = core.raw_copy_many
        self._synchronize_stream = core.synchronize_stream
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._cuda)
        self.regions = [c.register(self.buffer) for c in self.clients]
        self.lock = threading.Lock()  # one round at a time
        self._stats_lock = threading.Lock()
        self.stats = {"writes": 0, "reads": 0, "bytes_written": 0, "bytes_read": 0,
                      "direct_bytes": 0}

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def sync(self, stream: int) -> None:
        """Wait for the work on ``stream`` (the core's copies the caller ordered there), before
        NIXL reads or writes their memory: that stream only (Note [Staging])."""
        if self._cuda:
            self._synchronize_stream(stream)

    def _count(self, op: str, transfers: int, nbytes: int) -> None:
        with self._stats_lock:
            self.stats[f"{op}s"] += transfers
            self.stats["bytes_written" if op == "write" else "bytes_read"] += nbytes

    def rounds(self, pieces: list[tuple[Any, int, int, int]]
               ) -> Iterator[list[tuple[Any, int, int, int, int]]]:
        """Cut (key, local pointer, block offset, bytes) pieces into rounds of
        (key, local pointer, block offset, bytes, staging offset)."""
        cap = self.nbytes
        offs = list(itertools.accumulate([p[3] for p in pieces], initial=0))
        if offs[-1] <= cap:  # the common case, one round: no piece is cut
            if pieces:
                yield [(key, ptr, boff, n, off) for (key, ptr, boff, n), off
                       in zip(pieces, offs)]
            return
        batch: list[tuple[Any, int, int, int, int]] = []
        used = 0
        for key, ptr, boff, n in pieces:
            done = 0
            while done < n:
                if used == cap:
                    yield batch
                    batch, used = [], 0
                k = min(n - done, cap - used)
                batch.append((key, ptr + done, boff + done, k, used))
                used += k
                done += k
        if batch:
            yield batch

    def write_from(self, client: int, pieces: list[tuple[RemoteBlock, int, int, int]],
                   stream: int) -> None:
        """Write (block, block offset, local pointer, bytes) to one lender: the large host
        pieces in place, the rest one ``write`` per round."""
        if not pieces:
            return
        blocks, boffs, ptrs, sizes = zip(*pieces)
        if self._large(sizes):
            rest = self._direct("write", [(client, b, o, n, p) for b, o, p, n in pieces])
            if not rest:
                return
            _, blocks, boffs, sizes, ptrs = zip(*rest)
        c, region, base = self.clients[client], self.regions[client], self.buffer.data_ptr()
        total = sum(sizes)
        if total <= self.nbytes:  # the common case, one round: no piece is cut
            offs = list(itertools.accumulate(sizes, initial=0))[:-1]
            with self.lock:
                self._copy_all([base + o for o in offs], ptrs, sizes, stream)
                c.write(_items(region, offs, blocks, boffs, sizes))
            self._count("write", 1, total)
            return
        for rnd in self.rounds(list(zip(blocks, ptrs, boffs, sizes))):
            with self.lock:
                self._copy_all([base + off for *_, off in rnd], [x[1] for x in rnd],
                               [x[3] for x in rnd], stream)
                c.write(merge([((region, off), b, boff, n) for b, _, boff, n, off in rnd]))
            self._count("write", 1, sum(x[3] for x in rnd))

    def _copy_all(self, dsts: Sequence[int], srcs: Sequence[int], sizes: Sequence[int],
                  stream: int) -> None:
        """Copy every piece in one call with the GIL released (on CUDA the core's copies on
        ``stream``, returning once they ran there: NIXL reads or writes their memory next;
        memcpy on emulation)."""
        if self._cuda:
            self._raw_copy_many(list(dsts), list(srcs), list(sizes), stream, True)
        else:
            _core.memcpy_many(list(dsts), list(srcs), list(sizes))

    def _large(self, sizes: Sequence[int]) -> bool:
        """Whether some of these pieces move in place (Note [Staging])."""
        return not self._cuda and max(sizes) >= DIRECT_BYTES

    def _direct(self, op: str, pieces: list[tuple[int, RemoteBlock, int, int, int]]
                ) -> list[tuple[int, RemoteBlock, int, int, int]]:
        """Move the (client, block, block offset, bytes, local pointer) pieces that qualify in
        place (Note [Staging]); returns the others."""
        rest = []
        by_client: dict[int, list] = {}
        for p in pieces:
            if p[3] >= DIRECT_BYTES:
                by_client.setdefault(p[0], []).append(p)
            else:
                rest.append(p)
        for i, group in by_client.items():
            c = self.clients[i]
            pieces = [(ptr, n, b, boff) for _, b, boff, n, ptr in group]
            if not (c.write_memory(pieces) if op == "write" else c.read_memory(pieces)):
                rest.extend(group)  # NIXL refused the memory: through the buffer after all
                continue
            nbytes = sum(p[3] for p in group)
            self._count(op, 1, nbytes)
            with self._stats_lock:
                self.stats["direct_bytes"] += nbytes
        return rest

    def write_fetched(self, client: int, blocks: list[tuple[RemoteBlock, int]],
                      sizes: list[int], fetch: Callable[[list[int]], None], stream: int) -> None:
        """``fetch(pointers)`` fills the buffer (the core copies handles into it, ordered
        before later work on ``stream``), then one ``write`` sends it to (block, offset)
        ``blocks``; the sizes must fit the buffer together."""
        offs = list(itertools.accumulate(sizes, initial=0))
        base, region = self.buffer.data_ptr(), self.regions[client]
        with self.lock:
            fetch([base + x for x in offs[:-1]])
            self.sync(stream)
            self.clients[client].write(_items(region, offs[:-1], [b for b, _ in blocks],
                                              [o for _, o in blocks], sizes))
        self._count("write", 1, offs[-1])

    def read_into(self, reads: list[tuple[int, RemoteBlock, int, int, int]],
                  stream: int) -> None:
        """Read (client, block, block offset, bytes, local pointer) items: the large host
        pieces in place, the rest per round: one ``read`` per lender, then the copies out."""
        if not reads:
            return
        clients, blocks, boffs, sizes, ptrs = zip(*reads)
        if self._large(sizes):
            reads = self._direct("read", reads)
            if not reads:
                return
            clients, blocks, boffs, sizes, ptrs = zip(*reads)
        base, regions = self.buffer.data_ptr(), self.regions
        total = sum(sizes)
        if total <= self.nbytes and clients.count(clients[0]) == len(clients):
            offs = list(itertools.accumulate(sizes, initial=0))[:-1]  # one round, one lender
            with self.lock:
                self.clients[clients[0]].read(_items(regions[clients[0]], offs, blocks, boffs,
                                                     sizes))
                self._copy_all(ptrs, [base + o for o in offs], sizes, stream)
            self._count("read", 1, total)
            return
        for rnd in self.rounds([((c, b), d, o, n) for c, b, o, n, d in reads]):
            with self.lock:
                by_client: dict[int, list] = {}
                for (c, b), _, boff, n, off in rnd:
                    items = by_client.get(c)
                    if items is None:
                        items = by_client[c] = []
                    items.append(((regions[c], off), b, boff, n))
                for i, items in by_client.items():
                    self.clients[i].read(merge(items))
                self._copy_all([x[1] for x in rnd], [base + off for *_, off in rnd],
                               [x[3] for x in rnd], stream)
            self._count("read", len(by_client), sum(x[3] for x in rnd))


def _items(region: Any, offs: Sequence[int], blocks: Sequence[RemoteBlock],
           boffs: Sequence[int], sizes: Sequence[int]) -> list:
    """The transfer items of one round whose pieces lie one after another in the buffer at
    ``offs``: one item when they also lie one after another in one block (a packed batch),
    else merged where they can be."""
    b0, o0 = blocks[0], boffs[0]
    if all(map(operator.is_, blocks, itertools.repeat(b0))) and all(
            map(operator.eq, offs, map(operator.sub, boffs, itertools.repeat(o0 - offs[0])))):
        return [((region, offs[0]), b0, o0, offs[-1] + sizes[-1] - offs[0])]
    return merge([((region, o), b, bo, n) for o, b, bo, n in zip(offs, blocks, boffs, sizes)])

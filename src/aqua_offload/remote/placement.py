"""Where a batch goes on the lenders: packed blocks for large batches, the open slab for small
ones, and the blocks in transit that a reclaim must wait for.

Note [Slabs]
    A batch of at most ``SMALL_BYTES`` (one small tensor, a few layers of a short cache) does
    not ask its lender for blocks: it is placed in a free range of that lender's *open slab*,
    a block of ``SLAB_BYTES`` (at most a segment and a sixteenth of the lender's arena) the
    tier allocated once, so a small offload costs its transfer and no round trip. A handle
    that lets go gives its range back to the open slab (first fit, ranges merged). The open
    slab holds one count of its own in :class:`~.packing.Packs` (its *pin*), besides one per
    handle placed in it, so it is not given back while it is open even when no handle uses
    it. When no free range holds a batch, a new slab is opened and the old one *retired*: its
    pin is dropped, its ranges are no longer tracked, and it goes back to its lender once its
    last handle lets go (Note [Packed blocks]). So the waste is bounded by the retired slabs
    that long-lived small handles keep, and a lender that wants the memory reclaims a slab
    like any block (a reclaim retires the slab it names before anything else).

Note [Block cache]
    A block whose last handle let go (a fetch, a free) is not given back at once: up to
    ``CACHE_BYTES`` (at most a quarter of the lender's arena) of such blocks are kept per
    lender, and a later batch that packs into one block takes the smallest cached block that
    holds it and is at most twice its size, with no round trip to the lender, as a caching
    allocator reuses freed memory. Paging the same layers out and in again then costs only
    the transfers. A reclaim that names a cached block gets it back at once, and a block a
    reclaim named is never cached (a refused reclaim waits for it); blocks beyond the budget,
    and every block of a lost lender, go back (or are dropped) as before.

Note [In transit]
    Between placement and the moment its handles' entries exist (or the placement is given
    up), a block is *in transit*: a reclaim naming it waits. Several placements can be in
    transit in one slab at once, so the tier counts them per block.
"""

from __future__ import annotations

import bisect
import collections
import itertools
from typing import TYPE_CHECKING

from ..errors import OffloadError, OutOfMemoryError, RemoteLostError
from .items import RemoteBlock
from .packing import layout

if TYPE_CHECKING:
    from .tier import RemoteTier

__all__ = ["place", "settled", "discard", "free_blocks", "recycle", "uncache", "retire_slab",
           "CACHE_BYTES", "SLAB_BYTES",
           "SMALL_BYTES"]

CACHE_BYTES = 256 << 20  # per lender (Note [Block cache])
SLAB_BYTES = 16 << 20
SMALL_BYTES = SLAB_BYTES // 4  # batches up to this go to the open slab (Note [Slabs])

Placement = tuple[int, list[RemoteBlock], list[tuple[RemoteBlock, int]]]


def place(t: "RemoteTier", sizes: list[int], avoid: tuple[int, ...] = ()) -> Placement:
    """Room for ``sizes`` (all > 0) on the first lender that holds them all (skipping lost
    ones and those in ``avoid``): (lender, the blocks in transit, (block, offset) per size), counted
    for their handles (Note [Packed blocks]) and in transit until :func:`settled` or
    :func:`discard`.

    Raises
    ------
    OutOfMemoryError
        No lender can hold the batch.
    """
    why: list[str] = []
    total = sum(sizes)
    for i, c in enumerate(t.clients):
        if i in avoid or c.lost is not None:
            continue
        if not sizes:
            return i, [], []
        if total <= SMALL_BYTES:
            got = _in_slab(t, i, sizes, total)
            if got is not None:
                return got
        # packed; when the lender's free space is too fragmented for that, a block each
        blocks = None
        for limit in (int(c.lender.get("segment_bytes") or 0), 1):
            chunks, slots = layout(sizes, limit)
            if len(chunks) == 1:  # Note [Block cache]
                with t._lock:
                    cached = _from_cache(t, i, chunks[0])
                if cached is not None:
                    blocks = [cached]
                    break
            try:
                blocks = c.allocate(chunks)
                break
            except (OutOfMemoryError, RemoteLostError) as exc:
                if len(chunks) == len(sizes) or isinstance(exc, RemoteLostError):
                    why.append(f"{c.address}: {exc}")
                    break
        if blocks is None:
            continue
        where = [(blocks[k], off) for k, off in slots]
        with t._lock:
            per_block = collections.Counter(j for j, _ in slots)
            for k, b in enumerate(blocks):
                t._in_transit[i, b.id] += 1
                t._packs.add_n(i, b, per_block[k])
        return i, blocks, where
    raise OutOfMemoryError("no tier has room: the core's tiers are full and no lender "
                           f"can hold {total} bytes ({'; '.join(why) or 'none usable'})",
                           requested=total)


class Slab:
    """A lender's open slab: its block and its free ranges, sorted by offset (first fit)."""

    __slots__ = ("block", "free")

    def __init__(self, block: RemoteBlock) -> None:
        self.block = block
        self.free: list[tuple[int, int]] = [(0, block.nbytes)]  # (offset, bytes)

    def take(self, n: int) -> int | None:
        """The offset of ``n`` contiguous free bytes, now taken; None if no range holds them."""
        for k, (off, size) in enumerate(self.free):
            if size >= n:
                if size == n:
                    del self.free[k]
                else:
                    self.free[k] = (off + n, size - n)
                return off
        return None

    def give_all(self, ranges: list[tuple[int, int]]) -> None:
        """Several (offset, bytes) ranges free again; those that touch are merged first (the
        handles of one batch lie one after another)."""
        ranges.sort()
        off, n = ranges[0]
        for o, k in ranges[1:]:
            if off + n == o:
                n += k
            else:
                self.give(off, n)
                off, n = o, k
        self.give(off, n)

    def give(self, off: int, n: int) -> None:
        """``n`` bytes at ``off`` are free again (merged with the ranges beside them)."""
        k = bisect.bisect(self.free, (off, n))
        if k < len(self.free) and off + n == self.free[k][0]:
            n += self.free.pop(k)[1]
        if k and self.free[k - 1][0] + self.free[k - 1][1] == off:
            off, n = self.free[k - 1][0], self.free[k - 1][1] + n
            k -= 1
            del self.free[k]
        self.free.insert(k, (off, n))


def _in_slab(t: "RemoteTier", i: int, sizes: list[int], total: int) -> Placement | None:
    """The batch in a free range of lender ``i``'s open slab, opening a new slab when none
    holds it (Note [Slabs]); None when the lender has no room for a slab."""
    for attempt in range(2):
        with t._lock:
            slab = t._slabs.get(i)
            off = slab.take(total) if slab is not None else None
            if off is not None:
                block = slab.block  # type: ignore[union-attr]
                t._in_transit[i, block.id] += 1
                t._packs.add_n(i, block, len(sizes))
                offs = itertools.accumulate(sizes, initial=off)
                return i, [block], [(block, o) for o, _ in zip(offs, sizes)]
        if attempt:
            return None
        c = t.clients[i]
        # a slab is small next to the lender: at most a segment and a sixteenth of its arena
        size = min(SLAB_BYTES, int(c.lender.get("segment_bytes") or SLAB_BYTES),
                   int(c.lender.get("arena_bytes") or 0) // 16)
        if total > size:
            return None
        try:
            (block,) = c.allocate([size])
        except (OutOfMemoryError, RemoteLostError):
            return None
        with t._lock:
            t._packs.add(i, [block])  # the pin
            empty = _retire(t, i)
            t._slabs[i] = Slab(block)
        free_blocks(t, i, empty)
    return None


def let_go(t: "RemoteTier", client: int, block: RemoteBlock, offset: int, nbytes: int
           ) -> list[RemoteBlock]:
    """One handle's copy (``nbytes`` at ``offset``) lets go of ``block`` (under the tier's
    lock): its range is free again if the block is an open slab; returns the block if no
    handle uses it any more (the caller gives it back)."""
    slab = t._slabs.get(client)
    if slab is not None and slab.block.id == block.id and nbytes:
        slab.give(offset, nbytes)
    return t._packs.drop(client, [block])


def _retire(t: "RemoteTier", i: int) -> list[RemoteBlock]:
    """Close lender ``i``'s open slab (under the tier's lock); returns it if no handle uses it
    (the caller gives it back)."""
    slab = t._slabs.pop(i, None)
    return t._packs.drop(i, [slab.block]) if slab is not None else []


def _from_cache(t: "RemoteTier", i: int, nbytes: int) -> RemoteBlock | None:
    """The smallest cached block of lender ``i`` that holds ``nbytes`` and is at most twice
    that, taken out of the cache (under the tier's lock); None if there is none."""
    cache = t._cache.get(i)
    if not cache:
        return None
    fits = [b for b in cache if nbytes <= b.nbytes <= 2 * nbytes]
    if not fits:
        return None
    best = min(fits, key=lambda b: b.nbytes)
    cache.remove(best)
    return best


def recycle(t: "RemoteTier", client: int, blocks: list[RemoteBlock]) -> None:
    """Blocks no handle uses any more: kept for the next placements on their lender within
    the budget (Note [Block cache]), the rest given back."""
    if not blocks:
        return
    c = t.clients[client]
    out = blocks
    if c.lost is None:
        budget = min(CACHE_BYTES, int(c.lender.get("arena_bytes") or 0) // 4)
        out = []
        with t._lock:
            cache = t._cache.setdefault(client, [])
            held = sum(b.nbytes for b in cache)
            asked = t._asked.get(client, set())
            for b in blocks:
                if b.id in asked:  # a reclaim waits for it
                    asked.discard(b.id)
                    out.append(b)
                elif held + b.nbytes <= budget:
                    cache.append(b)
                    held += b.nbytes
                else:
                    out.append(b)
    free_blocks(t, client, out)


def uncache(t: "RemoteTier", client: int, ids: set[int]) -> list[RemoteBlock]:
    """A reclaim of lender ``client`` names blocks ``ids``: the cached ones among them leave
    the cache (the caller gives them back)."""
    with t._lock:
        cache = t._cache.get(client, [])
        named = [b for b in cache if b.id in ids]
        t._cache[client] = [b for b in cache if b.id not in ids]
    return named


def retire_slab(t: "RemoteTier", i: int, ids: set[int]) -> list[RemoteBlock]:
    """A reclaim of lender ``i`` names blocks ``ids``: if the open slab is among them, no batch
    goes there any more. Returns it if no handle uses it (the caller gives it back)."""
    with t._lock:
        slab = t._slabs.get(i)
        return _retire(t, i) if slab is not None and slab.block.id in ids else []


def settled(t: "RemoteTier", client: int, blocks: list[RemoteBlock]) -> None:
    """A placement's handles are entries now (or it was given up): its blocks are no longer
    in transit for it (Note [In transit])."""
    with t._cv:
        for b in blocks:
            key = (client, b.id)
            t._in_transit[key] -= 1
            if t._in_transit[key] <= 0:
                del t._in_transit[key]
        t._cv.notify_all()


def discard(t: "RemoteTier", placement: Placement, sizes: list[int]) -> None:
    """Give up a placement whose transfer failed: its handles' counts go, and the blocks no
    handle uses any more go back (an open slab stays, pinned)."""
    client, blocks, where = placement
    with t._lock:
        empty = [e for (b, off), n in zip(where, sizes) for e in let_go(t, client, b, off, n)]
    settled(t, client, blocks)
    free_blocks(t, client, empty)


def free_blocks(t: "RemoteTier", client: int, blocks: list[RemoteBlock]) -> None:
    """Give ``blocks`` back to their lender, without waiting for its answer."""
    if not blocks:
        return
    c = t.clients[client]
    if c.lost is None:
        try:
            c.free(blocks, wait=False)
            return
        except OffloadError:  # lost meanwhile (or refused): the bytes are not needed any more
            pass
    with t._lock:  # gone with the lender
        t._stats["lost_freed"] += len(blocks)

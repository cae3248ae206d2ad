"""The lender's arena: segments of lent memory and the blocks borrowers hold in them.

An arena grows and shrinks by whole segments, each registered with NIXL on its own, so that a
reclaim can deregister and free exactly the memory it takes back (one registration for the
whole arena could only be given back whole). Blocks never straddle segments. Inside a segment,
a first-fit allocator with coalescing hands out 256-byte-aligned blocks.

The arena knows nothing of NIXL or sockets: memory comes from an ``allocate`` callback and goes
back through ``release`` (the lender registers and deregisters there), so its logic is tested
with plain bytearrays.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import InvalidArgumentError, OutOfMemoryError

__all__ = ["ALIGN", "Block", "Segment", "Arena"]

ALIGN = 256


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Block:
    """A block lent to one borrower session."""

    id: int
    segment: int
    addr: int
    nbytes: int
    owner: int  # session id

    def wire(self) -> dict[str, int]:
        """The block as the protocol sends it."""
        return {"id": self.id, "addr": self.addr, "nbytes": self.nbytes,
                "segment": self.segment}


@dataclass
class Segment:
    """One registered region of the arena. ``memory`` is whatever keeps it alive (a tensor);
    ``draining`` segments take no new blocks (a reclaim is waiting for their blocks to go)."""

    id: int
    addr: int
    nbytes: int
    memory: Any
    handle: Any = None            # the NIXL registration, from the lender
    draining: bool = False
    # free extents (offset, size), sorted by offset, coalesced
    _free: list[tuple[int, int]] = field(default_factory=list)
    used: int = 0
    blocks: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._free = [(0, self.nbytes)]

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a free extent of ``nbytes`` (already aligned), or None."""
        for i, (off, size) in enumerate(self._free):
            if size >= nbytes:
                if size == nbytes:
                    del self._free[i]
                else:
                    self._free[i] = (off + nbytes, size - nbytes)
                self.used += nbytes
                return off
        return None

    def release(self, offset: int, nbytes: int) -> None:
        i = bisect.bisect_left(self._free, (offset, 0))
        self._free.insert(i, (offset, nbytes))
        # coalesce with the right, then the left neighbour
        if i + 1 < len(self._free) and offset + nbytes == self._free[i + 1][0]:
            self._free[i] = (offset, nbytes + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]
        self.used -= nbytes

    @property
    def largest_free(self) -> int:
        return max((s for _, s in self._free), default=0)


class Arena:
    """Segments of ``segment_bytes`` each and the blocks in them.

    Parameters
    ----------
    segment_bytes : int
        Size of every segment (a multiple of 256); the largest block there can be.
    allocate : callable
        ``allocate(nbytes) -> (addr, memory, handle)``: new memory, registered.
    release : callable
        ``release(segment)``: deregister and free a segment's memory.
    """

    def __init__(self, segment_bytes: int, allocate: Callable[[int], tuple[int, Any, Any]],
                 release: Callable[[Segment], None]) -> None:
        if segment_bytes <= 0 or segment_bytes % ALIGN:
            raise InvalidArgumentError(f"segment size must be a positive multiple of {ALIGN}, "
                                       f"got {segment_bytes}")
        self.segment_bytes = segment_bytes
        self._allocate = allocate
        self._release = release
        self.segments: dict[int, Segment] = {}
        self.blocks: dict[int, Block] = {}
        self._next_segment = 1
        self._next_block = 1

    # ---- size ----------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of all segments, draining ones included."""
        return sum(s.nbytes for s in self.segments.values())

    @property
    def lendable(self) -> int:
        """Bytes of the segments that take new blocks."""
        return sum(s.nbytes for s in self.segments.values() if not s.draining)

    @property
    def used(self) -> int:
        return sum(s.used for s in self.segments.values())

    def grow(self, count: int) -> list[Segment]:
        """Add ``count`` segments. A failing allocation stops there; what was added stays."""
        added = []
        for _ in range(count):
            addr, memory, handle = self._allocate(self.segment_bytes)
            seg = Segment(self._next_segment, addr, self.segment_bytes, memory, handle)
            self._next_segment += 1
            self.segments[seg.id] = seg
            added.append(seg)
        return added

    def drain(self, count: int) -> list[Segment]:
        """Mark up to ``count`` more segments draining, emptiest first (least data to move), and
        return them."""
        live = sorted((s for s in self.segments.values() if not s.draining),
                      key=lambda s: (s.used, -s.id))
        chosen = live[:max(0, count)]
        for s in chosen:
            s.draining = True
        return chosen

    def collect(self) -> list[Segment]:
        """Release every draining segment that holds no block; return them."""
        done = [s for s in self.segments.values() if s.draining and not s.blocks]
        for s in done:
            del self.segments[s.id]
            self._release(s)
        return done

    def close(self) -> None:
        """Release every segment (blocks are dropped)."""
        for s in list(self.segments.values()):
            del self.segments[s.id]
            for b in s.blocks:
                self.blocks.pop(b, None)
            self._release(s)

    # ---- blocks ------------------------------------------------------------------------
    def alloc(self, sizes: list[int], owner: int) -> list[Block]:
        """Blocks of ``sizes`` for session ``owner``: all of them or none.

        Raises
        ------
        OutOfMemoryError
            A size over the segment size, or not all fit in the segments that take blocks.
        """
        total = sum(_round_up(n) for n in sizes)
        for n in sizes:
            if _round_up(n) > self.segment_bytes:
                raise OutOfMemoryError(f"a block of {n} bytes is larger than a segment "
                                       f"({self.segment_bytes} bytes)", requested=n)
        made: list[Block] = []
        try:
            for n in sizes:
                need = _round_up(n)
                for seg in self.segments.values():
                    if seg.draining:
                        continue
                    off = seg.alloc(need)
                    if off is not None:
                        b = Block(self._next_block, seg.id, seg.addr + off, need, owner)
                        self._next_block += 1
                        seg.blocks.add(b.id)
                        self.blocks[b.id] = b
                        made.append(b)
                        break
                else:
                    free = self.lendable - sum(s.used for s in self.segments.values()
                                               if not s.draining)
                    raise OutOfMemoryError(
                        f"the lender cannot hold {len(sizes)} blocks of {total} bytes: "
                        f"{free} bytes free in {self.lendable} lendable", requested=total)
        except OutOfMemoryError:
            for b in made:
                self._drop(b)
            raise
        return made

    def free(self, ids: list[int], owner: int) -> int:
        """Free the blocks of ``ids`` that ``owner`` holds; the count freed. Ids of other
        sessions or unknown ones are skipped (the caller validates first when it must)."""
        n = 0
        for i in ids:
            b = self.blocks.get(i)
            if b is not None and b.owner == owner:
                self._drop(b)
                n += 1
        return n

    def owned(self, owner: int) -> list[Block]:
        return [b for b in self.blocks.values() if b.owner == owner]

    def _drop(self, b: Block) -> None:
        seg = self.segments[b.segment]
        seg.release(b.addr - seg.addr, b.nbytes)
        seg.blocks.discard(b.id)
        del self.blocks[b.id]

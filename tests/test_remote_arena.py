"""The lender's segment arena without NIXL: all-or-nothing allocation, coalescing, draining and
releasing whole segments, ownership."""

from __future__ import annotations

import random

import pytest

from aqua_offload.errors import InvalidArgumentError, OutOfMemoryError
from aqua_offload.remote.arena import ALIGN, Arena

SEG = 64 * ALIGN


class FakeMemory:
    """Segments as bytearrays at fake addresses; records what was released."""

    def __init__(self) -> None:
        self.next_addr = 1 << 20
        self.released: list[int] = []

    def allocate(self, nbytes: int):
        addr = self.next_addr
        self.next_addr += 2 * nbytes  # a gap: blocks of two segments never touch
        return addr, bytearray(nbytes), f"reg@{addr}"

    def release(self, seg) -> None:
        self.released.append(seg.id)


def _arena(segments: int = 2) -> tuple[Arena, FakeMemory]:
    mem = FakeMemory()
    a = Arena(SEG, mem.allocate, mem.release)
    a.grow(segments)
    return a, mem


def _inside(a: Arena, b) -> bool:
    s = a.segments[b.segment]
    return s.addr <= b.addr and b.addr + b.nbytes <= s.addr + s.nbytes


def test_blocks_are_aligned_disjoint_and_inside_their_segment() -> None:
    a, _ = _arena(3)
    rng = random.Random(7)
    blocks = a.alloc([rng.randrange(1, 20 * ALIGN) for _ in range(8)], owner=1)
    spans = sorted((b.addr, b.addr + b.nbytes) for b in blocks)
    assert all(b.addr % ALIGN == 0 and b.nbytes % ALIGN == 0 and _inside(a, b) for b in blocks)
    assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:]))
    assert a.used == sum(b.nbytes for b in blocks)


def test_allocation_is_all_or_nothing() -> None:
    a, _ = _arena(2)
    a.alloc([SEG // 2], owner=1)
    before = (a.used, dict(a.blocks))
    with pytest.raises(OutOfMemoryError) as info:
        a.alloc([SEG // 2, SEG, SEG], owner=2)  # the first two fit, the third does not
    assert info.value.requested == 2 * SEG + SEG // 2
    assert (a.used, dict(a.blocks)) == before
    with pytest.raises(OutOfMemoryError, match="larger than a segment"):
        a.alloc([SEG + 1], owner=1)


def test_free_coalesces_so_a_whole_segment_fits_again() -> None:
    a, _ = _arena(1)
    blocks = a.alloc([ALIGN] * 64, owner=1)
    with pytest.raises(OutOfMemoryError):
        a.alloc([ALIGN], owner=1)
    order = [b.id for b in blocks]
    random.Random(3).shuffle(order)
    assert a.free(order, owner=1) == 64
    (whole,) = a.alloc([SEG], owner=1)
    assert whole.nbytes == SEG and a.used == SEG


def test_free_skips_blocks_of_other_owners() -> None:
    a, _ = _arena(1)
    (b1,) = a.alloc([ALIGN], owner=1)
    (b2,) = a.alloc([ALIGN], owner=2)
    assert a.free([b1.id, b2.id, 999], owner=2) == 1
    assert set(a.blocks) == {b1.id}


def test_drain_takes_emptiest_and_releases_only_when_empty() -> None:
    a, mem = _arena(3)
    (full,) = a.alloc([SEG], owner=1)        # fills one segment
    (small,) = a.alloc([ALIGN], owner=1)      # a little in the next
    drained = a.drain(1)
    assert len(drained) == 1 and not drained[0].blocks  # the empty one first
    assert a.collect() == drained and mem.released == [drained[0].id]
    drained = a.drain(5)  # every remaining segment
    assert {s.id for s in drained} == {full.segment, small.segment}
    assert a.lendable == 0
    with pytest.raises(OutOfMemoryError):
        a.alloc([ALIGN], owner=1)  # draining segments take no new block
    assert a.collect() == []  # both still hold a block
    a.free([full.id], owner=1)
    assert [s.id for s in a.collect()] == [full.segment]
    a.free([small.id], owner=1)
    assert [s.id for s in a.collect()] == [small.segment]
    assert a.nbytes == 0 and len(mem.released) == 3


def test_close_releases_everything_and_bad_segment_sizes_are_refused() -> None:
    a, mem = _arena(2)
    a.alloc([ALIGN, ALIGN], owner=1)
    a.close()
    assert a.nbytes == 0 and not a.blocks and len(mem.released) == 2
    for bad in (0, -ALIGN, ALIGN + 1):
        with pytest.raises(InvalidArgumentError):
            Arena(bad, FakeMemory().allocate, FakeMemory().release)

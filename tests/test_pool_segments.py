"""Pool segments (lend/reclaim) and ordered-reuse fences, through _core.Pool (fake memory)."""

from __future__ import annotations

import pytest

import aqua_offload as aq  # registers the error classes
from aqua_offload import _core

A = 256


def test_segments_never_coalesce_and_capacity_adds_up():
    p = _core.Pool(0)
    assert p.capacity == 0 and p.allocate(A) is None
    a = p.add_segment(4 * A)
    b = p.add_segment(4 * A)
    assert p.capacity == 8 * A
    assert [s for s, _ in p.segments()] == [a, b] and b > a + 4 * A  # a gap between them
    assert p.allocate(5 * A) is None  # 8 blocks free, but no 5 contiguous ones
    x = p.allocate(4 * A)
    y = p.allocate(4 * A)
    assert {x, y} == {a, b}
    st = p.stats()
    assert st["segments"] == 2 and st["used"] == 8 * A and st["free"] == 0


def test_drained_segment_takes_no_new_block_and_is_removed_when_empty():
    p = _core.Pool(0)
    a = p.add_segment(8 * A)
    b = p.add_segment(8 * A)
    live = p.allocate(2 * A)
    assert live == a
    p.drain_segment(a)
    placed = [p.allocate(A) for _ in range(8)]
    assert all(b <= o < b + 8 * A for o in placed)  # only the other segment serves
    assert p.allocate(A) is None
    assert p.blocks_in(a) == [(a, 2 * A)]
    with pytest.raises(aq.InvalidArgumentError, match="in use"):
        p.remove_segment(a)
    p.release(live)
    assert p.blocks_in(a) == []
    assert p.remove_segment(a) == 8 * A
    assert p.capacity == 8 * A and [s for s, _ in p.segments()] == [b]
    st = p.stats()
    assert st["used"] + st["free"] == st["capacity"]


def test_undrain_restores_service():
    p = _core.Pool(4 * A)
    (base, _), = p.segments()
    p.drain_segment(base)
    assert p.allocate(A) is None
    p.undrain_segment(base)
    assert p.allocate(4 * A) == base


def test_remove_requires_drain_and_unknown_segments_are_errors():
    p = _core.Pool(4 * A)
    (base, _), = p.segments()
    with pytest.raises(aq.InvalidArgumentError, match="not draining"):
        p.remove_segment(base)
    for op in (p.drain_segment, p.blocks_in):
        with pytest.raises(aq.InvalidArgumentError, match="no segment"):
            op(base + 12345 * A)
    with pytest.raises(aq.InvalidArgumentError):
        p.add_segment(100)  # less than one block


def test_fences_are_inherited_by_whoever_gets_the_bytes():
    p = _core.Pool(16 * A)
    a = p.allocate(4 * A)
    b = p.allocate(4 * A)
    p.release(a, fence=7)
    p.release(b, fence=9)
    # The freed bytes are free at once (no host wait)...
    assert p.used == 0 and p.stats()["fenced"] == 8 * A
    # ...and a block over both ranges must wait for both copies.
    off, fences = p.allocate_fenced(6 * A)
    assert off == a and sorted(fences) == [7, 9]
    off2, fences2 = p.allocate_fenced(2 * A)  # the rest of b's range, and beyond
    assert off2 == 6 * A and fences2 == [9]
    off3, fences3 = p.allocate_fenced(8 * A)  # never fenced
    assert fences3 == []
    p.clear_fence(9)
    p.release(off2)
    _, again = p.allocate_fenced(2 * A)
    assert again == []  # fence 9 cleared: nothing to wait for
    assert p.fenced((p.segments()[0][0]))  # fence 7 still over a's range


def test_fenced_segment_cannot_be_removed_until_cleared():
    p = _core.Pool(0)
    s = p.add_segment(4 * A)
    blk = p.allocate(4 * A)
    p.release(blk, fence=3)
    p.drain_segment(s)
    with pytest.raises(aq.InvalidArgumentError, match="in use"):
        p.remove_segment(s)
    p.clear_fence(3)
    assert p.remove_segment(s) == 4 * A

"""Unit tests of the best-fit suballocator (aqua_offload._core.Pool, fake memory: offsets only).

Note [Pool reference model]
The property test at the bottom drives the C++ pool and a small Python model of the documented
policy (cpp/include/aqua/pool.hpp, Note [Pool invariants]) side by side: sizes rounded up to 256 B
and no further, the smallest free range that fits, the lowest offset among equal sizes, and
coalescing with both neighbours on release. Offsets must match exactly, not just "some offset".
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aqua_offload as aq  # registers the error classes with _core before anything raises
from aqua_offload import _core

A = 256  # block alignment


def align(n: int) -> int:
    return (n + A - 1) // A * A


KEYS = ("capacity", "used", "peak", "free", "largest_free", "blocks", "free_ranges",
        "fragmentation")


def core_stats(p: _core.Pool) -> dict:
    """The documented statistics (the dict may carry more keys)."""
    s = p.stats()
    return {k: s[k] for k in KEYS}


def check_consistent(p: _core.Pool) -> dict:
    s = p.stats()
    assert s["capacity"] == p.capacity
    assert s["used"] == p.used
    assert s["used"] + s["free"] == s["capacity"]
    assert s["peak"] >= s["used"]
    assert s["largest_free"] <= s["free"]
    if s["free"] == 0:
        assert s["free_ranges"] == 0
        assert s["largest_free"] == 0
        assert s["fragmentation"] == 0.0
    else:
        assert s["free_ranges"] >= 1
        assert s["fragmentation"] == pytest.approx(1.0 - s["largest_free"] / s["free"])
    return s


# -- basics -------------------------------------------------------------------------------

def test_block_alignment_constant():
    assert _core.block_alignment == A


def test_fresh_pool_is_one_free_range():
    p = _core.Pool(1 << 20)
    check_consistent(p)
    assert core_stats(p) == {"capacity": 1 << 20, "used": 0, "peak": 0, "free": 1 << 20,
                 "largest_free": 1 << 20, "blocks": 0, "free_ranges": 1, "fragmentation": 0.0}


def test_capacity_rounds_down_to_alignment():
    p = _core.Pool(10 * A + 100)
    assert p.capacity == 10 * A
    assert p.allocate(10 * A) == 0
    assert p.allocate(1) is None


@pytest.mark.parametrize("n", [1, 2, 255, 256, 257, 511, 512, 513, 3 * A + 1, 1000, 4096, 4097])
def test_offsets_and_sizes_are_aligned(n):
    p = _core.Pool(128 * A)
    offsets = []
    for _ in range(4):
        off = p.allocate(n)
        assert off is not None
        assert off % A == 0
        assert p.block_size(off) == align(n)
        assert p.block_size(off) % A == 0
        offsets.append(off)
    # consecutive allocations from one range are packed: no hidden padding between them
    assert offsets == [i * align(n) for i in range(4)]
    assert p.used == 4 * align(n)
    check_consistent(p)


def test_no_power_of_two_rounding():
    p = _core.Pool(1 << 20)
    off = p.allocate(3 * A + 1)
    assert off == 0
    assert p.block_size(off) == 4 * A  # not 8 * A (next power of two of 1025 is 2048)
    assert p.used == 4 * A
    s = check_consistent(p)
    assert s["free"] == (1 << 20) - 4 * A
    # a second block starts right after the first one's 4 * 256 bytes
    assert p.allocate(5 * A + 7) == 4 * A
    assert p.used == 4 * A + 6 * A


def test_large_odd_request_costs_one_extra_block_at_most():
    cap = 3 * (1 << 20) + 8 * A
    p = _core.Pool(cap)
    off = p.allocate(3 * (1 << 20) + 1)
    assert off == 0
    assert p.block_size(0) == 3 * (1 << 20) + A
    assert p.stats()["free"] == 7 * A


def test_exact_fit_of_whole_capacity():
    p = _core.Pool(16 * A)
    assert p.allocate(16 * A) == 0
    s = check_consistent(p)
    assert s["free"] == 0 and s["free_ranges"] == 0 and s["largest_free"] == 0
    assert s["fragmentation"] == 0.0
    assert p.allocate(1) is None
    p.release(0)
    assert check_consistent(p)["free_ranges"] == 1


def test_request_larger_than_capacity_returns_none_and_changes_nothing():
    p = _core.Pool(16 * A)
    p.allocate(A)
    before = p.stats()
    assert p.allocate(16 * A + 1) is None
    assert p.allocate(1 << 62) is None
    assert p.allocate(15 * A + 1) is None  # fits capacity, but not the free space left
    assert p.stats() == before


def test_zero_capacity_pool():
    p = _core.Pool(0)
    assert p.capacity == 0
    assert p.allocate(1) is None
    s = check_consistent(p)
    assert s["free_ranges"] == 0 and s["fragmentation"] == 0.0


def test_allocate_zero_raises_invalid_argument():
    p = _core.Pool(16 * A)
    p.allocate(A)
    before = p.stats()
    with pytest.raises(aq.InvalidArgumentError):
        p.allocate(0)
    assert p.stats() == before


@pytest.mark.parametrize("bad", [1, 128, 255, 512, 4096, 1 << 40])
def test_release_unknown_offset_raises_and_changes_nothing(bad):
    p = _core.Pool(64 * A)
    a = p.allocate(A)
    b = p.allocate(2 * A)  # at 256: 512 is inside b, not its start
    assert (a, b) == (0, A)
    before = p.stats()
    with pytest.raises(aq.InvalidArgumentError):
        p.release(bad)
    assert p.stats() == before
    assert p.block_size(a) == A and p.block_size(b) == 2 * A


def test_double_release_raises_and_changes_nothing():
    p = _core.Pool(64 * A)
    a = p.allocate(A)
    p.allocate(A)
    p.release(a)
    before = p.stats()
    with pytest.raises(aq.InvalidArgumentError) as info:
        p.release(a)
    assert isinstance(info.value, aq.OffloadError) and isinstance(info.value, ValueError)
    assert p.stats() == before


def test_block_size_of_unknown_offset_is_zero():
    p = _core.Pool(64 * A)
    off = p.allocate(3 * A)
    assert p.block_size(off) == 3 * A
    assert p.block_size(A) == 0  # inside the block, not its start
    assert p.block_size(40 * A) == 0  # free space
    p.release(off)
    assert p.block_size(off) == 0


# -- best fit -----------------------------------------------------------------------------

def _holes(p: _core.Pool, sizes_in_blocks: list[int]) -> list[int]:
    """Carve the pool into free holes of the given sizes (in blocks), each separated by a
    one-block live separator; the space after the last separator stays live too. Returns the
    hole offsets."""
    holes, layout = [], []
    for n in sizes_in_blocks:
        layout.append(("hole", p.allocate(n * A)))
        layout.append(("sep", p.allocate(A)))
    rest = p.stats()["largest_free"]
    if rest:
        p.allocate(rest)
    for kind, off in layout:
        assert off is not None
        if kind == "hole":
            p.release(off)
            holes.append(off)
    return holes


def test_best_fit_picks_smallest_fitting_range_not_first():
    p = _core.Pool(64 * A)
    holes = _holes(p, [8, 3, 5])  # first-fit would use the 8-block hole
    s = check_consistent(p)
    assert s["free_ranges"] == 3 and s["largest_free"] == 8 * A
    assert p.allocate(3 * A) == holes[1]  # exact fit
    assert p.allocate(4 * A) == holes[2]  # 5 is the smallest that holds 4
    assert p.allocate(A) == holes[2] + 4 * A  # leftover of the 5-block hole (1 block)
    assert p.allocate(2 * A) == holes[0]  # only the 8-block hole remains
    check_consistent(p)


def test_best_fit_prefers_lowest_offset_among_equal_ranges():
    p = _core.Pool(64 * A)
    holes = _holes(p, [4, 2, 4, 2])
    assert p.allocate(2 * A) == holes[1]
    assert p.allocate(2 * A) == holes[3]
    assert p.allocate(3 * A) == holes[0]
    assert p.allocate(3 * A) == holes[2]


def test_best_fit_splits_from_the_low_end_of_a_range():
    p = _core.Pool(64 * A)
    holes = _holes(p, [6])
    off = p.allocate(2 * A + 1)
    assert off == holes[0]
    s = p.stats()
    assert s["largest_free"] == 3 * A and s["free_ranges"] == 1


def test_allocation_fails_when_only_fragmented_space_is_free():
    p = _core.Pool(64 * A)
    _holes(p, [2, 2, 2, 2])
    s = check_consistent(p)
    assert s["free"] == 8 * A and s["largest_free"] == 2 * A
    before = p.stats()
    assert p.allocate(2 * A + 1) is None  # 8 blocks free, but no 3-block range
    assert p.stats() == before


# -- coalescing ---------------------------------------------------------------------------

def test_coalesce_with_both_neighbours():
    p = _core.Pool(4 * A)
    a, b, c, d = (p.allocate(A) for _ in range(4))
    assert (a, b, c, d) == (0, A, 2 * A, 3 * A)
    p.release(a)
    p.release(c)
    s = check_consistent(p)
    assert s["free_ranges"] == 2 and s["largest_free"] == A
    assert s["fragmentation"] == pytest.approx(0.5)
    p.release(b)  # joins a and c at once
    s = check_consistent(p)
    assert s["free_ranges"] == 1
    assert s["largest_free"] == 3 * A
    assert s["fragmentation"] == 0.0
    assert p.allocate(3 * A) == 0  # proof it is one range


def test_coalesce_with_previous_only_and_next_only():
    p = _core.Pool(8 * A)
    blocks = [p.allocate(A) for _ in range(8)]
    p.release(blocks[1])
    p.release(blocks[2])  # merges with the previous
    assert p.stats()["free_ranges"] == 1 and p.stats()["largest_free"] == 2 * A
    p.release(blocks[6])
    p.release(blocks[5])  # merges with the next
    s = p.stats()
    assert s["free_ranges"] == 2 and s["largest_free"] == 2 * A
    p.release(blocks[7])  # merges with previous, at the end of the pool
    s = p.stats()
    assert s["free_ranges"] == 2 and s["largest_free"] == 3 * A
    p.release(blocks[0])  # merges with next, at the start of the pool
    s = p.stats()
    assert s["free_ranges"] == 2 and s["largest_free"] == 3 * A and s["free"] == 6 * A
    p.release(blocks[3])
    p.release(blocks[4])
    check_consistent(p)
    assert core_stats(p) == {"capacity": 8 * A, "used": 0, "peak": 8 * A, "free": 8 * A,
                 "largest_free": 8 * A, "blocks": 0, "free_ranges": 1, "fragmentation": 0.0}


def test_release_everything_in_any_order_restores_one_range():
    p = _core.Pool(40 * A)
    sizes = [1, 3, 2, 7, 1, 5, 4, 2]
    offs = [p.allocate(n * A - 17) for n in sizes]
    for i in [5, 0, 7, 2, 4, 1, 6, 3]:
        p.release(offs[i])
        check_consistent(p)
    s = p.stats()
    assert s["free_ranges"] == 1 and s["largest_free"] == 40 * A and s["blocks"] == 0


# -- accounting ---------------------------------------------------------------------------

def test_used_plus_free_and_peak_tracking():
    p = _core.Pool(32 * A)
    a = p.allocate(10 * A)
    b = p.allocate(5 * A - 3)
    assert p.used == 15 * A
    assert p.stats()["peak"] == 15 * A
    assert p.stats()["blocks"] == 2
    p.release(a)
    s = check_consistent(p)
    assert s["used"] == 5 * A and s["peak"] == 15 * A and s["blocks"] == 1
    c = p.allocate(2 * A)
    assert p.stats()["peak"] == 15 * A  # 7 blocks now, below the old peak
    d = p.allocate(12 * A)
    s = check_consistent(p)
    assert s["used"] == 19 * A and s["peak"] == 19 * A
    for off in (b, c, d):
        p.release(off)
    s = check_consistent(p)
    assert s["used"] == 0 and s["peak"] == 19 * A and s["free"] == 32 * A


def test_fragmentation_value():
    p = _core.Pool(16 * A)
    offs = [p.allocate(A) for _ in range(16)]
    assert p.stats()["fragmentation"] == 0.0  # nothing free
    p.release(offs[0])
    assert p.stats()["fragmentation"] == 0.0  # one range
    p.release(offs[2])
    p.release(offs[3])
    p.release(offs[4])
    s = p.stats()  # free: 1 block + 3 blocks
    assert s["free"] == 4 * A and s["largest_free"] == 3 * A and s["free_ranges"] == 2
    assert s["fragmentation"] == pytest.approx(1 - 3 / 4)
    p.release(offs[10])
    s = p.stats()  # 1 + 3 + 1
    assert s["fragmentation"] == pytest.approx(1 - 3 / 5)
    p.release(offs[1])  # joins 0..4 into 5 blocks
    s = p.stats()
    assert s["free_ranges"] == 2 and s["fragmentation"] == pytest.approx(1 - 5 / 6)


# -- property test against a reference model ----------------------------------------------

class RefPool:
    """The documented policy in a few lines of Python (Note [Pool reference model])."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity // A * A
        self.free = {0: self.capacity} if self.capacity else {}  # offset -> size
        self.live: dict[int, int] = {}
        self.peak = 0

    @property
    def used(self) -> int:
        return sum(self.live.values())

    def allocate(self, n: int):
        if n > self.capacity:
            return None
        size = align(n)
        fits = [(sz, off) for off, sz in self.free.items() if sz >= size]
        if not fits:
            return None
        sz, off = min(fits)
        del self.free[off]
        if sz > size:
            self.free[off + size] = sz - size
        self.live[off] = size
        self.peak = max(self.peak, self.used)
        return off

    def release(self, off: int) -> None:
        size = self.live.pop(off)
        start = off
        nxt = start + size
        if nxt in self.free:
            size += self.free.pop(nxt)
        for o, s in list(self.free.items()):
            if o + s == start:
                del self.free[o]
                start, size = o, size + s
                break
        self.free[start] = size

    def stats(self) -> dict:
        free = self.capacity - self.used
        largest = max(self.free.values(), default=0)
        return {"capacity": self.capacity, "used": self.used, "peak": self.peak, "free": free,
                "largest_free": largest, "blocks": len(self.live),
                "free_ranges": len(self.free),
                "fragmentation": 0.0 if free == 0 else 1.0 - largest / free}


ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(min_value=1, max_value=6 * A)),
        st.tuples(st.just("alloc"), st.integers(min_value=1, max_value=40 * A)),
        st.tuples(st.just("release"), st.integers(min_value=0, max_value=1 << 30)),
        st.tuples(st.just("bogus_release"), st.integers(min_value=0, max_value=64 * A)),
    ),
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(min_value=0, max_value=64 * A + 255), ops=ops)
def test_pool_matches_reference_model(capacity, ops):
    p = _core.Pool(capacity)
    ref = RefPool(capacity)
    assert p.capacity == ref.capacity
    for op, arg in ops:
        if op == "alloc":
            got = p.allocate(arg)
            want = ref.allocate(arg)
            assert got == want, (op, arg)
            if got is not None:
                assert got % A == 0
                assert p.block_size(got) == align(arg)
        elif op == "release":
            if not ref.live:
                continue
            offs = sorted(ref.live)
            off = offs[arg % len(offs)]
            p.release(off)
            ref.release(off)
            assert p.block_size(off) == 0
        else:  # an offset that is not the start of a live block must be refused
            if arg in ref.live:
                continue
            before = p.stats()
            with pytest.raises(aq.InvalidArgumentError):
                p.release(arg)
            assert p.stats() == before

        # live blocks: inside the pool, pairwise disjoint, sized as the model says
        live = sorted(ref.live.items())
        for (o1, s1), (o2, _) in zip(live, live[1:]):
            assert o1 + s1 <= o2
        for o, s in live:
            assert 0 <= o and o + s <= p.capacity
            assert p.block_size(o) == s
        # free ranges and live blocks tile the pool exactly
        pieces = sorted(list(ref.live.items()) + list(ref.free.items()))
        pos = 0
        for o, s in pieces:
            assert o == pos
            pos += s
        assert pos == p.capacity

        s = check_consistent(p)
        want = ref.stats()
        assert {k: s[k] for k in KEYS if k != "fragmentation"} == \
               {k: want[k] for k in KEYS if k != "fragmentation"}
        assert s["fragmentation"] == pytest.approx(want["fragmentation"])

"""The remote tier's block cache (Note [Block cache] in remote/placement.py): a block whose last
handle let go is kept for the next batch on its lender (no allocation round trip), within a
budget; a batch takes a cached block only if it is at most twice its size; a reclaim gets a
cached block back at once, and a block a refused reclaim waits for is given back, never
cached, when its last handle lets go. Every round trip is bitwise."""

from __future__ import annotations

import pytest
import torch
from remote_helpers import TOKEN, needs_nixl

from aqua_offload.remote import Lender, placement
from conftest import random_tensor

pytestmark = needs_nixl
KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def lender():
    with Lender(TOKEN, host_bytes="128MiB", segment_bytes="32MiB") as lender:  # caches 32 MiB
        yield lender


def _rand(n: int, seed: int) -> torch.Tensor:
    return random_tensor((n,), torch.uint8, generator=torch.Generator().manual_seed(seed))


def _lender_stats(m) -> dict:
    return m.stats()["remote"]["lenders"][0]


def test_paging_the_same_tensor_again_reuses_its_block(lender, lender_managers) -> None:
    m = lender_managers(lender)
    t = _rand(6 * MiB + 5, 1)  # above the slabs' 4 MiB: a block of its own
    ref = t.clone()
    for _ in range(4):
        h = m.offload(t)
        assert h.tier == "remote"
        assert m.fetch(h) is t and torch.equal(t, ref)
    assert _lender_stats(m)["allocs"] == 1 and _lender_stats(m)["frees"] == 0
    assert m.stats()["remote"]["cached_bytes"] == 6 * MiB + 5
    m.synchronize()
    assert lender.stats()["blocks"] == 1


def test_a_cached_block_serves_only_batches_of_at_least_half_its_size(lender,
                                                                     lender_managers) -> None:
    m = lender_managers(lender)
    big = _rand(12 * MiB, 2)
    m.fetch(m.offload(big))
    small = _rand(5 * MiB, 3)  # less than half: a block of its own
    ref = small.clone()
    h = m.offload(small)
    assert _lender_stats(m)["allocs"] == 2
    assert m.fetch(h) is small and torch.equal(small, ref)
    medium = _rand(7 * MiB, 4)  # the 12 MiB block holds it and is under twice its size
    ref = medium.clone()
    h = m.offload(medium)
    assert _lender_stats(m)["allocs"] == 2
    assert m.stats()["remote"]["cached_bytes"] == 5 * MiB  # the other one waits
    assert m.fetch(h) is medium and torch.equal(medium, ref)


def test_the_cache_keeps_to_its_budget(lender, lender_managers, monkeypatch) -> None:
    monkeypatch.setattr(placement, "CACHE_BYTES", 8 * MiB)
    m = lender_managers(lender)
    ts = [_rand(6 * MiB, 5 + i) for i in range(2)]
    refs = [t.clone() for t in ts]
    hs = m.offload_many(ts[:1]) + m.offload_many(ts[1:])  # two blocks
    for h, t, r in zip(hs, ts, refs):
        assert m.fetch(h) is t and torch.equal(t, r)
    assert m.stats()["remote"]["cached_bytes"] == 6 * MiB, "one fits the budget"
    assert _lender_stats(m)["frees"] == 1
    m.synchronize()
    assert lender.stats()["blocks"] == 1


def test_a_reclaim_gets_a_cached_block_back_at_once(lender, lender_managers) -> None:
    m = lender_managers(lender)
    t = _rand(20 * MiB, 7)
    ref = t.clone()
    assert m.fetch(m.offload(t)) is t and torch.equal(t, ref)
    assert m.stats()["remote"]["cached_bytes"] == 20 * MiB
    assert lender.reclaim(128 * MiB).wait(30)
    assert lender.stats()["blocks"] == 0 and lender.stats()["arena_bytes"] == 0
    assert m.stats()["remote"]["cached_bytes"] == 0
    assert m.stats()["remote"]["reclaim_refusals"] == 0


def test_a_block_a_refused_reclaim_waits_for_is_never_cached(lender_managers) -> None:
    with Lender(TOKEN, host_bytes="32MiB", segment_bytes="32MiB") as lender:
        m = lender_managers(lender, host="1MiB")  # too small to take the 6 MiB tensor back
        t = _rand(6 * MiB, 8)
        ref = t.clone()
        h = m.offload(t)
        ticket = lender.reclaim(32 * MiB)
        assert not ticket.wait(1.0), "no room anywhere: refused, the lender waits"
        assert m.fetch(h) is t and torch.equal(t, ref)
        assert ticket.wait(30), "its block went back with its last handle"
        assert m.stats()["remote"]["cached_bytes"] == 0

"""Small batches on the remote tier share a lender's open slab (Note [Slabs] in
remote/placement.py): no allocation round trip per small offload, a full slab is retired and
goes back with its last handle, an open slab stays (pinned) while empty, a reclaim naming the
open slab moves its handles and takes it back, and a failed transfer into the slab leaves the
other handles in it intact. Every round trip is bitwise."""

from __future__ import annotations

import pytest
import torch
from remote_helpers import TOKEN, needs_nixl

import aqua_offload as aq
from aqua_offload.errors import BackendError
from aqua_offload.remote import Lender, placement
from aqua_offload.remote.staging import Staging
from conftest import random_tensor, wait_until

pytestmark = needs_nixl
KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def small_slabs(monkeypatch):
    """64 KiB slabs; batches up to 16 KiB go to them."""
    monkeypatch.setattr(placement, "SLAB_BYTES", 64 * KiB)
    monkeypatch.setattr(placement, "SMALL_BYTES", 16 * KiB)


def _tensors(n: int, seed: int, size: int = 10 * KiB) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [random_tensor((size + 7 * (i % 3),), torch.uint8, generator=g) for i in range(n)]


def _allocs(m: aq.OffloadManager, lender: int = 0) -> int:
    return m.stats()["remote"]["lenders"][lender]["allocs"]


def test_small_offloads_share_one_slab_and_ask_the_lender_once(remote_lender,
                                                                lender_managers) -> None:
    m = lender_managers(remote_lender)
    ts = _tensors(40, 1, size=5 * KiB)  # ~200 KiB: one 4 MiB slab
    refs = [t.clone() for t in ts]
    hs = [m.offload(t) for t in ts]
    assert all(h.tier == "remote" for h in hs)
    assert _allocs(m) == 1 and remote_lender.stats()["blocks"] == 1
    for k in range(0, 40, 3):  # fetched out of order
        assert m.fetch(hs[k]) is ts[k] and torch.equal(ts[k], refs[k])
    for k in range(40):
        if k % 3:
            assert torch.equal(m.fetch(hs[k]), refs[k])
    m.synchronize()  # the blocks given back have reached the lender
    assert remote_lender.stats()["blocks"] == 1, "the open slab stays while it is open"
    assert m.stats()["remote"]["lenders"][0]["frees"] == 0


def test_a_full_slab_is_retired_and_goes_back_with_its_last_handle(remote_lender, lender_managers,
                                                                   small_slabs,
                                                                   no_block_cache) -> None:
    m = lender_managers(remote_lender)
    ts = _tensors(9, 2)  # 10 KiB each: six fill a 64 KiB slab, the 7th opens a new one
    refs = [t.clone() for t in ts]
    hs = [m.offload(t) for t in ts]
    assert _allocs(m) == 2 and remote_lender.stats()["blocks"] == 2
    for k in range(5):
        assert torch.equal(m.fetch(hs[k]), refs[k])
    m.synchronize()  # the blocks given back have reached the lender
    assert remote_lender.stats()["blocks"] == 2, "one handle still uses the retired slab"
    assert torch.equal(m.fetch(hs[5]), refs[5])
    m.synchronize()  # the blocks given back have reached the lender
    assert remote_lender.stats()["blocks"] == 1, "the retired slab went back"
    for k in range(6, 9):
        assert torch.equal(m.fetch(hs[k]), refs[k])
    m.synchronize()  # the blocks given back have reached the lender
    assert remote_lender.stats()["blocks"] == 1
    m.close()
    wait_until(lambda: remote_lender.stats()["blocks"] == 0)  # close gives the open slab back


def test_a_batch_over_the_small_size_gets_blocks_of_its_own(remote_lender, lender_managers,
                                                            small_slabs, no_block_cache) -> None:
    m = lender_managers(remote_lender)
    small = m.offload(_tensors(1, 3)[0])
    big = _tensors(3, 4)  # 30 KiB > 16 KiB together
    refs = [t.clone() for t in big]
    hs = m.offload_many(big)
    assert _allocs(m) == 2 and remote_lender.stats()["blocks"] == 2
    assert all(torch.equal(m.fetch(h), r) for h, r in zip(hs, refs))
    m.synchronize()  # the blocks given back have reached the lender
    assert remote_lender.stats()["blocks"] == 1, "the batch's block went back, the slab stays"
    m.fetch(small)


def test_a_reclaim_of_the_open_slab_moves_its_handles(lender_managers) -> None:
    with Lender(TOKEN, host_bytes="4MiB", segment_bytes="4MiB") as a, \
            Lender(TOKEN, host_bytes="8MiB", segment_bytes="4MiB") as b:
        m = lender_managers(a, b)
        ts = _tensors(12, 5)
        refs = [t.clone() for t in ts]
        hs = [m.offload(t) for t in ts]
        assert all(h.location == a.address for h in hs) and a.stats()["blocks"] == 1
        assert a.reclaim(4 * MiB).wait(30)
        assert a.stats()["blocks"] == 0 and a.stats()["arena_bytes"] == 0
        assert all(h.tier == "remote" and h.location == b.address for h in hs)
        more = _tensors(3, 6)
        more_refs = [t.clone() for t in more]
        hm = [m.offload(t) for t in more]  # a has nothing left: b's slab
        assert all(h.location == b.address for h in hm)
        for h, t, r in zip(hs + hm, ts + more, refs + more_refs):
            assert m.fetch(h) is t and torch.equal(t, r)


def test_an_empty_open_slab_goes_back_at_once_on_reclaim(lender_managers) -> None:
    with Lender(TOKEN, host_bytes="4MiB", segment_bytes="4MiB") as a:
        m = lender_managers(a)
        t = _tensors(1, 7)[0]
        ref = t.clone()
        m.fetch(m.offload(t))
        assert torch.equal(t, ref)
        assert a.stats()["blocks"] == 1, "the open slab, empty"
        assert a.reclaim(4 * MiB).wait(30)
        assert a.stats()["blocks"] == 0
        assert m.stats()["remote"]["reclaim_refusals"] == 0


def test_a_failed_transfer_into_the_slab_leaves_its_other_handles(remote_lender, lender_managers,
                                                                  monkeypatch) -> None:
    m = lender_managers(remote_lender)
    first, second, third = _tensors(3, 8)
    refs = [x.clone() for x in (first, second, third)]
    h1 = m.offload(first)
    real = Staging.write_from

    def broken(self, *args, **kw):
        raise BackendError("injected transfer failure", error_name="injected")

    monkeypatch.setattr(Staging, "write_from", broken)
    with pytest.raises(BackendError):
        m.offload(second)
    assert not aq.is_offloaded(second) and torch.equal(second, refs[1]), "nothing changed"
    monkeypatch.setattr(Staging, "write_from", real)
    h3 = m.offload(third)
    m.synchronize()  # the blocks given back have reached the lender
    assert remote_lender.stats()["blocks"] == 1 and _allocs(m) == 1
    assert torch.equal(m.fetch(h1), refs[0]) and torch.equal(m.fetch(h3), refs[2])
    h2 = m.offload(second)
    assert torch.equal(m.fetch(h2), refs[1])


def test_slab_ranges_are_first_fit_and_merge() -> None:
    from aqua_offload.remote.items import RemoteBlock

    s = placement.Slab(RemoteBlock(1, 100, 0, 1))
    assert [s.take(n) for n in (10, 20, 30)] == [0, 10, 30]
    s.give(10, 20)
    assert s.take(25) == 60, "the 20-byte hole is too small: after the last range"
    assert s.take(15) == 10, "first fit: the hole"
    s.give(0, 10)
    s.give(10, 15)  # merges with the ranges before and after it
    assert s.free == [(0, 30), (85, 15)]
    s.give(30, 30)
    assert s.free == [(0, 60), (85, 15)]
    assert s.take(61) is None and s.take(60) == 0
    s.give_all([(40, 20), (0, 10), (10, 30)])  # a batch's ranges in any order: merged
    assert s.free == [(0, 60), (85, 15)]


def test_the_range_a_handle_gives_back_is_used_again(remote_lender, lender_managers,
                                                     small_slabs) -> None:
    m = lender_managers(remote_lender)
    ts = _tensors(6, 9)  # ~60 KiB: one 64 KiB slab, nearly full
    refs = [t.clone() for t in ts]
    hs = [m.offload(t) for t in ts]
    assert torch.equal(m.fetch(hs[2]), refs[2])
    h = m.offload(ts[2])  # into the hole it left
    assert _allocs(m) == 1 and remote_lender.stats()["blocks"] == 1
    for x, t, r in zip(hs[:2] + [h] + hs[3:], ts, refs):
        assert m.fetch(x) is t and torch.equal(t, r)

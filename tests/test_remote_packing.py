"""Packed batches on the remote tier (Note [Packed blocks] in remote/packing.py): a batch that
goes to a lender shares one block, its handles at offsets inside it. Round trips are bitwise
(odd sizes included); the block goes back only when its last handle lets go of it (fetch, free,
a reclaim's move); a reclaim moves every live handle of the block (into the core and to
another lender) or refuses and keeps the block; a killed lender loses every handle of it."""

from __future__ import annotations

import functools

import pytest
import torch
from remote_helpers import TOKEN, LenderProcess, child_env, needs_nixl

import aqua_offload as aq
from aqua_offload.errors import RemoteLostError
from aqua_offload.remote import Lender, tier
from aqua_offload.remote.packing import Packs, layout
from conftest import random_tensor, run_with_timeout, wait_until

pytestmark = needs_nixl
KiB, MiB = 1 << 10, 1 << 20
COUNT = 400  # x 4 KiB: more than the 1 MiB host tier, so the batch goes to a lender whole


@pytest.fixture(autouse=True)
def small_staging(monkeypatch, no_block_cache):
    """1 MiB of staging: the batch takes two rounds; emptied blocks go back, not to the
    block cache."""
    monkeypatch.setattr(tier, "STAGING_BYTES", MiB)


@pytest.fixture
def managers(remote_managers):
    """1 MiB of host: a COUNT-tensor batch goes to a lender whole."""
    return functools.partial(remote_managers, host="1MiB")


def _batch(seed: int, odd: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """COUNT random tensors of 4 KiB (with ``odd``: some of 1, 333 and 4097 bytes and
    float32 ones, so offsets in the block are not multiples of anything)."""
    g = torch.Generator().manual_seed(seed)
    ts = []
    for i in range(COUNT):
        if odd and i % 7 == 3:
            ts.append(random_tensor(((1, 333, 4097)[i % 3],), torch.uint8, generator=g))
        elif odd and i % 5 == 1:
            ts.append(random_tensor((1024,), torch.float32, generator=g))
        else:
            ts.append(random_tensor((4 * KiB,), torch.uint8, generator=g))
    return ts, [t.clone() for t in ts]


def test_layout_packs_in_order_up_to_the_limit() -> None:
    assert layout([3, 5, 2], 0) == ([10], [(0, 0), (0, 3), (0, 8)])
    assert layout([3, 5, 2, 9], 8) == ([8, 2, 9], [(0, 0), (0, 3), (1, 0), (2, 0)])
    assert layout([3, 5], 1) == ([3, 5], [(0, 0), (1, 0)])  # a block each


def test_packs_count_handles_and_give_a_block_back_once() -> None:
    from aqua_offload.remote.items import RemoteBlock

    a, b = RemoteBlock(1, 10, 0, 1), RemoteBlock(2, 10, 10, 1)
    p = Packs()
    p.add(0, [a, a, a, b])
    assert p.drop(0, [a, a]) == [] and p.count(0, a) == 1
    assert p.drop(0, [a, b]) == [a, b]
    assert p.drop(0, [a]) == [], "never twice"
    p.add(1, [a, a, a])
    assert not p.drop_n(1, a, 2) and p.count(1, a) == 1
    assert p.drop_n(1, a, 1) and not p.drop_n(1, a, 1), "emptied once, never twice"


def test_a_batch_shares_one_block_and_round_trips_bitwise(remote_lender, managers) -> None:
    m = managers(remote_lender)
    ts, refs = _batch(1, odd=True)
    hs = m.offload_many(ts)
    assert all(h.tier == "remote" for h in hs)
    assert all(aq.is_offloaded(t) for t in ts)
    assert remote_lender.stats()["blocks"] == 1, "one block for the whole batch"
    s = m.stats()
    assert s["tiers"][-1]["blocks"] == 1 and s["tiers"][-1]["handles"] == COUNT
    total = sum(t.numel() * t.element_size() for t in refs)
    assert s["tiers"][-1]["used"] == total
    lender = s["remote"]["lenders"][0]
    assert lender["allocs"] == 1
    # contiguous in staging and in the block: one descriptor per staging round, not COUNT
    assert lender["items_written"] == -(-total // MiB)
    m.fetch_many(hs[::-1][:COUNT // 2])  # out of order, half of them: the block stays
    m.synchronize()  # the blocks given back have reached the lender
    assert remote_lender.stats()["blocks"] == 1
    m.fetch_many(hs[: COUNT - COUNT // 2])
    m.synchronize()  # the blocks given back have reached the lender
    assert remote_lender.stats()["blocks"] == 0, "given back after the last fetch"
    for t, ref in zip(ts, refs):
        assert torch.equal(t, ref)
    assert m.stats()["remote"]["lenders"][0]["frees"] == 1


def test_the_block_goes_back_only_after_its_last_handle(remote_lender, managers) -> None:
    m = managers(remote_lender)
    ts, refs = _batch(2)
    hs = m.offload_many(ts)
    assert remote_lender.stats()["blocks"] == 1
    for k, h in enumerate(hs[:-1]):  # free, fetch and keep-fetch in turn: never the block
        if k % 3 == 0:
            m.free(h)
            assert aq.is_discarded(ts[k])
        elif k % 3 == 1:
            assert torch.equal(m.fetch(h, keep=True), refs[k])
            m.free(h)
        else:
            assert m.fetch(h) is ts[k] and torch.equal(ts[k], refs[k])
        m.synchronize()  # the blocks given back have reached the lender
        assert remote_lender.stats()["blocks"] == 1, f"after {k + 1} of {COUNT}"
    assert remote_lender.stats()["used_bytes"] >= COUNT * 4 * KiB
    assert torch.equal(m.fetch(hs[-1]), refs[-1])
    m.synchronize()  # the blocks given back have reached the lender
    assert remote_lender.stats()["blocks"] == 0
    assert m.stats()["tiers"][-1]["handles"] == 0


def test_a_reclaim_moves_every_live_handle_of_the_block(managers) -> None:
    with Lender(TOKEN, host_bytes="8MiB", segment_bytes="4MiB") as a, \
            Lender(TOKEN, host_bytes="8MiB", segment_bytes="4MiB") as b:
        m = managers(a, b)
        ts, refs = _batch(3, odd=True)
        hs = m.offload_many(ts)
        assert all(h.location == a.address for h in hs) and a.stats()["blocks"] == 1
        gone = list(range(0, COUNT, 20))  # some let go before the reclaim
        for k in gone:
            assert torch.equal(m.fetch(hs[k]), refs[k])
        live = [k for k in range(COUNT) if k not in gone]
        assert a.reclaim(8 * MiB).wait(30)
        # the 1 MiB host tier takes what fits, the rest goes to b, packed again
        assert a.stats()["blocks"] == 0 and a.stats()["arena_bytes"] == 0
        on_b = [k for k in live if hs[k].tier == "remote"]
        assert on_b and all(hs[k].location == b.address for k in on_b)
        assert {hs[k].tier for k in live} == {"host", "remote"}
        assert b.stats()["blocks"] == 1
        assert m.stats()["remote"]["reclaimed_handles"] == len(live)
        for k in live:
            assert m.fetch(hs[k]) is ts[k] and torch.equal(ts[k], refs[k])
        assert m.stats()["tiers"][-1]["handles"] == 0  # b may keep its open slab (Note [Slabs])
        m.close()
        wait_until(lambda: b.stats()["blocks"] == 0)


def test_a_refused_reclaim_keeps_the_block_until_its_last_handle(managers) -> None:
    with Lender(TOKEN, host_bytes="8MiB", segment_bytes="4MiB") as lender:
        m = managers(lender)
        ts, refs = _batch(4)
        hs = m.offload_many(ts)
        ticket = lender.reclaim(8 * MiB)
        assert not ticket.wait(1.0), "the host tier holds only part of the block: refused"
        moved = [k for k, h in enumerate(hs) if h.tier == "host"]
        stuck = [k for k, h in enumerate(hs) if h.tier == "remote"]
        assert moved and stuck
        m.synchronize()  # the blocks given back have reached the lender
        assert lender.stats()["blocks"] == 1, "the stuck handles still use the block"
        for k in stuck:  # their fetch empties the block: it goes back, the reclaim completes
            assert m.fetch(hs[k]) is ts[k] and torch.equal(ts[k], refs[k])
        assert ticket.wait(30)
        assert lender.stats()["blocks"] == 0
        for k in moved:
            assert m.fetch(hs[k]) is ts[k] and torch.equal(ts[k], refs[k])


def test_a_killed_lender_loses_every_handle_of_its_packed_block(tmp_path, managers) -> None:
    lender = LenderProcess(tmp_path, "--host-bytes", "16MiB", "--segment", "4MiB",
                           env=child_env())
    try:
        m = managers(lender, remote_deadline_s=2.0)
        ts, refs = _batch(5, odd=True)
        hs = m.offload_many(ts)
        assert all(h.tier == "remote" for h in hs)
        keep = random_tensor((64 * KiB,), torch.uint8, generator=torch.Generator().manual_seed(6))
        hk = m.offload(keep, release=False)
        assert hk.tier == "host"
        lender.kill()  # SIGKILL: no goodbye
        with pytest.raises(RemoteLostError):  # within the deadline, then at once
            run_with_timeout(lambda: m.fetch(hs[0]), 60)
        for k in (1, COUNT // 2, COUNT - 1):  # every handle of the block, not just one
            with pytest.raises(RemoteLostError):
                run_with_timeout(lambda k=k: m.fetch(hs[k]), 10)
        s = m.stats()["remote"]
        assert s["lost_handles"] == COUNT
        assert s["lost_bytes"] == sum(t.numel() * t.element_size() for t in refs)
        assert torch.equal(m.fetch(hk), keep), "the host tier keeps working"
        for h in hs:  # freeing them works; the block is counted gone once
            m.free(h)
        s = m.stats()["remote"]
        assert s["lost_handles"] == 0 and s["lost_freed"] == 1
        assert all(aq.is_discarded(t) for t in ts)
    finally:
        lender.kill()

"""Elastic lending with an injected free-memory function: the arena follows the free memory
above the reserve, a reclaim asks the borrower, its callback moves the data (bitwise intact),
the lender deregisters only then, and both sides record the reclaim latency."""

from __future__ import annotations

import time

import pytest
import torch
from remote_helpers import TOKEN, needs_nixl

from aqua_offload.errors import InvalidArgumentError
from aqua_offload.remote import Lender, ReserveWatcher, host_free_memory
from conftest import random_tensor

pytestmark = needs_nixl
MiB = 1 << 20
SEG = 4 * MiB


class FakeDevice:
    """Free memory of a pretend device: ``total`` minus what the arena and others hold."""

    def __init__(self, lender_box: list, total: int) -> None:
        self.box, self.total, self.others = lender_box, total, 0

    def __call__(self) -> int:
        return self.total - self.others - self.box[0].arena.nbytes


def _wait(pred, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.01)
    return pred()


@pytest.fixture
def elastic():
    box: list = []
    with Lender(TOKEN, host_bytes=0, segment_bytes=SEG) as lender:
        box.append(lender)
        dev = FakeDevice(box, total=40 * MiB)
        yield lender, dev, ReserveWatcher(lender, keep=10 * MiB, free_memory=dev)


def test_arena_follows_free_memory_above_the_reserve(elastic) -> None:
    lender, dev, w = elastic
    assert w.step() == "grow" and lender.arena.nbytes == 28 * MiB  # 30 MiB spare, whole segments
    assert w.step() == "steady"  # 2 MiB spare: less than a segment
    dev.others = 12 * MiB        # the device needs memory: free 0 < keep 10
    assert w.step() == "reclaim"
    assert _wait(lambda: lender.arena.nbytes == 16 * MiB)  # 12 MiB back, nobody held blocks
    assert w.step() == "steady"  # free 12 >= keep 10 now
    dev.others = 0
    assert w.step() == "grow" and lender.arena.nbytes == 28 * MiB  # offered again
    assert w.stats["reclaim_asks"] == 1 and w.stats["grown_bytes"] == 40 * MiB


def test_pending_reclaims_count_as_returned(elastic, remote_clients) -> None:
    lender, dev, w = elastic
    w.step()
    c = remote_clients(lender.address)  # refuses reclaims: no callback
    c.allocate([SEG] * 7)              # every segment holds a block
    dev.others = 4 * MiB               # free 8 < keep 10: one segment wanted
    assert w.step() == "reclaim"
    assert w.step() == "steady", "the segment on its way back is not asked for twice"
    assert lender.stats()["reclaims_pending"] == 1


def test_reclaim_moves_borrower_data_then_deregisters(elastic, remote_clients) -> None:
    lender, dev, w = elastic
    w.step()
    moved: dict[int, torch.Tensor] = {}

    def on_reclaim(blocks):
        for b in blocks:  # move each block's bytes to local memory, as a lower tier would
            t = torch.empty(b.nbytes, dtype=torch.uint8)
            c.read([(c.register(t), b, 0, b.nbytes)])
            moved[b.id] = t

    c = remote_clients(lender.address, on_reclaim=on_reclaim)
    data = {}
    blocks = c.allocate([SEG] * 7)
    for i, b in enumerate(blocks):
        t = random_tensor((SEG,), torch.uint8, generator=torch.Generator().manual_seed(i))
        c.write([(c.register(t), b, 0, SEG)])
        data[b.id] = t
    dev.others = 8 * MiB  # free 4 < keep 10: two segments
    assert w.step() == "reclaim"
    assert _wait(lambda: lender.stats()["reclaims_done"] == 1)
    assert lender.arena.nbytes == 20 * MiB and lender.stats()["segments"] == 5
    assert len(moved) == 2 and all(torch.equal(t, data[i]) for i, t in moved.items())
    held = {b.id for b in c.blocks}
    assert held == set(data) - set(moved)
    for b in c.blocks:  # the others are untouched
        back = torch.empty(SEG, dtype=torch.uint8)
        c.read([(c.register(back), b, 0, SEG)])
        assert torch.equal(back, data[b.id])
    ls, cs = lender.stats(), c.stats()
    assert ls["reclaim_last_s"] > 0 and ls["reclaimed_bytes"] == 8 * MiB
    assert cs["reclaims"] == 1 and cs["reclaimed_blocks"] == 2 and cs["reclaim_last_s"] > 0
    assert _wait(lambda: lender.stats()["borrower_reclaim_last_s"] > 0)


def test_a_refused_reclaim_waits_until_the_blocks_are_freed(remote_lender,
                                                            remote_clients) -> None:
    def refuse(blocks):
        raise RuntimeError("nowhere to put them")

    c = remote_clients(remote_lender.address, on_reclaim=refuse)
    blocks = c.allocate([SEG] * 4)
    ticket = remote_lender.reclaim(SEG)
    assert _wait(lambda: c.stats()["reclaim_refusals"] == 1)
    assert not ticket.wait(0.3) and remote_lender.arena.nbytes == 16 * MiB  # nothing taken
    assert _wait(lambda: remote_lender.stats()["reclaim_refused_blocks"] == 1)
    (victim,) = [b for b in blocks if b.segment in ticket.segments]
    c.free([victim])
    assert ticket.wait(20) and remote_lender.arena.nbytes == 12 * MiB


def test_a_borrower_that_goes_away_completes_the_reclaim(remote_lender, remote_clients) -> None:
    c = remote_clients(remote_lender.address)  # no callback: refuses
    c.allocate([SEG] * 4)
    ticket = remote_lender.reclaim(2 * SEG)
    assert not ticket.wait(0.3)
    c.close()  # its blocks are freed with its session
    assert ticket.wait(20) and remote_lender.arena.nbytes == 8 * MiB


def test_watcher_arguments_and_thread(elastic) -> None:
    lender, dev, _ = elastic
    for kw in (dict(keep="lots"), dict(keep=1, interval_s=0), dict(keep=1, free_memory=5)):
        kw.setdefault("free_memory", dev)
        with pytest.raises(InvalidArgumentError):
            ReserveWatcher(lender, **kw)
    w = ReserveWatcher(lender, keep=10 * MiB, free_memory=dev, interval_s=0.02,
                       max_bytes=8 * MiB).start()
    try:
        assert _wait(lambda: lender.arena.nbytes == 8 * MiB)  # capped by max_bytes
    finally:
        w.stop()
    assert 0 < host_free_memory()


def test_a_growth_that_fails_midway_keeps_and_announces_what_it_added(remote_lender,
                                                                      remote_clients) -> None:
    from aqua_offload.errors import OutOfMemoryError

    c = remote_clients(remote_lender.address)
    c.allocate([SEG] * 4)  # the arena is full
    real, calls = remote_lender.arena._allocate, []

    def flaky(nbytes):
        calls.append(nbytes)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (pretend)")
        return real(nbytes)

    remote_lender.arena._allocate = flaky
    version = remote_lender.stats()["md_version"]
    with pytest.raises(OutOfMemoryError):
        remote_lender.grow(3 * SEG)
    assert remote_lender.arena.nbytes == 20 * MiB
    assert remote_lender.stats()["md_version"] == version + 1
    (blk,) = c.allocate([SEG])  # in the segment that was added: the client learns of it
    t = random_tensor((SEG,), torch.uint8, generator=torch.Generator().manual_seed(9))
    back = torch.zeros_like(t)
    c.write([(c.register(t), blk, 0, SEG)])
    c.read([(c.register(back), blk, 0, SEG)])
    assert torch.equal(back, t)

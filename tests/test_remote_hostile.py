"""Hostile cases of the remote tier's placement machinery (slabs, block cache, replicas,
posted frees, tier order): each pins down a guarantee a careless change would break, most
of them found broken once. Every round trip is compared bitwise; waits have hard deadlines."""

from __future__ import annotations

import functools

import pytest
import torch
from remote_helpers import TOKEN, needs_nixl

import aqua_offload as aq
from aqua_offload.errors import InvalidArgumentError, RemoteLostError
from aqua_offload.remote import Lender
from conftest import random_tensor, run_with_timeout, wait_until, workers_while

pytestmark = needs_nixl
KiB, MiB = 1 << 10, 1 << 20


def _tensors(n: int, seed: int, size: int = 96 * KiB) -> tuple[list[torch.Tensor],
                                                               list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ts = [random_tensor((size + 13 * i,), torch.uint8, generator=g) for i in range(n)]
    return ts, [t.clone() for t in ts]


@pytest.fixture
def lenders():
    """Factory of in-process lenders (8 MiB in 4 MiB segments unless given), closed at
    teardown."""
    made: list[Lender] = []

    def make(k: int, size: str = "8MiB", segment: str = "4MiB") -> list[Lender]:
        out = [Lender(TOKEN, host_bytes=size, segment_bytes=segment).start() for _ in range(k)]
        made.extend(out)
        return out

    yield make
    for x in made:
        x.close()


def test_a_reclaimed_mirror_is_not_dropped_when_only_a_prefetch_holds_the_rest(
        lenders, lender_managers) -> None:
    """Primary lender lost, the handle prefetched, then the mirror's lender reclaims it: the
    mirror was the last copy a lender held. Dropping it (as if the prefetch buffer were a
    second copy) left the entry naming the dead primary, so ``fetch(keep=True)`` handed the
    prefetch out and the next fetch raised ``RemoteLostError``: the bytes were gone while the
    handle lived. Now the prefetch gives the block up as in any reclaim: ``keep=True`` is
    refused with a typed error, and a plain fetch returns the bytes."""
    a, b = lenders(2)
    m = lender_managers(a, b, remote_copies=2, remote_deadline_s=2.0)
    (t,), (ref,) = _tensors(1, 1)
    h = m.offload(t, release=False)
    assert h.tier == "remote" and h.location == a.address
    m.prefetch(h)
    a.close()  # the primary's lender goes away
    wait_until(lambda: m._remote.clients[0].lost is not None, 30, "lender a lost")
    assert b.reclaim(8 * MiB).wait(30)  # the mirror's lender wants everything back
    assert b.stats()["blocks"] == 0
    with pytest.raises(InvalidArgumentError, match="prefetch"):
        run_with_timeout(lambda: m.fetch(h, keep=True), 60)
    out = run_with_timeout(lambda: m.fetch(h), 60)
    assert torch.equal(out, ref)


def test_a_lender_lost_while_a_reclaim_moves_handles_leaks_no_block(
        lenders, remote_managers, monkeypatch) -> None:
    """A reclaim of lender a moves one handle into the host tier (its block is then empty),
    and the other one to lender b, which dies during that write. The RemoteLostError used to
    escape the migration: the reclaim was refused with the emptied block still held and no
    handle left to give it back, so the lender's reclaim never completed. Now a lender lost
    during the move is skipped like a full one (the handle goes to lender c), and whatever
    fails after the moves gives the emptied blocks back."""
    from aqua_offload.remote import placement

    monkeypatch.setattr(placement, "SMALL_BYTES", 0)  # a block per batch, no open slab
    a, b, c = lenders(3)
    # no peers, lenders before host memory: both go to a; the host tier holds only the first
    m = remote_managers(a, b, c, host="128KiB", remote_order="above_host",
                        remote_deadline_s=2.0)
    (small, big), refs = _tensors(2, 2, size=96 * KiB)
    big = torch.cat([big, big.flip(0)])
    refs[1] = big.clone()
    hs = [m.offload(small), m.offload(big)]
    assert [h.location for h in hs] == [a.address] * 2 and a.stats()["blocks"] == 2
    stage = m._remote._stage
    write_from = stage.write_from

    def dying(client: int, pieces, stream):  # lender b goes away under the write
        if client == 1:
            b.close()
            wait_until(lambda: m._remote.clients[1].lost is not None, 30, "lender b lost")
        return write_from(client, pieces, stream)

    monkeypatch.setattr(stage, "write_from", dying)
    ticket = a.reclaim(8 * MiB)
    assert ticket.wait(30), "the reclaim completes"
    assert a.stats()["blocks"] == 0
    assert hs[0].tier == "host" and hs[1].location == c.address
    for h, t, r in zip(hs, (small, big), refs):
        assert run_with_timeout(lambda h=h: m.fetch(h), 60) is t and torch.equal(t, r)


def test_a_reclaim_refused_by_a_failing_write_gives_back_what_it_emptied(
        lenders, remote_managers, monkeypatch) -> None:
    """As above, but the write to the other lender fails with another error (here a
    ``BackendError`` from the transfer): the reclaim is refused, the block emptied by the move
    into the host tier goes back at once, and the reclaim completes when the handle left on
    the lender is fetched."""
    from aqua_offload.errors import BackendError
    from aqua_offload.remote import placement

    monkeypatch.setattr(placement, "SMALL_BYTES", 0)
    a, b = lenders(2)
    m = remote_managers(a, b, host="128KiB", remote_order="above_host", remote_deadline_s=2.0)
    (small, big), refs = _tensors(2, 3, size=96 * KiB)
    big = torch.cat([big, big.flip(0)])
    refs[1] = big.clone()
    hs = [m.offload(small), m.offload(big)]
    assert [h.location for h in hs] == [a.address] * 2
    stage = m._remote._stage
    write_from = stage.write_from

    def failing(client: int, pieces, stream):
        if client == 1:
            raise BackendError("injected: the transfer failed")
        return write_from(client, pieces, stream)

    monkeypatch.setattr(stage, "write_from", failing)
    ticket = a.reclaim(8 * MiB)
    wait_until(lambda: m.stats()["remote"]["reclaim_refusals"] == 1, 30, "the refusal")
    wait_until(lambda: a.stats()["blocks"] == 1, 30, "the emptied block back")
    assert hs[0].tier == "host" and hs[1].location == a.address
    assert not ticket.done.is_set()
    for h, t, r in zip(hs, (small, big), refs):
        assert run_with_timeout(lambda h=h: m.fetch(h), 60) is t and torch.equal(t, r)
    assert ticket.wait(30) and a.stats()["blocks"] == 0


def test_a_lender_lost_during_a_direct_offload_with_two_copies(lenders, lender_managers,
                                                               monkeypatch) -> None:
    """``remote_copies=2`` over three lenders; the second copy's lender dies while the batch is
    written to it. The offload used to raise ``RemoteLostError`` although two lenders lived;
    now the placement is given up and made again without the lost lender, so the batch gets
    its two copies on the live ones and survives the loss of either."""
    a, b, c = lenders(3)
    m = lender_managers(a, b, c, remote_copies=2, remote_deadline_s=2.0)
    ts, refs = _tensors(4, 4)
    stage = m._remote._stage
    write_from = stage.write_from

    def dying(client: int, pieces, stream):
        if client == 1 and m._remote.clients[1].lost is None:
            b.close()
            wait_until(lambda: m._remote.clients[1].lost is not None, 30, "lender b lost")
        return write_from(client, pieces, stream)

    monkeypatch.setattr(stage, "write_from", dying)
    hs = run_with_timeout(lambda: m.offload_many(ts), 60)
    assert all(h.tier == "remote" and h.location == a.address for h in hs)
    s = m.stats()
    assert [t["handles"] for t in s["tiers"] if t["tier"] == "remote"] == [4, 0, 4]
    assert s["remote"]["degraded_handles"] == 0
    a.close()  # the primary goes too: the copies on c serve every read
    # (once a's client knows: an in-process lender's freed arena may still be readable)
    wait_until(lambda: m._remote.clients[0].lost is not None, 30, "lender a lost")
    for h, t, r in zip(hs, ts, refs):
        assert run_with_timeout(lambda h=h: m.fetch(h), 60) is t and torch.equal(t, r)


def test_close_gives_back_open_slabs_cached_blocks_and_live_handles(lenders,
                                                                    lender_managers) -> None:
    """A manager closed while it holds, on each of two lenders (two copies), an open slab, a
    cached block and live handles (a release, restored bitwise by close, and a snapshot):
    every block goes back to both lenders, and a second manager gets the whole arena."""
    a, b = lenders(2, size="16MiB")
    m = lender_managers(a, b, remote_copies=2)
    (small, snap, rel), refs = _tensors(3, 5)
    big, _ = _tensors(1, 6, size=3 * MiB)
    hb = m.offload(big[0], release=False)  # a packed block of its own on each lender
    m.fetch(hb)  # ... now cached
    hs = m.offload(small, release=False)  # the open slabs
    h_snap = m.offload(snap, release=False)
    m.offload(rel)  # a release: restored by close
    s = m.stats()["remote"]
    assert s["cached_bytes"] > 0 and hs.tier == h_snap.tier == "remote"
    assert all(i in m._remote._slabs for i in (0, 1))
    assert a.stats()["blocks"] >= 2 and b.stats()["blocks"] >= 2
    run_with_timeout(m.close, 60)
    assert torch.equal(rel, refs[2])
    for x in (a, b):
        wait_until(lambda x=x: x.stats()["blocks"] == 0, 30, "every block back")
    m2 = lender_managers(a, b)
    g = torch.Generator().manual_seed(7)
    full = [random_tensor((4 * MiB,), torch.uint8, generator=g) for _ in range(4)]
    full_refs = [t.clone() for t in full]
    h2 = m2.offload_many(full)  # a's whole arena, a segment each
    assert all(h.location == a.address for h in h2)
    assert all(m2.fetch(h) is t and torch.equal(t, r) for h, t, r in zip(h2, full, full_refs))


def test_an_incremental_offload_on_a_two_copy_base_lets_both_copies_go(lenders,
                                                                       lender_managers) -> None:
    """``base=`` a remote handle with two copies: the new offload is written in full (two
    copies), the base lets go of both of its copies (each lender counts one handle), and the
    result reads back bitwise from either lender."""
    a, b = lenders(2)
    m = lender_managers(a, b, remote_copies=2)
    (full,), (ref,) = _tensors(1, 8, size=256 * KiB)
    base = m.offload(full[: 100 * KiB].clone(), release=False)
    kept = m.fetch(base, keep=True)
    assert torch.equal(kept, ref[: 100 * KiB])
    h = m.offload(full, release=False, base=base)
    assert base.state == "freed" and h.tier == "remote"
    assert [t["handles"] for t in m.stats()["tiers"] if t["tier"] == "remote"] == [1, 1]
    a.close()  # the primary's lender goes: the other copy holds the whole tensor
    wait_until(lambda: m._remote.clients[0].lost is not None, 30, "lender a lost")
    assert torch.equal(run_with_timeout(lambda: m.fetch(h), 60), ref)


def test_two_copies_under_reclaims_while_threads_offload_prefetch_and_fetch(
        lenders, lender_managers) -> None:
    """``remote_copies=2`` over three lenders; three threads offload small batches (the open
    slabs), larger ones (packed, cached blocks), prefetch and fetch them, while two lenders in
    turn take everything back and offer it again. Every fetch is bitwise, every reclaim
    completes, and once every handle is fetched no lender holds a block beyond the open slab
    and the cache."""
    import threading
    import time

    from remote_helpers import blocks_left

    a, b, c = lenders(3, size="16MiB")
    m = lender_managers(a, b, c, remote_copies=2)

    def work(seed: int, stop: threading.Event) -> None:
        r = 0
        while not stop.is_set() or r < 3:
            size = 8 * KiB if (r + seed) % 2 else 160 * KiB
            ts, refs = _tensors(6, 1000 * seed + r, size=size)
            hs = m.offload_many(ts[:4]) + [m.offload(t, release=False) for t in ts[4:]]
            m.prefetch(hs[r % 6])
            back = m.fetch_many(hs[::-1])
            assert all(torch.equal(x, ref) for x, ref in zip(back, refs[::-1]))
            r += 1

    def reclaims() -> None:
        for k in range(6):
            time.sleep(0.05)
            lender = (b, c)[k % 2]
            assert lender.reclaim(16 * MiB).wait(30), "reclaim completed"
            lender.grow(16 * MiB)

    workers_while(work, 3, reclaims)
    s = m.stats()["remote"]
    assert s["reclaims"] >= 1
    assert [blocks_left(m, x) for x in (a, b, c)] == [0, 0, 0]


_TWICE = """
import sys, torch
import aqua_offload as aq
from aqua_offload.remote import Lender
MiB = 1 << 20
with Lender(sys.argv[1], host_bytes="64MiB", segment_bytes="16MiB") as lender:
    m = aq.OffloadManager("cpu", peers=None, host_bytes="4KiB", remote=[lender.address],
                          remote_token=sys.argv[1])
    agent = m._remote.clients[0]._agent
    regs = len(agent._regs)
    t = torch.randint(1, 256, (5 * MiB + 3,), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(7))
    ref = t.clone()
    back = m.fetch_many(m.offload_many([t, t], release=False))  # one range written twice
    out = torch.empty_like(t)
    into = m.fetch_many(m.offload_many([t, t], release=False), outs=[out, out])  # read twice
    ok = (all(torch.equal(x, ref) for x in back) and into[0] is out and into[1] is out
          and torch.equal(out, ref) and len(agent._regs) == regs
          and m.stats()["remote"]["direct_bytes"] == 8 * (5 * MiB + 3))
    m.close()
print("OK" if ok else "WRONG")
"""


def test_one_large_host_range_listed_twice_in_a_transfer(tmp_path) -> None:
    """A snapshot batch holding the same large tensor twice (tied weights), and a fetch of two
    such snapshots into one ``out=``: its direct pieces (Note [Staging]) list the same
    (address, bytes) twice. Registered in one NIXL call with both listed, the deregistration
    after the transfer crashed the process (SIGSEGV in NIXL). Now each range is registered
    once; the bytes are right both ways and nothing stays registered. In a child process, so
    that a crash fails this test alone."""
    import subprocess
    import sys

    from remote_helpers import child_env

    script = tmp_path / "twice.py"
    script.write_text(_TWICE)
    proc = subprocess.run([sys.executable, str(script), TOKEN], env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (
        proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])


def test_a_reclaim_with_nothing_left_to_take_completes_at_once(lenders) -> None:
    """``Lender.reclaim`` when no segment is left to drain (the arena already taken back, or
    0 bytes asked): its ticket used to stay pending forever (only a released segment sets it
    done), so ``ticket.wait()`` hung and ``reclaims_pending`` counted it for good. Found by
    the stateful test (two reclaims of a whole lender in a row)."""
    (a,) = lenders(1)
    assert a.reclaim(8 * MiB).wait(30)  # no borrower: both segments go at once
    assert a.stats()["arena_bytes"] == 0
    for nbytes in (8 * MiB, 0):
        ticket = a.reclaim(nbytes)
        assert ticket.wait(5) and ticket.nbytes == 0 and ticket.seconds == 0.0
    s = a.stats()
    assert s["reclaims_pending"] == 0 and s["reclaim_pending_bytes"] == 0
    a.grow(4 * MiB)  # and the lender still grows and serves reclaims after that
    assert a.reclaim(4 * MiB).wait(30) and a.stats()["arena_bytes"] == 0


def test_live_handles_counts_the_handles_on_lenders(remote_lender, lender_managers) -> None:
    """``stats()["live_handles"]`` (docs/stats.md: handles offloaded and not yet fetched or
    freed) came from the core alone, so handles the lenders held did not count: a batch of two
    snapshots on a lender read 0. Found by the stateful test."""
    m = lender_managers(remote_lender)  # a 4 KiB host tier: both go to the lender
    ts, refs = _tensors(2, 9)
    hs = m.offload_many(ts, release=False)
    assert [h.tier for h in hs] == ["remote", "remote"]
    assert m.stats()["live_handles"] == 2
    small = random_tensor((100,), torch.uint8)
    h_host = m.offload(small, release=False)  # and one the core holds
    assert h_host.tier == "host" and m.stats()["live_handles"] == 3
    assert torch.equal(m.fetch(hs[0]), refs[0])
    assert m.stats()["live_handles"] == 2
    m.free(hs[1])
    m.free(h_host)
    assert m.stats()["live_handles"] == 0


def test_a_prefetched_handle_outlives_its_lender_and_close_restores_it(lenders,
                                                                       lender_managers) -> None:
    """Two releases prefetched from a lender that then dies: their bytes are in the prefetch
    buffers, so a fetch returns them. But the tier called them lost (they still named a block
    of the dead lender): ``remote.lost_handles`` counted them, and ``close()``, which skips
    lost handles, left the second released tensor discarded although its bytes were here.
    Found by the stateful test. Now a prefetched handle is not lost: the count is 0, the
    fetch is bitwise, and close restores the other tensor bitwise."""
    a, b = lenders(2)
    m = lender_managers(a, b, remote_deadline_s=2.0)
    ts, refs = _tensors(2, 10)
    hs = m.offload_many(ts)
    assert [h.location for h in hs] == [a.address] * 2
    m.prefetch_many(hs)
    a.close()
    wait_until(lambda: m.stats()["tiers"][1]["lost"] is not None, 30, "lender a lost")
    s = m.stats()["remote"]
    assert s["lost_handles"] == 0 and s["lost_bytes"] == 0
    assert run_with_timeout(lambda: m.fetch(hs[0]), 60) is ts[0] and torch.equal(ts[0], refs[0])
    run_with_timeout(m.close, 60)
    assert ts[1].untyped_storage().nbytes() == refs[1].numel()  # (reading it would crash)
    assert torch.equal(ts[1], refs[1])


def test_a_prefetched_handle_of_a_lost_lender_is_not_kept(lenders, lender_managers) -> None:
    """A snapshot prefetched from a lender that then dies: ``fetch(keep=True)`` handed the
    prefetch buffer out and left the handle naming only the dead lender's copy, so the kept
    handle was lost at once (its next fetch raised ``RemoteLostError``). As when a reclaim
    takes a prefetched handle's block, the prefetch holds the only copy: keep is refused with
    a typed error, and a plain fetch returns the bytes. Found by the stateful test."""
    a, b = lenders(2)
    m = lender_managers(a, b, remote_deadline_s=2.0)
    (t,), (ref,) = _tensors(1, 11)
    h = m.offload(t, release=False)
    assert h.location == a.address
    m.prefetch(h)
    a.close()
    wait_until(lambda: m.stats()["tiers"][1]["lost"] is not None, 30, "lender a lost")
    with pytest.raises(InvalidArgumentError, match="prefetch"):
        run_with_timeout(lambda: m.fetch(h, keep=True), 60)
    assert h.state == "offloaded" and m.stats()["remote"]["lost_handles"] == 0
    assert torch.equal(run_with_timeout(lambda: m.fetch(h), 60), ref)


COUNTERS = ("offloads", "bytes_offloaded", "fetches", "bytes_fetched", "prefetches", "frees")


def test_call_counters_count_the_handles_on_lenders(remote_lender, lender_managers) -> None:
    """``offloads``, ``fetches``, ``prefetches``, ``frees`` and their bytes (docs/stats.md)
    came from the core alone: three offloads that went to a lender read ``offloads`` 0. The
    same calls on a manager whose host tier holds everything give the same counters."""
    ts, refs = _tensors(4, 11)
    got = []
    plain = aq.OffloadManager("cpu", peers=None, host_bytes="8MiB")
    for m in (lender_managers(remote_lender), plain):
        hs = m.offload_many(ts[:3], release=False)
        h_free = m.offload(ts[3], release=False)
        where = {h.tier for h in hs + [h_free]}
        m.prefetch(hs[0])
        outs = m.fetch_many(hs)
        assert all(torch.equal(a, b) for a, b in zip(outs, refs))
        h_keep = m.offload(ts[1], release=False)
        assert torch.equal(m.fetch(h_keep, keep=True), refs[1])
        m.free(h_keep)
        m.free(h_free)
        s = m.stats()
        got.append((where, {k: s[k] for k in COUNTERS}))
    plain.close()
    (remote_where, remote), (host_where, host) = got
    assert remote_where == {"remote"} and host_where == {"host"}
    assert remote == host
    assert remote["offloads"] == 5 and remote["fetches"] == 4 and remote["prefetches"] == 1
    assert remote["frees"] == 2
    assert remote["bytes_fetched"] == sum(t.nbytes for t in ts[:3]) + ts[1].nbytes

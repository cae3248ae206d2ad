"""Elastic peer tier inside one process: lend() grows it by a segment, reclaim() hands whole
segments back (newest first) after moving their live handles down the cascade, never losing a
byte; refused requests change nothing. Runs on every backend (on one GPU the peer is the
compute device itself); cross-process lending is in test_lending*.py.
"""

from __future__ import annotations

import threading

import pytest
import torch

import aqua_offload as aq
from helpers import (JOIN_TIMEOUT_S, K, M, PEER, SLOT, check_accounting, check_drained,
                     emulation_only, rand_tensor, run_emulated, same)


def test_lend_grows_the_peer_tier(backend, managers):
    m = managers()
    dev, peer = backend.device, backend.peer_label
    hs = [m.offload(rand_tensor(SLOT, device=dev), release=False) for _ in range(4)]
    assert m.lend(peer, 2 * SLOT) == PEER + 2 * SLOT
    assert m.lend(peer, "4KiB") == PEER + 3 * SLOT
    s = m.stats()
    t = s["tiers"][0]
    assert t["capacity"] == PEER + 3 * SLOT and t["segments"] == 3 and t["lent_segments"] == 2
    assert s["lends"] == 2 and s["bytes_lent"] == 3 * SLOT
    more = [m.offload(rand_tensor(SLOT, device=dev), release=False) for _ in range(3)]
    assert all(h.tier == "peer" for h in hs + more)
    assert m.stats()["evictions"] == 0
    check_accounting(m, hs + more)


def test_reclaim_migrates_live_data_down_and_shrinks(backend, managers):
    m = managers()
    peer = backend.peer_label
    gen = torch.Generator().manual_seed(22)
    assert m.lend(peer, PEER) == 2 * PEER
    ts = [rand_tensor(SLOT, gen=gen, device=backend.device) for _ in range(8)]
    refs = [t.clone() for t in ts]
    hs = [m.offload(t, release=i % 2 == 0) for i, t in enumerate(ts)]
    assert all(h.tier == "peer" for h in hs)
    got = m.reclaim(peer, 1000)
    assert got >= 1000 and got == PEER  # the whole newest segment
    s = m.stats()
    t = s["tiers"][0]
    assert t["capacity"] == PEER and t["segments"] == 1 and t["lent_segments"] == 0
    assert t["used"] <= PEER
    moved = [h for h in hs if h.tier == "host"]
    assert len(moved) == 4  # a full segment's worth
    assert s["reclaims"] == 1 and s["bytes_reclaimed"] == PEER
    assert s["migrations"] == 4 and s["bytes_migrated"] == 4 * SLOT
    assert s["reclaim_last_bytes_moved"] == 4 * SLOT
    assert s["evictions"] == 0  # a reclaim is not an eviction
    assert 0 < s["reclaim_last_s"] <= s["reclaim_max_s"] <= s["reclaim_total_s"]
    check_accounting(m, hs)
    for h, t, ref in zip(hs, ts, refs):
        out = m.fetch(h)
        assert same(out, ref)
        if h.release:
            assert out is t
    check_drained(m)


def test_reclaim_all_then_lend_again(backend, managers):
    m = managers()
    dev, peer = backend.device, backend.peer_label
    gen = torch.Generator().manual_seed(23)
    m.lend(peer, 8 * K)
    ts = [rand_tensor(SLOT, gen=gen, device=dev) for _ in range(5)]
    hs = [m.offload(t, release=False) for t in ts]
    assert m.reclaim(peer, None) == PEER + 8 * K
    s = m.stats()
    assert s["tiers"][0]["capacity"] == 0 and s["tiers"][0]["segments"] == 0
    assert all(h.tier == "host" for h in hs)
    assert s["reclaim_last_bytes_moved"] == 5 * SLOT
    total = s["reclaim_total_s"]
    assert m.reclaim(peer) == 0  # nothing left: nothing to do
    assert m.reclaim(peer, 0) == 0
    h = m.offload(rand_tensor(SLOT, device=dev), release=False)
    assert h.tier == "host"
    assert m.lend(peer, SLOT) == SLOT
    h2 = m.offload(rand_tensor(SLOT, device=dev), release=False)
    assert h2.tier == "peer"
    assert m.reclaim(peer) == SLOT
    s = m.stats()
    assert s["reclaims"] == 2 and s["reclaim_total_s"] > total
    assert h2.tier == "host"
    for x, t in zip(hs, ts):
        assert same(m.fetch(x), t)
    h.free()
    h2.free()
    check_drained(m)


def test_reclaim_covers_newest_segments_first(backend, managers):
    m = managers()
    peer = backend.peer_label
    for n in (4 * K, 8 * K, 2 * K):
        m.lend(peer, n)
    assert m.reclaim(peer, 9 * K) == 10 * K  # 2 KiB then 8 KiB: whole segments
    assert m.stats()["tiers"][0]["capacity"] == PEER + 4 * K
    assert m.reclaim(peer, 4 * K) == 4 * K
    assert m.reclaim(peer, 1) == PEER  # the initial budget is a segment too
    s = m.stats()
    assert s["tiers"][0]["capacity"] == 0
    assert s["bytes_reclaimed"] == 14 * K + PEER and s["reclaims"] == 3


def test_peer_bytes_zero_then_lend(backend, managers):
    m = managers(peer=0)
    dev, peer = backend.device, backend.peer_label
    t = m.stats()["tiers"][0]
    assert t["tier"] == "peer" and t["capacity"] == 0 and t["segments"] == 0
    a = rand_tensor(SLOT, device=dev)
    h = m.offload(a, release=False)
    assert h.tier == "host"
    assert m.reclaim(peer) == 0
    with pytest.raises(aq.InvalidArgumentError):
        m.reclaim(peer, 1)
    assert m.lend(peer, 2 * SLOT) == 2 * SLOT
    b = rand_tensor(SLOT, device=dev)
    h2 = m.offload(b, release=False)
    assert h2.tier == "peer"
    check_accounting(m, [h, h2])
    assert same(m.fetch(h), a) and same(m.fetch(h2), b)
    check_drained(m)


def test_peer_bytes_mapping(backend, managers):
    m = managers(peer={backend.peer_label: 8 * K})
    assert m.stats()["tiers"][0]["capacity"] == 8 * K
    # a listed peer without a budget: the compute device itself (a valid device, not budgeted)
    unbudgeted = "emu:0" if not backend.cuda else ("cuda:0" if backend.peer != 0 else None)
    if unbudgeted is not None:  # (one GPU: cuda:0 is the peer; no other device to name)
        with pytest.raises(aq.InvalidArgumentError, match="no budget"):
            managers(peer={backend.peer_label: 8 * K}, peers=[backend.peer_label, unbudgeted])


def test_lend_and_reclaim_errors_change_nothing(backend, managers):
    m = managers()
    dev, peer = backend.device, backend.peer_label
    hs = [m.offload(rand_tensor(SLOT, device=dev), release=False) for _ in range(2)]
    m.lend(peer, SLOT)
    before = m.stats()
    if backend.cuda:
        missing = [f"cuda:{torch.cuda.device_count()}", f"cuda:{torch.cuda.device_count() + 6}"]
        foreign = "emu:1"  # an emulated device's label, on the CUDA backend
        not_a_peer = ["cuda:0"] if backend.peer != 0 else []  # the compute device, no peer
    else:
        missing = ["emu:9", "cuda:7"]  # on emulation "cuda:N" names emulated device N
        foreign = None
        not_a_peer = ["emu:0"]
    bad_reclaims = [(peer, PEER + SLOT + 1), (peer, 10 * M), ("junk", None), (-1, None),
                    (peer, -1), (peer, "junk")]
    bad_reclaims += [(d, None) for d in missing] + [(d, None) for d in not_a_peer]
    bad_reclaims += [(d, 1) for d in not_a_peer] + ([(foreign, None)] if foreign else [])
    for dev_, n in bad_reclaims:
        with pytest.raises(aq.InvalidArgumentError):
            m.reclaim(dev_, n)
    bad_lends = [(peer, 0), (peer, -1), (peer, -4096), (peer, "junk"), (peer, 100),
                 (peer, None), (peer, 1.5)]
    bad_lends += [(d, SLOT) for d in missing + not_a_peer] + ([(foreign, SLOT)] if foreign else [])
    for dev_, n in bad_lends:
        with pytest.raises(aq.InvalidArgumentError):
            m.lend(dev_, n)
    assert m.stats() == before
    assert all(h.tier == "peer" for h in hs)


def test_reclaim_oom_when_the_host_cannot_take_anything(backend, managers):
    m = managers(host=SLOT // 2)
    peer = backend.peer_label
    gen = torch.Generator().manual_seed(24)
    ts = [rand_tensor(SLOT, gen=gen, device=backend.device) for _ in range(4)]
    refs = [t.clone() for t in ts]
    hs = [m.offload(t, release=i < 2) for i, t in enumerate(ts)]
    before = m.stats()
    with pytest.raises(aq.OutOfMemoryError) as info:
        m.reclaim(peer)
    assert info.value.requested == 4 * SLOT  # all that lives there; refused before any move
    after = m.stats()
    assert after["tiers"][0]["capacity"] == PEER and after["tiers"][0]["segments"] == 1
    for k in ("reclaims", "bytes_reclaimed", "migrations", "live_handles", "bytes_migrated"):
        assert after[k] == before[k], k
    assert [h.tier for h in hs] == ["peer"] * 4
    check_accounting(m, hs)
    # the peer is usable as before (the drained segment was taken back into service)
    assert same(m.fetch(hs[3]), ts[3])
    h = m.offload(ts[3], release=False)
    assert h.tier == "peer"
    for x, t, ref in zip(hs[:3], ts, refs):
        out = m.fetch(x)
        assert same(out, ref)
        if x.release:
            assert out is t
    with pytest.raises(aq.OutOfMemoryError):  # h still does not fit the host
        m.reclaim(peer)
    assert h.tier == "peer"
    m.free(h)
    assert m.reclaim(peer) == PEER
    check_drained(m)


def test_reclaim_oom_partial_keeps_every_byte(backend, managers):
    """The host can take some handles but not all: OutOfMemoryError, nothing reclaimed, every
    handle intact wherever it is."""
    m = managers(host=2 * SLOT)
    gen = torch.Generator().manual_seed(25)
    ts = [rand_tensor(SLOT, gen=gen, device=backend.device) for _ in range(4)]
    hs = [m.offload(t, release=False) for t in ts]
    with pytest.raises(aq.OutOfMemoryError):
        m.reclaim(backend.peer_label)
    s = m.stats()
    assert s["tiers"][0]["capacity"] == PEER and s["reclaims"] == 0
    check_accounting(m, hs)
    for h, t in zip(hs, ts):
        assert same(m.fetch(h), t)
    check_drained(m)


def test_reclaim_oom_partial_leaves_handles_on_the_peer(backend, managers):
    m = managers(host=2 * SLOT)
    hs = [m.offload(rand_tensor(SLOT, device=backend.device), release=False) for _ in range(4)]
    with pytest.raises(aq.OutOfMemoryError):
        m.reclaim(backend.peer_label)
    assert [h.tier for h in hs] == ["peer"] * 4


def test_bytes_lent_matches_capacity_added(backend, managers):
    m = managers(peer=0)
    cap = m.lend(backend.peer_label, 1000)
    assert m.stats()["bytes_lent"] == cap


def test_concurrent_reclaims_of_one_device_are_refused(backend, managers):
    # Each reclaim moves 3 units of live data; the second one must come while the first is
    # still copying. A GPU moves 48 MiB in about a millisecond, so it gets bigger units.
    unit = 256 * M if backend.cuda else 16 * M
    m = managers(peer=3 * unit, host=4 * unit)
    dev, peer = backend.device, backend.peer_label
    torch.manual_seed(26)
    conflicts = 0
    for round_ in range(3):
        ts = [torch.empty(unit, dtype=torch.uint8, device=dev).random_(1, 256)
              for _ in range(3)]
        refs = [t.clone() for t in ts]
        hs = [m.offload(t) for t in ts]  # a big reclaim: 3 units of copies in flight
        barrier = threading.Barrier(2)
        results: list = [None, None]

        def reclaimer(i: int) -> None:
            barrier.wait()
            try:
                results[i] = ("ok", m.reclaim(peer))
            except aq.OffloadError as e:
                results[i] = ("err", e)

        threads = [threading.Thread(target=reclaimer, args=(i,), daemon=True) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(JOIN_TIMEOUT_S)
        assert not any(th.is_alive() for th in threads), "reclaim deadlocked"
        oks = [r[1] for r in results if r[0] == "ok"]
        errs = [r[1] for r in results if r[0] == "err"]
        # exactly one took the memory; the other was refused, or (if it came after) found none
        assert sorted(oks, reverse=True)[0] == 3 * unit, results
        if errs:
            assert len(errs) == 1 and isinstance(errs[0], aq.InvalidArgumentError), results
            assert "in progress" in str(errs[0])
            conflicts += 1
        else:
            assert sorted(oks) == [0, 3 * unit], results
        s = m.stats()
        assert s["tiers"][0]["capacity"] == 0 and s["reclaims"] == round_ + 1
        for h, t, ref in zip(hs, ts, refs):
            assert h.tier == "host"
            assert m.fetch(h) is t and torch.equal(t, ref)
        del ts, refs, hs
        m.lend(peer, 3 * unit)
    assert conflicts >= 1
    check_drained(m)


@emulation_only("needs three devices (two peer tiers): AQUA_EMULATED_DEVICES=3 in a child "
                "process; a CUDA machine has the GPUs it has")
def test_reclaims_of_two_devices_may_run_together():
    """Three emulated devices: two peer tiers, each reclaimed by its own thread at once."""
    out = run_emulated(3, """
        import threading
        budget = {"emu:1": 16 << 20, "emu:2": 16 << 20}
        m = aq.OffloadManager("cpu", peers="auto", peer_bytes=budget, host_bytes=64 << 20)
        ts = [rand(4 << 20) for _ in range(8)]
        refs = [t.clone() for t in ts]
        hs = [m.offload(t) for t in ts]
        res = {}
        def rec(d):
            res[d] = m.reclaim(d)
        th = [threading.Thread(target=rec, args=(d,)) for d in ("emu:1", "emu:2")]
        [x.start() for x in th]; [x.join(60) for x in th]
        assert res == {"emu:1": 16 << 20, "emu:2": 16 << 20}, res
        assert all(h.location == "cpu" for h in hs)
        assert all(m.fetch(h) is t and torch.equal(t, r) for h, t, r in zip(hs, ts, refs))
        result["ok"] = True
    """)
    assert out == {"ok": True}

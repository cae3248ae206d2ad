"""Tier cascade: placement (the fastest tier with room, peer then host), eviction down the
cascade when a tier is full, the eviction policies (lru, fifo, largest) and priorities.

Runs on every backend (``managers`` is built on ``backend``): emulation (peer "emu:1") and CUDA
(peer ``cuda:1``, or ``cuda:0`` itself on one GPU); the host tier is "cpu" on both. Every
fetched tensor is compared bitwise with what was offloaded (random non-zero bytes), and the pool
accounting is checked against the handles' own view of where they live (helpers.py).
"""

from __future__ import annotations

import pytest
import torch

import aqua_offload as aq
from helpers import (A, HOST, K, PEER, SLOT, check_accounting, check_drained, emulation_only,
                     locations, rand_tensor, run_emulated, same, storage_bits, victims_of)


# -- placement ------------------------------------------------------------------------------
@pytest.mark.parametrize("release", [False, True])
def test_cascade_places_on_peer_then_evicts_down(backend, managers, release):
    m = managers()
    peer = backend.peer_label
    gen = torch.Generator().manual_seed(1)
    ts = [rand_tensor(SLOT, gen=gen, device=backend.device) for _ in range(6)]
    refs = [t.clone() for t in ts]
    hs = [m.offload(t, release=release) for t in ts[:4]]
    assert [h.tier for h in hs] == ["peer"] * 4
    assert [h.location for h in hs] == [peer] * 4
    s = m.stats()
    assert s["evictions"] == 0 and s["migrations"] == 0 and s["bytes_migrated"] == 0
    check_accounting(m, hs)

    # the peer is full: the oldest handle moves down and the new one goes on the peer
    hs.append(m.offload(ts[4], release=release))
    assert hs[4].tier == "peer" and hs[4].location == peer
    assert hs[0].tier == "host" and hs[0].location == "cpu"  # live: it migrated
    assert [h.tier for h in hs[1:]] == ["peer"] * 4
    s = m.stats()
    assert s["evictions"] == 1 and s["migrations"] == 1 and s["bytes_migrated"] == SLOT
    assert s["migration_failures"] == 0
    check_accounting(m, hs)

    hs.append(m.offload(ts[5], release=release))
    assert [h.tier for h in hs] == ["host", "host", "peer", "peer", "peer", "peer"]
    assert m.stats()["evictions"] == 2
    check_accounting(m, hs)

    for h, t, ref in zip(hs, ts, refs):
        out = m.fetch(h)
        if release:
            assert out is t
        assert same(out, ref)
    check_drained(m)


def test_offload_larger_than_the_peer_goes_to_host_without_eviction(backend, managers):
    m = managers()
    dev = backend.device
    small = [m.offload(rand_tensor(SLOT, device=dev), release=False) for _ in range(2)]
    big = rand_tensor(PEER + A, device=dev)
    h = m.offload(big, release=False)
    assert h.tier == "host"
    assert [x.tier for x in small] == ["peer", "peer"]
    assert m.stats()["evictions"] == 0
    assert same(m.fetch(h), big)
    for x in small:
        x.free()
    check_drained(m)


@pytest.mark.parametrize("release", [False, True])
def test_cascade_oom_when_both_tiers_are_full_leaves_tensor_untouched(backend, managers,
                                                                       release):
    m = managers(peer=2 * SLOT, host=2 * SLOT)
    gen = torch.Generator().manual_seed(2)
    ts = [rand_tensor(SLOT, gen=gen, device=backend.device) for _ in range(4)]
    hs = [m.offload(t, release=False) for t in ts]
    assert sorted(h.tier for h in hs) == ["host", "host", "peer", "peer"]
    extra = rand_tensor(SLOT, gen=gen, device=backend.device)
    ref = storage_bits(extra)
    before = m.stats()
    with pytest.raises(aq.OutOfMemoryError) as info:
        m.offload(extra, release=release)
    assert info.value.requested == SLOT
    assert isinstance(info.value, MemoryError)
    assert not aq.is_offloaded(extra)
    assert torch.equal(storage_bits(extra), ref)
    after = m.stats()
    for k in ("offloads", "bytes_offloaded", "live_handles", "migrations", "evictions"):
        assert after[k] == before[k], k
    check_accounting(m, hs)
    for h, t in zip(hs, ts):
        assert same(m.fetch(h), t)
    check_drained(m)


@emulation_only("needs three devices (two peer tiers): AQUA_EMULATED_DEVICES=3 in a child "
                "process; a CUDA machine has the GPUs it has")
def test_cascade_over_two_peers():
    out = run_emulated(3, """
        m = aq.OffloadManager("cpu", peers="auto", peer_bytes={"emu:1": 8192, "emu:2": 8192},
                              host_bytes=65536)
        tiers = m.stats()["tiers"]
        result["tiers"] = [(t["tier"], t["location"]) for t in tiers]
        ts = [rand(4096) for _ in range(7)]
        hs = []
        result["where"] = []
        for t in ts:
            hs.append(m.offload(t, release=False))
            result["where"].append([h.location for h in hs])
        # reclaiming emu:1 moves its handles to the next tier with room (emu:2 is full: host)
        result["reclaim"] = m.reclaim("emu:1")
        result["after"] = [h.location for h in hs]
        for bad in ("emu:0", "emu:3"):
            try:
                m.reclaim(bad)
                result[bad] = "no error"
            except aq.InvalidArgumentError:
                result[bad] = "InvalidArgumentError"
        result["lend"] = m.lend("emu:2", 8192)
        result["bitwise"] = all(torch.equal(m.fetch(h), t) for h, t in zip(hs, ts))
        m.synchronize()
        result["used"] = [t["used"] for t in m.stats()["tiers"]]
    """)
    assert out["tiers"] == [["peer", "emu:1"], ["peer", "emu:2"], ["host", "cpu"]]
    where = out["where"]
    assert where[1] == ["emu:1", "emu:1"]
    # emu:1 full: the oldest moves to emu:2
    assert where[2] == ["emu:2", "emu:1", "emu:1"]
    assert where[3] == ["emu:2", "emu:2", "emu:1", "emu:1"]
    # emu:2 full too: victims of emu:1 go straight to the host
    assert where[4] == ["emu:2", "emu:2", "cpu", "emu:1", "emu:1"]
    assert out["reclaim"] == 8192
    assert out["after"][:5] == ["emu:2", "emu:2", "cpu", "cpu", "cpu"]
    assert "emu:1" not in out["after"]
    assert out["emu:0"] == out["emu:3"] == "InvalidArgumentError"
    assert out["lend"] == 16384
    assert out["bitwise"] is True
    assert out["used"] == [0, 0, 0]


# -- eviction policies ----------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_recency_policies(backend, managers, policy):
    """lru: least recently offloaded *or prefetched* leaves first; fifo ignores later use."""
    m = managers(policy=policy)
    assert m.stats()["policy"] == policy
    gen = torch.Generator().manual_seed(3)
    ts = [rand_tensor(SLOT, gen=gen, device=backend.device) for _ in range(8)]
    hs = [m.offload(t, release=False) for t in ts[:4]]
    # use h0 again: a prefetch (then a kept fetch, so it is no longer a prefetch in flight)
    m.prefetch(hs[0])
    assert same(m.fetch(hs[0], keep=True), ts[0])
    assert hs[0].state == "offloaded"
    order = []
    for t in ts[4:]:
        before = locations(hs)
        hs.append(m.offload(t, release=False))
        moved = victims_of(before, hs[:-1])
        assert len(moved) == 1, moved
        assert moved[0].location == "cpu" and hs[-1].location == backend.peer_label
        order.append(hs.index(moved[0]))
    assert order == ([1, 2, 3, 0] if policy == "lru" else [0, 1, 2, 3])
    check_accounting(m, hs)
    for h, t in zip(hs, ts):
        assert same(m.fetch(h), t)
    check_drained(m)


def test_lru_ignores_plain_fetch_keep(backend, managers):
    """Only offloads and prefetches count as use (documented); a kept fetch is not one."""
    m = managers(policy="lru")
    dev = backend.device
    hs = [m.offload(rand_tensor(SLOT, device=dev), release=False) for _ in range(4)]
    m.fetch(hs[0], keep=True)
    before = locations(hs)
    hs.append(m.offload(rand_tensor(SLOT, device=dev), release=False))
    assert victims_of(before, hs[:-1]) == [hs[0]]


def test_largest_policy_is_size_aware(backend, managers):
    m = managers(policy="largest")
    gen = torch.Generator().manual_seed(4)
    sizes = {"a": 2 * K, "b": 6 * K, "c": 4 * K, "d": 4 * K}
    data = {k: rand_tensor(n, gen=gen, device=backend.device) for k, n in sizes.items()}
    hs = {k: m.offload(t, release=False) for k, t in data.items()}
    order = []

    def put(name: str, nbytes: int) -> None:
        data[name] = rand_tensor(nbytes, gen=gen, device=backend.device)
        before = locations(hs.values())
        hs[name] = m.offload(data[name], release=False)
        assert hs[name].location == backend.peer_label
        order.extend(k for k, h in hs.items() if k != name and before[id(h)] != h.location)

    put("e", 1 * K)   # evicts b, the largest
    put("f", 5 * K)   # fits in what b left
    put("g", 1 * K)   # evicts f: newest, but largest
    put("h", 4 * K)   # fits
    put("i", 1 * K)   # c, d, h are the largest (4 KiB): the oldest, c, goes
    assert order == ["b", "f", "c"]
    assert m.stats()["evictions"] == 3
    check_accounting(m, list(hs.values()))
    for k, h in hs.items():
        assert same(m.fetch(h), data[k])
    check_drained(m)


def test_prefetched_handles_are_not_victims(backend, managers):
    m = managers()
    gen = torch.Generator().manual_seed(6)
    ts = [rand_tensor(SLOT, gen=gen, device=backend.device) for _ in range(5)]
    hs = [m.offload(t, release=False) for t in ts[:4]]
    m.prefetch(hs[0])  # the oldest, but a prefetch of it is in flight
    before = locations(hs)
    hs.append(m.offload(ts[4], release=False))
    assert victims_of(before, hs[:4]) == [hs[1]]
    for h, t in zip(hs, ts):
        assert same(m.fetch(h), t)
    check_drained(m)


@pytest.mark.parametrize("policy", ["lru", "fifo", "largest", "LRU", "mru", "", None, 3])
def test_policy_names(backend, policy):
    if policy in ("lru", "fifo", "largest"):
        m = backend.manager(peer_bytes=PEER, host_bytes=HOST, policy=policy)
        assert m.policy == policy and m.stats()["policy"] == policy
        return
    with pytest.raises(aq.InvalidArgumentError):
        backend.manager(peer_bytes=PEER, host_bytes=HOST, policy=policy)


# -- priorities -----------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["lru", "fifo", "largest"])
def test_priority_overrides_policy(backend, managers, policy):
    m = managers(policy=policy)
    gen = torch.Generator().manual_seed(5)
    prios = [5, -1.5, 0, 2]
    ts = [rand_tensor(SLOT, gen=gen, device=backend.device) for _ in range(8)]
    hs = [m.offload(t, release=False, priority=p) for t, p in zip(ts, prios)]
    assert [h.priority for h in hs] == prios
    order = []
    for t in ts[4:]:
        before = locations(hs)
        hs.append(m.offload(t, release=False, priority=10))
        moved = victims_of(before, hs[:-1])
        assert len(moved) == 1
        order.append(hs.index(moved[0]))
    assert order == [1, 2, 3, 0]
    for h, t in zip(hs, ts):
        assert same(m.fetch(h), t)
    check_drained(m)


def test_priority_beats_size_for_largest(backend, managers):
    m = managers(policy="largest")
    dev = backend.device
    small_low = m.offload(rand_tensor(2 * K, device=dev), release=False, priority=-1)
    big_high = m.offload(rand_tensor(14 * K, device=dev), release=False, priority=1)
    before = locations([small_low, big_high])
    h = m.offload(rand_tensor(2 * K, device=dev), release=False, priority=1)
    assert victims_of(before, [small_low, big_high]) == [small_low]
    assert h.tier == "peer" and big_high.tier == "peer"


@pytest.mark.parametrize("bad", ["high", None, True, False, float("nan"), [1], 1j])
def test_bad_priority_changes_nothing(backend, managers, bad):
    m = managers()
    t = rand_tensor(SLOT, device=backend.device)
    ref = t.clone()
    before = m.stats()
    with pytest.raises(aq.InvalidArgumentError):
        m.offload(t, priority=bad)
    with pytest.raises(aq.InvalidArgumentError):
        m.offload(t, release=False, priority=bad)
    with pytest.raises(aq.InvalidArgumentError):
        m.offload_many([t], priority=bad)
    assert not aq.is_offloaded(t) and same(t, ref)
    assert m.stats() == before


@pytest.mark.parametrize("prio", [0, -3, 7, 1e300, float("inf"), float("-inf")])
def test_numeric_priorities_are_accepted(backend, managers, prio):
    m = managers()
    t = rand_tensor(SLOT, device=backend.device)
    h = m.offload(t, release=False, priority=prio)
    assert h.priority == float(prio)
    assert same(m.fetch(h), t)

"""Tier cascade, eviction policies, prefetch, incremental offload, batches and elastic lending
(emulation backend: device "cpu", peer "emu:1", host "cpu").

Every fetched tensor is compared bitwise with what was offloaded (random non-zero bytes), and
the pool accounting is checked against the handles' own view of where they live (``h.location``
is live: it follows migrations): per tier, ``used`` is the sum of the 256-aligned blocks of the
handles living there.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import aqua_offload as aq
from aqua_offload import _core

K = 1 << 10
M = 1 << 20
A = 256
SLOT = 4 * K
PEER = 4 * SLOT
HOST = 16 * SLOT
JOIN_TIMEOUT_S = 60.0


# -- helpers --------------------------------------------------------------------------------
def align(n: int) -> int:
    return (n + A - 1) // A * A


def rand_u8(n: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random bytes, none of them zero."""
    return torch.randint(1, 256, (n,), dtype=torch.uint8, generator=gen)


def rand_tensor(nbytes: int, dtype: torch.dtype = torch.float32,
                gen: torch.Generator | None = None) -> torch.Tensor:
    """Random non-zero bytes reinterpreted as ``dtype`` (floats may be NaN: compare bits)."""
    return rand_u8(nbytes, gen).view(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The logical bytes of ``t`` as a fresh uint8 tensor."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t).reshape(-1).view(torch.uint8)


def storage_bits(t: torch.Tensor) -> torch.Tensor:
    s = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(s, 0, (s.nbytes(),), (1,)).clone()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def tier_of(m: aq.OffloadManager, location: str) -> dict:
    return next(t for t in m.stats()["tiers"] if t["location"] == location)


def check_accounting(m: aq.OffloadManager, handles, blocks: dict | None = None) -> None:
    """Per tier: used == sum of the 256-aligned blocks of the live handles living there
    (``blocks`` overrides the block size of some handles, e.g. one with headroom)."""
    blocks = blocks or {}
    s = m.stats()
    live = [h for h in handles if h.state not in ("fetched", "freed")]
    assert s["live_handles"] == len(live)
    for t in s["tiers"]:
        here = [h for h in live if h.location == t["location"]]
        want = sum(blocks.get(id(h), align(h.nbytes)) for h in here)
        assert t["used"] == want, (t, [(h.nbytes, h.location) for h in here])
        assert t["used"] + t["free"] == t["capacity"], t
        assert t["handles"] == len(here), t
        assert t["blocks"] == sum(1 for h in here if h.nbytes > 0), t
        assert t["largest_free"] <= t["free"]


def check_drained(m: aq.OffloadManager) -> dict:
    """Everything freed or fetched: no byte used on any tier, each segment one free range."""
    m.synchronize()
    s = m.stats()
    assert s["live_handles"] == 0
    assert s["prefetched_bytes"] == 0
    for t in s["tiers"]:
        assert t["used"] == 0, t
        assert t["blocks"] == 0 and t["handles"] == 0, t
        assert t["free"] == t["capacity"], t
        assert t["free_ranges"] == t["segments"], t
    return s


@pytest.fixture
def managers():
    """Factory of emulation managers, all closed at teardown."""
    made: list[aq.OffloadManager] = []

    def make(peer=PEER, host=HOST, policy="lru", peers="auto", **kw) -> aq.OffloadManager:
        m = aq.OffloadManager("cpu", peers=peers, peer_bytes=peer, host_bytes=host,
                              policy=policy, **kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


@pytest.fixture
def faults():
    """Fault injection into the emulation backend's copy submissions, always reset."""
    try:
        yield _core.inject_copy_faults
    finally:
        _core.inject_copy_faults(0)


def victims_of(before: dict, handles) -> list:
    """Handles whose location changed since ``before`` (id -> location)."""
    return [h for h in handles if before[id(h)] != h.location]


def locations(handles) -> dict:
    return {id(h): h.location for h in handles}


# -- cascade placement ----------------------------------------------------------------------
@pytest.mark.parametrize("release", [False, True])
def test_cascade_places_on_peer_then_evicts_down(managers, release):
    m = managers()
    gen = torch.Generator().manual_seed(1)
    ts = [rand_tensor(SLOT, gen=gen) for _ in range(6)]
    refs = [t.clone() for t in ts]
    hs = [m.offload(t, release=release) for t in ts[:4]]
    assert [h.tier for h in hs] == ["peer"] * 4
    assert [h.location for h in hs] == ["emu:1"] * 4
    s = m.stats()
    assert s["evictions"] == 0 and s["migrations"] == 0 and s["bytes_migrated"] == 0
    check_accounting(m, hs)

    # the peer is full: the oldest handle moves down and the new one goes on the peer
    hs.append(m.offload(ts[4], release=release))
    assert hs[4].tier == "peer" and hs[4].location == "emu:1"
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


def test_offload_larger_than_the_peer_goes_to_host_without_eviction(managers):
    m = managers()
    small = [m.offload(rand_tensor(SLOT), release=False) for _ in range(2)]
    big = rand_tensor(PEER + A)
    h = m.offload(big, release=False)
    assert h.tier == "host"
    assert [x.tier for x in small] == ["peer", "peer"]
    assert m.stats()["evictions"] == 0
    assert same(m.fetch(h), big)
    for x in small:
        x.free()
    check_drained(m)


@pytest.mark.parametrize("release", [False, True])
def test_cascade_oom_when_both_tiers_are_full_leaves_tensor_untouched(managers, release):
    m = managers(peer=2 * SLOT, host=2 * SLOT)
    gen = torch.Generator().manual_seed(2)
    ts = [rand_tensor(SLOT, gen=gen) for _ in range(4)]
    hs = [m.offload(t, release=False) for t in ts]
    assert sorted(h.tier for h in hs) == ["host", "host", "peer", "peer"]
    extra = rand_tensor(SLOT, gen=gen)
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


# -- eviction policies ----------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["lru", "fifo"])
def test_recency_policies(managers, policy):
    """lru: least recently offloaded *or prefetched* leaves first; fifo ignores later use."""
    m = managers(policy=policy)
    assert m.stats()["policy"] == policy
    gen = torch.Generator().manual_seed(3)
    ts = [rand_tensor(SLOT, gen=gen) for _ in range(8)]
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
        assert moved[0].location == "cpu" and hs[-1].location == "emu:1"
        order.append(hs.index(moved[0]))
    assert order == ([1, 2, 3, 0] if policy == "lru" else [0, 1, 2, 3])
    check_accounting(m, hs)
    for h, t in zip(hs, ts):
        assert same(m.fetch(h), t)
    check_drained(m)


def test_lru_ignores_plain_fetch_keep(managers):
    """Only offloads and prefetches count as use (documented); a kept fetch is not one."""
    m = managers(policy="lru")
    hs = [m.offload(rand_tensor(SLOT), release=False) for _ in range(4)]
    m.fetch(hs[0], keep=True)
    before = locations(hs)
    hs.append(m.offload(rand_tensor(SLOT), release=False))
    assert victims_of(before, hs[:-1]) == [hs[0]]


def test_largest_policy_is_size_aware(managers):
    m = managers(policy="largest")
    gen = torch.Generator().manual_seed(4)
    sizes = {"a": 2 * K, "b": 6 * K, "c": 4 * K, "d": 4 * K}
    data = {k: rand_tensor(n, gen=gen) for k, n in sizes.items()}
    hs = {k: m.offload(t, release=False) for k, t in data.items()}
    order = []

    def put(name: str, nbytes: int) -> None:
        data[name] = rand_tensor(nbytes, gen=gen)
        before = locations(hs.values())
        hs[name] = m.offload(data[name], release=False)
        assert hs[name].location == "emu:1"
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


@pytest.mark.parametrize("policy", ["lru", "fifo", "largest"])
def test_priority_overrides_policy(managers, policy):
    m = managers(policy=policy)
    gen = torch.Generator().manual_seed(5)
    prios = [5, -1.5, 0, 2]
    ts = [rand_tensor(SLOT, gen=gen) for _ in range(8)]
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


def test_priority_beats_size_for_largest(managers):
    m = managers(policy="largest")
    small_low = m.offload(rand_tensor(2 * K), release=False, priority=-1)
    big_high = m.offload(rand_tensor(14 * K), release=False, priority=1)
    before = locations([small_low, big_high])
    h = m.offload(rand_tensor(2 * K), release=False, priority=1)
    assert victims_of(before, [small_low, big_high]) == [small_low]
    assert h.tier == "peer" and big_high.tier == "peer"


def test_prefetched_handles_are_not_victims(managers):
    m = managers()
    gen = torch.Generator().manual_seed(6)
    ts = [rand_tensor(SLOT, gen=gen) for _ in range(5)]
    hs = [m.offload(t, release=False) for t in ts[:4]]
    m.prefetch(hs[0])  # the oldest, but a prefetch of it is in flight
    before = locations(hs)
    hs.append(m.offload(ts[4], release=False))
    assert victims_of(before, hs[:4]) == [hs[1]]
    for h, t in zip(hs, ts):
        assert same(m.fetch(h), t)
    check_drained(m)


@pytest.mark.parametrize("policy", ["lru", "fifo", "largest", "LRU", "mru", "", None, 3])
def test_policy_names(policy):
    if policy in ("lru", "fifo", "largest"):
        with aq.OffloadManager("cpu", peer_bytes=PEER, host_bytes=HOST, policy=policy) as m:
            assert m.policy == policy and m.stats()["policy"] == policy
        return
    with pytest.raises(aq.InvalidArgumentError):
        aq.OffloadManager("cpu", peer_bytes=PEER, host_bytes=HOST, policy=policy)


@pytest.mark.parametrize("bad", ["high", None, True, False, float("nan"), [1], 1j])
def test_bad_priority_changes_nothing(managers, bad):
    m = managers()
    t = rand_tensor(SLOT)
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
def test_numeric_priorities_are_accepted(managers, prio):
    m = managers()
    t = rand_tensor(SLOT)
    h = m.offload(t, release=False, priority=prio)
    assert h.priority == float(prio)
    assert same(m.fetch(h), t)


# -- fetch at any moment --------------------------------------------------------------------
@pytest.mark.parametrize("how", ["fetch", "fetch_many", "prefetch"])
@pytest.mark.parametrize("release", [False, True])
def test_fetch_mid_migration_gets_the_right_bytes(managers, release, how):
    """Big releases return at once with their copies running; the next offload evicts the
    oldest while its offload copy may still run, and it is fetched at once."""
    chunk = 4 * M
    m = managers(peer=4 * chunk, host=8 * chunk, chunk_bytes=M)  # chunked copies as on CUDA
    gen = torch.Generator().manual_seed(7)
    ts = [rand_tensor(chunk, gen=gen) for _ in range(6)]
    refs = [t.clone() for t in ts]
    hs = [m.offload(t, release=release) for t in ts[:4]]
    for i in (4, 5):
        hs.append(m.offload(ts[i], release=release))
        victim = hs[i - 4]
        assert victim.tier == "host"  # the migration was just enqueued
        if how == "fetch":
            out = m.fetch(victim)
        elif how == "fetch_many":
            out = m.fetch_many([victim])[0]
        else:
            m.prefetch(victim)
            out = m.fetch(victim)
        if release:
            assert out is ts[i - 4]
        assert same(out, refs[i - 4])
    for h, ref in zip(hs[2:], refs[2:]):
        assert same(m.fetch(h), ref)
    check_drained(m)


def test_fetch_while_a_reclaim_moves_it(managers):
    """A fetch racing a reclaim (another thread) always gets the right bytes."""
    m = managers(peer=32 * M, host=64 * M)
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        ts = [rand_tensor(4 * M, gen=gen) for _ in range(6)]
        refs = [t.clone() for t in ts]
        hs = [m.offload(t) for t in ts]  # releases: copies still running
        got: list = []
        th = threading.Thread(target=lambda: got.append(m.reclaim("emu:1")), daemon=True)
        th.start()
        for h, t, ref in zip(hs, ts, refs):
            assert m.fetch(h) is t and same(t, ref)
        th.join(JOIN_TIMEOUT_S)
        assert not th.is_alive()
        assert got == [32 * M]
        assert m.stats()["tiers"][0]["capacity"] == 0
        m.lend("emu:1", 32 * M)
    check_drained(m)


# -- fault injection ------------------------------------------------------------------------
@pytest.mark.parametrize("release", [False, True])
def test_failed_migration_leaves_victim_valid_on_its_old_tier(managers, faults, release):
    m = managers()
    gen = torch.Generator().manual_seed(9)
    ts = [rand_tensor(SLOT, gen=gen) for _ in range(6)]
    refs = [t.clone() for t in ts]
    hs = [m.offload(t, release=release) for t in ts[:4]]
    m.synchronize()
    before = m.stats()
    faults(1)  # the victim's migration is the next copy submitted
    hs.append(m.offload(ts[4], release=release))
    faults(0)
    after = m.stats()
    assert after["migration_failures"] == before["migration_failures"] + 1
    assert after["migrations"] == before["migrations"]
    assert after["evictions"] == before["evictions"]
    assert after["bytes_migrated"] == before["bytes_migrated"]
    assert [h.location for h in hs[:4]] == ["emu:1"] * 4  # nobody moved
    assert hs[4].location == "cpu"  # the new one went down the cascade instead
    for h in hs[:4]:
        assert h.state in ("in_flight", "offloaded")
    check_accounting(m, hs)
    # the cascade works again once the fault is gone
    hs.append(m.offload(ts[5], release=release))
    assert hs[5].location == "emu:1" and hs[0].location == "cpu"
    assert m.stats()["migrations"] == before["migrations"] + 1
    check_accounting(m, hs)
    for h, t, ref in zip(hs, ts, refs):
        out = m.fetch(h)
        assert same(out, ref)
        if release:
            assert out is t
    check_drained(m)


def test_failed_offload_copy_is_a_backend_error_and_changes_nothing(managers, faults):
    m = managers()
    t = rand_tensor(SLOT)
    ref = t.clone()
    before = m.stats()
    faults(1)
    with pytest.raises(aq.BackendError) as info:
        m.offload(t)
    assert info.value.error_name == "emulationInjectedFault"
    assert not aq.is_offloaded(t) and same(t, ref)
    after = m.stats()
    for k in ("offloads", "bytes_offloaded", "live_handles"):
        assert after[k] == before[k]
    check_drained(m)


def test_failed_reclaim_migration_leaves_everything_in_place(managers, faults):
    m = managers()
    gen = torch.Generator().manual_seed(10)
    ts = [rand_tensor(SLOT, gen=gen) for _ in range(2)]
    hs = [m.offload(t, release=False) for t in ts]
    before = m.stats()
    faults(1)
    with pytest.raises(aq.OffloadError):
        m.reclaim("emu:1")
    faults(0)
    after = m.stats()
    assert after["tiers"][0]["capacity"] == PEER
    assert after["reclaims"] == before["reclaims"] and after["bytes_reclaimed"] == 0
    assert after["migration_failures"] == before["migration_failures"] + 1
    assert [h.location for h in hs] == ["emu:1", "emu:1"]
    check_accounting(m, hs)
    assert m.reclaim("emu:1") == PEER  # and it works once the fault is gone
    assert [h.location for h in hs] == ["cpu", "cpu"]
    for h, t in zip(hs, ts):
        assert same(m.fetch(h), t)
    check_drained(m)


def test_reclaim_migration_fault_is_reported_as_backend_error(managers, faults):
    m = managers()
    hs = [m.offload(rand_tensor(SLOT), release=False) for _ in range(2)]
    faults(1)
    with pytest.raises(aq.BackendError):
        m.reclaim("emu:1")


# -- prefetch -------------------------------------------------------------------------------
@pytest.mark.parametrize("release", [False, True])
def test_prefetch_then_fetch_copies_once(managers, release):
    m = managers()
    t = rand_tensor(3 * K + 100, torch.uint8)
    ref = t.clone()
    h = m.offload(t, release=release)
    n = h.nbytes
    before = m.stats()
    assert m.prefetch(h) is h
    s = m.stats()
    assert s["prefetches"] == before["prefetches"] + 1
    assert s["bytes_fetched"] == before["bytes_fetched"] + n
    assert s["prefetched_bytes"] == n
    assert s["fetches"] == before["fetches"]
    m.prefetch(h)  # a second prefetch of the same handle is a no-op
    s = m.stats()
    assert s["prefetches"] == before["prefetches"] + 1 and s["prefetched_bytes"] == n
    assert s["bytes_fetched"] == before["bytes_fetched"] + n
    out = m.fetch(h)
    if release:
        assert out is t
    assert same(out, ref)
    s = m.stats()
    assert s["fetches"] == before["fetches"] + 1
    assert s["bytes_fetched"] == before["bytes_fetched"] + n  # counted once
    assert s["prefetched_bytes"] == 0
    check_drained(m)


@pytest.mark.parametrize("release", [False, True])
def test_free_of_a_prefetched_handle_releases_everything(managers, release):
    m = managers()
    t = rand_tensor(SLOT)
    h = m.offload(t, release=release)
    m.prefetch(h)
    assert m.stats()["prefetched_bytes"] == SLOT
    m.free(h)
    assert h.state == "freed"
    assert m.stats()["frees"] == 1
    check_drained(m)


def test_prefetch_many_then_fetch_many(managers):
    m = managers()
    gen = torch.Generator().manual_seed(11)
    ts = [rand_tensor(SLOT, gen=gen) for _ in range(8)]  # half on the peer, half on the host
    refs = [t.clone() for t in ts]
    hs = [m.offload(t, release=i % 2 == 0) for i, t in enumerate(ts)]
    for h in hs[::2]:
        m.prefetch(h)
    assert m.stats()["prefetched_bytes"] == 4 * SLOT
    outs = m.fetch_many(hs)
    for h, t, out, ref in zip(hs, ts, outs, refs):
        if h.release:
            assert out is t
        assert same(out, ref)
    s = m.stats()
    assert s["prefetches"] == 4 and s["fetches"] == 8 and s["bytes_fetched"] == 8 * SLOT
    check_drained(m)


def test_prefetch_of_an_evicted_handle_and_reclaim_of_a_prefetched_one(managers):
    m = managers()
    gen = torch.Generator().manual_seed(12)
    ts = [rand_tensor(SLOT, gen=gen) for _ in range(5)]
    hs = [m.offload(t, release=False) for t in ts]
    assert hs[0].tier == "host"
    m.prefetch(hs[0])
    m.prefetch(hs[3])  # on the peer: reclaim moves it down while its prefetch is pending
    assert m.reclaim("emu:1") == PEER
    assert all(h.tier == "host" for h in hs)
    assert m.stats()["prefetched_bytes"] == 2 * SLOT
    for h, t in zip(hs, ts):
        assert same(m.fetch(h), t)
    check_drained(m)


def test_prefetched_bytes_with_kept_fetch(managers):
    m = managers()
    t = rand_tensor(SLOT)
    h = m.offload(t, release=False)
    m.prefetch(h)
    assert same(m.fetch(h, keep=True), t)
    assert m.stats()["prefetched_bytes"] == 0
    assert h.state == "offloaded"
    assert same(m.fetch(h), t)
    check_drained(m)


def test_dropped_prefetched_snapshot_is_safe_and_returns_its_block():
    """Regression: dropping the last reference to a snapshot handle with a prefetch in flight
    once freed the prefetch buffer while the emulation worker still copied into it (heap
    corruption, abort), and leaked the handle's block and prefetched_bytes. In a subprocess, so
    that a regression cannot take the test run down with it."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import gc, torch, aqua_offload as aq
        m = aq.OffloadManager("cpu", peers="auto", peer_bytes="64MiB", host_bytes="64MiB")
        for i in range(20):
            h = m.offload(torch.randint(1, 256, (4 << 20,), dtype=torch.uint8), release=False)
            m.prefetch(h)
            del h
            gc.collect()
            junk = [torch.empty(1 << 20, dtype=torch.uint8) for _ in range(8)]
        m.synchronize()
        s = m.stats()
        print(s["live_handles"], s["prefetched_bytes"], s["tiers"][0]["used"])
    """)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["0", "0", "0"]


# -- keep and incremental offload -----------------------------------------------------------
def test_fetch_keep_of_a_snapshot(managers):
    m = managers()
    t = rand_tensor(SLOT)
    h = m.offload(t, release=False)
    for i in range(3):
        out = m.fetch(h, keep=True)
        assert same(out, t)
        assert h.state == "offloaded"
        s = m.stats()
        assert s["live_handles"] == 1 and s["fetches"] == i + 1
        assert s["bytes_fetched"] == (i + 1) * SLOT
        assert s["tiers"][0]["used"] == SLOT
    given = torch.empty_like(t)
    assert m.fetch(h, out=given, keep=True) is given and same(given, t)
    assert same(m.fetch(h), t)
    assert h.state == "fetched"
    with pytest.raises(aq.InvalidHandleError):
        m.fetch(h, keep=True)
    check_drained(m)


def test_fetch_keep_of_a_release(managers):
    m = managers()
    t = rand_tensor(SLOT)
    view = t[1::3]
    ref = t.clone()
    h = m.offload(view)
    assert aq.is_offloaded(t)
    out = m.fetch(h, keep=True)
    assert out is view
    assert not aq.is_offloaded(t) and same(t, ref)
    assert h.state == "offloaded" and "kept" in repr(h)
    assert m.stats()["live_handles"] == 1
    for call in (lambda: m.fetch(h), lambda: m.fetch(h, keep=True), lambda: m.prefetch(h),
                 lambda: m.fetch_many([h])):
        with pytest.raises(aq.InvalidHandleError):
            call()
    with pytest.raises(aq.InvalidHandleError):
        m.fetch(t)  # the tensor is resident again: no handle owns it
    # the tensor can be offloaded again while the kept copy lives
    h2 = m.offload(t)
    assert same(m.fetch(h2), ref)
    m.free(h)  # freeing the kept copy leaves the restored tensor alone
    assert h.state == "freed" and same(t, ref)
    check_drained(m)


def test_dropped_kept_release_returns_its_block(managers):
    """Regression: an unreachable kept copy of a release (no longer registered with its
    storage, so collectable) once leaked its block."""
    m = managers()
    t = rand_tensor(SLOT)
    ref = t.clone()
    h = m.offload(t)
    assert m.fetch(h, keep=True) is t
    del h
    gc.collect()
    m.synchronize()
    assert m.stats()["live_handles"] == 0 and m.stats()["tiers"][0]["used"] == 0
    assert not aq.is_offloaded(t) and same(t, ref)  # the restored tensor is left alone


@pytest.mark.parametrize("base_release", [False, True])
@pytest.mark.parametrize("release", [False, True])
def test_incremental_offload_copies_only_the_suffix(managers, base_release, release):
    m = managers()
    gen = torch.Generator().manual_seed(13)
    prefix = rand_u8(3000, gen)
    h = m.offload(prefix.clone() if base_release else prefix, release=base_release)
    out = m.fetch(h, keep=True)
    assert same(out, prefix)
    assert h.tier == "peer"
    before = m.stats()
    grown = torch.cat([prefix, rand_u8(72, gen)])  # 3072 B: fits the base's 3072-byte block
    ref = grown.clone()
    h2 = m.offload(grown, release=release, base=h)
    assert h.state == "freed"
    with pytest.raises(aq.InvalidHandleError):
        m.free(h)
    s = m.stats()
    assert s["incremental_offloads"] == before["incremental_offloads"] + 1
    assert s["incremental_bytes_saved"] == before["incremental_bytes_saved"] + 3000
    assert s["bytes_offloaded"] == before["bytes_offloaded"] + 72
    assert s["offloads"] == before["offloads"] + 1
    assert s["live_handles"] == 1
    assert h2.tier == "peer" and h2.nbytes == 3072
    assert s["tiers"][0]["used"] == 3072 and s["tiers"][0]["blocks"] == 1
    got = m.fetch(h2)
    if release:
        assert got is grown
    assert same(got, ref)
    check_drained(m)


def test_incremental_growth_path_and_append_chain(managers):
    """No room in the base's block: a full copy into a block with 2x headroom; later appends
    that fit the headroom copy only their suffix."""
    m = managers(peer=64 * K, host=64 * K)
    gen = torch.Generator().manual_seed(14)
    cache = rand_u8(SLOT, gen)
    h = m.offload(cache, release=False)
    assert m.stats()["tiers"][0]["used"] == SLOT
    expect_offloaded = SLOT
    steps = [(6000, False), (8000, True), (8192, True), (8193, False), (12000, True)]
    block = SLOT
    for n, in_place in steps:
        assert same(m.fetch(h, keep=True), cache)
        cache = torch.cat([cache, rand_u8(n - cache.numel(), gen)])
        before = m.stats()
        h2 = m.offload(cache, release=False, base=h)
        s = m.stats()
        assert h.state == "freed"
        assert (block >= n) == in_place
        if in_place:
            assert s["bytes_offloaded"] - before["bytes_offloaded"] == n - h.nbytes
            assert s["incremental_bytes_saved"] - before["incremental_bytes_saved"] == h.nbytes
        else:
            assert s["bytes_offloaded"] - before["bytes_offloaded"] == n
            assert s["incremental_bytes_saved"] == before["incremental_bytes_saved"]
            block = align(max(n, 2 * block))
        expect_offloaded += s["bytes_offloaded"] - before["bytes_offloaded"]
        assert s["incremental_offloads"] == before["incremental_offloads"] + 1
        assert s["tiers"][0]["used"] == block, (n, block)
        assert s["live_handles"] == 1
        h = h2
    assert m.stats()["bytes_offloaded"] == expect_offloaded
    assert same(m.fetch(h), cache)
    check_drained(m)


def test_incremental_growth_without_room_for_headroom_takes_the_exact_size(managers):
    m = managers(peers=None, host=11 * K)
    gen = torch.Generator().manual_seed(15)
    base = rand_u8(SLOT, gen)
    h = m.offload(base, release=False)
    m.fetch(h, keep=True)
    grown = torch.cat([base, rand_u8(K, gen)])  # 2x headroom (8 KiB) does not fit in 7 KiB
    h2 = m.offload(grown, release=False, base=h)
    s = m.stats()
    assert s["tiers"][0]["used"] == 5 * K
    assert same(m.fetch(h2), grown)
    check_drained(m)


def test_incremental_offload_of_a_migrated_base(managers):
    m = managers()
    gen = torch.Generator().manual_seed(16)
    base = rand_u8(3000, gen)
    h = m.offload(base, release=False)
    m.fetch(h, keep=True)
    others = [m.offload(rand_tensor(SLOT, gen=gen), release=False) for _ in range(5)]
    assert h.tier == "host"  # evicted while kept
    grown = torch.cat([base, rand_u8(50, gen)])
    before = m.stats()
    h2 = m.offload(grown, release=False, base=h)
    s = m.stats()
    # a migrated block has no slack beyond align(3000) = 3072: 3050 still fits
    assert h2.tier == "host"
    assert s["bytes_offloaded"] - before["bytes_offloaded"] == 50
    check_accounting(m, others + [h2])
    assert same(m.fetch(h2), grown)
    for o in others:
        o.free()
    check_drained(m)


def test_incremental_offload_bad_bases(managers):
    m = managers()
    gen = torch.Generator().manual_seed(17)
    data = rand_u8(SLOT, gen)
    kept = m.offload(data, release=False)
    m.fetch(kept, keep=True)
    before = m.stats()
    shorter = data[: SLOT - 1].clone()
    ref_short = shorter.clone()
    # base holding more bytes than the new tensor
    for release in (False, True):
        with pytest.raises(aq.InvalidArgumentError):
            m.offload(shorter, release=release, base=kept)
        assert not aq.is_offloaded(shorter) and torch.equal(shorter, ref_short)
    assert m.stats() == before
    assert kept.state == "offloaded"
    # a live release (not kept) is no base
    t = rand_u8(SLOT, gen)
    rel = m.offload(t)
    with pytest.raises(aq.InvalidArgumentError):
        m.offload(torch.cat([data, data]), release=False, base=rel)
    # a prefetched base is refused
    m.prefetch(kept)
    with pytest.raises(aq.InvalidArgumentError):
        m.offload(torch.cat([data, data]), release=False, base=kept)
    assert same(m.fetch(kept, keep=True), data)
    # a consumed base
    h2 = m.offload(torch.cat([data, data]), release=False, base=kept)
    with pytest.raises(aq.InvalidHandleError):
        m.offload(torch.cat([data, data, data]), release=False, base=kept)
    # a base of another manager
    other = managers()
    foreign = other.offload(data, release=False)
    with pytest.raises(aq.InvalidHandleError):
        m.offload(torch.cat([data, data]), release=False, base=foreign)
    assert same(other.fetch(foreign), data)
    # a base that is not a handle
    with pytest.raises((aq.InvalidArgumentError, aq.InvalidHandleError)):
        m.offload(torch.cat([data, data]), release=False, base="h")
    assert same(m.fetch(h2), torch.cat([data, data]))
    assert m.fetch(rel) is t
    check_drained(m)


# -- batches --------------------------------------------------------------------------------
@pytest.mark.parametrize("release", [False, True])
def test_offload_many_64_by_64k(managers, release):
    m = managers(peer=4 * M, host=8 * M)
    gen = torch.Generator().manual_seed(18)
    ts = [rand_tensor(64 * K, gen=gen) for _ in range(64)]
    refs = [t.clone() for t in ts]
    hs = m.offload_many(ts, release=release)
    assert len(hs) == 64 and all(h.release == release for h in hs)
    assert [h.tier for h in hs] == ["peer"] * 64
    s = m.stats()
    assert s["offloads"] == 64 and s["bytes_offloaded"] == 4 * M
    assert s["tiers"][0]["used"] == 4 * M
    if release:
        assert all(aq.is_offloaded(t) for t in ts)
    outs = m.fetch_many(hs)
    for out, t, ref in zip(outs, ts, refs):
        if release:
            assert out is t
        assert same(out, ref)
    s = m.stats()
    assert s["fetches"] == 64 and s["bytes_fetched"] == 4 * M
    check_drained(m)


def test_offload_many_spills_over_to_the_host_and_evicts_older_handles(managers):
    m = managers(peer=2 * M, host=8 * M)
    gen = torch.Generator().manual_seed(19)
    old = [rand_tensor(64 * K, gen=gen) for _ in range(4)]
    hold = [m.offload(t, release=False) for t in old]
    ts = [rand_tensor(64 * K, gen=gen) for _ in range(64)]
    hs = m.offload_many(ts, release=False)
    # the older handles made room first; a batch never evicts its own members
    assert [h.tier for h in hold] == ["host"] * 4
    assert [h.tier for h in hs] == ["peer"] * 32 + ["host"] * 32
    assert m.stats()["evictions"] == 4
    check_accounting(m, hold + hs)
    for h, t in zip(hold + hs, old + ts):
        assert same(m.fetch(h), t)
    check_drained(m)


@pytest.mark.parametrize("release", [False, True])
def test_offload_many_is_all_or_nothing_on_oom(managers, release):
    m = managers(peer=M, host=M)
    gen = torch.Generator().manual_seed(20)
    old = [rand_tensor(256 * K, gen=gen) for _ in range(2)]
    hold = [m.offload(t, release=False) for t in old]
    ts = [rand_tensor(256 * K, gen=gen) for _ in range(8)]  # 2 MiB > the 1.5 MiB left
    refs = [storage_bits(t) for t in ts]
    before = m.stats()
    with pytest.raises(aq.OutOfMemoryError) as info:
        m.offload_many(ts, release=release)
    assert info.value.requested == 256 * K
    after = m.stats()
    for k in ("offloads", "bytes_offloaded", "live_handles", "fetches", "frees"):
        assert after[k] == before[k], k
    for t, ref in zip(ts, refs):
        assert not aq.is_offloaded(t) and torch.equal(storage_bits(t), ref)
    check_accounting(m, hold)  # victims moved down may stay moved, intact
    for h, t in zip(hold, old):
        assert same(m.fetch(h), t)
    check_drained(m)
    # and the same batch, smaller, fits now
    hs = m.offload_many(ts[:6], release=release)
    for h, t, ref in zip(hs, ts, refs):
        assert torch.equal(storage_bits(m.fetch(h)), ref)
    check_drained(m)


def test_fetch_many_is_all_or_nothing(managers):
    m = managers()
    gen = torch.Generator().manual_seed(21)
    ts = [rand_tensor(SLOT, gen=gen) for _ in range(6)]
    refs = [t.clone() for t in ts]
    hs = [m.offload(t, release=i % 2 == 1) for i, t in enumerate(ts)]
    gone = m.offload(rand_tensor(SLOT), release=False)
    m.free(gone)
    before = m.stats()
    with pytest.raises(aq.InvalidHandleError):
        m.fetch_many(hs[:3] + [gone] + hs[3:])
    with pytest.raises(aq.InvalidArgumentError):
        m.fetch_many(hs + [hs[0]])
    after = m.stats()
    assert after["fetches"] == before["fetches"] and after["live_handles"] == 6
    assert all(h.state in ("in_flight", "offloaded") for h in hs)
    assert sorted({h.tier for h in hs}) == ["host", "peer"]  # one batch across both tiers
    outs = m.fetch_many(hs)
    for h, t, out, ref in zip(hs, ts, outs, refs):
        if h.release:
            assert out is t
        assert same(out, ref)
    check_drained(m)


# -- lend and reclaim -----------------------------------------------------------------------
def test_lend_grows_the_peer_tier(managers):
    m = managers()
    hs = [m.offload(rand_tensor(SLOT), release=False) for _ in range(4)]
    assert m.lend("emu:1", 2 * SLOT) == PEER + 2 * SLOT
    assert m.lend("emu:1", "4KiB") == PEER + 3 * SLOT
    s = m.stats()
    t = s["tiers"][0]
    assert t["capacity"] == PEER + 3 * SLOT and t["segments"] == 3 and t["lent_segments"] == 2
    assert s["lends"] == 2 and s["bytes_lent"] == 3 * SLOT
    more = [m.offload(rand_tensor(SLOT), release=False) for _ in range(3)]
    assert all(h.tier == "peer" for h in hs + more)
    assert m.stats()["evictions"] == 0
    check_accounting(m, hs + more)


def test_reclaim_migrates_live_data_down_and_shrinks(managers):
    m = managers()
    gen = torch.Generator().manual_seed(22)
    assert m.lend("emu:1", PEER) == 2 * PEER
    ts = [rand_tensor(SLOT, gen=gen) for _ in range(8)]
    refs = [t.clone() for t in ts]
    hs = [m.offload(t, release=i % 2 == 0) for i, t in enumerate(ts)]
    assert all(h.tier == "peer" for h in hs)
    got = m.reclaim("emu:1", 1000)
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


def test_reclaim_all_then_lend_again(managers):
    m = managers()
    gen = torch.Generator().manual_seed(23)
    m.lend("emu:1", 8 * K)
    ts = [rand_tensor(SLOT, gen=gen) for _ in range(5)]
    hs = [m.offload(t, release=False) for t in ts]
    assert m.reclaim("emu:1", None) == PEER + 8 * K
    s = m.stats()
    assert s["tiers"][0]["capacity"] == 0 and s["tiers"][0]["segments"] == 0
    assert all(h.tier == "host" for h in hs)
    assert s["reclaim_last_bytes_moved"] == 5 * SLOT
    total = s["reclaim_total_s"]
    assert m.reclaim("emu:1") == 0  # nothing left: nothing to do
    assert m.reclaim("emu:1", 0) == 0
    h = m.offload(rand_tensor(SLOT), release=False)
    assert h.tier == "host"
    assert m.lend("emu:1", SLOT) == SLOT
    h2 = m.offload(rand_tensor(SLOT), release=False)
    assert h2.tier == "peer"
    assert m.reclaim("emu:1") == SLOT
    s = m.stats()
    assert s["reclaims"] == 2 and s["reclaim_total_s"] > total
    assert h2.tier == "host"
    for x, t in zip(hs, ts):
        assert same(m.fetch(x), t)
    h.free()
    h2.free()
    check_drained(m)


def test_reclaim_covers_newest_segments_first(managers):
    m = managers()
    for n in (4 * K, 8 * K, 2 * K):
        m.lend("emu:1", n)
    assert m.reclaim("emu:1", 9 * K) == 10 * K  # 2 KiB then 8 KiB: whole segments
    assert m.stats()["tiers"][0]["capacity"] == PEER + 4 * K
    assert m.reclaim("emu:1", 4 * K) == 4 * K
    assert m.reclaim("emu:1", 1) == PEER  # the initial budget is a segment too
    s = m.stats()
    assert s["tiers"][0]["capacity"] == 0
    assert s["bytes_reclaimed"] == 14 * K + PEER and s["reclaims"] == 3


def test_peer_bytes_zero_then_lend(managers):
    m = managers(peer=0)
    t = m.stats()["tiers"][0]
    assert t["tier"] == "peer" and t["capacity"] == 0 and t["segments"] == 0
    a = rand_tensor(SLOT)
    h = m.offload(a, release=False)
    assert h.tier == "host"
    assert m.reclaim("emu:1") == 0
    with pytest.raises(aq.InvalidArgumentError):
        m.reclaim("emu:1", 1)
    assert m.lend("emu:1", 2 * SLOT) == 2 * SLOT
    b = rand_tensor(SLOT)
    h2 = m.offload(b, release=False)
    assert h2.tier == "peer"
    check_accounting(m, [h, h2])
    assert same(m.fetch(h), a) and same(m.fetch(h2), b)
    check_drained(m)


def test_peer_bytes_mapping(managers):
    m = managers(peer={"emu:1": 8 * K})
    assert m.stats()["tiers"][0]["capacity"] == 8 * K
    with pytest.raises(aq.InvalidArgumentError):
        managers(peer={"emu:1": 8 * K}, peers=["emu:1", "emu:0"])


def test_lend_and_reclaim_errors_change_nothing(managers):
    m = managers()
    hs = [m.offload(rand_tensor(SLOT), release=False) for _ in range(2)]
    m.lend("emu:1", SLOT)
    before = m.stats()
    bad_reclaims = [("emu:1", PEER + SLOT + 1), ("emu:1", 10 * M), ("emu:9", None),
                    ("emu:0", None), ("emu:0", 1), ("cuda:7", None), ("junk", None), (-1, None),
                    ("emu:1", -1), ("emu:1", "junk")]
    for dev, n in bad_reclaims:
        with pytest.raises(aq.InvalidArgumentError):
            m.reclaim(dev, n)
    bad_lends = [("emu:1", 0), ("emu:1", -1), ("emu:1", -4096), ("emu:1", "junk"),
                 ("emu:1", 100), ("emu:9", SLOT), ("emu:0", SLOT), ("emu:1", None),
                 ("emu:1", 1.5)]
    for dev, n in bad_lends:
        with pytest.raises(aq.InvalidArgumentError):
            m.lend(dev, n)
    assert m.stats() == before
    assert all(h.tier == "peer" for h in hs)


def test_reclaim_oom_when_the_host_cannot_take_anything(managers):
    m = managers(host=SLOT // 2)
    gen = torch.Generator().manual_seed(24)
    ts = [rand_tensor(SLOT, gen=gen) for _ in range(4)]
    refs = [t.clone() for t in ts]
    hs = [m.offload(t, release=i < 2) for i, t in enumerate(ts)]
    before = m.stats()
    with pytest.raises(aq.OutOfMemoryError) as info:
        m.reclaim("emu:1")
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
        m.reclaim("emu:1")
    assert h.tier == "peer"
    m.free(h)
    assert m.reclaim("emu:1") == PEER
    check_drained(m)


def test_reclaim_oom_partial_keeps_every_byte(managers):
    """The host can take some handles but not all: OutOfMemoryError, nothing reclaimed, every
    handle intact wherever it is."""
    m = managers(host=2 * SLOT)
    gen = torch.Generator().manual_seed(25)
    ts = [rand_tensor(SLOT, gen=gen) for _ in range(4)]
    hs = [m.offload(t, release=False) for t in ts]
    with pytest.raises(aq.OutOfMemoryError):
        m.reclaim("emu:1")
    s = m.stats()
    assert s["tiers"][0]["capacity"] == PEER and s["reclaims"] == 0
    check_accounting(m, hs)
    for h, t in zip(hs, ts):
        assert same(m.fetch(h), t)
    check_drained(m)


def test_reclaim_oom_partial_leaves_handles_on_the_peer(managers):
    m = managers(host=2 * SLOT)
    hs = [m.offload(rand_tensor(SLOT), release=False) for _ in range(4)]
    with pytest.raises(aq.OutOfMemoryError):
        m.reclaim("emu:1")
    assert [h.tier for h in hs] == ["peer"] * 4


def test_bytes_lent_matches_capacity_added(managers):
    m = managers(peer=0)
    cap = m.lend("emu:1", 1000)
    assert m.stats()["bytes_lent"] == cap


def test_concurrent_reclaims_of_one_device_are_refused(managers):
    m = managers(peer=48 * M, host=64 * M)
    gen = torch.Generator().manual_seed(26)
    conflicts = 0
    for round_ in range(3):
        ts = [rand_tensor(16 * M, gen=gen) for _ in range(3)]
        refs = [t.clone() for t in ts]
        hs = [m.offload(t) for t in ts]  # a big reclaim: 48 MiB of copies in flight
        barrier = threading.Barrier(2)
        results: list = [None, None]

        def reclaimer(i: int) -> None:
            barrier.wait()
            try:
                results[i] = ("ok", m.reclaim("emu:1"))
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
        assert sorted(oks, reverse=True)[0] == 48 * M, results
        if errs:
            assert len(errs) == 1 and isinstance(errs[0], aq.InvalidArgumentError), results
            assert "in progress" in str(errs[0])
            conflicts += 1
        else:
            assert sorted(oks) == [0, 48 * M], results
        s = m.stats()
        assert s["tiers"][0]["capacity"] == 0 and s["reclaims"] == round_ + 1
        for h, t, ref in zip(hs, ts, refs):
            assert h.tier == "host"
            assert m.fetch(h) is t and same(t, ref)
        m.lend("emu:1", 48 * M)
    assert conflicts >= 1
    check_drained(m)


# -- three emulated devices: two peer tiers -------------------------------------------------
def _run_emulated(devices: int, body: str) -> dict:
    code = textwrap.dedent("""
        import json, torch, aqua_offload as aq
        def rand(n):
            return torch.randint(1, 256, (n,), dtype=torch.uint8)
        result = {}
    """) + textwrap.dedent(body) + "\nprint(json.dumps(result))\n"
    env = dict(os.environ, AQUA_EMULATED_DEVICES=str(devices))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cascade_over_two_peers():
    out = _run_emulated(3, """
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


def test_reclaims_of_two_devices_may_run_together():
    """Three emulated devices: two peer tiers, each reclaimed by its own thread at once."""
    out = _run_emulated(3, """
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


# -- stats and invariants -------------------------------------------------------------------
TOP_INT_KEYS = ["offloads", "fetches", "frees", "prefetches", "bytes_offloaded", "bytes_fetched",
                "bytes_migrated", "incremental_offloads", "incremental_bytes_saved", "evictions",
                "migrations", "migration_failures", "lends", "reclaims", "bytes_lent",
                "bytes_reclaimed", "reclaim_last_bytes_moved", "live_handles", "events_created",
                "prefetched_bytes"]
TOP_FLOAT_KEYS = ["reclaim_last_s", "reclaim_max_s", "reclaim_total_s"]
TOP_STR_KEYS = ["backend", "device", "policy"]
TIER_INT_KEYS = ["capacity", "used", "peak", "free", "largest_free", "blocks", "free_ranges",
                 "segments", "lent_segments", "fenced", "handles"]
TIER_STR_KEYS = ["tier", "location"]


def test_stats_keys_and_types(managers):
    m = managers()
    m.offload(rand_tensor(SLOT), release=False)  # kept alive: the keys must not depend on it
    s = m.stats()
    for k in TOP_INT_KEYS:
        assert type(s[k]) is int and s[k] >= 0, k
    for k in TOP_FLOAT_KEYS:
        assert type(s[k]) is float and s[k] == 0.0, k
    for k in TOP_STR_KEYS:
        assert type(s[k]) is str, k
    assert s["backend"] == "emulation" and s["device"] == "cpu" and s["policy"] == "lru"
    assert isinstance(s["tiers"], list) and len(s["tiers"]) == 2
    for t in s["tiers"]:
        for k in TIER_INT_KEYS:
            assert type(t[k]) is int and t[k] >= 0, k
        for k in TIER_STR_KEYS:
            assert type(t[k]) is str, k
        assert type(t["fragmentation"]) is float and 0.0 <= t["fragmentation"] <= 1.0
    assert [(t["tier"], t["location"]) for t in s["tiers"]] == [("peer", "emu:1"), ("host", "cpu")]
    documented = set(TOP_INT_KEYS + TOP_FLOAT_KEYS + TOP_STR_KEYS + ["tiers"])
    assert documented <= set(s)
    assert set(TIER_INT_KEYS + TIER_STR_KEYS + ["fragmentation"]) <= set(s["tiers"][0])


def test_stats_keys_documented():
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "stats.md")).read()
    for k in TOP_INT_KEYS + TOP_FLOAT_KEYS + TOP_STR_KEYS + TIER_INT_KEYS + TIER_STR_KEYS:
        assert f"`{k}`" in doc, k


def test_peak_and_fragmentation(managers):
    m = managers()
    hs = [m.offload(rand_tensor(SLOT), release=False) for _ in range(4)]
    hs[1].free()
    hs[3].free()
    t = m.stats()["tiers"][0]
    assert t["peak"] == PEER and t["used"] == 2 * SLOT
    assert t["free_ranges"] == 2 and t["largest_free"] == SLOT
    assert t["fragmentation"] == pytest.approx(0.5)


def test_accounting_through_a_mixed_sequence(managers):
    """A deterministic mix of everything; after each step used == the sum of the live blocks
    (a block with headroom is known, and loses it when it migrates), and at the end every tier
    is empty."""
    m = managers(peer=PEER, host=16 * PEER)
    gen = torch.Generator().manual_seed(27)
    # id(h) -> [h, reference bytes, (location, block) of a block with headroom or None]
    live: dict[int, list] = {}

    def block(entry) -> int:
        h, _, room = entry
        return room[1] if room is not None and room[0] == h.location else align(h.nbytes)

    def check():
        check_accounting(m, [e[0] for e in live.values()],
                         {id(e[0]): block(e) for e in live.values()})

    for step in range(40):
        n = [700, SLOT, 3 * K + 5, 6 * K, 256, 1][step % 6]
        t = rand_u8(n, gen)
        h = m.offload(t, release=False, priority=step % 3)
        live[id(h)] = [h, t, None]
        check()
        if step % 5 == 4:
            h, ref, _ = live.pop(next(iter(live)))
            assert same(m.fetch(h), ref)
            check()
        if step % 7 == 6:
            entry = next(iter(live.values()))
            h, ref, _ = entry
            assert same(m.fetch(h, keep=True), ref)
            grown = torch.cat([ref, rand_u8(300, gen)])
            room, loc = block(entry), h.location
            del live[id(h)]
            h2 = m.offload(grown, release=False, base=h)
            if room >= grown.numel():  # in place: the same block
                assert h2.location == loc
                live[id(h2)] = [h2, grown, (loc, room)]
            else:
                live[id(h2)] = [h2, grown, (h2.location, align(max(grown.numel(), 2 * room)))]
            check()
        if step % 9 == 8:
            m.lend("emu:1", SLOT)
            check()
        if step % 13 == 12:
            assert m.reclaim("emu:1", SLOT) >= SLOT
            check()
    assert m.stats()["evictions"] > 0 and m.stats()["incremental_offloads"] == 5
    for h, ref, _ in list(live.values()):
        assert same(m.fetch(h), ref)
    live.clear()
    check_drained(m)


def test_fetch_many_into_outs(managers):
    m = managers()
    ts = [rand_tensor(1000 + 256 * i) for i in range(4)]
    outs = [torch.empty_like(t) for t in ts]
    hs = m.offload_many(ts, release=False)
    bad = [torch.empty(3, dtype=torch.uint8)] + outs[1:]
    with pytest.raises(aq.InvalidArgumentError):
        m.fetch_many(hs, outs=bad)  # checked before anything is fetched
    with pytest.raises(aq.InvalidArgumentError):
        m.fetch_many(hs, outs=outs[:2])
    assert all(h.state in ("in_flight", "offloaded") for h in hs)
    got = m.fetch_many(hs, outs=[outs[0], None, outs[2], None])
    assert got[0] is outs[0] and got[2] is outs[2] and got[1] is not outs[1]
    for g, t in zip(got, ts):
        assert same(g, t)

"""Migrations down the cascade: a fetch at any moment (while the handle's eviction or a reclaim
is still copying it) gets the right bytes, and a failed copy (fault injection, emulation only)
leaves every handle valid where it was.

Runs on every backend except the fault-injection cases (``_core.inject_copy_faults`` is a hook
of the emulation backend's copy submission; a GPU has no such switch).
"""

from __future__ import annotations

import threading

import pytest
import torch

import aqua_offload as aq
from helpers import (JOIN_TIMEOUT_S, M, PEER, SLOT, check_accounting, check_drained,
                     emulation_only, rand_tensor, same)

FAULTS = "fault injection (_core.inject_copy_faults) is a hook of the emulation backend"


# -- fetch at any moment --------------------------------------------------------------------
@pytest.mark.parametrize("how", ["fetch", "fetch_many", "prefetch"])
@pytest.mark.parametrize("release", [False, True])
def test_fetch_mid_migration_gets_the_right_bytes(backend, managers, release, how):
    """Big releases return at once with their copies running; the next offload evicts the
    oldest while its offload copy may still run, and it is fetched at once."""
    chunk = 4 * M
    m = managers(peer=4 * chunk, host=8 * chunk, chunk_bytes=M)  # chunked copies as on CUDA
    gen = torch.Generator().manual_seed(7)
    ts = [rand_tensor(chunk, gen=gen, device=backend.device) for _ in range(6)]
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


def test_fetch_while_a_reclaim_moves_it(backend, managers):
    """A fetch racing a reclaim (another thread) always gets the right bytes."""
    m = managers(peer=32 * M, host=64 * M)
    gen = torch.Generator().manual_seed(8)
    for _ in range(3):
        ts = [rand_tensor(4 * M, gen=gen, device=backend.device) for _ in range(6)]
        refs = [t.clone() for t in ts]
        hs = [m.offload(t) for t in ts]  # releases: copies still running
        got: list = []
        th = threading.Thread(target=lambda: got.append(m.reclaim(backend.peer_label)),
                              daemon=True)
        th.start()
        for h, t, ref in zip(hs, ts, refs):
            assert m.fetch(h) is t and same(t, ref)
        th.join(JOIN_TIMEOUT_S)
        assert not th.is_alive()
        assert got == [32 * M]
        assert m.stats()["tiers"][0]["capacity"] == 0
        m.lend(backend.peer_label, 32 * M)
    check_drained(m)


# -- fault injection ------------------------------------------------------------------------
@emulation_only(FAULTS)
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


@emulation_only(FAULTS)
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


@emulation_only(FAULTS)
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


@emulation_only(FAULTS)
def test_reclaim_migration_fault_is_reported_as_backend_error(managers, faults):
    m = managers()
    hs = [m.offload(rand_tensor(SLOT), release=False) for _ in range(2)]  # noqa: F841 (kept)
    faults(1)
    with pytest.raises(aq.BackendError):
        m.reclaim("emu:1")

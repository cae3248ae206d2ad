"""fetch(keep=True) and incremental offload (``offload(t, base=h)``): a kept copy stays live and
serves as the base of the next offload of append-only state, which copies only the new suffix
when the base's block has room, else the whole tensor into a block with 2x headroom. Runs on
every backend.
"""

from __future__ import annotations

import gc

import pytest
import torch

import aqua_offload as aq
from helpers import (K, SLOT, align, check_accounting, check_drained, rand_tensor, rand_u8,
                     same)


# -- keep -----------------------------------------------------------------------------------
def test_fetch_keep_of_a_snapshot(backend, managers):
    m = managers()
    t = rand_tensor(SLOT, device=backend.device)
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


def test_fetch_keep_of_a_release(backend, managers):
    m = managers()
    t = rand_tensor(SLOT, device=backend.device)
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


def test_dropped_kept_release_returns_its_block(backend, managers):
    """Regression: an unreachable kept copy of a release (no longer registered with its
    storage, so collectable) once leaked its block."""
    m = managers()
    t = rand_tensor(SLOT, device=backend.device)
    ref = t.clone()
    h = m.offload(t)
    assert m.fetch(h, keep=True) is t
    del h
    gc.collect()
    m.synchronize()
    assert m.stats()["live_handles"] == 0 and m.stats()["tiers"][0]["used"] == 0
    assert not aq.is_offloaded(t) and same(t, ref)  # the restored tensor is left alone


# -- incremental offload --------------------------------------------------------------------
@pytest.mark.parametrize("base_release", [False, True])
@pytest.mark.parametrize("release", [False, True])
def test_incremental_offload_copies_only_the_suffix(backend, managers, base_release, release):
    m = managers()
    gen = torch.Generator().manual_seed(13)
    prefix = rand_u8(3000, gen, backend.device)
    h = m.offload(prefix.clone() if base_release else prefix, release=base_release)
    out = m.fetch(h, keep=True)
    assert same(out, prefix)
    assert h.tier == "peer"
    before = m.stats()
    # 3072 B: fits the base's 3072-byte block
    grown = torch.cat([prefix, rand_u8(72, gen, backend.device)])
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


def test_incremental_growth_path_and_append_chain(backend, managers):
    """No room in the base's block: a full copy into a block with 2x headroom; later appends
    that fit the headroom copy only their suffix."""
    m = managers(peer=64 * K, host=64 * K)
    gen = torch.Generator().manual_seed(14)
    cache = rand_u8(SLOT, gen, backend.device)
    h = m.offload(cache, release=False)
    assert m.stats()["tiers"][0]["used"] == SLOT
    expect_offloaded = SLOT
    steps = [(6000, False), (8000, True), (8192, True), (8193, False), (12000, True)]
    block = SLOT
    for n, in_place in steps:
        assert same(m.fetch(h, keep=True), cache)
        cache = torch.cat([cache, rand_u8(n - cache.numel(), gen, backend.device)])
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


def test_incremental_growth_without_room_for_headroom_takes_the_exact_size(backend, managers):
    m = managers(peers=None, host=11 * K)
    gen = torch.Generator().manual_seed(15)
    base = rand_u8(SLOT, gen, backend.device)
    h = m.offload(base, release=False)
    m.fetch(h, keep=True)
    # 2x headroom (8 KiB) does not fit in the 7 KiB left
    grown = torch.cat([base, rand_u8(K, gen, backend.device)])
    h2 = m.offload(grown, release=False, base=h)
    s = m.stats()
    assert s["tiers"][0]["used"] == 5 * K
    assert same(m.fetch(h2), grown)
    check_drained(m)


def test_incremental_offload_of_a_migrated_base(backend, managers):
    m = managers()
    dev = backend.device
    gen = torch.Generator().manual_seed(16)
    base = rand_u8(3000, gen, dev)
    h = m.offload(base, release=False)
    m.fetch(h, keep=True)
    others = [m.offload(rand_tensor(SLOT, gen=gen, device=dev), release=False)
              for _ in range(5)]
    assert h.tier == "host"  # evicted while kept
    grown = torch.cat([base, rand_u8(50, gen, dev)])
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


def test_incremental_offload_bad_bases(backend, managers):
    m = managers()
    dev = backend.device
    gen = torch.Generator().manual_seed(17)
    data = rand_u8(SLOT, gen, dev)
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
    t = rand_u8(SLOT, gen, dev)
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

"""Batches: offload_many / fetch_many (one call into the core per batch), all or nothing, a batch
spilling over tiers, fetch_many into given outputs. Runs on every backend.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import aqua_offload as aq
from helpers import K, M, SLOT, check_accounting, check_drained, rand_tensor, same, storage_bits


@pytest.mark.parametrize("release", [False, True])
def test_offload_many_64_by_64k(backend, managers, release):
    m = managers(peer=4 * M, host=8 * M)
    gen = torch.Generator().manual_seed(18)
    ts = [rand_tensor(64 * K, gen=gen, device=backend.device) for _ in range(64)]
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


def test_offload_many_spills_over_to_the_host_and_evicts_older_handles(backend, managers):
    m = managers(peer=2 * M, host=8 * M)
    gen = torch.Generator().manual_seed(19)
    old = [rand_tensor(64 * K, gen=gen, device=backend.device) for _ in range(4)]
    hold = [m.offload(t, release=False) for t in old]
    ts = [rand_tensor(64 * K, gen=gen, device=backend.device) for _ in range(64)]
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
def test_offload_many_is_all_or_nothing_on_oom(backend, managers, release):
    m = managers(peer=M, host=M)
    gen = torch.Generator().manual_seed(20)
    old = [rand_tensor(256 * K, gen=gen, device=backend.device) for _ in range(2)]
    hold = [m.offload(t, release=False) for t in old]
    # 2 MiB > the 1.5 MiB left
    ts = [rand_tensor(256 * K, gen=gen, device=backend.device) for _ in range(8)]
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


def test_fetch_many_is_all_or_nothing(backend, managers):
    m = managers()
    gen = torch.Generator().manual_seed(21)
    ts = [rand_tensor(SLOT, gen=gen, device=backend.device) for _ in range(6)]
    refs = [t.clone() for t in ts]
    hs = [m.offload(t, release=i % 2 == 1) for i, t in enumerate(ts)]
    gone = m.offload(rand_tensor(SLOT, device=backend.device), release=False)
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


def test_fetch_many_into_outs(backend, managers):
    m = managers()
    dev = backend.device
    ts = [rand_tensor(1000 + 256 * i, device=dev) for i in range(4)]
    outs = [torch.empty_like(t) for t in ts]
    hs = m.offload_many(ts, release=False)
    bad = [torch.empty(3, dtype=torch.uint8, device=dev)] + outs[1:]
    with pytest.raises(aq.InvalidArgumentError):
        m.fetch_many(hs, outs=bad)  # checked before anything is fetched
    with pytest.raises(aq.InvalidArgumentError):
        m.fetch_many(hs, outs=outs[:2])
    assert all(h.state in ("in_flight", "offloaded") for h in hs)
    got = m.fetch_many(hs, outs=[outs[0], None, outs[2], None])
    assert got[0] is outs[0] and got[2] is outs[2] and got[1] is not outs[1]
    for g, t in zip(got, ts):
        assert same(g, t)
    check_drained(m)


def test_a_snapshot_batch_materialises_lazy_views_and_refuses_a_quantized_tensor(backend,
                                                                                  managers):
    """A batch's C-loop checks see what each tensor's own checks see: lazy conjugate and
    negative views are copied as their values (only a complex tensor can be a conjugate, but
    any dtype can be negative), and a quantized tensor anywhere refuses the whole batch."""
    m = managers()
    dev = backend.device
    c = rand_tensor(8 * 64, torch.float32, device=dev).view(torch.complex64)
    f = torch.arange(1, 65, dtype=torch.float32, device=dev)  # (non-zero, exact under -x)
    views = [rand_tensor(256, device=dev), c.conj(), f._neg_view(), c.conj().imag,
             rand_tensor(128, torch.uint8, device=dev), c[::2].conj()]
    assert [v.is_conj() or v.is_neg() for v in views] == [False, True, True, True, False, True]
    refs = [v.resolve_conj().resolve_neg().clone() for v in views]
    got = m.fetch_many(m.offload_many(views, release=False))
    assert all(same(g, r) for g, r in zip(got, refs))
    with warnings.catch_warnings():  # quantized tensor creation is deprecated (torch 2.13)
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(torch.rand(16), 0.1, 0, torch.qint8)
    if dev.type == "cpu":
        plain = [rand_tensor(64, device=dev) for _ in range(3)]
        with pytest.raises(aq.InvalidArgumentError, match="quantized"):
            m.offload_many([*plain, q], release=False)
    check_drained(m)

"""Prefetch: the copy back starts early, a later fetch only waits for it (bytes counted once),
a freed prefetched handle gives everything back, a prefetched handle survives eviction and
reclaim. Runs on every backend; the stream-crossing cases (prefetch on one CUDA stream, fetch or
free on another) are in test_cuda.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import K, PEER, SLOT, check_drained, rand_tensor, same


@pytest.mark.parametrize("release", [False, True])
def test_prefetch_then_fetch_copies_once(backend, managers, release):
    m = managers()
    t = rand_tensor(3 * K + 100, torch.uint8, device=backend.device)
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
def test_free_of_a_prefetched_handle_releases_everything(backend, managers, release):
    m = managers()
    t = rand_tensor(SLOT, device=backend.device)
    h = m.offload(t, release=release)
    m.prefetch(h)
    assert m.stats()["prefetched_bytes"] == SLOT
    m.free(h)
    assert h.state == "freed"
    assert m.stats()["frees"] == 1
    check_drained(m)


def test_prefetch_many_then_fetch_many(backend, managers):
    m = managers()
    gen = torch.Generator().manual_seed(11)
    # half on the peer, half on the host
    ts = [rand_tensor(SLOT, gen=gen, device=backend.device) for _ in range(8)]
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


def test_prefetch_of_an_evicted_handle_and_reclaim_of_a_prefetched_one(backend, managers):
    m = managers()
    gen = torch.Generator().manual_seed(12)
    ts = [rand_tensor(SLOT, gen=gen, device=backend.device) for _ in range(5)]
    hs = [m.offload(t, release=False) for t in ts]
    assert hs[0].tier == "host"
    m.prefetch(hs[0])
    m.prefetch(hs[3])  # on the peer: reclaim moves it down while its prefetch is in flight
    assert m.reclaim(backend.peer_label) == PEER
    assert all(h.tier == "host" for h in hs)
    assert m.stats()["prefetched_bytes"] == 2 * SLOT
    for h, t in zip(hs, ts):
        assert same(m.fetch(h), t)
    check_drained(m)


def test_prefetched_bytes_with_kept_fetch(backend, managers):
    m = managers()
    t = rand_tensor(SLOT, device=backend.device)
    h = m.offload(t, release=False)
    m.prefetch(h)
    assert same(m.fetch(h, keep=True), t)
    assert m.stats()["prefetched_bytes"] == 0
    assert h.state == "offloaded"
    assert same(m.fetch(h), t)
    check_drained(m)


def test_dropped_prefetched_snapshot_is_safe_and_returns_its_block(backend):
    """Regression: dropping the last reference to a snapshot handle with a prefetch in flight
    once freed the prefetch buffer while the emulation worker still copied into it (heap
    corruption, abort), and leaked the handle's block and prefetched_bytes. In a subprocess, so
    that a regression cannot take the test run down with it."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import gc, torch, aqua_offload as aq
        dev = {str(backend.device)!r}
        m = aq.OffloadManager(dev, peers=[{backend.peer}], peer_bytes="64MiB",
                              host_bytes="64MiB")
        for i in range(20):
            h = m.offload(torch.randint(1, 256, (4 << 20,), dtype=torch.uint8, device=dev),
                          release=False)
            m.prefetch(h)
            del h
            gc.collect()
            junk = [torch.empty(1 << 20, dtype=torch.uint8, device=dev) for _ in range(8)]
        m.synchronize()
        s = m.stats()
        print(s["live_handles"], s["prefetched_bytes"], s["tiers"][0]["used"])
    """)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["0", "0", "0"]

"""Deferred snapshot fences: offload(t, release=False, fence="deferred") does not make the
current stream wait; handle.fence() does, before the source is written again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import aqua_offload as aq
from conftest import same_bytes


def test_deferred_snapshot_round_trip_and_fence(backend, manager):
    t = backend.tensor((1 << 16,))
    ref = t.clone()
    h = manager.offload(t, release=False, fence="deferred")
    h.fence()
    t.mul_(3)  # after the fence: cannot reach the snapshot
    assert same_bytes(manager.fetch(h), ref)


def test_a_write_before_the_fence_is_caught_by_the_guard(backend, manager):
    t = backend.tensor((1 << 16,))
    ref = t.clone()
    h = manager.offload(t, release=False, fence="deferred")
    with aq.debug_guard():
        with pytest.raises(aq.PagedOutError, match="fence"):
            t.mul_(2)  # in place: a write
        with pytest.raises(aq.PagedOutError, match="fence"):
            torch.add(t, 1, out=t)  # out=: a write too
        assert same_bytes(t * 1, ref)  # reads are fine
        h.fence()
        t.add_(1)  # fenced: allowed
    assert same_bytes(manager.fetch(h), ref)


def test_fetch_and_free_end_the_deferral(backend, manager):
    a, b = backend.tensor((4096,)), backend.tensor((4096,))
    ha = manager.offload(a, release=False, fence="deferred")
    hb = manager.offload(b, release=False, fence="deferred")
    manager.fetch(ha)
    manager.free(hb)
    with aq.debug_guard():
        a.add_(1)
        b.add_(1)
    ha.fence()  # no-op once fetched


def test_a_dropped_source_stays_alive_until_the_copy_read_it(backend, manager):
    refs, handles = [], []
    for i in range(20):
        t = backend.tensor((1 << 15,), generator=torch.Generator().manual_seed(i))
        refs.append(t.clone())
        handles.append(manager.offload(t, release=False, fence="deferred"))
        del t  # its memory may be reused at once by the next tensor, were it not protected
        backend.tensor((1 << 15,)).fill_(7)
    for h, ref in zip(handles, refs):
        assert same_bytes(manager.fetch(h), ref)


def test_batched_deferred_snapshots(backend, manager):
    ts = [backend.tensor((n,)) for n in (1, 100, 5000)]
    refs = [t.clone() for t in ts]
    hs = manager.offload_many(ts, release=False, fence="deferred")
    for h in hs:
        h.fence()
    for t in ts:
        t.zero_()
    assert all(same_bytes(o, r) for o, r in zip(manager.fetch_many(hs), refs))


@pytest.mark.parametrize("bad", [dict(fence="later"), dict(fence="deferred", release=True)])
def test_bad_fence_arguments_change_nothing(manager, backend, bad):
    t = backend.tensor((16,))
    before = manager.stats()["offloads"]
    with pytest.raises(aq.InvalidArgumentError, match="fence"):
        manager.offload(t, **{"release": False, **bad})
    assert manager.stats()["offloads"] == before and not aq.is_offloaded(t)


def test_a_consumed_deferred_base_keeps_its_source_alive():
    """A deferred snapshot of a non-contiguous tensor copies from a temporary the manager keeps
    alive. Consumed as the base of an offload into a fresh block, that temporary must live
    until the base's copy ran (the new copy is ordered after it), not die with the base:
    freed at once, its pages go back to the OS and the copy still reading them crashes. In a
    child process, so that a crash is a failure, not the end of the suite."""
    code = textwrap.dedent("""
        import torch, aqua_offload as aq
        MiB = 1 << 20
        m = aq.OffloadManager("cpu", peers=[1], peer_bytes=257 * MiB, host_bytes=1200 * MiB)
        g = torch.Generator().manual_seed(3)
        for i in range(3):
            x = m.offload(torch.randint(1, 255, (256 * MiB,), dtype=torch.uint8, generator=g),
                          release=False)  # fills the peer
            wide = torch.randint(1, 255, (2, 64 * MiB), dtype=torch.uint8, generator=g)
            t = wide[:, ::2]  # non-contiguous: the snapshot copies from a temporary
            ref = t.contiguous().reshape(-1)
            grown = torch.cat([ref, torch.full((4096,), 7, dtype=torch.uint8)])
            # x moves to the host to make room; b's copy waits for that move (a fence)
            b = m.offload(t, release=False, fence="deferred")
            del t, wide
            h = m.offload(grown, release=False, base=b, fence="deferred")  # a fresh block
            m.stats()  # reaps holders whose copy is done
            junk = [torch.full((64 * MiB,), 9, dtype=torch.uint8) for _ in range(2)]
            del junk
            assert b.state == "freed" and x.tier == "host"
            assert torch.equal(m.fetch(h), grown)
            m.free(x)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split()[-1] == "ok", (r.returncode, r.stderr[-2000:])

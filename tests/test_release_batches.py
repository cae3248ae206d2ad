"""Release batches: offload_many / fetch_many of many small tensors, whose per-handle bookkeeping
(reservations, the paging registry and its storage watches, holders, the manager's handle table)
is done once per batch. What it promises is what a batch of single calls promises: a refused
tensor anywhere changes nothing, views of one storage page out together, each handle restores
its own tensor object, and nothing is left registered or held afterwards. Runs on every backend.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import aqua_offload as aq
from aqua_offload import storage
from aqua_offload.handle import Handle
from helpers import check_drained, rand_tensor, same


def _batch(backend, n: int, nbytes: int = 256, seed: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [rand_tensor(nbytes + 8 * (i % 5), gen=gen, device=backend.device) for i in range(n)]


def _refused_by_kind(backend, kind: str, t: torch.Tensor, m: aq.OffloadManager):
    """Make ``t`` unfit for release=True in one way; returns what keeps it so."""
    if kind == "shared":
        return t.share_memory_()
    if kind == "numpy":
        return t.numpy()
    if kind == "paged":
        return m.offload(t)
    h = m.offload(t)  # "discarded": paged out, then its handle freed
    m.free(h)
    return h


@pytest.mark.parametrize("kind", ["shared", "numpy", "paged", "discarded"])
@pytest.mark.parametrize("where", [0, 17, 39])
def test_a_refused_tensor_anywhere_in_a_batch_changes_nothing(backend, managers, kind, where):
    if backend.cuda and kind in ("shared", "numpy"):
        pytest.skip("share_memory_() and numpy() alias host memory only")
    m = managers(host="1MiB")
    ts = _batch(backend, 40)
    refs = [t.clone() for t in ts]
    keep = _refused_by_kind(backend, kind, ts[where], m)
    before = m.stats()["live_handles"]
    with pytest.raises(aq.InvalidArgumentError):
        m.offload_many(ts)
    assert m.stats()["live_handles"] == before
    for i, (t, r) in enumerate(zip(ts, refs)):
        if i != where:
            assert not aq.is_offloaded(t) and not aq.is_discarded(t)
            assert same(t, r)  # readable: still there
    rest = ts[:where] + ts[where + 1:]
    hs = m.offload_many(rest)  # the registry kept nothing of the refused batch
    assert all(aq.is_offloaded(t) for t in rest)
    back = m.fetch_many(hs)
    assert all(b is t for b, t in zip(back, rest))
    for t, r in zip(rest, refs[:where] + refs[where + 1:]):
        assert same(t, r)
    if kind == "paged":
        m.fetch(keep)
    del keep
    check_drained(m)


def test_two_views_of_one_storage_in_one_batch_are_refused_and_change_nothing(backend, managers):
    m = managers(host="1MiB")
    ts = _batch(backend, 10)
    base = rand_tensor(4096, device=backend.device)
    ref = base.clone()
    batch = ts[:5] + [base[:100], base[200:]] + ts[5:]
    with pytest.raises(aq.InvalidArgumentError, match="already paged out"):
        m.offload_many(batch)
    assert not any(aq.is_offloaded(t) for t in batch)
    assert same(base, ref) and m.stats()["live_handles"] == 0
    tail = base[200:]
    h = m.offload_many([base[:100]])[0]  # one view pages the whole storage out
    assert aq.is_offloaded(base) and aq.is_offloaded(tail)
    m.fetch(h)
    assert same(base, ref) and same(tail, ref[200:])
    check_drained(m)


def test_a_batch_restores_each_tensor_object_and_every_view_of_it(backend, managers):
    m = managers(host="2MiB")
    ts = _batch(backend, 300)
    views = [t[3:] for t in ts]
    refs = [t.clone() for t in ts]
    hs = m.offload_many(ts)
    assert all(aq.is_offloaded(v) for v in views)
    assert len({h._id for h in hs}) == len(hs)
    back = m.fetch_many(hs)
    assert all(b is t for b, t in zip(back, ts))
    for t, v, r in zip(ts, views, refs):
        assert same(t, r) and same(v, r[3:])
        assert not aq.is_offloaded(t)
    assert all(h.state == "fetched" for h in hs)
    check_drained(m)


def test_a_batch_whose_tensor_objects_died_rebuilds_them_on_the_restored_storage(backend,
                                                                                 managers):
    m = managers(host="1MiB")
    ts = [rand_tensor(512, device=backend.device).view(8, 16) for _ in range(20)]
    refs = [t.clone() for t in ts]
    views = [t[2:] for t in ts]  # each view keeps its storage alive, not the tensor object
    hs = m.offload_many(ts)
    del ts
    gc.collect()
    back = m.fetch_many(hs)
    for b, v, r in zip(back, views, refs):
        assert b.shape == (8, 16) and same(b, r)
        assert b.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        assert same(v, r[2:])
    check_drained(m)


def test_a_mixed_fetch_batch_restores_releases_prefetches_snapshots_and_kept_copies(backend,
                                                                                  managers):
    m = managers(host="1MiB")
    ts = _batch(backend, 12)
    refs = [t.clone() for t in ts]
    released = m.offload_many(ts[:8])
    snaps = m.offload_many(ts[8:], release=False)
    m.prefetch_many([released[1], released[5], snaps[0]])
    back = m.fetch_many(released[:4] + snaps + released[4:])
    for t, b in zip(ts[:4] + ts[4:8], back[:4] + back[8:]):
        assert b is t
    for t, r in zip(ts, refs):
        assert same(t, r)
    for b, r in zip(back[4:8], refs[8:]):
        assert same(b, r)
    kept = m.offload_many(ts[:3])
    again = m.fetch_many(kept, keep=True)
    assert all(a is t for a, t in zip(again, ts[:3]))
    assert all(h.state != "fetched" for h in kept) and not any(aq.is_offloaded(t) for t in ts)
    for h in kept:
        m.free(h)
    assert m.stats()["prefetched_bytes"] == 0
    check_drained(m)


def test_dropped_batches_leave_no_registry_entry_holder_or_handle_behind(backend, managers):
    m = managers(host="2MiB")
    for seed in range(3):
        ts = _batch(backend, 200, seed=seed)
        hs = m.offload_many(ts)
        if seed == 0:
            m.fetch_many(hs)  # fetched, then dropped
        elif seed == 1:
            del ts  # paged-out tensors dropped with their handles: bytes go back
        del hs
        gc.collect()
        m.synchronize()
        assert m.stats()["live_handles"] == (200 if seed == 2 else 0)
    assert len(m._handles) == 200  # only the last batch's handles live (its tensors hold them)
    for t in ts:
        m.fetch(t)
    del t, ts
    gc.collect()
    assert len(m._handles) == 0
    assert not any(getattr(e, "_manager", None) is m for e in storage._registry.values())
    assert not m._holders._held
    check_drained(m)


def test_a_handle_rebuilt_after_an_interrupt_keeps_its_table_entry(backend, managers):
    """A Handle that an interrupted batch dropped must not take the entry of the one made for
    the same core id after it (Note [Orphans])."""
    m = managers(host="1MiB")
    t = rand_tensor(256, device=backend.device)
    ref = t.clone()
    (h,) = m.offload_many([t])
    stale = Handle(m, h._id, nbytes=h.nbytes, shape=h.shape, dtype=h.dtype, release=False,
                   tensor=None, key=None, tier="host", location="cpu")
    del stale  # not adopted: frees nothing, and leaves h's entry alone
    gc.collect()
    assert m._handles[h._id]() is h
    m.synchronize()  # the orphan scan sees h's entry: its block stays
    assert m.stats()["live_handles"] == 1 and h.state in ("in_flight", "offloaded")
    assert same(m.fetch(h), ref)
    check_drained(m)


def test_numpy_arrays_in_a_snapshot_batch_still_round_trip(backend, managers):
    m = managers(host="1MiB")
    arrays = [np.arange(100 + i, dtype=np.int32) * 7 for i in range(5)]
    ts = _batch(backend, 3)
    hs = m.offload_many(arrays + ts, release=False)
    back = m.fetch_many(hs)
    for a, b in zip(arrays, back[:5]):
        assert isinstance(b, np.ndarray) and np.array_equal(a, b)
    for t, b in zip(ts, back[5:]):
        assert same(t, b)
    check_drained(m)

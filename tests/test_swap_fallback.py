"""Release without ``UntypedStorage._swap_data_ptr_`` (torch 2.11 and older; Note [Without
_swap_data_ptr_] in storage.py): the same guarantees through resize_ and a copy. Here forced on
whatever torch runs the suite, on every backend."""

from __future__ import annotations

import pytest
import torch

import aqua_offload as aq
from aqua_offload import storage
from conftest import same_bytes


@pytest.fixture(autouse=True)
def no_swap(monkeypatch):
    monkeypatch.setattr(storage, "CAN_SWAP", False)


def test_release_round_trip_keeps_object_and_views(backend, manager):
    base = backend.tensor((64, 33), torch.float32)
    ref = base.clone()
    row, col = base[5], base[:, 7]
    h = manager.offload(col)
    assert aq.is_offloaded(base) and base.untyped_storage().nbytes() == 0
    assert manager.fetch(h) is col
    assert same_bytes(base, ref) and same_bytes(row, ref[5]) and same_bytes(col, ref[:, 7])
    assert h.state == "fetched" and not aq.is_offloaded(base)


def test_batches_prefetch_and_a_second_round(backend, manager):
    ts = [backend.tensor((n,), torch.uint8) for n in (1, 255, 4096, 70_000, 0)]
    refs = [t.clone() for t in ts]
    for _ in range(2):  # the memory freed by the first round is reused by the second
        hs = manager.offload_many(ts)
        assert all(t.untyped_storage().nbytes() == 0 for t in ts)
        hs[2].prefetch()
        back = manager.fetch_many(hs)
        assert all(b is t for b, t in zip(back, ts))
        assert all(same_bytes(t, r) for t, r in zip(ts, refs))


def test_a_kept_fetch_pages_out_again_without_a_copy(backend, manager):
    t = backend.tensor((300,), torch.int64)
    ref = t.clone()
    h = manager.offload(t)
    assert manager.fetch(h, keep=True) is t and same_bytes(t, ref)
    t.add_(1)
    assert manager.fetch(manager.offload(t)) is t
    assert same_bytes(t, ref + 1)


def test_the_debug_guard_lets_the_fetch_copy_through(backend, manager):
    t = backend.tensor((1000,), torch.float32)
    ref = t.clone()
    h = manager.offload(t)
    with aq.debug_guard():
        with pytest.raises(aq.PagedOutError, match="paged out"):
            t.sum()
        assert manager.fetch(h) is t  # the fallback's copy into t is not a user's touch
        assert same_bytes(t, ref)


def test_a_dropped_tensor_gives_its_tier_bytes_back(backend, manager):
    before = manager.stats()["live_handles"]
    t = backend.tensor((5000,), torch.uint8)
    manager.offload(t)
    del t
    manager.synchronize()
    assert manager.stats()["live_handles"] == before


class _Recording:
    """The manager's core, with fetch_many's destinations recorded (or a failure injected)."""

    def __init__(self, core, fail: bool = False) -> None:
        self._core, self.fail, self.dsts = core, fail, []

    def fetch_many(self, ids, dsts, *args, **kwargs):
        self.dsts.append(list(dsts))
        if self.fail:
            raise aq.BackendError("injected: the copy engine refused the fetch")
        return self._core.fetch_many(ids, dsts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._core, name)


def test_a_fetch_writes_straight_into_the_storage(backend, manager, monkeypatch):
    """No second buffer: the storage gets its memory back (resize_) and the core fetches into
    it, so a fetch needs the tensor's bytes once, not twice (a GPU near full would otherwise
    run out of memory paging a large state in), and copies them once."""
    ts = [backend.tensor((n,), torch.uint8) for n in (70_000, 4096, 1, 300_000, 5, 6)]
    refs = [t.clone() for t in ts]
    for batch in (ts[:1], ts):  # a single fetch and a batch (C loops above four)
        hs = manager.offload_many(batch)
        rec = _Recording(manager._store)
        monkeypatch.setattr(manager, "_store", rec)
        assert manager.fetch_many(hs) == batch
        monkeypatch.setattr(manager, "_store", rec._core)
        assert rec.dsts == [[t.untyped_storage().data_ptr() for t in batch]]
        assert all(same_bytes(t, r) for t, r in zip(batch, refs))


def test_a_failed_fetch_leaves_the_storage_paged_out(backend, manager, monkeypatch):
    t = backend.tensor((70_000,), torch.uint8)
    ref = t.clone()
    h = manager.offload(t)
    core = manager._store
    monkeypatch.setattr(manager, "_store", _Recording(core, fail=True))
    with pytest.raises(aq.BackendError, match="injected"):
        manager.fetch(h)
    monkeypatch.setattr(manager, "_store", core)
    assert t.untyped_storage().nbytes() == 0 and aq.is_offloaded(t)
    assert h.state in ("offloaded", "in_flight")
    assert manager.fetch(h) is t and same_bytes(t, ref)

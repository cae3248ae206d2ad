"""The paging registry on torch whose cyclic garbage collector clears the weak references of a
storage still in use (torch <= 2.9; Note [Storage objects and the cyclic GC] in
storage_pins.py): which torch is affected, that a paged-out storage survives a collected
reference cycle on any torch, and that the strong references held on affected torch (forced
here on whatever torch runs the suite) keep paging's guarantees and are let go of."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import aqua_offload as aq
from aqua_offload import storage, storage_pins
from conftest import random_tensor


def _in_a_cycle(obj: object) -> None:
    """Leave ``obj`` referenced from a reference cycle only (as an exception's traceback can)."""
    box: list = [obj]
    box.append(box)


@pytest.mark.parametrize("version,want", [
    ("2.3.1+cu121", True), ("2.7.1", True), ("2.9.1+cu128", True), ("2.9.0a0+gitabc", True),
    ("2.10.0", False), ("2.11.0+cu130", False), ("2.13.0+cpu", False), ("2.15.0", False),
    ("3.0.0", False), ("1.13.1", True), ("nightly", False)])
def test_which_torch_is_affected(version, want):
    assert storage_pins.affected(version) is want


def test_the_running_torch_behaves_as_its_version_says():
    # The probe itself: a storage object in a collected cycle while its tensor lives.
    t = torch.empty(4)
    s = t.untyped_storage()
    fired: list[int] = []
    w = weakref.ref(s, lambda _: fired.append(1))
    _in_a_cycle(s)
    del s
    gc.collect()
    assert bool(fired) is storage_pins.affected(torch.__version__), torch.__version__
    assert t.untyped_storage() is not None and (w() is None) is bool(fired)
    assert storage_pins.ENABLED is storage_pins.affected(torch.__version__)


@pytest.fixture(params=["as_is", "pinned"])
def pins(request, monkeypatch):
    """The running torch as it is, and with the strong references forced on; swept early."""
    if request.param == "pinned":
        monkeypatch.setattr(storage_pins, "ENABLED", True)
    monkeypatch.setattr(storage_pins, "MIN_SWEEP", 2)  # (where pins are on at all)
    monkeypatch.setattr(storage_pins, "_since_sweep", 0)
    before = set(storage_pins._held)  # (what earlier tests' live paged-out tensors hold)
    yield request.param
    assert set(storage_pins._held) <= before  # every test lets go of all it made


def test_a_paged_out_storage_survives_a_collected_cycle(m, pins):
    t = random_tensor((3000,), torch.float32, generator=torch.Generator().manual_seed(1))
    ref = t.clone()
    h = m.offload(t)
    _in_a_cycle(t.untyped_storage())  # the storage object, unreachable but for the cycle
    del h  # the registry alone holds the handle now
    gc.collect()
    assert aq.is_offloaded(t)  # still paged out, still fetchable through the tensor
    assert m.fetch(t) is t and torch.equal(t, ref)
    assert not aq.is_offloaded(t)
    m.synchronize()
    assert m.stats()["live_handles"] == 0


def test_a_dropped_paged_out_tensor_gives_its_bytes_back(m, pins):
    gen = torch.Generator().manual_seed(2)
    base = m.stats()["tiers"][0]["used"]
    for _ in range(6):  # each release sweeps what the ones before left behind
        t = random_tensor((4096,), torch.uint8, generator=gen)
        m.offload(t)  # handle and tensor dropped at once, while paged out
        del t
    keep = random_tensor((4096,), torch.uint8, generator=gen)
    ref = keep.clone()
    h = m.offload(keep)
    gc.collect()
    m.synchronize()
    st = m.stats()
    assert st["live_handles"] <= (3 if pins == "pinned" else 1)  # swept, not piling up
    if pins == "pinned":  # one more release sweeps the rest
        extra = random_tensor((16,), torch.uint8, generator=gen)
        m.fetch(m.offload(extra))
        m.synchronize()
        assert m.stats()["live_handles"] == 1
    assert m.fetch(h) is keep and torch.equal(keep, ref)
    m.synchronize()
    assert m.stats()["live_handles"] == 0 and m.stats()["tiers"][0]["used"] == base


def test_a_discarded_storage_stays_refused_until_it_dies(m, pins):
    gen = torch.Generator().manual_seed(3)
    t = random_tensor((2048,), torch.float32, generator=gen)
    h = m.offload(t)
    m.free(h)  # the data is gone for good: the storage stays marked while it lives
    _in_a_cycle(t.untyped_storage())
    m.synchronize()  # a sweep: a storage a tensor still uses is kept
    gc.collect()
    assert aq.is_discarded(t)
    with pytest.raises(aq.InvalidArgumentError, match="paged out and its handle freed"):
        m.offload(t)
    key = storage.storage_key(t)
    del t
    gc.collect()
    m.synchronize()  # once no tensor uses it, a sweep lets it go and it dies
    gc.collect()
    assert storage._registry.get(key) is None
    assert key not in storage_pins._held


def test_a_sweep_is_due_once_as_many_were_held_as_are_held(monkeypatch):
    monkeypatch.setattr(storage_pins, "_held", {})
    monkeypatch.setattr(storage_pins, "_since_sweep", 0)
    monkeypatch.setattr(storage_pins, "MIN_SWEEP", 4)
    used = [torch.empty(8) for _ in range(3)]  # their storages: in use by these tensors
    stores = [t.untyped_storage() for t in used] + [torch.empty(8).untyped_storage()
                                                    for _ in range(3)]  # unused: objects only
    keys = [s._cdata for s in stores]
    storage_pins.hold(keys[:3], stores[:3])
    assert storage_pins.sweep() == []  # 3 held since the last sweep: not yet due (4)
    storage_pins.hold(keys[3:], stores[3:])
    kept = stores[5]  # an object held elsewhere too: a tensor can be made on it again
    del stores
    gone = storage_pins.sweep()  # 6 held since, 6 held: due; the unused two go
    assert sorted(s._cdata for s in gone) == sorted(keys[3:5])
    del gone, kept
    assert set(storage_pins._held) == set(keys[:3] + keys[5:])
    assert [s._cdata for s in storage_pins.sweep(force=True)] == keys[5:]  # now unused
    assert storage_pins.sweep() == []  # nothing held since
    assert {s._cdata for s in storage_pins.sweep(force=True)} == set()  # all still used
    del used
    assert {s._cdata for s in storage_pins.sweep(force=True)} == set(keys[:3])
    assert storage_pins._held == {}


def test_synchronize_gives_a_dropped_paged_out_tensors_bytes_back(m, pins):
    # (Pinned: whatever the sweep schedule, synchronize() sweeps; as on newer torch at once.)
    before = m.stats()["tiers"][0]["used"]
    t = random_tensor((4096,), torch.uint8, generator=torch.Generator().manual_seed(4))
    m.offload(t)
    assert m.stats()["tiers"][0]["used"] > before
    del t
    m.synchronize()
    st = m.stats()
    assert st["live_handles"] == 0 and st["tiers"][0]["used"] == before


def test_an_offload_that_finds_no_room_sweeps_first(m, pins, monkeypatch):
    # Paged-out tensors dropped since the last sweep hold their tier bytes (pinned); an offload
    # that finds no room lets go of them and tries again, as newer torch never ran out here.
    monkeypatch.setattr(storage_pins, "MIN_SWEEP", 1 << 20)  # no sweep on the schedule
    gen = torch.Generator().manual_seed(5)
    for _ in range(14):  # 14 MiB through 10 MiB of tiers, one 1 MiB tensor at a time
        t = random_tensor((1 << 20,), torch.uint8, generator=gen)
        m.offload(t)
        del t
    snap = random_tensor((1 << 20,), torch.uint8, generator=gen)
    for _ in range(10):  # snapshots need the room too
        t = random_tensor((1 << 20,), torch.uint8, generator=gen)
        m.offload(t)
        del t
    h = m.offload(snap, release=False)
    assert torch.equal(m.fetch(h), snap)
    m.synchronize()
    assert m.stats()["live_handles"] == 0


def test_close_does_not_restore_dropped_paged_out_tensors(pins, monkeypatch):
    # What no tensor uses any more is not fetched back at close (pinned: it was, 3 MiB).
    monkeypatch.setattr(storage_pins, "MIN_SWEEP", 1 << 20)
    m = aq.OffloadManager("cpu", peer_bytes="2MiB", host_bytes="8MiB")
    gen = torch.Generator().manual_seed(6)
    for _ in range(3):
        t = random_tensor((1 << 20,), torch.uint8, generator=gen)
        m.offload(t)
        del t
    keep = random_tensor((1000,), torch.uint8, generator=gen)
    ref = keep.clone()
    m.offload(keep)
    m.close()
    assert torch.equal(keep, ref) and not aq.is_offloaded(keep)
    assert m.stats()["bytes_fetched"] == 1000


def test_a_storage_object_held_alone_stays_pinned(m, pins):
    # No tensor uses the paged-out storage, but its object is held (use count 1): a tensor can
    # be made on it again, so a sweep keeps it (on affected torch, let go, a collected cycle
    # holding it then dropped the live storage's entry: is_offloaded False, the bytes gone).
    t = random_tensor((1000,), torch.float32, generator=torch.Generator().manual_seed(7))
    ref = t.clone()
    m.offload(t)
    s = t.untyped_storage()
    key = s._cdata
    del t
    m.synchronize()  # a sweep
    if storage_pins.ENABLED:
        assert key in storage_pins._held
    t2 = torch.empty(0).set_(s)  # a tensor on it again (0 elements: the storage has 0 bytes)
    _in_a_cycle(s)
    del s
    gc.collect()
    assert aq.is_offloaded(t2)
    back = m.fetch(t2)  # (the tensor the handle restores: t2 has no elements)
    assert back.untyped_storage()._cdata == key and torch.equal(back, ref)
    del t2, back
    m.synchronize()
    assert m.stats()["live_handles"] == 0 and key not in storage_pins._held


def test_an_exported_storage_stays_refused_after_a_collected_cycle(m, pins):
    np = pytest.importorskip("numpy")
    t = random_tensor((1000,), torch.float32, generator=torch.Generator().manual_seed(8))
    alias = np.from_dlpack(t)  # numpy writes into t's memory from now on
    key = storage.storage_key(t)
    _in_a_cycle(t.untyped_storage())
    gc.collect()
    with pytest.raises(aq.InvalidArgumentError, match="exported"):
        m.offload(t)  # paging it out would leave the alias on freed memory
    assert not aq.is_offloaded(t) and alias[0] == t[0].item()
    del t, alias
    gc.collect()
    m.synchronize()  # no tensor or array uses it now: let go, it dies, the mark with it
    gc.collect()
    assert key not in storage._exported and key not in storage_pins._held

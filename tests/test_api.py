"""Round trips through the public API, on every backend (the ``backend``/``manager`` fixtures:
emulation always, CUDA when a GPU is present)."""

from __future__ import annotations

import pickle

import pytest
import torch

import aqua_offload as aq
from conftest import same_bytes

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128]
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        DTYPES.append(getattr(torch, _name))
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 0, 4), (4, 33, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_release_round_trip_restores_same_object(backend, manager, dtype, shape):
    t = backend.tensor(shape, dtype)
    ref = t.clone()
    h = manager.offload(t)
    assert aq.is_offloaded(t)
    assert t.untyped_storage().nbytes() == 0
    assert h.nbytes == ref.numel() * ref.element_size()
    assert h.shape == ref.shape and h.dtype == dtype and h.release
    out = manager.fetch(h)
    assert out is t
    assert not aq.is_offloaded(t)
    assert same_bytes(t, ref)
    assert h.state == "fetched"
    assert t.device == backend.device


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_snapshot_round_trip_returns_new_tensor(backend, manager, dtype):
    t = backend.tensor((5, 6), dtype)
    ref = t.clone()
    h = manager.offload(t, release=False)
    assert not aq.is_offloaded(t)
    t.view(torch.uint8).fill_(0) if dtype != torch.bool else t.fill_(False)  # source stays usable
    out = manager.fetch(h)
    assert out is not t and out.device == backend.device
    assert same_bytes(out, ref)


def test_release_pages_out_every_view_of_the_storage(backend, manager):
    base = backend.tensor((64, 16), torch.float32)
    ref = base.clone()
    row, col, flat = base[3], base[:, 2], base.view(-1)
    storage_bytes = base.untyped_storage().nbytes()
    h = manager.offload(col)  # offloading one view pages out the whole storage
    assert h.nbytes == storage_bytes
    for v in (base, row, col, flat):
        assert aq.is_offloaded(v)
        assert v.untyped_storage().nbytes() == 0
    assert manager.fetch(h) is col
    assert same_bytes(base, ref) and same_bytes(row, ref[3]) and same_bytes(col, ref[:, 2])
    assert flat.data_ptr() == base.data_ptr()  # views share the restored memory


def test_snapshot_of_non_contiguous_and_conjugate_views(backend, manager):
    base = backend.tensor((8, 10), torch.complex64)
    for view in (base[:, ::3], base.t(), base[2:5, 1:9:2], base.conj(), base.t().conj()):
        ref = view.resolve_conj().clone()
        h = manager.offload(view, release=False)
        out = manager.fetch(h)
        assert out.shape == view.shape
        assert torch.equal(out, ref)


def test_snapshot_with_storage_offset_copies_only_the_tensor(backend, manager):
    base = backend.tensor((1000,), torch.int32)
    part = base[100:150]
    h = manager.offload(part, release=False)
    assert h.nbytes == 50 * 4
    assert torch.equal(manager.fetch(h), base[100:150])


def test_fetch_into_out(backend, manager):
    t = backend.tensor((16, 4), torch.float64)
    h = manager.offload(t, release=False)
    out = torch.empty_like(t)
    assert manager.fetch(h, out=out) is out
    assert same_bytes(out, t)


def test_repeated_release_cycles_carry_modifications(backend, manager):
    t = backend.tensor((128,), torch.int32)
    for i in range(5):
        t.add_(i + 1)  # the restored storage is ordinary, writable memory
        ref = t.clone()
        h = manager.offload(t)
        assert manager.fetch(h) is t
        assert same_bytes(t, ref)


def test_handle_attributes_and_states(backend, manager):
    t = backend.tensor((256, 256), torch.float32)
    h = manager.offload(t)
    assert h.state in ("in_flight", "offloaded")
    h.wait()
    assert h.ready() and h.state == "offloaded"
    assert h.tier == "peer" and h.location == backend.peer_label
    assert "Handle" in repr(h)
    manager.fetch(h)
    assert h.state == "fetched" and h.ready()
    s = manager.offload(t, release=False)
    s.free()
    assert s.state == "freed"


def test_tier_placement_peer_first_then_cascade(backend, manager):
    # peer tier is 1 MiB: two 400 KB tensors fit; the third evicts the least recently used
    # one down to the host tier and takes its place on the peer.
    ts = [backend.tensor((100_000,), torch.float32) for _ in range(3)]
    hs = [manager.offload(t, release=False) for t in ts[:2]]
    assert [h.tier for h in hs] == ["peer", "peer"]
    hs.append(manager.offload(ts[2], release=False))
    assert [h.tier for h in hs] == ["host", "peer", "peer"]
    assert hs[0].location == "cpu"
    st = manager.stats()
    assert [t["handles"] for t in st["tiers"]] == [2, 1]
    assert st["evictions"] == 1 and st["migrations"] == 1 and st["bytes_migrated"] == 400_000
    for h, t in zip(hs, ts):
        assert same_bytes(manager.fetch(h), t)


def test_host_only_manager(backend):
    with backend.manager(peers=None, host_bytes="1MiB") as m:
        t = backend.tensor((1000,), torch.int64)
        h = m.offload(t, release=False)
        assert h.tier == "host" and h.location == "cpu"
        assert same_bytes(m.fetch(h), t)


def test_peer_budget_mapping_selects_peers(backend):
    # peers="auto" with a mapping: its keys are the peers (here the backend's test peer, which
    # on one GPU is the compute device itself)
    with backend.manager(peers="auto", peer_bytes={backend.peer_label: "512KiB"},
                         host_bytes=0) as m:
        st = m.stats()
        assert [(t["tier"], t["location"], t["capacity"]) for t in st["tiers"]] == [
            ("peer", backend.peer_label, 512 << 10)]


def test_offload_many_fetch_many(backend, manager):
    ts = [backend.tensor((n,), torch.float16) for n in (1, 100, 1000, 0)]
    refs = [t.clone() for t in ts]
    hs = manager.offload_many(ts)
    assert all(aq.is_offloaded(t) for t in ts)
    outs = manager.fetch_many(hs)
    assert all(o is t for o, t in zip(outs, ts))
    assert all(same_bytes(t, r) for t, r in zip(ts, refs))


def test_offload_many_is_all_or_nothing(backend, manager):
    small = [backend.tensor((1000,), torch.float32) for _ in range(3)]
    refs = [t.clone() for t in small]
    huge = backend.tensor((2_000_000,), torch.float32)  # 8 MB: fits no tier
    before = manager.stats()
    with pytest.raises(aq.OutOfMemoryError):
        manager.offload_many(small + [huge])
    assert not any(aq.is_offloaded(t) for t in small + [huge])
    assert all(same_bytes(t, r) for t, r in zip(small, refs))
    manager.synchronize()
    after = manager.stats()
    assert after["live_handles"] == before["live_handles"] == 0
    assert [t["used"] for t in after["tiers"]] == [0, 0]


def test_fetch_by_tensor_and_module_level_helpers(backend):
    t = backend.tensor((300,), torch.float32)
    ref = t.clone()
    try:
        h = aq.offload(t)  # the default manager of t's device
        assert aq.is_offloaded(t)
        assert h.manager is aq.default_manager(backend.device)
        assert h.manager.device == backend.device
        assert aq.fetch(t) is t  # a paged-out tensor finds its own handle
        assert same_bytes(t, ref)
        s = aq.offload(t, release=False)
        assert same_bytes(aq.fetch(s), ref)
    finally:  # leave no session-wide manager behind: its pools (16 GiB pinned on CUDA, 64 MiB
        # of emu:1 on emulation) would hold memory that later tests see as taken
        aq.default_manager(backend.device).close()


def test_dropped_handle_of_released_tensor_is_still_recoverable(backend, manager):
    t = backend.tensor((100,), torch.int16)
    ref = t.clone()
    manager.offload(t)  # the handle is dropped at once
    assert aq.is_offloaded(t)
    assert aq.fetch(t) is t and same_bytes(t, ref)


def test_dropped_snapshot_handle_returns_its_block(backend, manager):
    t = backend.tensor((1000,), torch.float32)
    h = manager.offload(t, release=False)
    del h
    manager.synchronize()
    st = manager.stats()
    assert st["live_handles"] == 0 and st["tiers"][0]["used"] == 0


def test_deferred_reuse_blocks_reused_after_completion(backend, manager):
    # Fill the peer tier, free everything, fill it again: blocks come back once copies completed.
    for _ in range(3):
        hs = [manager.offload(backend.tensor((60_000,), torch.float32), release=False)
              for _ in range(4)]
        assert [h.tier for h in hs] == ["peer"] * 4
        for h in hs:
            h.free()
    manager.synchronize()
    st = manager.stats()
    assert st["tiers"][0]["used"] == 0 and st["tiers"][0]["fenced"] == 0
    assert st["tiers"][0]["peak"] >= 4 * 240_000


def test_stats_counters(backend, manager):
    t = backend.tensor((1024,), torch.float32)
    h = manager.offload(t)
    manager.fetch(h)
    s = manager.offload(t, release=False)
    s.free()
    st = manager.stats()
    assert st["offloads"] == 2 and st["fetches"] == 1 and st["frees"] == 1
    assert st["bytes_offloaded"] == 8192 and st["bytes_fetched"] == 4096
    assert st["backend"] == backend.name and st["device"] == str(backend.device)
    for tier in st["tiers"]:
        assert tier["used"] + tier["free"] == tier["capacity"]
        assert 0.0 <= tier["fragmentation"] <= 1.0


def test_info_reports_backend_and_managers(backend, manager):
    i = aq.info()
    if not torch.cuda.is_available():
        assert i["backend"] == "emulation" and i["emulation"] is True
    if backend.cuda:  # info() describes the backend OffloadManager() would pick: CUDA here
        assert i["backend"] == "cuda" and i["emulation"] is False
    assert any(m["device"] == str(backend.device) and m["backend"] == backend.name
               for m in i["managers"])
    n = len(i["devices"])
    assert len(i["peer_access"]) == n and all(len(r) == n for r in i["peer_access"])


def test_close_restores_released_tensors(backend):
    m = backend.manager(peer_bytes="1MiB", host_bytes="1MiB")
    t = backend.tensor((5000,), torch.float64)
    ref = t.clone()
    m.offload(t)
    m.close()
    assert not aq.is_offloaded(t) and same_bytes(t, ref)
    assert m.closed
    with pytest.raises(aq.OffloadError, match="closed"):
        m.offload(t)
    m.close()  # idempotent


def test_context_manager_and_repr(backend):
    with backend.manager(peers=None, host_bytes="64KiB") as m:
        assert "OffloadManager" in repr(m)
    assert m.closed


@pytest.mark.parametrize("text,expected", [
    (4096, 4096), ("4096", 4096), ("8GiB", 8 << 30), ("512 MiB", 512 << 20), ("1.5GB", 1_500_000_000),
    ("0.5KiB", 512), ("2kb", 2000), ("3TiB", 3 << 40), ("0", 0)])
def test_parse_size(text, expected):
    assert aq.parse_size(text) == expected


@pytest.mark.parametrize("bad", [-1, "-3GiB", "12 parsecs", "GiB", "0.3B", 1.5, True, None, "1e3"])
def test_parse_size_rejects(bad):
    with pytest.raises(aq.InvalidArgumentError):
        aq.parse_size(bad)


def test_errors_pickle_with_attributes():
    for exc in (aq.OutOfMemoryError("no room", requested=123),
                aq.BackendError("boom", error_name="cudaErrorInvalidValue"),
                aq.InvalidHandleError("gone"), aq.InvalidArgumentError("bad"),
                aq.OffloadError("base"), aq.PagedOutError("touch")):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
    assert pickle.loads(pickle.dumps(aq.OutOfMemoryError("x", requested=7))).requested == 7
    assert pickle.loads(pickle.dumps(aq.BackendError("x", error_name="e"))).error_name == "e"
    assert issubclass(aq.OutOfMemoryError, MemoryError)
    assert issubclass(aq.BackendError, RuntimeError)
    for cls in (aq.OutOfMemoryError, aq.InvalidHandleError, aq.InvalidArgumentError,
                aq.BackendError, aq.PagedOutError):
        assert issubclass(cls, aq.OffloadError)


def test_no_event_creation_in_steady_state(backend, manager):
    t = backend.tensor((4096,), torch.float32)
    for _ in range(3):
        manager.fetch(manager.offload(t))
    created = manager.stats()["events_created"]
    for i in range(300):
        h = manager.offload(t, release=bool(i % 2))
        manager.fetch(h)
    assert manager.stats()["events_created"] == created


@pytest.mark.parametrize("chunk", ["256", "1KiB", "4KiB"])
def test_chunked_copies_are_exact(backend, chunk):
    # Emulation copies whole by default; CUDA splits large copies. Exercise the splitting.
    with backend.manager(peer_bytes="1MiB", host_bytes="1MiB", chunk_bytes=chunk) as m:
        for n in (1, 255, 256, 257, 1000, 4097, 65_537):
            t = backend.tensor((n,), torch.uint8)
            ref = t.clone()
            s = m.offload(t, release=False)
            h = m.offload(t)
            assert same_bytes(m.fetch(s), ref)
            assert m.fetch(h) is t and same_bytes(t, ref)


def test_chunk_bytes_below_one_block_is_rejected(backend):
    with pytest.raises(aq.InvalidArgumentError, match="chunk_bytes"):
        backend.manager(host_bytes="1MiB", chunk_bytes=100)


def test_fetch_many_keep_leaves_tier_copies_fetchable_again(backend, manager):
    srcs = [backend.tensor((64, 33), torch.float32) for s in range(3)]
    hs = manager.offload_many(srcs, release=False)
    used = manager.stats()["tiers"][0]["used"]
    for _ in range(2):  # kept: the same handles fetch again, the tier still holds them
        got = manager.fetch_many(hs, keep=True)
        assert all(same_bytes(g, s) for g, s in zip(got, srcs))
        assert all(h.state == "offloaded" for h in hs)
        assert manager.stats()["tiers"][0]["used"] == used
    manager.fetch_many(hs)  # without keep: consumed
    assert all(h.state == "fetched" for h in hs)
    assert manager.stats()["tiers"][0]["used"] == 0


def test_fetch_many_keep_of_released_tensors_then_incremental_base(backend, manager):
    t = backend.tensor((1024,), torch.int32)
    h = manager.offload(t)
    (back,) = manager.fetch_many([h], keep=True)
    assert back is t and not aq.is_offloaded(t)
    with pytest.raises(aq.InvalidHandleError):  # a kept copy is a base, not fetchable
        manager.fetch_many([h])
    grown = torch.cat([t, backend.tensor((256,), torch.int32)])
    h2 = manager.offload(grown, release=False, base=h)
    assert same_bytes(manager.fetch(h2), grown)


def test_prefetch_many_then_fetch_many(backend, manager):
    srcs = [backend.tensor((300,), torch.float64) for s in range(4)]
    hs = manager.offload_many(srcs, release=False)
    assert manager.prefetch_many(hs + hs[:1]) == hs + hs[:1]  # a repeat is left as it is
    assert manager.stats()["prefetched_bytes"] == sum(h.nbytes for h in hs)
    got = manager.fetch_many(hs, keep=True)
    assert all(same_bytes(g, s) for g, s in zip(got, srcs))
    assert manager.stats()["prefetched_bytes"] == 0
    manager.prefetch_many(hs[:2])
    for h in hs:
        manager.free(h)  # frees a prefetched handle's buffer too
    assert manager.stats()["prefetched_bytes"] == 0
    assert manager.stats()["tiers"][0]["used"] == 0
    with pytest.raises(aq.InvalidHandleError):
        manager.prefetch_many(hs[:1])

"""The same API on a real GPU, plus stream-ordering stress. Marked `cuda`: skipped with a reason
when no GPU is usable (see conftest.py)."""

from __future__ import annotations

import threading

import pytest
import torch

import aqua_offload as aq
from conftest import random_tensor, same_bytes

pytestmark = pytest.mark.cuda

DEV = "cuda:0"


@pytest.fixture(params=["host", "same-device-peer"])
def gpu_manager(request):
    peers = None if request.param == "host" else [0]
    m = aq.OffloadManager(DEV, peers=peers, peer_bytes="512MiB", host_bytes="512MiB")
    yield m
    m.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool,
                                   torch.complex64, getattr(torch, "float8_e4m3fn", torch.uint8)],
                         ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 1000), (257, 129)], ids=str)
def test_round_trips(gpu_manager, dtype, shape):
    t = random_tensor(shape, dtype, device=DEV)
    ref = t.clone()
    s = gpu_manager.offload(t, release=False)
    h = gpu_manager.offload(t)
    assert aq.is_offloaded(t) and t.untyped_storage().nbytes() == 0
    assert same_bytes(gpu_manager.fetch(s), ref)
    assert gpu_manager.fetch(h) is t and same_bytes(t, ref)
    assert t.device == torch.device(DEV)


def test_tier_and_location(gpu_manager):
    h = gpu_manager.offload(random_tensor((1024,), torch.float32, device=DEV))
    if gpu_manager.stats()["tiers"][0]["tier"] == "peer":
        assert (h.tier, h.location) == ("peer", "cuda:0")
    else:
        assert (h.tier, h.location) == ("host", "cpu")
    gpu_manager.fetch(h)


def _busy(n: int = 4) -> torch.Tensor:
    """Enqueue some long kernels on the current stream, to widen any race window."""
    a = torch.randn(2048, 2048, device=DEV)
    for _ in range(n):
        a = a @ a
        a = a / a.norm()
    return a


def test_offload_waits_for_the_producing_kernel_and_release_defers_reuse(gpu_manager):
    side = torch.cuda.Stream()
    for i in range(20):
        with torch.cuda.stream(side):
            _busy()
            x = torch.full((16 << 20,), float(i + 1), device=DEV)  # written by a kernel...
            x.mul_(3).add_(torch.arange(x.numel(), device=DEV, dtype=torch.float32) % 7)
            ref = x.clone()
            h = gpu_manager.offload(x)  # ...that the copy must wait for (no host sync here)
            # New allocations on the stream would reuse x's block if it were freed too early.
            junk = [torch.full((16 << 20,), -1.0, device=DEV) for _ in range(3)]
            del junk
            gpu_manager.fetch(h)
            assert torch.equal(x, ref)
        side.synchronize()


def test_snapshot_is_fenced_before_later_writes(gpu_manager):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for _ in range(10):
            t = torch.randn(8 << 20, device=DEV)
            ref = t.clone()
            h = gpu_manager.offload(t, release=False)
            t.mul_(-2)  # must not race the snapshot's copy
            assert torch.equal(gpu_manager.fetch(h), ref)


def test_fetch_orders_the_current_stream(gpu_manager):
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        t = torch.randn(32 << 20, device=DEV)
        ref_sum = t.double().sum()
        for _ in range(5):
            h = gpu_manager.offload(t)
            out = gpu_manager.fetch(h)
            assert out.double().sum() == ref_sum  # kernel on s reads after the copy


def test_offload_on_one_stream_fetch_on_another(gpu_manager):
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(a):
        t = torch.randn(16 << 20, device=DEV)
        ref = t.clone()
        h = gpu_manager.offload(t, release=False)
    with torch.cuda.stream(b):
        out = gpu_manager.fetch(h)  # the copy back must wait for the offload's completion
    torch.cuda.synchronize()  # only for comparing ref (written on a) on the host side
    assert torch.equal(out, ref)


def test_threads_with_their_own_streams(gpu_manager):
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            g = torch.Generator().manual_seed(seed)
            with torch.cuda.stream(torch.cuda.Stream()):
                for _ in range(30):
                    t = random_tensor((1 << 18,), torch.int32, device=DEV, generator=g)
                    ref = t.clone()
                    h = gpu_manager.offload(t, release=bool(seed % 2))
                    out = gpu_manager.fetch(h)
                    assert torch.equal(out, ref)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads)
    assert not errors, errors


def test_wrong_device_and_steady_state_allocations(gpu_manager):
    with pytest.raises(aq.InvalidArgumentError):
        gpu_manager.offload(torch.ones(4))
    t = torch.randn(1 << 20, device=DEV)
    for _ in range(5):
        gpu_manager.fetch(gpu_manager.offload(t))
    created = gpu_manager.stats()["events_created"]
    for _ in range(200):
        gpu_manager.fetch(gpu_manager.offload(t))
    assert gpu_manager.stats()["events_created"] == created  # no event creation on the hot path


def test_info_on_gpu():
    i = aq.info()
    assert i["backend"] == "cuda" and i["emulation"] is False
    assert len(i["devices"]) == torch.cuda.device_count()
    assert i["devices"][0]["label"] == "cuda:0"


# -- tier cascade on a GPU (one GPU: a same-device "peer" stands in for another GPU) ----------
@pytest.fixture
def cascade_manager():
    m = aq.OffloadManager(DEV, peers=[0], peer_bytes="64MiB", host_bytes="256MiB")
    yield m
    m.close()


def test_cascade_eviction_and_fetch_mid_migration(cascade_manager):
    m = cascade_manager
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        ts = [torch.randn(4 << 20, device=DEV) for _ in range(6)]  # 16 MiB each: 4 fit the peer
        refs = [t.clone() for t in ts]
        hs = [m.offload(t, release=bool(i % 2)) for i, t in enumerate(ts)]
        assert m.stats()["evictions"] >= 2 and {h.tier for h in hs} == {"peer", "host"}
        for h, ref in zip(hs, refs):  # right after the evictions were enqueued: no host sync
            out = m.fetch(h)
            assert torch.equal(out, ref)


def test_lend_reclaim_while_other_streams_work(cascade_manager):
    m = cascade_manager
    m.lend(DEV, "64MiB")
    ts = [torch.randn(2 << 20, device=DEV) for _ in range(12)]
    refs = [t.clone() for t in ts]
    hs = [m.offload(t, release=False) for t in ts]
    stop = threading.Event()
    errors: list[BaseException] = []

    def traffic() -> None:
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                while not stop.is_set():
                    t = torch.randn(1 << 18, device=DEV)
                    assert torch.equal(m.fetch(m.offload(t, release=False)), t)
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=traffic)
    th.start()
    try:
        assert m.reclaim(DEV) >= 64 << 20
    finally:
        stop.set()
        th.join(timeout=120)
    assert not errors, errors
    assert m.stats()["reclaims"] == 1 and m.stats()["reclaim_last_s"] > 0
    for h, ref in zip(hs, refs):
        assert torch.equal(m.fetch(h), ref)


def test_batched_and_prefetched_transfers(cascade_manager):
    m = cascade_manager
    small = [torch.randint(0, 1 << 30, (16 << 10,), device=DEV, dtype=torch.int32)
             for _ in range(64)]
    hs = m.offload_many(small, release=False)
    outs = m.fetch_many(hs)
    assert all(torch.equal(o, t) for o, t in zip(outs, small))
    t = torch.randn(8 << 20, device=DEV)
    ref = t.clone()
    h = m.offload(t)
    m.prefetch(h)
    torch.cuda.synchronize()
    before = m.stats()["bytes_fetched"]
    assert m.fetch(h) is t and torch.equal(t, ref)
    assert m.stats()["bytes_fetched"] == before  # the prefetch already moved the bytes


def test_incremental_offload_on_gpu(cascade_manager):
    m = cascade_manager
    kv = torch.randn(1 << 20, device=DEV)
    h = m.offload(kv, release=False)
    m.fetch(h, keep=True)
    grown = torch.cat([kv, torch.randn(1 << 10, device=DEV)])
    h2 = m.offload(grown, release=False, base=h)
    assert torch.equal(m.fetch(h2), grown)


# -- prefetch and fetch/free on different streams --------------------------------------------
@pytest.mark.parametrize("release", [False, True])
def test_prefetch_on_one_stream_fetch_on_another(gpu_manager, release):
    """The prefetch is issued on stream a behind queued kernels; the fetch on stream b must order
    b after the copy back: a kernel enqueued on b right after the fetch sees every byte (no host
    sync before it; the comparison comes after)."""
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    for _ in range(5):
        with torch.cuda.stream(a):
            t = torch.randn(16 << 20, device=DEV)  # 64 MiB
            ref = t.clone()
            h = gpu_manager.offload(t, release=release)
            _busy()  # the copy back, ordered after a's work so far, starts late
            assert gpu_manager.prefetch(h) is h
        with torch.cuda.stream(b):
            out = gpu_manager.fetch(h)
            seen = out.clone()  # reads on b right after the fetch
        if release:
            assert out is t
        torch.cuda.synchronize()  # only now: ref was written on a
        assert torch.equal(seen, ref) and torch.equal(out, ref)
        assert gpu_manager.stats()["prefetched_bytes"] == 0


@pytest.mark.parametrize("release", [False, True])
def test_prefetch_on_one_stream_free_on_another(gpu_manager, release):
    """A prefetched handle freed from stream b while its copy back (issued on stream a behind
    queued kernels) has not run yet: the prefetch buffer must not serve new allocations before
    that copy finished, or the copy would overwrite the new owner's bytes. A same-sized
    allocation on a right after the free is filled by a kernel and must keep its value."""
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    n = 16 << 20  # float32 elements: 64 MiB
    for _ in range(5):
        with torch.cuda.stream(a):
            t = torch.full((n,), 7.0, device=DEV)
            h = gpu_manager.offload(t, release=release)
            _busy()
            gpu_manager.prefetch(h)  # the buffer is allocated on a; its copy waits for a's work
        with torch.cuda.stream(b):
            gpu_manager.free(h)
        assert h.state == "freed"
        with torch.cuda.stream(a):
            junk = torch.empty(n, device=DEV)  # may be handed the prefetch buffer's memory
            junk.fill_(-1.0)
        torch.cuda.synchronize()
        assert bool((junk == -1.0).all()), "a freed prefetch buffer was overwritten after reuse"
        del junk, t
    gpu_manager.synchronize()
    s = gpu_manager.stats()
    assert s["prefetched_bytes"] == 0 and s["live_handles"] == 0
    assert all(t["used"] == 0 and t["fenced"] == 0 for t in s["tiers"])


# -- a compute device other than cuda:0 ------------------------------------------------------
@pytest.fixture
def second_gpu() -> torch.device:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a second GPU: only one CUDA device is visible")
    return torch.device("cuda", 1)


@pytest.mark.parametrize("peers", ["same-device", "cuda:0", "host-only"])
def test_compute_device_other_than_0(second_gpu, peers):
    """A manager of cuda:1 while cuda:0 stays the current device: offloads, fetched tensors,
    prefetch buffers, the cascade and lending all act on cuda:1 (or its peer), never on the
    current device."""
    dev = second_gpu
    if peers == "cuda:0" and not aq.info()["peer_access"][1][0]:
        pytest.skip("cuda:1 cannot reach cuda:0 as a peer on this machine")
    peer_list = {"same-device": [1], "cuda:0": [0], "host-only": None}[peers]
    want = {"same-device": ("peer", "cuda:1"), "cuda:0": ("peer", "cuda:0"),
            "host-only": ("host", "cpu")}[peers]
    with torch.cuda.device(0), aq.OffloadManager(dev, peers=peer_list, peer_bytes="64MiB",
                                                  host_bytes="256MiB") as m:
        assert m.device == dev and m.stats()["device"] == "cuda:1"
        for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool):
            t = random_tensor((1000, 33), dtype, device=str(dev))
            ref = t.clone()
            s = m.offload(t, release=False)
            h = m.offload(t)
            assert (h.tier, h.location) == want
            assert aq.is_offloaded(t)
            out = m.fetch(s)
            assert out.device == dev and same_bytes(out, ref)
            assert m.fetch(h) is t and t.device == dev and same_bytes(t, ref)
        # on one of cuda:1's streams (the current device follows it), with a prefetch
        with torch.cuda.stream(torch.cuda.Stream(dev)):
            t = torch.randn(4 << 20, device=dev)
            ref = t.clone()
            h = m.offload(t)
            m.prefetch(h)
            assert m.fetch(h) is t and torch.equal(t, ref)
        # the cascade: 6 x 16 MiB through a 64 MiB peer, fetched right after the evictions
        ts = [torch.randn(4 << 20, device=dev) for _ in range(6)]
        refs = [x.clone() for x in ts]
        hs = [m.offload(x, release=bool(i % 2)) for i, x in enumerate(ts)]
        if peer_list is not None:
            assert m.stats()["evictions"] >= 2
        for hh, r in zip(hs, refs):
            out = m.fetch(hh)
            assert out.device == dev and torch.equal(out, r)
        if peer_list is not None:
            assert m.lend(want[1], "16MiB") == 80 << 20
            assert m.reclaim(want[1]) >= 16 << 20
        assert torch.cuda.current_device() == 0  # the manager never switched it

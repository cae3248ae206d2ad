"""Threads racing calls on one handle or one manager, on every backend (``backend`` fixture):
fetch against fetch, fetch against free, prefetch against prefetch, an offload or a second
fetch while a fetch retires its handle, synchronize() against offloads. Exactly one of two
racing calls wins, the loser gets InvalidHandleError, and no byte is lost. Joins have a
timeout, so a deadlock fails the test instead of hanging it."""

from __future__ import annotations

import threading

import pytest
import torch

import aqua_offload as aq
from helpers import JOIN_TIMEOUT_S, assert_drained, no_errors, run_threads
from helpers import bits as tensor_bytes
from helpers import storage_bits as storage_bytes


def test_offload_while_another_thread_fetches_a_released_tensor(backend, monkeypatch):
    """Regression test (a race once found here): holder reaping must not trip on a handle
    another thread is retiring.

    Thread B fetches a released tensor and is paused right after the store consumed the
    handle (inside storage.swap_in, before the manager retires the handle). Meanwhile thread A
    offloads an unrelated tensor: that must succeed, and B's fetch must complete intact."""
    from aqua_offload import storage

    m = backend.manager(peer_bytes="64KiB", host_bytes="64KiB")
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=gen).to(backend.device)
    ref = t.clone()
    h = m.offload(t)  # release=True (on emulation a holder is parked on the manager)

    in_window, resume = threading.Event(), threading.Event()
    real_swap_in = storage.swap_in

    def paused_swap_in(store, filled):
        in_window.set()
        assert resume.wait(JOIN_TIMEOUT_S)
        real_swap_in(store, filled)

    monkeypatch.setattr(storage, "swap_in", paused_swap_in)
    fetched: list = []
    b = threading.Thread(target=lambda: fetched.append(m.fetch(h)), daemon=True)
    b.start()
    try:
        assert in_window.wait(JOIN_TIMEOUT_S)
        other = torch.randint(0, 256, (1024,), dtype=torch.uint8,
                              generator=gen).to(backend.device)
        h2 = m.offload(other, release=False)
        assert torch.equal(m.fetch(h2), other)
    finally:
        resume.set()
        b.join(JOIN_TIMEOUT_S)
        monkeypatch.undo()
        assert not b.is_alive()
        assert fetched and fetched[0] is t and torch.equal(t, ref)
        assert_drained(m)
        m.close()


def test_second_fetch_while_first_is_retiring(backend, monkeypatch):
    """Thread B fetches a released tensor and is paused right after the storage was restored
    (storage.swap_in returned, handle not yet retired). A second fetch of the same handle waits
    for B (fetches of one handle are serialised) and then fails with InvalidHandleError, like
    any double fetch, changing nothing."""
    from aqua_offload import storage

    m = backend.manager(peer_bytes="64KiB", host_bytes="64KiB")
    gen = torch.Generator().manual_seed(6)
    t = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=gen).to(backend.device)
    ref = t.clone()
    h = m.offload(t)

    in_window, resume = threading.Event(), threading.Event()
    real_swap_in = storage.swap_in

    def swap_in_then_pause(store, filled):
        real_swap_in(store, filled)
        in_window.set()
        assert resume.wait(JOIN_TIMEOUT_S)

    monkeypatch.setattr(storage, "swap_in", swap_in_then_pause)
    fetched: list = []
    second: list = []

    def second_fetch() -> None:
        try:
            m.fetch(h)
            second.append("returned")
        except aq.OffloadError as e:
            second.append(e)

    b = threading.Thread(target=lambda: fetched.append(m.fetch(h)), daemon=True)
    b.start()
    c = threading.Thread(target=second_fetch, daemon=True)
    try:
        assert in_window.wait(JOIN_TIMEOUT_S)
        c.start()
        c.join(0.2)
        assert c.is_alive() and not second  # waits for the first fetch to finish
    finally:
        resume.set()
        b.join(JOIN_TIMEOUT_S)
        c.join(JOIN_TIMEOUT_S)
        monkeypatch.undo()
    assert not b.is_alive() and not c.is_alive()
    assert len(second) == 1 and isinstance(second[0], aq.InvalidHandleError), second
    assert fetched and fetched[0] is t and torch.equal(t, ref)
    assert_drained(m)
    m.close()


@pytest.mark.parametrize("release", [True, False])
def test_racing_fetches_of_one_handle(backend, release):
    """Two threads fetch the same handle at once: exactly one gets the tensor, the other
    InvalidHandleError; the data is intact."""
    m = backend.manager(peer_bytes="64KiB", host_bytes="64KiB")
    gen = torch.Generator().manual_seed(7)
    barrier = threading.Barrier(2)
    for round_ in range(150):
        t = torch.randint(0, 256, (4096 + 256 * (round_ % 8),), dtype=torch.uint8,
                          generator=gen).to(backend.device).view(torch.float32)
        ref = storage_bytes(t)
        h = m.offload(t, release=release)
        results: list = [None, None]

        def racer(i: int) -> None:
            barrier.wait()
            try:
                results[i] = ("ok", m.fetch(h))
            except aq.OffloadError as e:
                results[i] = ("err", e)

        errors = run_threads([lambda i=i: racer(i) for i in range(2)], timeout=30)
        no_errors(errors)
        oks = [r[1] for r in results if r[0] == "ok"]
        errs = [r[1] for r in results if r[0] == "err"]
        assert len(oks) == 1 and len(errs) == 1, (round_, results)
        assert isinstance(errs[0], aq.InvalidHandleError), (round_, type(errs[0]), errs[0])
        if release:
            assert oks[0] is t
            assert not aq.is_offloaded(t)
            assert torch.equal(storage_bytes(t), ref)
        else:
            assert torch.equal(tensor_bytes(oks[0]), ref)
        assert h.state == "fetched"
    assert_drained(m)
    m.close()


@pytest.mark.parametrize("release", [True, False])
def test_racing_fetch_and_free_of_one_handle(backend, release):
    """One thread fetches, another frees the same handle: exactly one wins, the other gets
    InvalidHandleError; a won fetch has the data, a won free leaves an empty storage."""
    m = backend.manager(peer_bytes="64KiB", host_bytes="64KiB")
    gen = torch.Generator().manual_seed(11)
    barrier = threading.Barrier(2)
    wins = {"fetch": 0, "free": 0}
    for round_ in range(150):
        t = torch.randint(0, 256, (8192,), dtype=torch.uint8,
                          generator=gen).to(backend.device).view(torch.int64)
        ref = storage_bytes(t)
        h = m.offload(t, release=release)
        results: dict = {}

        def do(kind: str) -> None:
            barrier.wait()
            try:
                results[kind] = ("ok", m.fetch(h) if kind == "fetch" else m.free(h))
            except aq.OffloadError as e:
                results[kind] = ("err", e)

        errors = run_threads([lambda: do("fetch"), lambda: do("free")], timeout=30)
        no_errors(errors)
        winners = [k for k, r in results.items() if r[0] == "ok"]
        assert len(winners) == 1, (round_, results)
        loser = "free" if winners[0] == "fetch" else "fetch"
        assert isinstance(results[loser][1], aq.InvalidHandleError), (round_, results)
        wins[winners[0]] += 1
        assert not aq.is_offloaded(t)
        if winners[0] == "fetch":
            out = results["fetch"][1]
            assert h.state == "fetched"
            if release:
                assert out is t
                assert torch.equal(storage_bytes(t), ref)
            else:
                assert torch.equal(tensor_bytes(out), ref)
        else:
            assert h.state == "freed"
            if release:
                assert t.untyped_storage().nbytes() == 0
            else:
                assert torch.equal(storage_bytes(t), ref)
    assert wins["fetch"] + wins["free"] == 150
    assert_drained(m)
    m.close()


def test_synchronize_does_not_mark_later_offloads_complete(backend):
    """Regression (review): synchronize() marked every in-flight handle offloaded, including
    offloads submitted by other threads after its stream syncs: their sources (emulation
    holders) were then dropped while the copies still read them."""
    m = backend.manager(peers=None, host_bytes="64MiB")
    stop = threading.Event()

    def syncer() -> None:
        while not stop.is_set():
            m.synchronize()

    th = threading.Thread(target=syncer, daemon=True)
    th.start()
    gen = torch.Generator().manual_seed(11)
    try:
        for _ in range(400):
            t = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8,
                              generator=gen).to(backend.device)
            ref = t.clone()
            h = m.offload(t)  # release: the holder is reaped once the copy is seen complete
            filler = [torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, device=backend.device)
                      for _ in range(2)]
            assert m.fetch(h) is t and torch.equal(t, ref)
            del filler
    finally:
        stop.set()
        th.join(JOIN_TIMEOUT_S)
    assert not th.is_alive()
    m.close()


def test_concurrent_prefetches_of_one_handle(backend):
    """Regression (review): two threads prefetching one handle each allocated a buffer; one was
    dropped while the copy still wrote into it (heap corruption on emulation)."""
    m = backend.manager(peer_bytes="8MiB", host_bytes="8MiB")
    gen = torch.Generator().manual_seed(12)
    for _ in range(200):
        t = torch.randint(0, 256, (1 << 15,), dtype=torch.uint8,
                          generator=gen).to(backend.device)
        h = m.offload(t, release=False)
        barrier = threading.Barrier(2)

        def pre() -> None:
            barrier.wait()
            m.prefetch(h)

        errors = run_threads([pre, pre], timeout=30)
        no_errors(errors)
        assert m.stats()["prefetched_bytes"] == t.numel()
        assert torch.equal(m.fetch(h), t)
        assert m.stats()["prefetched_bytes"] == 0
    m.close()

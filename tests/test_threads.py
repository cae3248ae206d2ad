"""Thread stress on one shared OffloadManager, on every backend (``backend`` fixture: emulation
always, CUDA when a GPU is present).

Every thread checks its own data bitwise after each fetch; the pools are small enough that
OutOfMemoryError happens now and then, and then the tensor must be untouched. Joins have a
timeout, so a deadlock fails the test instead of hanging it (the threads are daemons).
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

import aqua_offload as aq
from helpers import JOIN_TIMEOUT_S, no_errors, run_threads
from helpers import bits as tensor_bytes
from helpers import storage_bits as storage_bytes

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8,
          torch.complex64, torch.int32]


def random_tensor(rng: random.Random, gen: torch.Generator, max_bytes: int,
                  device: torch.device) -> torch.Tensor:
    dtype = rng.choice(DTYPES)
    es = torch.empty(0, dtype=dtype).element_size()
    n = rng.randrange(0, max_bytes // es + 1)
    raw = torch.randint(0, 256, (n * es,), dtype=torch.uint8, generator=gen).to(device)
    t = raw.view(dtype)
    if n >= 6 and rng.random() < 0.5:
        t = t[: n - n % 6].view(-1, 6)
    return t


def assert_drained(m: aq.OffloadManager) -> dict:
    """Nothing live, one free range per tier, and (every copy done) no byte fenced."""
    m.synchronize()
    s = m.stats()
    assert s["live_handles"] == 0
    for t in s["tiers"]:
        assert t["used"] == 0, t
        assert t["fenced"] == 0, t
        assert t["blocks"] == 0 and t["handles"] == 0, t
        assert t["used"] + t["free"] == t["capacity"]
        assert t["free_ranges"] == 1 and t["largest_free"] == t["capacity"], t
    return s


def test_thread_stress_shared_manager(backend):
    n_threads, iters = 8, 200
    m = backend.manager(peer_bytes="16KiB", host_bytes="48KiB")
    counts = [dict(offloads=0, fetches=0, frees=0, ooms=0, reap_races=0)
              for _ in range(n_threads)]
    stop = threading.Event()

    def worker(k: int) -> None:
        rng = random.Random(1000 + k)
        gen = torch.Generator().manual_seed(2000 + k)
        c = counts[k]
        live: list[tuple] = []  # (handle, tensor, reference bytes)

        def finish(entry, how: str) -> None:
            h, t, ref = entry
            if how == "free":
                m.free(h)
                c["frees"] += 1
                if h.release:
                    assert not aq.is_offloaded(t)
                    assert t.untyped_storage().nbytes() == 0
                return
            out = m.fetch(h)
            c["fetches"] += 1
            if h.release:
                assert out is t
                assert not aq.is_offloaded(t)
                assert torch.equal(storage_bytes(t), ref)
            else:
                assert out.shape == t.shape and out.dtype == t.dtype
                assert torch.equal(tensor_bytes(out), ref)
                assert torch.equal(tensor_bytes(t), ref)  # the source was left alone
            assert h.state == "fetched"

        for _ in range(iters):
            r = rng.random()
            if len(live) < 3 and r < 0.55:
                t = random_tensor(rng, gen, 8 << 10, backend.device)
                release = rng.random() < 0.5
                if not release and t.dim() == 2 and rng.random() < 0.5:
                    t = t[:, 1::2]  # non-contiguous snapshot
                ref = storage_bytes(t) if release else tensor_bytes(t)
                want = t.untyped_storage().nbytes() if release else t.numel() * t.element_size()
                try:
                    h = m.offload(t, release=release)
                except aq.OutOfMemoryError as e:
                    c["ooms"] += 1
                    assert e.requested == want
                    assert not aq.is_offloaded(t)
                    now = storage_bytes(t) if release else tensor_bytes(t)
                    assert torch.equal(now, ref)
                    continue
                c["offloads"] += 1
                assert h.nbytes == want
                if release:
                    assert aq.is_offloaded(t)
                live.append((h, t, ref))
            elif live:
                entry = live.pop(rng.randrange(len(live)))
                r = rng.random()
                if r < 0.2:
                    entry[0].wait()
                    assert entry[0].ready()
                finish(entry, "free" if r > 0.8 else "fetch")
        for entry in live:
            finish(entry, "fetch")

    def monitor() -> None:
        while not stop.is_set():
            s = m.stats()
            for t in s["tiers"]:
                assert t["used"] + t["free"] == t["capacity"]
                assert t["largest_free"] <= t["free"], t
                # fenced bytes are free bytes a copy may still touch (reusable in stream
                # order); the key must be there, and it drains to 0 in assert_drained
                assert type(t["fenced"]) is int and t["fenced"] >= 0, t
            assert sum(t["handles"] for t in s["tiers"]) == s["live_handles"]
            if random.random() < 0.1:
                m.synchronize()
            time.sleep(0.001)

    mon_errors: list[BaseException] = []

    def mon_body():
        try:
            monitor()
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            mon_errors.append(e)

    mon = threading.Thread(target=mon_body, daemon=True)
    mon.start()
    try:
        errors = run_threads([lambda k=k: worker(k) for k in range(n_threads)])
    finally:
        stop.set()
        mon.join(JOIN_TIMEOUT_S)
    assert not mon.is_alive()
    no_errors(errors)
    assert not mon_errors, mon_errors
    s = assert_drained(m)
    total = {k: sum(c[k] for c in counts) for k in counts[0]}
    assert s["offloads"] == total["offloads"]
    assert s["fetches"] == total["fetches"]
    assert s["frees"] == total["frees"]
    assert total["offloads"] == total["fetches"] + total["frees"]
    assert total["offloads"] >= n_threads * iters // 10  # real work, not just errors
    # the pools were small enough to run out at times, and large enough to mostly work
    assert total["ooms"] > 0
    assert total["ooms"] < total["offloads"]
    m.close()


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


def _main_thread_progress_while(blocking_call) -> tuple[float, float, int, float]:
    """Run ``blocking_call`` in a thread; meanwhile the main thread runs a Python loop and
    stamps the time of each iteration. Returns (call start, call end, iterations inside the
    call, longest gap between consecutive iterations inside the call)."""
    span: dict[str, float] = {}
    started = threading.Event()

    def body() -> None:
        started.set()
        span["start"] = time.perf_counter()
        blocking_call()
        span["end"] = time.perf_counter()

    th = threading.Thread(target=body, daemon=True)
    stamps: list[float] = []
    th.start()
    started.wait()
    while th.is_alive():
        stamps.append(time.perf_counter())
        sum(range(50))  # pure Python work: needs the GIL
    th.join(JOIN_TIMEOUT_S)
    assert not th.is_alive()
    assert "end" in span, "the blocking call raised"
    inside = [s for s in stamps if span["start"] <= s <= span["end"]]
    edges = [span["start"]] + inside + [span["end"]]
    gap = max(b - a for a, b in zip(edges, edges[1:]))
    return span["start"], span["end"], len(inside), gap


@pytest.mark.parametrize("call", ["wait", "fetch"])
def test_gil_released_while_blocked(backend, call):
    """A thread blocked in Handle.wait() or in a large fetch must not hold the GIL: the main
    thread keeps running Python code for the whole time the call blocks."""
    if backend.cuda and call == "fetch":
        pytest.skip("on CUDA fetch does not block the host: it enqueues the copy and orders "
                    "the current stream after it (the 'wait' case blocks on a GPU too)")
    # a GPU copies 1 GiB from device to pinned host in about 20 ms: bigger chunks there
    chunk = (128 if backend.cuda else 64) << 20
    for n in (4, 8, 16):  # more data when the machine finished the copies before we looked
        m = backend.manager(peers=None, host_bytes=n * chunk)
        gen = torch.Generator(device=backend.device).manual_seed(3)
        tensors = [torch.empty(chunk, dtype=torch.uint8, device=backend.device)
                   .random_(0, 256, generator=gen) for _ in range(n)]
        refs = [t.clone() for t in tensors]
        if call == "wait":
            # release offloads return at once; the copies queue on one stream, so the last
            # handle completes only after all of them
            hs = [m.offload(t) for t in tensors]
            start, end, count, gap = _main_thread_progress_while(hs[-1].wait)
            assert hs[-1].ready()
            outs = [m.fetch(h) for h in hs]
        else:
            hs = [m.offload(t, release=False) for t in tensors]
            m.synchronize()
            outs = []
            start, end, count, gap = _main_thread_progress_while(
                lambda: outs.extend(m.fetch_many(hs)))
        duration = end - start
        if duration > 0.01 or n == 16:
            break
        for out, ref in zip(outs, refs):
            assert torch.equal(out, ref)
        del tensors, outs, refs, hs
        m.close()
    assert duration > 0.01, f"the call blocked only {duration * 1e3:.1f} ms: nothing measured"
    assert count >= 20, f"main thread ran {count} iterations in {duration * 1e3:.1f} ms"
    # A call holding the GIL throughout gives one gap of the whole duration and no iteration;
    # on 2 vCPUs the OS alone can park the main thread for a good part of a 30 ms call.
    assert gap < 0.8 * duration, f"main thread stalled {gap * 1e3:.1f} of {duration * 1e3:.1f} ms"
    for out, ref in zip(outs, refs):
        assert torch.equal(out, ref)
    del tensors, outs
    assert_drained(m)
    m.close()


def test_reclaim_and_lend_race_offload_and_fetch(backend):
    """Four workers offload / prefetch / fetch (also kept fetches followed by incremental
    offloads) with bitwise checks, while a fifth thread keeps lending to and reclaiming from the
    peer tier. No deadlock, no byte lost; a reclaim raises nothing but OutOfMemoryError (the
    host tier full), and then nothing was reclaimed."""
    n_workers, rounds = 4, 60
    m = backend.manager(peer_bytes="32KiB", host_bytes="96KiB")
    peer = backend.peer_label
    lender_done = threading.Event()
    counts = [dict(offloads=0, fetches=0, frees=0, ooms=0, incremental=0, prefetches=0)
              for _ in range(n_workers)]
    log = dict(lends=0, reclaims=0, reclaim_ooms=0, lent=32 << 10, reclaimed=0)

    def worker(k: int) -> None:
        rng = random.Random(3000 + k)
        gen = torch.Generator().manual_seed(4000 + k)
        c = counts[k]
        live: list[list] = []  # [handle, tensor, reference bytes, kept]

        def check_out(entry, out) -> None:
            h, t, ref, _ = entry
            if h.release:
                assert out is t and not aq.is_offloaded(t)
                assert torch.equal(storage_bytes(t), ref)
            else:
                assert torch.equal(tensor_bytes(out), ref)

        def offload(t: torch.Tensor, release: bool, base=None) -> None:
            ref = storage_bytes(t) if release else tensor_bytes(t)
            try:
                h = m.offload(t, release=release, priority=rng.choice([0, 0, 1, -1]), base=base)
            except aq.OutOfMemoryError:
                c["ooms"] += 1
                assert not aq.is_offloaded(t)
                now = storage_bytes(t) if release else tensor_bytes(t)
                assert torch.equal(now, ref)
                return
            c["offloads"] += 1
            c["incremental"] += base is not None
            assert h.location in (peer, "cpu")
            live.append([h, t, ref, False])

        i = 0
        while i < 150 or not lender_done.is_set():
            i += 1
            assert i < 100_000
            r = rng.random()
            if len(live) < 6 and r < 0.5:
                offload(random_tensor(rng, gen, 8 << 10, backend.device), rng.random() < 0.5)
                continue
            if not live:
                continue
            entry = live[rng.randrange(len(live))]
            h, t, ref, kept = entry
            r = rng.random()
            if kept or r < 0.15:  # a kept copy (or any handle) grows: incremental offload
                if not kept:
                    out = m.fetch(h, keep=True)
                    c["fetches"] += 1
                    check_out(entry, out)
                    entry[3] = True
                suffix = torch.randint(0, 256, (rng.choice([0, 100, 1000]),), dtype=torch.uint8,
                                       generator=gen)
                grown = torch.cat([ref, suffix]).to(backend.device)  # ref: the bytes kept
                before = len(live)
                offload(grown, rng.random() < 0.5, base=h)
                if len(live) > before:
                    assert h.state == "freed"
                    live.remove(entry)
                elif rng.random() < 0.5:  # no room: drop the kept copy instead
                    m.free(h)
                    c["frees"] += 1
                    live.remove(entry)
            elif r < 0.3:
                m.prefetch(h)
                c["prefetches"] += 1
            elif r < 0.85:
                live.remove(entry)
                check_out(entry, m.fetch(h))
                c["fetches"] += 1
            else:
                live.remove(entry)
                m.free(h)
                c["frees"] += 1
        for entry in live:
            if entry[3]:
                m.free(entry[0])
                c["frees"] += 1
            else:
                check_out(entry, m.fetch(entry[0]))
                c["fetches"] += 1

    def lender() -> None:
        rng = random.Random(99)
        try:
            for _ in range(rounds):
                cap = m.stats()["tiers"][0]["capacity"]  # only this thread changes it
                n = rng.choice([256, 4 << 10, 8 << 10, 16 << 10, 32 << 10])
                assert m.lend(peer, n) == cap + n
                log["lends"] += 1
                log["lent"] += n
                cap += n
                amount = rng.choice([None, 1, 1, 4 << 10, n, n, cap])
                amount = None if amount is None else min(amount, cap)
                before = m.stats()
                try:
                    got = m.reclaim(peer, amount)
                except aq.OutOfMemoryError:
                    log["reclaim_ooms"] += 1
                    after = m.stats()
                    assert after["tiers"][0]["capacity"] == cap
                    assert after["tiers"][0]["segments"] == before["tiers"][0]["segments"]
                    assert after["reclaims"] == before["reclaims"]
                    assert after["bytes_reclaimed"] == before["bytes_reclaimed"]
                    continue
                assert got >= (cap if amount is None else amount)
                after = m.stats()
                assert after["tiers"][0]["capacity"] == cap - got
                assert after["reclaim_last_s"] > 0
                log["reclaims"] += 1
                log["reclaimed"] += got
                time.sleep(0.005)
        finally:
            lender_done.set()

    errors = run_threads([lambda k=k: worker(k) for k in range(n_workers)] + [lender],
                         timeout=60)
    no_errors(errors)
    m.synchronize()
    s = m.stats()
    assert s["live_handles"] == 0 and s["prefetched_bytes"] == 0
    for t in s["tiers"]:
        assert t["used"] == 0 and t["blocks"] == 0 and t["handles"] == 0, t
        assert t["free"] == t["capacity"] and t["free_ranges"] == t["segments"], t
    assert s["tiers"][0]["capacity"] == log["lent"] - log["reclaimed"]
    assert s["lends"] == log["lends"] == rounds
    assert s["reclaims"] == log["reclaims"]
    assert s["bytes_reclaimed"] == log["reclaimed"]
    total = {k: sum(c[k] for c in counts) for k in counts[0]}
    assert s["offloads"] == total["offloads"]
    assert s["fetches"] == total["fetches"]
    assert s["frees"] == total["frees"]
    assert s["incremental_offloads"] == total["incremental"] > 0
    assert s["migrations"] > 0  # reclaims and evictions did move live data
    assert log["reclaims"] > rounds // 3
    m.close()


def test_free_after_prefetch_and_reclaim_never_exposes_a_reused_block(backend):
    """Regression (review): a prefetched handle migrated by reclaim, then freed, released its
    new block fenced only by the (older) prefetch; the next offload into that block could be
    overwritten by the migration still running."""
    mib = 1 << 20
    dev = backend.device
    for _ in range(3):
        m = backend.manager(peer_bytes=48 * mib, host_bytes=160 * mib)
        big = torch.randn(36 * mib // 4, device=dev)
        m.offload(big, release=False)
        x = torch.full((2 * mib // 4,), 1.0, device=dev)
        h = m.offload(x, release=False)
        m.prefetch(h)
        h.wait()
        c = torch.randn(16 * mib // 4, device=dev)
        m.offload(c, release=True)  # the peer is full: evicts `big` (a long migration)
        r = threading.Thread(target=m.reclaim, args=(backend.peer_label,), daemon=True)
        r.start()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while h.tier != "host" and time.monotonic() < deadline:
            pass
        m.free(h)
        z = torch.full((2 * mib // 4,), 2.0, device=dev)
        hy = m.offload(z, release=False)
        r.join(JOIN_TIMEOUT_S)
        assert not r.is_alive()
        assert torch.equal(m.fetch(hy), z)
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

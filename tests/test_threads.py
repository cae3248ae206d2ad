"""Thread stress on one shared OffloadManager, on every backend (``backend`` fixture: emulation
always, CUDA when a GPU is present), and the GIL released by the calls that block.

Every thread checks its own data bitwise after each fetch; the pools are small enough that
OutOfMemoryError happens now and then, and then the tensor must be untouched. Joins have a
timeout, so a deadlock fails the test instead of hanging it (the threads are daemons).

Threads racing calls on one handle are in test_threads_racing.py; lend and reclaim racing
offloads and fetches in test_threads_reclaim.py.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

import aqua_offload as aq
from aqua_offload import storage
from helpers import JOIN_TIMEOUT_S, assert_drained, no_errors, run_threads
from helpers import bits as tensor_bytes
from helpers import rand_mixed as random_tensor
from helpers import storage_bits as storage_bytes


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
            # handle completes only after all of them. (On torch without _swap_data_ptr_ an
            # emulated release waits for its copy: there deferred snapshots, which never wait.)
            release = storage.CAN_SWAP or backend.cuda
            hs = [m.offload(t, release, fence="now" if release else "deferred")
                  for t in tensors]
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

"""A hostile review of the batch path's speedups: interrupts, reused addresses, dying handles
and races that the per-handle fast paths of offload_many/fetch_many must survive.

Each interrupt sweep runs in its own process (helpers.run_emulated) with a tracer that raises
KeyboardInterrupt at the n-th line executed inside aqua_offload, for every n until the call
completes untouched (as test_lifecycle.py's sweeps do, here over mixed batches).
"""

from __future__ import annotations

import random
import textwrap
import threading
import time

import pytest
import torch

import aqua_offload as aq
from aqua_offload import storage
from conftest import random_tensor, run_with_timeout
from helpers import INTERRUPTS, run_emulated

_SWEEP = INTERRUPTS + """
    import numpy as np
    _interrupted = interrupted
    def interrupted(fn, n):  # an interrupt must never turn into another error
        return _interrupted(fn, n, result["errors"])
    def swept(n):  # after sweep n: nothing held, prefetched or left in the handle table
        gc.collect(0)  # the young cycles an interrupt's traceback made
        m.synchronize()
        s = m.stats()
        if s["live_handles"] or s["prefetched_bytes"]:
            result["leaked"].append([n, s["live_handles"], s["prefetched_bytes"]])
        result["sweeps"] = n
    m = aq.OffloadManager("cpu", peers=[1], peer_bytes="4MiB", host_bytes="16MiB")
    result.update(errors=[], wrong=[], leaked=[], sweeps=0)
"""

# fetch_many of one batch holding every kind of handle: a release passed as its tensor, a
# snapshot into out=, a prefetched release, an array snapshot, a plain release.
_MIXED_FETCH = _SWEEP + """
    for n in range(5000):
        rel = [rand(1000 + 8 * i) for i in range(3)]
        refs = [t.clone() for t in rel]
        src, arr = rand(500), np.arange(7, 30, dtype=np.int32)
        hs = m.offload_many(rel)
        hs[1].prefetch()
        s1, s2 = m.offload(src, release=False), m.offload(arr, release=False)
        out = torch.empty(500, dtype=torch.uint8)
        got = {}
        fired = interrupted(lambda: got.setdefault(
            "r", m.fetch_many([rel[0], s1, hs[1], s2, hs[2]], [None, out, None, None, None],
                              keep=KEEP)), n)
        try:
            if "r" in got:
                r = got["r"]
                if not (r[0] is rel[0] and r[1] is out and torch.equal(out, src)
                        and r[2] is rel[1] and np.array_equal(r[3], arr) and r[4] is rel[2]):
                    result["wrong"].append([n, "results"])
            paged = [aq.is_offloaded(t) for t in rel]
            if any(paged) and not all(paged):
                result["wrong"].append([n, "half a batch", paged])
            if all(paged):
                m.fetch_many(rel)  # still fetchable, through its tensors
            if not all(torch.equal(t, r) for t, r in zip(rel, refs)):
                result["wrong"].append([n, "data"])
            if s1._live() and not torch.equal(m.fetch(s1), src):
                result["wrong"].append([n, "snapshot"])
            if s2._live() and not np.array_equal(m.fetch(s2), arr):
                result["wrong"].append([n, "array"])
            for h in hs:
                if h._live():
                    m.free(h)  # kept copies
        except Exception as exc:
            result["wrong"].append([n, repr(exc)])
        del hs, s1, s2, got, rel, refs
        swept(n)
        if not fired:
            break
    m.close()
"""


@pytest.mark.parametrize("keep", [False, True], ids=["fetch", "keep"])
def test_an_interrupt_anywhere_in_a_mixed_fetch_batch_is_all_or_nothing(keep):
    """Bug: an interrupt inside restore() of a prefetched release, after its prefetch buffer was
    dropped, sent the re-run down the inline path, which swapped a tensor into the storage
    (RuntimeError: _swap_data_ptr_ expects an UntypedStorage): the rest of the batch was left
    unrestored and its handles live."""
    result = run_emulated(2, textwrap.dedent(_MIXED_FETCH).replace("KEEP", str(keep)))
    assert result["sweeps"] > 100  # the tracer reached deep into the call
    assert result["errors"] == [] and result["wrong"] == [] and result["leaked"] == []


# Snapshot batches of more than four plain tensors (the batch checks run as one C loop,
# paging.plain_snapshots): an interrupt anywhere in offload_many, or in fetch_many into outs,
# into new tensors or kept, is all or nothing and leaves no handle claimed.
_SNAPSHOT_BATCH = _SWEEP + """
    for n in range(5000):
        ts = [rand(1000 + 8 * i) for i in range(6)]
        refs = [t.clone() for t in ts]
        outs = [torch.empty_like(t) for t in ts] if MODE != "fetch_new" else None
        got = {}
        try:
            if MODE == "offload":
                fired = interrupted(lambda: got.setdefault(
                    "hs", m.offload_many(ts, release=False)), n)
                hs = got.get("hs", [])
                for t in ts:
                    t.add_(1)  # the snapshots were taken before: they keep the old bytes
                if hs and not all(torch.equal(b, r) for b, r in
                                  zip(m.fetch_many(hs, outs=outs), refs)):
                    result["wrong"].append([n, "data"])
            else:
                hs = m.offload_many(ts, release=False)
                fired = interrupted(lambda: got.setdefault(
                    "r", m.fetch_many(hs, outs=outs, keep=KEEP)), n)
                if any(h._lock._is_owned() for h in hs):
                    result["wrong"].append([n, "a lock held"])
                if "r" in got:
                    if not all(torch.equal(b, r) for b, r in zip(got["r"], refs)) or (
                            outs and any(b is not o for b, o in zip(got["r"], outs))):
                        result["wrong"].append([n, "results"])
                live = [h._live() for h in hs]
                if any(live) and not all(live) and not KEEP:
                    result["wrong"].append([n, "half a batch", live])
                if all(live):  # not fetched, or kept: the copies are still there
                    if not all(torch.equal(b, r) for b, r in zip(m.fetch_many(hs), refs)):
                        result["wrong"].append([n, "kept data"])
        except Exception as exc:
            result["wrong"].append([n, repr(exc)])
        del ts, refs, outs, got
        hs = None
        swept(n)
        if not fired:
            break
    m.close()
"""


@pytest.mark.parametrize("mode,keep", [("offload", False), ("fetch_out", False),
                                       ("fetch_new", False), ("fetch_out", True)])
def test_an_interrupt_anywhere_in_a_plain_snapshot_batch_is_all_or_nothing(mode, keep):
    result = run_emulated(2, textwrap.dedent(_SNAPSHOT_BATCH).replace("MODE", repr(mode))
                          .replace("KEEP", str(keep)))
    assert result["sweeps"] > 80  # the tracer reached deep into the call
    assert result["errors"] == [] and result["wrong"] == [] and result["leaked"] == []


_FREE = _SWEEP + """
    for n in range(5000):
        t = rand(1000)
        h = m.offload(t)
        h.prefetch()
        fired = interrupted(lambda: m.free(h), n)
        seen = [aq.is_offloaded(t), aq.is_discarded(t), h._live()]
        if seen not in ([True, False, True], [False, True, False]):
            result["wrong"].append([n, seen])
        if h._live():
            m.free(h)
        del h, t
        swept(n)
        if not fired:
            break
    m.close()
"""


def test_an_interrupt_anywhere_in_free_leaves_the_tensor_paged_out_or_discarded():
    """Bug: discard() popped the registry entry, then added the discarded mark; an interrupt
    in between left a freed tensor with no data neither paged out nor discarded (the guard let
    it be touched, a new offload took it)."""
    result = run_emulated(2, textwrap.dedent(_FREE))
    assert result["sweeps"] > 30
    assert result["errors"] == [] and result["wrong"] == [] and result["leaked"] == []


# offload_many of releases that are not whole contiguous storages: a slice at an offset, an
# empty tensor, a transposed view.
_ODD_RELEASES = _SWEEP + """
    for n in range(5000):
        whole = rand(4096)
        ts = [whole[100:300], rand(0), rand(77).view(7, 11).t()]
        refs = [t.clone() for t in ts]
        del whole  # the slice's storage lives on through it
        fired = interrupted(lambda: m.offload_many(ts), n)
        try:
            paged = [aq.is_offloaded(t) for t in ts]
            if any(paged) and not all(paged):
                result["wrong"].append([n, "half a batch", paged])
            if all(paged) and not all(a is b for a, b in zip(m.fetch_many(ts), ts)):
                result["wrong"].append([n, "identity"])
            if not all(torch.equal(t, r) for t, r in zip(ts, refs)):
                result["wrong"].append([n, "data"])
        except Exception as exc:
            result["wrong"].append([n, repr(exc)])
        del ts, refs
        swept(n)
        if not fired:
            break
    m.close()
"""


def test_an_interrupt_anywhere_in_a_batch_of_views_and_empty_tensors_is_all_or_nothing():
    result = run_emulated(2, textwrap.dedent(_ODD_RELEASES))
    assert result["sweeps"] > 100
    assert result["errors"] == [] and result["wrong"] == [] and result["leaked"] == []


def test_a_fork_while_another_thread_holds_the_registry_lock_leaves_the_child_usable():
    """Bug: a batch holds the storage registry's lock while it reserves its storages; a fork
    meanwhile (another thread forks) left the lock held forever in the child, whose first
    release hung (seen with a thread doing batches of 2000: 3 children of 20 hung). The lock
    is held here by a thread, as a batch would hold it, so the fork lands inside for sure."""
    result = run_emulated(2, textwrap.dedent("""
        import os, threading, time
        from aqua_offload import storage
        held, done = threading.Event(), threading.Event()
        def batch():  # stands for a thread inside storage.reserve
            with storage._lock:
                held.set()
                done.wait(30)
        th = threading.Thread(target=batch)
        th.start()
        held.wait(30)
        pid = os.fork()
        if pid == 0:
            m = aq.OffloadManager("cpu", peers=None, host_bytes="1MiB")
            t = rand(100)
            ref = t.clone()
            h = m.offload(t)
            os._exit(0 if aq.is_offloaded(t) and torch.equal(m.fetch(h), ref) else 3)
        deadline = time.monotonic() + 20
        while True:
            done_pid, status = os.waitpid(pid, os.WNOHANG)
            if done_pid:
                result["child"] = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                result["child"] = "hung"
                break
            time.sleep(0.01)
        done.set()
        th.join()
    """))
    assert result["child"] == 0


@pytest.mark.parametrize("then", ["fetch", "free", "keep"])
def test_a_new_storage_at_a_dead_ones_address_is_accepted_and_stays_found(managers, then):
    """A paged-out storage dies while its handle lives; a new storage takes its address (so
    they do here, every time, on glibc) and is paged out. Neither the old entry nor the old
    handle's fetch, free or kept copy may refuse the new one or drop its entry."""
    m = managers(peer="4MiB", host="16MiB")
    gen = torch.Generator().manual_seed(11)
    reused = 0
    for _ in range(12):
        old = random_tensor((4096,), torch.uint8, m.device, generator=gen)
        old_ref, key = old.clone(), old.untyped_storage()._cdata
        h = m.offload(old)
        del old  # its storage dies: the registry lets it go, the handle still has its bytes
        storage.sweep_pins()  # (torch <= 2.9 holds it until a sweep: storage_pins.py)
        new = random_tensor((4096,), torch.uint8, m.device, generator=gen)
        new_ref = new.clone()
        reused += new.untyped_storage()._cdata == key
        assert not aq.is_offloaded(new) and not aq.is_discarded(new)
        h_new = m.offload(new)
        if then == "fetch":
            assert torch.equal(m.fetch(h), old_ref)
        elif then == "free":
            m.free(h)
        else:
            assert torch.equal(m.fetch(h, keep=True), old_ref)
            m.free(h)
        assert aq.is_offloaded(new) and not aq.is_discarded(new)
        assert m.fetch(new) is new and torch.equal(new, new_ref)
        assert h_new.state == "fetched"
    assert reused > 0  # the case under test happened
    m.synchronize()
    assert m.stats()["live_handles"] == 0


def test_threads_racing_batches_over_views_of_shared_storages_lose_nothing(managers):
    """Four threads offload (release), fetch, prefetch and drop batches holding views of four
    shared storages, and snapshot batches of their own: a second release of a storage is
    refused with a typed error, never anything else, and every storage ends with its bytes."""
    m = managers(peer="8MiB", host="32MiB")
    gen = torch.Generator().manual_seed(3)
    shared = [random_tensor((8192,), torch.uint8, m.device, generator=gen) for _ in range(4)]
    refs = [t.clone() for t in shared]
    views = [[t[i:][:1000] for i in range(0, 100, 7)] for t in shared]  # made before any is
    errors: list[str] = []  # paged out: a paged-out tensor must not be sliced
    stop = time.monotonic() + 3.0

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            view = rng.choice(views[rng.randrange(4)])
            op = rng.randrange(4)
            try:
                if op == 0:
                    hs = m.offload_many([view, torch.randint(1, 256, (100 + seed,),
                                                             dtype=torch.uint8)])
                    if rng.random() < 0.5:
                        m.fetch_many(hs)
                    del hs  # else the registry keeps them: fetched through the tensor
                elif op == 1:
                    # the tensor offloaded with the storage, maybe another view of it (no
                    # assert on tensors here: pytest's repr would read another thread's paged
                    # out storage)
                    if aq.is_offloaded(view):
                        got = m.fetch_many([view])[0]
                        if got.untyped_storage()._cdata != view.untyped_storage()._cdata:
                            errors.append("another storage's tensor")
                elif op == 2:
                    m.prefetch(view)
                else:
                    src = torch.randint(1, 256, (300,), dtype=torch.uint8)
                    if not torch.equal(m.fetch_many(m.offload_many([src], release=False))[0],
                                       src):
                        errors.append("snapshot")
            except (aq.InvalidArgumentError, aq.InvalidHandleError):
                pass  # another thread paged it out, or fetched it first
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]

    def run() -> None:
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    run_with_timeout(run, timeout=120)
    assert errors == []
    for t, ref in zip(shared, refs):
        if aq.is_offloaded(t):
            m.fetch(t)
        assert torch.equal(t, ref)
    m.synchronize()
    assert m.stats()["live_handles"] == 0


@pytest.mark.parametrize("prefetched", [False, True], ids=["plain", "prefetched"])
def test_a_resized_paged_out_storage_is_refused_even_when_prefetched(managers, prefetched):
    """Bug: the resize check was skipped for a prefetched release, whose fetch then returned
    the storage's new bytes as if restored and ended the handle: the offloaded bytes were
    dropped without a word (without a prefetch, the same fetch is refused)."""
    m = managers()
    gen = torch.Generator().manual_seed(8)
    t, other, new = (random_tensor((1000,), torch.uint8, m.device, generator=gen) for _ in range(3))
    other_ref = other.clone()
    h = m.offload_many([t, other])[0]
    if prefetched:
        h.prefetch()
    t.untyped_storage().resize_(1000)  # the caller gave the paged-out storage new memory
    t.copy_(new)
    with pytest.raises(aq.InvalidArgumentError, match="resized"):
        m.fetch_many([h, other])
    assert h._live() and aq.is_offloaded(other)  # nothing changed
    assert torch.equal(t, new)  # the caller's new bytes are left alone
    m.free(h)  # the way out: drop the offloaded bytes
    assert torch.equal(m.fetch(other), other_ref)


_CLAIMED = _SWEEP + """
    calls = {
        "fetch_many": lambda hs: m.fetch_many(hs),
        "prefetch_many": lambda hs: m.prefetch_many(hs),
        "free": lambda hs: m.free(hs[0]),
    }
    result["held"] = []
    for n in range(5000):
        ts = [rand(1000 + 8 * i) for i in range(3)]
        hs = m.offload_many(ts) + [m.offload(rand(200), release=False)]
        fired = interrupted(lambda: calls[CALL](hs), n)
        # what another thread would wait on forever (an RLock lets its owner in again)
        if any(h._lock._is_owned() for h in hs):
            result["held"].append(n)
            for h in hs:
                while h._lock._is_owned():
                    h._lock.release()
        for h in hs:
            if h._live():
                m.free(h)
        del ts, hs
        gc.collect(0)
        result["sweeps"] = n
        if not fired:
            break
    m.close()
"""


@pytest.mark.parametrize("call", ["fetch_many", "prefetch_many", "free"])
def test_an_interrupt_anywhere_in_a_call_leaves_no_handle_claimed(call):
    """Bug: claim() let its handles' locks go in one line of its `finally`; an interrupt at
    that line (the last one a call runs) left every handle of the call locked by the thread
    for good, so any other thread's fetch, free or close of them hung."""
    result = run_emulated(2, textwrap.dedent(_CLAIMED).replace("CALL", repr(call)))
    assert result["sweeps"] > 20
    assert result["errors"] == [] and result["held"] == []

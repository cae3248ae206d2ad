"""One handle lifecycle under close(), interrupts, forks and drops (issue 14): every promise
holds under every interleaving, or the call is refused with a typed error."""

from __future__ import annotations

import copy
import gc
import pickle
import sys
import textwrap
import threading

import pytest
import torch

import aqua_offload as aq
from conftest import run_with_timeout, same_bytes
from helpers import INTERRUPTS, run_emulated


# -- close() under concurrency (Note [Calls and close]) --------------------------------------
def test_close_while_threads_offload_restores_every_successful_offload(backend):
    m = backend.manager(peer_bytes="4MiB", host_bytes="64MiB")
    done: list[tuple[torch.Tensor, torch.Tensor]] = []
    refused, errors = [], []
    started = threading.Barrier(4)

    def work(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        started.wait()
        for _ in range(2000):
            t = backend.tensor((256,), torch.int32, generator=g)
            ref = t.clone()
            try:
                m.offload(t)
            except aq.ClosedError:
                refused.append(1)
                return
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
                return
            done.append((t, ref))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    started.wait()
    while len(done) < 200:
        pass
    m.close()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert all(not aq.is_offloaded(t) for t, _ in done)
    bad = [i for i, (t, ref) in enumerate(done) if not same_bytes(t, ref)]
    assert not bad, f"{len(bad)} of {len(done)} successful offloads came back wrong"


def test_close_racing_a_thread_that_fetches_its_own_handles(backend):
    for _ in range(5):
        m = backend.manager(peer_bytes="4MiB", host_bytes="16MiB")
        pairs = [(t := backend.tensor((512,)), t.clone()) for _ in range(200)]
        hs = [m.offload(t) for t, _ in pairs]
        errors: list[BaseException] = []

        def fetcher() -> None:
            for h in hs:
                try:
                    m.fetch(h)
                except (aq.ClosedError, aq.InvalidHandleError):
                    pass  # closed under us (close restores it), or restored by close already
                except BaseException as e:  # noqa: BLE001
                    errors.append(e)

        th = threading.Thread(target=fetcher)
        th.start()
        m.close()  # must neither raise nor leave the manager open
        th.join(60)
        assert m.closed and not errors, errors
        assert all(same_bytes(t, ref) for t, ref in pairs)


def test_leftover_handles_say_they_are_closed(backend):
    m = backend.manager(peer_bytes="1MiB", host_bytes="4MiB")
    snap = m.offload(backend.tensor((100,)), release=False)
    t = backend.tensor((100,))
    rel = m.offload(t)
    m.close(restore=False)
    assert snap.state == rel.state == "closed"
    assert m.stats()["live_handles"] == 0
    for call in (snap.ready, snap.wait, snap.free, snap.prefetch, lambda: m.fetch(snap),
                 lambda: m.offload(backend.tensor((4,)))):
        with pytest.raises(aq.ClosedError):
            call()
    assert aq.is_discarded(t) and not aq.is_offloaded(t)  # restore=False: its data is gone


# -- asynchronous exceptions (Note [Interrupted batches]) -------------------------------------
# A tracer raises KeyboardInterrupt at the n-th line executed inside aqua_offload, for every n
# until a call completes untouched. Each sweep runs in its own process with a hard timeout, so a
# hang (close() waiting on a call that never ends) is a failure, not a stuck suite.
_INTERRUPT = INTERRUPTS + """
    m = aq.OffloadManager("cpu", peers=[1], peer_bytes="4MiB", host_bytes="16MiB")
    result.update(mixed=[], wrong=[], leaked=[], reused=[], sweeps=0)
    for n in range(5000):
        ts = [rand(1000 + 8 * i) for i in range(4)]
        refs = [t.clone() for t in ts]
        fired = STEP
        paged = [aq.is_offloaded(t) for t in ts]
        if any(paged) and not all(paged):
            result["mixed"].append(n)
        try:
            if all(paged):
                m.fetch_many(ts)  # every one is fetchable, through its tensor
            if not all(torch.equal(t, r) for t, r in zip(ts, refs)):
                result["wrong"].append(n)
        except Exception as exc:
            result["wrong"].append([n, repr(exc)])
        del ts, refs
        gc.collect(0)  # the young cycles an interrupt's traceback made (a full collect: 10x slower)
        m.synchronize()
        if m.stats()["live_handles"]:
            result["leaked"].append(n)
        fresh = [rand(1000 + 8 * i) for i in range(4)]  # may reuse the addresses just freed
        if any(aq.is_offloaded(t) for t in fresh):
            result["reused"].append(n)
        result["sweeps"] = n
        if not fired:
            break
    m.close()
    result["closed"] = m.closed
"""


_STEPS = {  # the call each sweep interrupts, on the batch ``ts``
    "offload_many": "interrupted(lambda: m.offload_many(ts), n)",
    "fetch_many": "(lambda hs: interrupted(lambda: m.fetch_many(hs), n))(m.offload_many(ts))",
    "fetch_many_keep": "(lambda hs: interrupted(lambda: m.fetch_many(hs, keep=True), n) or "
                       "[m.free(h) for h in hs if h._live()])(m.offload_many(ts))",
    "prefetch_many": "(lambda hs: interrupted(lambda: m.prefetch_many(hs), n))"
                     "(m.offload_many(ts))",
    "offload": "interrupted(lambda: m.offload(ts[0]), n) if not ts.__delitem__(slice(1, None))"
               " else 0",
    "fetch": "(lambda h: interrupted(lambda: m.fetch(h), n))(m.offload(ts[0]))"
             " if not ts.__delitem__(slice(1, None)) else 0",
}


def _sweep(code: str) -> None:
    """Run one interrupt sweep (``_INTERRUPT`` with its step) and check that it lost nothing."""
    result = run_emulated(2, code)
    assert result["sweeps"] > 50  # the tracer reached deep into the call
    assert result["closed"]
    assert result["mixed"] == [] and result["wrong"] == [] and result["leaked"] == []
    assert result["reused"] == []


@pytest.mark.parametrize("step", ["offload_many", "fetch_many", "prefetch_many", "offload",
                                  "fetch"])
def test_an_interrupt_anywhere_in_a_batch_is_all_or_nothing(step):
    _sweep(_INTERRUPT.replace("STEP", _STEPS[step]))


@pytest.mark.parametrize("step", ["offload_many", "fetch_many", "fetch_many_keep",
                                  "prefetch_many"])
def test_an_interrupt_anywhere_in_a_batch_of_eight_is_all_or_nothing(step):
    """Batches of more than four take the C-loop paths of reserve, swap-out and the handles'
    making (storage.reserve, storage.swap_out_many, manager._new_handle); the same sweep."""
    _sweep(_INTERRUPT.replace("range(4)", "range(8)").replace("STEP", _STEPS[step]))


@pytest.mark.parametrize("step", ["offload_many", "fetch_many", "fetch"])
def test_an_interrupt_anywhere_without_swap_data_ptr_is_all_or_nothing(step):
    """The fallback of torch without _swap_data_ptr_ (Note [Without _swap_data_ptr_]) frees in
    place, and a fetch gives the storage its memory back before the core fetches into it: an
    interrupt between the two must leave it paged out (not restored without its bytes), and
    one after them must finish the restore."""
    _sweep(_INTERRUPT.replace("STEP", _STEPS[step]).replace(
        "    m = aq.OffloadManager(", "    from aqua_offload import storage\n"
        "    storage.CAN_SWAP = False\n    m = aq.OffloadManager(", 1))


_INTERRUPT_CLOSE = _INTERRUPT.split("    m = aq.OffloadManager")[0] + """
    result.update(wrong=[], sweeps=0)
    for n in range(5000):
        m = aq.OffloadManager("cpu", peers=[1], peer_bytes="4MiB", host_bytes="16MiB")
        ts = [rand(1000 + 8 * i) for i in range(4)]
        refs = [t.clone() for t in ts]
        m.offload_many(ts)
        snap = m.offload(rand(64), release=False)
        fired = interrupted(m.close, n)
        m.close()  # again: completes the interrupted one, or returns at once
        if not (m.closed and snap.state == "closed"
                and all(torch.equal(t, r) for t, r in zip(ts, refs))):
            result["wrong"].append(n)
        result["sweeps"] = n
        if not fired:
            break
"""


def test_an_interrupt_anywhere_in_close_leaves_it_completable():
    result = run_emulated(2, _INTERRUPT_CLOSE)
    assert result["sweeps"] > 20 and result["wrong"] == []


# Interrupts at chosen points (each in its own process): where a handle is made, where a call's
# token dies, inside free() and inside a dropped handle's finalizer.
_AT = INTERRUPTS + """
    import threading
    def at(code_name, fn, event="return", file=None):
        fired = []
        def tracer(frame, ev, arg):
            if fired or frame.f_code.co_name != code_name:
                return None
            if file and not frame.f_code.co_filename.endswith(file):
                return None
            if event == "call" and ev == "call":
                fired.append(1); raise KeyboardInterrupt
            def local(frame, ev, arg):
                if ev == event and not fired:
                    fired.append(1); raise KeyboardInterrupt
                return local
            return local
        traced(fn, tracer)
        return bool(fired)
    m = aq.OffloadManager("cpu", peers=[1], peer_bytes="1MiB", host_bytes="4MiB")
"""


def _run_at(body: str) -> dict:
    return run_emulated(2, textwrap.dedent(_AT) + textwrap.dedent(body))


def test_an_interrupt_as_a_handle_is_made_loses_nothing():
    result = _run_at("""
        ts = [rand(100), rand(108)]
        refs = [t.clone() for t in ts]
        result["fired"] = at("_new_handle", lambda: m.offload_many(ts))
        result["paged"] = [aq.is_offloaded(t) for t in ts]
        result["equal"] = [torch.equal(m.fetch(t), r) for t, r in zip(ts, refs)]
        m.synchronize()
        result["live"] = m.stats()["live_handles"]
    """)
    assert result["fired"] and result["paged"] == [True, True]
    assert result["equal"] == [True, True] and result["live"] == 0


def test_an_interrupt_as_a_calls_token_dies_cannot_hang_close():
    result = _run_at("""
        t = rand(100)
        ref = t.clone()
        h = m.offload(t)
        result["fired"] = at("_remove", lambda: m.fetch_many([h]), event="call",
                             file="_weakrefset.py")
        th = threading.Thread(target=m.close, daemon=True)
        th.start(); th.join(30)
        result["closed"] = m.closed and not th.is_alive()
        result["equal"] = torch.equal(t, ref)
    """)
    assert result["fired"] and result["closed"] and result["equal"]


def test_an_interrupted_free_leaves_a_discarded_tensor():
    result = _run_at("""
        t = rand(100)
        h = m.offload(t)
        result["fired"] = at("drop", lambda: m.free(h), event="call", file="holders.py")
        result["states"] = [aq.is_offloaded(t), aq.is_discarded(t), h.state]
        try:
            m.offload(t)
        except aq.InvalidArgumentError as e:
            result["refused"] = "its data is gone" in str(e)
        result["live"] = m.stats()["live_handles"]
    """)
    assert result["fired"] and result["states"] == [False, True, "freed"]
    assert result["refused"] and result["live"] == 0


def test_an_interrupt_inside_a_dropped_handles_finalizer_leaks_nothing():
    result = _run_at("""
        h = m.offload(rand(100), release=False)
        def drop():
            global h
            del h
        result["fired"] = at("_discard", drop, event="call")
        gc.collect()
        m.synchronize()
        s = m.stats()
        result["left"] = [s["live_handles"], s["tiers"][0]["used"]]
    """)
    assert result["fired"] and result["left"] == [0, 0]


def test_close_ends_snapshots_too_so_a_deferred_source_is_writable_again(manager, backend):
    src = backend.tensor((1000,))
    h = manager.offload(src, release=False, fence="deferred")
    manager.close()
    assert h.state == "closed"
    with aq.debug_guard():
        src.add_(1)  # no handle stands for its copy any more: the guard lets the write through


# -- no landmines --------------------------------------------------------------------------
def test_a_freed_release_leaves_a_discarded_tensor_that_is_refused_and_guarded(manager, backend):
    t = backend.tensor((1000,))
    manager.free(manager.offload(t))
    assert aq.is_discarded(t) and not aq.is_offloaded(t)
    with pytest.raises(aq.InvalidArgumentError, match="data is gone"):
        manager.offload(t)
    with pytest.raises(aq.InvalidArgumentError, match="discarded"):
        manager.offload(t, release=False)
    with aq.debug_guard(), pytest.raises(aq.PagedOutError, match="discarded"):
        t.sum()


def test_the_guard_covers_threads_started_under_all_threads(manager, backend):
    t = backend.tensor((1000,))
    h = manager.offload(t)
    seen: list[BaseException] = []

    def touch() -> None:
        try:
            t.sum()
        except aq.PagedOutError as e:
            seen.append(e)

    with aq.debug_guard(all_threads=True):
        th = threading.Thread(target=touch)
        th.start()
        th.join(30)
    assert len(seen) == 1
    manager.fetch(h)


@pytest.mark.skipif(sys.version_info < (3, 12),
                    reason="threads already running are reached through "
                           "threading.setprofile_all_threads (Python >= 3.12)")
def test_the_all_threads_guard_reaches_a_pool_started_before_it():
    """A pool worker started before the guard: without the hook its touch was a segfault (so the
    case runs in a child process)."""
    result = run_emulated(2, """
        from concurrent.futures import ThreadPoolExecutor
        m = aq.OffloadManager("cpu", peers=None, host_bytes="1MiB")
        pool = ThreadPoolExecutor(1)
        pool.submit(lambda: None).result()  # the worker runs, parked on its queue
        t = rand(1000)
        h = m.offload(t)
        m.synchronize()
        def touch():
            try:
                t.sum()
                return "let through"
            except aq.PagedOutError:
                return "refused"
        with aq.debug_guard(all_threads=True):
            result["pool"] = pool.submit(touch).result()
        m.fetch(h)
        result["after"] = pool.submit(lambda: int(t.sum())).result() == int(t.sum())
    """)
    assert result == {"pool": "refused", "after": True}


def test_a_paged_out_tensor_dropped_with_its_handle_gives_its_bytes_back(manager, backend):
    used = lambda: sum(t["used"] for t in manager.stats()["tiers"])  # noqa: E731
    before = used()
    t = backend.tensor((4096,))
    view = t[10:20]
    h = manager.offload(t)
    assert used() > before
    del t, h
    gc.collect()
    assert used() > before  # a view keeps the storage: still fetchable through it
    assert aq.is_offloaded(view)
    del view
    gc.collect()
    manager.synchronize()
    assert used() == before and manager.stats()["live_handles"] == 0


def test_a_handle_leaves_the_managers_table_as_it_ends_not_as_it_dies(manager, backend):
    """Note [Orphans]: the table holds live handles only; an ended one (fetched by a single
    call, by the C loops of a snapshot batch, by a release batch; freed; kept copies stay)
    leaves it at once, while the caller still holds it."""
    singles = [backend.tensor((64,)) for _ in range(3)]
    snaps = [backend.tensor((32,)) for _ in range(6)]
    rels = [backend.tensor((48,)) for _ in range(6)]
    refs = [t.clone() for t in singles + snaps + rels]
    one = manager.offload(singles[0], release=False)
    freed = manager.offload(singles[1], release=False)
    kept = manager.offload(singles[2])
    hs = manager.offload_many(snaps, release=False)
    rs = manager.offload_many(rels)
    table = manager._handles
    every = [one, freed, kept, *hs, *rs]
    assert all(table[h._id]() is h for h in every)
    outs = [torch.empty_like(t) for t in snaps]
    got = [manager.fetch(one), None, manager.fetch(kept, keep=True),
           *manager.fetch_many(hs, outs=outs), *manager.fetch_many(rs)]
    freed.free()
    assert [h._id in table for h in every] == [False, False, True] + [False] * 12
    assert all(same_bytes(a, b) for a, b in zip(got, refs) if a is not None)
    kept.free()
    assert kept._id not in table and manager.stats()["live_handles"] == 0


def test_a_handle_whose_tensors_died_still_fetches_its_data(manager, backend):
    t = backend.tensor((64, 8))
    ref = t.clone()
    h = manager.offload(t)
    del t
    gc.collect()
    out = manager.fetch(h)
    assert same_bytes(out, ref)


@pytest.mark.parametrize("how", [copy.copy, copy.deepcopy, pickle.dumps])
def test_handles_refuse_copies(manager, backend, how):
    t = backend.tensor((100,))
    ref = t.clone()
    h = manager.offload(t, release=False)
    with pytest.raises(aq.InvalidArgumentError):
        how(h)
    assert same_bytes(manager.fetch(h), ref)


def test_a_negated_view_cannot_extend_a_base(manager, backend):
    base = manager.offload(torch.arange(16, dtype=torch.float32).to(backend.device),
                           release=False)
    longer = torch._neg_view(torch.arange(20, dtype=torch.float32).to(backend.device))
    with pytest.raises(aq.InvalidArgumentError, match="negated"):
        manager.offload(longer, release=False, base=base)
    assert base.state in ("offloaded", "in_flight")  # untouched: still a base
    assert torch.equal(manager.fetch(base).cpu(), torch.arange(16, dtype=torch.float32))


def test_a_transposed_view_cannot_extend_a_base(manager, backend):
    t = backend.tensor((16, 16))
    h = manager.offload(t, release=False)
    manager.fetch(h, keep=True)
    before = manager.stats()["offloads"]
    with pytest.raises(aq.InvalidArgumentError, match="contiguous"):
        manager.offload(t.t(), release=False, base=h)
    assert manager.stats()["offloads"] == before and h.state in ("in_flight", "offloaded")


# -- memory the tensor does not own alone --------------------------------------------------
def test_a_dlpack_export_is_refused_for_release_but_snapshots_work():
    import numpy as np

    m = aq.OffloadManager("cpu", peers=None, host_bytes="4MiB")
    t = torch.arange(100, dtype=torch.float32)
    alias = np.from_dlpack(t)
    with pytest.raises(aq.InvalidArgumentError, match="DLPack"):
        m.offload(t)
    assert not aq.is_offloaded(t) and alias[5] == 5.0
    assert torch.equal(m.fetch(m.offload(t, release=False)), t)
    m.close()


@pytest.mark.parametrize("make", [lambda t: t.numpy(), lambda t: t.share_memory_(),
                                  lambda t: torch.from_dlpack(torch.to_dlpack(t)),
                                  lambda t: torch.utils.dlpack.to_dlpack(t)],
                         ids=["numpy", "share_memory", "torch.to_dlpack", "utils.to_dlpack"])
def test_aliased_or_shared_storages_are_refused_for_release(make):
    m = aq.OffloadManager("cpu", peers=None, host_bytes="4MiB")
    t = torch.arange(100, dtype=torch.float32)
    keep = make(t)
    with pytest.raises(aq.InvalidArgumentError):
        m.offload(t)
    assert not aq.is_offloaded(t) and keep is not None
    m.close()


def test_a_paged_out_tensor_prints_safely_and_is_never_exported_or_saved(manager, backend):
    """Printing reads the data with dispatch modes off (the guard cannot see it): it was a
    segfault. An export or a pickle would hand out freed memory or save 0 bytes as the data."""
    import io
    import pickle

    import numpy as np

    t = backend.tensor((1000,))
    ref = t.clone()
    h = manager.offload(t)
    manager.synchronize()
    assert "paged out by aqua_offload" in repr(t) and "(1000,)" in str(t)
    exports = [lambda: pickle.dumps(t), lambda: torch.save(t, io.BytesIO()),
               lambda: torch.to_dlpack(t), lambda: t.__dlpack__()]
    if not backend.cuda:
        exports.append(lambda: np.from_dlpack(t))
    for export in exports:
        with pytest.raises(aq.PagedOutError):
            export()
    manager.fetch(h)
    assert same_bytes(t, ref) and "paged out" not in repr(t)
    assert same_bytes(pickle.loads(pickle.dumps(t)), ref)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")  # deprecated in 2.13
def test_a_quantized_tensor_is_refused_as_quantized(manager):
    q = torch.quantize_per_tensor(torch.randn(10), 0.1, 0, torch.qint8)
    with pytest.raises(aq.InvalidArgumentError, match="quantized"):
        manager.offload(q)

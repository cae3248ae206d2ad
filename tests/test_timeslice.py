"""TimeSlicer with real threads on the emulation backend (CPU tensors), and the state walker.

Every threaded test joins its threads with a timeout, so a deadlock fails the test instead of
hanging the run (the threads are daemons). Quanta are 1-5 ms and tensors small, so the whole
file takes a few seconds. Timing bounds are loose (a loaded 2-core machine): they separate
"within a few quanta" from "after a whole workload", never finer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

import aqua_offload as aq
from aqua_offload.state import collect_tensors
from conftest import random_tensor, same_bytes, wait_until

JOIN_TIMEOUT_S = 30.0
CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]


# -- helpers ------------------------------------------------------------------------------------
def spin(seconds: float) -> None:
    """Busy CPU work that holds the GIL (no sleep: a running slice computes)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def run_threads(targets, timeout: float = JOIN_TIMEOUT_S, stagger_s: float = 0.0
                ) -> list[BaseException]:
    """Run each target in a daemon thread; return the exceptions they raised (in order of
    target). Fails the test if a thread is still alive after ``timeout``."""
    errors: list[BaseException | None] = [None] * len(targets)

    def wrap(k, fn):
        def body():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported to the main thread
                errors[k] = e
        return body

    threads = [threading.Thread(target=wrap(k, fn), daemon=True, name=f"worker-{k}")
               for k, fn in enumerate(targets)]
    for t in threads:
        t.start()
        if stagger_s:
            time.sleep(stagger_s)
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"threads did not finish within {timeout} s (deadlock?): {stuck}"
    return errors


def no_errors(errors: list) -> None:
    real = [e for e in errors if e is not None]
    if real:
        raise real[0]


def everyone_queued(ts: aq.TimeSlicer, n: int) -> None:
    """Called by the first slice, holding the turn: wait until the other n - 1 wait for it,
    so that the workloads really overlap however the threads get scheduled."""
    wait_until(lambda: ts.policy.waiting() >= n - 1)


def assert_drained(m: aq.OffloadManager) -> None:
    """No handle and no pool memory left behind."""
    m.synchronize()
    s = m.stats()
    assert s["live_handles"] == 0, s["live_handles"]
    assert s["prefetched_bytes"] == 0
    for t in s["tiers"]:
        assert t["used"] == 0, t
        assert t["handles"] == 0, t


def clone_all(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def by_name(ts: aq.TimeSlicer) -> dict[str, dict]:
    return {s["name"]: s for s in ts.stats()["slices"]}


@pytest.fixture
def m():
    mgr = aq.OffloadManager("cpu", peers="auto", peer_bytes="2MiB", host_bytes="8MiB")
    yield mgr
    mgr.close()


class KVCache:
    """An object whose attributes hold tensors (like a transformers Cache)."""

    def __init__(self, gen: torch.Generator) -> None:
        self.key_cache = [random_tensor((4, 16), torch.float32, generator=gen) for _ in range(2)]
        self.value_cache = [random_tensor((4, 16), torch.bfloat16, generator=gen)
                            for _ in range(2)]
        self.seen_tokens = 7


class Slotted:
    __slots__ = ("a", "b", "n")

    def __init__(self, a, b) -> None:
        self.a, self.b, self.n = a, b, 3


class Buffers(torch.nn.Module):
    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("kv", random_tensor((8, 8), torch.float16, generator=gen))
        self.bn = torch.nn.BatchNorm1d(8)  # running_mean, running_var, num_batches_tracked


def make_state(kind: str, seed: int):
    """A state of the given kind and the tensors whose bytes must survive (views included)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "tensor":
        t = random_tensor((33,), torch.int64, generator=gen)
        return t, [t]
    if kind == "list":
        base = random_tensor((64,), torch.float32, generator=gen)
        ts = [random_tensor((5, 7), torch.int32, generator=gen), base, base[3:20],
              base.view(8, 8).t(), random_tensor((9,), torch.uint8, generator=gen)]
        return ts, ts
    if kind == "dict":
        a = random_tensor((3, 3), torch.float64, generator=gen)
        b = random_tensor((11,), torch.int16, generator=gen)
        c = random_tensor((2, 5), torch.complex64, generator=gen)
        state = {"layers": [a, (b,)], "meta": {"c": c, "n": 3, "s": "x", "none": None}}
        return state, [a, b, c]
    if kind == "module":
        mod = Buffers(gen)
        return mod, list(mod.buffers())
    if kind == "object":
        cache = KVCache(gen)
        slotted = Slotted(random_tensor((6,), torch.float32, generator=gen), cache)
        return slotted, [slotted.a] + cache.key_cache + cache.value_cache
    raise AssertionError(kind)


KINDS = ["tensor", "list", "dict", "module", "object"]


# -- one slice at a time, state integrity ------------------------------------------------------
@pytest.mark.parametrize("policy", ["fair", "rr"])
def test_at_most_one_slice_runs_and_state_survives(m, policy):
    """Many preemptions of five workloads with different kinds of state: never two running at
    once, never a paged-out state tensor while the workload code runs, every byte intact."""
    ts = aq.TimeSlicer(quantum_ms=1, manager=m, policy=policy)
    lock = threading.Lock()
    active = [0]
    max_active = [0]
    saw_offloaded: list[str] = []
    states = {kind: make_state(kind, k) for k, kind in enumerate(KINDS)}
    before = {kind: clone_all(tensors) for kind, (_, tensors) in states.items()}
    params_before = [p.detach().clone() for p in states["module"][0].parameters()]
    steps = 40
    first = threading.Lock()

    def enter(name):
        with lock:
            active[0] += 1
            max_active[0] = max(max_active[0], active[0])

    def leave():
        with lock:
            active[0] -= 1

    def workload(kind):
        state, tensors = states[kind]
        counter = torch.zeros(1, dtype=torch.int64)  # resident, mutated by the workload
        with ts.slice(state=[state, counter], name=kind) as s:
            enter(kind)
            if first.acquire(blocking=False):  # the first to run waits for the others
                everyone_queued(ts, len(KINDS))
            for i in range(steps):
                assert ts.running is s and s.status == "running"
                for t in tensors + [counter] + collect_tensors(state, None, parameters=True):
                    if aq.is_offloaded(t):
                        saw_offloaded.append(kind)
                # read the whole state (safe: nothing is paged out while we run)
                for t in tensors:
                    t.sum()
                counter.add_(1)
                spin(0.0002)
                leave()
                s.checkpoint()
                enter(kind)
            leave()
        assert int(counter) == steps

    no_errors(run_threads([lambda k=k: workload(k) for k in KINDS]))
    assert max_active[0] == 1
    assert not saw_offloaded
    stats = ts.stats()
    assert stats["preemptions"] >= 20, stats  # the test means something
    assert stats["bytes_paged_out"] > 0
    assert stats["bytes_paged_out"] == stats["bytes_paged_in"]
    for kind, (_, tensors) in states.items():
        for t, ref in zip(tensors, before[kind]):
            assert not aq.is_offloaded(t)
            assert same_bytes(t, ref), kind
        s = by_name(ts)[kind]
        assert s["status"] == "done"
        assert s["bytes_paged_out"] == s["bytes_paged_in"]
    # module parameters are not part of the state by default: never paged out
    for p, ref in zip(states["module"][0].parameters(), params_before):
        assert same_bytes(p, ref)
    assert ts.running is None and stats["running"] is None
    assert_drained(m)


def test_bytes_paged_per_preemption_match_the_state(m):
    """Without a budget every preemption pages the whole state (each storage once) out."""
    ts = aq.TimeSlicer(quantum_ms=0, manager=m, policy="rr")
    states = {k: make_state("list", k)[0] for k in range(2)}
    nbytes = sum(t.untyped_storage().nbytes() for t in collect_tensors(states[0], CPU))
    assert nbytes == 5 * 7 * 4 + 64 * 4 + 9  # base and its two views: one storage

    def workload(k):
        with ts.slice(state=states[k], name=str(k)) as s:
            if k == 0:
                everyone_queued(ts, 2)
            for _ in range(10):
                spin(0.002)  # time for the parked slice to serve its prefetch request
                s.checkpoint()

    no_errors(run_threads([lambda k=k: workload(k) for k in range(2)], stagger_s=0.002))
    for s in ts.stats()["slices"]:
        assert s["preemptions"] > 0
        assert s["bytes_paged_out"] == s["preemptions"] * nbytes
        assert s["bytes_paged_in"] == s["bytes_paged_out"]
    # the slice next in line is prefetched while the other runs its quantum
    assert m.stats()["prefetches"] > 0
    assert_drained(m)


def test_single_slice_never_preempted(m):
    ts = aq.TimeSlicer(quantum_ms=0, manager=m, policy="fair")
    state = [torch.ones(10)]
    with ts.slice(state=state, name="alone") as s:
        assert ts.running is s
        for _ in range(200):
            s.checkpoint()  # nobody waits: returns at once
        assert s.preemptions == 0
    st = ts.stats()["slices"][0]
    assert st["status"] == "done" and st["preemptions"] == 0 and st["bytes_paged_out"] == 0
    assert st["time_to_first_run_s"] is not None and st["time_to_first_run_s"] < 0.5
    assert ts.running is None


def test_state_none_and_no_tensors(m):
    """A slice without state (or with no tensors in it) is scheduled like any other."""
    ts = aq.TimeSlicer(quantum_ms=0, manager=m, policy="rr")
    states = [None, {"n": 1, "s": "text"}]

    def workload(k):
        with ts.slice(state=states[k], name=str(k)) as s:
            if k == 0:
                everyone_queued(ts, 2)
            for _ in range(10):
                spin(0.0001)
                s.checkpoint()

    no_errors(run_threads([lambda k=k: workload(k) for k in range(2)], stagger_s=0.002))
    assert ts.stats()["preemptions"] > 0
    assert ts.stats()["bytes_paged_out"] == 0


def test_parameters_flag_pages_module_parameters(m):
    ts = aq.TimeSlicer(quantum_ms=0, manager=m, policy="rr", parameters=True)
    mods = [torch.nn.Linear(16, 16) for _ in range(2)]
    refs = [[p.detach().clone() for p in mod.parameters()] for mod in mods]
    nbytes = sum(p.untyped_storage().nbytes() for p in mods[0].parameters())

    def workload(k):
        with ts.slice(state=mods[k], name=str(k)) as s:
            if k == 0:
                everyone_queued(ts, 2)
            for _ in range(8):
                assert not any(aq.is_offloaded(p) for p in mods[k].parameters())
                mods[k](torch.ones(2, 16))
                spin(0.0001)
                s.checkpoint()

    no_errors(run_threads([lambda k=k: workload(k) for k in range(2)], stagger_s=0.003))
    for s in ts.stats()["slices"]:
        assert s["preemptions"] > 0
        assert s["bytes_paged_out"] == s["preemptions"] * nbytes
    for mod, ref in zip(mods, refs):
        for p, r in zip(mod.parameters(), ref):
            assert same_bytes(p, r)
    assert_drained(m)


# -- policies under threads -----------------------------------------------------------------------
def test_fair_short_late_arrivals_start_before_long_slices_finish(m):
    ts = aq.TimeSlicer(quantum_ms=2, manager=m, policy="fair")
    finished: dict[str, float] = {}
    t0 = time.monotonic()

    def workload(name, arrive_s, steps):
        time.sleep(max(0.0, t0 + arrive_s - time.monotonic()))
        state = [torch.full((256,), float(len(name)))]
        with ts.slice(state=state, name=name) as s:
            for _ in range(steps):
                spin(0.0005)
                s.checkpoint()
        finished[name] = time.monotonic()

    jobs = [("long-0", 0.0, 160), ("long-1", 0.0, 160),
            ("short-0", 0.010, 4), ("short-1", 0.020, 4), ("short-2", 0.030, 4)]
    no_errors(run_threads([lambda j=j: workload(*j) for j in jobs]))
    st = by_name(ts)
    long_run = min(st[f"long-{i}"]["run_s"] for i in range(2))
    assert long_run > 0.06
    # fcfs would finish a short slice after both long ones; fair well before the last one
    # (not necessarily before the first: under GIL contention a late arrival may start late).
    last_long_done = max(finished[f"long-{i}"] for i in range(2))
    for i in range(3):
        short = st[f"short-{i}"]
        # a few quanta (2 ms each); fcfs would make it wait for both long slices (> 2 long_run).
        # The bound is loose for loaded machines: the OS may stall the running thread.
        assert short["time_to_first_run_s"] < 0.5 * long_run, (short, long_run)
        assert finished[f"short-{i}"] < last_long_done
    assert st["long-0"]["preemptions"] > 0 and st["long-1"]["preemptions"] > 0
    assert_drained(m)


def _weighted_run_shares(m, weights, wall_s=0.3, policy="fair"):
    ts = aq.TimeSlicer(quantum_ms=2, manager=m, policy=policy)
    barrier = threading.Barrier(len(weights))
    deadline = [0.0]

    def workload(k):
        state = [torch.zeros(64)]
        barrier.wait(timeout=10)
        if k == 0:
            deadline[0] = time.monotonic() + wall_s
        with ts.slice(state=state, name=str(k), weight=weights[k]) as s:
            while not deadline[0] or time.monotonic() < deadline[0]:
                spin(0.0002)
                s.checkpoint()

    no_errors(run_threads([lambda k=k: workload(k) for k in range(len(weights))]))
    st = by_name(ts)
    return [st[str(k)]["run_s"] for k in range(len(weights))]


def test_fair_equal_weights_get_equal_service(m):
    a, b = _weighted_run_shares(m, [1.0, 1.0], wall_s=0.4)
    # ~1.0 on an idle machine. Loose because on a loaded one the OS stalls threads mid-turn,
    # turns are charged in wall time, and FairPolicy does not pay an overlong turn back (the
    # requeue clamp bug, see test_policies.py::test_fair_pays_back_an_overlong_turn): with
    # that fixed the ratio stays within 5% even with two CPU hogs running.
    assert 1 / 3 < a / b < 3.0, (a, b)


def test_fair_service_proportional_to_weight(m):
    light, heavy = _weighted_run_shares(m, [1.0, 3.0])
    assert 2.0 < heavy / light < 4.5, (light, heavy)


def test_fair_newcomers_do_not_starve_a_slice_that_ran_alone(m):
    ts = aq.TimeSlicer(quantum_ms=2, manager=m, policy="fair")
    arrived = threading.Event()
    longest_wait = [0.0]

    def old():
        with ts.slice(state=[torch.zeros(64)], name="old") as s:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 0.3:
                spin(0.0003)
                c0 = time.monotonic()
                s.checkpoint()
                if arrived.is_set():
                    longest_wait[0] = max(longest_wait[0], time.monotonic() - c0)
                if time.monotonic() - t0 > 0.12 and not arrived.is_set():
                    arrived.set()
                    everyone_queued(ts, 3)  # both newcomers arrive during this turn

    def newcomer(name):
        arrived.wait(10)
        with ts.slice(state=[torch.zeros(64)], name=name) as s:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 0.12:
                spin(0.0003)
                s.checkpoint()

    no_errors(run_threads([old, lambda: newcomer("new-0"), lambda: newcomer("new-1")]))
    # fair with three slices: the old one waits about two quanta at a time
    assert longest_wait[0] < 0.04, longest_wait[0]


def test_fcfs_runs_to_completion_in_arrival_order(m):
    ts = aq.TimeSlicer(quantum_ms=1, manager=m, policy="fcfs")
    events: list[tuple[str, int]] = []
    go = threading.Event()
    n = 4

    def workload(k):
        state = [torch.full((128,), float(k))]
        with ts.slice(state=state, name=str(k)) as s:
            events.append(("start", k))
            if k == 0:
                go.wait(10)  # hold the turn until everybody queued
            for _ in range(15):
                spin(0.0003)  # well past the quantum: fcfs does not care
                s.checkpoint()
                events.append(("step", k))
            events.append(("finish", k))

    threads = []
    for k in range(n):
        th = threading.Thread(target=workload, args=(k,), daemon=True)
        th.start()
        threads.append(th)
        if k == 0:
            wait_until(lambda: ts.running is not None)
        else:
            wait_until(lambda k=k: ts.policy.waiting() == k)  # arrival order is now fixed
    go.set()
    for th in threads:
        th.join(JOIN_TIMEOUT_S)
        assert not th.is_alive(), "deadlock"
    order = [(e, k) for e, k in events if e != "step"]
    assert order == [(e, k) for k in range(n) for e in ("start", "finish")]
    # no interleaving of the steps either
    steps = [k for e, k in events if e == "step"]
    assert steps == sorted(steps)
    st = by_name(ts)
    for k in range(n):
        assert st[str(k)]["preemptions"] == 0 and st[str(k)]["bytes_paged_out"] == 0
        assert st[str(k)]["run_s"] > 0.004
    # the later ones waited for everything before them
    assert st["3"]["time_to_first_run_s"] > st["1"]["run_s"] + st["2"]["run_s"]
    assert_drained(m)


def test_rr_alternates(m):
    ts = aq.TimeSlicer(quantum_ms=1, manager=m, policy="rr")
    log: list[str] = []
    finish_at: list[int] = []
    names = ["a", "b", "c"]

    def workload(name):
        with ts.slice(state=[torch.zeros(32)], name=name) as s:
            if name == "a":
                everyone_queued(ts, 3)
            for _ in range(30):
                log.append(name)
                spin(0.0003)
                s.checkpoint()
            finish_at.append(len(log))

    threads = []
    for k, name in enumerate(names):
        th = threading.Thread(target=workload, args=(name,), daemon=True)
        th.start()
        threads.append(th)
        wait_until(lambda k=k: ts.running is not None and ts.policy.waiting() == k)
    for th in threads:
        th.join(JOIN_TIMEOUT_S)
        assert not th.is_alive(), "deadlock"
    # turns: runs of the same name; while all three live, the order is a fixed cycle
    turns = []
    for name in log[:finish_at[0]]:
        if not turns or turns[-1] != name:
            turns.append(name)
    start = max(turns.index(n) for n in names)
    cyc = turns[start - 2:]
    assert len(cyc) >= 9, turns
    for i in range(len(cyc) - 3):
        assert cyc[i + 3] == cyc[i], turns
        assert sorted(cyc[i:i + 3]) == names, turns
    assert_drained(m)


# -- memory budget ---------------------------------------------------------------------------------
def _budget_run(m, budget, n=3, steps=20, spin_s=0.0003):
    ts = aq.TimeSlicer(quantum_ms=1, manager=m, policy="rr", memory_budget=budget)
    states = [make_state("list", k)[0] for k in range(n)]
    refs = [clone_all(s) for s in states]

    def workload(k):
        with ts.slice(state=states[k], name=str(k)) as s:
            if k == 0:
                everyone_queued(ts, n)
            for _ in range(steps):
                assert not any(aq.is_offloaded(t) for t in states[k])
                # sleep, not spin: parked slices need the GIL to serve page-out requests
                time.sleep(spin_s)
                s.checkpoint()

    no_errors(run_threads([lambda k=k: workload(k) for k in range(n)], stagger_s=0.002))
    for st, ref in zip(states, refs):
        for t, r in zip(st, ref):
            assert same_bytes(t, r)
    nbytes = sum(t.untyped_storage().nbytes() for t in collect_tensors(states[0], CPU))
    return ts.stats(), nbytes


@pytest.mark.parametrize("budget", ["1GiB", 1 << 30])
def test_budget_larger_than_all_states_pages_nothing(m, budget):
    stats, _ = _budget_run(m, budget)
    assert stats["preemptions"] >= 5
    assert stats["bytes_paged_out"] == 0 and stats["bytes_paged_in"] == 0
    assert_drained(m)


def test_budget_zero_pages_out_every_preemption(m):
    stats, nbytes = _budget_run(m, 0)
    assert stats["preemptions"] >= 5
    for s in stats["slices"]:
        assert s["bytes_paged_out"] == s["preemptions"] * nbytes, s
        assert s["bytes_paged_in"] == s["bytes_paged_out"]
    assert_drained(m)


def test_budget_for_one_state_keeps_some_resident(m):
    """A budget of one state: the most recently run preempted slice may stay resident, the
    others are paged out; never more resident than the budget allows."""
    _, nbytes = _budget_run(m, None, n=1, steps=1)
    # Turns long enough for a parked slice to serve the page-out request before its next turn
    # (a request still pending when the slice is granted is dropped: it is about to run).
    stats, _ = _budget_run(m, nbytes, n=3, spin_s=0.003)
    assert stats["preemptions"] >= 5
    assert 0 < stats["bytes_paged_out"] < stats["preemptions"] * nbytes
    assert stats["bytes_paged_out"] == stats["bytes_paged_in"]
    assert_drained(m)


# -- automatic yield points ----------------------------------------------------------------------
def test_hooks_module_yield_per_forward(m):
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh())  # shared by both
    ts = aq.TimeSlicer(quantum_ms=1, manager=m, policy="rr")
    states = [[torch.randn(64)] for _ in range(2)]
    refs = [clone_all(s) for s in states]
    hooks_inside: list[int] = []

    def workload(k):
        with ts.slice(state=states[k], name=str(k), hooks=model) as s:
            hooks_inside.append(len(model._forward_pre_hooks))
            if k == 0:
                everyone_queued(ts, 2)
            x = torch.ones(4, 16)
            for _ in range(30):
                assert not aq.is_offloaded(states[k][0])
                x = model(x)  # no explicit checkpoint: the forward pre-hook is the yield point
                spin(0.0003)
        assert s.preemptions > 0

    no_errors(run_threads([lambda k=k: workload(k) for k in range(2)], stagger_s=0.003))
    assert len(model._forward_pre_hooks) == 0
    assert all(0 < n <= 2 for n in hooks_inside)
    for st, ref in zip(states, refs):
        assert same_bytes(st[0], ref[0])
    assert all(s["preemptions"] > 0 for s in ts.stats()["slices"])
    # outside any slice, the model runs with no hook and no yield point
    model(torch.ones(1, 16))
    assert_drained(m)


def test_hooks_removed_when_the_body_raises(m):
    model = torch.nn.Linear(4, 4)
    ts = aq.TimeSlicer(quantum_ms=1, manager=m)
    with pytest.raises(ValueError):
        with ts.slice(state=[torch.ones(3)], name="x", hooks=model):
            assert len(model._forward_pre_hooks) == 1
            model(torch.ones(1, 4))  # a yield point that returns at once (nobody waits)
            raise ValueError("boom")
    assert len(model._forward_pre_hooks) == 0
    assert ts.stats()["slices"][0]["status"] == "failed"


# -- faults ------------------------------------------------------------------------------------------
def test_exception_releases_the_turn_and_leaks_nothing(m):
    ts = aq.TimeSlicer(quantum_ms=1, manager=m, policy="rr")
    states = [make_state("list", k)[0] for k in range(3)]
    refs = [clone_all(s) for s in states]
    paged_at_failure = {}

    def workload(k):
        with ts.slice(state=states[k], name=str(k)) as s:
            if k == 0:
                everyone_queued(ts, 3)
            for i in range(40):
                spin(0.0003)
                s.checkpoint()
                if k == 1 and s.preemptions >= 2 and i >= 10:
                    paged_at_failure.update(out=s.bytes_paged_out, inn=s.bytes_paged_in)
                    raise RuntimeError("workload 1 fails")

    errors = run_threads([lambda k=k: workload(k) for k in range(3)], stagger_s=0.002)
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], RuntimeError)
    st = by_name(ts)
    assert st["1"]["status"] == "failed"
    assert st["0"]["status"] == "done" and st["2"]["status"] == "done"
    # its state was not paged in again after it failed (it was resident then), nor out
    assert st["1"]["bytes_paged_out"] == paged_at_failure["out"] == paged_at_failure["inn"]
    assert st["1"]["bytes_paged_in"] == paged_at_failure["inn"]
    for st_, ref in zip(states, refs):
        for t, r in zip(st_, ref):
            assert not aq.is_offloaded(t)
            assert same_bytes(t, r)
    assert ts.running is None
    assert_drained(m)


def test_exception_while_first_in_line_lets_the_next_run(m):
    """The slice holding the turn fails before any checkpoint: the waiting one runs."""
    ts = aq.TimeSlicer(quantum_ms=1, manager=m, policy="fair")
    holding = threading.Event()
    ran = []

    def failing():
        with ts.slice(state=[torch.ones(8)], name="bad"):
            holding.set()
            wait_until(lambda: ts.policy.waiting() == 1)
            raise KeyError("bad")

    def good():
        holding.wait(10)
        with ts.slice(state=[torch.ones(8)], name="good") as s:
            s.checkpoint()
            ran.append(True)

    errors = run_threads([failing, good])
    assert isinstance(errors[0], KeyError) and errors[1] is None
    assert ran == [True]
    assert by_name(ts)["bad"]["status"] == "failed"
    assert_drained(m)


def test_nested_slice_in_one_thread(m):
    ts = aq.TimeSlicer(quantum_ms=1, manager=m)
    with ts.slice(state=[torch.ones(2)], name="outer") as s:
        with pytest.raises(aq.InvalidArgumentError, match="nested"):
            with ts.slice(state=[torch.ones(2)], name="inner"):
                pass  # pragma: no cover
        s.checkpoint()  # the outer slice is unharmed
    assert [x["name"] for x in ts.stats()["slices"]] == ["outer"]
    assert ts.stats()["slices"][0]["status"] == "done"
    with ts.slice(state=None, name="again"):  # and the thread can enter a slice again
        pass


def test_checkpoint_from_another_thread_or_after_exit(m):
    ts = aq.TimeSlicer(quantum_ms=1, manager=m)
    box: dict = {}
    inside = threading.Event()
    checked = threading.Event()

    def owner():
        with ts.slice(state=[torch.ones(2)], name="owner") as s:
            box["s"] = s
            inside.set()
            checked.wait(10)
            s.checkpoint()  # still fine from its own thread

    th = threading.Thread(target=owner, daemon=True)
    th.start()
    assert inside.wait(10)
    with pytest.raises(aq.InvalidArgumentError, match="outside its slice"):
        box["s"].checkpoint()
    checked.set()
    th.join(JOIN_TIMEOUT_S)
    assert not th.is_alive()
    with pytest.raises(aq.InvalidArgumentError):
        box["s"].checkpoint()  # after the slice ended
    with ts.slice(name="mine") as s:
        pass
    with pytest.raises(aq.InvalidArgumentError):
        s.checkpoint()  # after exit, same thread


def test_close_while_slices_wait(m):
    """Slices waiting for a turn when the slicer closes raise SlicerClosedError with their
    state paged back in, bitwise; the running slice finishes; no deadlock, no leak."""
    ts = aq.TimeSlicer(quantum_ms=0, manager=m, policy="fair")
    state_b, tensors_b = make_state("object", 1)
    state_c, tensors_c = make_state("dict", 2)
    refs_b, refs_c = clone_all(tensors_b), clone_all(tensors_c)
    a_running = threading.Event()
    release_a = threading.Event()
    result: dict = {}

    def b():  # runs first, is preempted by a (paged out), then waits
        try:
            with ts.slice(state=state_b, name="b") as s:
                wait_until(lambda: ts.policy.waiting() == 1)
                s.checkpoint()
                result["b"] = "ran again"  # pragma: no cover
        except aq.SlicerClosedError as e:
            result["b"] = e

    def a():
        with ts.slice(state=[torch.ones(4)], name="a"):
            a_running.set()
            release_a.wait(10)
        result["a"] = "done"

    def c():  # arrives while a runs, never ran
        try:
            with ts.slice(state=state_c, name="c"):
                result["c"] = "ran"  # pragma: no cover
        except aq.SlicerClosedError as e:
            result["c"] = e

    tb = threading.Thread(target=b, daemon=True)
    tb.start()
    wait_until(lambda: ts.running is not None)
    ta = threading.Thread(target=a, daemon=True)
    ta.start()
    assert a_running.wait(10)
    assert all(aq.is_offloaded(t) for t in tensors_b)  # b is parked, paged out
    tc = threading.Thread(target=c, daemon=True)
    tc.start()
    wait_until(lambda: ts.policy.waiting() == 2)
    ts.close()
    for th in (tb, tc):
        th.join(JOIN_TIMEOUT_S)
        assert not th.is_alive(), "deadlock"
    assert isinstance(result["b"], aq.SlicerClosedError)
    assert isinstance(result["c"], aq.SlicerClosedError)
    assert isinstance(result["b"], aq.OffloadError)
    for t, r in zip(tensors_b, refs_b):
        assert not aq.is_offloaded(t) and same_bytes(t, r)
    for t, r in zip(tensors_c, refs_c):
        assert not aq.is_offloaded(t) and same_bytes(t, r)
    release_a.set()
    ta.join(JOIN_TIMEOUT_S)
    assert not ta.is_alive()
    assert result["a"] == "done"
    st = by_name(ts)
    assert st["a"]["status"] == "done"
    assert st["b"]["status"] == "failed" and st["c"]["status"] == "failed"
    assert st["c"]["time_to_first_run_s"] is None
    assert st["b"]["bytes_paged_out"] == st["b"]["bytes_paged_in"] > 0
    with pytest.raises(aq.SlicerClosedError):
        with ts.slice(state=None, name="late"):
            pass  # pragma: no cover
    assert ts.running is None
    assert_drained(m)


def test_close_lets_the_running_slice_finish_and_fails_the_waiting_one(m):
    ts = aq.TimeSlicer(quantum_ms=0, manager=m, policy="fair", memory_budget="1GiB")
    result: dict = {}

    def a():
        try:
            with ts.slice(state=[torch.ones(16)], name="a") as s:
                wait_until(lambda: ts.policy.waiting() == 1)
                time.sleep(0.01)  # b is parked in its wait
                interval = sys.getswitchinterval()
                sys.setswitchinterval(1.0)  # keep the GIL from close() to checkpoint()
                try:
                    ts.close()
                    s.checkpoint()
                finally:
                    sys.setswitchinterval(interval)
                result["a"] = "done"
        except aq.SlicerClosedError:
            result["a"] = "SlicerClosedError"

    def b():
        wait_until(lambda: ts.running is not None)
        try:
            with ts.slice(state=[torch.ones(16)], name="b"):
                result["b"] = "done"
        except aq.SlicerClosedError:
            result["b"] = "SlicerClosedError"

    no_errors(run_threads([a, b]))
    assert result == {"a": "done", "b": "SlicerClosedError"}


def test_slicer_as_context_manager_closes(m):
    with aq.TimeSlicer(quantum_ms=1, manager=m) as ts:
        with ts.slice(state=[torch.ones(2)], name="x"):
            pass
    with pytest.raises(aq.SlicerClosedError):
        with ts.slice(state=None):
            pass  # pragma: no cover


@pytest.mark.parametrize("quantum_ms", [-1, -0.001, "5", None, True, float("nan"), [1]])
def test_bad_quantum(m, quantum_ms):
    with pytest.raises(aq.InvalidArgumentError, match="quantum_ms"):
        aq.TimeSlicer(quantum_ms=quantum_ms, manager=m)


@pytest.mark.parametrize("quantum_ms", [0, 0.5, 20, 1e6])
def test_good_quantum(m, quantum_ms):
    assert aq.TimeSlicer(quantum_ms=quantum_ms, manager=m).stats()["quantum_ms"] == \
        pytest.approx(quantum_ms)


@pytest.mark.parametrize("policy", ["bogus", "", "FCFS", None, 1])
def test_bad_policy(m, policy):
    with pytest.raises(aq.InvalidArgumentError, match="policy"):
        aq.TimeSlicer(quantum_ms=1, manager=m, policy=policy)


def test_policy_instance(m):
    p = aq.RoundRobinPolicy()
    ts = aq.TimeSlicer(quantum_ms=1, manager=m, policy=p)
    assert ts.policy is p and ts.stats()["policy"] == "rr"


@pytest.mark.parametrize("manager", ["cpu", object(), 0, torch.device("cpu")])
def test_bad_manager(manager):
    with pytest.raises(aq.InvalidArgumentError, match="manager"):
        aq.TimeSlicer(quantum_ms=1, manager=manager)


@pytest.mark.parametrize("budget", [-1, "lots", 1.5, "1.5B"])
def test_bad_memory_budget(m, budget):
    with pytest.raises(aq.InvalidArgumentError, match="memory_budget"):
        aq.TimeSlicer(quantum_ms=1, manager=m, memory_budget=budget)


@pytest.mark.parametrize("weight", [0, -1, float("nan"), float("inf"), True, "2", None])
def test_bad_weight(m, weight):
    ts = aq.TimeSlicer(quantum_ms=1, manager=m)
    with pytest.raises(aq.InvalidArgumentError, match="weight"):
        with ts.slice(state=[torch.ones(2)], name="w", weight=weight):
            pass  # pragma: no cover
    assert ts.stats()["slices"] == [] and ts.running is None
    with ts.slice(state=[torch.ones(2)], name="ok", weight=2.0) as s:  # still usable
        assert s.weight == 2.0


# -- accounting ----------------------------------------------------------------------------------
def test_stats_and_attributes(m):
    ts = aq.TimeSlicer(quantum_ms=1, manager=m, policy="rr")
    inside: dict = {}

    def workload(k):
        with ts.slice(state=[torch.zeros(100)], name=f"w{k}", weight=1.0 + k) as s:
            inside[k] = (ts.stats()["running"], s.status)
            if k == 0:
                everyone_queued(ts, 2)
            for _ in range(15):
                spin(0.0003)
                s.checkpoint()

    no_errors(run_threads([lambda k=k: workload(k) for k in range(2)], stagger_s=0.003))
    assert inside == {0: ("w0", "running"), 1: ("w1", "running")}
    stats = ts.stats()
    assert set(stats) == {"policy", "quantum_ms", "slices", "preemptions", "bytes_paged_out",
                          "bytes_paged_in", "running"}
    assert stats["policy"] == "rr" and stats["quantum_ms"] == pytest.approx(1.0)
    assert stats["running"] is None
    assert len(stats["slices"]) == 2
    keys = {"name", "weight", "status", "run_s", "wait_s", "preemptions", "bytes_paged_out",
            "bytes_paged_in", "time_to_first_run_s"}
    for s in stats["slices"]:
        assert set(s) == keys
        assert s["status"] == "done"
        assert s["run_s"] > 0.003 and s["wait_s"] >= 0
        assert 0 <= s["time_to_first_run_s"] <= s["wait_s"] + 1e-9
        assert s["preemptions"] > 0
        assert s["bytes_paged_out"] == s["preemptions"] * 400
    assert {s["name"]: s["weight"] for s in stats["slices"]} == {"w0": 1.0, "w1": 2.0}
    for key in ("preemptions", "bytes_paged_out", "bytes_paged_in"):
        assert stats[key] == sum(s[key] for s in stats["slices"])
    # the second arrived while the first ran: it waited for its first turn
    assert by_name(ts)["w1"]["time_to_first_run_s"] > 0


def test_slice_attributes_match_stats(m):
    ts = aq.TimeSlicer(quantum_ms=1, manager=m)
    with ts.slice(state=[torch.ones(3)], name="solo", weight=2.5) as s:
        spin(0.002)
    st = s.stats()
    assert st == ts.stats()["slices"][0]
    assert (s.name, s.weight, s.status) == ("solo", 2.5, "done")
    assert s.run_s == st["run_s"] >= 0.002
    assert s.wait_s == st["wait_s"] and s.preemptions == 0
    assert s.time_to_first_run_s == st["time_to_first_run_s"]
    assert "solo" in repr(s)


def test_default_name(m):
    ts = aq.TimeSlicer(quantum_ms=1, manager=m)
    with ts.slice(state=[torch.ones(1)]) as s:
        pass
    assert isinstance(s.name, str) and s.name


# -- state walking -------------------------------------------------------------------------------
def ids(tensors):
    return [id(t) for t in tensors]


def test_collect_single_tensor():
    t = torch.ones(3)
    assert ids(collect_tensors(t, CPU)) == [id(t)]
    assert ids(collect_tensors(t, None)) == [id(t)]


def test_collect_nested_containers_in_order():
    a, b, c, d, e = (torch.full((2,), float(i)) for i in range(5))
    state = [a, (b, [c, {"k": d, "n": 1}]), {"x": {"y": [e]}}]
    assert ids(collect_tensors(state, CPU)) == ids([a, b, c, d, e])
    assert ids(collect_tensors(state, CPU)) == ids(collect_tensors(state, CPU))  # deterministic


def test_collect_dict_values_not_keys():
    k = torch.ones(1)
    v = torch.zeros(1)
    assert ids(collect_tensors({k: v}, CPU)) == [id(v)]


def test_collect_sets():
    a, b = torch.ones(1), torch.zeros(1)
    assert set(ids(collect_tensors({a, b}, CPU))) == {id(a), id(b)}
    assert set(ids(collect_tensors(frozenset([a]), CPU))) == {id(a)}


def test_collect_atoms_and_empty():
    assert collect_tensors([1, 2.0, "s", b"b", None, torch.float32, CPU, 3j, True], CPU) == []
    assert collect_tensors(None, CPU) == []
    assert collect_tensors([], CPU) == []
    assert collect_tensors({}, None) == []


def test_collect_module_buffers_vs_parameters():
    mod = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    buffers = list(mod.buffers())
    params = list(mod.parameters())
    assert len(buffers) == 3 and len(params) == 4
    assert ids(collect_tensors(mod, CPU)) == ids(buffers)
    got = collect_tensors(mod, CPU, parameters=True)
    assert set(ids(got)) == set(ids(buffers + params)) and len(got) == 7
    # a module inside a container is walked the same way
    assert ids(collect_tensors({"model": mod}, CPU)) == ids(buffers)


def test_collect_object_attributes_and_slots():
    gen = torch.Generator().manual_seed(0)
    cache = KVCache(gen)
    got = collect_tensors(cache, CPU)
    assert ids(got) == ids(cache.key_cache + cache.value_cache)
    s = Slotted(torch.ones(2), cache)
    assert ids(collect_tensors(s, CPU)) == ids([s.a] + cache.key_cache + cache.value_cache)
    empty = Slotted.__new__(Slotted)  # unset slots are skipped
    assert collect_tensors(empty, CPU) == []


def test_collect_simple_namespace():
    t = torch.ones(2)
    assert ids(collect_tensors(types.SimpleNamespace(t=t, n=1), CPU)) == [id(t)]


def test_collect_cycles():
    t = torch.ones(2)
    lst: list = [t]
    lst.append(lst)
    assert ids(collect_tensors(lst, CPU)) == [id(t)]
    d: dict = {"t": t}
    d["self"] = d
    assert ids(collect_tensors(d, CPU)) == [id(t)]
    x, y = types.SimpleNamespace(), types.SimpleNamespace()
    x.other, y.other = y, x
    x.t = t
    y.u = u = torch.zeros(2)
    assert set(ids(collect_tensors(x, CPU))) == {id(t), id(u)}


def test_collect_views_of_one_storage_once():
    base = torch.arange(24.0)
    views = [base, base[2:], base.view(4, 6), base.view(4, 6).t(), base[::3], base.view(2, 12)[1]]
    got = collect_tensors(views, CPU)
    assert ids(got) == [id(base)]
    got = collect_tensors(list(reversed(views)), CPU)
    assert len(got) == 1 and got[0] is views[-1]  # the first one met stands for the storage
    other = torch.arange(24.0)  # same values, another storage
    assert len(collect_tensors([base, other, base[1:]], CPU)) == 2


def test_collect_skips_other_devices_and_layouts():
    cpu = torch.ones(3)
    meta = torch.empty(3, device="meta")
    sparse = torch.eye(3).to_sparse()
    state = [meta, cpu, sparse]
    assert ids(collect_tensors(state, CPU)) == [id(cpu)]
    assert ids(collect_tensors(state, torch.device("meta"))) == [id(meta)]
    assert set(ids(collect_tensors(state, None))) == {id(cpu), id(meta)}  # None: any device


def test_collect_max_depth():
    t = torch.ones(1)
    deep: object = t
    for _ in range(30):
        deep = [deep]
    assert collect_tensors(deep, CPU) == []  # deeper than the default 16: not followed
    assert ids(collect_tensors(deep, CPU, max_depth=40)) == [id(t)]


def test_collect_inherited_slots():
    class Base:
        __slots__ = ("key",)

    class Derived(Base):
        __slots__ = ("value",)

    d = Derived()
    d.key, d.value = torch.ones(2), torch.zeros(2)
    assert set(ids(collect_tensors(d, CPU))) == {id(d.key), id(d.value)}


def test_collect_string_slots():
    class One:
        __slots__ = "key"

    o = One()
    o.key = torch.ones(2)
    assert ids(collect_tensors(o, CPU)) == [id(o.key)]


def test_collect_does_not_walk_into_python_modules():
    helpers = types.ModuleType("helpers")
    helpers.TABLE = torch.arange(4.0)  # a module-level tensor every workload reads
    kv = torch.ones(2)
    state = types.SimpleNamespace(kv=kv, lib=helpers)
    assert ids(collect_tensors(state, CPU)) == [id(kv)]


def test_state_referencing_the_slicer_does_not_page_out_other_slices(m):
    ts = aq.TimeSlicer(quantum_ms=0, manager=m, policy="fair")
    kv_b = torch.ones(1000)
    seen: dict = {}

    def a():
        request = types.SimpleNamespace(kv=torch.zeros(1000), slicer=ts)
        with ts.slice(state=request, name="a") as s:
            wait_until(lambda: ts.policy.waiting() == 1)
            s.checkpoint()

    def b():
        wait_until(lambda: ts.running is not None)
        with ts.slice(state=[kv_b], name="b"):
            seen["paged_out_while_b_runs"] = aq.is_offloaded(kv_b)  # never touch it here

    no_errors(run_threads([a, b]))
    assert not aq.is_offloaded(kv_b)
    assert seen == {"paged_out_while_b_runs": False}
    assert by_name(ts)["a"]["bytes_paged_out"] == 4000  # a's own tensor only


# -- the example ---------------------------------------------------------------------------------
def test_example_timeslice_threads_runs():
    env = dict(os.environ)  # the aqua_offload this test imports (installed, or PYTHONPATH)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "timeslice_threads.py"),
                           "--device", "cpu"], capture_output=True, text=True, timeout=120,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "policy fcfs" in out and "policy fair" in out
    assert "bitwise identical" in out and out.rstrip().endswith("OK")


def test_an_arrival_during_page_in_does_not_charge_the_turn_holder(m):
    """The slice granted the turn runs only once paged in: a newcomer arriving in between
    charges it nothing (it used to be charged all the time since it last ran)."""
    now = [1000.0]
    ts = aq.TimeSlicer(quantum_ms=0, manager=m, policy="fair", clock=lambda: now[0])
    in_page_in, release, go_a1, go_a2, go_c = (threading.Event() for _ in range(5))
    real_page_in = ts._page_in

    def slow_page_in(s):  # hold A between being granted and running
        if s.name == "A":
            in_page_in.set()
            release.wait(10)
        return real_page_in(s)

    ts._page_in = slow_page_in
    data = torch.randn(256)

    def a():
        state = [data.clone()]
        with ts.slice(state=state, name="A") as s:
            go_a1.wait(10)
            s.checkpoint()  # C waits: A is preempted and paged out
            go_a2.wait(10)
        assert torch.equal(state[0], data)

    def c():
        with ts.slice(state=None, name="C"):
            go_c.wait(10)

    def b():
        with ts.slice(state=None, name="B"):
            pass

    ta = threading.Thread(target=a, daemon=True)
    ta.start()
    wait_until(lambda: ts.running is not None and ts.running.status == "running")
    now[0] = 1001.0
    tc = threading.Thread(target=c, daemon=True)
    tc.start()
    wait_until(lambda: ts.policy.waiting() == 1)
    now[0] = 1002.0
    go_a1.set()
    wait_until(lambda: ts.running is not None and ts.running.name == "C"
               and ts.running.status == "running")
    now[0] = 1012.0
    go_c.set()
    assert in_page_in.wait(10)
    now[0] = 1013.0  # B arrives while A is granted but still paging in
    tb = threading.Thread(target=b, daemon=True)
    tb.start()
    wait_until(lambda: ts.policy.waiting() == 1)
    release.set()
    wait_until(lambda: ts.running is not None and ts.running.name == "A"
               and ts.running.status == "running")
    now[0] = 1014.0
    go_a2.set()
    for th in (ta, tb, tc):
        th.join(JOIN_TIMEOUT_S)
        assert not th.is_alive(), "deadlock"
    st = by_name(ts)
    assert st["A"]["run_s"] == pytest.approx(3.0)  # 1000-1002 and 1013-1014, not C's turn
    assert st["C"]["run_s"] == pytest.approx(10.0)
    assert_drained(m)

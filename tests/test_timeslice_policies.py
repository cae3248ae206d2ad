"""TimeSlicer policies under real threads (fair shares and weights, fcfs, rr) and the memory
budget that decides which preempted states are paged out (emulation backend; hard timeouts,
loose timing bounds: see test_timeslice.py)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import aqua_offload as aq
from aqua_offload.state import collect_tensors
from conftest import same_bytes, wait_until
from helpers import JOIN_TIMEOUT_S, no_errors, run_threads
from slicing_helpers import (CPU, assert_drained, by_name, clone_all, everyone_queued, make_state,
                             spin)


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
        if k < len(names) - 1:  # arrival order fixed; the last arrival lets "a" go at once
            # (waiting for it too raced with the whole run finishing on a loaded machine)
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

"""TimeSlicer faults and boundaries: a body that raises, nested slices, checkpoints from the
wrong thread, close() while slices run or wait, and bad arguments refused with typed errors
(emulation backend; hard timeouts: see test_timeslice.py)."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

import aqua_offload as aq
from conftest import same_bytes, wait_until
from helpers import JOIN_TIMEOUT_S, no_errors, run_threads
from slicing_helpers import (assert_drained, by_name, clone_all, everyone_queued, make_state, spin)


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

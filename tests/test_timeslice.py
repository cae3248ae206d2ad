"""TimeSlicer with real threads on the emulation backend (CPU tensors): one slice runs at a time
and every state survives its preemptions, automatic yield points, accounting, the example.

Every threaded test joins its threads with a timeout, so a deadlock fails the test instead of
hanging the run (the threads are daemons). Quanta are 1-5 ms and tensors small, so the whole
file takes a few seconds. Timing bounds are loose (a loaded 2-core machine): they separate
"within a few quanta" from "after a whole workload", never finer. Policies and memory budgets:
test_timeslice_policies.py; faults, close and bad arguments: test_timeslice_faults.py; the
state walker: test_state_walk.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

import aqua_offload as aq
from aqua_offload.state import collect_tensors
from conftest import same_bytes, wait_until
from helpers import JOIN_TIMEOUT_S, no_errors, run_threads
from slicing_helpers import (CPU, KINDS, assert_drained, by_name, clone_all, everyone_queued,
                             make_state, spin)

ROOT = Path(__file__).resolve().parents[1]


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

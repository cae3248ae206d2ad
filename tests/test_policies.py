"""Unit tests of the time slicer's scheduling policies (src/aqua_offload/policies.py).

The policies are pure: no clock, no threads, no sleeps. Run times are passed explicitly, so
every test here is a deterministic simulation: ``pick -> charge(quantum) -> requeue``.
"""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aqua_offload as aq
from aqua_offload.policies import (POLICY_NAMES, FairPolicy, FCFSPolicy, RoundRobinPolicy,
                                   SchedulingPolicy, make_policy)

ALL = [FairPolicy, RoundRobinPolicy, FCFSPolicy]
Q = 0.005  # a 5 ms quantum, in seconds


def simulate(p: SchedulingPolicy, picks: int, quantum: float = Q,
             order: list | None = None) -> dict:
    """Run ``picks`` turns of ``quantum`` seconds each; return the service per task."""
    served: dict = {}
    for _ in range(picks):
        t = p.pick()
        assert t is not None
        p.charge(t, quantum)
        p.requeue(t)
        served[t] = served.get(t, 0.0) + quantum
        if order is not None:
            order.append(t)
    return served


# -- make_policy ------------------------------------------------------------------------------
def test_make_policy_by_name():
    assert POLICY_NAMES == ("fair", "rr", "fcfs")
    for name, cls in zip(POLICY_NAMES, [FairPolicy, RoundRobinPolicy, FCFSPolicy]):
        p = make_policy(name)
        assert type(p) is cls and p.name == name
        assert isinstance(p, SchedulingPolicy)
    assert make_policy("fair") is not make_policy("fair")  # a fresh instance each time


def test_make_policy_passes_instances_through():
    p = FairPolicy()
    assert make_policy(p) is p


@pytest.mark.parametrize("bad", ["bogus", "FAIR", "", " fair", None, 3, FairPolicy])
def test_make_policy_unknown(bad):
    with pytest.raises(aq.InvalidArgumentError, match="unknown scheduling policy"):
        make_policy(bad)


def test_preemptive_flags():
    assert FairPolicy.preemptive and RoundRobinPolicy.preemptive
    assert not FCFSPolicy.preemptive


# -- input validation, every policy -------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("weight", [0, 0.0, -1, -0.5, float("nan"), float("inf"), float("-inf"),
                                    True, False, "1", None, [1], 1e-320, 5e-324])
def test_bad_weight(cls, weight):
    p = cls()
    with pytest.raises(aq.InvalidArgumentError, match="weight"):
        p.add("a", weight)
    assert p.waiting() == 0 and p.pick() is None
    p.add("a", 1.0)  # the failed add left nothing behind
    assert p.pick() == "a"


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("weight", [1, 2.5, 1e-9, 1e9])
def test_good_weight(cls, weight):
    p = cls()
    p.add("a", weight)
    assert p.waiting() == 1


@pytest.mark.parametrize("cls", ALL)
def test_add_twice(cls):
    p = cls()
    p.add("a")
    with pytest.raises(aq.InvalidArgumentError, match="already scheduled"):
        p.add("a")
    assert p.waiting() == 1
    assert p.pick() == "a"
    with pytest.raises(aq.InvalidArgumentError, match="already scheduled"):
        p.add("a")  # running (picked, not yet requeued) still counts as scheduled
    assert p.waiting() == 0


@pytest.mark.parametrize("cls", ALL)
def test_add_again_after_remove(cls):
    p = cls()
    p.add("a")
    p.remove("a")
    p.add("a", 2.0)
    assert p.waiting() == 1 and p.pick() == "a"


@pytest.mark.parametrize("cls", ALL)
def test_empty(cls):
    p = cls()
    assert p.pick() is None and p.peek() is None and p.waiting() == 0
    assert not p.should_yield(10.0, Q)
    p.remove("never-added")  # forgetting an unknown task is harmless
    assert p.waiting() == 0


@pytest.mark.parametrize("cls", ALL)
def test_peek_matches_pick(cls):
    p = cls()
    for i in range(5):
        p.add(i, float(i + 1))
    for _ in range(40):
        nxt = p.peek()
        assert p.peek() is nxt  # idempotent
        t = p.pick()
        assert t == nxt
        p.charge(t, Q * (1 + t))
        p.requeue(t)


@pytest.mark.parametrize("cls", ALL)
def test_remove_waiting_and_running(cls):
    p = cls()
    for name in "abcd":
        p.add(name)
    running = p.pick()
    assert running == "a"
    p.remove("c")  # waiting
    assert p.waiting() == 2
    p.remove(running)  # not waiting (running)
    assert p.waiting() == 2
    got = [p.pick(), p.pick(), p.pick()]
    assert got == ["b", "d", None]
    assert p.vruntime("a") == 0.0 and p.vruntime("c") == 0.0  # forgotten


@pytest.mark.parametrize("cls", ALL)
def test_remove_everything_then_reuse(cls):
    p = cls()
    for i in range(100):
        p.add(i)
    for i in range(0, 100, 2):
        p.remove(i)
    assert p.waiting() == 50
    seen = []
    while (t := p.pick()) is not None:
        seen.append(t)
    assert sorted(seen) == list(range(1, 100, 2))
    assert p.waiting() == 0


# -- should_yield -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [FairPolicy, RoundRobinPolicy])
def test_should_yield_preemptive(cls):
    p = cls()
    p.add("a")
    p.pick()
    assert not p.should_yield(1.0, Q)  # nobody waits: keep running however long
    p.add("b")
    assert not p.should_yield(Q / 2, Q)  # quantum not used up
    assert p.should_yield(Q, Q)
    assert p.should_yield(100 * Q, Q)
    assert p.should_yield(0.0, 0.0)  # quantum 0: yield at every yield point when others wait


def test_fcfs_never_yields():
    p = FCFSPolicy()
    for name in "abc":
        p.add(name)
    p.pick()
    for ran in (0.0, Q, 10 * Q, 1e9):
        for quantum in (0.0, Q, 1e-9):
            assert not p.should_yield(ran, quantum)


# -- round robin / FCFS ------------------------------------------------------------------------
def test_rr_fifo_with_requeue_at_back():
    p = RoundRobinPolicy()
    for name in "abc":
        p.add(name)
    order: list = []
    simulate(p, 9, order=order)
    assert order == list("abcabcabc")
    p.add("d")  # a newcomer joins the back of the line
    order = []
    simulate(p, 8, order=order)
    assert order == list("abcdabcd")


def test_rr_ignores_weights_and_run_time():
    p = RoundRobinPolicy()
    p.add("heavy", 100.0)
    p.add("light", 1.0)
    order = []
    for i in range(6):
        t = p.pick()
        order.append(t)
        p.charge(t, 10 * Q if t == "heavy" else Q)
        p.requeue(t)
    assert order == ["heavy", "light"] * 3
    assert p.vruntime("heavy") == pytest.approx(30 * Q)  # plain run time, not weighted
    assert p.vruntime("light") == pytest.approx(3 * Q)


def test_fcfs_keeps_arrival_order():
    p = FCFSPolicy()
    for name in ["first", "second", "third", "fourth"]:
        p.add(name, 1.0 if name != "third" else 50.0)
    done = []
    while (t := p.pick()) is not None:
        # run to completion: charge a long run, never requeue (should_yield said no)
        assert not p.should_yield(1e6, Q)
        p.charge(t, 123.0)
        p.remove(t)
        done.append(t)
    assert done == ["first", "second", "third", "fourth"]


def test_fcfs_arrival_order_with_late_arrivals():
    p = FCFSPolicy()
    p.add(1)
    p.add(2)
    assert p.pick() == 1
    p.add(3)
    p.remove(1)
    assert p.pick() == 2
    p.add(4)
    p.remove(2)
    assert [p.pick(), p.pick(), p.pick()] == [3, 4, None]


# -- fair ---------------------------------------------------------------------------------------
def test_fair_picks_min_vruntime():
    p = FairPolicy()
    for name in "abc":
        p.add(name)
    assert p.pick() == "a"
    p.charge("a", 3 * Q)
    p.requeue("a")
    assert p.pick() == "b"
    p.charge("b", 1 * Q)
    p.requeue("b")
    assert p.pick() == "c"
    p.charge("c", 2 * Q)
    p.requeue("c")
    vr = {t: p.vruntime(t) for t in "abc"}
    assert vr == pytest.approx({"a": 3 * Q, "b": 1 * Q, "c": 2 * Q})
    assert [p.pick(), p.pick(), p.pick()] == ["b", "c", "a"]  # ascending virtual runtime


def test_fair_ties_are_fifo():
    p = FairPolicy()
    for i in range(10):
        p.add(i)
    assert [p.pick() for _ in range(10)] == list(range(10))


@pytest.mark.parametrize("weight", [1.0, 2.0, 4.0, 0.5, 3.0])
def test_fair_charge_divides_by_weight(weight):
    p = FairPolicy()
    p.add("a", weight)
    p.pick()
    p.charge("a", 6 * Q)
    assert p.vruntime("a") == pytest.approx(6 * Q / weight)
    p.charge("a", 0.0)
    assert p.vruntime("a") == pytest.approx(6 * Q / weight)


def test_fair_negative_charge():
    p = FairPolicy()
    p.add("a")
    p.pick()
    for bad in (-Q, float("nan"), float("inf"), "1", True):
        with pytest.raises(aq.InvalidArgumentError, match="run time"):
            p.charge("a", bad)
    assert p.vruntime("a") == 0.0


def test_fair_heavier_task_advances_slower():
    """A weight-4 task charged one quantum advances a quarter as far in virtual time."""
    p = FairPolicy()
    p.add("light", 1.0)
    p.add("heavy", 4.0)
    assert p.pick() == "light"
    p.charge("light", Q)
    p.requeue("light")
    assert p.pick() == "heavy"
    p.charge("heavy", Q)
    assert p.vruntime("heavy") == pytest.approx(Q / 4)
    assert p.vruntime("light") == pytest.approx(Q)
    # (That the heavy task, now behind in virtual time, runs next is
    # test_fair_weight_three_runs_three_turns_per_light_turn.)


def test_fair_equal_weights_equal_service():
    p = FairPolicy()
    for name in "abcd":
        p.add(name, 2.0)
    served = simulate(p, 4000)
    for t in "abcd":
        assert served[t] == pytest.approx(1000 * Q, abs=Q)


@pytest.mark.parametrize("weights", [(1.0, 2.0, 4.0), (1.0, 3.0), (1.0, 1.0, 5.0)])
def test_fair_service_proportional_to_weight(weights):
    p = FairPolicy()
    for i, w in enumerate(weights):
        p.add(i, w)
    picks = 700 * int(sum(weights))
    served = simulate(p, picks)
    total = sum(served.values())
    for i, w in enumerate(weights):
        want = total * w / sum(weights)
        assert served.get(i, 0.0) == pytest.approx(want, abs=2 * Q), (served, weights)


def test_fair_weight_three_runs_three_turns_per_light_turn():
    p = FairPolicy()
    p.add("light", 1.0)
    p.add("heavy", 3.0)
    order = []
    simulate(p, 16, order=order)
    # after light's first quantum, heavy needs three quanta to catch up in virtual time
    assert order[:8] == ["light", "heavy", "heavy", "heavy", "light", "heavy", "heavy", "heavy"]


def test_fair_pays_back_an_overlong_turn():
    p = FairPolicy()
    p.add("a")
    p.add("b")
    assert p.pick() == "a"
    p.charge("a", 10 * Q)  # a stalled: its turn lasted ten quanta
    p.requeue("a")
    order: list = []
    simulate(p, 12, order=order)
    # b runs until it has caught up (nine quanta; ties go to the task queued first)
    assert order[:9] == ["b"] * 9, order
    assert p.vruntime("a") == pytest.approx(p.vruntime("b"), abs=Q)


def test_fair_newcomer_starts_at_min_vruntime():
    p = FairPolicy()
    p.add("a")
    p.add("b")
    simulate(p, 200)  # a and b have received 100 quanta each
    vr_a, vr_b = p.vruntime("a"), p.vruntime("b")
    assert min(vr_a, vr_b) >= 99 * Q
    p.add("c")
    # no credit for the time before it arrived: it starts at the current minimum, not at 0
    assert p.vruntime("c") == pytest.approx(min(vr_a, vr_b))


def test_fair_newcomer_runs_promptly_but_cannot_starve_others():
    p = FairPolicy()
    olds = ["a", "b", "c"]
    for t in olds:
        p.add(t)
    simulate(p, 300)
    p.add("new")
    order: list = []
    simulate(p, 40, order=order)
    assert "new" in order[:len(olds) + 1]  # runs promptly: within one round
    # ...but gets no credit: every old task runs within one round after the newcomer arrives
    for t in olds:
        assert order.index(t) <= len(olds)
    # and from then on it is one task among equals: at most 2 turns in any 4 consecutive
    for i in range(len(order) - 3):
        assert order[i:i + 4].count("new") <= 2, order
    counts = {t: order.count(t) for t in olds + ["new"]}
    assert max(counts.values()) - min(counts.values()) <= 1, counts


def test_fair_newcomer_after_others_waited_long():
    """A task that ran a lot is not penalised below the minimum when it comes back."""
    p = FairPolicy()
    p.add("a")
    p.add("b")
    simulate(p, 50)
    p.remove("a")  # a leaves (finished); b keeps running alone for a long time
    for _ in range(500):
        t = p.pick()
        p.charge(t, Q)
        p.requeue(t)
    p.add("late")
    assert p.vruntime("late") == pytest.approx(p.vruntime("b"))
    order: list = []
    simulate(p, 10, order=order)
    assert order.count("late") == 5 and order.count("b") == 5


def test_fair_min_vruntime_never_decreases():
    p = FairPolicy()
    for t in "ab":
        p.add(t)
    simulate(p, 20)
    p.add("c")
    vr_c = p.vruntime("c")
    p.remove("a")
    p.remove("b")
    p.remove("c")
    p.add("d")  # everyone left: the newcomer still starts where the clock of service got to
    assert p.vruntime("d") >= vr_c > 0


def test_fair_remove_running_task_keeps_queue_consistent():
    p = FairPolicy()
    for t in "abc":
        p.add(t)
    t = p.pick()
    p.charge(t, Q)
    p.requeue(t)
    p.remove(t)  # removed while queued: its heap entry must never be picked
    seen = set()
    while (x := p.pick()) is not None:
        seen.add(x)
    assert seen == {"b", "c"}
    assert p.waiting() == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "pick", "remove", "requeue_all"]),
                          st.integers(0, 7), st.sampled_from([0.5, 1.0, 2.0, 4.0]),
                          st.integers(0, 10)), max_size=120))
def test_fair_model(ops):
    """Random adds, picks (charged and requeued), removes: the policy always picks a waiting
    task of minimum virtual runtime, and waiting() counts exactly the waiting tasks."""
    p = FairPolicy()
    waiting: set = set()
    running: set = set()
    for op, task, weight, ran in ops:
        if op == "add" and task not in waiting and task not in running:
            p.add(task, weight)
            waiting.add(task)
        elif op == "pick":
            t = p.pick()
            if not waiting:
                assert t is None
                continue
            assert t in waiting
            assert p.vruntime(t) == min(p.vruntime(x) for x in waiting)
            waiting.discard(t)
            running.add(t)
            p.charge(t, ran * Q)
        elif op == "remove":
            p.remove(task)
            waiting.discard(task)
            running.discard(task)
        elif op == "requeue_all":
            for t in sorted(running):
                p.requeue(t)
                waiting.add(t)
            running.clear()
        assert p.waiting() == len(waiting)
        nxt = p.peek()
        assert (nxt is None) == (not waiting)
        if nxt is not None:
            assert nxt in waiting
            assert p.vruntime(nxt) == min(p.vruntime(x) for x in waiting)
        assert all(math.isfinite(p.vruntime(x)) for x in waiting | running)


def test_fair_many_tasks_is_cheap():
    """O(log n) per operation: 20k tasks, 100k turns in well under a second or two."""
    p = FairPolicy()
    rng = random.Random(7)
    for i in range(20_000):
        p.add(i, rng.choice([1.0, 2.0, 3.0]))
    for _ in range(100_000):
        t = p.pick()
        p.charge(t, Q)
        p.requeue(t)
    assert p.waiting() == 20_000

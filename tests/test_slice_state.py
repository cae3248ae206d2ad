"""TimeSlicer admission (issue 14, items 5 and 7): a slice's state is checked when it enters.

A state sharing a storage with another live slice's state, or holding a tensor that cannot be
paged out in place, is refused by ``slice()`` with a typed error naming where the tensor is,
and bad arguments are refused, all before anything changes: no slice admitted, no policy
change, the running slice not charged. Threaded tests run under hard timeouts (a slice that
is wrongly admitted waits for a turn that never comes: the timeout turns that into a failure).
"""

from __future__ import annotations

import pickle
import threading
import types
import warnings

import numpy as np
import pytest
import torch

import aqua_offload as aq
from aqua_offload.policies import FairPolicy, FCFSPolicy, RoundRobinPolicy
from aqua_offload.state import collect_tensor_paths, collect_tensors, format_path, walk_tensors
from aqua_offload import SharedStateError, UnpageableStateError
from conftest import run_with_timeout, wait_until

ENTRY_TIMEOUT_S = 10.0  # a refused entry returns at once; an admitted one waits for the turn
TEST_TIMEOUT_S = 60.0
CPU = torch.device("cpu")


def enter_and_leave(ts: aq.TimeSlicer, state, name: str, **kw) -> None:
    with ts.slice(state=state, name=name, **kw):
        pass


def refused_entry(ts: aq.TimeSlicer, state, name: str, error: type, **kw) -> BaseException:
    """Enter a slice from another thread (this one may hold a turn) and expect ``error``."""
    with pytest.raises(error) as info:
        run_with_timeout(lambda: enter_and_leave(ts, state, name, **kw), ENTRY_TIMEOUT_S)
    return info.value


class Background:
    """A daemon thread whose error is re-raised by ``join`` (which fails if it hangs)."""

    def __init__(self, fn) -> None:
        self.error: BaseException | None = None

        def body():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised by join
                self.error = e

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 30.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "hung"
        if self.error is not None:
            raise self.error


def types_ns(**kw):
    return types.SimpleNamespace(**kw)


def names(ts: aq.TimeSlicer) -> list[str]:
    return [x["name"] for x in ts.stats()["slices"]]


def assert_another_slice_runs(ts: aq.TimeSlicer, state=None) -> None:
    """The slicer still works: a fresh slice enters, runs and leaves."""
    def body():
        with ts.slice(state=[torch.ones(8)] if state is None else state, name="after") as s:
            s.checkpoint()
        assert s.status == "done"
    run_with_timeout(body, ENTRY_TIMEOUT_S)


# -- shared storages ----------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["fair", "rr", "fcfs"])
def test_shared_tensor_refused_at_entry_nothing_changes(m, policy):
    now = [0.0]
    ts = aq.TimeSlicer(quantum_ms=0, manager=m, policy=policy, clock=lambda: now[0])
    kv = [torch.arange(16.0), torch.arange(32.0)]
    mine = {"kv": kv}

    def body():
        with ts.slice(state=mine, name="a") as a:
            now[0] = 5.0  # a refused entry must not charge the running slice
            theirs = types_ns(cache=[torch.zeros(4), kv[1]])
            err = refused_entry(ts, theirs, "b", SharedStateError)
            assert isinstance(err, aq.InvalidArgumentError)
            assert err.path == "state.cache[1]" and err.other_path == "state['kv'][1]"
            assert err.other_slice == "a"
            assert "state.cache[1]" in str(err) and "state['kv'][1]" in str(err)
            assert "'a'" in str(err) and "'b'" in str(err)
            # nothing changed: a still runs, alone, uncharged; nothing paged
            assert ts.running is a and a.status == "running"
            assert names(ts) == ["a"] and ts.policy.waiting() == 0
            assert a.run_s == 0.0 and ts.policy.vruntime(a) == 0.0
            assert not any(aq.is_offloaded(t) for t in kv)
            a.checkpoint()  # no one waits: keeps running
            assert a.preemptions == 0
        assert torch.equal(kv[1], torch.arange(32.0))
        # a left: its storages no longer count, the same state enters fine
        assert_another_slice_runs(ts, state=types_ns(cache=[kv[1]]))
        assert names(ts) == ["a", "after"]

    run_with_timeout(body, TEST_TIMEOUT_S)


def test_views_of_one_storage_count_as_shared(m):
    ts = aq.TimeSlicer(quantum_ms=1, manager=m)
    base = torch.arange(64.0)

    def body():
        with ts.slice(state={"kv": base.view(8, 8)}, name="a"):
            err = refused_entry(ts, [base[10:20]], "b", SharedStateError)
            assert err.path == "state[0]" and err.other_path == "state['kv']"
            assert names(ts) == ["a"]
        assert_another_slice_runs(ts)

    run_with_timeout(body, TEST_TIMEOUT_S)


def test_shared_with_a_paged_out_slice_and_with_what_it_added_since_entry(m):
    """The waiting slice is paged out (its storages hold 0 bytes): still found. A tensor it
    added after its entry is found too (its record is refreshed at each preemption)."""
    ts = aq.TimeSlicer(quantum_ms=0, manager=m, policy="rr")
    kv = torch.arange(256.0)
    late = torch.arange(128.0)
    views = [late[1:], kv.view(16, 16)]  # made now: a paged-out tensor cannot be viewed
    state_a: dict = {"kv": kv}
    seen: dict = {}

    def a():
        with ts.slice(state=state_a, name="a") as s:
            state_a["late"] = late  # grows after entry, like a KV cache
            wait_until(lambda: ts.policy.waiting() == 1)
            s.checkpoint()  # pages kv and late out, c runs
        seen["a_ok"] = torch.equal(kv, torch.arange(256.0)) \
            and torch.equal(late, torch.arange(128.0))

    def c():
        wait_until(lambda: ts.running is not None)
        with ts.slice(state=[torch.ones(4)], name="c"):
            seen["paged_out"] = aq.is_offloaded(kv) and aq.is_offloaded(late)
            e1 = refused_entry(ts, {"x": [views[0]]}, "b1", SharedStateError)
            e2 = refused_entry(ts, [views[1]], "b2", SharedStateError)
            seen["paths"] = [(e1.path, e1.other_path), (e2.path, e2.other_path)]
            seen["names"] = names(ts)
            seen["still_paged_out"] = aq.is_offloaded(kv)

    def body():
        ta, tc = Background(a), Background(c)
        ta.join()
        tc.join()

    run_with_timeout(body, TEST_TIMEOUT_S)
    assert seen["paged_out"] and seen["still_paged_out"]
    assert seen["paths"] == [("state['x'][0]", "state['late']"), ("state[0]", "state['kv']")]
    assert seen["names"] == ["a", "c"]
    assert seen["a_ok"]
    assert_another_slice_runs(ts)


def test_two_slices_entering_at_once_with_one_tensor(m):
    ts = aq.TimeSlicer(quantum_ms=1, manager=m, policy="rr")
    shared = torch.ones(100)
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []
    ran: list[str] = []

    def worker(k):
        barrier.wait(ENTRY_TIMEOUT_S)
        try:
            with ts.slice(state=[shared], name=f"w{k}"):
                ran.append(f"w{k}")
                wait_until(lambda: errors or ts.policy.waiting() == 1)  # the other one tried
        except SharedStateError as e:
            errors.append(e)

    def body():
        threads = [Background(lambda k=k: worker(k)) for k in range(2)]
        for t in threads:
            t.join()

    run_with_timeout(body, TEST_TIMEOUT_S)
    assert len(ran) == 1 and len(errors) == 1, (ran, errors)
    assert names(ts) == ran  # the refused one was never admitted


def test_shared_model_without_paged_tensors_is_fine(m):
    """parameters=False and no buffers: nothing of the model is paged, so sharing it is normal;
    both slices run, preempt each other and the model's parameters stay resident."""
    ts = aq.TimeSlicer(quantum_ms=0, manager=m, policy="rr")
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    x = torch.randn(2, 8)
    want = model(x).detach()
    outs: dict = {}

    def worker(k):
        state = {"model": model, "kv": torch.full((64,), float(k))}
        with ts.slice(state=state, name=f"w{k}", hooks=model) as s:
            if k == 0:
                wait_until(lambda: ts.policy.waiting() == 1)
            for _ in range(3):
                outs.setdefault(k, []).append(model(x).detach())  # a checkpoint per forward
                s.checkpoint()
        assert torch.equal(state["kv"], torch.full((64,), float(k)))

    def body():
        t0 = Background(lambda: worker(0))
        wait_until(lambda: ts.running is not None)
        t1 = Background(lambda: worker(1))
        t0.join()
        t1.join()

    run_with_timeout(body, TEST_TIMEOUT_S)
    assert all(torch.equal(o, want) for k in (0, 1) for o in outs[k])
    assert ts.stats()["preemptions"] > 0
    assert not aq.is_offloaded(model.weight)


@pytest.mark.parametrize("parameters", [False, True])
def test_shared_model_with_paged_tensors_refused(m, parameters):
    """What would be paged counts: a shared model's buffers always, its parameters when the
    slicer pages parameters."""
    ts = aq.TimeSlicer(quantum_ms=1, manager=m, parameters=parameters)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)) if not parameters \
        else torch.nn.Linear(4, 4)
    expected = "state['model'].1.running_mean" if not parameters else "state['model'].weight"

    def body():
        with ts.slice(state={"model": model, "kv": torch.ones(4)}, name="a"):
            err = refused_entry(ts, {"model": model, "kv": torch.ones(4)}, "b", SharedStateError)
            assert err.path == expected and err.other_path == expected
            assert names(ts) == ["a"]
        assert_another_slice_runs(ts)

    run_with_timeout(body, TEST_TIMEOUT_S)


def test_stale_record_is_not_a_match(m):
    """A slice's record names the storages its state had at its last walk; a tensor that moved
    to another storage since then no longer stands for the old one (storage addresses are
    reused, so a stale key must not be taken for sharing)."""
    ts = aq.TimeSlicer(quantum_ms=1, manager=m, policy="rr")
    t = torch.arange(32.0)
    old_view = t.view(4, 8)  # keeps the old storage alive, outside a's state
    state_a = {"kv": t}

    def body():
        with ts.slice(state=state_a, name="a"):
            t.set_(torch.zeros(32))  # a's state now holds a new storage
            b = Background(lambda: enter_and_leave(ts, [old_view], "b"))
            wait_until(lambda: ts.policy.waiting() == 1)  # admitted, waits for its turn
        b.join()

    run_with_timeout(body, TEST_TIMEOUT_S)
    assert names(ts) == ["a", "b"]


def test_shared_error_pickles():
    e = SharedStateError("msg", path="state[0]", other_slice="a", other_path="state['kv']")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is SharedStateError and str(back) == "msg"
    assert (back.path, back.other_slice, back.other_path) == ("state[0]", "a", "state['kv']")
    u = pickle.loads(pickle.dumps(UnpageableStateError("m", path="state", reason="quantized")))
    assert isinstance(u, aq.InvalidArgumentError) and (u.path, u.reason) == ("state", "quantized")


# -- tensors that cannot be paged out in place ----------------------------------------------------
def _quantized():
    with warnings.catch_warnings():  # quantized creation functions are deprecated
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.rand(4), 0.1, 0, torch.quint8)


def _table_module():
    mod = torch.nn.Module()
    mod.register_buffer("table", torch.from_numpy(np.arange(8, dtype=np.float32)))
    return mod


_aliases: list = []  # the aliases stay alive: an export is refused while its alias can write


def _exported(t):
    _aliases.append(np.from_dlpack(t))
    return t


UNPAGEABLE = {
    "numpy": (lambda: torch.from_numpy(np.ones(16, dtype=np.float32)), "from_numpy"),
    "dlpack": (lambda: torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(torch.ones(4))),
               "not owned by torch's allocator"),
    "shared": (lambda: torch.ones(16).share_memory_(), "shared with other processes"),
    "exported": (lambda: _exported(torch.ones(16)), "exported through DLPack"),
    "quantized": (_quantized, "quantized"),
    "nested": (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "nested"),
    "jagged": (lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)],
                                                  layout=torch.jagged), "nested"),
    "sparse": (lambda: torch.eye(3).to_sparse(), "sparse_coo"),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", sorted(UNPAGEABLE))
def test_unpageable_tensor_refused_at_entry(m, kind):
    make, why = UNPAGEABLE[kind]
    ts = aq.TimeSlicer(quantum_ms=0, manager=m, policy="rr")
    good = torch.ones(4)
    with pytest.raises(UnpageableStateError, match=why) as info:
        with ts.slice(state={"kv": [good, make()]}, name="bad"):
            pytest.fail("the body of a refused slice ran")
    assert isinstance(info.value, aq.InvalidArgumentError)
    assert info.value.path == "state['kv'][1]" and why in info.value.reason
    assert "state['kv'][1]" in str(info.value) and "'bad'" in str(info.value)
    assert names(ts) == [] and ts.running is None and ts.policy.waiting() == 0
    assert not aq.is_offloaded(good)
    assert_another_slice_runs(ts)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unpageable_refused_while_another_runs_nothing_changes(m):
    now = [0.0]
    ts = aq.TimeSlicer(quantum_ms=0, manager=m, policy="fair", clock=lambda: now[0])
    kv = torch.arange(8.0)

    def body():
        with ts.slice(state=[kv], name="a") as a:
            now[0] = 3.0
            err = refused_entry(ts, {"model": _table_module()}, "b", UnpageableStateError)
            assert err.path == "state['model'].table" and "from_numpy" in err.reason
            err = refused_entry(ts, [_quantized()], "q", UnpageableStateError)
            assert "quantized" in str(err)
            assert names(ts) == ["a"] and ts.running is a and ts.policy.waiting() == 0
            assert a.run_s == 0.0 and ts.policy.vruntime(a) == 0.0
        assert_another_slice_runs(ts)

    run_with_timeout(body, TEST_TIMEOUT_S)


def test_unpageable_refused_without_a_manager():
    """No manager: the state's device decides (as at preemption), checked before any manager
    is made."""
    ts = aq.TimeSlicer(quantum_ms=1)
    with pytest.raises(UnpageableStateError, match="from_numpy"):
        with ts.slice(state=[torch.from_numpy(np.zeros(4))], name="np"):
            pass
    assert names(ts) == []


def test_what_is_never_paged_is_not_checked(m):
    """Tensors on another device stay where they are, and an empty storage is never paged out:
    neither is refused (a zero-byte numpy array, a meta placeholder)."""
    ts = aq.TimeSlicer(quantum_ms=1, manager=m)
    state = {"kv": torch.ones(4), "meta": torch.empty(4, device="meta"),
             "empty": torch.from_numpy(np.zeros(0, dtype=np.float32))}
    with ts.slice(state=state, name="ok") as s:
        s.checkpoint()
    assert s.status == "done"


# -- arguments ----------------------------------------------------------------------------------
HUGE = [pytest.param(2 ** 1024, id="2**1024"), pytest.param(-2 ** 1024, id="-2**1024"),
        pytest.param(10 ** 400, id="10**400")]


@pytest.mark.parametrize("quantum_ms", [float("inf"), float("-inf"), *HUGE])
def test_bad_quantum_typed(m, quantum_ms):
    with pytest.raises(aq.InvalidArgumentError, match="quantum_ms"):
        aq.TimeSlicer(quantum_ms=quantum_ms, manager=m)


@pytest.mark.parametrize("kw", [{"parameters": "yes"}, {"parameters": 1}, {"parameters": None},
                                {"clock": 5.0}])
def test_bad_parameters_and_clock(m, kw):
    name = next(iter(kw))
    with pytest.raises(aq.InvalidArgumentError, match=name):
        aq.TimeSlicer(quantum_ms=1, manager=m, **kw)


BAD_WEIGHTS = [*HUGE, 0, -1, float("nan"), float("inf"), True, "2"]


@pytest.mark.parametrize("weight", BAD_WEIGHTS)
def test_bad_weight_while_another_runs_nothing_changes(m, weight):
    now = [0.0]
    ts = aq.TimeSlicer(quantum_ms=0, manager=m, policy="fair", clock=lambda: now[0])

    def body():
        with ts.slice(state=[torch.ones(4)], name="a") as a:
            now[0] = 2.0
            err = refused_entry(ts, [torch.ones(4)], "w", aq.InvalidArgumentError, weight=weight)
            assert "weight" in str(err)
            assert names(ts) == ["a"] and ts.policy.waiting() == 0
            assert a.run_s == 0.0 and ts.policy.vruntime(a) == 0.0  # not charged
        assert_another_slice_runs(ts)

    run_with_timeout(body, TEST_TIMEOUT_S)


@pytest.mark.parametrize("name", [123, 1.5, b"req", ["req"], ("r",)])
def test_bad_name(m, name):
    ts = aq.TimeSlicer(quantum_ms=1, manager=m)
    with pytest.raises(aq.InvalidArgumentError, match="name"):
        with ts.slice(state=[torch.ones(2)], name=name):
            pytest.fail("the body of a refused slice ran")
    assert names(ts) == []
    assert_another_slice_runs(ts)


@pytest.mark.parametrize("hooks", ["model", 5, [torch.nn.Linear(2, 2)]])
def test_bad_hooks(m, hooks):
    ts = aq.TimeSlicer(quantum_ms=1, manager=m)
    with pytest.raises(aq.InvalidArgumentError, match="hooks"):
        with ts.slice(state=[torch.ones(2)], name="h", hooks=hooks):
            pytest.fail("the body of a refused slice ran")
    assert names(ts) == []
    assert_another_slice_runs(ts)


@pytest.mark.parametrize("cls", [FairPolicy, RoundRobinPolicy, FCFSPolicy])
@pytest.mark.parametrize("bad", HUGE)
def test_policy_huge_ints_typed(cls, bad):
    p = cls()
    with pytest.raises(aq.InvalidArgumentError, match="weight"):
        p.add("a", bad)
    assert p.waiting() == 0 and p.pick() is None
    p.add("a", 10 ** 300)  # big but finite: fine
    assert p.pick() == "a"
    with pytest.raises(aq.InvalidArgumentError, match="run time"):
        p.charge("a", bad)
    assert p.vruntime("a") == 0.0


# -- the walk's paths ---------------------------------------------------------------------------
def test_paths_of_the_walk():
    class Slotted:
        __slots__ = ("k",)

    o = Slotted()
    o.k = torch.ones(1)
    mod = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    t = torch.ones(3)
    state = {"kv": [t, (torch.ones(2),)], 7: o, "ns": types_ns(v=t[1:]), "mod": mod,
             "set": frozenset({"x"})}
    got = [(format_path(p), x) for p, x in walk_tensors(state)]
    assert [p for p, _ in got] == [
        "state['kv'][0]", "state['kv'][1][0]", "state[7].k", "state['ns'].v",
        "state['mod'].0.running_mean", "state['mod'].0.running_var",
        "state['mod'].0.num_batches_tracked"]
    assert got[3][1] is state["ns"].v  # views are not merged by walk_tensors
    # collect_tensor_paths merges them (the first met stands for the storage) and keys them
    triples = collect_tensor_paths(state, CPU)
    assert [format_path(p) for _, p, _ in triples] == [
        "state['kv'][0]", "state['kv'][1][0]", "state[7].k", "state['mod'].0.running_mean",
        "state['mod'].0.running_var", "state['mod'].0.num_batches_tracked"]
    assert [id(x) for _, _, x in triples] == [id(x) for x in collect_tensors(state, CPU)]
    assert all(k == x.untyped_storage()._cdata for k, _, x in triples)
    assert format_path(None) == "state" and format_path(None, root="cache") == "cache"
    a = torch.ones(1)
    got = [format_path(p) for p, _ in walk_tensors(types_ns(s={a}))]
    assert got == ["state.s<item 0 of a set>"]

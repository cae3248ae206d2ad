"""The state walker (aqua_offload.state.collect_tensors): which tensors of a slice's state are
paged out: containers in order, dict values, sets, module buffers (parameters on request),
object attributes and slots, cycles, one tensor per storage, other devices and layouts skipped,
a depth limit, never into Python modules."""

from __future__ import annotations

import types

import torch

from aqua_offload.state import collect_tensors
from slicing_helpers import CPU, KVCache, Slotted



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

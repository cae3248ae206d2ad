"""Helpers of the TimeSlicer suites (test_timeslice*.py, test_state_walk.py): busy work that
holds the GIL, waiting until every slice queued, drained-manager checks, and states of every
kind a slice can carry (tensors, containers, modules, objects with attributes or slots). Threads
under hard timeouts: helpers.run_threads."""

from __future__ import annotations

import time

import torch

import aqua_offload as aq
from conftest import random_tensor, wait_until

CPU = torch.device("cpu")


# -- helpers ------------------------------------------------------------------------------------
def spin(seconds: float) -> None:
    """Busy CPU work that holds the GIL (no sleep: a running slice computes)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


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

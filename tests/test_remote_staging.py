"""The remote tier's transfers (Note [Staging] in remote/staging.py): host pieces of at least
``DIRECT_BYTES`` move in place (their memory registered for the call), smaller ones through the
staging buffer, both in one call; a registration NIXL refuses falls back to the buffer. Every
round trip is bitwise; nothing stays registered after a call."""

from __future__ import annotations

import pytest
import torch
from remote_helpers import TOKEN, needs_nixl

import aqua_offload as aq
from aqua_offload.errors import BackendError
from aqua_offload.remote import Lender, staging, transport
from conftest import random_tensor

pytestmark = needs_nixl
KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def lender():
    with Lender(TOKEN, host_bytes="32MiB", segment_bytes="16MiB") as lender:
        yield lender


def _rand(n: int, seed: int) -> torch.Tensor:
    return random_tensor((n,), torch.uint8, generator=torch.Generator().manual_seed(seed))


def _regions(m: aq.OffloadManager) -> list[int]:
    """How many regions each lender's client has registered (the staging buffer: one)."""
    return [len(c._regions) for c in m._remote.clients]


def test_a_large_host_tensor_moves_in_place(lender, lender_managers) -> None:
    m = lender_managers(lender)
    t = _rand(5 * MiB + 3, 1)
    ref = t.clone()
    h = m.offload(t)
    assert h.tier == "remote" and aq.is_offloaded(t)
    s = m.stats()["remote"]
    assert s["direct_bytes"] == 5 * MiB + 3 and s["bytes_written"] == 5 * MiB + 3
    assert _regions(m) == [1], "the tensor's registration ended with the call"
    assert m.fetch(h) is t and torch.equal(t, ref)
    assert m.stats()["remote"]["direct_bytes"] == 2 * (5 * MiB + 3)
    assert _regions(m) == [1]


def test_large_and_small_pieces_of_one_batch(lender, lender_managers) -> None:
    m = lender_managers(lender)
    ts = [_rand(n, 10 + i) for i, n in enumerate((4 * MiB, 8 * KiB, 333, 6 * MiB - 1, 64 * KiB))]
    refs = [t.clone() for t in ts]
    hs = m.offload_many(ts)
    assert all(h.tier == "remote" for h in hs)
    assert m.stats()["remote"]["direct_bytes"] == 10 * MiB - 1
    for h, t, r in zip(reversed(hs), reversed(ts), reversed(refs)):
        assert m.fetch(h) is t and torch.equal(t, r)
    s = m.stats()["remote"]
    assert s["direct_bytes"] == 2 * (10 * MiB - 1)
    assert s["bytes_read"] == sum(r.numel() for r in refs)


def test_a_refused_registration_goes_through_the_buffer(lender, lender_managers,
                                                        monkeypatch) -> None:
    m = lender_managers(lender)

    def refuse(self, *args, **kw):
        raise BackendError("injected: this memory cannot be registered", error_name="injected")

    monkeypatch.setattr(transport.Agent, "register_many", refuse)
    t = _rand(9 * MiB, 2)
    ref = t.clone()
    h = m.offload(t)
    assert m.fetch(h) is t and torch.equal(t, ref)
    s = m.stats()["remote"]
    assert s["direct_bytes"] == 0 and s["bytes_written"] == s["bytes_read"] == 9 * MiB


def test_below_the_threshold_everything_is_staged(lender, lender_managers, monkeypatch) -> None:
    monkeypatch.setattr(staging, "DIRECT_BYTES", 64 * MiB)
    m = lender_managers(lender)
    t = _rand(5 * MiB, 3)
    ref = t.clone()
    assert torch.equal(m.fetch(m.offload(t)), ref)
    assert m.stats()["remote"]["direct_bytes"] == 0


def test_the_large_pieces_of_a_call_are_registered_at_once(lender, lender_managers,
                                                           monkeypatch) -> None:
    m = lender_managers(lender)
    calls = []
    real = transport.Agent.register_many

    def counting(self, ranges, *args, **kw):
        calls.append(len(ranges))
        return real(self, ranges, *args, **kw)

    monkeypatch.setattr(transport.Agent, "register_many", counting)
    ts = [_rand(n, 30 + i) for i, n in enumerate((4 * MiB, 8 * KiB, 5 * MiB + 1))]
    refs = [t.clone() for t in ts]
    hs = m.offload_many(ts)
    assert calls == [2], "one NIXL registration for both large pieces"
    for h, t, r in zip(hs, ts, refs):
        assert m.fetch(h) is t and torch.equal(t, r)
    assert calls == [2, 1, 1] and _regions(m) == [1]

"""Where the remote tier sits (Note [Tier order] in remote/tier.py): ``remote_order=
"below_host"`` (default) fills host memory first and spills to the lenders; ``"above_host"``
sends what the peers cannot take to a lender before host memory, and to host memory only when
no lender can hold it. Bad orders are typed errors that build nothing. Round trips bitwise."""

from __future__ import annotations

import functools

import pytest
import torch
from remote_helpers import TOKEN, needs_nixl

import aqua_offload as aq
from aqua_offload.errors import InvalidArgumentError
from aqua_offload.remote import Lender
from conftest import random_tensor
from helpers import emulation_only, run_emulated

pytestmark = needs_nixl
KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def managers(remote_managers):
    return functools.partial(remote_managers, host="1MiB")


def _tensors(n: int, seed: int, size: int = 256 * KiB) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [random_tensor((size,), torch.uint8, generator=g) for _ in range(n)]


def test_below_host_is_the_default_and_fills_host_first(remote_lender, managers) -> None:
    m = managers(remote_lender)
    ts = _tensors(6, 1)
    refs = [t.clone() for t in ts]
    hs = [m.offload(t) for t in ts]
    assert m.stats()["remote"]["order"] == "below_host"
    # four fill the 1 MiB host tier; then each new one makes the oldest spill to the lender
    assert [h.tier for h in hs] == ["remote"] * 2 + ["host"] * 4
    assert m.stats()["remote"]["spills"] == 2
    for h, t, r in zip(hs, ts, refs):
        assert m.fetch(h) is t and torch.equal(t, r)


def test_above_host_sends_to_a_lender_before_host_memory(managers) -> None:
    with Lender(TOKEN, host_bytes="1MiB", segment_bytes="1MiB") as lender:
        m = managers(lender, remote_order="above_host")
        ts = _tensors(6, 2)
        refs = [t.clone() for t in ts]
        hs = [m.offload(t) for t in ts]
        # the lender's 1 MiB takes four; host memory only the two it could not hold
        assert [h.tier for h in hs] == ["remote"] * 4 + ["host"] * 2
        s = m.stats()
        assert s["remote"]["order"] == "above_host"
        assert s["tiers"][0]["used"] == 2 * 256 * KiB and s["remote"]["spills"] == 0
        assert torch.equal(m.fetch(hs[1]), refs[1])
        h6 = m.offload(ts[1])  # room on the lender again: it goes there
        assert h6.tier == "remote"
        for h, t, r in zip(hs[:1] + hs[2:] + [h6], ts[:1] + ts[2:] + [ts[1]],
                           refs[:1] + refs[2:] + [refs[1]]):
            assert m.fetch(h) is t and torch.equal(t, r)


def test_above_host_batches_and_snapshots(remote_lender, managers) -> None:
    m = managers(remote_lender, remote_order="above_host")
    ts = _tensors(5, 3, size=100 * KiB)
    refs = [t.clone() for t in ts]
    hs = m.offload_many(ts, release=False)
    assert all(h.tier == "remote" for h in hs)
    ts[0].add_(1)  # a snapshot: the source is the caller's
    assert all(torch.equal(x, r) for x, r in zip(m.fetch_many(hs), refs))


def test_above_host_with_a_lost_lender_uses_host_memory(managers) -> None:
    lender = Lender(TOKEN, host_bytes="4MiB", segment_bytes="1MiB").start()
    m = managers(lender, remote_order="above_host", remote_deadline_s=2.0)
    lender.close()
    t = _tensors(1, 4)[0]
    ref = t.clone()
    for _ in range(2):  # the first call may be the one that finds the lender gone
        try:
            h = m.offload(t)
            break
        except aq.errors.RemoteLostError:
            assert not aq.is_offloaded(t) and torch.equal(t, ref)
    assert h.tier == "host"
    assert m.fetch(h) is t and torch.equal(t, ref)


@pytest.mark.parametrize("order", ["above", "first", "", None, 3])
def test_a_bad_order_is_refused_and_builds_nothing(remote_lender, order) -> None:
    before = remote_lender.stats()["connections"]
    with pytest.raises(InvalidArgumentError, match="remote_order"):
        aq.OffloadManager("cpu", peers=None, host_bytes="1MiB", remote=[remote_lender.address],
                          remote_token=TOKEN, remote_order=order)
    assert remote_lender.stats()["connections"] == before


def test_remote_order_without_remote_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="remote_order"):
        aq.OffloadManager("cpu", peers=None, host_bytes="1MiB", remote_order="above_host")


@emulation_only("needs a peer tier: AQUA_EMULATED_DEVICES=2 in a child process")
def test_above_host_keeps_the_peers_first() -> None:
    out = run_emulated(2, f"""
        import os
        os.environ.setdefault("UCX_NET_DEVICES", "lo")
        from aqua_offload.remote import Lender
        with Lender({TOKEN!r}, host_bytes="1MiB", segment_bytes="1MiB") as lender:
            m = aq.OffloadManager("cpu", peers="auto", peer_bytes={{"emu:1": 65536}},
                                  host_bytes=1 << 20, remote=[lender.address],
                                  remote_token={TOKEN!r}, remote_order="above_host")
            ts = [rand(32768) for _ in range(5)]
            refs = [t.clone() for t in ts]
            hs = [m.offload(t) for t in ts]
            result["where"] = [h.tier for h in hs]
            result["same"] = [bool(torch.equal(m.fetch(h), r)) for h, r in zip(hs, refs)]
            m.close()
    """)
    assert out["where"] == ["peer", "peer", "remote", "remote", "remote"]
    assert all(out["same"])

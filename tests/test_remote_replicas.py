"""``remote_copies=2`` (Note [Replicas] in remote/replicas.py): every handle on the lenders has
a copy on two of them. A lender killed with SIGKILL loses nothing (reads go to the other copy);
both killed lose the handle with a typed error; a reclaim of one copy drops it and writes a
new one on a third lender (or leaves the handle on one copy, counted); a batch with no second
lender that has room is refused with nothing changed; bad settings are typed errors. Every
round trip is bitwise."""

from __future__ import annotations

import functools

import pytest
import torch
from remote_helpers import TOKEN, LenderProcess, child_env, needs_nixl

import aqua_offload as aq
from aqua_offload.errors import InvalidArgumentError, OutOfMemoryError, RemoteLostError
from aqua_offload.remote import Lender
from conftest import random_tensor, run_with_timeout, wait_until

pytestmark = needs_nixl
KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def managers(lender_managers):
    """Every tensor goes to the lenders, two copies."""
    return functools.partial(lender_managers, remote_copies=2)


def _tensors(n: int, seed: int, size: int = 96 * KiB) -> tuple[list[torch.Tensor],
                                                               list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ts = [random_tensor((size + 13 * i,), torch.uint8, generator=g) for i in range(n)]
    return ts, [t.clone() for t in ts]


def _lenders(k: int, size: str = "8MiB"):
    return [Lender(TOKEN, host_bytes=size, segment_bytes="4MiB").start() for _ in range(k)]


def _handles(m: aq.OffloadManager) -> list[int]:
    return [t["handles"] for t in m.stats()["tiers"] if t["tier"] == "remote"]


def test_every_handle_has_a_copy_on_two_lenders() -> None:
    a, b = _lenders(2)
    try:
        m = aq.OffloadManager("cpu", peers=None, host_bytes="4KiB", remote=[a.address, b.address],
                              remote_token=TOKEN, remote_copies=2)
        ts, refs = _tensors(6, 1)
        hs = [m.offload(t) for t in ts[:3]] + m.offload_many(ts[3:])
        assert all(h.tier == "remote" and h.location == a.address for h in hs)
        s = m.stats()
        assert _handles(m) == [6, 6] and s["remote"]["copies"] == 2
        assert s["remote"]["bytes_written"] == 2 * sum(t.numel() for t in refs)
        assert s["remote"]["degraded_handles"] == 0 and s["remote"]["lost_handles"] == 0
        for h, t, r in zip(hs, ts, refs):
            assert m.fetch(h) is t and torch.equal(t, r)
        assert _handles(m) == [0, 0]
        m.close()
    finally:
        a.close()
        b.close()


def test_a_killed_lender_loses_nothing(tmp_path, remote_managers) -> None:
    procs = [LenderProcess(tmp_path, "--host-bytes", "16MiB", "--segment", "4MiB",
                           env=child_env()) for _ in range(2)]
    try:
        m = remote_managers(*procs, host="1MiB", remote_copies=2, remote_deadline_s=2.0)
        ts, refs = _tensors(20, 2)  # ~2 MiB: the 1 MiB host tier spills the oldest
        hs = [m.offload(t) for t in ts[:10]] + m.offload_many(ts[10:])
        remote = [k for k, h in enumerate(hs) if h.tier == "remote"]
        assert remote and m.stats()["remote"]["spills"] >= 1
        procs[0].kill()  # SIGKILL the primary lender: no goodbye
        for k in range(20):
            assert run_with_timeout(lambda k=k: m.fetch(hs[k]), 60) is ts[k]
            assert torch.equal(ts[k], refs[k])
        s = m.stats()["remote"]
        assert s["lost_handles"] == 0 and s["lost_bytes"] == 0
        t = random_tensor((2 * MiB,), torch.uint8, generator=torch.Generator().manual_seed(3))
        ref = t.clone()  # more than the host tier: only the lenders could take it
        with pytest.raises(OutOfMemoryError, match="second lender"):  # one lender left
            m.offload(t)
        assert not aq.is_offloaded(t) and torch.equal(t, ref)
    finally:
        for p in procs:
            p.kill()


def test_both_lenders_killed_lose_the_handle(tmp_path, remote_managers) -> None:
    procs = [LenderProcess(tmp_path, "--host-bytes", "16MiB", "--segment", "4MiB",
                           env=child_env()) for _ in range(2)]
    try:
        m = remote_managers(*procs, remote_copies=2, remote_deadline_s=2.0, host="4KiB")
        ts, refs = _tensors(3, 4)
        hs = m.offload_many(ts)
        procs[1].kill()
        run_with_timeout(lambda: m.stats(), 30)
        assert torch.equal(run_with_timeout(lambda: m.fetch(hs[0]), 60), refs[0])
        assert m.stats()["remote"]["degraded_handles"] == 2
        procs[0].kill()
        for h in hs[1:]:
            with pytest.raises(RemoteLostError):
                run_with_timeout(lambda h=h: m.fetch(h), 60)
        assert m.stats()["remote"]["lost_handles"] == 2
    finally:
        for p in procs:
            p.kill()


def test_a_reclaimed_copy_is_written_again_on_a_third_lender(managers) -> None:
    a, b, c = _lenders(3)
    try:
        m = managers(a, b, c)
        ts, refs = _tensors(8, 5)
        hs = m.offload_many(ts)
        assert _handles(m) == [8, 8, 0]
        assert b.reclaim(8 * MiB).wait(30)  # at once: the copies on b are dropped
        assert b.stats()["blocks"] == 0
        wait_until(lambda: _handles(m) == [8, 0, 8])  # then written again, on c
        s = m.stats()["remote"]
        assert s["degraded_handles"] == 0
        assert s["reclaimed_handles"] == 8
        assert a.reclaim(8 * MiB).wait(30)  # now the primary: c's copy takes over
        assert _handles(m) == [0, 0, 8] and m.stats()["remote"]["degraded_handles"] == 8
        assert all(h.location == c.address for h in hs)
        for h, t, r in zip(hs, ts, refs):
            assert m.fetch(h) is t and torch.equal(t, r)
    finally:
        for x in (a, b, c):
            x.close()


def test_a_batch_without_room_for_its_second_copy_changes_nothing(managers) -> None:
    big, small = Lender(TOKEN, host_bytes="8MiB", segment_bytes="4MiB").start(), \
        Lender(TOKEN, host_bytes="1MiB", segment_bytes="1MiB").start()
    try:
        m = managers(big, small)
        t = random_tensor((2 * MiB,), torch.uint8, generator=torch.Generator().manual_seed(6))
        ref = t.clone()
        with pytest.raises(OutOfMemoryError, match="second lender"):
            m.offload(t)
        assert not aq.is_offloaded(t) and torch.equal(t, ref)
        m.synchronize()
        assert big.stats()["blocks"] == 0 and small.stats()["blocks"] == 0
        ts, refs = _tensors(2, 7)  # small ones fit both
        hs = m.offload_many(ts)
        assert all(torch.equal(m.fetch(h), r) for h, r in zip(hs, refs))
    finally:
        big.close()
        small.close()


@pytest.mark.parametrize("copies", [0, 3, True, 2.0, "2"])
def test_a_bad_number_of_copies_is_refused(remote_lender, copies) -> None:
    with pytest.raises(InvalidArgumentError, match="remote_copies"):
        aq.OffloadManager("cpu", peers=None, remote=[remote_lender.address],
                          remote_token=TOKEN, remote_copies=copies)


def test_two_copies_need_two_lenders(remote_lender) -> None:
    before = remote_lender.stats()["connections"]
    with pytest.raises(InvalidArgumentError, match="as many lenders"):
        aq.OffloadManager("cpu", peers=None, remote=[remote_lender.address],
                          remote_token=TOKEN, remote_copies=2)
    assert remote_lender.stats()["connections"] == before

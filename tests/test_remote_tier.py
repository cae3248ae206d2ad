"""The manager's remote tier (OffloadManager(remote=[...])) against in-process lenders: bitwise
round trips of releases, snapshots, arrays and batches that spill from the core's tiers or go
to a lender directly, mixed batches, the cascade peer -> host -> remote, prefetch, incremental
offload on a remote base, reclaim (into the core, to another lender, refused), close, and
typed errors at construction. A lender killed with SIGKILL (a child process) loses only its
handles: RemoteLostError at once, everything else keeps working."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from remote_helpers import TOKEN, LenderProcess, blocks_left, child_env, needs_nixl

import aqua_offload as aq
from aqua_offload.errors import (InvalidArgumentError, OutOfMemoryError, RemoteAuthError,
                                 RemoteConnectError, RemoteLostError)
from aqua_offload.manager import live_managers
from aqua_offload.remote import Lender, tier
from conftest import random_tensor, run_with_timeout, workers_while

pytestmark = needs_nixl
KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(autouse=True)
def small_staging(monkeypatch):
    """1 MiB of staging: batches and tensors larger than it take several rounds."""
    monkeypatch.setattr(tier, "STAGING_BYTES", MiB)


@pytest.fixture
def managers(remote_managers):
    return remote_managers


def _rand(n: int, seed: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return random_tensor((n // torch.empty((), dtype=dtype).element_size(),), dtype,
                         generator=g)


def _eventually(pred, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.01)
    return pred()


def _fill(m: aq.OffloadManager, count: int, nbytes: int = 512 * KiB, seed: int = 0):
    """Release ``count`` random tensors one by one; returns (tensors, copies, handles)."""
    ts = [_rand(nbytes, seed + i) for i in range(count)]
    refs = [t.clone() for t in ts]
    return ts, refs, [m.offload(t) for t in ts]


def test_a_batch_goes_where_the_core_capacity_is_now(remote_lender, managers) -> None:
    """A batch larger than the core's tiers goes straight to a lender; lending the manager
    more peer memory makes room in the core for the next one, and reclaiming it takes that
    room away again (the tier reads the capacities anew after each)."""
    m = managers(remote_lender, host="1MiB", peers=[1], peer_bytes="1MiB")
    ts = [_rand(768 * KiB, 90 + i) for i in range(4)]  # 3 MiB: more than 2 MiB of core
    refs = [t.clone() for t in ts]
    assert {h.tier for h in m.offload_many(ts[:2] + ts[2:])} == {"remote"}
    m.fetch_many(ts)
    m.lend(1, "4MiB")
    assert {h.tier for h in m.offload_many(ts)} <= {"peer", "host"}
    m.fetch_many(ts)
    m.reclaim(1, "4MiB")
    assert {h.tier for h in m.offload_many(ts)} == {"remote"}
    back = m.fetch_many(ts)
    assert all(x is t and torch.equal(t, r) for x, t, r in zip(back, ts, refs))


def test_spill_order_is_by_priority_then_age() -> None:
    from aqua_offload.remote.spilling import SpillOrder

    o = SpillOrder()
    for hid, prio in ((1, 2.0), (2, 0.0), (3, 2.0), (4, -1.0), (5, 0.0)):
        o[hid] = prio
    o[2] = 3.0  # offloaded again: the newest of its new priority
    assert o.pop(9) is None and o.pop(5) == 0.0
    assert list(o.in_order()) == [(4, -1.0), (1, 2.0), (3, 2.0), (2, 3.0)]
    for hid, _ in list(o.in_order()):
        o.pop(hid)
    assert list(o.in_order()) == []


def test_the_lowest_priority_spills_first(remote_lender, managers) -> None:
    m = managers(remote_lender)  # a 2 MiB host tier: four 512 KiB tensors
    ts = [_rand(512 * KiB, 30 + i) for i in range(6)]
    refs = [t.clone() for t in ts]
    hs = [m.offload(t, priority=p) for t, p in zip(ts, (5.0, 1.0, 0.0, 3.0, 2.0, 2.0))]
    # two spills: the 0.0 first, then the 1.0, though older ones have higher priorities
    assert [h.tier for h in hs] == ["host", "remote", "remote", "host", "host", "host"]
    for h, t, r in zip(hs, ts, refs):
        assert m.fetch(h) is t and torch.equal(t, r)


def test_releases_spill_to_the_lender_and_come_back_bitwise(remote_lender, managers) -> None:
    m = managers(remote_lender)
    ts, refs, hs = _fill(m, 8)  # 4 MiB into a 2 MiB host tier
    tiers = [h.tier for h in hs]
    assert "remote" in tiers and "host" in tiers
    assert tiers.index("remote") < tiers.index("host"), "the oldest spilled first"
    remote = [h for h in hs if h.tier == "remote"]
    assert all(h.location == remote_lender.address and h.state == "offloaded" for h in remote)
    assert all(aq.is_offloaded(t) for t in ts)
    s = m.stats()
    assert s["tiers"][-1]["tier"] == "remote" and s["tiers"][-1]["handles"] == len(remote)
    assert s["remote"]["spills"] >= 1 and s["remote"]["spilled_handles"] == len(remote)
    assert s["remote"]["bytes_written"] == len(remote) * 512 * KiB
    assert 1 <= remote_lender.stats()["blocks"] <= len(remote)
    for t, ref, h in zip(ts, refs, hs):
        assert m.fetch(h) is t and torch.equal(t, ref)
    assert blocks_left(m, remote_lender) == 0, "blocks given back after the fetch"
    assert m.stats()["remote"]["bytes_read"] == len(remote) * 512 * KiB


def test_snapshots_arrays_and_out_round_trip_through_the_lender(remote_lender,
                                                                 managers) -> None:
    m = managers(remote_lender, host="1MiB")
    a = _rand(384 * KiB, 1, torch.float32).reshape(96, -1)
    b = _rand(256 * KiB, 2, torch.int64)
    arr = np.random.default_rng(3).integers(1, 1 << 30, size=(64, 512), dtype=np.int64)
    ha, hb = m.offload(a, release=False), m.offload(b, release=False)
    harr = m.offload(arr, release=False)
    hc = m.offload(_rand(768 * KiB, 4), release=False)  # the host tier is full: spills
    assert ha.tier == "remote" and hc.tier == "host"  # the oldest spilled
    out = torch.empty_like(a)
    assert m.fetch(ha, out=out) is out and torch.equal(out, a)
    assert torch.equal(m.fetch(hb), b)
    back = m.fetch(harr)
    assert isinstance(back, np.ndarray) and np.array_equal(back, arr)
    assert torch.equal(m.fetch(hc), _rand(768 * KiB, 4))


def test_a_batch_that_does_not_fit_goes_to_the_lender_in_one_call(remote_lender,
                                                                   managers) -> None:
    m = managers(remote_lender, host="1MiB")
    ts = [_rand(n, 10 + i) for i, n in enumerate([512 * KiB, 700 * KiB, 3 * MiB])]
    refs = [t.clone() for t in ts]
    hs = m.offload_many(ts)  # 4.2 MiB: more than the host tier, one tensor > staging
    assert [h.tier for h in hs] == ["remote"] * 3
    assert m.stats()["remote"]["direct_offloads"] == 3
    back = m.fetch_many(hs)
    assert all(x is t and torch.equal(t, r) for x, t, r in zip(back, ts, refs))
    with pytest.raises(OutOfMemoryError):  # 5 MiB: no tier, no 4 MiB segment holds it
        m.offload(_rand(5 * MiB, 13))


def test_mixed_batches_and_the_cascade_peer_host_remote(remote_lender, managers) -> None:
    m = managers(remote_lender, host="1MiB", peers=[1], peer_bytes="1MiB")
    ts, refs, hs = _fill(m, 7, seed=20)
    assert {h.tier for h in hs} == {"peer", "host", "remote"}
    snaps = [_rand(128 * KiB, 30 + i) for i in range(3)]
    hsn = m.offload_many(snaps, release=False)
    order = [4, 0, 6, 2, 5, 1, 3]  # mixed tiers in one batch
    back = m.fetch_many([hs[i] for i in order] + hsn)
    for j, i in enumerate(order):
        assert back[j] is ts[i] and torch.equal(ts[i], refs[i])
    assert all(torch.equal(x, s) for x, s in zip(back[len(order):], snaps))
    assert m.stats()["tiers"][-1]["handles"] == 0


def test_a_batch_spills_in_one_round_and_a_peer_reclaim_spills_first(remote_lender,
                                                                      managers) -> None:
    m = managers(remote_lender, host="2MiB", peers=[1], peer_bytes="1MiB")
    ts, refs, hs = _fill(m, 6, seed=35)  # peer and host full
    assert "remote" not in {h.tier for h in hs}
    more = [_rand(512 * KiB, 36 + i) for i in range(3)]
    refs_more = [t.clone() for t in more]
    hm = m.offload_many(more)  # 1.5 MiB spilled (more than the 1 MiB staging buffer)
    assert m.stats()["remote"]["spills"] == 1
    assert m.reclaim(1) == MiB  # the peer's handles need room below: the host spills again
    assert m.stats()["remote"]["spills"] == 2
    assert all(h.tier != "peer" for h in hs + hm)
    back = m.fetch_many(hs + hm)
    assert all(torch.equal(x, r) for x, r in zip(back, refs + refs_more))


def test_prefetch_of_remote_handles(remote_lender, managers) -> None:
    m = managers(remote_lender)
    ts, refs, hs = _fill(m, 8, seed=40)
    remote = [i for i, h in enumerate(hs) if h.tier == "remote"]
    assert len(remote) >= 2
    i, j = remote[:2]
    m.prefetch_many([hs[i], hs[j], hs[-1]])
    assert m.stats()["prefetched_bytes"] == 3 * 512 * KiB
    assert hs[i].state == "offloaded" and hs[i].tier == "remote"
    assert m.fetch(hs[i]) is ts[i] and torch.equal(ts[i], refs[i])
    m.free(hs[j])  # a prefetched remote handle freed: buffer and block given back
    assert aq.is_discarded(ts[j])
    assert torch.equal(m.fetch(hs[-1]), refs[-1])
    assert m.stats()["prefetched_bytes"] == 0
    for k, h in enumerate(hs):
        if k not in (i, j, len(hs) - 1):
            assert torch.equal(m.fetch(h), refs[k])
    assert blocks_left(m, remote_lender) == 0


def test_a_reclaimed_prefetched_handle_keeps_its_bytes_in_the_prefetch(managers) -> None:
    with Lender(TOKEN, host_bytes="8MiB", segment_bytes="4MiB") as lender:
        m = managers(lender)
        snaps = [_rand(512 * KiB, 45 + i) for i in range(8)]
        hs = [m.offload(t, release=False) for t in snaps]
        remote = [k for k, h in enumerate(hs) if h.tier == "remote"]
        assert len(remote) == 4
        m.prefetch_many([hs[k] for k in remote])
        # the core is full and no other lender exists, yet the prefetched give their blocks up
        assert lender.reclaim(8 * MiB).wait(30)
        assert m.stats()["remote"]["reclaimed_handles"] == 4 and lender.stats()["blocks"] == 0
        assert all(hs[k].tier == "remote" for k in remote)
        with pytest.raises(InvalidArgumentError):  # the prefetch holds the only copy
            m.fetch(hs[remote[0]], keep=True)
        for k, h in enumerate(hs):
            assert torch.equal(m.fetch(h), snaps[k])


def test_incremental_offload_on_a_remote_base_copies_in_full(remote_lender, managers) -> None:
    m = managers(remote_lender, host="1MiB")
    full = _rand(768 * KiB, 50)
    base = m.offload(full[: 512 * KiB].clone(), release=False)
    _fill(m, 2, seed=51)  # pushes the base out to the lender
    assert base.tier == "remote"
    h = m.offload(full, release=False, base=base)
    assert base.state == "freed"
    assert torch.equal(m.fetch(h), full)


def test_reclaim_moves_handles_into_the_core_when_it_has_room(managers) -> None:
    with Lender(TOKEN, host_bytes="8MiB", segment_bytes="4MiB") as lender:
        m = managers(lender)
        ts, refs, hs = _fill(m, 8, seed=60)
        remote = [k for k, h in enumerate(hs) if h.tier == "remote"]
        local = [k for k, h in enumerate(hs) if h.tier == "host"]
        m.fetch_many([hs[k] for k in local])  # room in the host tier again
        ticket = lender.reclaim(8 * MiB)
        assert ticket.wait(30), "the borrower moved the data and answered"
        assert all(hs[k].tier == "host" for k in remote)
        assert lender.stats()["arena_bytes"] == 0
        s = m.stats()["remote"]
        assert s["reclaims"] >= 1 and s["reclaimed_handles"] == len(remote)
        for k in remote:
            assert m.fetch(hs[k]) is ts[k] and torch.equal(ts[k], refs[k])


def test_a_reclaim_moves_what_fits_and_refuses_the_rest(managers) -> None:
    with Lender(TOKEN, host_bytes="8MiB", segment_bytes="4MiB") as lender:
        m = managers(lender)
        ts, refs, hs = _fill(m, 8, seed=65)
        remote = [k for k, h in enumerate(hs) if h.tier == "remote"]
        host = [k for k, h in enumerate(hs) if h.tier == "host"]
        assert len(remote) == 4
        for k in host[:2]:  # room for two of the four
            assert torch.equal(m.fetch(hs[k]), refs[k])
        ticket = lender.reclaim(8 * MiB)
        assert not ticket.wait(1.0), "two have no room anywhere: refused, the lender waits"
        moved = [k for k in remote if hs[k].tier == "host"]
        stuck = [k for k in remote if hs[k].tier == "remote"]
        assert len(moved) == 2 and len(stuck) == 2
        m.synchronize()  # the blocks given back have reached the lender
        assert lender.stats()["blocks"] == 2, "the moved ones' blocks were given back"
        for k in stuck:  # fetching them frees their blocks: the reclaim completes
            assert m.fetch(hs[k]) is ts[k] and torch.equal(ts[k], refs[k])
        assert ticket.wait(30)
        for k in moved + host[2:]:
            assert m.fetch(hs[k]) is ts[k] and torch.equal(ts[k], refs[k])


def test_reclaim_moves_to_another_lender_or_waits(managers) -> None:
    with Lender(TOKEN, host_bytes="8MiB", segment_bytes="4MiB") as a, \
            Lender(TOKEN, host_bytes="8MiB", segment_bytes="4MiB") as b:
        m = managers(a, b)
        ts, refs, hs = _fill(m, 8, seed=70)
        on_a = [k for k, h in enumerate(hs) if h.location == a.address]
        assert on_a
        assert a.reclaim(8 * MiB).wait(30)
        assert all(hs[k].tier == "remote" and hs[k].location == b.address for k in on_a)
        # b reclaims too: the core is full and no other lender is left: refused, nothing lost
        ticket = b.reclaim(8 * MiB)
        assert not ticket.wait(1.0)
        assert m.stats()["remote"]["reclaim_refusals"] >= 1
        for k in on_a:  # fetching them frees the blocks: the reclaim completes
            assert torch.equal(m.fetch(hs[k]), refs[k])
        assert ticket.wait(30)
        for k, h in enumerate(hs):
            if k not in on_a:
                assert torch.equal(m.fetch(h), refs[k])


def test_close_restores_remote_releases(remote_lender, managers) -> None:
    m = managers(remote_lender)
    ts, refs, hs = _fill(m, 8, seed=80)
    assert any(h.tier == "remote" for h in hs)
    m.close()
    assert all(torch.equal(t, r) and not aq.is_offloaded(t) for t, r in zip(ts, refs))
    assert all(h.state == "fetched" for h in hs)
    assert _eventually(lambda: remote_lender.stats()["sessions"] == 0), "the session closed"


def test_threads_offload_and_fetch_while_spilling(remote_lender, managers) -> None:
    m = managers(remote_lender)
    kept = [_rand(512 * KiB, 900 + i) for i in range(4)]
    held = m.offload_many(kept, release=False)  # the host tier is full: every offload spills
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for r in range(4):
                ts, refs, hs = _fill(m, 3, 256 * KiB, seed=1000 * seed + 10 * r)
                for t, ref, h in zip(reversed(ts), reversed(refs), reversed(hs)):
                    assert m.fetch(h) is t and torch.equal(t, ref)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "hung"
    assert not errors, errors
    assert m.stats()["remote"]["spills"] >= 1
    assert all(torch.equal(x, t) for x, t in zip(m.fetch_many(held), kept))


def test_construction_errors_leave_nothing_behind(remote_lender, monkeypatch) -> None:
    before = len(live_managers())
    with pytest.raises(RemoteAuthError):
        aq.OffloadManager("cpu", peers=None, remote=[remote_lender.address],
                          remote_token="another-token-" + "0" * 20)
    with pytest.raises(RemoteConnectError):
        aq.OffloadManager("cpu", peers=None, remote=["127.0.0.1:1"], remote_token=TOKEN)
    with pytest.raises(InvalidArgumentError):
        aq.OffloadManager("cpu", peers=None, remote=["no-port"], remote_token=TOKEN)
    with pytest.raises(InvalidArgumentError):
        aq.OffloadManager("cpu", peers=None, remote=[remote_lender.address] * 2,
                          remote_token=TOKEN)
    monkeypatch.delenv("AQUA_OFFLOAD_REMOTE_TOKEN", raising=False)
    with pytest.raises(InvalidArgumentError):
        aq.OffloadManager("cpu", peers=None, remote=[remote_lender.address])
    assert len(live_managers()) == before
    assert remote_lender.stats()["sessions"] == 0
    monkeypatch.setenv("AQUA_OFFLOAD_REMOTE_TOKEN", TOKEN)  # the token from the environment
    with aq.OffloadManager("cpu", peers=None, remote=remote_lender.address) as m:
        assert [t["tier"] for t in m.stats()["tiers"]] == ["host", "remote"]


def test_a_lender_of_another_version_closes_the_clients_made_before(remote_lender) -> None:
    from aqua_offload.errors import RemoteVersionError
    from aqua_offload.remote import protocol as P

    server = socket.create_server(("127.0.0.1", 0))
    reply = P.encode(P.Kind.CHALLENGE, 1, {"nonce": "00" * 32, "proof": "00" * 32}, version=2)

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(reply)
                conn.recv(4096)

    threading.Thread(target=serve, daemon=True).start()
    before = len(live_managers())
    try:
        with pytest.raises(RemoteVersionError):
            run_with_timeout(lambda: aq.OffloadManager(
                "cpu", peers=None, remote=[remote_lender.address,
                                           "127.0.0.1:%d" % server.getsockname()[1]],
                remote_token=TOKEN, remote_deadline_s=2.0), 60)
    finally:
        server.close()
    assert len(live_managers()) == before
    assert _eventually(lambda: remote_lender.stats()["sessions"] == 0), "first client closed"


def test_a_killed_lender_loses_only_its_handles(tmp_path, managers) -> None:
    lender = LenderProcess(tmp_path, "--host-bytes", "16MiB", "--segment", "4MiB",
                           env=child_env())
    try:
        m = managers(lender, remote_deadline_s=2.0)
        ts, refs, hs = _fill(m, 8, seed=90)
        snap = _rand(64 * KiB, 99)
        hsnap = m.offload(snap, release=False)
        remote = [k for k, h in enumerate(hs) if h.tier == "remote"]
        local = [k for k, h in enumerate(hs) if h.tier == "host"]
        assert remote and local
        lender.kill()  # SIGKILL: no goodbye
        with pytest.raises(RemoteLostError):  # within the deadline, then at once
            run_with_timeout(lambda: m.fetch(hs[remote[0]]), 60)
        with pytest.raises(RemoteLostError):
            run_with_timeout(lambda: m.fetch_many([hs[local[0]], hs[remote[1]]]), 10)
        assert hs[local[0]].state == "offloaded", "a failed mixed batch changes nothing"
        s = m.stats()["remote"]
        assert s["lost_handles"] == len(remote) and s["lost_bytes"] == len(remote) * 512 * KiB
        assert m.stats()["tiers"][-1]["lost"]
        for k in local:
            assert torch.equal(m.fetch(hs[k]), refs[k])
        assert torch.equal(m.fetch(hsnap), snap)
        m.free(hs[remote[0]])  # free works; the data is gone
        assert aq.is_discarded(ts[remote[0]])
        t = _rand(512 * KiB, 98)  # the core's tiers keep working
        assert torch.equal(m.fetch(m.offload(t.clone())), t)
        full = [m.offload(_rand(512 * KiB, 120 + i), release=False) for i in range(4)]
        with pytest.raises(OutOfMemoryError):  # no lender left to spill to: a typed error
            run_with_timeout(lambda: m.offload(_rand(512 * KiB, 125), release=False), 30)
        assert all(torch.equal(m.fetch(h), _rand(512 * KiB, 120 + i))
                   for i, h in enumerate(full))
        run_with_timeout(m.close, 30)  # lost releases are left discarded, not restored
        assert all(aq.is_discarded(ts[k]) for k in remote[1:])
    finally:
        lender.kill()


def test_the_example_runs(tmp_path) -> None:
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "examples" / "remote_tier.py")],
                         env=child_env(PYTHONPATH=os.pathsep.join(sys.path)),
                         capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "on remote 127.0.0.1:" in out.stdout and "fetched back bitwise" in out.stdout
    assert "tensors moved (4 on host cpu)" in out.stdout
    assert "fetch: RemoteLostError" in out.stdout and "handles (16 MiB) lost" in out.stdout
    assert "killed with SIGKILL: fetched back bitwise, 0 handles lost" in out.stdout


def test_close_with_a_silent_lender_over_tcp(tmp_path, monkeypatch, managers) -> None:
    # Over TCP a stopped (SIGSTOP) lender leaves a read in progress: close() gives up on it
    # at the deadline, restores everything else, and never hangs.
    lender = LenderProcess(tmp_path, "--host-bytes", "16MiB", "--segment", "4MiB",
                           env=child_env(UCX_TLS="tcp"))
    try:
        monkeypatch.setenv("UCX_TLS", "tcp")
        m = managers(lender, remote_deadline_s=1.0)
        monkeypatch.delenv("UCX_TLS")
        ts, refs, hs = _fill(m, 8, seed=110)
        remote = [k for k, h in enumerate(hs) if h.tier == "remote"]
        assert remote
        os.kill(lender.proc.pid, signal.SIGSTOP)
        run_with_timeout(m.close, 60)
        for k, (t, ref) in enumerate(zip(ts, refs)):
            if k in remote:
                assert aq.is_discarded(t), (k, remote, hs[k].state, m.stats()["remote"])
            else:
                assert torch.equal(t, ref)
        assert m.stats()["closed"]
    finally:
        os.kill(lender.proc.pid, signal.SIGCONT)
        lender.kill()


def test_reclaims_while_threads_offload_and_fetch(remote_lender, managers) -> None:
    with Lender(TOKEN, host_bytes="16MiB", segment_bytes="4MiB") as spare:
        m = managers(remote_lender, spare, host="1MiB")

        def work(seed: int, stop: threading.Event) -> None:
            r = 0
            while not stop.is_set() or r < 3:
                ts, refs, hs = _fill(m, 4, 256 * KiB, seed=1000 * seed + 10 * r)
                back = m.fetch_many(hs[::-1])
                assert all(x is t and torch.equal(t, ref)
                           for x, t, ref in zip(back, ts[::-1], refs[::-1]))
                r += 1

        def reclaims() -> None:  # the first lender takes everything back, then offers it again
            for _ in range(5):
                time.sleep(0.05)
                assert remote_lender.reclaim(16 * MiB).wait(30), "reclaim completed"
                remote_lender.grow(16 * MiB)

        workers_while(work, 3, reclaims)
        assert m.stats()["remote"]["spills"] >= 1


def test_random_operations_across_every_tier(managers) -> None:
    """A seeded random mix of releases, snapshots, batches, kept fetches, incremental offloads,
    prefetches, frees and lender reclaims over peer, host and two lenders: every fetch is
    bitwise what was offloaded."""
    rng = np.random.default_rng(7)
    with Lender(TOKEN, host_bytes="8MiB", segment_bytes="4MiB") as a, \
            Lender(TOKEN, host_bytes="8MiB", segment_bytes="4MiB") as b:
        m = managers(a, b, host="1MiB", peers=[1], peer_bytes="1MiB")
        live: dict[int, tuple] = {}  # id(handle) -> (handle, tensor or None, expected bytes)
        seed = iter(range(10_000))

        def new(n: int) -> torch.Tensor:
            return _rand(int(n), next(seed) + 200)

        def check(h, got, ref) -> None:
            assert torch.equal(got, ref), (h, h.tier)

        for step in range(160):
            op = rng.choice(["release", "snap", "many", "fetch", "keep", "prefetch", "free",
                             "incr", "reclaim"], p=[.2, .15, .1, .2, .08, .08, .07, .07, .05])
            total = sum(ref.numel() for _, _, ref in live.values())
            if op in ("release", "snap", "many", "incr") and total > 10 * MiB:
                op = "fetch"
            handles = list(live.values())
            if op == "release":
                t = new(rng.integers(16, 768) * KiB)
                ref = t.clone()  # before: a paged-out tensor must not be touched
                h = m.offload(t)
                live[id(h)] = (h, t, ref)
            elif op == "snap":
                t = new(rng.integers(16, 768) * KiB)
                h = m.offload(t, release=False)
                live[id(h)] = (h, None, t.clone())
            elif op == "many":
                ts = [new(rng.integers(16, 512) * KiB) for _ in range(rng.integers(2, 5))]
                refs = [t.clone() for t in ts]
                for h, t, ref in zip(m.offload_many(ts), ts, refs):
                    live[id(h)] = (h, t, ref)
            elif op in ("fetch", "keep", "prefetch", "free", "incr") and handles:
                h, t, ref = handles[rng.integers(len(handles))]
                if op == "prefetch":
                    m.prefetch(h)
                elif op == "free":
                    m.free(h)
                    del live[id(h)]
                elif op == "keep" and t is None:  # a kept snapshot stays fetchable
                    check(h, m.fetch(h, keep=True), ref)
                elif op == "incr" and t is None and h._prefetch is None:
                    full = torch.cat([ref, new(rng.integers(1, 256) * KiB)])
                    del live[id(h)]
                    h2 = m.offload(full, release=False, base=h)
                    live[id(h2)] = (h2, None, full.clone())
                    assert h.state == "freed"
                else:
                    check(h, m.fetch(h), ref)
                    del live[id(h)]
            elif op == "reclaim":
                lender = a if rng.random() < .5 else b
                ticket = lender.reclaim(4 * MiB)
                if not ticket.wait(2):  # refused: no room anywhere (fragmentation); fetching
                    for h, t, ref in list(live.values()):  # its handles frees the blocks
                        if h.location == lender.address:
                            check(h, m.fetch(h), ref)
                            del live[id(h)]
                assert ticket.wait(30), f"step {step}: reclaim completed"
                lender.grow(4 * MiB)
        tiers = {h.tier for h, _, _ in live.values()}
        for h, t, ref in list(live.values()):
            check(h, m.fetch(h), ref)
        s = m.stats()["remote"]
        assert s["spills"] >= 1 and s["remote_fetches"] >= 1, (s, tiers)
        assert blocks_left(m, a) == 0 and blocks_left(m, b) == 0

"""Lending under fork, failures and shutdown: a forked child that exits normally, a fork while a
transaction is open, a consumer constructor that fails half-way, a manager close that raises,
stop() racing a round, transient and fatal ledger errors, and an exit while a daemon thread
waits in a reclaim. Each case has a deadline (a bug fails, never hangs); consumer data is random
bytes compared bitwise."""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import aqua_offload as aq
from aqua_offload import lending
from aqua_offload.errors import LedgerError, OffloadError, ReclaimTimeoutError
from aqua_offload.lending import consumer as consumer_mod
from aqua_offload.lending import ledger as ledger_mod
from aqua_offload.lending import notify
from aqua_offload.lending import state as state_mod
from aqua_offload.manager import live_managers
from conftest import fetch_and_check, offload_mixed, wait_until

MiB = 1 << 20


@pytest.fixture
def no_polling(monkeypatch):
    monkeypatch.setattr(consumer_mod, "SLICE_S", 3600.0)


def _lent(m):
    return m.stats()["lending"]["leased_bytes"]


def _run_script(code, ledger_path, timeout=60):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path),
               AQUA_OFFLOAD_LEDGER=str(ledger_path), AQUA_OFFLOAD_LEASE_CHUNK="1MiB")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


# -- fork ---------------------------------------------------------------------------------------
FORK_CHILD_EXITS = """
    import json, os, sys, time
    import torch
    import aqua_offload as aq
    from aqua_offload import lending
    from aqua_offload.errors import InvalidArgumentError
    MiB = 1 << 20
    o = lending.offer("emu:1", "4MiB")
    m = aq.OffloadManager("cpu", peers="lent", host_bytes="16MiB")
    gen = torch.Generator().manual_seed(5)
    ts = [torch.randint(0, 256, (MiB // 2,), dtype=torch.uint8, generator=gen) for _ in range(6)]
    refs = [t.clone() for t in ts]
    hs = [m.offload(t) for t in ts]
    m.synchronize()
    before = lending.view()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child sees detached copies, then exits normally: atexit handlers run
        seen = {"closed": o.closed, "state": m.stats()["lending"]["state"]}
        try:
            o.reclaim("1MiB")
            seen["reclaim"] = "ran"
        except InvalidArgumentError as e:
            seen["reclaim"] = str(e)
        os.write(w, json.dumps(seen).encode())
        sys.exit(0)
    os.close(w)
    deadline = time.monotonic() + 30
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        assert time.monotonic() < deadline, "child hung"
        time.sleep(0.01)
    child = json.loads(os.read(r, 4096))
    after = lending.view()
    state = m.stats()["lending"]["state"]
    got = o.reclaim("2MiB", timeout=30)  # the parent's consumer still serves it
    tiers = sorted(h.tier for h in hs)
    same = all(torch.equal(m.fetch(h), ref) for h, ref in zip(hs, refs))
    m.close()
    withdrawn = o.withdraw(timeout=30)
    print(json.dumps({"child": child, "before": before, "after": after, "state": state,
                      "got": got, "tiers": tiers, "same": same, "withdrawn": withdrawn}))
"""


def test_forked_child_exit_leaves_the_parents_offer_and_leases(ledger_path):
    res = json.loads(_run_script(FORK_CHILD_EXITS, ledger_path).stdout.splitlines()[-1])
    child = res["child"]
    assert child["closed"] is True and child["state"] == "detached"
    assert "forked child cannot use it" in child["reclaim"]
    strip = lambda v: (v["devices"], v["consumers"])  # noqa: E731
    assert strip(res["after"]) == strip(res["before"])  # nothing orphaned, nothing dropped
    assert res["after"]["recovered"] == []
    assert res["before"]["devices"][0]["leased"] == 4 * MiB
    assert res["state"] == "active" and res["got"] == 2 * MiB
    assert "host" in res["tiers"] and res["same"] is True  # migrated, bit-identical
    assert res["withdrawn"] == 2 * MiB


def test_fork_waits_for_an_open_transaction(ledger_path, monkeypatch):
    monkeypatch.setattr(ledger_mod, "LOCK_TIMEOUT_S", 1.0)
    led = lending.Ledger()
    inside, leave = threading.Event(), threading.Event()

    def hold():
        with led.transaction():
            inside.set()
            leave.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(10)
    timer = threading.Timer(0.3, leave.set)  # the transaction ends while the fork waits
    timer.start()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # hold whatever was inherited until the parent has tried the lock
        try:
            select.select([r], [], [], 10)
        finally:
            os._exit(0)
    try:
        forked_after = leave.is_set()
        holder.join(10)
        # Another open file description, as another process: free although the child lives.
        with lending.Ledger().transaction():
            pass
    finally:
        os.write(w, b"x")
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
        timer.cancel()
    assert forked_after


# -- the consumer constructor -----------------------------------------------------------------
def test_failing_consumer_constructor_leaves_no_lease(ledger_path, monkeypatch):
    o = lending.offer("emu:1", "4MiB")
    real, calls = consumer_mod.Consumer._grow, [0]

    def grow(self):
        calls[0] += 1
        if calls[0] == 3:  # two chunks leased and allocated, then e.g. Ctrl-C
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(consumer_mod.Consumer, "_grow", grow)
    before = len(live_managers())
    with pytest.raises(KeyboardInterrupt):
        aq.OffloadManager("cpu", peers="lent", host_bytes="8MiB")
    assert calls[0] == 3 and len(live_managers()) == before
    view = lending.view()
    assert view["consumers"] == [] and view["devices"][0]["leases"] == []
    assert o.status() == {"offered": 4 * MiB, "leased": 0, "available": 4 * MiB, "pending": 0}
    assert o.reclaim(timeout=5) == 4 * MiB and o.stats()["reclaim_last_asked"] == 0
    o.withdraw()


# -- stop and close -----------------------------------------------------------------------------
def test_close_that_raises_keeps_serving_reclaims(ledger_path, no_polling):
    o = lending.offer("emu:1", "2MiB")
    m = aq.OffloadManager("cpu", peers="lent", host_bytes="8MiB")
    try:
        hs, ts, refs = offload_mixed(m, 4, seed=1)
        assert {h.tier for h in hs} == {"peer"}

        def broken_fetch(*args, **kwargs):
            raise OffloadError("restore failed")

        m._fetch = broken_fetch  # close() restores through the one fetch path
        with pytest.raises(OffloadError, match="restore failed"):
            m.close()
        assert not m.closed and m.stats()["lending"]["state"] == "active"
        assert o.reclaim(timeout=10) == 2 * MiB  # the consumer still serves: data moves down
        assert _lent(m) == 0 and all(h.tier == "host" for h in hs)
        del m._fetch
        fetch_and_check(m, hs, ts, refs)
    finally:
        m.close()
    assert lending.view()["consumers"] == []
    o.withdraw()


def test_stop_waits_for_the_round_in_progress_and_no_round_follows(ledger_path, no_polling):
    o = lending.offer("emu:1", "4MiB")
    m = aq.OffloadManager("cpu", peers="lent", host_bytes="16MiB")
    c = m._lending
    try:
        hs, ts, refs = offload_mixed(m, 8, seed=2)
        real, calls = m._reclaim, []  # what the consumer calls
        entered, release = threading.Event(), threading.Event()

        def slow_reclaim(device, nbytes=None):
            calls.append(nbytes)
            entered.set()
            assert release.wait(10)
            return real(device, nbytes)

        m._reclaim = slow_reclaim
        first = threading.Thread(target=o.reclaim, args=("1MiB",), kwargs={"timeout": 20})
        first.start()
        assert entered.wait(10)  # the consumer thread is mid-migration
        stopper = threading.Thread(target=c.stop)
        stopper.start()
        stopper.join(0.3)
        assert stopper.is_alive()  # stop() waits for the round, never cuts it short
        release.set()
        stopper.join(10)
        first.join(10)
        assert not stopper.is_alive() and not first.is_alive()
        assert not c._thread.is_alive() and calls == [MiB]
        # Stopped: a new request is not served, whoever calls sync().
        with pytest.raises(ReclaimTimeoutError):
            o.reclaim("1MiB", timeout=0.2)
        c.sync()
        assert calls == [MiB] and _lent(m) == 3 * MiB
        del m._reclaim
        fetch_and_check(m, hs, ts, refs)
    finally:
        release.set()
        m.close()
    o.wait(timeout=10)  # close() dropped the leases
    assert o.withdraw() == 2 * MiB


# -- ledger errors under a running consumer -----------------------------------------------------
def test_consumer_retries_after_a_lock_timeout(ledger_path, no_polling):
    o = lending.offer("emu:1", "2MiB")
    with aq.OffloadManager("cpu", peers="lent", host_bytes="8MiB") as m:
        hs, ts, refs = offload_mixed(m, 4, seed=3)
        fd = os.open(str(ledger_path) + ".lock", os.O_RDWR)
        try:
            with pytest.MonkeyPatch.context() as mp:  # short timeouts only while it is held
                mp.setattr(ledger_mod, "LOCK_TIMEOUT_S", 0.2)
                fcntl.flock(fd, fcntl.LOCK_EX)  # held by someone else (a stopped process)
                notify.send(m._lending._endpoint.address, notify.WAKE_RECLAIM)
                wait_until(lambda: "held for over" in (m.stats()["lending"]["error"] or ""),
                       what="the lock timeout")
                assert m.stats()["lending"]["state"] == "active" and _lent(m) == 2 * MiB
        finally:
            os.close(fd)
        assert o.reclaim(timeout=10) == 2 * MiB  # served once the lock is free
        assert m.stats()["lending"]["state"] == "active"
        fetch_and_check(m, hs, ts, refs)
    o.withdraw()


def test_return_that_cannot_be_recorded_is_charged_on_the_next_round(ledger_path, monkeypatch,
                                                                     no_polling):
    o = lending.offer("emu:1", "2MiB")
    with aq.OffloadManager("cpu", peers="lent", host_bytes="8MiB") as m:
        hs, ts, refs = offload_mixed(m, 4, seed=4)
        real, calls = state_mod.State.charge, [0]

        def charge(st, consumer, key, freed):
            calls[0] += 1
            if calls[0] == 1:  # the return was freed, then the ledger write failed
                raise LedgerError("disk full", path=str(ledger_path), reason="io")
            return real(st, consumer, key, freed)

        monkeypatch.setattr(state_mod.State, "charge", charge)
        assert o.reclaim("1MiB", timeout=10) == MiB  # retried after RETRY_S, no wake-up
        assert calls[0] >= 2 and m.stats()["lending"]["state"] == "active"
        # Exactly one segment migrated, and the ledger agrees with the peer tier.
        assert _lent(m) == MiB == o.status()["leased"] == m.stats()["tiers"][0]["capacity"]
        assert m.stats()["bytes_migrated"] <= MiB  # not freed a second time on the retry
        fetch_and_check(m, hs, ts, refs)
    o.withdraw()


def test_failed_consumer_drops_its_leases_once_the_ledger_reads_again(ledger_path):
    o = lending.offer("emu:1", "2MiB")
    m = aq.OffloadManager("cpu", peers="lent", host_bytes="8MiB")
    try:
        hs, ts, refs = offload_mixed(m, 4, seed=6)
        raw = ledger_path.read_bytes()
        ledger_path.write_bytes(b"garbage" * 10)
        notify.send(m._lending._endpoint.address, notify.WAKE_RECLAIM)
        wait_until(lambda: m.stats()["lending"]["state"] == "failed", what="the failure")
        assert _lent(m) == 0 and all(h.tier == "host" for h in hs)
        ledger_path.write_bytes(raw)  # readable again: the listed leases go (within SLICE_S)
        wait_until(lambda: o.status()["leased"] == 0, what="the leases' drop")
        assert o.status()["available"] == 2 * MiB and m.stats()["lending"]["state"] == "failed"
        fetch_and_check(m, hs, ts, refs)
    finally:
        m.close()
    assert lending.view()["consumers"] == []
    assert o.withdraw() == 2 * MiB


# -- exit ---------------------------------------------------------------------------------------
EXIT_WHILE_RECLAIMING = """
    import sys, threading, time
    from aqua_offload import lending
    from aqua_offload.lending import offer as offer_mod
    from aqua_offload.lending.liveness import identity
    offer_mod.ABANDON_LOCK_S = 0.3
    o = lending.offer("emu:1", "2MiB")
    me = identity()
    with lending.Ledger().transaction() as st:  # a consumer of this process that never returns
        cid = st.new_id()
        st.consumers.append({"id": cid, **me._asdict(), "sock": "@nobody-listens",
                             "backend": "emulation", "device": "cpu", "keys": ["emu:1"],
                             "since": 0.0})
        st.leases.append({"id": st.new_id(), "consumer": cid, "offer": o.id, "key": "emu:1",
                          "bytes": 2 << 20, "return": 0, "asked": None, "error": None,
                          "error_t": None, "since": 0.0})
    threading.Thread(target=o.reclaim, daemon=True).start()  # holds the offer's lock, forever
    deadline = time.monotonic() + 20
    while lending.view()["devices"][0]["pending"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    print("exiting", flush=True)
    sys.exit(0)
"""


def test_exit_while_a_daemon_thread_waits_in_reclaim(ledger_path):
    t0 = time.monotonic()
    out = _run_script(EXIT_WHILE_RECLAIMING, ledger_path, timeout=30)
    assert "exiting" in out.stdout and time.monotonic() - t0 < 30
    view = lending.view()  # the fake consumer died with the process: the orphan goes too
    assert view["devices"] == [] and view["consumers"] == []
    assert any("exited: offer #" in r["what"] for r in view["recovered"])

"""Lending between a producer and a consumer in one process (each has its own ledger entry,
socket and thread, exactly as across processes): offers, leases, growth on notification,
reclaims with data on the lent tier, bad input. Every tensor is random bytes, compared bitwise
after the reclaims. The multi-process and kill -9 cases are in test_lending_multiprocess.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import aqua_offload as aq
from aqua_offload import lending
from aqua_offload.errors import InvalidArgumentError, ReclaimError, ReclaimTimeoutError
from aqua_offload.lending import consumer as consumer_mod
from aqua_offload.lending import notify
from conftest import random_tensor, same_bytes, wait_until

MiB = 1 << 20


@pytest.fixture
def no_polling(monkeypatch):
    """The consumer thread wakes only on datagrams: whatever it does was notified."""
    monkeypatch.setattr(consumer_mod, "SLICE_S", 3600.0)


def _fill(m, n, size=MiB // 2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ts = [random_tensor((size,), torch.uint8, generator=gen) for _ in range(n)]
    refs = [t.clone() for t in ts]
    hs = [m.offload(t, release=i % 2 == 0) for i, t in enumerate(ts)]
    return hs, ts, refs


def _check(m, hs, ts, refs):
    for h, t, ref in zip(hs, ts, refs):
        out = m.fetch(h)
        assert same_bytes(out, ref)
        if h.release:
            assert out is t


def _lent(m):
    return m.stats()["lending"]["leased_bytes"]


# -- bad input ------------------------------------------------------------------------------
@pytest.mark.parametrize("device, nbytes", [("cpu", MiB), ("emu:9", MiB), ("gpu", MiB),
                                            ("emu:1", 0), ("emu:1", -1), ("emu:1", "lots"),
                                            ("emu:1", 1.5), (True, MiB)])
def test_bad_offers_change_nothing(ledger_path, device, nbytes):
    with pytest.raises(InvalidArgumentError):
        lending.offer(device, nbytes)
    assert not ledger_path.exists() or lending.view()["devices"] == []


def test_bad_reclaims_and_withdraw_twice_change_nothing(ledger_path):
    o = lending.offer(1, "2MiB")
    assert o.device == "emu:1"
    before = ledger_path.read_bytes()
    for bad in (0, -5, "3MiB", 2 * MiB + 1, "x"):
        with pytest.raises(InvalidArgumentError):
            o.reclaim(bad)
    assert ledger_path.read_bytes() == before
    assert o.withdraw() == 2 * MiB
    for call in (o.withdraw, o.reclaim, lambda: o.reclaim(MiB)):
        with pytest.raises(InvalidArgumentError, match="already withdrawn"):
            call()
    assert lending.view()["devices"] == []


# -- leasing --------------------------------------------------------------------------------
def test_lent_manager_without_offers_uses_the_host(ledger_path):
    with aq.OffloadManager("cpu", peers="lent", host_bytes="4MiB") as m:
        tiers = m.stats()["tiers"]
        assert [(t["tier"], t["location"], t["capacity"]) for t in tiers] == \
            [("peer", "emu:1", 0), ("peer", "emu:0", 0), ("host", "cpu", 4 * MiB)]
        hs, ts, refs = _fill(m, 2)
        assert {h.tier for h in hs} == {"host"}
        assert lending.view()["consumers"][0]["leased"] == 0
        _check(m, hs, ts, refs)
    assert lending.view()["consumers"] == []  # close() unregistered the consumer


def test_consumer_leases_at_start_and_grows_when_notified(ledger_path, no_polling):
    a = lending.offer("emu:1", "2MiB")
    with aq.OffloadManager("cpu", peers="lent", host_bytes="8MiB") as m:
        assert m.stats()["lending"]["leased"] == {"emu:1": 2 * MiB}  # leased in the constructor
        assert m.stats()["tiers"][0]["segments"] == 2  # 1 MiB lease chunks
        hs, ts, refs = _fill(m, 4)
        assert {h.tier for h in hs} == {"peer"}
        b = lending.offer("emu:1", "3MiB")  # no polling: only b's datagram can wake the thread
        wait_until(lambda: _lent(m) == 5 * MiB)
        c = lending.offer("emu:0", "1MiB")  # own device: leased too, ranked last
        wait_until(lambda: _lent(m) == 6 * MiB)
        s = m.stats()
        assert s["lending"]["leased"] == {"emu:1": 5 * MiB, "emu:0": MiB}
        assert s["tiers"][0]["capacity"] == 5 * MiB and s["tiers"][1]["capacity"] == MiB
        assert {d["label"]: d["available"] for d in lending.view()["devices"]} == \
            {"emu:1": 0, "emu:0": 0}
        _check(m, hs, ts, refs)
    # Closing the manager returned every lease: the offers are whole again.
    for o, n in ((a, 2), (b, 3), (c, 1)):
        assert o.status() == {"offered": n * MiB, "leased": 0, "available": n * MiB,
                              "pending": 0}
        o.withdraw()


def test_peer_bytes_caps_the_lease(ledger_path):
    o = lending.offer("emu:1", "8MiB")
    with aq.OffloadManager("cpu", peers="lent", peer_bytes={"emu:1": "3MiB"},
                           host_bytes="4MiB") as m:
        assert m.stats()["lending"]["leased"] == {"emu:1": 3 * MiB}
        t0 = time.monotonic()
        assert o.reclaim("5MiB") == 5 * MiB  # the unleased part covers it: nobody asked
        assert time.monotonic() - t0 < 1.0
        st = o.stats()
        assert st["reclaim_last_asked"] == 0 and st["reclaim_last_consumers"] == 0
        assert _lent(m) == 3 * MiB and m.stats()["lending"]["reclaims"] == 0
    o.withdraw()


# -- reclaims -------------------------------------------------------------------------------
def test_reclaim_migrates_live_data_promptly_and_reports_latency(ledger_path, no_polling):
    o = lending.offer("emu:1", "4MiB")
    with aq.OffloadManager("cpu", peers="lent", host_bytes="16MiB") as m:
        hs, ts, refs = _fill(m, 8)  # 4 MiB: the lent tier is full
        assert {h.tier for h in hs} == {"peer"}
        t0 = time.monotonic()
        assert o.reclaim("1536KiB", timeout=30) == 1536 * 1024
        took = time.monotonic() - t0
        assert took < 5.0  # notification-driven: no polling interval to wait out
        # Whole 1 MiB segments: 2 MiB freed for 1.5 MiB asked; the surplus stays offered and
        # the consumer leases it again.
        wait_until(lambda: _lent(m) == 2.5 * MiB)
        s = m.stats()
        lend = s["lending"]
        assert lend["reclaims"] == 1 and lend["reclaim_last_asked"] == 1536 * 1024
        assert lend["reclaim_last_freed"] == 2 * MiB
        assert 0 < lend["reclaim_last_serve_s"] <= lend["reclaim_last_s"] <= took
        assert s["migrations"] == 4 and s["bytes_migrated"] == 2 * MiB
        assert sorted(h.tier for h in hs).count("host") == 4
        st = o.stats()
        assert st["reclaims"] == 1 and 0 < st["reclaim_last_s"] == st["reclaim_max_s"]
        assert st["reclaim_last_consumers"] == 1 and st["offered"] == 2.5 * MiB
        assert lending.stats()["reclaims"] >= 1
        _check(m, hs, ts, refs)
        assert o.withdraw() == 2.5 * MiB
        assert _lent(m) == 0 and m.stats()["tiers"][0]["capacity"] == 0


def test_reclaim_while_the_consumer_is_mid_offload(ledger_path):
    o = lending.offer("emu:1", "6MiB")
    stop = threading.Event()
    errors: list[str] = []
    count = [0]

    with aq.OffloadManager("cpu", peers="lent", host_bytes="32MiB") as m:
        def churn(seed):
            gen = torch.Generator().manual_seed(seed)
            live = []
            while not stop.is_set():
                t = random_tensor((96 * 1024,), torch.uint8, generator=gen)
                ref = t.clone()
                live.append((m.offload(t, release=bool(len(live) % 2)), t, ref))
                if len(live) > 20:
                    h, t, ref = live.pop(0)
                    if not same_bytes(m.fetch(h), ref):
                        errors.append("corrupt")
                count[0] += 1
            for h, t, ref in live:
                if not same_bytes(m.fetch(h), ref):
                    errors.append("corrupt at the end")

        workers = [threading.Thread(target=churn, args=(i,)) for i in range(2)]
        for w in workers:
            w.start()
        wait_until(lambda: count[0] > 50)
        assert o.reclaim("2MiB", timeout=30) == 2 * MiB
        wait_until(lambda: count[0] > 100)
        assert o.reclaim("3MiB", timeout=30) == 3 * MiB
        wait_until(lambda: count[0] > 150)
        stop.set()
        for w in workers:
            w.join(30)
            assert not w.is_alive()
        assert errors == []
        assert m.stats()["lending"]["reclaims"] >= 2 and o.stats()["reclaims"] == 2
        assert _lent(m) <= MiB
    o.withdraw()


def test_two_producers_on_one_device(ledger_path):
    a = lending.offer("emu:1", "2MiB")
    b = lending.offer("emu:1", "2MiB")
    with aq.OffloadManager("cpu", peers="lent", host_bytes="16MiB") as m:
        assert m.stats()["lending"]["leased"] == {"emu:1": 4 * MiB}
        hs, ts, refs = _fill(m, 8, seed=3)
        assert a.withdraw(timeout=30) == 2 * MiB  # all of a's memory comes back...
        (dev,) = lending.view()["devices"]
        assert [x["id"] for x in dev["offers"]] == [b.id]
        assert {le["offer"] for le in dev["leases"]} == {b.id}
        assert dev["leased"] == 2 * MiB == _lent(m)  # ...and b's lease was never exceeded
        assert b.status()["available"] == 0
        _check(m, hs, ts, refs)
    b.withdraw()


def test_reclaim_timeout_keeps_the_reclaim_in_force(ledger_path):
    o = lending.offer("emu:1", "3MiB")
    with aq.OffloadManager("cpu", peers="lent", host_bytes="8MiB") as m:
        hs, ts, refs = _fill(m, 6, seed=4)
        with m._lending._sync_lock:  # the consumer is stuck (e.g. a long migration)
            with pytest.raises(ReclaimTimeoutError) as info:
                o.reclaim(timeout=0.3)
            assert info.value.pending == 3 * MiB
            assert o.status() == {"offered": 0, "leased": 3 * MiB, "available": 0,
                                  "pending": 3 * MiB}
            with pytest.raises(InvalidArgumentError):  # nothing more to take back
                o.reclaim(1)
        o.wait(timeout=30)
        assert o.status()["pending"] == 0 and _lent(m) == 0
        assert all(h.tier == "host" for h in hs)
        _check(m, hs, ts, refs)
        assert o.withdraw() == 0
    assert lending.view()["devices"] == []


def test_consumer_that_cannot_migrate_reports_it_and_retries(ledger_path):
    o = lending.offer("emu:1", "2MiB")
    with aq.OffloadManager("cpu", peers="lent", host_bytes="2MiB") as m:
        hs, ts, refs = _fill(m, 8, seed=5)  # 2 MiB on the peer, 2 MiB on the host: full
        on_host = [i for i, h in enumerate(hs) if h.tier == "host"]
        assert len(on_host) == 4
        with pytest.raises(ReclaimError, match="OutOfMemoryError"):
            o.reclaim(timeout=30)
        assert m.stats()["lending"]["reclaim_failures"] >= 1
        assert o.status()["pending"] == 2 * MiB  # still in force; nothing was lost
        assert [h.tier for h in hs].count("peer") == 4
        pick = lambda xs, idx: [xs[i] for i in idx]  # noqa: E731
        _check(m, pick(hs, on_host), pick(ts, on_host), pick(refs, on_host))  # room now
        m._lending.sync()  # (the thread also retries on its own every SLICE_S)
        o.wait(timeout=30)
        assert _lent(m) == 0
        rest = [i for i in range(8) if i not in on_host]
        _check(m, pick(hs, rest), pick(ts, rest), pick(refs, rest))
    o.withdraw()


def test_consumer_gives_everything_back_when_the_ledger_breaks(ledger_path):
    o = lending.offer("emu:1", "2MiB")
    m = aq.OffloadManager("cpu", peers="lent", host_bytes="8MiB")
    try:
        hs, ts, refs = _fill(m, 4, seed=6)
        raw = ledger_path.read_bytes()
        ledger_path.write_bytes(b"garbage" * 10)
        o2 = None
        with pytest.raises(lending.LedgerError):
            o2 = lending.offer("emu:1", "1MiB")
        assert o2 is None
        # Wake the consumer as a producer would: it finds the ledger unreadable.
        notify.send(m._lending._endpoint.address, notify.WAKE_RECLAIM)
        wait_until(lambda: m.stats()["lending"]["state"] == "failed")
        s = m.stats()
        assert "not an aqua_offload lending ledger" in s["lending"]["error"] and s["tiers"][0]["capacity"] == 0
        assert all(h.tier == "host" for h in hs)
        _check(m, hs, ts, refs)
        assert ledger_path.read_bytes() == b"garbage" * 10  # never "repaired" or reset
        ledger_path.write_bytes(raw)  # the user restores it; close() then unregisters
    finally:
        m.close()
    assert o.withdraw() == 2 * MiB

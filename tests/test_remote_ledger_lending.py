"""Lending to processes of this host through the ledger, driven like a lender: the
``LedgerLender`` adapter behind a ``ReserveWatcher`` with an injected free-memory function
(grow, reclaim that returns at once, consumer data migrated and verified bitwise, bounded
close), and ``aqua-offload lend --ledger`` in a subprocess (offer in the ledger, SIGTERM
withdraws it from a consumer, usage errors offer nothing). Neither needs NIXL: a stand-in
``nixl_cu13`` that kills the process on import proves the CLI never loads it. Every wait and
every child has a hard deadline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import aqua_offload as aq
from aqua_offload import lending
from aqua_offload.errors import InvalidArgumentError, LedgerError
from aqua_offload.remote.elastic import ReserveWatcher, host_free_memory
from aqua_offload.remote.ledger_lending import LedgerLender
from conftest import fetch_and_check, offload_mixed, run_with_timeout, wait_until

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[1]
NIXL_IMPORTED = 97  # exit status of the stand-in nixl_cu13


def _offers(path):
    """(producer pid, bytes) of every offer in the ledger at ``path``."""
    return sorted((o["producer_pid"], o["bytes"]) for d in lending.view(str(path))["devices"]
                  for o in d["offers"])


class Device:
    """An emulated device of ``total`` bytes: the producer uses ``own``, consumers hold what
    they leased (as on a GPU: the memory a consumer allocates is no longer free)."""

    def __init__(self, total: int, own: int) -> None:
        self.total, self.own = total, own
        self.lender: LedgerLender | None = None

    def free(self) -> int:
        return self.total - self.own - self.lender.stats()["leased_bytes"]


@pytest.fixture
def elastic(ledger_path):
    """(lender, watcher, device): 4 MiB segments, keep 32 MiB of a 64 MiB device."""
    made = []

    def make(own=16 * MiB, keep=32 * MiB, cap=None):
        dev = Device(64 * MiB, own)
        lender = LedgerLender("cuda:1", segment_bytes="4MiB", ledger=str(ledger_path))
        dev.lender = lender
        made.append(lender)
        watcher = ReserveWatcher(lender, keep, lender.free_memory(dev.free), max_bytes=cap)
        return lender, watcher, dev

    yield make
    for lender in made:
        assert lender.close(timeout=20)["left"] == 0


# -- the adapter -----------------------------------------------------------------------------
def test_offers_follow_free_memory_above_the_reserve(elastic, ledger_path):
    lender, watcher, dev = elastic(own=16 * MiB, cap=24 * MiB)
    me = os.getpid()
    assert watcher.step() == "grow"  # 48 MiB free, 32 kept: 16 MiB offered
    assert _offers(ledger_path) == [(me, 16 * MiB)] and lender.device == "emu:1"
    # Offered, unleased bytes still look free on the device: the adapter hides them, so the
    # same spare memory is not offered twice.
    assert lender.free_memory(dev.free)() == 32 * MiB
    assert watcher.step() == "steady" and _offers(ledger_path) == [(me, 16 * MiB)]
    dev.own = 2 * MiB  # 14 MiB more free, but the cap leaves 8 MiB: a second offer
    assert watcher.step() == "grow"
    assert _offers(ledger_path) == [(me, 8 * MiB), (me, 16 * MiB)]
    assert watcher.step() == "steady"
    dev.own = 30 * MiB  # 28 MiB short of 56 MiB: newest offers first, whole segments
    assert watcher.step() == "reclaim"
    st = lender.stats()
    assert st["lendable_bytes"] == 0 and st["reclaim_pending_bytes"] == 0
    assert watcher.stats["asked_bytes"] == 24 * MiB  # all there was
    wait_until(lambda: lender.stats()["reclaims_done"] == 1, what="the reclaim to complete")
    wait_until(lambda: _offers(ledger_path) == [], what="empty offers to be withdrawn")
    assert lender.stats()["reclaimed_bytes"] == 24 * MiB


def test_a_reclaim_rounds_up_to_segments_and_lowers_the_newest_offers_first(elastic,
                                                                           ledger_path):
    lender, watcher, dev = elastic(own=16 * MiB)
    me = os.getpid()
    assert watcher.step() == "grow"
    dev.own = 8 * MiB
    assert watcher.step() == "grow"
    assert _offers(ledger_path) == [(me, 8 * MiB), (me, 16 * MiB)]
    dev.own = 11 * MiB  # 3 MiB short: one segment, from the newest offer
    assert watcher.step() == "reclaim"
    assert _offers(ledger_path) == [(me, 4 * MiB), (me, 16 * MiB)]
    dev.own = 19 * MiB  # 7 MiB short: two segments, the newest offer's last one first
    assert watcher.step() == "reclaim"
    wait_until(lambda: _offers(ledger_path) == [(me, 12 * MiB)], what="the emptied offer to go")
    wait_until(lambda: lender.stats()["reclaims_done"] == 2)
    st = lender.stats()
    assert (st["offers"], st["lendable_bytes"], st["reclaimed_bytes"]) == (1, 12 * MiB, 12 * MiB)
    assert watcher.step() == "steady"


def test_a_reclaim_migrates_the_consumers_data_bitwise(elastic, ledger_path):
    lender, watcher, dev = elastic(own=16 * MiB)  # offers 16 MiB
    assert watcher.step() == "grow"
    with aq.OffloadManager("cpu", peers="lent", host_bytes="32MiB") as m:
        wait_until(lambda: lender.stats()["leased_bytes"] == 16 * MiB, what="the lease")
        hs, ts, refs = offload_mixed(m, 24, seed=1)  # 12 MiB
        assert sum(h.tier == "peer" for h in hs) == 24
        assert watcher.step() == "steady"  # leased memory is no longer free, nor offered
        dev.own = 26 * MiB  # 10 MiB short: the consumer must give 12 MiB back
        assert watcher.step() == "reclaim"
        wait_until(lambda: lender.stats()["reclaims_done"] == 1, what="the consumer's return")
        st = lender.stats()
        assert st["reclaimed_bytes"] == 12 * MiB and st["reclaim_last_s"] > 0
        assert st["reclaim_max_s"] >= st["reclaim_last_s"] and st["reclaim_pending_bytes"] == 0
        assert st["leased_bytes"] <= 4 * MiB and st["reclaims"] == 1
        lent = m.stats()["lending"]
        assert lent["reclaims"] >= 1 and lent["bytes_returned"] >= 12 * MiB
        assert sum(h.tier == "host" for h in hs) >= 16  # migrated down, not lost
        assert watcher.step() == "steady"  # the shortage is covered: not asked twice
        fetch_and_check(m, hs, ts, refs)


def test_a_reclaim_never_waits_for_a_busy_consumer(elastic, ledger_path):
    lender, watcher, dev = elastic(own=16 * MiB)
    assert watcher.step() == "grow"
    with aq.OffloadManager("cpu", peers="lent", host_bytes="32MiB") as m:
        wait_until(lambda: lender.stats()["leased_bytes"] == 16 * MiB, what="the lease")
        hs, ts, refs = offload_mixed(m, 16, seed=2)
        with m._lending._sync_lock:  # the consumer cannot serve a return meanwhile
            dev.own = 22 * MiB  # 6 MiB short: 8 MiB asked
            # Asked, not waited for: the consumer cannot return while this test holds it.
            assert run_with_timeout(watcher.step, timeout=60) == "reclaim"
            st = lender.stats()
            assert st["reclaim_pending_bytes"] == 8 * MiB and st["reclaims_pending"] == 1
            assert st["reclaims_done"] == 0 and st["arena_bytes"] == 16 * MiB
            # Bytes on their way back count as returned: the same shortage is not asked twice.
            assert watcher.step() == "steady" and watcher.stats["reclaim_asks"] == 1
            time.sleep(0.3)
            assert lender.stats()["reclaims_done"] == 0
        wait_until(lambda: lender.stats()["reclaims_done"] == 1, what="the return after the lock")
        assert lender.stats()["reclaim_last_s"] >= 0.3
        fetch_and_check(m, hs, ts, refs)


def test_close_withdraws_bounded_and_a_second_close_finishes(ledger_path):
    lender = LedgerLender("emu:1", nbytes="8MiB", segment_bytes="4MiB", ledger=str(ledger_path))
    with aq.OffloadManager("cpu", peers="lent", host_bytes="32MiB") as m:
        wait_until(lambda: lender.stats()["leased_bytes"] == 8 * MiB, what="the lease")
        hs, ts, refs = offload_mixed(m, 12, seed=3)
        with m._lending._sync_lock:
            done = run_with_timeout(lambda: lender.close(timeout=0.3), timeout=60)
            assert done["withdrawn"] == 8 * MiB and done["left"] == 8 * MiB
            assert _offers(ledger_path) == [(os.getpid(), 0)]  # asked back in full
            with pytest.raises(InvalidArgumentError):
                lender.grow(4 * MiB)  # closed: nothing new is offered
        done = lender.close(timeout=20)
        assert done["left"] == 0 and _offers(ledger_path) == []
        assert all(h.tier == "host" for h in hs)
        fetch_and_check(m, hs, ts, refs)


def test_bad_input_offers_nothing(ledger_path, tmp_path):
    for device in ("cpu", "host", "cuda:-1", "gpu"):
        with pytest.raises(InvalidArgumentError):
            LedgerLender(device, nbytes="1MiB", ledger=str(ledger_path))
    with pytest.raises(InvalidArgumentError):
        LedgerLender("emu:1", nbytes="-1MiB", ledger=str(ledger_path))
    with pytest.raises(InvalidArgumentError):
        LedgerLender("emu:1", segment_bytes=0, ledger=str(ledger_path))
    with pytest.raises(LedgerError):
        LedgerLender("emu:1", nbytes="1MiB", ledger=str(tmp_path))  # a directory
    assert not ledger_path.exists()  # nothing was ever written


# -- aqua-offload lend --ledger --------------------------------------------------------------
@pytest.fixture
def no_nixl_env(tmp_path):
    """An environment whose ``nixl_cu13`` kills the process on import (exit 97)."""
    fake = tmp_path / "fake_nixl" / "nixl_cu13"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"import os\nos._exit({NIXL_IMPORTED})\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake.parent), *sys.path]))


def _lend(env, *args):
    return subprocess.Popen([sys.executable, "-m", "aqua_offload.remote", *args], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ready(proc, path, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate(timeout=10)
            pytest.fail(f"lender not ready (status {proc.returncode}): {out} {err}")
        time.sleep(0.02)
    return json.loads(path.read_text())


def _stop(proc, timeout=60.0):
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        pytest.fail("the lender did not stop after SIGTERM")
    return proc.returncode, out, err


def test_cli_offers_through_the_ledger_and_sigterm_withdraws_it(ledger_path, no_nixl_env,
                                                                tmp_path):
    ready = tmp_path / "ready.json"
    proc = _lend(no_nixl_env, "--device", "cuda:1", "--bytes", "8MiB", "--ledger",
                 str(ledger_path), "--ready-file", str(ready))
    try:
        info = _ready(proc, ready)
        assert info["device"] == "emu:1" and info["ledger"] == str(ledger_path)
        assert _offers(ledger_path) == [(proc.pid, 8 * MiB)] and info["pid"] == proc.pid
        with aq.OffloadManager("cpu", peers="lent", host_bytes="32MiB") as m:
            wait_until(lambda: m.stats()["lending"]["leased_bytes"] == 8 * MiB, what="the lease")
            hs, ts, refs = offload_mixed(m, 12, seed=4)
            assert all(h.tier == "peer" for h in hs)
            status, out, err = _stop(proc)
            assert status == 0, err
            assert all(h.tier == "host" for h in hs)  # the withdraw migrated them
            fetch_and_check(m, hs, ts, refs)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert "offering 8.00 MiB of emu:1" in out and str(ledger_path) in out
    assert "withdrew 8.00 MiB" in out and "reclaim latency" in out
    assert _offers(ledger_path) == []


def test_cli_elastic_offers_what_is_free_above_keep(ledger_path, no_nixl_env, tmp_path):
    # An emulated device is host memory: keep all but 2 GiB of what is available now, so
    # the 8 MiB cap is what is offered unless the machine loses 2 GiB meanwhile.
    keep = host_free_memory() - (2 << 30)
    ready = tmp_path / "ready.json"
    proc = _lend(no_nixl_env, "--device", "cuda:1", "--keep", str(keep), "--bytes", "8MiB",
                 "--segment", "4MiB", "--interval", "0.2", "--ledger", str(ledger_path),
                 "--ready-file", str(ready))
    try:
        _ready(proc, ready)
        wait_until(lambda: _offers(ledger_path) == [(proc.pid, 8 * MiB)], what="the offer")
        status, out, err = _stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert status == 0, err
    assert "elastic, keeping" in out and "1 grows" in out and _offers(ledger_path) == []


@pytest.mark.parametrize("args, message", [
    (["--host-bytes", "8MiB"], "host memory cannot be lent through the ledger"),
    (["--keep", "1GiB"], "host memory cannot be lent through the ledger"),
    (["--device", "cuda:1"], "--device needs --bytes"),
    (["--device", "cpu", "--bytes", "8MiB"], "host memory cannot be lent"),
    (["--device", "cuda:1", "--bytes", "8MiB", "--port", "18515"], "--port"),
    (["--device", "cuda:1", "--bytes", "8MiB", "--token-env", "X"], "--token-env"),
    (["--device", "cuda:1", "--bytes", "8MiB", "--withdraw-timeout", "-1"], "withdraw"),
])
def test_cli_usage_errors_offer_nothing(ledger_path, no_nixl_env, args, message):
    # Through the console script's module: the whole CLI must not import NIXL either.
    proc = subprocess.run([sys.executable, "-m", "aqua_offload.cli", "lend", *args, "--ledger",
                           str(ledger_path)], env=no_nixl_env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, (proc.returncode, proc.stderr)
    assert not ledger_path.exists() and "offering" not in proc.stdout

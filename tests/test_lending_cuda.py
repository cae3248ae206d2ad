"""Cross-process lending on a real GPU. Marked `cuda`: skipped with a reason when no GPU is
usable (conftest.py). With one GPU the producer lends its own device (a same-device "peer");
with two or more it lends cuda:1 to a consumer on cuda:0."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch

import aqua_offload as aq
from aqua_offload import lending
from aqua_offload.errors import InvalidArgumentError
from conftest import random_tensor, same_bytes

pytestmark = pytest.mark.cuda

MiB = 1 << 20
CTX = mp.get_context("spawn")


@pytest.fixture
def ledger_path(tmp_path, monkeypatch):
    path = tmp_path / "ledger"
    monkeypatch.setenv("AQUA_OFFLOAD_LEDGER", str(path))
    monkeypatch.setenv("AQUA_OFFLOAD_LEASE_CHUNK", "64MiB")
    return path


def _lender() -> str:
    return "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"


def _fill(m, n, size=16 * MiB, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ts = [random_tensor((size,), torch.uint8, device="cuda:0", generator=gen) for _ in range(n)]
    refs = [t.clone() for t in ts]
    return [m.offload(t) for t in ts], ts, refs


def test_gpu_offer_is_bounded_by_the_device(ledger_path):
    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(InvalidArgumentError, match="exceeds"):
        lending.offer("cuda:0", total + 1)
    assert not ledger_path.exists() or lending.view()["devices"] == []


def test_gpu_lease_and_reclaim_in_process(ledger_path):
    o = lending.offer(_lender(), "256MiB")
    with aq.OffloadManager("cuda:0", peers="lent", host_bytes="1GiB") as m:
        assert m.stats()["lending"]["leased"] == {_lender(): 256 * MiB}
        hs, ts, refs = _fill(m, 16)
        assert {h.tier for h in hs} == {"peer"}
        assert o.reclaim("96MiB", timeout=60) == 96 * MiB
        s = m.stats()
        assert s["lending"]["reclaims"] == 1 and s["lending"]["reclaim_last_s"] > 0
        assert o.stats()["reclaim_last_s"] > 0
        assert sum(h.tier == "host" for h in hs) >= 6  # two 64 MiB segments' worth
        for h, t, ref in zip(hs, ts, refs):
            assert m.fetch(h) is t and same_bytes(t, ref)
    assert o.withdraw(timeout=60) == 160 * MiB


def gpu_producer(device, offered, go, q):
    o = lending.offer(device, "256MiB")
    offered.set()
    if go.wait(120):
        q.put((o.reclaim(timeout=60), o.stats()["reclaim_last_s"]))
        o.withdraw(timeout=60)


def test_gpu_reclaim_from_another_process(ledger_path):
    offered, go, q = CTX.Event(), CTX.Event(), CTX.Queue()
    child = CTX.Process(target=gpu_producer, args=(_lender(), offered, go, q), daemon=True)
    child.start()
    try:
        assert offered.wait(120)
        with aq.OffloadManager("cuda:0", peers="lent", host_bytes="1GiB") as m:
            hs, ts, refs = _fill(m, 12, seed=1)
            assert sum(h.tier == "peer" for h in hs) == 12
            go.set()
            got, latency = q.get(timeout=120)
            assert got == 256 * MiB and latency > 0
            deadline = time.monotonic() + 30
            while m.stats()["lending"]["leased_bytes"] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert m.stats()["lending"]["leased_bytes"] == 0
            assert all(h.tier == "host" for h in hs)
            for h, t, ref in zip(hs, ts, refs):
                assert m.fetch(h) is t and same_bytes(t, ref)
    finally:
        go.set()
        child.join(60)
        if child.is_alive():
            child.kill()
            pytest.fail("producer hung")
    assert child.exitcode == 0

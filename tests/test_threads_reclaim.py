"""Lend and reclaim racing offloads, prefetches and fetches in other threads, on every backend
(``backend`` fixture): reclaim migrates live data down the cascade while workers check every
fetch bitwise; no deadlock, no byte lost, no freed block exposed to a copy still running."""

from __future__ import annotations

import random
import threading
import time

import torch

import aqua_offload as aq
from helpers import JOIN_TIMEOUT_S, no_errors, run_threads
from helpers import bits as tensor_bytes
from helpers import rand_mixed as random_tensor
from helpers import storage_bits as storage_bytes


def test_reclaim_and_lend_race_offload_and_fetch(backend):
    """Four workers offload / prefetch / fetch (also kept fetches followed by incremental
    offloads) with bitwise checks, while a fifth thread keeps lending to and reclaiming from the
    peer tier. No deadlock, no byte lost; a reclaim raises nothing but OutOfMemoryError (the
    host tier full), and then nothing was reclaimed."""
    n_workers, rounds = 4, 60
    m = backend.manager(peer_bytes="32KiB", host_bytes="96KiB")
    peer = backend.peer_label
    lender_done = threading.Event()
    counts = [dict(offloads=0, fetches=0, frees=0, ooms=0, incremental=0, prefetches=0)
              for _ in range(n_workers)]
    log = dict(lends=0, reclaims=0, reclaim_ooms=0, lent=32 << 10, reclaimed=0)

    def worker(k: int) -> None:
        rng = random.Random(3000 + k)
        gen = torch.Generator().manual_seed(4000 + k)
        c = counts[k]
        live: list[list] = []  # [handle, tensor, reference bytes, kept]

        def check_out(entry, out) -> None:
            h, t, ref, _ = entry
            if h.release:
                assert out is t and not aq.is_offloaded(t)
                assert torch.equal(storage_bytes(t), ref)
            else:
                assert torch.equal(tensor_bytes(out), ref)

        def offload(t: torch.Tensor, release: bool, base=None) -> None:
            ref = storage_bytes(t) if release else tensor_bytes(t)
            try:
                h = m.offload(t, release=release, priority=rng.choice([0, 0, 1, -1]), base=base)
            except aq.OutOfMemoryError:
                c["ooms"] += 1
                assert not aq.is_offloaded(t)
                now = storage_bytes(t) if release else tensor_bytes(t)
                assert torch.equal(now, ref)
                return
            c["offloads"] += 1
            c["incremental"] += base is not None
            assert h.location in (peer, "cpu")
            live.append([h, t, ref, False])

        i = 0
        while i < 150 or not lender_done.is_set():
            i += 1
            assert i < 100_000
            r = rng.random()
            if len(live) < 6 and r < 0.5:
                offload(random_tensor(rng, gen, 8 << 10, backend.device), rng.random() < 0.5)
                continue
            if not live:
                continue
            entry = live[rng.randrange(len(live))]
            h, t, ref, kept = entry
            r = rng.random()
            if kept or r < 0.15:  # a kept copy (or any handle) grows: incremental offload
                if not kept:
                    out = m.fetch(h, keep=True)
                    c["fetches"] += 1
                    check_out(entry, out)
                    entry[3] = True
                suffix = torch.randint(0, 256, (rng.choice([0, 100, 1000]),), dtype=torch.uint8,
                                       generator=gen)
                grown = torch.cat([ref, suffix]).to(backend.device)  # ref: the bytes kept
                before = len(live)
                offload(grown, rng.random() < 0.5, base=h)
                if len(live) > before:
                    assert h.state == "freed"
                    live.remove(entry)
                elif rng.random() < 0.5:  # no room: drop the kept copy instead
                    m.free(h)
                    c["frees"] += 1
                    live.remove(entry)
            elif r < 0.3:
                m.prefetch(h)
                c["prefetches"] += 1
            elif r < 0.85:
                live.remove(entry)
                check_out(entry, m.fetch(h))
                c["fetches"] += 1
            else:
                live.remove(entry)
                m.free(h)
                c["frees"] += 1
        for entry in live:
            if entry[3]:
                m.free(entry[0])
                c["frees"] += 1
            else:
                check_out(entry, m.fetch(entry[0]))
                c["fetches"] += 1

    def lender() -> None:
        rng = random.Random(99)
        try:
            for _ in range(rounds):
                cap = m.stats()["tiers"][0]["capacity"]  # only this thread changes it
                n = rng.choice([256, 4 << 10, 8 << 10, 16 << 10, 32 << 10])
                assert m.lend(peer, n) == cap + n
                log["lends"] += 1
                log["lent"] += n
                cap += n
                amount = rng.choice([None, 1, 1, 4 << 10, n, n, cap])
                amount = None if amount is None else min(amount, cap)
                before = m.stats()
                try:
                    got = m.reclaim(peer, amount)
                except aq.OutOfMemoryError:
                    log["reclaim_ooms"] += 1
                    after = m.stats()
                    assert after["tiers"][0]["capacity"] == cap
                    assert after["tiers"][0]["segments"] == before["tiers"][0]["segments"]
                    assert after["reclaims"] == before["reclaims"]
                    assert after["bytes_reclaimed"] == before["bytes_reclaimed"]
                    continue
                assert got >= (cap if amount is None else amount)
                after = m.stats()
                assert after["tiers"][0]["capacity"] == cap - got
                assert after["reclaim_last_s"] > 0
                log["reclaims"] += 1
                log["reclaimed"] += got
                time.sleep(0.005)
        finally:
            lender_done.set()

    errors = run_threads([lambda k=k: worker(k) for k in range(n_workers)] + [lender],
                         timeout=60)
    no_errors(errors)
    m.synchronize()
    s = m.stats()
    assert s["live_handles"] == 0 and s["prefetched_bytes"] == 0
    for t in s["tiers"]:
        assert t["used"] == 0 and t["blocks"] == 0 and t["handles"] == 0, t
        assert t["free"] == t["capacity"] and t["free_ranges"] == t["segments"], t
    assert s["tiers"][0]["capacity"] == log["lent"] - log["reclaimed"]
    assert s["lends"] == log["lends"] == rounds
    assert s["reclaims"] == log["reclaims"]
    assert s["bytes_reclaimed"] == log["reclaimed"]
    total = {k: sum(c[k] for c in counts) for k in counts[0]}
    assert s["offloads"] == total["offloads"]
    assert s["fetches"] == total["fetches"]
    assert s["frees"] == total["frees"]
    assert s["incremental_offloads"] == total["incremental"] > 0
    assert s["migrations"] > 0  # reclaims and evictions did move live data
    assert log["reclaims"] > rounds // 3
    m.close()


def test_free_after_prefetch_and_reclaim_never_exposes_a_reused_block(backend):
    """Regression (review): a prefetched handle migrated by reclaim, then freed, released its
    new block fenced only by the (older) prefetch; the next offload into that block could be
    overwritten by the migration still running."""
    mib = 1 << 20
    dev = backend.device
    for _ in range(3):
        m = backend.manager(peer_bytes=48 * mib, host_bytes=160 * mib)
        big = torch.randn(36 * mib // 4, device=dev)
        m.offload(big, release=False)
        x = torch.full((2 * mib // 4,), 1.0, device=dev)
        h = m.offload(x, release=False)
        m.prefetch(h)
        h.wait()
        c = torch.randn(16 * mib // 4, device=dev)
        m.offload(c, release=True)  # the peer is full: evicts `big` (a long migration)
        r = threading.Thread(target=m.reclaim, args=(backend.peer_label,), daemon=True)
        r.start()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while h.tier != "host" and time.monotonic() < deadline:
            pass
        m.free(h)
        z = torch.full((2 * mib // 4,), 2.0, device=dev)
        hy = m.offload(z, release=False)
        r.join(JOIN_TIMEOUT_S)
        assert not r.is_alive()
        assert torch.equal(m.fetch(hy), z)
        m.close()

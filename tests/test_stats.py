"""stats(): every documented key with its type, per-tier pool numbers (peak, fragmentation,
fenced), and the accounting through a long mixed sequence (used == the blocks of the live
handles, after every step). Runs on every backend.
"""

from __future__ import annotations

import os

import pytest
import torch

from helpers import (K, PEER, SLOT, align, check_accounting, check_drained, rand_tensor,
                     rand_u8, same)

TOP_INT_KEYS = ["offloads", "fetches", "frees", "prefetches", "bytes_offloaded", "bytes_fetched",
                "bytes_migrated", "incremental_offloads", "incremental_bytes_saved", "evictions",
                "migrations", "migration_failures", "lends", "reclaims", "bytes_lent",
                "bytes_reclaimed", "reclaim_last_bytes_moved", "live_handles", "events_created",
                "prefetched_bytes"]
TOP_FLOAT_KEYS = ["reclaim_last_s", "reclaim_max_s", "reclaim_total_s"]
TOP_STR_KEYS = ["backend", "device", "policy"]
TIER_INT_KEYS = ["capacity", "used", "peak", "free", "largest_free", "blocks", "free_ranges",
                 "segments", "lent_segments", "fenced", "handles"]
TIER_STR_KEYS = ["tier", "location"]


def test_stats_keys_and_types(backend, managers):
    m = managers()
    # kept alive: the keys must not depend on it
    h = m.offload(rand_tensor(SLOT, device=backend.device), release=False)  # noqa: F841
    s = m.stats()
    for k in TOP_INT_KEYS:
        assert type(s[k]) is int and s[k] >= 0, k
    for k in TOP_FLOAT_KEYS:
        assert type(s[k]) is float and s[k] == 0.0, k
    for k in TOP_STR_KEYS:
        assert type(s[k]) is str, k
    assert s["backend"] == backend.name and s["device"] == str(backend.device)
    assert s["policy"] == "lru"
    assert isinstance(s["tiers"], list) and len(s["tiers"]) == 2
    for t in s["tiers"]:
        for k in TIER_INT_KEYS:
            assert type(t[k]) is int and t[k] >= 0, k
        for k in TIER_STR_KEYS:
            assert type(t[k]) is str, k
        assert type(t["fragmentation"]) is float and 0.0 <= t["fragmentation"] <= 1.0
    assert [(t["tier"], t["location"]) for t in s["tiers"]] == [("peer", backend.peer_label),
                                                                ("host", "cpu")]
    documented = set(TOP_INT_KEYS + TOP_FLOAT_KEYS + TOP_STR_KEYS + ["tiers"])
    assert documented <= set(s)
    assert set(TIER_INT_KEYS + TIER_STR_KEYS + ["fragmentation"]) <= set(s["tiers"][0])


def test_stats_keys_documented():
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "stats.md")).read()
    for k in TOP_INT_KEYS + TOP_FLOAT_KEYS + TOP_STR_KEYS + TIER_INT_KEYS + TIER_STR_KEYS:
        assert f"`{k}`" in doc, k


def test_every_key_a_manager_reports_is_documented():
    # The lists above name what tests check; this catches a key added without its doc row
    # (``closed`` was reported but documented only for forked children).
    import aqua_offload as aq

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "stats.md")).read()
    rows = "\n".join(line for line in doc.splitlines() if line.startswith("|"))  # the tables
    with aq.OffloadManager("cpu", peer_bytes="1MiB", host_bytes="1MiB") as m:
        s = m.stats()
    missing = [k for k in [*s, *s["tiers"][0]] if f"`{k}`" not in rows]
    assert not missing, missing


def test_every_key_a_lent_remote_or_forked_manager_reports_has_a_row(monkeypatch, tmp_path):
    # `lending`, `remote` and `forked_child` were named only in prose: the test above makes
    # a plain manager, which reports none of them.
    import aqua_offload as aq
    from aqua_offload.remote import nixl_unavailable

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "stats.md")).read()
    rows = "\n".join(line for line in doc.splitlines() if line.startswith("|"))
    monkeypatch.setenv("AQUA_OFFLOAD_LEDGER", str(tmp_path / "ledger"))
    keys = set()
    with aq.OffloadManager("cpu", peers="lent", host_bytes="1MiB") as m:
        keys |= set(m.stats())
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child reports its stats' keys and leaves at once
            os.write(w, " ".join(m.stats()).encode())
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        with os.fdopen(r) as f:
            forked = f.read().split()
    assert "forked_child" in forked, forked
    keys |= set(forked)
    if nixl_unavailable() is None:
        from aqua_offload.remote.lender import Lender

        token = "t" * 64
        with Lender(token, host_bytes="16MiB", segment_bytes="16MiB") as lender:
            with aq.OffloadManager("cpu", peers=None, host_bytes="1MiB",
                                   remote=[lender.address], remote_token=token) as m:
                keys |= set(m.stats())
        assert "remote" in keys
    missing = sorted(k for k in keys if f"`{k}`" not in rows)
    assert not missing, missing


def test_peak_and_fragmentation(backend, managers):
    m = managers()
    hs = [m.offload(rand_tensor(SLOT, device=backend.device), release=False) for _ in range(4)]
    hs[1].free()
    hs[3].free()
    t = m.stats()["tiers"][0]
    assert t["peak"] == PEER and t["used"] == 2 * SLOT
    assert t["free_ranges"] == 2 and t["largest_free"] == SLOT
    assert t["fragmentation"] == pytest.approx(0.5)


def test_fenced_bytes_are_free_and_drain(backend, managers):
    """``fenced`` counts bytes released while a copy may still touch them: they are free (not
    in ``used``) at once, and once every copy completed none is fenced."""
    m = managers()
    gen = torch.Generator().manual_seed(28)
    for _ in range(3):
        # fresh tensors each round: a freed release leaves its tensor discarded
        ts = [rand_tensor(SLOT, gen=gen, device=backend.device) for _ in range(4)]
        hs = [m.offload(t) for t in ts]  # releases: the copies may still run when freed
        for h in hs:
            m.free(h)
        t = m.stats()["tiers"][0]
        assert t["used"] == 0 and t["blocks"] == 0 and t["free"] == t["capacity"], t
        assert type(t["fenced"]) is int and 0 <= t["fenced"], t
    check_drained(m)  # fenced == 0 on every tier after synchronize()


def test_accounting_through_a_mixed_sequence(backend, managers):
    """A deterministic mix of everything; after each step used == the sum of the live blocks
    (a block with headroom is known, and loses it when it migrates), and at the end every tier
    is empty."""
    m = managers(peer=PEER, host=16 * PEER)
    dev, peer = backend.device, backend.peer_label
    gen = torch.Generator().manual_seed(27)
    # id(h) -> [h, reference bytes, (location, block) of a block with headroom or None]
    live: dict[int, list] = {}

    def block(entry) -> int:
        h, _, room = entry
        return room[1] if room is not None and room[0] == h.location else align(h.nbytes)

    def check():
        check_accounting(m, [e[0] for e in live.values()],
                         {id(e[0]): block(e) for e in live.values()})

    for step in range(40):
        n = [700, SLOT, 3 * K + 5, 6 * K, 256, 1][step % 6]
        t = rand_u8(n, gen, dev)
        h = m.offload(t, release=False, priority=step % 3)
        live[id(h)] = [h, t, None]
        check()
        if step % 5 == 4:
            h, ref, _ = live.pop(next(iter(live)))
            assert same(m.fetch(h), ref)
            check()
        if step % 7 == 6:
            entry = next(iter(live.values()))
            h, ref, _ = entry
            assert same(m.fetch(h, keep=True), ref)
            grown = torch.cat([ref, rand_u8(300, gen, dev)])
            room, loc = block(entry), h.location
            del live[id(h)]
            h2 = m.offload(grown, release=False, base=h)
            if room >= grown.numel():  # in place: the same block
                assert h2.location == loc
                live[id(h2)] = [h2, grown, (loc, room)]
            else:
                live[id(h2)] = [h2, grown, (h2.location, align(max(grown.numel(), 2 * room)))]
            check()
        if step % 9 == 8:
            m.lend(peer, SLOT)
            check()
        if step % 13 == 12:
            assert m.reclaim(peer, SLOT) >= SLOT
            check()
    assert m.stats()["evictions"] > 0 and m.stats()["incremental_offloads"] == 5
    for h, ref, _ in list(live.values()):
        assert same(m.fetch(h), ref)
    live.clear()
    check_drained(m)

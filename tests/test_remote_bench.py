"""``aqua-offload bench remote`` runs end to end on a loopback lender and verifies its bytes,
client rows and OffloadManager(remote=...) rows against the raw NIXL rows of the same run
(numbers are reported, never asserted)."""

from __future__ import annotations

import json

from remote_helpers import needs_nixl

from aqua_offload.bench.__main__ import main

pytestmark = needs_nixl


def test_bench_remote_rows_and_json(tmp_path, capsys) -> None:
    out = tmp_path / "remote.json"
    assert main(["remote", "--sizes", "4KiB", "64KiB", "--samples", "3", "--json",
                 str(out)]) == 0
    result = json.loads(out.read_text())
    machine = result["machine"]  # what the figures name
    assert "CPU x" in machine["host"] and machine["platform"] and machine["torch"]
    rows = [(r["op"], r["bytes"], r["items"]) for r in result["rows"]]
    assert rows == [("write", 4096, 1), ("read", 4096, 1), ("write", 65536, 1),
                    ("read", 65536, 1), ("write", 1000 * 4096, 1000),
                    ("read", 1000 * 4096, 1000)]
    for r in result["rows"]:
        for method in ("client", "raw_nixl", "memcpy"):
            assert 0 < r[method]["min_s"] <= r[method]["median_s"] <= r[method]["max_s"]
    manager = [(r["op"], r["mode"], r["tier"], r["bytes"], r["items"])
               for r in result["manager_rows"]]
    assert manager == [(op, mode, tier, n, items)
                       for tier, n, items in (("remote", 4096, 1), ("remote", 65536, 1),
                                              ("remote", 1000 * 4096, 1000),
                                              ("host", 1000 * 4096, 1000))
                       for mode in ("release", "snapshot") for op in ("offload", "fetch")]
    for r in result["manager_rows"]:
        m, raw = r["manager"], r["raw_nixl"]
        assert 0 < m["min_s"] <= m["median_s"] <= m["max_s"]
        assert 0 < raw["min_s"] <= raw["median_s"] <= raw["max_s"], "timed in the same run"
        assert r["vs_raw"] == m["median_s"] / raw["median_s"]
        # a single tensor's release fetch is also timed against the raw read into fresh memory
        fresh = r["items"] == 1 and r["mode"] == "release" and r["op"] == "fetch"
        assert ("raw_fresh" in r) == ("vs_raw_fresh" in r) == fresh
        if fresh:
            assert 0 < r["raw_fresh"]["min_s"] <= r["raw_fresh"]["median_s"]
            assert r["vs_raw_fresh"] == m["median_s"] / r["raw_fresh"]["median_s"]
    out = capsys.readouterr().out
    assert "client/raw" in out and "OffloadManager(remote=...)" in out and "snapshot" in out
    assert "vs fresh" in out


def test_manager_rows_time_the_calls_not_their_verification(monkeypatch) -> None:
    """The round trips' timed windows hold the call they name only: a clock that advances one
    second at each check of the bytes (torch.equal) or of a handle's tier (Handle.tier) must
    leave every sample near zero. Bug: the raw read into fresh memory (``vs_raw_fresh``)
    compared the whole tensor inside its window, and a fetch's window began before the tier
    check of its handles (a core lookup per handle): the baseline was inflated by a full
    pass over the bytes, and a batch's fetch by a thousand lookups."""
    import types

    import torch

    from aqua_offload import OffloadManager
    from aqua_offload.bench import remote as bench
    from aqua_offload.handle import Handle
    from aqua_offload.remote import Lender, RemoteClient
    from remote_helpers import TOKEN

    clock = [0.0]
    real_equal, real_tier = torch.equal, Handle.tier

    def equal(a, b):
        clock[0] += 1.0
        return real_equal(a, b)

    def tier(h):
        clock[0] += 1.0
        return real_tier.fget(h)

    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(torch, "equal", equal)
    monkeypatch.setattr(Handle, "tier", property(tier))
    with Lender(TOKEN, host_bytes="16MiB", segment_bytes="4MiB") as lender:
        client = RemoteClient(lender.address, TOKEN, deadline_s=30.0)
        m = OffloadManager("cpu", peers=None, host_bytes=256, remote=[lender.address],
                           remote_token=TOKEN)
        try:
            t = torch.randint(1, 256, (64 << 10,), dtype=torch.uint8)
            ts = [x.clone() for x in torch.randint(1, 256, (8 * 4096,), dtype=torch.uint8)
                  .split(4096)]
            for xs, items in (([t], 1), (ts, 8)):
                raw = bench._RawPair(client, sum(x.numel() for x in xs), items)
                try:
                    for mode in bench.MODES:
                        times = bench._time_round_trips(m, xs, 1, 3, "remote", mode, raw)
                        assert len(times) == (5 if items == 1 and mode == "release" else 4)
                        assert all(x == 0.0 for ts_ in times for x in ts_), (mode, times)
                finally:
                    raw.close()
            assert clock[0] > 0, "the checks ran"
        finally:
            m.close()
            client.close()


def test_bench_remote_against_a_running_lender(tmp_path, monkeypatch, capsys) -> None:
    # --lender: a lender already serving (another node's, in use) instead of a child process.
    from remote_helpers import TOKEN

    from aqua_offload.remote import Lender

    monkeypatch.setenv("AQUA_OFFLOAD_REMOTE_TOKEN", TOKEN)
    with Lender(TOKEN, host_bytes="32MiB", segment_bytes="8MiB") as lender:
        lender.start()
        out = tmp_path / "remote.json"
        assert main(["remote", "--lender", lender.address, "--sizes", "64KiB", "--samples", "3",
                     "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["lender"] == lender.address
        assert [r["bytes"] for r in result["rows"]] == [65536, 65536, 4096000, 4096000]
        assert {r["tier"] for r in result["manager_rows"]} == {"remote", "host"}
        assert lender.stats()["connections"] >= 3  # its bytes went there: nothing spawned
        assert lender.stats()["blocks"] == 0  # and it got every block back
        capsys.readouterr()
        # Too small for the sizes asked (a segment of 8 MiB, 64 MiB asked): refused up front.
        assert main(["remote", "--lender", lender.address, "--sizes", "64MiB"]) == 2
        assert "segments of at least 64.00 MiB" in capsys.readouterr().err
        # A wrong token, from a file: refused with the lender's word, nothing measured.
        bad = tmp_path / "token"
        bad.write_text("not-the-token-" + "y" * 20)
        assert main(["remote", "--lender", lender.address, "--token-file", str(bad)]) == 2
        assert "token" in capsys.readouterr().err.lower()


def test_bench_remote_token_options_need_a_lender(capsys) -> None:
    assert main(["remote", "--token-env", "X"]) == 2
    assert "go with --lender" in capsys.readouterr().err

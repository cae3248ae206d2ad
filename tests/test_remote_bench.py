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

"""``aqua-offload bench remote`` runs end to end on a loopback lender and verifies its bytes
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
    assert "client/raw" in capsys.readouterr().out

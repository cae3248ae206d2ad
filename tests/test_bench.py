"""The copy benchmark runs on the emulation backend and writes well-formed results.

These tests check the benchmark's behaviour and output schema, never its numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from aqua_offload.bench import main
from aqua_offload.bench import copy as bench_copy

ROW_KEYS = {"method": str, "direction": str, "bytes": int, "median_s": float, "min_s": float,
            "max_s": float, "gbps": float, "baseline": str, "ratio": float, "device": str,
            "backend": str}


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict, str]:
    out = tmp_path / "sub" / "out.json"
    rc = main(["copy", "--backend", "emulation", "--sizes", "4KiB", "64KiB", "--samples", "3",
               "--no-progress", "--json", out])
    assert rc == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_copy_json_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result, _ = _run(tmp_path, capsys)
    assert result["backend"] == "emulation"
    assert isinstance(result["device"], str) and result["device"]
    rows = result["rows"]
    assert rows
    for row in rows:
        assert set(row) == set(ROW_KEYS)
        for key, typ in ROW_KEYS.items():
            assert isinstance(row[key], typ), (key, row[key])
        assert row["backend"] == "emulation" and row["device"] == result["device"]
        assert 0 < row["min_s"] <= row["median_s"] <= row["max_s"]
        assert math.isclose(row["gbps"], row["bytes"] / row["median_s"] / 1e9, rel_tol=1e-9)
        base = [r for r in rows if r["method"] == row["baseline"]
                and r["direction"] == row["direction"] and r["bytes"] == row["bytes"]]
        assert len(base) == 1, f"baseline of {row} missing from the run"
        assert math.isclose(row["ratio"], base[0]["median_s"] / row["median_s"], rel_tol=1e-9)
    assert {r["bytes"] for r in rows} == {4096, 65536}
    assert {(r["direction"], r["method"], r["baseline"]) for r in rows} == {
        ("offload", "numpy_copy", "numpy_copy"), ("offload", "aqua_offload", "numpy_copy"),
        ("fetch", "numpy_copy", "numpy_copy"), ("fetch", "aqua_offload", "numpy_copy"),
        ("roundtrip", "numpy_copy_x2", "numpy_copy_x2"),
        ("roundtrip", "aqua_offload", "numpy_copy_x2")}


def test_copy_table_is_labelled_emulation(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    result, stdout = _run(tmp_path, capsys)
    assert bench_copy.EMULATION_LABEL in stdout
    assert result["label"] == bench_copy.EMULATION_LABEL
    for direction in ("offload", "fetch", "roundtrip"):
        assert f"== {direction}" in stdout


def test_wrong_bytes_fail_loudly() -> None:
    src = torch.arange(256, dtype=torch.uint8)
    out = torch.empty_like(src)
    broken = bench_copy._copy_case("noop", ("offload",), "noop", lambda: None, out, src, "noop")
    with pytest.raises(bench_copy.VerificationError, match="bytes differ"):
        bench_copy._measure(broken, bench_copy._host_timer, src.numel(), samples=3, warmup=0)


@pytest.mark.parametrize("argv", [["copy", "--samples", "2"], ["copy", "--sizes", "0"],
                                  ["copy", "--sizes", "lots"], []])
def test_bad_arguments_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_tier_benchmark_rows(tmp_path: Path) -> None:
    from aqua_offload.bench import tiers

    result = tiers.run_tier_benchmark(backend="emulation", samples=3, count=8, size=4096,
                                      reclaim_bytes=2 << 20)
    assert result["backend"] == "emulation" and result["label"] == bench_copy.EMULATION_LABEL
    rows = result["rows"]
    assert [(r["direction"], r["method"]) for r in rows] == [
        ("roundtrip", "offload+fetch x1"), ("roundtrip", "offload_many+fetch_many x8"),
        ("reclaim", "numpy_copy"), ("reclaim", "reclaim")]
    for r in rows:
        base = next(b for b in rows if b["method"] == r["baseline"]
                    and b["direction"] == r["direction"])
        assert math.isclose(r["ratio"], base["median_s"] / r["median_s"], rel_tol=1e-9)
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
    assert rows[0]["bytes"] == rows[1]["bytes"] == 8 * 4096
    assert rows[3]["bytes"] == 2 << 20
    text = tiers.format_tier_table(result)
    assert "EMULATION" in text and "reclaim" in text

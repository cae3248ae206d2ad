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


HF_ROW_KEYS = {"method", "batch", "prompt_tokens", "new_tokens", "median_s", "min_s", "max_s",
               "tok_s", "baseline", "ratio", "device", "backend"}
BURST_ROW_KEYS = {"policy", "tier", "ttft_p50_s", "ttft_p99_s", "throughput_tok_s", "makespan_s",
                  "bytes_paged", "preemptions", "ttft_p99_gain", "throughput_ratio", "device",
                  "backend"}


def test_hf_bench_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "hf.json"
    rc = main(["hf", "--quick", "--backend", "emulation", "--new-tokens", "4",
               "--prompt-tokens", "12", "--no-progress", "--json", out])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["backend"] == "emulation" and "EMULATION" in result["label"]
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"default_cache", "offloaded_cache_peer", "offloaded_cache_host"}
    for r in rows.values():
        assert set(r) == HF_ROW_KEYS and r["new_tokens"] == 4 and r["prompt_tokens"] == 12
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert math.isclose(r["tok_s"], r["batch"] * 4 / r["median_s"], rel_tol=1e-9)
        assert math.isclose(r["ratio"], r["tok_s"] / rows["default_cache"]["tok_s"], rel_tol=1e-9)
    assert "offloaded_cache_peer" in capsys.readouterr().out


def test_hf_bench_detects_wrong_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    from aqua_offload.bench import hf as bench_hf
    from aqua_offload.hf import OffloadedCache

    real_update = OffloadedCache.update

    def corrupt(self, key_states, value_states, layer_idx, *args, **kwargs):  # type: ignore[no-untyped-def]
        return real_update(self, key_states, value_states * 1000, layer_idx, *args, **kwargs)

    monkeypatch.setattr(OffloadedCache, "update", corrupt)
    with pytest.raises(bench_copy.VerificationError, match="different tokens"):
        bench_hf.run_hf_benchmark(backend="emulation", quick=True, new_tokens=6, prompt_tokens=12)


def test_burst_bench_json(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "burst.json"
    rc = main(["burst", "--quick", "--backend", "emulation", "--requests", "3",
               "--new-tokens", "6", "--quantum-ms", "1", "--no-progress", "--json", out])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["policy"], r["tier"]) for r in rows] == [("fcfs", None), ("fair", "host"),
                                                        ("fair", "peer")]
    for r in rows:
        assert set(r) == BURST_ROW_KEYS
        assert 0 < r["ttft_p50_s"] <= r["ttft_p99_s"]
        assert math.isclose(r["ttft_p99_gain"], rows[0]["ttft_p99_s"] / r["ttft_p99_s"])
        assert math.isclose(r["throughput_ratio"],
                            r["throughput_tok_s"] / rows[0]["throughput_tok_s"])
    assert rows[0]["preemptions"] == 0 and rows[0]["bytes_paged"] == 0
    assert set(result["requests"]) == {"fcfs/None", "fair/host", "fair/peer"}
    assert all(len(v) == 3 for v in result["requests"].values())

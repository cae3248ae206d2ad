"""The copy benchmark runs on the emulation backend and writes well-formed results.

These tests check the benchmark's behaviour and output schema, never its numbers.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch

from aqua_offload.bench import main
from aqua_offload.bench import copy as bench_copy
from aqua_offload.bench import copy_cases, measure

ROW_KEYS = {"method": str, "direction": str, "bytes": int, "median_s": float, "min_s": float,
            "max_s": float, "gbps": float, "baseline": str, "ratio": float, "device": str,
            "backend": str}


SWEEP = ("device_to_host", "host_to_device", "device_to_peer", "peer_to_device")


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """One small emulation run of the copy benchmark through the command line, shared."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("copy") / "sub" / "out.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["copy", "--backend", "emulation", "--sizes", "4KiB", "256KiB", "--samples",
                   "3", "--no-progress", "--json", out])
    assert rc == 0
    return json.loads(out.read_text()), stdout.getvalue()


def test_copy_json_schema(copy_run: tuple[dict, str]) -> None:
    result, _ = copy_run
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
        key = (row["method"], row["direction"], row["bytes"])
        assert sum((r["method"], r["direction"], r["bytes"]) == key for r in rows) == 1


def test_copy_covers_every_direction_and_method(copy_run: tuple[dict, str]) -> None:
    rows = copy_run[0]["rows"]
    got = {(r["direction"], r["method"], r["bytes"]) for r in rows}
    plain = {"raw_memcpy", "torch_copy", "aqua_offload"}
    want = {(d, m, n) for d in SWEEP for m in plain for n in (4096, 256 << 10)}
    # 64 tensors of >= 4 KiB: batches exist from 256 KiB on
    want |= {(d, "aqua_offload_many", 256 << 10) for d in SWEEP}
    # bidirectional rows count the bytes of both directions
    want |= {("bidirectional", m, 2 * n) for m in plain for n in (4096, 256 << 10)}
    # the overlap experiment runs at the largest size, clamped to 16 .. 64 MiB
    want |= {("overlap_copy", "aqua_offload", 16 << 20),
             ("overlap_copy", "aqua_offload+matmul", 16 << 20)}
    mm = {r["bytes"] for r in rows if r["direction"] == "overlap_compute"}
    assert len(mm) == 1
    mm_bytes = mm.pop()
    want |= {("overlap_compute", m, mm_bytes) for m in ("matmul", "matmul+aqua_offload")}
    assert got == want
    assert all(r["baseline"] == "raw_memcpy" for r in rows
               if not r["direction"].startswith("overlap_"))
    assert copy_run[0]["config"]["overlap_bytes"] == 16 << 20


def test_copy_table_is_labelled_emulation(copy_run: tuple[dict, str]) -> None:
    result, stdout = copy_run
    assert bench_copy.EMULATION_LABEL in stdout
    assert result["label"] == bench_copy.EMULATION_LABEL
    for direction in (*SWEEP, "bidirectional", "overlap_copy", "overlap_compute"):
        assert f"== {direction}" in stdout


def test_wrong_bytes_fail_loudly() -> None:
    src = torch.arange(256, dtype=torch.uint8)
    out = torch.empty_like(src)
    broken = copy_cases.copy_case("noop", ("device_to_host",), lambda: None, src, "noop", out)
    with pytest.raises(measure.VerificationError, match="bytes differ"):
        measure.measure(broken, measure.host_timer, src.numel(), samples=3, warmup=0)


@pytest.mark.parametrize("which", ["fetch", "fetch_many"])
def test_library_copies_are_verified(monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    """A fetch that lands wrong bytes aborts the run instead of producing a row."""
    from aqua_offload import OffloadManager

    real = getattr(OffloadManager, which)

    def corrupting(self, handles, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = real(self, handles, *args, **kwargs)
        for t in (result if isinstance(result, list) else [result]):
            t.view(-1)[-1] ^= 1
        return result

    monkeypatch.setattr(OffloadManager, which, corrupting)
    with pytest.raises(measure.VerificationError, match="differ"):
        bench_copy.run_copy_benchmark([256 << 10], backend="emulation", samples=3, overlap=False)


def test_bidirectional_pair_runs_on_two_threads_and_reraises() -> None:
    seen: list[tuple[str, int]] = []

    def fa(k: int) -> None:
        seen.append((threading.current_thread().name, k))

    def fb(k: int) -> None:
        seen.append((threading.current_thread().name, k))
        raise ValueError("copy b failed")

    a = measure.Case("x", ("device_to_host",), "x", fa, lambda: None)
    b = measure.Case("x", ("host_to_device",), "x", fb, lambda: None)
    with pytest.raises(ValueError, match="copy b failed"):
        copy_cases._two_threads(a, b, 5)
    assert len({name for name, _ in seen}) == 2 and {k for _, k in seen} == {5}


def test_background_runs_while_the_foreground_is_timed() -> None:
    from aqua_offload.bench import overlap

    calls: list[float] = []
    bg = overlap._Background(False, torch.device("cpu"), lambda: (calls.append(1),
                                                                   time.sleep(0.001)), 0.001, 10)
    bg.start(0.05)
    time.sleep(0.05)
    bg.stop()
    done = len(calls)
    assert done >= 5  # it ran during the foreground ...
    time.sleep(0.02)
    assert len(calls) == done  # ... and stopped with it

    def fail() -> None:
        raise RuntimeError("background copy failed")

    bad = overlap._Background(False, torch.device("cpu"), fail, 0.001, 10)
    bad.start(0.01)
    with pytest.raises(RuntimeError, match="background copy failed"):
        bad.stop()


@pytest.mark.parametrize("argv", [["copy", "--samples", "2"], ["copy", "--sizes", "0"],
                                  ["copy", "--sizes", "lots"], []])
def test_bad_arguments_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_tier_benchmark_rows(tmp_path: Path) -> None:
    from aqua_offload.bench import tiers

    result = tiers.run_tier_benchmark(backend="emulation", samples=3, count=8, size=4096,
                                      reclaim_bytes=2 << 20, bookkeeping_counts=(64, 512))
    assert result["backend"] == "emulation" and result["label"] == bench_copy.EMULATION_LABEL
    rows = result["rows"]
    batch = [f"{tier} {what}" for tier in ("host", "peer") for what in (
        "offload+fetch x1", "offload_many+fetch_many x8", "torch copy_ x1", "torch copy_ x8")]
    assert [(r["direction"], r["method"]) for r in rows] == [
        *(("roundtrip", name) for name in batch),
        ("reclaim", "numpy_copy"), ("reclaim", "reclaim"),
        ("bookkeeping", "offload_many+fetch_many per handle, 64 live"),
        ("bookkeeping", "offload_many+fetch_many per handle, 512 live")]
    assert [r["tier"] for r in rows[:8]] == ["host"] * 4 + ["peer"] * 4
    # each batch row against its own tier's single copy; torch's rows against torch's
    assert [r["baseline"] for r in rows[:8]] == [batch[i] for i in (0, 0, 2, 2, 4, 4, 6, 6)]
    assert rows[1]["copy_path"] == rows[5]["copy_path"] == "batched"  # one task on emulation
    for r in rows:
        base = next(b for b in rows if b["method"] == r["baseline"]
                    and b["direction"] == r["direction"])
        assert math.isclose(r["ratio"], base["median_s"] / r["median_s"], rel_tol=1e-9)
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
    assert {r["bytes"] for r in rows[:8]} == {8 * 4096}
    assert rows[9]["bytes"] == 2 << 20
    text = tiers.format_tier_table(result)
    assert "EMULATION" in text and "reclaim" in text


HF_ROW_KEYS = {"method", "batch", "prompt_tokens", "new_tokens", "median_s", "min_s", "max_s",
               "tok_s", "baseline", "ratio", "device", "backend"}
BURST_ROW_KEYS = {"policy", "tier", "ttft_p50_s", "ttft_p99_s", "throughput_tok_s", "makespan_s",
                  "bytes_paged", "preemptions", "ttft_p99_gain", "throughput_ratio", "baseline",
                  "ratio", "device", "backend"}


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
        assert r["baseline"] == "fcfs" and r["ratio"] == r["ttft_p99_gain"]
        assert math.isclose(r["throughput_ratio"],
                            r["throughput_tok_s"] / rows[0]["throughput_tok_s"])
    assert rows[0]["preemptions"] == 0 and rows[0]["bytes_paged"] == 0
    assert set(result["requests"]) == {"fcfs/None", "fair/host", "fair/peer"}
    assert all(len(v) == 3 for v in result["requests"].values())


@pytest.mark.parametrize("deltas, path", [((2, 0, 0), "batched"), ((0, 3, 0), "kernel"),
                                          ((0, 0, 1), "per-copy fallback"),
                                          ((1, 1, 0), "mixed"), ((0, 0, 0), "none")])
def test_copy_path_names_the_submissions_a_row_used(deltas, path) -> None:
    from aqua_offload.bench.tiers import copy_path

    keys = ("batched_submissions", "batch_kernels", "batch_fallbacks")
    before = dict(zip(keys, (5, 7, 9)))
    after = {k: v + d for (k, v), d in zip(before.items(), deltas)}
    assert copy_path(before, after) == path


def test_ctrl_c_while_the_remote_lender_starts_ends_the_lender(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A KeyboardInterrupt while waiting for the child lender's ready file left the child
    # serving after the benchmark ended (only a timeout or a dead child killed it).
    import subprocess
    import types

    from aqua_offload.bench import remote as bench_remote

    started: list[subprocess.Popen] = []

    class Popen(subprocess.Popen):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt  # Ctrl-C, sent to this process only (kill -INT PID)

    monkeypatch.setattr(bench_remote.subprocess, "Popen", Popen)
    monkeypatch.setattr(bench_remote, "time", types.SimpleNamespace(
        monotonic=time.monotonic, sleep=interrupt))
    try:
        with pytest.raises(KeyboardInterrupt):
            bench_remote._start_lender(64 << 20, 64 << 20, "0" * 64, None, tmp_path)
        assert len(started) == 1
        assert started[0].poll() is not None, "the lender outlived the interrupted benchmark"
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

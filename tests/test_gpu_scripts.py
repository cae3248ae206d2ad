"""The GPU session's tools work before a GPU session needs them: device time is short (a broken
script wastes a whole run), so `scripts/gpu_check.sh` is dry-run here and
`scripts/gpu_profile.py` runs its emulation half."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["environment", "build", "cuda_backend", "nixl", "pytest_cuda", "smoke", "pytest_kernel",
          "profile", "bench_copy", "bench_tiers", "bench_tiers_kernel", "bench_hf_long",
          "bench_hf", "bench_burst", "memcheck"]


def _env(**extra: str) -> dict[str, str]:
    """This process's environment (the aqua_offload it imports, installed or on PYTHONPATH)."""
    return {**os.environ, **extra}


def test_gpu_check_parses_and_a_dry_run_lists_every_stage(tmp_path):
    script = ROOT / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                          env=_env(OUT=str(out), PYTHON=sys.executable, GPU_CHECK_DRY_RUN="1",
                                   GPU_CHECK_SKIP="bench_hf"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    rows = {line.split()[0]: line.split()[1] for line in summary.splitlines()[2:]
            if line.split() and line.split()[0] in STAGES}
    assert set(rows) == set(STAGES), summary
    assert rows["bench_hf"] == "SKIP" and "GPU_CHECK_SKIP" in summary
    assert "RESULT: DRY RUN" in summary
    assert "AQUA_TEST_FAILLOG" in proc.stdout  # the suite logs failures as they happen


def test_gpu_profile_runs_its_emulation_half(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_profile.py"), "--out",
                           str(tmp_path), "--calls", "20", "--top", "5"],
                          capture_output=True, text=True, timeout=180, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "profile.json").read_text())
    cases = {"snapshot_4k", "release_4k", "snapshot_64x64k", "release_64x64k", "core_4k",
             "core_64x64k"}
    assert {k.split("/")[1] for k in result["us_per_call"] if k.startswith("emulation/")} == cases
    assert all(v > 0 for v in result["us_per_call"].values())
    copies = result["copies_us"]["emulation"]  # the batched raw copies against one by one
    assert {k.split()[0] for k in copies} == {"raw_copy_many", "raw_copy", "torch"}
    assert len(copies) == 7 and all(v > 0 for v in copies.values())
    text = (tmp_path / "profile.txt").read_text()
    assert all(f"emulation {c}" in text for c in cases) and "tottime" in text

"""The GPU session's tools work before a GPU session needs them: device time is short (a broken
script wastes a whole run), so `scripts/gpu_check.sh` is dry-run here and
`scripts/gpu_profile.py` runs its emulation half."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _fake_python(tmp_path: Path, kernels_build_fails: bool, plain_build_fails: bool,
                 kernels_build_killed: bool = False) -> Path:
    """An interpreter whose ``-m pip install`` fails or passes by the build's kernel setting
    (logging each call), and which is this Python for everything else. With
    ``kernels_build_killed`` the kernels' build is killed by SIGKILL at once (as by the OOM
    killer: status 137 long before the stage's time limit)."""
    fake = tmp_path / "python"
    killed = int(kernels_build_killed)
    fake.write_text(f"""#!/usr/bin/env bash
if [[ "$1 $2 $3" == "-m pip install" ]]; then
  echo "$*" >> {tmp_path / 'pip_calls.txt'}
  [[ {killed} == 1 && "$*" == *"AQUA_CUDA_KERNELS=ON"* ]] && kill -KILL $$
  [[ "$*" == *"AQUA_CUDA_KERNELS=ON"* ]] && exit {int(kernels_build_fails)}
  [[ "$*" == *"AQUA_CUDA_KERNELS=OFF"* ]] && exit {int(plain_build_fails)}
  exit 3
fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("plain_build_fails", [False, True])
def test_gpu_check_retries_a_failed_build_without_the_copy_kernel(tmp_path, plain_build_fails):
    """enable_language(CUDA) or the kernel's compile failing on the GPU image must not end
    the session: the build is retried once without the kernels, in a directory of its own;
    only when that fails too does the check stop."""
    out = tmp_path / "out"
    skip = " ".join(s for s in STAGES if s != "build")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True,
                          text=True, timeout=60,
                          env=_env(OUT=str(out), GPU_CHECK_SKIP=skip,
                                   PYTHON=str(_fake_python(tmp_path, True, plain_build_fails))))
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the failed build is reported
    calls = (tmp_path / "pip_calls.txt").read_text().splitlines()
    assert len(calls) == 2 and "AQUA_CUDA_KERNELS=ON" in calls[0]
    assert "AQUA_CUDA_KERNELS=OFF" in calls[1] and "-Cbuild-dir=build/no_kernels" in calls[1]
    rows = {line.split()[0]: line.split()[1] for line in
            (out / "summary.txt").read_text().splitlines()[2:] if line.split()}
    assert rows["build"] == "FAIL"
    assert rows["build_nokernel"] == ("FAIL" if plain_build_fails else "PASS")
    if plain_build_fails:
        assert rows["ABORTED"] == "after" and "cuda_backend" not in rows
    else:
        assert rows["cuda_backend"] == "SKIP" and rows["RESULT:"] == "FAIL"


def test_gpu_check_retries_a_build_killed_before_its_time_limit(tmp_path):
    """A build killed by a signal long before its limit (status 137: the OOM killer, nvcc's
    memory) failed; it did not run out of time. stage() records it as FAIL, and it is retried
    without the copy kernel like any other failure, not aborted as "ran out of time"."""
    out = tmp_path / "out"
    skip = " ".join(s for s in STAGES if s != "build")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True,
                          text=True, timeout=60,
                          env=_env(OUT=str(out), GPU_CHECK_SKIP=skip,
                                   PYTHON=str(_fake_python(tmp_path, True, False,
                                                           kernels_build_killed=True))))
    summary = (out / "summary.txt").read_text()
    calls = (tmp_path / "pip_calls.txt").read_text().splitlines()
    assert len(calls) == 2 and "AQUA_CUDA_KERNELS=OFF" in calls[1], summary
    rows = {line.split()[0]: line.split()[1] for line in summary.splitlines()[2:] if line.split()}
    assert rows["build"] == "FAIL" and "rc=137" in summary, summary
    assert rows["build_nokernel"] == "PASS" and "ABORTED" not in rows, summary
    assert "ran out of time" not in proc.stdout + summary

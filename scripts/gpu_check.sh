#!/usr/bin/env bash
# One command for a GPU machine: build and install aqua_offload, run the GPU tests and the full
# suite, benchmark the copies, and (when available) run the GPU tests under compute-sanitizer.
# Logs and results go to $OUT (default ./gpu_out): one *.log per step, and bench_*.json.
# A failing step is reported and the later steps still run (a GPU session is precious); the
# script exits non-zero if any step failed. The install step must succeed.
#
#   scripts/gpu_check.sh                 # from anywhere; torch with CUDA already installed
#   OUT=/tmp/run1 PYTHON=python3 scripts/gpu_check.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="$(command -v "${PYTHON:-python}")"  # absolute: some steps run from /
failed=()

# step NAME LOG CMD...: run CMD, tee its output into $OUT/LOG, remember a failure.
step() {
  local name="$1" log="$2"
  shift 2
  printf '\n=== %s ===\n' "$name"
  if ! "$@" 2>&1 | tee "$OUT/$log"; then
    echo "*** FAILED: $name (see $OUT/$log)"
    failed+=("$name")
  fi
}

echo "aqua_offload GPU check; logs in $OUT"

printf '\n=== install (needs torch, pybind11, scikit-build-core and a CUDA toolkit) ===\n'
"$PYTHON" -m pip install --no-build-isolation --no-deps -v . 2>&1 | tee "$OUT/install.log"

# From / so that the installed package is imported, never the checkout's src/.
step "environment" env.log bash -c \
  "nvidia-smi; nvidia-smi topo -m || true; nvcc --version || true; cd / && '$PYTHON' -m aqua_offload info --json '$OUT/info.json'"
step "aqua_offload sees a GPU" gpu_visible.log bash -c \
  "cd / && '$PYTHON' -c 'import aqua_offload as aq; b = aq.info()[\"backend\"]; print(\"backend:\", b); assert b == \"cuda\", \"no usable GPU: the cuda tests would skip\"'"
step "GPU tests (pytest -m cuda)" test_cuda.log "$PYTHON" -m pytest -m cuda -v
step "full test suite" test_all.log "$PYTHON" -m pytest -q
step "copy benchmark" bench_copy.log bash -c \
  "cd / && '$PYTHON' -m aqua_offload bench copy --backend cuda --no-progress --json '$OUT/bench_copy.json' --plot '$OUT/bench_copy.png'"
step "tiers benchmark" bench_tiers.log bash -c \
  "cd / && '$PYTHON' -m aqua_offload bench tiers --backend cuda --json '$OUT/bench_tiers.json' --plot '$OUT/bench_tiers.png'"
step "hf benchmark" bench_hf.log bash -c \
  "cd / && '$PYTHON' -m aqua_offload bench hf --backend cuda --no-progress --json '$OUT/bench_hf.json' --plot '$OUT/bench_hf.png'"
step "burst benchmark" bench_burst.log bash -c \
  "cd / && '$PYTHON' -m aqua_offload bench burst --backend cuda --no-progress --json '$OUT/bench_burst.json' --plot '$OUT/bench_burst.png'"

if command -v compute-sanitizer >/dev/null 2>&1; then
  step "compute-sanitizer memcheck (GPU tests)" sanitizer.log \
    compute-sanitizer --tool memcheck --error-exitcode 1 "$PYTHON" -m pytest -m cuda -x -q
else
  echo "compute-sanitizer not found: memcheck skipped" | tee "$OUT/sanitizer.log"
fi

printf '\n=== summary ===\n'
if ((${#failed[@]})); then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "all checks passed; logs and bench_*.json in $OUT"

#!/usr/bin/env bash
# One-shot check on a rented GPU machine: build and install aqua_offload with the CUDA backend,
# run the GPU tests, the smoke checks (scripts/gpu_smoke.py) and quick benchmarks, then, while
# time is left, the HF benchmarks and compute-sanitizer. The session is short (15 minutes with
# machine start), so every stage runs under `timeout` and the whole script ends by HARD_S.
#
#   OUT=/path/to/out bash scripts/gpu_check.sh     # from anywhere; $OUT is what comes back
#
# In $OUT: <stage>.log per stage, junit_cuda.xml, pytest_failures.txt (each failure as it
# happens), info.json, smoke.json, profile.{json,txt}, bench_*.json (bench_tiers_kernel.json:
# with the copy kernel), and summary.txt
# (PASS/FAIL/SKIP/TIMEOUT and seconds per stage), rewritten as each stage starts and ends so
# that a run killed midway still says how far it got. The device tool brings back only a few
# files and a session has 15 minutes of device time, machine starts included (~40 s each): the
# call to make (timeout_s=570, carry [".wheels"]) is
#   PYTHON=python3 BUDGET_S=480 HARD_S=540 OUT=/tmp/o bash scripts/gpu_check.sh; rc=$?; \
#     tar czf $OUT/gpu.tgz -C /tmp/o .; exit $rc
# which leaves time for a second, shorter run (GPU_CHECK_SKIP for the stages already done).
# Exit status: 0 if no stage failed or timed out, else 1.
#
# Environment:
#   PYTHON     interpreter (default: python); JOBS: build parallelism (default: nproc)
#   BUDGET_S   seconds from the start after which the optional stages no longer start (420)
#   HARD_S     no stage runs past this many seconds from the start (450)
#   BUILD_DIR  scikit-build-core build directory (default: the pyproject's, build/{wheel_tag})
# The device image has no NIXL and reaches no registry: a nixl_cu13 wheel for its Python in
# $ROOT/.wheels (git-ignored; `pip download --python-version 3.12 --only-binary=:all: --no-deps
# nixl-cu13==1.5.1 -d .wheels`, 56 MiB, carried with the run) is installed so that the remote
# tier's GPU test (tests/test_remote_cuda.py: a lender of GPU memory) runs; without one it skips.
# For testing this script on a machine without a GPU:
#   GPU_CHECK_SKIP_INSTALL=1  use the aqua_offload already installed for $PYTHON
#   GPU_CHECK_KEEP_GOING=1    carry on when the CUDA backend is missing (later stages fail)
#   GPU_CHECK_DRY_RUN=1       print each stage's command instead of running it
#   GPU_CHECK_SKIP="a b"      skip these stages (e.g. benchmarks an earlier run already gave)
set -uo pipefail  # no -e: a failed stage is recorded and the next one still runs

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
PYTHON="$(command -v "${PYTHON:-python}")" || { echo "gpu_check: no python found" >&2; exit 1; }
# (absolute: several stages run from /)
BUDGET_S="${BUDGET_S:-420}" HARD_S="${HARD_S:-450}" JOBS="${JOBS:-$(nproc)}"
export ROOT OUT PYTHON JOBS BUILD_DIR="${BUILD_DIR:-}"
SUMMARY="$OUT/summary.txt"
STARTED="$(date -u +%FT%TZ)"
ROWS=()      # finished stages, one summary line each
FAILED=0
CHILD=""     # pid of the stage's `timeout`, for the signal trap

row() { printf '%-14s %-8s %5s  %s' "$1" "$2" "$3" "${4:0:110}"; }

write_summary() {  # $1: an extra last line (the stage running now, or the verdict)
  { echo "# aqua_offload scripts/gpu_check.sh, started $STARTED on $(hostname)," \
      "BUDGET_S=$BUDGET_S HARD_S=$HARD_S; logs: <stage>.log"
    row STAGE STATUS SECONDS NOTE; echo
    if ((${#ROWS[@]})); then printf '%s\n' "${ROWS[@]}"; fi
    if [[ -n "${1:-}" ]]; then echo "$1"; fi
  } >"$SUMMARY.tmp" && mv -f "$SUMMARY.tmp" "$SUMMARY"  # never half a file
}

record() {  # NAME STATUS SECONDS NOTE
  ROWS+=("$(row "$@")")
  [[ "$2" == FAIL || "$2" == TIMEOUT ]] && FAILED=1
  write_summary
  printf '%s\n' "${ROWS[-1]}"
}

# The session may end this script with SIGTERM: say so in the summary and stop the stage.
on_signal() {
  [[ -n "$CHILD" ]] && kill -TERM "$CHILD" 2>/dev/null  # timeout passes it to its command
  write_summary "$(row "${STAGE:-?}" KILLED "" "script got a signal at ${SECONDS}s")"
  exit 143
}
trap on_signal TERM INT HUP

# stage NAME LIMIT_S COMMAND: run COMMAND with bash -c under `timeout`, output in $OUT/NAME.log.
# LIMIT_S is cut to what is left of HARD_S; returns the command's status.
stage() {
  local name="$1" limit="$2" cmd="$3" log="$OUT/$1.log" left=$((HARD_S - SECONDS - 12))
  STAGE="$name"
  if ((left < 15)); then record "$name" SKIP 0 "no time left (HARD_S=$HARD_S)"; return 0; fi
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    record "$name" SKIP 0 "GPU_CHECK_SKIP"; return 0; fi
  ((limit > left)) && limit=$left
  if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]]; then
    printf '[dry run] %s (timeout %ss):\n%s\n' "$name" "$limit" "$cmd"
    record "$name" SKIP 0 "dry run"; return 0
  fi
  write_summary "$(row "$name" RUNNING "" "since ${SECONDS}s, timeout ${limit}s")"
  printf '\n=== %s (timeout %ss, at %ss) ===\n' "$name" "$limit" "$SECONDS"
  local t0=$SECONDS rc status
  # In the background so that the trap runs at once; --kill-after for a command ignoring TERM.
  timeout --kill-after=10 "$limit" bash -c "$cmd" >"$log" 2>&1 </dev/null &
  CHILD=$!
  wait "$CHILD"; rc=$?
  CHILD=""
  local secs=$((SECONDS - t0))
  if ((rc == 0)); then status=PASS
  elif ((rc == 124 || (rc == 137 && secs >= limit))); then status=TIMEOUT  # 137 alone: OOM kill
  else status=FAIL; fi
  LAST_STATUS=$status  # (what the caller of a stage that returned non-zero branches on)
  local last; last="$(grep -v '^[[:space:]]*$' "$log" | tail -n 1)"
  [[ $status == TIMEOUT ]] && last="killed at its ${limit}s limit; last output: $last"
  record "$name" "$status" "$secs" "rc=$rc: $last"
  if [[ $status != PASS ]]; then tail -n 25 "$log" | sed 's/^/    | /'; fi
  return "$rc"
}

# abort WHY: the remaining stages are pointless; leave the reason in the summary.
abort() {
  [[ "${GPU_CHECK_KEEP_GOING:-0}" == 1 ]] && { echo "GPU_CHECK_KEEP_GOING=1: going on"; return; }
  write_summary "ABORTED after ${SECONDS}s: $1"
  printf '\n*** ABORTED: %s\n' "$1"; cat "$SUMMARY"; exit 1
}

# optional NAME LIMIT_S COMMAND: a stage that starts only while BUDGET_S has a minute left.
optional() {
  local left=$((BUDGET_S - SECONDS))
  if ((left < 60)); then record "$1" SKIP 0 "budget: ${left}s of BUDGET_S=$BUDGET_S left"; return; fi
  stage "$1" $(($2 < left ? $2 : left)) "$3"
}

echo "aqua_offload GPU check: python $PYTHON, results in $OUT"
write_summary

# 1. Environment: what machine produced these numbers.
stage environment 30 '
  rc=0
  nvidia-smi || rc=1
  nvidia-smi topo -m || echo "(no topology matrix)"
  nvcc --version || rc=1
  "$PYTHON" -m pip list 2>/dev/null | grep -iE "^(torch|numpy|cupy|transformers|pybind11|scikit.build.core|pytest|hypothesis) "
  echo "cpus $(nproc)"; free -g | head -2
  "$PYTHON" -c "import sys, torch
print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda,
      \"gpus\", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])" || rc=1
  exit $rc'

# 2. Build and install. A plain (not editable) install: pytest, the smoke script and the
# benchmarks then all import the same installed files, never src/ (where a dev build may have
# left an _core*.so for another Python). Only sm_90 kernels: H100/H200, and a faster build.
# The kernels are required (a build without them fails here, loudly); the copy kernel is the
# only CUDA-compiled part (enable_language(CUDA): nvcc, its host compiler and CMake must agree,
# which no GPU run has tried yet), so a failed build is retried once without it, in a build
# directory of its own, rather than end the session (its GPU tests then skip, saying why).
if [[ "${GPU_CHECK_SKIP_INSTALL:-0}" == 1 ]]; then
  record build SKIP 0 "GPU_CHECK_SKIP_INSTALL=1: testing what is installed"
else
  export KERNELS=ON KDIR="${BUILD_DIR:-}"
  BUILD='
    cd "$ROOT" && AQUA_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" PIP_NO_INDEX=1 \
      PIP_DISABLE_PIP_VERSION_CHECK=1 "$PYTHON" -m pip install --no-build-isolation --no-deps -v \
      -Ccmake.define.AQUA_CUDA_ARCHITECTURES=90 -Ccmake.define.AQUA_CUDA_KERNELS="$KERNELS" \
      ${KDIR:+-Cbuild-dir="$KDIR"} .'
  stage build 240 "$BUILD"; rc=$?
  # failed, not out of time (stage's verdict: 137 before the limit is a kill, e.g. OOM): again
  if ((rc != 0)) && [[ $LAST_STATUS == FAIL ]]; then
    KERNELS=OFF KDIR="${BUILD_DIR:-build}/no_kernels"
    stage build_nokernel 180 "$BUILD" \
      || abort "the build/install failed, with and without the copy kernel (build*.log)"
  elif ((rc != 0)); then
    abort "the build/install ran out of time (build.log); nothing else can run"
  fi
fi
# From / so that the installed package is imported; without the CUDA backend every cuda test
# would only skip, so stop here rather than report a green run that tested nothing.
stage cuda_backend 45 '
  cd / && "$PYTHON" -m aqua_offload info --json "$OUT/info.json"
  "$PYTHON" -c "import aqua_offload as aq, aqua_offload._core as c
print(\"aqua_offload imported from\", aq.__file__, \"; _core:\", c.__file__)
backend = aq.info()[\"backend\"]
print(\"cuda_compiled:\", c.cuda_compiled(), \"backend:\", backend)
assert c.cuda_compiled(), \"CUDA backend MISSING: the installed aqua_offload was built without it\"
assert backend == \"cuda\", f\"backend is {backend!r}, not cuda: the CUDA backend sees no usable GPU\"
was = c.copy_kernel(); print(\"copy kernel built:\", c.copy_kernel(True)); c.copy_kernel(was)
print(\"OK: CUDA backend in\", aq.__file__)"' \
  || abort "the installed aqua_offload has no usable CUDA backend (cuda_backend.log)"

# NIXL for the remote GPU test, from a carried wheel (see the header); optional.
WHEEL="$(ls "$ROOT"/.wheels/nixl_cu13-*-cp"$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"-*.whl 2>/dev/null | head -n 1)"
if [[ -z "$WHEEL" ]]; then
  record nixl SKIP 0 "no nixl_cu13 wheel for this Python in .wheels: the remote GPU test skips"
else
  export WHEEL
  stage nixl 60 'PIP_NO_INDEX=1 "$PYTHON" -m pip install --no-deps -q "$WHEEL" && "$PYTHON" -c "
import aqua_offload.remote as r; why = r.nixl_unavailable(); print(why or \"NIXL loads\")
raise SystemExit(why is not None)"'
fi

# 3. GPU tests. Only skips (e.g. a conftest that sees no GPU) would be a silent pass: fail them.
# faulthandler_timeout: a test stuck for a minute prints every thread's stack into the log.
stage pytest_cuda 240 '
  cd "$ROOT" && AQUA_TEST_FAILLOG="$OUT/pytest_failures.txt" "$PYTHON" -m pytest -m cuda --maxfail=10 -q -p no:cacheprovider --durations=10 \
    --ignore=tests/test_copy_kernel.py \
    -o faulthandler_timeout=60 --junitxml="$OUT/junit_cuda.xml" && "$PYTHON" -c "import sys, xml.etree.ElementTree as E
s = E.parse(sys.argv[1]).getroot(); s = s if s.tag == \"testsuite\" else s[0]
ran = int(s.get(\"tests\")) - int(s.get(\"skipped\"))
print(ran, \"cuda tests ran,\", s.get(\"skipped\"), \"skipped\"); sys.exit(ran == 0)" "$OUT/junit_cuda.xml"'

# 4. Races and leaks the tests do not reach (exit 2: no usable GPU).
stage smoke 75 'cd "$ROOT" && "$PYTHON" scripts/gpu_smoke.py --out "$OUT/smoke.json"'

# The opt-in copy kernel's GPU tests, in a process of their own: a wrong pointer in a kernel is a
# sticky fault that ends the CUDA context, which must not take the suite above with it.
stage pytest_kernel 60 'cd "$ROOT" && AQUA_TEST_FAILLOG="$OUT/pytest_failures_kernel.txt" \
  "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider tests/test_copy_kernel.py'

# Where the host time of small calls goes, CUDA against emulation (scripts/gpu_profile.py).
stage profile 60 'cd "$ROOT" && "$PYTHON" scripts/gpu_profile.py --out "$OUT"'

# 5. Quick benchmarks, from / (the installed package). JSON only: plots can be made later.
# (--quick's sizes, and 256 MiB: the size of the same-device peer target, DESIGN.md section 9)
stage bench_copy 90 'cd / && "$PYTHON" -m aqua_offload bench copy --backend cuda --quick \
  --sizes 4KiB 256KiB 4MiB 64MiB 256MiB --no-progress --json "$OUT/bench_copy.json"'
stage bench_tiers 90 'cd / && "$PYTHON" -m aqua_offload bench tiers --backend cuda --quick \
  --json "$OUT/bench_tiers.json"'
# The same with the copy kernel for batches of small pieces (opt-in until measured here:
# Note [Copy kernel] in cpp/src/cuda/copy_kernel.hpp); its rows say copy_path "kernel".
stage bench_tiers_kernel 90 'cd / && AQUA_COPY_KERNEL=1 "$PYTHON" -m aqua_offload bench tiers \
  --backend cuda --quick --json "$OUT/bench_tiers_kernel.json"'

# 6. While the budget lasts. memcheck sees torch's allocations only without the caching
# allocator; cases b-d in --quick mode, as everything under memcheck runs far slower.
# Where offloading is bound by the link (8 x 2048 tokens of KV cache, ~256 MiB, moved every
# step), not by per-call host time as in --quick: the regime of the HF target.
optional bench_hf_long 120 'cd / && "$PYTHON" -m aqua_offload bench hf --backend cuda \
  --batch 8 --prompt-tokens 2048 --new-tokens 32 --samples 3 --no-progress \
  --json "$OUT/bench_hf_long.json"'
optional bench_hf 90 'cd / && "$PYTHON" -m aqua_offload bench hf --backend cuda --quick \
  --no-progress --json "$OUT/bench_hf.json"'
optional bench_burst 90 'cd / && "$PYTHON" -m aqua_offload bench burst --backend cuda --quick \
  --no-progress --json "$OUT/bench_burst.json"'
SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer \
  "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")/compute-sanitizer" \
  2>/dev/null | head -n 1)"
if [[ -z "$SANITIZER" ]]; then
  record memcheck SKIP 0 "compute-sanitizer not found"
else
  export SANITIZER
  optional memcheck 150 'cd "$ROOT" && PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" \
    --tool memcheck --error-exitcode 1 --target-processes application-only \
    "$PYTHON" scripts/gpu_smoke.py --quick --cases bcd --out "$OUT/smoke_memcheck.json"'
fi

STAGE=""
if [[ "${GPU_CHECK_DRY_RUN:-0}" == 1 ]]; then VERDICT="DRY RUN"; elif ((FAILED)); then VERDICT=FAIL
else VERDICT=PASS; fi
write_summary "RESULT: $VERDICT after ${SECONDS}s"
printf '\n'; cat "$SUMMARY"
exit "$FAILED"

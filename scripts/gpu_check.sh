#!/usr/bin/env bash
# One call on the GPU machine (no network; its own python3 with a CUDA torch): build the CUDA
# extension, run the GPU tests, time the headline benchmarks, print a compact table.
#
#   OUT=/some/dir bash scripts/gpu_check.sh        # OUT defaults to ./gpu_check_out
#   ELVA_GPU_BENCH="similarity_topk rank_statistics" bash scripts/gpu_check.sh   # only these benchmarks
#
# Every step runs under `timeout` and logs to $OUT; a failing step is recorded, not fatal, so
# one broken piece still leaves the others' figures. The limits below add up to under 10 minutes.
# The script exits 1 when any step failed.
set -euo pipefail

# A relative OUT is taken from the caller's directory, before moving to the repository root.
OUT=$(realpath -m "${OUT:-./gpu_check_out}")
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
START_UTC=$(date -u +%Y-%m-%dT%H:%M:%S)

# Seconds per step, under the device tool's 600 s per call: environment 10, build 90, C++/CUDA ctest 40, GPU
# tests 130, benchmarks 240 (headline ops first; the retrieval ops time 5-7 providers per case, Triton's first calls
# compile, and the threshold pass's first call per shape autotunes its 3 tile configs), trainer throughput 35 + 45.
BENCHMARKS=(
  "similarity_topk 110"
  "rank_statistics 40"
  "mine_hard_negatives 25"
  "infonce_loss 25"
  "elva_rewards 25"
  "l2_normalize 15"
)
SELECTED=${ELVA_GPU_BENCH:-}

STEPS=()
CODES=()

# step NAME SECONDS LOG COMMAND...: run COMMAND under timeout with its output in LOG; keep its exit code.
step() {
  local name=$1 limit=$2 log=$3 rc=0
  shift 3
  echo "== $name (limit ${limit}s) -> $log"
  timeout --kill-after=5 "$limit" "$@" >"$log" 2>&1 || rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "   timed out after ${limit}s"
  fi
  echo "   exit $rc"
  STEPS+=("$name")
  CODES+=("$rc")
}

step environment 10 "$OUT/environment.log" bash -c \
  "nvidia-smi -L; $PYTHON -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name())'; $PYTHON -c 'import triton; print(\"triton\", triton.__version__)'"

# --no-index: there is no network, and --no-deps means nothing needs resolving anyway.
step build 90 "$OUT/build.log" \
  "$PYTHON" -m pip install -v --no-index --no-build-isolation --no-deps -e .

# The torch-free native core and its C++ tests, the CUDA ones included (they skip only where no GPU is found).
step ctest 40 "$OUT/ctest.log" bash -c \
  "cmake -S . -B build/cmake-gpu -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a >/dev/null \
   && cmake --build build/cmake-gpu --parallel >/dev/null && ctest --test-dir build/cmake-gpu --output-on-failure"
tail -n 3 "$OUT/ctest.log" | sed 's/^/   /' || true

step "pytest -m gpu" 130 "$OUT/pytest_gpu.log" \
  "$PYTHON" -m pytest -m gpu tests -v --tb=short -p no:cacheprovider -rf --durations=12

for entry in "${BENCHMARKS[@]}"; do
  read -r op limit <<<"$entry"
  if [ -n "$SELECTED" ] && [[ " $SELECTED " != *" $op "* ]]; then
    continue
  fi
  step "bench $op" "$limit" "$OUT/bench_$op.log" \
    "$PYTHON" benchmarks/compare.py --op "$op" --device cuda --preset gpu --seconds 0.5 --out "$OUT"
done

# Stage-2 training throughput of a random Qwen2-VL-2B (needs peft on the machine: carry its wheel if missing).
step "elva bench train" 35 "$OUT/bench_train.log" \
  "$PYTHON" -m elva.cli bench train --size 2b --batch-size 16 --steps 5
tail -n 1 "$OUT/bench_train.log" | sed 's/^/   /' || true
# Stage-3 GRPO throughput of the same model: 8 queries x 8 rollouts, 101 candidates, <= 32 summary tokens.
step "elva bench rl" 45 "$OUT/bench_rl.log" \
  "$PYTHON" -m elva.cli bench rl --size 2b --queries 8 --group-size 8 --candidates 101 --max-new-tokens 32 --steps 3
tail -n 1 "$OUT/bench_rl.log" | sed 's/^/   /' || true

echo
echo "== benchmark rows of this run ($OUT/compare.csv; full tables in $OUT/*.md)"
if [ -f "$OUT/compare.csv" ]; then
  "$PYTHON" - "$OUT/compare.csv" "$START_UTC" <<'EOF'
import csv, sys

path, since = sys.argv[1], sys.argv[2]
rows = [r for r in csv.DictReader(open(path)) if r["utc"] >= since]
print(f"{'op':<20} {'shape':<40} {'provider':<30} {'ms':>9} {'ratio':>7} {'MiB':>8}  note")
for r in rows:
    ms = f"{float(r['median_ms']):.3f}" if r["median_ms"] else "-"
    ratio = f"{float(r['ratio']):.2f}" if r["ratio"] else "-"
    mib = f"{float(r['peak_extra_MiB']):.0f}" if r["peak_extra_MiB"] else "-"
    print(f"{r['op']:<20} {r['shape']:<40} {r['provider']:<30} {ms:>9} {ratio:>7} {mib:>8}  {r['note'][:80]}")
EOF
else
  echo "(no benchmark rows were written)"
fi

echo
echo "== exit codes (124/137: timed out; pytest 1: failures, 5: no test marked gpu)"
failed=0
for i in "${!STEPS[@]}"; do
  printf '%-28s %s\n' "${STEPS[$i]}" "${CODES[$i]}"
  [ "${CODES[$i]}" -eq 0 ] || failed=1
done
tail -n 3 "$OUT/pytest_gpu.log" 2>/dev/null | sed 's/^/pytest: /' || true
exit "$failed"

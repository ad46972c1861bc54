#!/usr/bin/env bash
# The test command: installs what it needs into .venv, then runs the test suite.
#   scripts/test.sh               everything: ops, sm_90 compile checks, C++ tests, trainer, integrations
#   scripts/test.sh --fast        the op tests alone (tests/ops), for quick iteration
#   scripts/test.sh -k topk       extra arguments go to pytest
# Tests run in parallel on every core (pytest-xdist; ELVA_TEST_WORKERS=N to choose, 0 for one process), with
# one OpenMP thread per worker so that the workers do not fight over the cores; the 15 slowest are listed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
VENV=${ELVA_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"

paths=(tests)
if [ "${1:-}" = "--fast" ]; then
  shift
  paths=(tests/ops)
fi
cores=$(python -c "import os; print(len(os.sched_getaffinity(0)))")
workers=${ELVA_TEST_WORKERS:-$cores}
parallel=()
if [ "$workers" -gt 1 ]; then
  # loadscope keeps a module on one worker, so its module-scoped fixtures (a trained model, the sm_90 report)
  # are built once.
  parallel=(-n "$workers" --dist loadscope)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / workers > 0 ? cores / workers : 1 ))}
fi
python -m pytest "${paths[@]}" -q -p no:cacheprovider "${parallel[@]}" --durations=15 "$@"

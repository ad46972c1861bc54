#!/usr/bin/env bash
# The test command: installs what it needs into .venv, then runs the test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k similarity_topk).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
VENV=${ELVA_VENV:-.venv}
export PATH="$PWD/$VENV/bin:$PATH"
python -m pytest tests -q -p no:cacheprovider "$@"

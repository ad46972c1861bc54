#!/usr/bin/env bash
# The main job: installs what it needs into .venv, then runs `elva demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
VENV=${ELVA_VENV:-.venv}
"$VENV/bin/elva" demo "$@"

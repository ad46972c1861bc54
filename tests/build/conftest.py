"""tests/build: what CI proves about GPU code without a GPU (sm_90 compiles, static speed proxies, C++ tests)."""
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
# benchmarks/static_report.py is a script; its parsers are imported as a plain module, as benchmarks/conftest.py
# imports compare.py.
sys.path.insert(0, str(BENCHMARKS))

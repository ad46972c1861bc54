"""pytest-benchmark cases over the providers of compare.py: ``python -m pytest benchmarks -q``.

A bench module names its op in ``OP``; each test taking a ``provider`` argument is parametrised
over that op's providers on compare.py's "smoke" preset (seconds on a CPU), on CUDA when torch
sees a GPU and on the CPU otherwise, and a refused backend is skipped with its reason. The normal
test run (tests/) does not collect this folder.
"""

import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest

# compare.py sits beside this file; import it as a plain module.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402

DEVICE = "cuda" if compare.torch.cuda.is_available() else "cpu"


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py too, unless the project's python_files already does."""
    patterns = parent.config.getini("python_files")
    if fnmatch(file_path.name, "bench_*.py") and not any(fnmatch(file_path.name, p) for p in patterns):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    if "provider" not in metafunc.fixturenames:
        return
    table = compare.provider_table(metafunc.module.OP, "smoke", DEVICE)
    metafunc.parametrize(
        "provider",
        [
            pytest.param(p, id=name, marks=[pytest.mark.skip(reason=p.reason)] if p.fn is None else [])
            for name, p in table
        ],
    )


def pytest_benchmark_update_machine_info(config, machine_info):
    """Store the same environment fields as compare.py's CSV rows with each saved run."""
    env = compare.environment(compare.torch.device(DEVICE))
    machine_info.update({key: env[key] for key in ("device", "torch", "triton", "git_sha")})

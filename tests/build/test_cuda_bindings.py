"""The torch bindings of the CUDA kernels compile with ELVA_WITH_CUDA on a machine without a GPU.

setup.py builds them only where torch has CUDA; here torch is the CPU wheel, so each binding that has a CUDA part is
checked by the C++ compiler alone (-fsyntax-only) against torch's headers and the CUDA toolkit's. The CPU wheel
lacks c10's generated cuda_cmake_macros.h, which only sets the shared-library export macro; a stand-in provides it.
"""
import concurrent.futures
import os
import re
import shutil
import subprocess
from pathlib import Path

import sysconfig

import pytest
import torch.utils.cpp_extension

REPO = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc")
BINDINGS = sorted(p for p in (REPO / "csrc" / "bindings").glob("*.cpp") if "ELVA_WITH_CUDA" in p.read_text())


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """Every binding's compile, run side by side: {path: CompletedProcess}."""
    command = ["c++", *flags(tmp_path_factory)]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        runs = {path: pool.submit(subprocess.run, [*command, str(path)], capture_output=True, text=True)
                for path in BINDINGS}
        return {path: run.result() for path, run in runs.items()}


def flags(tmp_path_factory) -> list[str]:
    if NVCC is None:
        pytest.fail("nvcc not found: CI has the CUDA compiler, so the CUDA bindings must be compiled here")
    stand_in = tmp_path_factory.mktemp("c10_cuda")
    macros = stand_in / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True)
    macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    # nvcc may be a wrapper script: ask it where the toolkit's headers are.
    dryrun = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", "/dev/null", "-o", "/dev/null"], capture_output=True,
                            text=True)
    cuda_include = re.search(r'INCLUDES="-I([^"]+)"', dryrun.stderr + dryrun.stdout).group(1).strip()
    system = [str(stand_in), *torch.utils.cpp_extension.include_paths(), cuda_include, sysconfig.get_paths()["include"]]
    return ["-std=c++20", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-DELVA_WITH_CUDA",
            *(f"-isystem{path}" for path in system), f"-I{REPO / 'csrc' / 'include'}",
            f"-I{REPO / 'csrc' / 'bindings'}"]


@pytest.mark.parametrize("binding", BINDINGS, ids=[p.name for p in BINDINGS])
def test_cuda_binding_compiles(compiled, binding):
    assert compiled[binding].returncode == 0, compiled[binding].stderr[-4000:]

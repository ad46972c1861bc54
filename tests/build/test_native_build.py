"""The torch-free native core builds with CMake, every .cu for sm_90a when nvcc is there, and its C++ tests pass.

The CUDA test programs are compiled and linked here; without a GPU they exit 77, which ctest reports as
skipped (scripts/gpu_check.sh runs them on a GPU machine). The build folder is build/cmake (ignored by git),
so a second run only rebuilds what changed.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "build" / "cmake"
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def cmake() -> str:
    found = shutil.which("cmake")
    if found is None:
        pytest.fail("cmake is not installed (scripts/setup_env.sh installs it when the system has none)")
    return found


@pytest.fixture(scope="module")
def build():
    configure = [cmake(), "-S", str(REPO), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release",
                 "-DCMAKE_CUDA_ARCHITECTURES=90a"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    if NVCC:
        configure.append(f"-DCMAKE_CUDA_COMPILER={NVCC}")
    if (BUILD / "CMakeCache.txt").exists() and ("Ninja" in (BUILD / "CMakeCache.txt").read_text()) != bool(
            shutil.which("ninja")):
        shutil.rmtree(BUILD)
    done = subprocess.run(configure, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run([cmake(), "--build", str(BUILD), "--parallel"], capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return BUILD


def test_every_cu_file_compiles_for_sm90a(build):
    if NVCC is None:
        pytest.fail("nvcc not found: CI has the CUDA compiler, so every .cu must be compiled here")
    objects = {p.name.split(".")[0] for p in build.rglob("*.cu.o")}
    sources = {p.stem for p in (REPO / "csrc" / "cuda").glob("*.cu")}
    assert sources and sources <= objects, f"not compiled: {sorted(sources - objects)}"
    flags = (build / "build.ninja").read_text() if (build / "build.ninja").exists() else ""
    if flags:
        assert "sm_90a" in flags


def test_ctest_passes_and_runs_every_cpu_test(build):
    done = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr
    programs = {p.stem for p in (REPO / "csrc" / "tests").glob("test_*.cpp")}
    passed = set(re.findall(r"Test\s+#\d+: (\S+) \.+\s+Passed", done.stdout))
    skipped = set(re.findall(r"Test\s+#\d+: (\S+) \.+\*+Skipped", done.stdout))
    cpu = {p for p in programs if not p.endswith("_cuda")}
    assert cpu <= passed, f"CPU tests that did not pass: {sorted(cpu - passed)}"
    cuda = programs - cpu
    if NVCC is not None:  # built and linked; they skip only for want of a GPU
        assert cuda <= passed | skipped, f"CUDA test programs not built: {sorted(cuda - passed - skipped)}"

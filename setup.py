"""Builds the package and its native extension ``elva_kernels._C``.

    pip install --no-build-isolation -e .

``--no-build-isolation`` builds against the torch already installed; an isolated build would fetch another
torch (a CUDA one of several GB) and produce a binary for it. The CPU kernels are always built; the CUDA
kernels when torch has CUDA and nvcc is found (pytorch/extension-cpp's gate). Environment:

    ELVA_FORCE_CUDA=1   build the CUDA kernels even when that check says no (a missing toolkit is then an error)
    ELVA_CUDA_ARCHS     compute capabilities to compile for: "90" (the default), "9.0", "80;90", "90a"
    DEBUG=1             -O0 -g (and -G for device code)
    MAX_JOBS            parallel compile jobs (ninja)

New ops need no edit here: every csrc/cpu/*.cpp, csrc/bindings/*.cpp and csrc/cuda/*.cu is compiled.
"""
import glob
import os
import re

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG") == "1"
WITH_CUDA = os.environ.get("ELVA_FORCE_CUDA") == "1" or (torch.version.cuda is not None and CUDA_HOME is not None)


def sources(pattern: str) -> list[str]:
    return sorted(glob.glob(pattern, root_dir=ROOT))


def cuda_arch_flags() -> list[str]:
    """-gencode per listed capability ("90" -> sm_90 machine code); torch then adds no arch list of its own."""
    archs = re.split(r"[;,\s]+", os.environ.get("ELVA_CUDA_ARCHS", "90").replace(".", "").strip())
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs if arch]


def native_extension():
    cxx_flags = ["-O0", "-g"] if DEBUG else ["-O3"]
    options = dict(
        sources=sources("csrc/cpu/*.cpp") + sources("csrc/bindings/*.cpp"),
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        define_macros=[("ELVA_DEBUG_BUILD", "1")] if DEBUG else [],
        extra_compile_args={"cxx": cxx_flags + ["-fopenmp"]},
        extra_link_args=["-fopenmp"] + (["-g"] if DEBUG else []),
        # _C uses the limited Python API only, so one binary serves every CPython >= 3.10 (it stays tied to
        # the torch it was built against; build_info() records which).
        py_limited_api=True,
    )
    if not WITH_CUDA:
        return CppExtension("elva_kernels._C", **options)
    options["sources"] += sources("csrc/cuda/*.cu")
    options["define_macros"].append(("ELVA_WITH_CUDA", "1"))
    options["extra_compile_args"]["nvcc"] = (["-O0", "-g", "-G"] if DEBUG else ["-O3"]) + cuda_arch_flags()
    return CUDAExtension("elva_kernels._C", **options)


setup(
    name="elva",
    version="0.1.0",
    description="Fused retrieval-ranking ops for PyTorch, and a trainer for ELVA ranking-driven multimodal retrieval",
    python_requires=">=3.10",
    packages=find_packages(include=["elva_kernels", "elva_kernels.*", "elva", "elva.*"]),
    # Any installed torch >= 2.6 satisfies this, so pip keeps it; a pin it missed would fetch a CUDA torch of GBs.
    install_requires=[
        "torch>=2.6", "numpy", "tqdm", "pyyaml", "pillow", "safetensors", "transformers>=5.17", "peft>=0.17",
    ],
    extras_require={
        "gpu": ["flash-attn"],
        "dev": [
            "pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "faiss-cpu", "ranx", "matplotlib", "triton",
            "ninja", "pybind11",
            "trl>=1.16", "sentence-transformers>=6",
        ],
    },
    entry_points={"console_scripts": ["elva = elva.cli:main"]},
    ext_modules=[native_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)

"""Loads the compiled extension ``elva_kernels._C`` if it is there, and keeps why not.

Native code is optional at import (pytorch/ao's pattern): a missing or mismatched
build becomes a refusal reason on the native backends, never an import error.
"""
from __future__ import annotations

import torch

import importlib.util

_BUILD_HINT = "build it with `pip install --no-build-isolation -e .`"

LOAD_ERROR: str | None = None
if importlib.util.find_spec("elva_kernels._C") is None:
    LOAD_ERROR = f"the native extension elva_kernels._C is not built; {_BUILD_HINT}"
else:
    try:
        from elva_kernels import _C  # noqa: F401  (loading registers the CPU/CUDA kernels)
    except ImportError as error:  # built for another torch or python
        LOAD_ERROR = f"the native extension failed to load ({error}); rebuild it: {_BUILD_HINT}"


# A fact of the build, constant for the process: torch.compile evaluates it once while tracing.
@torch.compiler.assume_constant_result
def has_kernel(qualname: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)


def build_info() -> dict:
    if LOAD_ERROR is not None:
        return {"loaded": False, "reason": LOAD_ERROR}
    return {"loaded": True, **_C.build_info()}

"""What the sm_90 compile checks need from a Triton kernel module: its launches, and what their code must show.

Each kernel module lists ``AOT_CASES``: one ``Case`` per configuration the op can launch (every dtype,
constexpr variant and autotune config), with every argument at a representative production size. The
checks (``benchmarks/static_report.py``, run by ``tests/build``) compile each case for sm_90 without a GPU,
giving each argument the specialisation Triton's JIT would infer from that value: a pointer 16-byte
aligned, an int that is a multiple of 16 divisible by 16, an int equal to 1 a constant. The generated
code is therefore the one production runs, not a generic variant.

``Expect`` states what the compiled code must show; a check that fails today for a tracked reason goes in
``known`` with that reason, so it is listed in the report, not hidden, and a fix shows up as an
unexpected pass.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

# Shared memory one CTA may use on sm_90 (227 KB).
SM90_SHARED_BYTES = 232448

CHECKS = ("spills", "shared", "tensor_cores", "mma_n", "cuda_core_dots", "async_copy", "tma", "epilogue",
          "int64_compares")


@dataclass(frozen=True)
class Expect:
    """What the compiled kernel must show; ``None`` or 0 leaves a property unchecked.

    tensor_cores: "HGMMA" (warpgroup MMA) or "HMMA" (mma.sync) in the main loop.
    min_mma_n: the smallest N of the HGMMA instruction shape (64x<N>x16).
    cuda_core_dots: whether a loop may run a matrix product on CUDA cores (FFMA, no MMA), as tl.dot in
        fp32 "ieee" does.
    async_copy: the main loop loads through cp.async (LDGSTS) or TMA (UTMALDG).
    tma: the main loop loads through TMA.
    max_epilogue_per_score: instructions per score on the shortest path through the tile loop outside the
        main loop (the epilogue when every rare branch is skipped).
    int64_compares: whether that path may hold 64-bit compares.
    known: check name (see ``CHECKS``) -> why it fails today.
    """

    tensor_cores: str | None = None
    min_mma_n: int = 0
    cuda_core_dots: bool = True
    async_copy: bool = False
    tma: bool = False
    max_spill_bytes: int = 0
    max_shared_bytes: int = SM90_SHARED_BYTES
    max_epilogue_per_score: float | None = None
    int64_compares: bool = True
    known: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.known) - set(CHECKS)
        if unknown:
            raise ValueError(f"known names checks that do not exist: {sorted(unknown)} (checks: {CHECKS})")
        if self.tensor_cores not in (None, "HGMMA", "HMMA"):
            raise ValueError(f"tensor_cores must be None, 'HGMMA' or 'HMMA'; got {self.tensor_cores!r}")


@dataclass(frozen=True)
class Case:
    """One launch configuration: ``args`` holds every kernel parameter by name (meta tensors for pointers,
    production-sized ints, constexpr values), as the launcher passes them."""

    kernel: object  # a JITFunction, or an Autotuner (each of its configs is compiled)
    label: str
    args: Mapping[str, object]
    expect: Expect
    num_warps: int = 4
    num_stages: int = 3


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A storage-free tensor standing for an argument: its dtype and a 16-byte-aligned address are all the
    compile needs."""
    return torch.empty(shape, dtype=dtype, device="meta")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

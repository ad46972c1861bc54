"""Triton kernel: rows L2-normalised in fp32.

One program per row; the row is read in BLOCK_D chunks twice (sum of squares, then scale),
so any d works with a fixed register budget.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from elva_kernels.triton import aot


@triton.jit
def l2_normalize_kernel(
    x_ptr, out_ptr,  # input rows (fp32/fp16/bf16) and fp32 output rows
    nonfinite_ptr,  # int32 flag set to 1 when a row holds NaN/Inf (the host raises after the launch)
    dim, stride_x, stride_out,  # row length and row strides, in elements
    eps,  # floor of the norm
    BLOCK_D: tl.constexpr,  #
):
    # Row offsets in int64: rows * stride may exceed 2**31 for large pools.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_out
    # ---- 1. sum of squares in fp32 (upcast right after the load: bf16 arithmetic is unsafe when interpreting)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    bad = tl.zeros([BLOCK_D], dtype=tl.int32)
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        x = tl.load(x_row + cols, mask=cols < dim, other=0.0).to(tl.float32)
        acc += x * x
        bad += ((x - x) != 0).to(tl.int32)  # x - x is NaN exactly when x is NaN or +-Inf
    tl.atomic_max(nonfinite_ptr, 1, mask=tl.sum(bad, axis=0) > 0)
    scale = 1.0 / tl.maximum(tl.sqrt(tl.sum(acc, axis=0)), eps)
    # ---- 2. scale and store
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = cols < dim
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_row + cols, x * scale, mask=mask)


def l2_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Launcher for ``elva::l2_normalize_triton``: x [n, d] with unit stride along d."""
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    nonfinite = torch.zeros(1, dtype=torch.int32, device=x.device)
    l2_normalize_kernel[(x.shape[0],)](x, out, nonfinite, x.shape[1], x.stride(0), out.stride(0), eps,
                                       BLOCK_D=_block_d(x.shape[1]))
    if nonfinite.item():  # the one host sync: nothing is returned on bad input
        raise ValueError("x must contain only finite values; found NaN/Inf entries")
    return out


def _block_d(dim: int) -> int:
    """1024 fp32 lanes per chunk keeps a row in registers up to d = 1024 and loops beyond."""
    return min(1024, triton.next_power_of_2(dim))


# A candidate pool of 1M rows of d = 1536, normalised once.
AOT_CASES = [
    aot.Case(l2_normalize_kernel, dtype,
             dict(x_ptr=aot.meta(1_000_000, 1536, dtype=element), out_ptr=aot.meta(1_000_000, 1536),
                  nonfinite_ptr=aot.meta(1, dtype=torch.int32), dim=1536, stride_x=1536, stride_out=1536, eps=1e-12,
                  BLOCK_D=_block_d(1536)),
             aot.Expect())
    for dtype, element in aot.DTYPES.items()
]

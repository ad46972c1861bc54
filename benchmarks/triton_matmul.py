"""The Triton control of the fused retrieval kernels: the threshold pass's persistent main loop (the same tiles,
tile order and score routine; by default the tiles its autotuner last chose) with a plain epilogue that stores the
scaled scores. Beside ``q @ c.T`` (cuBLAS) it tells the main loop's efficiency; beside the fused kernels,
their epilogues' cost. A benchmark provider only, not a library op.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from elva_kernels import _retrieval
from elva_kernels.triton.similarity_topk import (
    PROGRAMS_PER_SM, _persistent_tile, chosen_tiles, tma_descriptors, upcast_for,
)


@triton.jit
def plain_matmul_kernel(
    q_ptr, c_ptr, q_desc, c_desc, q_scale_ptr, c_scale_ptr, out_ptr,  # out: [B, N] in the rows' dtype
    num_queries, num_candidates, dim, stride_q, stride_c, num_programs,
    UPCAST: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row_tiles = tl.cdiv(num_queries, BLOCK_M)
    tiles = row_tiles * tl.cdiv(num_candidates, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, num_programs):
        rows, cols, row_ok, col_ok, scores = _persistent_tile(
            tile, row_tiles, q_ptr, c_ptr, q_desc, c_desc, q_scale_ptr, c_scale_ptr, num_queries, num_candidates,
            dim, stride_q, stride_c, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, EVEN_K, USE_TMA)
        out = out_ptr + rows.to(tl.int64)[:, None] * num_candidates + cols[None, :]
        tl.store(out, scores.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def plain_matmul(queries: torch.Tensor, candidates: torch.Tensor, tiles=None) -> torch.Tensor:
    """q @ c.T (scales 1) in the rows' dtype, by the threshold pass's main loop on ``tiles`` ((BLOCK_M, BLOCK_N,
    BLOCK_K, warps, stages); default: ``chosen_tiles``)."""
    num_queries, num_candidates, dim = queries.shape[0], candidates.shape[0], queries.shape[1]
    device = queries.device
    block_m, block_n, block_k, warps, stages = tiles or chosen_tiles(queries.dtype)
    out = torch.empty((num_queries, num_candidates), dtype=queries.dtype, device=device)
    ones_q = torch.ones(num_queries, dtype=torch.float32, device=device)
    ones_c = torch.ones(num_candidates, dtype=torch.float32, device=device)
    tiles = triton.cdiv(num_queries, block_m) * triton.cdiv(num_candidates, block_n)
    programs = min(tiles, PROGRAMS_PER_SM * _retrieval.multiprocessor_count(device))
    q_desc, c_desc, use_tma = tma_descriptors(queries, candidates, block_m, block_n, block_k)
    plain_matmul_kernel[(programs,)](
        queries, candidates, q_desc, c_desc, ones_q, ones_c, out, num_queries, num_candidates, dim, queries.stride(0),
        candidates.stride(0), programs, UPCAST=upcast_for(queries.dtype, device), EVEN_K=dim % block_k == 0,
        USE_TMA=use_tma,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return out

"""Triton kernels of rank_statistics: the positives' scores, then one counting pass over the splits.

``pair_scores_kernel`` scores each row's listed positives with the score routine of
triton/similarity_topk.py on a full BLOCK_N tile (the gathered positives, then padding) and
reads the diagonal, so a positive scores bit-identically to the same candidate in the
counting pass and exact duplicates tie. ``split_rank_counts_kernel`` then counts, per
(query, split), the negatives whose key beats the best positive's, and their best key.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from elva_kernels import _split_select
from elva_kernels.triton import aot
from elva_kernels.triton.similarity_topk import (
    BLOCK_K, BLOCK_M, BLOCK_N, HEADLINE_CANDIDATES, HEADLINE_DIM, HEADLINE_QUERIES, HEADLINE_SMS, KEY_MIN, NUM_STAGES,
    NUM_WARPS, _listed, _nonfinite, _score_keys, _score_tile, upcast_for,
)


@triton.jit
def pair_scores_kernel(
    q_ptr, c_ptr, q_scale_ptr, c_scale_ptr,
    ids_ptr, width,  # int64 [B, width] candidate ids, -1 padded
    out_ptr,  # fp32 [B, width]: score of (row, ids[row, t]), -inf for padding
    num_queries, dim, stride_q, stride_c,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_queries
    lanes = tl.arange(0, BLOCK_N)
    diagonal = tl.arange(0, BLOCK_M)[:, None] == lanes[None, :]
    for t in range(0, width):
        ids = tl.load(ids_ptr + rows * width + t, mask=row_ok, other=-1)
        # Tile column j holds row j's positive; columns past BLOCK_M are padding.
        cols = tl.sum(tl.where(diagonal, ids[:, None], 0), axis=0)
        col_ok = (lanes < BLOCK_M) & (cols >= 0)
        scores = _score_tile(q_ptr, c_ptr, q_scale_ptr, c_scale_ptr, rows, cols, row_ok, col_ok, dim, stride_q,
                             stride_c, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
        mine = tl.max(tl.where(diagonal, scores, float("-inf")), axis=1)
        tl.store(out_ptr + rows * width + t, tl.where(ids >= 0, mine, float("-inf")), mask=row_ok)


@triton.jit
def split_rank_counts_kernel(
    q_ptr, c_ptr, q_scale_ptr, c_scale_ptr,
    positives_ptr, positives_width,  # int64 [B, width], -1 padded
    exclude_ptr, exclude_width,  # int64 [B, width] (width 0: none)
    pos_keys_ptr,  # int64 [B]: the best positive's key
    ahead_ptr, max_neg_ptr,  # int64 [B, splits] outputs
    nonfinite_ptr,  # int32 [1], set to 1 on a NaN/Inf score
    num_queries, num_candidates, dim, stride_q, stride_c, splits, split_size,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_queries
    pos_keys = tl.load(pos_keys_ptr + rows, mask=row_ok, other=KEY_MIN)
    first = split.to(tl.int64) * split_size
    last = tl.minimum(first + split_size, num_candidates)
    ahead = tl.zeros([BLOCK_M], dtype=tl.int64)
    max_neg = tl.full([BLOCK_M], KEY_MIN, dtype=tl.int64)
    bad = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for start in range(first, last, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < last
        valid = row_ok[:, None] & col_ok[None, :]
        scores = _score_tile(q_ptr, c_ptr, q_scale_ptr, c_scale_ptr, rows, cols, row_ok, col_ok, dim, stride_q,
                             stride_c, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
        bad = bad | (valid & _nonfinite(scores)).to(tl.int32)
        keys = _score_keys(scores, cols[None, :])
        negative = valid & ~_listed(positives_ptr, rows, row_ok, positives_width, cols, BLOCK_M, BLOCK_N)
        negative = negative & ~_listed(exclude_ptr, rows, row_ok, exclude_width, cols, BLOCK_M, BLOCK_N)
        ahead += tl.sum((negative & (keys > pos_keys[:, None])).to(tl.int64), axis=1)
        max_neg = tl.maximum(max_neg, tl.max(tl.where(negative, keys, KEY_MIN), axis=1))
    tl.store(ahead_ptr + rows * splits + split, ahead, mask=row_ok)
    tl.store(max_neg_ptr + rows * splits + split, max_neg, mask=row_ok)
    tl.atomic_max(nonfinite_ptr, 1, mask=tl.max(tl.max(bad, axis=1), axis=0) > 0)


def pair_scores(queries, candidates, query_scale, candidate_scale, ids):
    """Launcher with the signature of ``elva::pair_scores_cuda``."""
    out = torch.empty(ids.shape, dtype=torch.float32, device=queries.device)
    pair_scores_kernel[(triton.cdiv(queries.shape[0], BLOCK_M),)](
        queries, candidates, query_scale, candidate_scale, ids.contiguous(), ids.shape[1], out,
        queries.shape[0], queries.shape[1], queries.stride(0), candidates.stride(0),
        UPCAST=upcast_for(queries.dtype, queries.device), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out


def split_rank_counts(queries, candidates, query_scale, candidate_scale, positives, exclude, pos_keys, split_size):
    """Launcher with the signature of ``elva::split_rank_counts_cuda``."""
    num_queries, num_candidates = queries.shape[0], candidates.shape[0]
    splits = triton.cdiv(num_candidates, split_size)
    ahead = torch.empty((num_queries, splits), dtype=torch.int64, device=queries.device)
    max_neg = torch.empty_like(ahead)
    nonfinite = torch.zeros(1, dtype=torch.int32, device=queries.device)
    exclude_arg = exclude.contiguous() if exclude is not None else positives
    split_rank_counts_kernel[(triton.cdiv(num_queries, BLOCK_M), splits)](
        queries, candidates, query_scale, candidate_scale, positives.contiguous(), positives.shape[1],
        exclude_arg, exclude.shape[1] if exclude is not None else 0, pos_keys, ahead, max_neg, nonfinite,
        num_queries, num_candidates, queries.shape[1], queries.stride(0), candidates.stride(0), splits, split_size,
        UPCAST=upcast_for(queries.dtype, queries.device), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return ahead, max_neg, nonfinite


def _aot_cases(dtype):
    """The headline workload of similarity_topk's cases, one positive per query (M-BEIR's usual case)."""
    rows, pool, dim = HEADLINE_QUERIES, HEADLINE_CANDIDATES, HEADLINE_DIM
    split_size, _ = _split_select.plan(rows, pool, 1, multiprocessors=HEADLINE_SMS)
    splits = triton.cdiv(pool, split_size)
    element = aot.DTYPES[dtype]
    shared = dict(q_ptr=aot.meta(rows, dim, dtype=element), c_ptr=aot.meta(pool, dim, dtype=element),
                  q_scale_ptr=aot.meta(rows), c_scale_ptr=aot.meta(pool), dim=dim, stride_q=dim, stride_c=dim,
                  UPCAST=False, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    ids = aot.meta(rows, 1, dtype=torch.int64)
    on_tensor_cores = dtype != "fp32"
    pair = aot.Case(pair_scores_kernel, dtype, dict(shared, ids_ptr=ids, width=1, out_ptr=aot.meta(rows, 1),
                                                    num_queries=rows),
                    aot.Expect(tensor_cores="HGMMA" if on_tensor_cores else None),
                    num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    counts = aot.Case(
        split_rank_counts_kernel, dtype,
        dict(shared, positives_ptr=ids, positives_width=1, exclude_ptr=ids, exclude_width=0,
             pos_keys_ptr=aot.meta(rows, dtype=torch.int64), ahead_ptr=aot.meta(rows, splits, dtype=torch.int64),
             max_neg_ptr=aot.meta(rows, splits, dtype=torch.int64), nonfinite_ptr=aot.meta(1, dtype=torch.int32),
             num_queries=rows, num_candidates=pool, splits=splits, split_size=split_size),
        aot.Expect(tensor_cores="HGMMA" if on_tensor_cores else None, min_mma_n=128 if on_tensor_cores else 0,
                   async_copy=True, max_epilogue_per_score=8, int64_compares=False,
                   known={"epilogue": "issue 15: int64 keys and id lists compared per score",
                          "int64_compares": "issue 15: int64 keys compared per score",
                          **({"spills": "issue 15: fp32 score tiles beside int64 keys"} if dtype == "fp32" else {}),
                          **({"mma_n": "issue 15: 64x64 tiles"} if on_tensor_cores else {})}),
        num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return [pair, counts]


AOT_CASES = [case for dtype in aot.DTYPES for case in _aot_cases(dtype)]

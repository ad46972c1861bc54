"""Triton kernels of rank_statistics: the positives' scores, then one counting pass over the candidates.

``pair_scores_kernel`` scores each row's listed positives on a full score tile (the gathered positives, then
padding) and reads the diagonal. It uses the score routine and the tile shape (``RANK_TILES``) of the
counting pass, so a positive scores bit-identically to the same candidate there and exact duplicates tie.

``rank_counts_kernel`` is the threshold pass's main loop with a count epilogue. A program owns one tile of
queries and one split of the candidate tiles; per row it counts the negatives ahead of the best positive p (score
s_p, id i_p) under SPEC's total order, ``s > s_p or (s == s_p and id < i_p)``, and keeps the best negative score.
Most tiles hold no positive and no excluded id of any of their rows, and none of them holds i_p, so a row's ties
all rank on one side of it: the epilogue is two fp32 compares and two maxima per score (the tie side is one flag
per row). A tile that holds a listed id of one of its rows, or the pool's ragged end, takes the rare branch,
which masks the listed ids and compares ids exactly. Each row tracks the smallest listed id at or after the
current tile, so finding those tiles costs one reduction per tile. Per-split partials ([B, splits] int32 counts
and fp32 maxima) are summed by the host; no atomics on the MMA layout, no B x N memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from elva_kernels import _retrieval
from elva_kernels.triton import aot
from elva_kernels.triton.similarity_topk import (
    HEADLINE_CANDIDATES, HEADLINE_DIM, HEADLINE_QUERIES, HEADLINE_SMS, PROGRAMS_PER_SM, THRESHOLD_TILES,
    _max_with_nan, _row_magnitude, _score_tile, _score_tile_tma, tma_descriptors, upcast_for,
)

# The threshold pass's tiles, except for fp32 rows, whose FFMA operands beside the count epilogue fit 64 x 128 x 32
# without spilling (fp32 FMA dots sum in k order whatever the tile, so scores still match across kernels).
RANK_TILES = {**THRESHOLD_TILES, torch.float32: (64, 128, 32, 8, 3)}
NO_LISTED_ID = tl.constexpr(2**31 - 1)  # above every candidate id (N < 2**31): no listed id left in the row


@triton.jit
def pair_scores_kernel(
    q_ptr, c_ptr, q_scale_ptr, c_scale_ptr,
    ids_ptr, width,  # int64 [B, width] candidate ids, -1 padded
    out_ptr,  # fp32 [B, width]: score of (row, ids[row, t]), -inf for padding
    num_queries, dim, stride_q, stride_c,
    UPCAST: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
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
                             stride_c, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, EVEN_K)
        mine = tl.max(tl.where(diagonal, scores, float("-inf")), axis=1)
        tl.store(out_ptr + rows * width + t, tl.where(ids >= 0, mine, float("-inf")), mask=row_ok)


@triton.jit
def _next_listed(ids_ptr, rows, row_ok, width, bound, current):
    """Per row, int32: the smaller of ``current`` and the smallest id >= ``bound`` in row i of an int64 [B, width]
    list."""
    for t in range(0, width):
        ids = tl.load(ids_ptr + rows * width + t, mask=row_ok, other=-1)
        current = tl.minimum(current, tl.where(ids >= bound, ids, NO_LISTED_ID).to(tl.int32))
    return current


@triton.jit
def _drop_listed(scores, ids_ptr, rows, row_ok, width, cols):
    """``scores`` with -inf where cols[j] is listed in row i of an int64 [B, width] id list (ids < 2**31)."""
    for t in range(0, width):
        ids = tl.load(ids_ptr + rows * width + t, mask=row_ok, other=-1).to(tl.int32)
        scores = tl.where(cols[None, :] == ids[:, None], float("-inf"), scores)
    return scores


@triton.jit
def rank_counts_kernel(
    q_ptr, c_ptr, q_scale_ptr, c_scale_ptr,  # rows (fp32/fp16/bf16) and their fp32 scales
    q_desc, c_desc,  # with USE_TMA: TMA descriptors of the rows ([BLOCK_M | BLOCK_N, BLOCK_K] blocks)
    positives_ptr, positives_width,  # int64 [B, width], -1 padded
    exclude_ptr, exclude_width,  # int64 [B, width] (width 0: none)
    pos_score_ptr, pos_below_ptr, pos_id_ptr,  # fp32 / fp32 / int32 [B]: the best positive's score, the next
                                               # float below it, its id
    ahead_ptr, max_neg_ptr,  # int32 / fp32 [B, splits]: negatives ahead of it and their best score, per split
    largest_ptr,  # fp32 [B, splits]: the largest |score| (NaN if one is NaN), for the non-finite check
    num_queries, num_candidates, dim, stride_q, stride_c, splits, split_tiles,
    UPCAST: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    split = tl.program_id(1)
    row0 = tl.program_id(0) * BLOCK_M
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < num_queries
    rows64 = rows.to(tl.int64)
    pos_score = tl.load(pos_score_ptr + rows, mask=row_ok, other=0.0)
    pos_below = tl.load(pos_below_ptr + rows, mask=row_ok, other=0.0)
    pos_id = tl.load(pos_id_ptr + rows, mask=row_ok, other=0)
    first = split * split_tiles * BLOCK_N
    last = tl.minimum(first + split_tiles * BLOCK_N, num_candidates)
    listed_next = _next_listed(positives_ptr, rows64, row_ok, positives_width, first,
                               tl.full([BLOCK_M], NO_LISTED_ID, dtype=tl.int32))
    listed_next = _next_listed(exclude_ptr, rows64, row_ok, exclude_width, first, listed_next)
    ahead = tl.zeros([BLOCK_M], dtype=tl.int32)
    max_neg = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    largest = tl.zeros([BLOCK_M], dtype=tl.float32)
    for tile in range(0, tl.cdiv(last - first, BLOCK_N)):
        start = first + tile * BLOCK_N
        end = start + BLOCK_N
        cols = start + tl.arange(0, BLOCK_N)
        if USE_TMA:  # TMA zero-fills past the pool; columns past the split take the rare branch
            scores = _score_tile_tma(q_desc, c_desc, q_scale_ptr, c_scale_ptr, row0, start, rows, cols, row_ok,
                                     cols < last, dim, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
        else:
            scores = _score_tile(q_ptr, c_ptr, q_scale_ptr, c_scale_ptr, rows64, cols.to(tl.int64), row_ok,
                                 cols < last, dim, stride_q, stride_c, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, EVEN_K)
        largest = _max_with_nan(largest, _row_magnitude(scores))
        if (tl.min(listed_next, axis=0) < end) | (end > last):  # the rare branch: listed ids or the ragged end
            # Listed ids and padding score -inf, which never ranks ahead of a finite positive score.
            scores = tl.where((cols < last)[None, :], scores, float("-inf"))
            scores = _drop_listed(scores, positives_ptr, rows64, row_ok, positives_width, cols)
            scores = _drop_listed(scores, exclude_ptr, rows64, row_ok, exclude_width, cols)
            beats = (scores > pos_score[:, None]) | ((scores == pos_score[:, None]) & (cols[None, :] < pos_id[:, None]))
            ahead += tl.sum(beats.to(tl.int32), axis=1)
            listed_next = _next_listed(positives_ptr, rows64, row_ok, positives_width, end,
                                       tl.full([BLOCK_M], NO_LISTED_ID, dtype=tl.int32))
            listed_next = _next_listed(exclude_ptr, rows64, row_ok, exclude_width, end, listed_next)
        else:
            # Every candidate is a negative, all before or all after i_p: ties rank by the row's side of it.
            # Ties ahead: s >= s_p, which is s > the next float below s_p (compares are exact: no flush to zero).
            bound = tl.where(pos_id >= end, pos_below, pos_score)
            beats = scores > bound[:, None]
            ahead += tl.sum(tl.where(beats, 1.0, 0.0), axis=1).to(tl.int32)
        max_neg = tl.maximum(max_neg, tl.max(scores, axis=1))
    out = rows * splits + split
    tl.store(ahead_ptr + out, ahead, mask=row_ok)
    tl.store(max_neg_ptr + out, max_neg, mask=row_ok)
    tl.store(largest_ptr + out, largest, mask=row_ok)


def pair_scores(queries, candidates, query_scale, candidate_scale, ids):
    """Launcher with the signature of ``elva::pair_scores_cuda``."""
    block_m, block_n, block_k, warps, stages = RANK_TILES[queries.dtype]
    out = torch.empty(ids.shape, dtype=torch.float32, device=queries.device)
    pair_scores_kernel[(triton.cdiv(queries.shape[0], block_m),)](
        queries, candidates, query_scale, candidate_scale, ids.contiguous(), ids.shape[1], out,
        queries.shape[0], queries.shape[1], queries.stride(0), candidates.stride(0),
        UPCAST=upcast_for(queries.dtype, queries.device), EVEN_K=queries.shape[1] % block_k == 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return out


def rank_counts(queries, candidates, query_scale, candidate_scale, positives, exclude, pos_keys):
    """(negatives ahead of the best positive int64 [B], best negative score fp32 [B], nonfinite int32 [1]); the
    best positive comes as its key (``_retrieval.score_keys``)."""
    num_queries, num_candidates, dim = queries.shape[0], candidates.shape[0], queries.shape[1]
    device = queries.device
    block_m, block_n, block_k, warps, stages = RANK_TILES[queries.dtype]
    row_tiles = triton.cdiv(num_queries, block_m)
    split_tiles = _retrieval.split_tiles(row_tiles, triton.cdiv(num_candidates, block_n),
                                            PROGRAMS_PER_SM * _retrieval.multiprocessor_count(device))
    splits = triton.cdiv(triton.cdiv(num_candidates, block_n), split_tiles)
    ahead = torch.empty((num_queries, splits), dtype=torch.int32, device=device)
    max_neg = torch.empty((num_queries, splits), dtype=torch.float32, device=device)
    largest = torch.empty_like(max_neg)
    exclude_arg = exclude.contiguous() if exclude is not None else positives
    q_desc, c_desc, use_tma = tma_descriptors(queries, candidates, block_m, block_n, block_k)
    rank_counts_kernel[(row_tiles, splits)](
        queries, candidates, query_scale, candidate_scale, q_desc, c_desc, positives.contiguous(), positives.shape[1],
        exclude_arg, exclude.shape[1] if exclude is not None else 0, *_retrieval.best_positive(pos_keys), ahead,
        max_neg, largest, num_queries, num_candidates, dim, queries.stride(0), candidates.stride(0), splits,
        split_tiles, UPCAST=upcast_for(queries.dtype, device), EVEN_K=dim % block_k == 0, USE_TMA=use_tma,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    nonfinite = (~(largest.amax(1) <= torch.finfo(torch.float32).max)).any().to(torch.int32).reshape(1)
    return ahead.sum(1), max_neg.amax(1), nonfinite


def _aot_cases(dtype, use_tma):
    """The headline workload of similarity_topk's cases, one positive per query (M-BEIR's usual case); the pair
    kernel once per dtype (it has no TMA variant), with the main variant."""
    rows, pool, dim = HEADLINE_QUERIES, HEADLINE_CANDIDATES, HEADLINE_DIM
    element = aot.DTYPES[dtype]
    block_m, block_n, block_k, warps, stages = RANK_TILES[element]
    row_tiles = triton.cdiv(rows, block_m)
    split_tiles = _retrieval.split_tiles(row_tiles, triton.cdiv(pool, block_n), PROGRAMS_PER_SM * HEADLINE_SMS)
    splits = triton.cdiv(triton.cdiv(pool, block_n), split_tiles)
    shared = dict(q_ptr=aot.meta(rows, dim, dtype=element), c_ptr=aot.meta(pool, dim, dtype=element),
                  q_scale_ptr=aot.meta(rows), c_scale_ptr=aot.meta(pool), dim=dim, stride_q=dim, stride_c=dim,
                  UPCAST=False, EVEN_K=dim % block_k == 0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    ids = aot.meta(rows, 1, dtype=torch.int64)
    on_tensor_cores = dtype != "fp32"  # fp32 rows take exact fp32 FMAs (input_precision="ieee")
    pair = aot.Case(pair_scores_kernel, dtype, dict(shared, ids_ptr=ids, width=1, out_ptr=aot.meta(rows, 1),
                                                    num_queries=rows),
                    aot.Expect(tensor_cores="HGMMA" if on_tensor_cores else None,
                               min_mma_n=128 if on_tensor_cores else 0),
                    num_warps=warps, num_stages=stages)
    queries, candidates = shared["q_ptr"], shared["c_ptr"]
    q_desc, c_desc, _ = tma_descriptors(queries, candidates, block_m, block_n, block_k) if use_tma else (
        queries, candidates, False)
    counts = aot.Case(
        rank_counts_kernel, dtype + ("" if use_tma or not on_tensor_cores else ", pointer loads"),
        dict(shared, q_desc=q_desc, c_desc=c_desc, USE_TMA=use_tma, positives_ptr=ids, positives_width=1,
             exclude_ptr=ids, exclude_width=0,
             pos_score_ptr=aot.meta(rows), pos_below_ptr=aot.meta(rows), pos_id_ptr=aot.meta(rows, dtype=torch.int32),
             ahead_ptr=aot.meta(rows, splits, dtype=torch.int32), max_neg_ptr=aot.meta(rows, splits),
             largest_ptr=aot.meta(rows, splits), num_queries=rows, num_candidates=pool, splits=splits,
             split_tiles=split_tiles),
        aot.Expect(tensor_cores="HGMMA" if on_tensor_cores else None, min_mma_n=128 if on_tensor_cores else 0,
                   async_copy=True, tma=use_tma,
                   # Per score outside the rare branch: two FMULs (the scales), FSET + FADD (the count), FMNMX
                   # (the best negative), FMNMX.NAN (the largest |score|); the rest is the tile's K-loop prologue,
                   # address setup and row reductions. 10.3 at 128 x 128 on sm_90 by pointers; 11.1 by TMA, whose
                   # per-tile pipeline prologue (elect, mbarrier setup) is about 100 instructions longer while each
                   # of the 24 K steps is 4 shorter, so a tile costs the same, in 192 registers instead of 216.
                   max_epilogue_per_score=12 if use_tma else 11, int64_compares=False,
                   known={} if on_tensor_cores else {
                       "epilogue": "fp32 rows are FFMA dots (not the headline path): 32 scores per thread "
                                   "share the tile's setup, about 2% of its 48k FFMAs at d = 1536"}),
        num_warps=warps, num_stages=stages)
    return [pair, counts] if use_tma or not on_tensor_cores else [counts]


# Half rows load by TMA; fp32 rows, and half rows TMA cannot read, by pointers (as the threshold pass).
AOT_CASES = [case for dtype in aot.DTYPES for case in _aot_cases(dtype, use_tma=dtype != "fp32")]
AOT_CASES += [case for dtype in ("fp16", "bf16") for case in _aot_cases(dtype, use_tma=False)]

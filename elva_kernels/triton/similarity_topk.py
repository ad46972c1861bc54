"""Triton kernels of similarity_topk: the threshold pass (the main path) and per-split top lists (the exact path).

threshold_topk_kernel is a persistent GEMM over 128 x 128 score tiles (8 warps, a pipelined K loop; half rows load by
TMA from tensor descriptors, fp32 rows and rows TMA cannot read by pointers) whose epilogue
compares each row's best score with the query's threshold (``_retrieval``'s docstring says where it comes from and
why the result is exact) and checks its largest |score| for NaN/Inf: two maxima per score. Only tiles with a
survivor take the append branch: an atomic slot in the query's buffer and two stores per survivor. Query tiles run fastest, so the programs in flight share a few candidate tiles and each
candidate row is read from HBM about once.

split_topk_kernel, the exact path for small pools, fallback rows and mining's random keys:

A program owns BLOCK_M queries and one split of the candidates. It walks the split in BLOCK_N
candidate tiles: a tl.dot score tile (fp32 accumulation), its keys (``_retrieval``'s
docstring), then a threshold test against each row's running list of LIST keys, kept in
registers. Only keys above a row's current minimum are inserted, one per row per step, so
after the first tiles the epilogue is a compare and a max. Scores never leave the chip.

The score routine ``_score_tile`` is shared with triton/rank_statistics.py, so every kernel
computes bit-identical scores for the same (query, candidate) pair.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from elva_kernels import _retrieval
from elva_kernels.triton import aot

KEY_MIN = tl.constexpr(-(2**63))  # an ineligible candidate
KEY_MAX = tl.constexpr(2**63 - 1)  # upper bound of a first round: none
REAL_KEY_MIN = tl.constexpr(-(2**63) + 2**31)  # every real key is at least this (ids < 2**31)
LOW_WORD = tl.constexpr(2**32 - 1)
# Kernels run under Triton's interpreter (CPU tensors, tests); read at import, as @triton.jit does.
INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")
MAX_INTERPRETED_PRODUCT = tl.constexpr(2**20)  # Triton's largest tensor
# Tile shape: wgmma-friendly on Hopper; the interpreter is faster with large blocks too.
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64
NUM_WARPS, NUM_STAGES = 4, 3


@triton.jit
def _accumulate(acc, a, b, UPCAST: tl.constexpr):
    """acc + a @ b for one K step ([M, K] x [K, N]) in fp32."""
    if UPCAST:  # bf16 arithmetic is wrong in the interpreter: fp32 holds bf16 products exactly
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if INTERPRETED:
        # numpy's matmul may round a score differently by its column in the tile (BLAS edge kernels), which
        # breaks the bitwise ties of duplicate candidates; an MMA does not. Exact fp32 products, summed in k
        # order, are the same for every position (numpy's order of summation follows the operands' memory
        # layout, so every tile passes b the same way: loaded [N, K], then transposed).
        a, b = a.to(tl.float32), b.to(tl.float32)
        if a.shape[0] * a.shape[1] * b.shape[1] <= MAX_INTERPRETED_PRODUCT:
            return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
        steps = tl.arange(0, a.shape[1])  # a larger [M, K, N] than Triton allows: one k at a time
        for k in tl.static_range(a.shape[1]):
            a_k = tl.sum(tl.where(steps[None, :] == k, a, 0.0), axis=1)  # one nonzero term: exact
            b_k = tl.sum(tl.where(steps[:, None] == k, b, 0.0), axis=0)
            acc += a_k[:, None] * b_k[None, :]
        return acc
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _scaled(acc, q_scale_ptr, c_scale_ptr, rows, cols, row_ok, col_ok):
    """The score of each product: (acc * query scale) * candidate scale."""
    q_scale = tl.load(q_scale_ptr + rows, mask=row_ok, other=0.0)
    c_scale = tl.load(c_scale_ptr + cols, mask=col_ok, other=0.0)
    return (acc * q_scale[:, None]) * c_scale[None, :]


@triton.jit
def _score_tile(
    q_ptr, c_ptr, q_scale_ptr, c_scale_ptr, rows, cols, row_ok, col_ok, dim, stride_q, stride_c,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr = False,
):
    """fp32 scores [BLOCK_M, BLOCK_N] of query ``rows`` x candidate ``cols`` (int64 ids), scaled. ``EVEN_K``:
    dim is a multiple of BLOCK_K, so the K steps need no mask."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = (kk < dim) | EVEN_K
        a = tl.load(q_ptr + rows[:, None] * stride_q + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(c_ptr + cols[:, None] * stride_c + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _accumulate(acc, a, tl.trans(b), UPCAST)  # as the TMA tile (see _accumulate)
    return _scaled(acc, q_scale_ptr, c_scale_ptr, rows, cols, row_ok, col_ok)


@triton.jit
def _score_tile_tma(q_desc, c_desc, q_scale_ptr, c_scale_ptr, row0, col0, rows, cols, row_ok, col_ok, dim,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """``_score_tile`` with the rows loaded by TMA from tensor descriptors ([BLOCK_M, BLOCK_K] query and
    [BLOCK_N, BLOCK_K] candidate blocks at (row0, k) and (col0, k)); out-of-range rows and K columns load as 0."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_K):
        a = q_desc.load([row0, k0])
        acc = _accumulate(acc, a, tl.trans(c_desc.load([col0, k0])), UPCAST)
    return _scaled(acc, q_scale_ptr, c_scale_ptr, rows, cols, row_ok, col_ok)


@triton.jit
def _score_keys(scores, cols):
    """Total-order keys: orderable fp32 bits in the high word, 2**32 - 1 - id in the low word."""
    bits = (scores + 0.0).to(tl.int32, bitcast=True)  # + 0.0 turns -0.0 into +0.0
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return ordered.to(tl.int64) * 4294967296 + (LOW_WORD - cols)


@triton.jit
def _key_scores(keys):
    """The fp32 score of score keys (-inf for sentinels and ineligible keys)."""
    high = (keys >> 32).to(tl.int32)
    scores = tl.where(high < 0, high ^ 0x7FFFFFFF, high).to(tl.float32, bitcast=True)
    return tl.where(keys >= REAL_KEY_MIN, scores, float("-inf"))


@triton.jit
def _nonfinite(x):
    """NaN or +-Inf, from the exponent bits: ``x - x != 0`` would be contracted into an FMA of x's product."""
    return (x.to(tl.int32, bitcast=True) & 0x7F800000) == 0x7F800000


@triton.jit
def _max_with_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _row_magnitude(scores):
    """Per row, the largest |score|, NaN where one is NaN (so ``~(m <= FLT_MAX)`` tells NaN/Inf): one FMNMX.NAN
    per score. The interpreter runs custom reductions in Python score by score, so there NaN counts as +inf."""
    if INTERPRETED:
        return tl.max(tl.where(scores != scores, float("inf"), tl.abs(scores)), axis=1)
    else:
        return tl.reduce(tl.abs(scores), 1, _max_with_nan)


@triton.jit
def _mix32(x):
    x = (x ^ (x >> 16)) * 0x45D9F3B
    x = (x ^ (x >> 16)) * 0x45D9F3B
    return x ^ (x >> 16)


@triton.jit
def _random_keys(seed, rows, cols):
    """Key mode 1: the smallest hash of (seed, row, id) first (reference.mine_hard_negatives.random_keys)."""
    low_ids = cols.to(tl.uint32)
    high_ids = (cols >> 32).to(tl.uint32)
    low_words = LOW_WORD - cols
    h = _mix32(tl.full([1], seed, tl.uint32))
    h = _mix32(h ^ rows.to(tl.uint32))
    h = _mix32(h[:, None] ^ low_ids[None, :])
    h = _mix32(h ^ high_ids[None, :])
    return ((LOW_WORD - h.to(tl.int64)) - 2147483648) * 4294967296 + low_words[None, :]


@triton.jit
def _listed(ids_ptr, rows, row_ok, width, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] bool: candidate cols[j] appears in row i of the int64 [B, width] id matrix."""
    hit = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int1)
    for t in range(0, width):
        ids = tl.load(ids_ptr + rows * width + t, mask=row_ok, other=-1)
        hit = hit | (cols[None, :] == ids[:, None])
    return hit


@triton.jit
def split_topk_kernel(
    q_ptr, c_ptr, q_scale_ptr, c_scale_ptr,  # rows (fp32/fp16/bf16) and their fp32 scales
    exclude_ptr, exclude_width,  # int64 [B, exclude_width], -1 padded (width 0: none)
    max_score_ptr,  # fp32 [B] (ignored unless HAS_MAX_SCORE)
    upper_ptr,  # int64 [B, splits]: exclusive upper bound on keys; KEY_MIN = skip the pair
    keys_ptr,  # int64 [B, splits, LIST] output
    nonfinite_ptr,  # int32 [1], set to 1 on a NaN/Inf score
    num_queries, num_candidates, dim, stride_q, stride_c, splits, split_size, seed,
    LIST: tl.constexpr, KEY_MODE: tl.constexpr, HAS_MAX_SCORE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_queries
    upper = tl.load(upper_ptr + rows * splits + split, mask=row_ok, other=KEY_MIN)
    first = split.to(tl.int64) * split_size
    last = tl.minimum(first + split_size, num_candidates)
    last = tl.where(tl.max(upper, axis=0) > KEY_MIN, last, first)  # no row asks: nothing to do
    if HAS_MAX_SCORE:
        max_score = tl.load(max_score_ptr + rows, mask=row_ok, other=0.0)
    NEEDS_SCORES: tl.constexpr = KEY_MODE == 0 or HAS_MAX_SCORE

    # The running lists: distinct sentinels below every real key, so each row's minimum is unique.
    slots = tl.arange(0, LIST).to(tl.int64)
    sentinels = slots + (KEY_MIN + 1)
    best = tl.zeros([BLOCK_M, LIST], dtype=tl.int64) + sentinels[None, :]
    floor = tl.min(best, axis=1)
    bad = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for start in range(first, last, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < last
        valid = row_ok[:, None] & col_ok[None, :]
        if NEEDS_SCORES:
            scores = _score_tile(q_ptr, c_ptr, q_scale_ptr, c_scale_ptr, rows, cols, row_ok, col_ok, dim, stride_q,
                                 stride_c, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
            bad = bad | (valid & _nonfinite(scores)).to(tl.int32)
        # fp32 screen first: a score below the row's list minimum cannot enter, so most tiles end here and
        # never build int64 keys. Sentinel minima (a list not yet full) let everything through.
        hopeful = valid
        if KEY_MODE == 0:
            hopeful = hopeful & (scores >= _key_scores(floor)[:, None])
        if HAS_MAX_SCORE:
            hopeful = hopeful & (scores <= max_score[:, None])
        if tl.max(tl.max(hopeful.to(tl.int32), axis=1), axis=0) > 0:
            if KEY_MODE == 0:
                keys = _score_keys(scores, cols[None, :])
            else:
                keys = _random_keys(seed, rows, cols)
            # KEY_MAX means "no bound": it is also the random key of hash 0, which must stay eligible.
            eligible = hopeful & ((keys < upper[:, None]) | (upper[:, None] == KEY_MAX))
            keys = tl.where(eligible, keys, KEY_MIN)
            top = tl.max(keys, axis=1)
            if tl.max((top > floor).to(tl.int32), axis=0) > 0:  # some row improves: drop excluded ids first
                listed = _listed(exclude_ptr, rows, row_ok, exclude_width, cols, BLOCK_M, BLOCK_N)
                keys = tl.where(listed, KEY_MIN, keys)
                top = tl.max(keys, axis=1)
                # One insertion per improving row per step: the tile's best replaces the row's minimum.
                while tl.max((top > floor).to(tl.int32), axis=0) > 0:
                    improves = top > floor
                    best = tl.where((best == floor[:, None]) & improves[:, None], top[:, None], best)
                    keys = tl.where(keys == top[:, None], KEY_MIN, keys)
                    floor = tl.min(best, axis=1)
                    top = tl.max(keys, axis=1)
    out = keys_ptr + (rows[:, None] * splits + split) * LIST + slots[None, :]
    tl.store(out, best, mask=row_ok[:, None])
    tl.atomic_max(nonfinite_ptr, 1, mask=tl.max(tl.max(bad, axis=1), axis=0) > 0)


@triton.jit
def _persistent_tile(tile, row_tiles, q_ptr, c_ptr, q_desc, c_desc, q_scale_ptr, c_scale_ptr, num_queries,
                     num_candidates, dim, stride_q, stride_c, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr):
    """(rows, cols, row_ok, col_ok, scores) of a persistent program's ``tile``, loaded by TMA when ``USE_TMA`` (the
    descriptors; else the pointers). Query tiles run fastest: the programs in flight work on a few candidate tiles
    at a time. Ids fit 32 bits (B, N < 2**31); only the addresses are 64-bit."""
    row0 = (tile % row_tiles) * BLOCK_M
    col0 = (tile // row_tiles) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    row_ok = rows < num_queries
    col_ok = cols < num_candidates
    if USE_TMA:
        scores = _score_tile_tma(q_desc, c_desc, q_scale_ptr, c_scale_ptr, row0, col0, rows, cols, row_ok, col_ok,
                                 dim, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
    else:
        scores = _score_tile(q_ptr, c_ptr, q_scale_ptr, c_scale_ptr, rows.to(tl.int64), cols.to(tl.int64), row_ok,
                             col_ok, dim, stride_q, stride_c, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, EVEN_K)
    return rows, cols, row_ok, col_ok, scores


@triton.jit
def threshold_topk_kernel(
    q_ptr, c_ptr, q_scale_ptr, c_scale_ptr,  # rows (fp32/fp16/bf16) and their fp32 scales
    q_desc, c_desc,  # with USE_TMA: TMA descriptors of the rows ([BLOCK_M | BLOCK_N, BLOCK_K] blocks)
    threshold_ptr,  # fp32 [B]: a score survives when >= its query's threshold
    max_score_ptr,  # fp32 [B] (HAS_MAX_SCORE): ... and <= max_score
    count_ptr,  # int32 [B], zeroed: survivors per query, also those past the capacity (overflow)
    score_out_ptr, id_out_ptr,  # fp32 / int32 [B, capacity]: the survivors, in arrival order
    nonfinite_ptr,  # int32 [1], set to 1 on a NaN/Inf score
    num_queries, num_candidates, dim, stride_q, stride_c, capacity,
    HAS_MAX_SCORE: tl.constexpr, UPCAST: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row_tiles = tl.cdiv(num_queries, BLOCK_M)
    tiles = row_tiles * tl.cdiv(num_candidates, BLOCK_N)
    bad = tl.zeros([BLOCK_M], dtype=tl.int32)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0)):
        rows, cols, row_ok, col_ok, scores = _persistent_tile(
            tile, row_tiles, q_ptr, c_ptr, q_desc, c_desc, q_scale_ptr, c_scale_ptr, num_queries, num_candidates,
            dim, stride_q, stride_c, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, EVEN_K, USE_TMA)
        threshold = tl.load(threshold_ptr + rows, mask=row_ok, other=float("inf"))  # padded rows never survive
        # Per row, two maxima per score decide whether the tile needs the rare branch: a score at or above the
        # threshold (max_score and padding are sorted out there), or a NaN/Inf one.
        hopeful = (tl.max(scores, axis=1) >= threshold) | ~(_row_magnitude(scores) <= 3.4028234663852886e38)
        if tl.max(hopeful.to(tl.int32), axis=0) > 0:  # the rare branch
            survives = (scores >= threshold[:, None]) & col_ok[None, :]
            if HAS_MAX_SCORE:
                survives = survives & (scores <= tl.load(max_score_ptr + rows, mask=row_ok, other=0.0)[:, None])
            odd = ~(tl.abs(scores) <= 3.4028234663852886e38)  # NaN or +-Inf (padding scores 0)
            bad = bad | tl.max(odd.to(tl.int32), axis=1)
            # Flattened: Triton 3.9 cannot lower an atomic on the MMA layout (RemoveLayoutConversions asserts).
            # Offsets are 32-bit: a pass holds fewer than 2**31 buffer slots (_retrieval.BUFFER_BYTES).
            flat = tl.reshape(survives, [BLOCK_M * BLOCK_N])
            flat_rows = tl.reshape(rows[:, None] + cols[None, :] * 0, [BLOCK_M * BLOCK_N])
            slot = tl.atomic_add(count_ptr + flat_rows, 1, mask=flat, sem="relaxed")
            stored = flat & (slot < capacity)
            out = flat_rows * capacity + slot
            tl.store(score_out_ptr + out, tl.reshape(scores, [BLOCK_M * BLOCK_N]), mask=stored)
            tl.store(id_out_ptr + out, tl.reshape(cols[None, :] + rows[:, None] * 0, [BLOCK_M * BLOCK_N]), mask=stored)
    tl.atomic_max(nonfinite_ptr, 1, mask=tl.max(bad, axis=0) > 0)


def tma_ready(x: torch.Tensor) -> bool:
    """TMA reads rows from a 16-byte-aligned base with a 16-byte-multiple row stride (unit-stride rows)."""
    return x.stride(1) == 1 and x.data_ptr() % 16 == 0 and (x.stride(0) * x.element_size()) % 16 == 0


def tma_descriptors(queries, candidates, block_m, block_n, block_k):
    """(query descriptor, candidate descriptor, True) for fp16/bf16 rows that are both ``tma_ready``; else the
    tensors themselves (unused by the kernel) and False. fp32 rows keep pointer loads: their FFMA dot reads its
    operands into registers, and beside TMA's staging they spill (1176 B on sm_90)."""
    if queries.dtype == torch.float32 or not (tma_ready(queries) and tma_ready(candidates)):
        return queries, candidates, False
    return (TensorDescriptor.from_tensor(queries, [block_m, block_k]),
            TensorDescriptor.from_tensor(candidates, [block_n, block_k]), True)


def upcast_for(dtype: torch.dtype, device: torch.device) -> bool:
    """bf16 tl.dot is broken in the interpreter (CPU tensors); upcast after the load there."""
    return dtype == torch.bfloat16 and (device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1")


def split_topk(queries, candidates, query_scale, candidate_scale, exclude, max_score, upper, split_size, list_size,
               key_mode, seed):
    """Launcher with the signature of ``elva::split_topk_cuda`` (see _retrieval)."""
    num_queries, splits = upper.shape
    keys = torch.empty((num_queries, splits, list_size), dtype=torch.int64, device=queries.device)
    nonfinite = torch.zeros(1, dtype=torch.int32, device=queries.device)
    exclude_arg = exclude.contiguous() if exclude is not None else upper  # any int64 pointer; width 0
    grid = (triton.cdiv(num_queries, BLOCK_M), splits)
    split_topk_kernel[grid](
        queries, candidates, query_scale, candidate_scale,
        exclude_arg, exclude.shape[1] if exclude is not None else 0,
        max_score if max_score is not None else query_scale, upper.contiguous(), keys, nonfinite,
        num_queries, candidates.shape[0], queries.shape[1], queries.stride(0), candidates.stride(0), splits,
        split_size, seed,
        LIST=list_size, KEY_MODE=key_mode, HAS_MAX_SCORE=max_score is not None,
        UPCAST=upcast_for(queries.dtype, queries.device),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return keys, nonfinite


# The threshold pass, per dtype (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): 128 x 128 tiles for half rows (HGMMA
# m64n128 per warpgroup, 4 stages: 128 KiB of shared memory); fp32 rows take exact FFMAs, whose operands need
# registers, so their K steps are 16 deep (0 spills on sm_90; 64 x 128 x 32 spilled 16 B). The static report
# compiles these; the autotune table below starts from them.
THRESHOLD_TILES = {torch.float16: (128, 128, 64, 8, 4), torch.bfloat16: (128, 128, 64, 8, 4),
                   torch.float32: (128, 128, 16, 8, 3)}
PROGRAMS_PER_SM = 1
# The autotune table of the threshold pass: Triton times these on the first call of each (queries per pass, d,
# capacity, dtype) and keeps the fastest. 64 x 256 tiles hold twice the candidates per query tile, deep K steps
# halve the pipeline's waits at large d (128 x 256 tiles spill on sm_90: 672 B at 8 warps, 1352 B at 16). All fit
# 227 KiB of shared memory; the interpreter takes the first only.
TUNED_TILES = {
    torch.float16: [(128, 128, 64, 8, 4), (64, 256, 64, 8, 3), (128, 128, 128, 8, 3)],
    torch.float32: [(128, 128, 16, 8, 3)],
}
TUNED_TILES[torch.bfloat16] = TUNED_TILES[torch.float16]
TUNE_MIN_SCORES = 2**28  # B = 1024 queries x N = 262144 candidates


def _set_descriptor_blocks(args):
    """Autotune pre-hook: the TMA descriptors' block shapes follow the config's tiles."""
    if args["USE_TMA"]:
        args["q_desc"].block_shape = [args["BLOCK_M"], args["BLOCK_K"]]
        args["c_desc"].block_shape = [args["BLOCK_N"], args["BLOCK_K"]]


def _tune_large_passes(configs, named_args, **kwargs):
    """Autotune prune: passes below ``TUNE_MIN_SCORES`` scores take the first config, untimed (timing would cost
    more than any config saves there, and tests run many small shapes)."""
    scores = named_args["num_queries"] * named_args["num_candidates"]
    return configs if scores >= TUNE_MIN_SCORES else configs[:1]


def tuned_threshold_kernel(tiles):
    """``threshold_topk_kernel`` autotuned over ``tiles`` ((BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) each; the
    interpreter takes the first only), EVEN_K following each config's BLOCK_K."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages,
                             pre_hook=_set_descriptor_blocks)
               for m, n, k, warps, stages in (tiles[:1] if INTERPRETED else tiles)]
    even_k = triton.heuristics({"EVEN_K": lambda args: args["dim"] % args["BLOCK_K"] == 0})
    return triton.autotune(configs, key=["num_queries", "dim", "capacity"],
                           prune_configs_by={"early_config_prune": _tune_large_passes},
                           reset_to_zero=["count_ptr", "nonfinite_ptr"])(even_k(threshold_topk_kernel))


# One autotuner per dtype: Triton keys its cache on the arguments' dtypes too, but a dtype's configs must not be
# tried on another.
TUNED_THRESHOLD_KERNELS = {dtype: tuned_threshold_kernel(tiles) for dtype, tiles in TUNED_TILES.items()}


def chosen_tiles(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """The tiles of the threshold pass's last launch for ``dtype`` (the autotuner's pick), else the default ones."""
    config = getattr(TUNED_THRESHOLD_KERNELS[dtype], "best_config", None)
    if config is None:
        return THRESHOLD_TILES[dtype]
    blocks = config.kwargs
    return blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"], config.num_warps, config.num_stages


def threshold_topk(queries, candidates, query_scale, candidate_scale, threshold, max_score, capacity):
    """Launcher of the threshold pass: (count int32 [B], scores fp32 [B, capacity], ids int32 [B, capacity],
    nonfinite int32 [1]); slot s of row i is filled when s < min(count[i], capacity)."""
    num_queries, num_candidates, dim = queries.shape[0], candidates.shape[0], queries.shape[1]
    device = queries.device
    count = torch.zeros(num_queries, dtype=torch.int32, device=device)
    scores = torch.empty((num_queries, capacity), dtype=torch.float32, device=device)
    ids = torch.empty((num_queries, capacity), dtype=torch.int32, device=device)
    nonfinite = torch.zeros(1, dtype=torch.int32, device=device)
    block_m, block_n, block_k, _, _ = THRESHOLD_TILES[queries.dtype]  # the pre-hook sets each config's blocks
    q_desc, c_desc, use_tma = tma_descriptors(queries, candidates, block_m, block_n, block_k)
    programs = PROGRAMS_PER_SM * _retrieval.multiprocessor_count(device)

    def grid(config):
        return (min(programs, triton.cdiv(num_queries, config["BLOCK_M"]) *
                    triton.cdiv(num_candidates, config["BLOCK_N"])),)

    TUNED_THRESHOLD_KERNELS[queries.dtype][grid](
        queries, candidates, query_scale, candidate_scale, q_desc, c_desc, threshold.contiguous(),
        max_score if max_score is not None else threshold, count, scores, ids, nonfinite,
        num_queries, num_candidates, dim, queries.stride(0), candidates.stride(0), capacity,
        HAS_MAX_SCORE=max_score is not None, UPCAST=upcast_for(queries.dtype, device), USE_TMA=use_tma,
    )
    return count, scores, ids, nonfinite


# The headline workload (B=1024, N=1M, d=1536) on an H100's 132 SMs, as _retrieval plans it.
HEADLINE_QUERIES, HEADLINE_CANDIDATES, HEADLINE_DIM, HEADLINE_SMS = 1024, 1_000_000, 1536, 132


def _split_topk_case(dtype, list_size, key_mode, has_max_score, exclude_width):
    split_size, _ = _retrieval.plan(HEADLINE_QUERIES, HEADLINE_CANDIDATES, 1 if list_size == 16 else 1000,
                                       multiprocessors=HEADLINE_SMS)
    splits = triton.cdiv(HEADLINE_CANDIDATES, split_size)
    rows, dim = HEADLINE_QUERIES, HEADLINE_DIM
    element = aot.DTYPES[dtype]
    args = dict(
        q_ptr=aot.meta(rows, dim, dtype=element), c_ptr=aot.meta(HEADLINE_CANDIDATES, dim, dtype=element),
        q_scale_ptr=aot.meta(rows), c_scale_ptr=aot.meta(HEADLINE_CANDIDATES),
        exclude_ptr=aot.meta(rows, exclude_width, dtype=torch.int64), exclude_width=exclude_width,
        max_score_ptr=aot.meta(rows), upper_ptr=aot.meta(rows, splits, dtype=torch.int64),
        keys_ptr=aot.meta(rows, splits, list_size, dtype=torch.int64), nonfinite_ptr=aot.meta(1, dtype=torch.int32),
        num_queries=rows, num_candidates=HEADLINE_CANDIDATES, dim=dim, stride_q=dim, stride_c=dim, splits=splits,
        split_size=split_size, seed=0,
        LIST=list_size, KEY_MODE=key_mode, HAS_MAX_SCORE=has_max_score, UPCAST=False,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    scored = key_mode == 0 or has_max_score
    on_tensor_cores = scored and dtype != "fp32"  # fp32 rows take exact fp32 FMAs (input_precision="ieee")
    # The exact path serves what the threshold path does not (pools below its size, its fallback rows, mining's
    # random draw), so its per-split lists are not held to the main path's figures.
    known = {}
    if list_size > 16 or not scored or dtype == "fp32":
        known["spills"] = "exact path only: the [64, LIST] int64 register list beside the score tile"
    if on_tensor_cores:
        known["mma_n"] = "exact path only: 64x64 tiles"
    if key_mode == 0:
        known["epilogue"] = known["int64_compares"] = "exact path only: int64 keys and an insertion loop per tile"
    expect = aot.Expect(
        tensor_cores="HGMMA" if on_tensor_cores else None,
        min_mma_n=128 if on_tensor_cores else 0,
        async_copy=scored,
        max_epilogue_per_score=8 if key_mode == 0 else None,
        int64_compares=key_mode != 0,
        known=known,
    )
    label = f"{dtype} list {list_size} " + ("by score" if key_mode == 0 else "by random key") + (
        ", max_score" if has_max_score else "")
    return aot.Case(split_topk_kernel, label, args, expect, num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _threshold_topk_case(dtype, has_max_score, use_tma=True, tiles=None):
    plan = _retrieval.threshold_plan(HEADLINE_QUERIES, HEADLINE_CANDIDATES, 100)
    rows, dim, capacity = plan.rows, HEADLINE_DIM, plan.capacity
    element = aot.DTYPES[dtype]
    block_m, block_n, block_k, warps, stages = tiles or THRESHOLD_TILES[element]
    queries, candidates = aot.meta(rows, dim, dtype=element), aot.meta(HEADLINE_CANDIDATES, dim, dtype=element)
    q_desc, c_desc, _ = tma_descriptors(queries, candidates, block_m, block_n, block_k) if use_tma else (
        queries, candidates, False)
    args = dict(
        q_ptr=queries, c_ptr=candidates, q_desc=q_desc, c_desc=c_desc,
        q_scale_ptr=aot.meta(rows), c_scale_ptr=aot.meta(HEADLINE_CANDIDATES), threshold_ptr=aot.meta(rows),
        max_score_ptr=aot.meta(rows), count_ptr=aot.meta(rows, dtype=torch.int32),
        score_out_ptr=aot.meta(rows, capacity), id_out_ptr=aot.meta(rows, capacity, dtype=torch.int32),
        nonfinite_ptr=aot.meta(1, dtype=torch.int32),
        num_queries=rows, num_candidates=HEADLINE_CANDIDATES, dim=dim, stride_q=dim, stride_c=dim,
        capacity=capacity,
        HAS_MAX_SCORE=has_max_score, UPCAST=False, EVEN_K=dim % block_k == 0, USE_TMA=use_tma,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    on_tensor_cores = dtype != "fp32"  # fp32 rows take exact fp32 FMAs (input_precision="ieee")
    expect = aot.Expect(
        tensor_cores="HGMMA" if on_tensor_cores else None,
        min_mma_n=128 if on_tensor_cores else 0,
        async_copy=True,
        tma=use_tma,
        # Outside the append branch: two FMULs (the scales), FMNMX (the row's best) and FMNMX.NAN (its largest
        # |score|) per score; the rest is the tile's K-loop prologue, address setup and row reductions. On sm_90:
        # 9.5 for half rows by TMA at 128 x 128, 10.2 by pointers (a plain matmul of the same tiles storing its
        # scores counts 11.6), 14.5 for fp32 rows, whose FFMA tile has a longer prologue.
        max_epilogue_per_score=11 if on_tensor_cores else 15,
        int64_compares=False,
        known={},
    )
    label = f"{dtype}" + (", max_score" if has_max_score else "") + ("" if use_tma else ", pointer loads") + (
        f", tuned {block_m}x{block_n}x{block_k}" if tiles else "")
    return aot.Case(threshold_topk_kernel, label, args, expect, num_warps=warps, num_stages=stages)


# Every variant exact_top_keys launches: key mode 0 always carries max_score (+inf when none is given);
# mining (key mode 1) excludes its positives, one per query.
AOT_CASES = [
    _split_topk_case(dtype, list_size, key_mode, has_max_score, exclude_width=0 if key_mode == 0 else 1)
    for dtype in aot.DTYPES
    for list_size in (16, _retrieval.LIST_MAX)
    for key_mode, has_max_score in ((0, True), (1, True), (1, False))
]
# Half rows load by TMA; fp32 rows, and half rows TMA cannot read (a row stride that is not a multiple of 16 bytes),
# by pointers.
AOT_CASES += [_threshold_topk_case(dtype, has_max_score, use_tma=dtype != "fp32") for dtype in aot.DTYPES
              for has_max_score in (False, True)]
AOT_CASES += [_threshold_topk_case(dtype, False, use_tma=False) for dtype in ("fp16", "bf16")]
# The autotune table's other configs, on the same checks.
AOT_CASES += [_threshold_topk_case(dtype, False, use_tma=dtype != "fp32", tiles=tiles) for dtype in ("fp32", "bf16")
              for tiles in TUNED_TILES[aot.DTYPES[dtype]][1:]]

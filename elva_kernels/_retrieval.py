"""The Triton and CUDA backends of the three retrieval ops (similarity_topk, rank_statistics, mine_hard_negatives).

Each op's file (ops/<op>.py) registers its two GPU backends here with ``register``: this module drives the kernels
of triton/<op>.py or the CUDA extension and proves the results exact. Top-k by score on large pools takes the
threshold path (below); rank statistics count in one pass (``rank_counts``); everything else takes the exact path of
per-split top lists:

The candidates are cut into S splits of ``split_size`` rows. A kernel streams score tiles
through registers/shared memory and keeps, for every (query, split), only a short list of
its best keys; nothing of size [B, N] is ever written. This module merges those lists and
proves the merge exact.

Keys (one int64 orders candidates exactly as SPEC's total order):

    score   = (acc * query_scale[i]) * candidate_scale[j]    acc = fp32 sum of q[i, :] * c[j, :]
    key     = orderable32(score) * 2**32 + (2**32 - 1 - j)    (key_mode 0: by score, ties by smaller id)
    key     = (2**32 - 1 - h - 2**31) * 2**32 + (2**32 - 1 - j)  (key_mode 1: smallest random hash h first)

``orderable32`` is the float's bits as int32 with negatives' magnitude bits flipped (-0.0 as
+0.0), h = ``reference.mine_hard_negatives.random_keys(seed, i, j)``. The scales are 1 for
"dot" and the inverse L2 norms for "cosine". Because j < 2**31, a real key's low word is
>= 2**31, so real keys are >= ``REAL_KEY_MIN``; ``INT64_MIN`` marks an ineligible candidate
and ``INT64_MIN + 1 + slot`` the empty slots of a list, all below every real key.

Eligible: not listed in ``exclude[i]``, key < ``upper[i, split]`` (``KEY_MAX``: no bound, since it is
also the random key of hash 0) and, with ``max_score``,
score <= max_score[i]. A kernel sets ``nonfinite`` when a score it computed is NaN or Inf.

Exactness of the merge: a split whose list holds fewer than list_size real keys is exhausted;
a full one is complete down to its smallest key f. With tau the k-th best collected key,
every split with f <= tau has handed over all its keys >= tau, so the collected top-k is the
true one. Splits with f > tau are asked again for their next keys below f (``upper = f``).
With k <= list_size one round always suffices; larger k needs a second round only when a
split holds more than list_size of the top k, which random data practically never does.

Extra memory: B x S x list_size int64 keys per round plus the running B x k best, plus the
fp32 scales (B + N). S gives about 4 programs per SM, and at least 1.5 k listed keys per query.

Threshold + compaction (the main path of top-k by score, on large pools, where a backend has the kernel):

1. Threshold. A stratified random sample of m candidates (fixed seed) is scored with a plain matmul; T_i is the
   j-th best eligible (``<= max_score``) sample score of query i.
2. Fused pass. One GEMM over all (query, candidate) tiles whose epilogue compares each fp32 score with T_i; the
   survivors (score >= T_i, <= max_score) are appended, (score, id), to the query's buffer of capacity C, and
   counted even past C.
3. Select. Excluded ids leave the buffer; the exact top-k of the rest under SPEC's total order.

Exactness: if query i has at least k eligible survivors, its true k-th best eligible score s_k is >= T_i (k
eligible candidates score at least T_i), so every candidate of its true top k, ties at s_k included, survived. If
none was dropped for want of room (count <= C), the buffer holds them all and step 3 is exact. T_i is only a
bound: it need not equal any kernel score, so the sample may be scored by another matmul.

Fallbacks, per query and counted in ``FALLBACKS``: overflow (count > C) raises T_i to the k-th best eligible
buffered score (a valid bound by the same argument) and reruns those queries, twice at most; underflow (fewer
than k eligible survivors: exclusions, max_score, too high a T_i) and a third overflow take the exact path above.
m, j and C make both rare on any data: j is the least with P(Poisson(m k / N) >= j) <= MISS (the sample holds j
of the true top k), C the least with P(Poisson(m C / N) < j) <= MISS (the sample holds fewer than j of the best
C); with k = 10, N = 1M: m 8192, j 5, C 4096; k = 1000: m 16384, j 44, C 6144.

Extra memory of the threshold path: queries go in equal passes of whole 128-query tiles whose buffers, C x (4 + 4)
bytes per query, take about ``BUFFER_BYTES``; the sample scores take chunk x ``SAMPLE_PIECE`` fp32 and the sampled rows ``SAMPLE_PIECE`` x d.

The two fused passes: Triton's is one persistent GEMM with the compare in its epilogue (triton/similarity_topk.py).
CUDA's is chunked (``chunked``): cuBLAS writes the fp32 products of the pass's queries with a chunk of candidates,
about ``CHUNK_BYTES`` that stay in L2, and a select kernel applies the compare and appends with one atomic per warp
(csrc/cuda/threshold_select.cu); its CPU twin runs the same loop and rule in the tests.

Rank statistics count in one pass the same ways: Triton's threshold main loop with a count epilogue
(triton/rank_statistics.py), or CUDA's cuBLAS chunks and a count kernel (csrc/cuda/rank_count_select.cu, CPU twin
beside it). Every cuBLAS GEMM of a call has one shape, B x chunk x d (a short last chunk is padded), and the
positives' scores come from GEMMs of that shape over the gathered rows (``pair_scores``), so exact copies of a
candidate score bitwise alike wherever they sit and ties rank by id.
"""
from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from elva_kernels import _library, _native, _validate
from elva_kernels.reference import _common
from elva_kernels.reference.rank_statistics import check_positives

KEY_MIN = -(2**63)
KEY_MAX = 2**63 - 1
REAL_KEY_MIN = KEY_MIN + 2**31
LOW_WORD = 2**32 - 1
LIST_MAX = 128
# Splits are whole kernel tiles; queries are grouped in blocks of this many per program.
SPLIT_QUANTUM = 128
QUERY_BLOCK = 64
# Splits for k > LIST_MAX: about 1.5 k listed keys per query. A split then expects 2/3 of a list
# of the true top k, and overflowing it (which costs one more round, not exactness) is rare.
LISTED_PER_K = 1.5


# The threshold path: sample sizes for k <= 100 and larger k; a pool under MIN_POOL_PER_SAMPLE x m takes the
# exact path. MISS bounds each fallback's chance per query on any data.
SAMPLE_SIZES = (8192, 16384)
MIN_POOL_PER_SAMPLE = 8
MAX_CAPACITY_FRACTION = 0.25  # a buffer for more of the pool than this: the exact path is as cheap
MISS = 1e-8
BUFFER_BYTES = 32 * 2**20
SAMPLE_PIECE = 4096
CAPACITY_QUANTUM = 256
# The chunked passes (CUDA): about CHUNK_BYTES of fp32 products, or of gathered or padded candidate rows, per chunk;
# chunks are whole multiples of CHUNK_QUANTUM candidates.
CHUNK_BYTES = 32 * 2**20
CHUNK_QUANTUM = 256
NO_LISTED_ID = 2**31 - 1  # pads the chunked count's listed ids: above every candidate id
OVERFLOW_ROUNDS = 2
# Queries that left the threshold path since import: {"overflow": reruns, "exact": exact-path queries}.
FALLBACKS: collections.Counter = collections.Counter()


@dataclass(frozen=True)
class Kernels:
    """One backend's building blocks, with the signatures of the Triton launchers: ``split_topk`` and ``pair_scores``
    as in ``_library.KERNEL_SIGNATURES``, ``rank_counts`` as ``triton.rank_statistics.rank_counts``, ``threshold_topk``
    (the threshold pass; None: the exact path only) as ``triton.similarity_topk.threshold_topk``."""

    split_topk: Callable
    pair_scores: Callable
    rank_counts: Callable
    threshold_topk: Callable | None = None


@dataclass(frozen=True)
class ThresholdPlan:
    """m sampled candidates, the threshold's rank j among them, the buffer capacity C, queries per pass."""

    sample: int
    rank: int
    capacity: int
    rows: int


def scales(x: torch.Tensor, metric: str) -> torch.Tensor:
    """fp32 [n] score scales: 1 for "dot", 1 / max(||row||, eps) for "cosine". Three launches whatever n: the norm
    reduces in fp32 without an fp32 copy of x."""
    if metric == "dot":
        return torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).clamp_min(_common.NORM_EPS).reciprocal()


def pool_scales(candidates: torch.Tensor, metric: str, given: torch.Tensor | None) -> torch.Tensor:
    """The pool's scales: ``given`` (an ``ek.Candidates`` handle's) or computed now."""
    return scales(candidates, metric) if given is None else given.contiguous()


def unit_stride_rows(x: torch.Tensor) -> torch.Tensor:
    """The kernels take a row stride but need unit-stride rows: only other layouts are copied."""
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def score_keys(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The kernels' key of (score, id), in torch (for the positives' scores)."""
    return _common.orderable(scores) * (LOW_WORD + 1) + (LOW_WORD - ids)


def decode(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Score keys -> (fp32 values, int64 ids); sentinels and ineligible keys -> (-inf, -1)."""
    real = keys >= REAL_KEY_MIN
    high = keys >> 32
    bits = torch.where(high < 0, high ^ 0x7FFFFFFF, high).to(torch.int32)
    values = torch.where(real, bits.view(torch.float32), float("-inf"))
    ids = torch.where(real, LOW_WORD - (keys & LOW_WORD), -1)
    return values, ids


def best_positive(pos_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The counting passes' view of each row's best positive key: (score s_p, the next float below s_p, id int32).
    A candidate ahead of p on the tie side scores > the next float below s_p."""
    pos_score, pos_id = decode(pos_keys)
    return pos_score, torch.nextafter(pos_score, pos_score.new_tensor(float("-inf"))), pos_id.to(torch.int32)


def decode_ids(keys: torch.Tensor) -> torch.Tensor:
    return torch.where(keys >= REAL_KEY_MIN, LOW_WORD - (keys & LOW_WORD), -1)


def multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan(num_queries: int, num_candidates: int, k: int, device: torch.device | None = None, *,
         multiprocessors: int | None = None) -> tuple[int, int]:
    """(split_size, list_size): enough programs to fill the GPU (``device``'s, or ``multiprocessors`` SMs),
    and lists that hold the top k."""
    list_size = 16 if k <= 16 else LIST_MAX  # two list sizes: two compiled variants per dtype
    row_blocks = math.ceil(num_queries / QUERY_BLOCK)
    if multiprocessors is None:
        multiprocessors = multiprocessor_count(device)
    splits = math.ceil(4 * multiprocessors / row_blocks)  # about 4 programs per SM
    if k > list_size:
        splits = max(splits, math.ceil(LISTED_PER_K * k / list_size))
    split_size = math.ceil(math.ceil(num_candidates / splits) / SPLIT_QUANTUM) * SPLIT_QUANTUM
    return split_size, list_size


def split_tiles(row_tiles: int, column_tiles: int, programs_per_wave: int) -> int:
    """Column tiles per split for a (row tile, split) grid: of the splittings that fill a wave, up to 4 waves' worth,
    the one whose last wave is fullest (the fewest splits on a tie)."""
    fewest = max(1, min(column_tiles, math.ceil(programs_per_wave / row_tiles)))
    best, best_use = column_tiles, 0.0
    for splits in range(fewest, min(column_tiles, 4 * fewest) + 1):
        per_split = math.ceil(column_tiles / splits)
        programs = row_tiles * math.ceil(column_tiles / per_split)
        use = row_tiles * column_tiles / (math.ceil(programs / programs_per_wave) * programs_per_wave * per_split)
        if use > best_use + 1e-9:
            best, best_use = per_split, use
    return best


def _poisson_tail_at_least(mean: float, count: int) -> float:
    """P(Poisson(mean) >= count)."""
    below = sum(math.exp(i * math.log(mean) - mean - math.lgamma(i + 1)) for i in range(count)) if mean > 0 else 1.0
    return max(0.0, 1.0 - below)


def threshold_plan(num_queries: int, num_candidates: int, k: int) -> ThresholdPlan | None:
    """m, j, C and the queries per pass for top-k of ``num_candidates`` (module docstring); None when the pool is
    too small for the threshold to pay off."""
    sample = SAMPLE_SIZES[0] if k <= 100 else SAMPLE_SIZES[1]
    if num_candidates < MIN_POOL_PER_SAMPLE * sample:
        return None
    in_top_k = sample * k / num_candidates  # expected sampled members of the true top k
    rank, below = 1, math.exp(-in_top_k)  # below = P(Poisson(in_top_k) < rank)
    while 1.0 - below > MISS:
        below += math.exp(rank * math.log(in_top_k) - in_top_k - math.lgamma(rank + 1))
        rank += 1
    low, high = float(rank), float(rank) + 20 * math.sqrt(rank) + 40  # mean sampled members of the best C
    while high - low > 0.01:
        middle = (low + high) / 2
        low, high = (middle, high) if 1.0 - _poisson_tail_at_least(middle, rank) > MISS else (low, middle)
    capacity = math.ceil(high * num_candidates / sample / CAPACITY_QUANTUM) * CAPACITY_QUANTUM
    capacity = max(capacity, math.ceil(k / CAPACITY_QUANTUM) * CAPACITY_QUANTUM)
    if capacity > MAX_CAPACITY_FRACTION * num_candidates:
        return None
    # Equal passes of whole 128-query tiles, each with about BUFFER_BYTES of buffers at most.
    passes = math.ceil(num_queries / max(1, BUFFER_BYTES // (capacity * 8)))
    rows = min(num_queries, math.ceil(math.ceil(num_queries / passes) / SPLIT_QUANTUM) * SPLIT_QUANTUM)
    return ThresholdPlan(sample, rank, capacity, rows)


def sample_thresholds(queries, candidates, query_scale, candidate_scale, max_score, plan: ThresholdPlan):
    """fp32 [B]: the plan's j-th best eligible score over a stratified sample of the candidates (fixed seed)."""
    num_candidates, device = candidates.shape[0], queries.device
    strata = torch.arange(plan.sample + 1) * num_candidates // plan.sample
    offsets = torch.rand(plan.sample, generator=torch.Generator().manual_seed(0)) * (strata[1:] - strata[:-1])
    ids = (strata[:-1] + offsets.long()).to(device)
    best = torch.empty((queries.shape[0], 0), dtype=torch.float32, device=device)
    for start in range(0, plan.sample, SAMPLE_PIECE):
        piece = ids[start : start + SAMPLE_PIECE]
        scores = (queries @ candidates[piece].T).float() * query_scale[:, None] * candidate_scale[piece][None, :]
        if max_score is not None:
            scores = scores.masked_fill(scores > max_score[:, None], float("-inf"))
        merged = torch.cat([best, scores], 1)
        best = torch.topk(merged, min(plan.rank, merged.shape[1]), dim=1).values
    return best[:, plan.rank - 1]


def _threshold_pass(kernels: Kernels, queries, candidates, query_scale, candidate_scale, exclude, max_score,
                    threshold, capacity: int, k: int, input_names):
    """One fused pass and the select: (top keys [b, k], eligible survivors [b] held, overflowed [b] bool)."""
    count, scores, ids, nonfinite = kernels.threshold_topk(queries, candidates, query_scale, candidate_scale,
                                                           threshold, max_score, capacity)
    if nonfinite.item():
        raise_nonfinite(**dict(zip(input_names, (queries, candidates))))
    held = torch.arange(capacity, device=queries.device)[None, :] < count.clamp_max(capacity)[:, None].long()
    ids = ids.long()
    if exclude is not None:
        for column in range(exclude.shape[1]):
            held &= ids != exclude[:, column : column + 1]
    keys = torch.where(held, score_keys(scores.masked_fill(~held, 0.0), ids.masked_fill(~held, 0)), KEY_MIN)
    return torch.topk(keys, k, dim=1).values, held.sum(1), count > capacity


def threshold_top_keys(kernels: Kernels, queries, candidates, query_scale, candidate_scale, exclude, max_score,
                       k: int, *, input_names=("queries", "candidates")) -> torch.Tensor:
    """int64 [B, k] like ``exact_top_keys`` (key mode 0): by the threshold path where it applies (module docstring),
    with its fallbacks; otherwise, or without the kernel, by the exact path."""
    num_queries = queries.shape[0]
    plan = threshold_plan(num_queries, candidates.shape[0], k)
    if plan is None or kernels.threshold_topk is None:
        return exact_top_keys(kernels, queries, candidates, query_scale, candidate_scale, exclude, max_score, k,
                              input_names=input_names)
    out = torch.empty((num_queries, k), dtype=torch.int64, device=queries.device)

    def rows_of(x, rows):
        return None if x is None else x[rows]

    for start in range(0, num_queries, plan.rows):
        rows = torch.arange(start, min(start + plan.rows, num_queries), device=queries.device)
        threshold = sample_thresholds(queries[rows], candidates, query_scale[rows], candidate_scale,
                                      rows_of(max_score, rows), plan)
        exact_rows = []
        for round_number in range(OVERFLOW_ROUNDS + 1):
            keys, eligible, overflowed = _threshold_pass(
                kernels, queries[rows], candidates, query_scale[rows], candidate_scale, rows_of(exclude, rows),
                rows_of(max_score, rows), threshold, plan.capacity, k, input_names)
            done = ~overflowed & (eligible >= k)
            out[rows[done]] = keys[done]
            # An overflowed buffer with k eligible scores bounds the k-th best from below: go again above it.
            again = overflowed & (eligible >= k) & (round_number < OVERFLOW_ROUNDS)
            exact_rows.append(rows[~done & ~again])
            if not bool(again.any()):
                break
            FALLBACKS["overflow"] += int(again.sum())
            threshold = decode(keys[again, k - 1])[0]
            rows = rows[again]
        exact = torch.cat(exact_rows)
        if exact.numel():
            FALLBACKS["exact"] += exact.numel()
            out[exact] = exact_top_keys(kernels, queries[exact], candidates, query_scale[exact], candidate_scale,
                                        rows_of(exclude, exact), rows_of(max_score, exact), k,
                                        input_names=input_names)
    return out


def chunk_columns(queries: torch.Tensor) -> int:
    """Candidates per chunk of the CUDA backend's chunked kernels: about ``CHUNK_BYTES`` of fp32 products for the
    queries, or of gathered candidate rows (``pair_scores`` multiplies those at the chunks' shape), whichever is
    less."""
    per_column = max(4 * queries.shape[0], queries.element_size() * queries.shape[1], 1)
    return max(CHUNK_QUANTUM, CHUNK_BYTES // per_column // CHUNK_QUANTUM * CHUNK_QUANTUM)


def chunked(op: Callable) -> Callable:
    """Triton's launcher signature from a chunked kernel ``op`` (``elva::{pair_scores,rank_counts,threshold_topk}_
    {cuda,cpu}``): the chunk width appended, and fp32 products kept IEEE like every other kernel's (cuBLAS reads the
    TF32 flag at each call)."""

    def launcher(queries, candidates, *args):
        call = functools.partial(op, queries, candidates, *args, chunk_columns(queries))
        if not (queries.is_cuda and queries.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32):
            return call()
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return call()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = True

    return launcher


def chunked_rank_counts(op: Callable) -> Callable:
    """``rank_counts`` with Triton's signature from ``elva::rank_counts_{cuda,cpu}``: each row's listed ids (positives
    and exclusions) sorted, the best positive decoded from its key."""
    counts = chunked(op)

    def rank_counts(queries, candidates, query_scale, candidate_scale, positives, exclude, pos_keys):
        listed = positives if exclude is None else torch.cat([positives, exclude], 1)
        listed = torch.where(listed >= 0, listed, NO_LISTED_ID).to(torch.int32).sort(1).values
        ahead, max_neg_score, nonfinite = counts(queries, candidates, query_scale, candidate_scale, listed,
                                                 *best_positive(pos_keys))
        return ahead.long(), max_neg_score, nonfinite

    return rank_counts


def raise_nonfinite(**inputs: torch.Tensor) -> None:
    """A kernel saw a NaN/Inf score: name the input that holds one (error path only)."""
    for name, tensor in inputs.items():
        _validate.finite(name, tensor)
    names = " and ".join(inputs)
    raise ValueError(f"{names} are finite but their scores overflow fp32; scale the embeddings down")


def exact_top_keys(kernels: Kernels, queries, candidates, query_scale, candidate_scale, exclude, max_score, k: int,
                   *, key_mode: int = 0, seed: int = 0, input_names=("queries", "candidates")) -> torch.Tensor:
    """int64 [B, k]: the k largest eligible keys per query, descending (sentinels where too few)."""
    num_queries, num_candidates = queries.shape[0], candidates.shape[0]
    if key_mode == 0 and max_score is None:  # scores are computed anyway: one compiled variant, not two
        max_score = torch.full((num_queries,), float("inf"), device=queries.device)
    split_size, list_size = plan(num_queries, num_candidates, k, queries.device)
    splits = math.ceil(num_candidates / split_size)
    upper = torch.full((num_queries, splits), KEY_MAX, dtype=torch.int64, device=queries.device)
    best = torch.empty((num_queries, 0), dtype=torch.int64, device=queries.device)
    while True:
        lists, nonfinite = kernels.split_topk(queries, candidates, query_scale, candidate_scale, exclude, max_score,
                                              upper, split_size, list_size, key_mode, seed)
        if nonfinite.item():
            raise_nonfinite(**dict(zip(input_names, (queries, candidates))))
        merged = torch.cat([best, lists.view(num_queries, -1)], 1)
        best = torch.topk(merged, min(k, merged.shape[1]), dim=1).values
        if k <= list_size:  # every split listed all of its members of the top k
            return best
        # A full list (no sentinel) is complete only down to its smallest key: re-ask the splits
        # whose smallest listed key still beats the k-th best for the keys below it.
        tau = best[:, k - 1 : k] if best.shape[1] >= k else torch.full_like(best[:, :1], KEY_MIN)
        frontier = lists.min(dim=2).values
        again = (frontier >= REAL_KEY_MIN) & (frontier > tau)
        if not bool(again.any()):
            return best
        upper = torch.where(again, frontier, KEY_MIN)


def similarity_topk(kernels: Kernels, queries, candidates, k, metric, exclude, max_score, candidate_scale=None):
    """``elva::similarity_topk_{triton,cuda}``: exact top-k by the threshold path or from split lists."""
    queries, candidates = unit_stride_rows(queries), unit_stride_rows(candidates)
    if exclude is not None:
        _validate.ids_in_range("exclude", exclude, candidates.shape[0])
        exclude = exclude.contiguous()
    candidate_scale = pool_scales(candidates, metric, candidate_scale)
    keys = threshold_top_keys(kernels, queries, candidates, scales(queries, metric), candidate_scale, exclude,
                              max_score, k)
    return decode(keys)


def rank_statistics(kernels: Kernels, queries, candidates, positives, metric, exclude, candidate_scale=None):
    """``elva::rank_statistics_{triton,cuda}``: the best positive's key, then the negatives ahead of it, counted by
    one pass over the candidates (Triton's: the threshold pass's main loop with a count epilogue; CUDA's: cuBLAS
    chunks and a count kernel). Extra memory: O(B x m) for the positives, and Triton's B x splits partial counts and
    maxima or CUDA's chunk of products with one chunk of gathered or padded rows (2 x ``CHUNK_BYTES`` at most)."""
    check_positives(positives, candidates.shape[0])
    queries, candidates, positives = unit_stride_rows(queries), unit_stride_rows(candidates), positives.contiguous()
    if exclude is not None:
        _validate.ids_in_range("exclude", exclude, candidates.shape[0])
        exclude = exclude.contiguous()
    query_scale = scales(queries, metric)
    candidate_scale = pool_scales(candidates, metric, candidate_scale)
    pos_scores = kernels.pair_scores(queries, candidates, query_scale, candidate_scale, positives)
    listed = positives >= 0
    pos_keys = torch.where(listed, score_keys(pos_scores.masked_fill(~listed, 0.0), positives), KEY_MIN).amax(1)
    ahead, max_neg_score, nonfinite = kernels.rank_counts(queries, candidates, query_scale, candidate_scale,
                                                          positives, exclude, pos_keys)
    if nonfinite.item():
        raise_nonfinite(queries=queries, candidates=candidates)
    return ahead + 1, decode(pos_keys)[0], max_neg_score


def mine_hard_negatives(kernels: Kernels, query_emb, pool_emb, positives, n_hard, n_random, max_score, seed,
                        pool_scale=None):
    """``elva::mine_hard_negatives_{triton,cuda}``: both parts as exact top keys (by score, by random key)."""
    check_positives(positives, pool_emb.shape[0])
    query_emb, pool_emb, positives = unit_stride_rows(query_emb), unit_stride_rows(pool_emb), positives.contiguous()
    num_queries, num_candidates = query_emb.shape[0], pool_emb.shape[0]
    query_scale = scales(query_emb, "cosine")
    candidate_scale = pool_scales(pool_emb, "cosine", pool_scale)
    names = ("query_emb", "pool_emb")
    if n_hard == 0 and max_score is None:  # no kernel computes a score, so none flags NaN/Inf
        _validate.finite("query_emb", query_emb)
        _validate.finite("pool_emb", pool_emb)

    def top_ids(count: int, key_mode: int) -> torch.Tensor:
        if key_mode == 0:
            keys = threshold_top_keys(kernels, query_emb, pool_emb, query_scale, candidate_scale, positives,
                                      max_score, min(count, num_candidates), input_names=names)
        else:
            keys = exact_top_keys(kernels, query_emb, pool_emb, query_scale, candidate_scale, positives, max_score,
                                  min(count, num_candidates), key_mode=1, seed=seed, input_names=names)
        ids = decode_ids(keys)
        return torch.nn.functional.pad(ids, (0, count - ids.shape[1]), value=-1)

    hard_ids = top_ids(n_hard, 0) if n_hard else positives.new_empty((num_queries, 0))
    if n_random == 0:
        return hard_ids
    # The n_hard + n_random smallest random keys always hold n_random that are not hard.
    drawn_ids = top_ids(n_hard + n_random, 1)
    already_hard = (drawn_ids[:, :, None] == hard_ids[:, None, :]).any(2) | (drawn_ids < 0)
    order = torch.sort(already_hard.to(torch.int8), dim=1, stable=True).indices[:, :n_random]
    random_ids = drawn_ids.gather(1, order).masked_fill(already_hard.gather(1, order), -1)
    return torch.cat([hard_ids, random_ids], 1)


def _triton_kernels() -> Kernels | None:
    try:
        from elva_kernels.triton import rank_statistics, similarity_topk
    except ImportError:  # no triton: the dispatcher gives the reason
        return None
    return Kernels(similarity_topk.split_topk, rank_statistics.pair_scores, rank_statistics.rank_counts,
                   similarity_topk.threshold_topk)


def _cuda_kernels() -> Kernels | None:
    if _native.LOAD_ERROR is not None or not _native.has_kernel("elva::split_topk_cuda", "CUDA"):
        return None
    ops = torch.ops.elva
    return chunked_kernels(ops.split_topk_cuda.default, "cuda")


def chunked_kernels(split_topk: Callable, device: str) -> Kernels:
    """The chunked kernels of ``device`` ("cuda", or "cpu": their CPU twins) beside an exact-path ``split_topk``."""
    op = lambda kernel: getattr(torch.ops.elva, f"{kernel}_{device}").default  # noqa: E731
    return Kernels(split_topk, chunked(op("pair_scores")), chunked_rank_counts(op("rank_counts")),
                   chunked(op("threshold_topk")))


def register(op: str, implementation: Callable, check_arguments: Callable) -> None:
    """Serve ``elva::<op>_triton`` and ``elva::<op>_cuda`` with ``implementation(kernels, *args)``.

    The ops can be called directly (torch.ops.elva...), so they repeat the public function's checks.
    """
    for backend, kernels, keys in (("triton", _triton_kernels(), ("cuda", "cpu")), ("cuda", _cuda_kernels(), "CUDA")):
        if kernels is None:
            continue

        def served(*args, _kernels=kernels):
            check_arguments(*args)
            return implementation(_kernels, *args)

        # On CPU tensors the Triton variant serves only the interpreter (TRITON_INTERPRET=1), for tests.
        torch.library.impl(_library.qualname(op, backend), keys)(served)


def limits(call) -> list[str]:
    """Keys hold a candidate id in 31 bits."""
    num_candidates = call.shapes.get("candidates", call.shapes.get("pool_emb", (0,)))[0]
    return [f"N={num_candidates} candidates; the key packs ids below 2**31"] if num_candidates >= 2**31 else []

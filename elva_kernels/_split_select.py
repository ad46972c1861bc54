"""Exact top-k and rank statistics on GPU from per-split kernels (the Triton and CUDA backends).

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
"""
from __future__ import annotations

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


@dataclass(frozen=True)
class Kernels:
    """One backend's three building blocks, with the signatures of ``_library.KERNEL_SIGNATURES``."""

    split_topk: Callable
    pair_scores: Callable
    split_rank_counts: Callable


def scales(x: torch.Tensor, metric: str, *, chunk_elements: int = 1 << 22) -> torch.Tensor:
    """fp32 [n] score scales: 1 for "dot", 1 / max(||row||, eps) for "cosine" (row chunks: no fp32 copy of x)."""
    if metric == "dot":
        return torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    step = max(1, chunk_elements // max(x.shape[1], 1))
    for start in range(0, x.shape[0], step):
        rows = x[start : start + step].float()
        out[start : start + step] = torch.linalg.vector_norm(rows, dim=1).clamp_min(_common.NORM_EPS).reciprocal()
    return out


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


def decode_ids(keys: torch.Tensor) -> torch.Tensor:
    return torch.where(keys >= REAL_KEY_MIN, LOW_WORD - (keys & LOW_WORD), -1)


def _multiprocessors(device: torch.device) -> int:
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
        multiprocessors = _multiprocessors(device)
    splits = math.ceil(4 * multiprocessors / row_blocks)  # about 4 programs per SM
    if k > list_size:
        splits = max(splits, math.ceil(LISTED_PER_K * k / list_size))
    split_size = math.ceil(math.ceil(num_candidates / splits) / SPLIT_QUANTUM) * SPLIT_QUANTUM
    return split_size, list_size


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


def similarity_topk(kernels: Kernels, queries, candidates, k, metric, exclude, max_score):
    """``elva::similarity_topk_{triton,cuda}``: exact top-k from split lists."""
    queries, candidates = unit_stride_rows(queries), unit_stride_rows(candidates)
    if exclude is not None:
        _validate.ids_in_range("exclude", exclude, candidates.shape[0])
        exclude = exclude.contiguous()
    keys = exact_top_keys(kernels, queries, candidates, scales(queries, metric), scales(candidates, metric), exclude,
                          max_score, k)
    return decode(keys)


def rank_statistics(kernels: Kernels, queries, candidates, positives, metric, exclude):
    """``elva::rank_statistics_{triton,cuda}``: the best positive's key, then per-split counts of negatives above it."""
    check_positives(positives, candidates.shape[0])
    queries, candidates, positives = unit_stride_rows(queries), unit_stride_rows(candidates), positives.contiguous()
    if exclude is not None:
        _validate.ids_in_range("exclude", exclude, candidates.shape[0])
        exclude = exclude.contiguous()
    query_scale, candidate_scale = scales(queries, metric), scales(candidates, metric)
    pos_scores = kernels.pair_scores(queries, candidates, query_scale, candidate_scale, positives)
    listed = positives >= 0
    pos_keys = torch.where(listed, score_keys(pos_scores.masked_fill(~listed, 0.0), positives), KEY_MIN).amax(1)
    split_size, _ = plan(queries.shape[0], candidates.shape[0], 1, queries.device)
    ahead, max_neg_keys, nonfinite = kernels.split_rank_counts(
        queries, candidates, query_scale, candidate_scale, positives, exclude, pos_keys, split_size
    )
    if nonfinite.item():
        raise_nonfinite(queries=queries, candidates=candidates)
    pos_score, _ = decode(pos_keys)
    max_neg_score, _ = decode(max_neg_keys.amax(1))
    return ahead.sum(1) + 1, pos_score, max_neg_score


def mine_hard_negatives(kernels: Kernels, query_emb, pool_emb, positives, n_hard, n_random, max_score, seed):
    """``elva::mine_hard_negatives_{triton,cuda}``: both parts as exact top keys (by score, by random key)."""
    check_positives(positives, pool_emb.shape[0])
    query_emb, pool_emb, positives = unit_stride_rows(query_emb), unit_stride_rows(pool_emb), positives.contiguous()
    num_queries, num_candidates = query_emb.shape[0], pool_emb.shape[0]
    query_scale, candidate_scale = scales(query_emb, "cosine"), scales(pool_emb, "cosine")
    names = ("query_emb", "pool_emb")
    if n_hard == 0 and max_score is None:  # no kernel computes a score, so none flags NaN/Inf
        _validate.finite("query_emb", query_emb)
        _validate.finite("pool_emb", pool_emb)

    def top_ids(count: int, key_mode: int) -> torch.Tensor:
        keys = exact_top_keys(kernels, query_emb, pool_emb, query_scale, candidate_scale, positives, max_score,
                              min(count, num_candidates), key_mode=key_mode, seed=seed, input_names=names)
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
    return Kernels(similarity_topk.split_topk, rank_statistics.pair_scores, rank_statistics.split_rank_counts)


def _cuda_kernels() -> Kernels | None:
    if _native.LOAD_ERROR is not None or not _native.has_kernel("elva::split_topk_cuda", "CUDA"):
        return None
    ops = torch.ops.elva
    return Kernels(ops.split_topk_cuda.default, ops.pair_scores_cuda.default, ops.split_rank_counts_cuda.default)


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

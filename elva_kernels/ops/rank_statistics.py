"""A2: rank statistics of the positives over a candidate pool, in one pass over the candidates."""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from elva_kernels import _dispatch, _library, _retrieval, _validate
from elva_kernels.candidates import Candidates, unwrap
from elva_kernels.reference.rank_statistics import rank_statistics as reference_rank_statistics

OP = "rank_statistics"

_dispatch.register(
    OP,
    [
        _dispatch.Backend("triton", OP, devices=("cuda", "cpu"), limits=_retrieval.limits),
        _dispatch.Backend("cuda", OP, devices=("cuda",), limits=_retrieval.limits),
        _dispatch.Backend("cpu", OP, devices=("cpu",)),
        _dispatch.Backend("torch", OP, devices=("cpu", "cuda")),
    ],
)


class RankStatistics(NamedTuple):
    rank: torch.Tensor  # [B] int64, 1-based
    reciprocal_rank: torch.Tensor  # [B] fp32
    hits: torch.Tensor  # [B, len(ks)] bool: rank <= k (M-BEIR's Recall@k)
    pos_score: torch.Tensor  # [B] fp32, the best positive's score
    max_neg_score: torch.Tensor  # [B] fp32, -inf when no negative is eligible
    margin: torch.Tensor  # [B] fp32, pos_score - max_neg_score


def rank_statistics(
    queries: torch.Tensor,
    candidates: torch.Tensor | Candidates,
    positives: torch.Tensor,
    *,
    metric: str = "cosine",
    ks: Sequence[int] = (1, 5, 10),
    exclude: torch.Tensor | None = None,
    backend: str = "auto",
) -> RankStatistics:
    """Where each query's best positive ranks among all candidates, and its score margin.

    Args:
        queries: [B, d] fp32/fp16/bf16.
        candidates: [N, d], same dtype and device, or an ``ek.Candidates`` handle of them (a fixed pool: its
            cosine scales are computed once, not per call).
        positives: int64 [B] or [B, m] candidate ids, -1 padded; every row needs one.
        metric: "cosine" or "dot".
        ks: cut-offs for ``hits``.
        exclude: int64 [B, m'] ids removed from the negatives (a listed positive stays a positive).
        backend: "auto", "triton", "cuda", "cpu" or "torch".

    Returns:
        RankStatistics(rank, reciprocal_rank, hits, pos_score, max_neg_score, margin). ``rank`` is
        1 + the number of non-positive candidates ahead of the best positive in the total order
        (score desc, index asc), so ``hits`` agrees exactly with ``similarity_topk``. Not
        differentiable.

    Extra memory:
        torch: one score tile (``reference._common.TILE_ELEMENTS`` scores) plus O(B * m).
        cpu: the prepared queries (B x d fp32) and per-thread candidate blocks and score tiles.
        Never [B, N].

    Equivalent PyTorch (materialises [B, N])::

        s = F.normalize(q.float(), dim=1) @ F.normalize(c.float(), dim=1).T
        p = best positive per row; neg = not positive and not excluded
        rank = 1 + ((s > s_p) | (s == s_p) & (id < p))[neg].sum(1)
    """
    candidates, candidate_scale = unwrap(candidates, metric)
    positives, exclude, device = check_arguments(queries, candidates, positives, metric, exclude, candidate_scale)
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or len(ks) == 0:
        raise TypeError(f"ks must be a non-empty sequence of ints >= 1; got {ks!r}")
    for cutoff in ks:
        _validate.int_in_range("ks", cutoff, 1)
    call = _dispatch.Call(device, queries.dtype, {"queries": tuple(queries.shape), "candidates": tuple(candidates.shape)})
    chosen = _dispatch.select(OP, backend, call)
    rank, pos_score, max_neg_score = chosen.handle(queries.detach(), candidates.detach(), positives, metric, exclude,
                                                   candidate_scale)
    cutoffs = torch.tensor(list(ks), dtype=torch.int64, device=device)
    return RankStatistics(
        rank=rank,
        reciprocal_rank=1.0 / rank.float(),
        hits=rank[:, None] <= cutoffs,
        pos_score=pos_score,
        max_neg_score=max_neg_score,
        margin=pos_score - max_neg_score,
    )


def check_arguments(queries, candidates, positives, metric, exclude, candidate_scale=None):
    """The SPEC's metadata checks; returns (positives as [B, m], exclude, device)."""
    _validate.tensor("queries", queries, ndim=2, form="[B, d]")
    form_c = "[N, d] with the queries' d"
    _validate.tensor("candidates", candidates, ndim=2, form=form_c)
    _validate.dim_matches("candidates", candidates, 1, queries.shape[1], "d", form_c)
    _validate.same_float_dtype(queries=queries, candidates=candidates)
    _validate.choice("metric", metric, ("cosine", "dot"))
    num_queries = queries.shape[0]
    positives = _validate.id_matrix("positives", positives, num_queries, allow_1d=True, form="int64 [B] or [B, m]")
    if exclude is not None:
        exclude = _validate.id_matrix("exclude", exclude, num_queries, allow_1d=False, form="int64 [B, m]")
    device = _validate.same_device(queries=queries, candidates=candidates, positives=positives, exclude=exclude)
    _validate.pool_scale("candidate_scale", candidate_scale, candidates.shape[0], device)
    return positives, exclude, device


torch.library.impl(_library.qualname(OP, "torch"), "CompositeExplicitAutograd")(reference_rank_statistics)
_retrieval.register(OP, _retrieval.rank_statistics, check_arguments)


def _fake(queries, candidates, positives, metric, exclude, candidate_scale=None):
    rows = queries.shape[0]
    return (
        queries.new_empty(rows, dtype=torch.int64),
        queries.new_empty(rows, dtype=torch.float32),
        queries.new_empty(rows, dtype=torch.float32),
    )


for _name in _library.variants(OP):
    torch.library.register_fake(_name)(_fake)

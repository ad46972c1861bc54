"""Reference: rank of the best positive among the candidates, one candidate tile at a time.

Extra memory: one score tile plus O(B * m) for the positives; never a [B, N] buffer.
"""
from __future__ import annotations

import torch

from elva_kernels import _validate
from elva_kernels.reference import _common


def check_positives(positives: torch.Tensor, num_candidates: int) -> None:
    _validate.ids_in_range("positives", positives, num_candidates)
    empty = (positives < 0).all(1)
    if bool(empty.any()):
        row = int(empty.nonzero()[0])
        raise ValueError(f"positives must list at least one candidate id per query; row {row} has none")


def best_positive(q: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor, metric: str):
    """(score, id) of each row's best positive under the total order; q is prepared, positives [b, m]."""
    listed = positives >= 0
    c = _common.prepare(candidates[positives.clamp_min(0)], metric)  # [b, m, d]
    scores = (c.double() @ q.double()[:, :, None]).squeeze(2).float().masked_fill(~listed, float("-inf"))
    # Highest score first; among equal scores the smallest id (padding sorts last).
    ids = positives.masked_fill(~listed, torch.iinfo(torch.int64).max)
    by_id = torch.sort(ids, dim=1, stable=True).indices
    order = torch.sort(scores.gather(1, by_id), dim=1, descending=True, stable=True).indices
    best = by_id.gather(1, order[:, :1]).squeeze(1)
    rows = torch.arange(positives.shape[0], device=positives.device)
    return scores[rows, best], positives[rows, best]


def rank_statistics(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    positives: torch.Tensor,
    metric: str = "cosine",
    exclude: torch.Tensor | None = None,
    candidate_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rank [B] int64, pos_score [B] fp32, max_neg_score [B] fp32) with positives [B, m] (-1 padded);
    ``candidate_scale`` is not read (each tile is normalised from the rows).

    rank = 1 + the number of non-positive, non-excluded candidates ahead of the best
    positive in the total order; max_neg_score is -inf when no negative is eligible.
    """
    _validate.finite("queries", queries)
    _validate.finite("candidates", candidates)
    check_positives(positives, candidates.shape[0])
    if exclude is not None:
        _validate.ids_in_range("exclude", exclude, candidates.shape[0])
    num_queries, device = queries.shape[0], queries.device
    rank = torch.empty(num_queries, dtype=torch.int64, device=device)
    pos_score = torch.empty(num_queries, device=device)
    max_neg_score = torch.empty(num_queries, device=device)
    for q0, q1 in _common.query_blocks(num_queries):
        q = _common.prepare(queries[q0:q1], metric)
        best_score, best_id = best_positive(q, candidates, positives[q0:q1], metric)
        ahead = torch.zeros(q1 - q0, dtype=torch.int64, device=device)
        top_negative = torch.full((q1 - q0,), float("-inf"), device=device)
        for c0, c1 in _common.candidate_blocks(candidates.shape[0], q1 - q0):
            scores = _common.score_tile(q, _common.prepare(candidates[c0:c1], metric))
            negative = ~_common.membership(positives[q0:q1], c0, c1)
            if exclude is not None:
                negative &= ~_common.membership(exclude[q0:q1], c0, c1)
            ids = torch.arange(c0, c1, device=device)
            before = (scores > best_score[:, None]) | ((scores == best_score[:, None]) & (ids < best_id[:, None]))
            ahead += (before & negative).sum(1)
            top_negative = torch.maximum(top_negative, scores.masked_fill(~negative, float("-inf")).amax(1))
        rank[q0:q1] = ahead + 1
        pos_score[q0:q1] = best_score
        max_neg_score[q0:q1] = top_negative
    return rank, pos_score, max_neg_score

"""Reference: exact top-k of query-candidate similarity, one candidate tile at a time.

Extra memory: one score tile (``_common.TILE_ELEMENTS`` = 2**20 scores) plus the running [B, k] top-k;
never a [B, N] buffer.
"""
from __future__ import annotations

import torch

from elva_kernels import _validate
from elva_kernels.reference import _common


def similarity_topk(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    k: int,
    metric: str = "cosine",
    exclude: torch.Tensor | None = None,
    max_score: torch.Tensor | None = None,
    candidate_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [B, k] fp32 descending, indices [B, k] int64), -inf / -1 where fewer than k are eligible.
    ``candidate_scale`` is not read: each tile is normalised from the rows."""
    _validate.finite("queries", queries)
    _validate.finite("candidates", candidates)
    if exclude is not None:
        _validate.ids_in_range("exclude", exclude, candidates.shape[0])
    num_queries, device = queries.shape[0], queries.device
    values = torch.full((num_queries, k), float("-inf"), device=device)
    indices = torch.full((num_queries, k), -1, dtype=torch.int64, device=device)
    for q0, q1 in _common.query_blocks(num_queries):
        q = _common.prepare(queries[q0:q1], metric)
        best_values, best_indices = values[q0:q1], indices[q0:q1]
        for c0, c1 in _common.candidate_blocks(candidates.shape[0], q1 - q0):
            scores = _common.score_tile(q, _common.prepare(candidates[c0:c1], metric))
            ineligible = torch.zeros_like(scores, dtype=torch.bool)
            if exclude is not None:
                ineligible |= _common.membership(exclude[q0:q1], c0, c1)
            if max_score is not None:
                ineligible |= scores > max_score[q0:q1, None]
            scores = scores.masked_fill(ineligible, float("-inf"))
            best_values, best_indices = _common.fold_tile(
                best_values, best_indices, scores, _common.orderable(scores), c0, k
            )
        values[q0:q1] = best_values
        indices[q0:q1] = best_indices.masked_fill(best_values == float("-inf"), -1)
    return values, indices

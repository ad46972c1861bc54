"""Reference: ELVA's balanced negatives, n_hard by similarity plus n_random drawn uniformly.

The random draw is a streaming selection: every candidate gets a pseudo-random 32-bit key
from (seed, query row, candidate id), and the eligible candidates with the smallest keys
(ties by id) form a uniform random subset. Any backend can compute the same keys, so the
draw is deterministic per seed and independent of tiling, backend and device.

Extra memory: one score tile plus O(B * (n_hard + n_random)); never a [B, N] buffer.
"""
from __future__ import annotations

import torch

from elva_kernels import _validate
from elva_kernels.reference import _common
from elva_kernels.reference.rank_statistics import check_positives

_MASK32 = 0xFFFFFFFF
_NEVER = -(1 << 32)  # the "negated key" of an ineligible candidate: below every real one


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (products stay below 2**59, so int64 never overflows)."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def random_keys(seed: int, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2**32) for candidate ``ids`` [b, n] of query ``rows`` [b, 1]."""
    h = _mix32(torch.full_like(rows, seed & _MASK32))
    h = _mix32(h ^ (rows & _MASK32))
    h = _mix32(h ^ (ids & _MASK32))
    return _mix32(h ^ (ids >> 32))


def mine_hard_negatives(
    query_emb: torch.Tensor,
    pool_emb: torch.Tensor,
    positives: torch.Tensor,
    n_hard: int = 50,
    n_random: int = 50,
    max_score: torch.Tensor | None = None,
    seed: int = 0,
    pool_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """int64 [B, n_hard + n_random]: the hardest eligible negatives, then random ones, -1 padded;
    ``pool_scale`` is not read (each tile is normalised from the rows).

    Eligible: not a positive and, with ``max_score`` [B], scoring at most max_score.
    """
    _validate.finite("query_emb", query_emb)
    _validate.finite("pool_emb", pool_emb)
    check_positives(positives, pool_emb.shape[0])
    num_queries, device = query_emb.shape[0], query_emb.device
    keep = n_hard + n_random  # the smallest keys always hold n_random that are not hard
    result = torch.full((num_queries, keep), -1, dtype=torch.int64, device=device)
    for q0, q1 in _common.query_blocks(num_queries):
        q = _common.prepare(query_emb[q0:q1], "cosine")
        rows = torch.arange(q0, q1, device=device)[:, None]
        hard_values = torch.full((q1 - q0, n_hard), float("-inf"), device=device)
        hard_ids = torch.full((q1 - q0, n_hard), -1, dtype=torch.int64, device=device)
        drawn_keys = torch.full((q1 - q0, keep), _NEVER, dtype=torch.int64, device=device)
        drawn_ids = torch.full((q1 - q0, keep), -1, dtype=torch.int64, device=device)
        for c0, c1 in _common.candidate_blocks(pool_emb.shape[0], q1 - q0):
            scores = _common.score_tile(q, _common.prepare(pool_emb[c0:c1], "cosine"))
            ineligible = _common.membership(positives[q0:q1], c0, c1)
            if max_score is not None:
                ineligible |= scores > max_score[q0:q1, None]
            scores = scores.masked_fill(ineligible, float("-inf"))
            hard_values, hard_ids = _common.fold_tile(hard_values, hard_ids, scores, _common.orderable(scores), c0, n_hard)
            ids = torch.arange(c0, c1, device=device).expand(q1 - q0, -1)
            negated_keys = (-random_keys(seed, rows, ids)).masked_fill(ineligible, _NEVER)
            drawn_keys, drawn_ids = _common.fold_tile(drawn_keys, drawn_ids, negated_keys, negated_keys, c0, keep)
        hard_ids = hard_ids.masked_fill(hard_values == float("-inf"), -1)
        drawn_ids = drawn_ids.masked_fill(drawn_keys == _NEVER, -1)
        # Random picks: smallest keys first, skipping the hard ones; the -1 padding sorts last.
        already_hard = (drawn_ids[:, :, None] == hard_ids[:, None, :]).any(2) | (drawn_ids < 0)
        order = torch.sort(already_hard.to(torch.int8), dim=1, stable=True).indices[:, :n_random]
        random_ids = drawn_ids.gather(1, order).masked_fill(already_hard.gather(1, order), -1)
        result[q0:q1] = torch.cat([hard_ids, random_ids], 1)
    return result

"""Reference: InfoNCE over cosine scores, with an online log-sum-exp one score tile at a time.

With z_ij = cos(q_i, c_j) / tau and l_i the label of query i:

    lse_i     = log sum_j exp(z_ij), over the candidates j that are not false negatives of i
                (the label always counts: listing it as a false negative is an error)
    forward_i = lse_i - z_{i, l_i}

symmetric=True (labels = arange(B)) adds the candidate->query direction for the first B
candidates, with the same mask transposed (query i is skipped for candidate j when j is
a false negative of i):

    rlse_j    = log sum_i exp(z_ij), over the queries i that do not list j
    reverse_j = rlse_j - z_jj
    loss_i    = (forward_i + reverse_i) / 2          (loss_i = forward_i otherwise)

Extra memory: one score tile (``_common.TILE_ELEMENTS`` scores, with its fp64 accumulation)
plus O(B) running maxima and sums; never a [B, N] buffer.
"""
from __future__ import annotations

import torch

from elva_kernels import _validate
from elva_kernels.reference import _common


def membership(ids: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """[b, m] ids (-1 padded) -> [b, stop-start] bool: is candidate ``start + j`` listed in the row.

    Same result as ``_common.membership``, but built by a scatter instead of ``nonzero``, so
    its shapes never depend on the data and the backward (which uses it) traces under
    torch.compile.
    """
    width = stop - start
    inside = (ids >= start) & (ids < stop)
    # Ids outside this tile (and the -1 padding) land in a spare last column, dropped below.
    columns = torch.where(inside, ids - start, width)
    hit = torch.zeros(ids.shape[0], width + 1, dtype=torch.bool, device=ids.device)
    return hit.scatter_(1, columns, True)[:, :width]


def online_logsumexp(
    running_max: torch.Tensor, running_sum: torch.Tensor, tile: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``tile`` along ``dim`` into a running (max, sum of exp(x - max)); -inf entries count as absent."""
    new_max = torch.maximum(running_max, tile.amax(dim))
    # A row masked everywhere so far keeps max -inf; shift it by 0 rather than compute -inf - -inf.
    shift = torch.where(new_max == float("-inf"), 0.0, new_max)
    scaled = running_sum * torch.exp(running_max - shift)
    return new_max, scaled + torch.exp(tile - shift.unsqueeze(dim)).sum(dim)


def _check_data(queries, candidates, labels, temperature, symmetric, false_negatives) -> None:
    _validate.finite("queries", queries)
    _validate.finite("candidates", candidates)
    if not bool(torch.isfinite(temperature) & (temperature > 0)):
        raise ValueError(f"temperature must be a finite value > 0; got {temperature.item()}")
    _validate.ids_in_range("labels", labels, candidates.shape[0], pad=False)
    num_queries = queries.shape[0]
    if symmetric and not torch.equal(labels, torch.arange(num_queries, device=labels.device)):
        raise ValueError(
            f"labels must be arange(B) = arange({num_queries}) when symmetric=True (the first B candidates "
            f"are the positives); got labels starting {labels[:8].tolist()}"
        )
    if false_negatives is not None:
        _validate.ids_in_range("false_negatives", false_negatives, candidates.shape[0])
        clash = (false_negatives == labels[:, None]).any(1)
        if bool(clash.any()):
            row = int(clash.nonzero()[0, 0])
            raise ValueError(
                f"false_negatives must not list a query's own label; row {row} lists its label {int(labels[row])}"
            )


def infonce_loss(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    symmetric: bool = False,
    false_negatives: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [B] fp32, lse [B] fp32): per-query losses (both directions averaged when symmetric)
    and the query->candidate log-sum-exp of cos / tau."""
    _check_data(queries, candidates, labels, temperature, symmetric, false_negatives)
    num_queries, num_candidates, device = queries.shape[0], candidates.shape[0], queries.device
    lse = torch.empty(num_queries, device=device)
    positive = torch.zeros(num_queries, device=device)  # z_{i, l_i}, filled by the tile holding l_i
    if symmetric:
        column_max = torch.full((num_queries,), float("-inf"), device=device)
        column_sum = torch.zeros(num_queries, device=device)
    for q0, q1 in _common.query_blocks(num_queries):
        q = _common.prepare(queries[q0:q1], "cosine")
        row_max = torch.full((q1 - q0,), float("-inf"), device=device)
        row_sum = torch.zeros(q1 - q0, device=device)
        row_labels = labels[q0:q1]
        for c0, c1 in _common.candidate_blocks(num_candidates, q1 - q0):
            z = _common.score_tile(q, _common.prepare(candidates[c0:c1], "cosine")) / temperature
            if false_negatives is not None:
                z = z.masked_fill(membership(false_negatives[q0:q1], c0, c1), float("-inf"))
            row_max, row_sum = online_logsumexp(row_max, row_sum, z, 1)
            in_tile = (row_labels >= c0) & (row_labels < c1)
            picked = z.gather(1, (row_labels - c0).clamp(0, c1 - c0 - 1).unsqueeze(1)).squeeze(1)
            positive[q0:q1] = torch.where(in_tile, picked, positive[q0:q1])
            if symmetric and c0 < num_queries:
                stop = min(c1, num_queries)
                column_max[c0:stop], column_sum[c0:stop] = online_logsumexp(
                    column_max[c0:stop], column_sum[c0:stop], z[:, : stop - c0], 0
                )
        lse[q0:q1] = row_max + row_sum.log()
    loss = lse - positive
    if symmetric:
        loss = (loss + column_max + column_sum.log() - positive) / 2
    return loss, lse

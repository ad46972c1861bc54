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


def check_data(queries, candidates, labels, temperature, symmetric, false_negatives) -> None:
    _validate.finite("queries", queries)
    _validate.finite("candidates", candidates)
    check_ids(queries, candidates, labels, temperature, symmetric, false_negatives)


def check_ids(queries, candidates, labels, temperature, symmetric, false_negatives) -> None:
    """The data checks that do not read the embeddings (the fast backends flag NaN/Inf in their kernels)."""
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
    check_data(queries, candidates, labels, temperature, symmetric, false_negatives)
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


def infonce_loss_backward(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    labels: torch.Tensor,
    temperature: torch.Tensor,
    symmetric: bool,
    false_negatives: torch.Tensor | None,
    loss: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (loss, lse) w.r.t. (queries, candidates, temperature), memory-linear: recompute each score tile, then its softmax from the saved lse.

    With z = s / tau, p_ij = exp(z_ij - lse_i), upstream g (loss) and h (lse), and w = g (g / 2
    for each direction when symmetric):

        dL/dz_ij = (w_i + h_i) p_ij - w_i [j = l_i]
                   + w_j (r_ij - [i = j])            for j < B when symmetric, r_ij = exp(z_ij - rlse_j)
        dL/ds_ij = dL/dz_ij / tau;   dL/dtau = -sum_ij dL/dz_ij s_ij / tau^2

    Masked pairs have z = -inf, hence p = r = 0. dL/ds gives the prepared-row gradients
    dQ' = dS C' and dC' = dS^T Q', mapped back through the normalisation.
    """
    check_data(queries, candidates, labels, temperature, symmetric, false_negatives)  # when called directly
    want_q, want_c, want_t = output_mask
    num_queries, num_candidates = queries.shape[0], candidates.shape[0]
    g, h = grad_loss, grad_lse
    w = g / 2 if symmetric else g
    if symmetric:
        reverse_lse = _reverse_lse(queries, candidates, temperature, loss, lse)
    grad_q = torch.empty_like(queries) if want_q else queries.new_empty(0)
    grad_c_prepared = torch.zeros(candidates.shape, dtype=torch.float32, device=candidates.device) if want_c else None
    grad_t = torch.zeros((), dtype=torch.float64, device=queries.device) if want_t else None
    for q0, q1 in _common.query_blocks(num_queries):
        q = _common.prepare(queries[q0:q1], "cosine")
        grad_q_prepared = torch.zeros_like(q) if want_q else None
        for c0, c1 in _common.candidate_blocks(num_candidates, q1 - q0):
            c = _common.prepare(candidates[c0:c1], "cosine")
            s = _common.score_tile(q, c)
            z = s / temperature
            if false_negatives is not None:
                z = z.masked_fill(membership(false_negatives[q0:q1], c0, c1), float("-inf"))
            label_hit = membership(labels[q0:q1, None], c0, c1).float()
            grad_z = (w + h)[q0:q1, None] * torch.exp(z - lse[q0:q1, None]) - w[q0:q1, None] * label_hit
            if symmetric and c0 < num_queries:
                # Labels are arange(B) here, so label_hit is also the reverse direction's one-hot.
                n = min(c1, num_queries) - c0
                r = torch.exp(z[:, :n] - reverse_lse[None, c0 : c0 + n])
                grad_z[:, :n] += w[None, c0 : c0 + n] * (r - label_hit[:, :n])
            grad_s = grad_z / temperature
            if want_q:
                grad_q_prepared += grad_s @ c
            if want_c:
                grad_c_prepared[c0:c1] += grad_s.T @ q
            if want_t:
                grad_t += (grad_z * s).sum(dtype=torch.float64)
        if want_q:
            grad_q[q0:q1] = _common.prepare_backward(queries[q0:q1], "cosine", grad_q_prepared)
    grad_c = _common.prepare_backward_rows(candidates, "cosine", grad_c_prepared) if want_c else candidates.new_empty(0)
    grad_temperature = temperature.new_empty(0)
    if want_t:
        grad_temperature = (-grad_t / temperature.double() ** 2).to(temperature.dtype)
    return grad_q, grad_c, grad_temperature


def _reverse_lse(queries, candidates, temperature, loss, lse) -> torch.Tensor:
    """The candidate->query lse of the first B candidates, recovered from the saved outputs.

    loss_i = (lse_i - z_ii + rlse_i - z_ii) / 2, so rlse_i = 2 loss_i - lse_i + 2 z_ii: O(B d)
    work instead of another pass over the [B, B] score tiles. The error is a few ulps of the
    largest of |loss|, |lse| and |z|, the same order as rlse's own fp32 rounding.
    """
    num_queries = queries.shape[0]
    diagonal = torch.empty(num_queries, device=queries.device)
    for q0, q1 in _common.query_blocks(num_queries):
        q = _common.prepare(queries[q0:q1], "cosine").double()
        c = _common.prepare(candidates[q0:q1], "cosine").double()
        # Summed in float64 and rounded to fp32, like _common.score_tile, so it matches the forward's s_ii.
        diagonal[q0:q1] = (q * c).sum(1).float()
    z_diagonal = diagonal / temperature  # fp32, as in the forward
    return (2 * loss.double() - lse.double() + 2 * z_diagonal.double()).float()

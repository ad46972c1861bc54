"""Materialising implementations of the retrieval ops: fine at test sizes, and obviously right."""
from __future__ import annotations

import torch


def scores(queries, candidates, metric="cosine"):
    """Full [B, N] score matrix: fp32-prepared rows, float64 sums, one rounding to fp32."""
    q, c = queries.float(), candidates.float()
    if metric == "cosine":
        q, c = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(c, dim=1)
    return (q.double() @ c.double().T).float()


def score_tolerance(queries, candidates, metric="cosine") -> torch.Tensor:
    """[B, 1] absolute error bound of an fp32-accumulated score, any summation order: d * 2**-24 * |q| * max |c|
    over the prepared rows (at least 1e-5). Backends that sum in fp32 on tensor cores differ from the float64
    reference by up to this much."""
    q, c = queries.float(), candidates.float()
    if metric == "cosine":
        q, c = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(c, dim=1)
    bound = q.shape[1] * 2.0**-24 * torch.linalg.vector_norm(q, dim=1) * torch.linalg.vector_norm(c, dim=1).max()
    return bound.clamp_min(1e-5)[:, None]


def total_order(s: torch.Tensor) -> torch.Tensor:
    """Per row, candidate ids sorted by score descending then id ascending."""
    return torch.sort(s, dim=1, descending=True, stable=True).indices


def topk(queries, candidates, k, metric="cosine", exclude=None, max_score=None):
    s = scores(queries, candidates, metric)
    if exclude is not None:
        for row, ids in enumerate(exclude.tolist()):
            s[row, [i for i in ids if i >= 0]] = float("-inf")
    if max_score is not None:
        limit = torch.as_tensor(max_score, dtype=torch.float32).expand(s.shape[0])
        s[s > limit[:, None]] = float("-inf")
    order = total_order(s)[:, :k]
    values = s.gather(1, order)
    return values, order.masked_fill(values == float("-inf"), -1)

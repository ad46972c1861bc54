"""Materialising implementations of the retrieval ops: fine at test sizes, and obviously right."""
from __future__ import annotations

import torch


def scores(queries, candidates, metric="cosine"):
    """Full [B, N] score matrix: fp32-prepared rows, float64 sums, one rounding to fp32."""
    q, c = queries.float(), candidates.float()
    if metric == "cosine":
        q, c = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(c, dim=1)
    return (q.double() @ c.double().T).float()


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

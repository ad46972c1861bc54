"""Pieces shared by the reference ops: scoring, tiling and the total order.

Scores: cosine normalises each side in fp32 (eps 1e-12); dot upcasts to fp32. The
products are then summed in float64 and rounded once to fp32, so a (query, candidate)
score does not depend on the tile it was computed in: exact duplicates score
bitwise-equal, and every reference op sees the same score for the same pair.
"""
from __future__ import annotations

import torch

NORM_EPS = 1e-12
# Elements of one score tile (fp32 + its fp64 accumulation: 48 MiB at this size).
TILE_ELEMENTS = 1 << 20
QUERY_BLOCK = 64


def prepare(x: torch.Tensor, metric: str) -> torch.Tensor:
    """fp32 rows, L2-normalised for cosine (the semantics of F.normalize with eps 1e-12)."""
    x = x.float()
    if metric == "cosine":
        x = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(NORM_EPS)
    return x


def score_tile(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[b, d] x [n, d] prepared rows -> [b, n] fp32 scores, summed in float64."""
    return (q.double() @ c.double().T).float()


def query_blocks(num_queries: int):
    for start in range(0, num_queries, QUERY_BLOCK):
        yield start, min(start + QUERY_BLOCK, num_queries)


def candidate_blocks(num_candidates: int, block_rows: int):
    """Candidate ranges sized so that one tile holds about TILE_ELEMENTS scores."""
    step = max(256, TILE_ELEMENTS // max(block_rows, 1))
    for start in range(0, num_candidates, step):
        yield start, min(start + step, num_candidates)


def membership(ids: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """[b, m] ids (-1 padded) -> [b, stop-start] bool: is candidate ``start + j`` listed in the row."""
    hit = torch.zeros(ids.shape[0], stop - start, dtype=torch.bool, device=ids.device)
    inside = (ids >= start) & (ids < stop)
    rows, cols = inside.nonzero(as_tuple=True)
    hit[rows, ids[rows, cols] - start] = True
    return hit


def orderable(scores: torch.Tensor) -> torch.Tensor:
    """fp32 scores -> int64 keys with the same order (IEEE bits, negatives flipped; -0.0 == +0.0)."""
    bits = (scores + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def tile_topk(keys: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k largest ``keys`` [b, n] per row, ties by smaller position, in that order.

    ``keys`` must lie in [-2**32, 2**32). Folding the position into the low 31 bits makes every
    key unique, so ``torch.topk`` (which breaks ties arbitrarily) is exact under the total order.
    """
    positions = torch.arange(keys.shape[1], device=keys.device)
    unique = keys * (1 << 31) + ((1 << 31) - 1 - positions)
    return torch.topk(unique, min(k, keys.shape[1]), dim=1).indices


def merge_topk(values: torch.Tensor, indices: torch.Tensor, k: int):
    """Top-k of rows already laid out in ascending candidate order for equal values.

    A stable descending sort then yields the total order: score descending, index ascending.
    Ineligible entries carry -inf and sort last.
    """
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, order), indices.gather(1, order)


def normalize_backward(x: torch.Tensor, grad_unit: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Gradient w.r.t. ``x`` of x / max(||x||, eps) (fp32), given the gradient of that output."""
    x = x.float()
    raw_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    norm = raw_norm.clamp_min(eps)
    unit = x / norm
    # d(x/|x|) = (g - u (u.g)) / |x|; below eps the norm is a constant and d(x/eps) = g/eps.
    radial = (unit * grad_unit).sum(-1, keepdim=True)
    return torch.where(raw_norm > eps, (grad_unit - unit * radial) / norm, grad_unit / eps)


def prepare_backward(x: torch.Tensor, metric: str, grad_prepared: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. ``x`` of ``prepare(x, metric)``, in x's dtype."""
    if metric == "dot":
        return grad_prepared.to(x.dtype)
    return normalize_backward(x, grad_prepared).to(x.dtype)


def prepare_backward_rows(x: torch.Tensor, metric: str, grad_prepared: torch.Tensor) -> torch.Tensor:
    """``prepare_backward`` over row blocks, so its fp32 temporaries stay tile-sized for a whole pool."""
    grad = torch.empty_like(x)
    for start, stop in candidate_blocks(x.shape[0], x.shape[1]):
        grad[start:stop] = prepare_backward(x[start:stop], metric, grad_prepared[start:stop])
    return grad


def fold_tile(best_values, best_indices, tile_values, tile_keys, first_index: int, k: int):
    """Fold one tile (candidates ``first_index + j``) into a running top-k under the total order.

    ``tile_keys`` orders the tile's entries (``orderable(scores)`` or any integer key); the running
    best precede the tile, so for equal values they keep the smaller indices.
    """
    picked = tile_topk(tile_keys, k)
    return merge_topk(
        torch.cat([best_values, tile_values.gather(1, picked)], 1), torch.cat([best_indices, picked + first_index], 1), k
    )

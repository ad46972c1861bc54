"""A5: ELVA's balanced negatives: the hardest n_hard by similarity plus n_random uniform ones."""
from __future__ import annotations

import torch

from elva_kernels import _dispatch, _library, _retrieval, _validate
from elva_kernels.candidates import Candidates, unwrap
from elva_kernels.reference.mine_hard_negatives import mine_hard_negatives as reference_mine_hard_negatives

OP = "mine_hard_negatives"

_dispatch.register(
    OP,
    [
        _dispatch.Backend("triton", OP, devices=("cuda", "cpu"), limits=_retrieval.limits),
        _dispatch.Backend("cuda", OP, devices=("cuda",), limits=_retrieval.limits),
        _dispatch.Backend("cpu", OP, devices=("cpu",)),
        _dispatch.Backend("torch", OP, devices=("cpu", "cuda")),
    ],
)


def mine_hard_negatives(
    query_emb: torch.Tensor,
    pool_emb: torch.Tensor | Candidates,
    positives: torch.Tensor,
    *,
    n_hard: int = 50,
    n_random: int = 50,
    max_score: float | torch.Tensor | None = None,
    seed: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Per query, ``n_hard`` hard negatives then ``n_random`` random ones, as int64 candidate ids.

    Args:
        query_emb: [B, d] fp32/fp16/bf16.
        pool_emb: [N, d], same dtype and device, or an ``ek.Candidates`` handle of them (a fixed pool: its
            scales are computed once, not per call).
        positives: int64 [B] or [B, m] ids (-1 padded), never returned.
        n_hard, n_random: how many of each (>= 0, not both 0).
        max_score: float or [B]; candidates scoring (cosine) above it are near-duplicates
            of the positive and skipped by both parts.
        seed: the random part is a deterministic function of (seed, row, candidate id).
        backend: "auto", "triton", "cuda", "cpu" or "torch".

    Returns:
        int64 [B, n_hard + n_random]: the top ``n_hard`` eligible by the total order (as
        ``similarity_topk`` with the positives excluded), then ``n_random`` eligible ids drawn
        uniformly from those not already chosen. A short pool leaves -1 in each part's tail.

    Extra memory:
        torch: one score tile plus O(B * (n_hard + n_random)).
        cpu: similarity_topk's (the hard part) plus O(B * (n_hard + n_random)) for the draw.

    Equivalent PyTorch (materialises [B, N])::

        s = cos(q, pool); eligible = ~is_positive & (s <= max_score)
        hard = top n_hard of s over eligible
        random = n_random ids of eligible - hard, chosen uniformly
    """
    pool_emb, pool_scale = unwrap(pool_emb, "cosine")
    positives, max_score, device = check_arguments(query_emb, pool_emb, positives, n_hard, n_random, max_score, seed,
                                                   pool_scale)
    call = _dispatch.Call(device, query_emb.dtype, {"query_emb": tuple(query_emb.shape), "pool_emb": tuple(pool_emb.shape)})
    chosen = _dispatch.select(OP, backend, call)
    return chosen.handle(query_emb.detach(), pool_emb.detach(), positives, n_hard, n_random, max_score, seed,
                         pool_scale)


def check_arguments(query_emb, pool_emb, positives, n_hard, n_random, max_score, seed, pool_scale=None):
    """The SPEC's metadata checks; returns (positives as [B, m], max_score as fp32 [B] or None, device)."""
    _validate.tensor("query_emb", query_emb, ndim=2, form="[B, d]")
    form_pool = "[N, d] with query_emb's d"
    _validate.tensor("pool_emb", pool_emb, ndim=2, form=form_pool)
    _validate.dim_matches("pool_emb", pool_emb, 1, query_emb.shape[1], "d", form_pool)
    _validate.same_float_dtype(query_emb=query_emb, pool_emb=pool_emb)
    num_queries = query_emb.shape[0]
    positives = _validate.id_matrix("positives", positives, num_queries, allow_1d=True, form="int64 [B] or [B, m]")
    _validate.int_in_range("n_hard", n_hard, 0)
    _validate.int_in_range("n_random", n_random, 0)
    if n_hard + n_random == 0:
        raise ValueError("n_hard + n_random must be >= 1; got 0 and 0")
    _validate.int_in_range("seed", seed, 0)
    device = _validate.same_device(query_emb=query_emb, pool_emb=pool_emb, positives=positives)
    max_score = _validate.per_query_float("max_score", max_score, num_queries, device)
    _validate.pool_scale("pool_scale", pool_scale, pool_emb.shape[0], device)
    return positives, max_score, device


torch.library.impl(_library.qualname(OP, "torch"), "CompositeExplicitAutograd")(reference_mine_hard_negatives)
_retrieval.register(OP, _retrieval.mine_hard_negatives, check_arguments)


def _fake(query_emb, pool_emb, positives, n_hard, n_random, max_score, seed, pool_scale=None):
    return query_emb.new_empty((query_emb.shape[0], n_hard + n_random), dtype=torch.int64)


for _name in _library.variants(OP):
    torch.library.register_fake(_name)(_fake)

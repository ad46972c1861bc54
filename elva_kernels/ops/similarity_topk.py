"""A1: exact top-k similarity search in one pass; the [B, N] score matrix is never stored."""
from __future__ import annotations

import torch

from elva_kernels import _dispatch, _library, _retrieval, _validate
from elva_kernels.candidates import Candidates, unwrap
from elva_kernels.reference import _common
from elva_kernels.reference.similarity_topk import similarity_topk as reference_similarity_topk

OP = "similarity_topk"

_dispatch.register(
    OP,
    [
        _dispatch.Backend("triton", OP, devices=("cuda", "cpu"), max_k=4096, limits=_retrieval.limits),
        _dispatch.Backend("cuda", OP, devices=("cuda",), max_k=4096, limits=_retrieval.limits),
        _dispatch.Backend("cpu", OP, devices=("cpu",)),
        _dispatch.Backend("torch", OP, devices=("cpu", "cuda")),
    ],
)


def similarity_topk(
    queries: torch.Tensor,
    candidates: torch.Tensor | Candidates,
    k: int,
    *,
    metric: str = "cosine",
    exclude: torch.Tensor | None = None,
    max_score: float | torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k candidates per query under the total order (score desc, index asc).

    Args:
        queries: [B, d] fp32/fp16/bf16.
        candidates: [N, d], same dtype and device, or an ``ek.Candidates`` handle of them (a fixed pool: its
            cosine scales are computed once, not per call).
        k: 1 <= k <= N.
        metric: "cosine" (both sides L2-normalised in fp32, eps 1e-12) or "dot".
        exclude: int64 [B, m] candidate ids to skip per query (-1 = padding).
        max_score: float or [B] tensor; candidates scoring above it are skipped.
        backend: "auto", "triton", "cuda", "cpu" or "torch".

    Returns:
        values [B, k] fp32 in descending order and indices [B, k] int64. When fewer than k
        candidates are eligible the tail holds -inf and -1. Gradients of ``values`` flow to
        ``queries`` and ``candidates`` through the selected pairs only.

    Extra memory:
        torch: one score tile (``reference._common.TILE_ELEMENTS`` fp32 + fp64) plus the [B, k]
        outputs. cpu: the prepared queries (B x d fp32), per-thread candidate blocks and score
        tiles, and top-k buffers of B x (k + min(max(k, 256), 16384)) entries. The backward adds a
        tile-sized gather and an fp32 [N, d] candidate-gradient accumulator.

    Equivalent PyTorch (materialises [B, N], which this op never does)::

        s = F.normalize(q.float(), dim=1) @ F.normalize(c.float(), dim=1).T
        s[excluded] = -inf; s[s > max_score] = -inf
        values, indices = s.topk(k)   # plus index-ascending ties

    Example:
        >>> values, indices = similarity_topk(torch.randn(4, 8), torch.randn(100, 8), k=5)
    """
    candidates, candidate_scale = unwrap(candidates, metric)
    exclude, max_score, device = check_arguments(queries, candidates, k, metric, exclude, max_score, candidate_scale)
    call = _dispatch.Call(
        device, queries.dtype, {"queries": tuple(queries.shape), "candidates": tuple(candidates.shape)}, k=k
    )
    chosen = _dispatch.select(OP, backend, call)
    return chosen.handle(queries, candidates, k, metric, exclude, max_score, candidate_scale)


def check_arguments(queries, candidates, k, metric, exclude, max_score, candidate_scale=None):
    """The SPEC's metadata checks; returns (exclude, max_score as fp32 [B] or None, device)."""
    form_q, form_c = "[B, d]", "[N, d] with the queries' d"
    _validate.tensor("queries", queries, ndim=2, form=form_q)
    _validate.tensor("candidates", candidates, ndim=2, form=form_c)
    _validate.dim_matches("candidates", candidates, 1, queries.shape[1], "d", form_c)
    _validate.same_float_dtype(queries=queries, candidates=candidates)
    _validate.choice("metric", metric, ("cosine", "dot"))
    _validate.int_in_range("k", k, 1, candidates.shape[0])
    if exclude is not None:
        exclude = _validate.id_matrix("exclude", exclude, queries.shape[0], allow_1d=False, form="int64 [B, m]")
    device = _validate.same_device(queries=queries, candidates=candidates, exclude=exclude)
    max_score = _validate.per_query_float("max_score", max_score, queries.shape[0], device)
    _validate.pool_scale("candidate_scale", candidate_scale, candidates.shape[0], device)
    return exclude, max_score, device


torch.library.impl(_library.qualname(OP, "torch"), "CompositeExplicitAutograd")(reference_similarity_topk)
_retrieval.register(OP, _retrieval.similarity_topk, check_arguments)


def _fake(queries, candidates, k, metric, exclude, max_score, candidate_scale=None):
    values = queries.new_empty((queries.shape[0], k), dtype=torch.float32)
    return values, queries.new_empty((queries.shape[0], k), dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    queries, candidates, _, metric = inputs[:4]
    ctx.metric = metric
    ctx.save_for_backward(queries, candidates, output[1])


def _backward(ctx, grad_values, _grad_indices):
    """Gradients through the selected pairs only: v[i, j] = <q_i', c_idx[i, j]'>, primes = prepared rows."""
    queries, candidates, indices = ctx.saved_tensors
    want_q, want_c = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_q = torch.empty_like(queries) if want_q else None
    grad_c_prepared = torch.zeros(candidates.shape, dtype=torch.float32, device=candidates.device) if want_c else None
    k, d = indices.shape[1], queries.shape[1]
    rows = max(1, _common.TILE_ELEMENTS // (k * d))  # a [rows, k, d] gather stays tile-sized
    for q0 in range(0, queries.shape[0], rows):
        q1 = min(q0 + rows, queries.shape[0])
        selected = indices[q0:q1]
        real = selected >= 0
        weight = torch.where(real, grad_values[q0:q1], 0.0)  # padded slots carry no gradient
        ids = selected.clamp_min(0)
        q = _common.prepare(queries[q0:q1], ctx.metric)
        if want_q:
            c = _common.prepare(candidates[ids.flatten()], ctx.metric).view(*ids.shape, -1)
            grad_q[q0:q1] = _common.prepare_backward(queries[q0:q1], ctx.metric, torch.einsum("bk,bkd->bd", weight, c))
        if want_c:
            grad_c_prepared.index_add_(0, ids.flatten(), (weight[:, :, None] * q[:, None, :]).flatten(0, 1))
    grad_c = _common.prepare_backward_rows(candidates, ctx.metric, grad_c_prepared) if want_c else None
    return grad_q, grad_c, None, None, None, None, None


for _name in _library.variants(OP):
    torch.library.register_fake(_name)(_fake)
    torch.library.register_autograd(_name, _backward, setup_context=_setup_context)

"""Triton kernels of infonce_loss: online log-sum-exp forward, and a backward that recomputes score tiles.

Scores come from the score routine of triton/similarity_topk.py: raw tl.dot tiles (fp32
accumulation) scaled by both rows' inverse norms, so z = cos / tau without normalised copies.

* ``forward_kernel``: a program owns BLOCK_M queries and streams every candidate tile, folding
  z into a running (max, sum) per row; it keeps lse and the label's z. Nothing of size [B, N].
* ``column_lse_kernel`` (symmetric only): a program owns BLOCK_N of the first B candidates and
  streams the query tiles for the candidate -> query log-sum-exp.
* ``grad_queries_kernel`` / ``grad_candidates_kernel``: recompute each tile, form dL/dz from the
  saved lse (and the reverse lse) in fp32, and accumulate the prepared rows' gradients in fp32 [B, d] /
  [N, d] buffers, d chunk by d chunk, each row owned by one program (no atomics). For half rows
  dL/ds enters the products in the rows' dtype, scaled by a power of two into its range
  (``_grad_scale``), so dQ = dS C and dC = dS^T Q run on tensor cores with fp32 accumulation, as
  FlashAttention's backward does. The first kernel also sums dL/dz * s for the temperature.

The launchers map the prepared-row gradients back through the normalisation with the
reference's ``_common.prepare_backward_rows``.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from elva_kernels import _retrieval
from elva_kernels.reference import _common
from elva_kernels.reference import infonce_loss as reference
from elva_kernels.triton import aot
from elva_kernels.triton.rank_statistics import pair_scores
from elva_kernels.triton.similarity_topk import (
    BLOCK_K, BLOCK_M, BLOCK_N, NUM_STAGES, NUM_WARPS, _accumulate, _listed, _max_with_nan, _row_magnitude,
    _score_tile, upcast_for,
)

# The forward's tiles per dtype (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): 128 x 128 for half rows (HGMMA
# m64n128 per warpgroup); fp32 rows take exact FFMAs, whose operands need registers, so they keep 64 x 64.
FORWARD_TILES = {torch.float16: (128, 128, 64, 8, 3), torch.bfloat16: (128, 128, 64, 8, 3),
                 torch.float32: (BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES)}


@triton.jit
def _logits(q_ptr, c_ptr, q_scale_ptr, c_scale_ptr, fn_ptr, fn_width, tau, rows, cols, row_ok, col_ok, dim,
            stride_q, stride_c, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            UPCAST: tl.constexpr):
    """(scores, z = scores / tau with -inf at padding and false negatives) of a [BLOCK_M, BLOCK_N] tile. Forward and
    backward must form z alike (the backward's p = exp(z - lse) turns an ulp of z into 1e-5 of p at tau = 0.01), so
    all kernels divide."""
    scores = _score_tile(q_ptr, c_ptr, q_scale_ptr, c_scale_ptr, rows, cols, row_ok, col_ok, dim, stride_q, stride_c,
                         BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
    skipped = ~(row_ok[:, None] & col_ok[None, :]) | _listed(fn_ptr, rows, row_ok, fn_width, cols, BLOCK_M, BLOCK_N)
    return scores, tl.where(skipped, float("-inf"), scores / tau)


@triton.jit
def forward_kernel(
    q_ptr, c_ptr, q_scale_ptr, c_scale_ptr, labels_ptr, fn_ptr, fn_width, tau_ptr,
    lse_ptr, positive_ptr, largest_ptr,  # fp32 [B] each; largest: the row's largest |score| (NaN if one is NaN)
    num_queries, num_candidates, dim, stride_q, stride_c,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_queries
    tau = tl.load(tau_ptr)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    # The online log-sum-exp shifts by the row's running max in natural units: exp2 of z log2(e) would round each
    # term by |z| 2**-24 (1e-5 relative at tau = 0.01), which the backward's p = exp(z - lse) inherits.
    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    positive = tl.zeros([BLOCK_M], dtype=tl.float32)
    largest = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, num_candidates, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < num_candidates
        scores, z = _logits(q_ptr, c_ptr, q_scale_ptr, c_scale_ptr, fn_ptr, fn_width, tau, rows, cols, row_ok,
                            col_ok, dim, stride_q, stride_c, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
        largest = _max_with_nan(largest, _row_magnitude(scores))  # padding scores 0
        here = (labels - start).to(tl.int32)  # the label's lane in this tile: a 32-bit compare per score
        positive += tl.sum(tl.where(tl.arange(0, BLOCK_N)[None, :] == here[:, None], z, 0.0), axis=1)
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row masked so far: no -inf - -inf
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        running_max = new_max
    lse = running_max + tl.log(tl.where(row_ok, running_sum, 1.0))
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(positive_ptr + rows, positive, mask=row_ok)
    tl.store(largest_ptr + rows, largest, mask=row_ok)


@triton.jit
def column_lse_kernel(
    q_ptr, c_ptr, q_scale_ptr, c_scale_ptr, fn_ptr, fn_width, tau_ptr, column_lse_ptr,
    num_queries, dim, stride_q, stride_c,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < num_queries  # the first B candidates are the positives
    tau = tl.load(tau_ptr)
    running_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, num_queries, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < num_queries
        _, z = _logits(q_ptr, c_ptr, q_scale_ptr, c_scale_ptr, fn_ptr, fn_width, tau, rows, cols, row_ok, col_ok,
                       dim, stride_q, stride_c, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(z - shift[None, :]), axis=0)
        running_max = new_max
    tl.store(column_lse_ptr + cols, running_max + tl.log(tl.where(col_ok, running_sum, 1.0)), mask=col_ok)


@triton.jit
def _grad_logits(z, rows, cols, row_ok, col_ok, labels, lse, weight, upstream_lse, column_lse_ptr, weight_ptr,
                 num_queries, SYMMETRIC: tl.constexpr):
    """dL/dz of a tile (reference.infonce_loss_backward's formula); 0 at masked pairs."""
    p = tl.exp(z - lse[:, None])
    grad = (weight + upstream_lse)[:, None] * p - tl.where(cols[None, :] == labels[:, None], weight[:, None], 0.0)
    if SYMMETRIC:
        paired = col_ok & (cols < num_queries)
        column_lse = tl.load(column_lse_ptr + cols, mask=paired, other=float("inf"))
        column_weight = tl.load(weight_ptr + cols, mask=paired, other=0.0)
        r = tl.exp(z - column_lse[None, :])
        grad += column_weight[None, :] * (r - (rows[:, None] == cols[None, :]).to(tl.float32))
    return tl.where(row_ok[:, None] & col_ok[None, :], grad, 0.0)


@triton.jit
def _product_operand(grad_s, grad_scale, rows_ptr):
    """dL/ds as the left operand of a gradient product: for half rows, scaled by ``grad_scale`` and rounded to the
    rows' dtype, so the product runs on tensor cores with fp32 accumulation (dL/dz, p and lse stay fp32)."""
    if rows_ptr.dtype.element_ty == tl.float32:
        return grad_s
    return (grad_s * grad_scale).to(rows_ptr.dtype.element_ty)


@triton.jit
def _gradient_product(grad_s, rows, grad_scale, UPCAST: tl.constexpr):
    """fp32 grad_s @ rows, undoing ``_product_operand``'s scale (a power of two: exact)."""
    part = _accumulate(tl.zeros([grad_s.shape[0], rows.shape[1]], dtype=tl.float32), grad_s, rows, UPCAST)
    return part if grad_s.dtype == tl.float32 else part * (1.0 / grad_scale)


@triton.jit
def grad_queries_kernel(
    q_ptr, c_ptr, q_scale_ptr, c_scale_ptr, labels_ptr, fn_ptr, fn_width, tau_ptr,
    lse_ptr, weight_ptr, upstream_lse_ptr, column_lse_ptr,
    grad_q_ptr,  # fp32 [B, dim], zeroed: dL/dq' of the prepared rows
    grad_tau_ptr,  # fp32 [programs]: this program's sum of dL/dz * s
    grad_scale_ptr,  # fp32 [1], half rows: the power of two that brings dL/ds into their range (``_grad_scale``)
    num_queries, num_candidates, dim, stride_q, stride_c,
    SYMMETRIC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_queries
    tau = tl.load(tau_ptr)
    grad_scale = tl.load(grad_scale_ptr)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
    upstream_lse = tl.load(upstream_lse_ptr + rows, mask=row_ok, other=0.0)
    grad_tau = tl.zeros([BLOCK_M], dtype=tl.float32)
    kk = tl.arange(0, BLOCK_K)
    for start in range(0, num_candidates, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < num_candidates
        scores, z = _logits(q_ptr, c_ptr, q_scale_ptr, c_scale_ptr, fn_ptr, fn_width, tau, rows, cols, row_ok,
                            col_ok, dim, stride_q, stride_c, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
        grad_z = _grad_logits(z, rows, cols, row_ok, col_ok, labels, lse, weight, upstream_lse, column_lse_ptr,
                              weight_ptr, num_queries, SYMMETRIC)
        grad_tau += tl.sum(grad_z * scores, axis=1)
        # dL/dq'_i = sum_j dL/ds_ij c'_j, with c'_j = c_j * scale_j.
        c_scale = tl.load(c_scale_ptr + cols, mask=col_ok, other=0.0)
        grad_s = _product_operand((grad_z / tau) * c_scale[None, :], grad_scale, c_ptr)
        for k0 in range(0, dim, BLOCK_K):
            k = k0 + kk
            k_ok = k < dim
            c = tl.load(c_ptr + cols[:, None] * stride_c + k[None, :], mask=col_ok[:, None] & k_ok[None, :],
                        other=0.0)
            out = grad_q_ptr + rows[:, None] * dim + k[None, :]
            out_ok = row_ok[:, None] & k_ok[None, :]
            tl.store(out, tl.load(out, mask=out_ok, other=0.0) + _gradient_product(grad_s, c, grad_scale, UPCAST),
                     mask=out_ok)
    tl.store(grad_tau_ptr + tl.program_id(0), tl.sum(grad_tau, axis=0))


@triton.jit
def grad_candidates_kernel(
    q_ptr, c_ptr, q_scale_ptr, c_scale_ptr, labels_ptr, fn_ptr, fn_width, tau_ptr,
    lse_ptr, weight_ptr, upstream_lse_ptr, column_lse_ptr,
    grad_c_ptr,  # fp32 [N, dim], zeroed: dL/dc' of the prepared rows
    grad_scale_ptr,  # as grad_queries_kernel's
    num_queries, num_candidates, dim, stride_q, stride_c,
    SYMMETRIC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < num_candidates
    tau = tl.load(tau_ptr)
    grad_scale = tl.load(grad_scale_ptr)
    kk = tl.arange(0, BLOCK_K)
    for start in range(0, num_queries, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < num_queries
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
        upstream_lse = tl.load(upstream_lse_ptr + rows, mask=row_ok, other=0.0)
        _, z = _logits(q_ptr, c_ptr, q_scale_ptr, c_scale_ptr, fn_ptr, fn_width, tau, rows, cols, row_ok, col_ok,
                       dim, stride_q, stride_c, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
        grad_z = _grad_logits(z, rows, cols, row_ok, col_ok, labels, lse, weight, upstream_lse, column_lse_ptr,
                              weight_ptr, num_queries, SYMMETRIC)
        # dL/dc'_j = sum_i dL/ds_ij q'_i, with q'_i = q_i * scale_i.
        q_scale = tl.load(q_scale_ptr + rows, mask=row_ok, other=0.0)
        grad_s = tl.trans(_product_operand((grad_z / tau) * q_scale[:, None], grad_scale, q_ptr))
        for k0 in range(0, dim, BLOCK_K):
            k = k0 + kk
            k_ok = k < dim
            q = tl.load(q_ptr + rows[:, None] * stride_q + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            out = grad_c_ptr + cols[:, None] * dim + k[None, :]
            out_ok = col_ok[:, None] & k_ok[None, :]
            tl.store(out, tl.load(out, mask=out_ok, other=0.0) + _gradient_product(grad_s, q, grad_scale, UPCAST),
                     mask=out_ok)


def _prepared(queries, candidates, false_negatives):
    queries = _retrieval.unit_stride_rows(queries)
    candidates = _retrieval.unit_stride_rows(candidates)
    fn = false_negatives.contiguous() if false_negatives is not None else None
    return queries, candidates, fn, _retrieval.scales(queries, "cosine"), _retrieval.scales(candidates, "cosine")


def _common_args(queries, candidates, tiles=(BLOCK_M, BLOCK_N, BLOCK_K, NUM_WARPS, NUM_STAGES)):
    block_m, block_n, block_k, warps, stages = tiles
    return dict(UPCAST=upcast_for(queries.dtype, queries.device), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=warps, num_stages=stages)


def _column_lse(queries, candidates, q_scale, c_scale, fn, temperature):
    num_queries = queries.shape[0]
    column_lse = torch.empty(num_queries, dtype=torch.float32, device=queries.device)
    column_lse_kernel[(triton.cdiv(num_queries, BLOCK_N),)](
        queries, candidates, q_scale, c_scale, fn if fn is not None else column_lse, fn.shape[1] if fn is not None else 0,
        temperature, column_lse, num_queries, queries.shape[1], queries.stride(0), candidates.stride(0),
        **_common_args(queries, candidates),
    )
    return column_lse


def infonce_loss(queries, candidates, labels, temperature, symmetric, false_negatives):
    """Launcher of ``elva::infonce_loss_triton``: (loss [B], lse [B]) fp32."""
    reference.check_ids(queries, candidates, labels, temperature, symmetric, false_negatives)
    queries, candidates, fn, q_scale, c_scale = _prepared(queries, candidates, false_negatives)
    num_queries, num_candidates = queries.shape[0], candidates.shape[0]
    temperature = temperature.detach().float().contiguous()
    lse = torch.empty(num_queries, dtype=torch.float32, device=queries.device)
    positive, largest = torch.empty_like(lse), torch.empty_like(lse)
    tiles = FORWARD_TILES[queries.dtype]
    forward_kernel[(triton.cdiv(num_queries, tiles[0]),)](
        queries, candidates, q_scale, c_scale, labels.contiguous(), fn if fn is not None else labels,
        fn.shape[1] if fn is not None else 0, temperature, lse, positive, largest,
        num_queries, num_candidates, queries.shape[1], queries.stride(0), candidates.stride(0),
        **_common_args(queries, candidates, tiles),
    )
    if num_queries and not bool(largest.amax() <= torch.finfo(torch.float32).max):  # NaN or Inf
        _retrieval.raise_nonfinite(queries=queries, candidates=candidates)
    loss = lse - positive
    if symmetric:
        loss = (loss + _column_lse(queries, candidates, q_scale, c_scale, fn, temperature) - positive) / 2
    return loss, lse


def _grad_scale(dtype, tau, weight, upstream_lse, q_scale, c_scale, symmetric) -> torch.Tensor:
    """fp32 [1]: a power of two g with g max|dL/ds| <= half the largest ``dtype`` value, so that half dL/ds neither
    overflows nor loses small terms to subnormals (fp16's range is 2**-24..65504). dL/ds_ij = dL/dz_ij * scale / tau
    with |dL/dz_ij| <= |w_i + u_i| + |w_i| (+ 2 max|w| symmetric), w the loss weights and u the lse's. On the device:
    no host sync."""
    bound = (weight + upstream_lse).abs().amax() + weight.abs().amax() * (3 if symmetric else 1)
    bound = bound / tau.reshape(()) * torch.maximum(q_scale.amax(), c_scale.amax())
    exponent = torch.floor(torch.log2(torch.finfo(dtype).max / 2 / bound)).clamp(-64, 64)
    return torch.exp2(exponent).float().reshape(1)


def infonce_loss_backward(queries, candidates, labels, temperature, symmetric, false_negatives, loss, lse, grad_loss,
                          grad_lse, output_mask):
    """Launcher of ``elva::infonce_loss_backward_triton``: the reference backward's formula, tile by tile."""
    # Called directly (not after the forward), the op still refuses bad data; O((B + N) d), beside O(B N d) tiles.
    reference.check_data(queries, candidates, labels, temperature, symmetric, false_negatives)
    want_q, want_c, want_t = output_mask
    originals = queries, candidates
    queries, candidates, fn, q_scale, c_scale = _prepared(queries, candidates, false_negatives)
    num_queries, num_candidates, dim = queries.shape[0], candidates.shape[0], queries.shape[1]
    tau = temperature.detach().float().contiguous()
    weight = (grad_loss / 2 if symmetric else grad_loss).float().contiguous()
    upstream_lse = grad_lse.float().contiguous()
    column_lse = lse  # any fp32 pointer when not symmetric
    if symmetric:
        # loss_i = (lse_i - z_ii + rlse_i - z_ii) / 2: rlse from the saved outputs and z_ii, O(B d).
        diagonal = pair_scores(queries, candidates, q_scale, c_scale, torch.arange(num_queries, device=queries.device)
                               .unsqueeze(1)).squeeze(1)
        column_lse = (2 * loss - lse + 2 * (diagonal / tau)).contiguous()
    args = (queries, candidates, q_scale, c_scale, labels.contiguous(), fn if fn is not None else labels,
            fn.shape[1] if fn is not None else 0, tau, lse.contiguous(), weight, upstream_lse, column_lse)
    grad_scale = _grad_scale(queries.dtype, tau, weight, upstream_lse, q_scale, c_scale, symmetric)
    sizes = (num_queries, num_candidates, dim, queries.stride(0), candidates.stride(0))
    grad_q = grad_c = grad_t = None
    if want_q or want_t:
        programs = triton.cdiv(num_queries, BLOCK_M)
        grad_q_prepared = torch.zeros((num_queries, dim), dtype=torch.float32, device=queries.device)
        grad_tau_parts = torch.empty(programs, dtype=torch.float32, device=queries.device)
        grad_queries_kernel[(programs,)](*args, grad_q_prepared, grad_tau_parts, grad_scale, *sizes,
                                         SYMMETRIC=symmetric, **_common_args(queries, candidates))
        if want_q:
            grad_q = _common.prepare_backward_rows(originals[0], "cosine", grad_q_prepared)
        if want_t:
            grad_t = (-grad_tau_parts.double().sum() / tau.double() ** 2).to(temperature.dtype)
    if want_c:
        grad_c_prepared = torch.zeros((num_candidates, dim), dtype=torch.float32, device=queries.device)
        grad_candidates_kernel[(triton.cdiv(num_candidates, BLOCK_N),)](
            *args, grad_c_prepared, grad_scale, *sizes, SYMMETRIC=symmetric, **_common_args(queries, candidates)
        )
        grad_c = _common.prepare_backward_rows(originals[1], "cosine", grad_c_prepared)
    return (
        grad_q if grad_q is not None else originals[0].new_empty(0),
        grad_c if grad_c is not None else originals[1].new_empty(0),
        grad_t if grad_t is not None else temperature.new_empty(0),
    )


# SPEC's headline InfoNCE workload: B = N = 16384, d = 1536, no false negatives.
HEADLINE_ROWS, HEADLINE_DIM = 16384, 1536


def _aot_cases(dtype):
    rows, dim = HEADLINE_ROWS, HEADLINE_DIM
    element = aot.DTYPES[dtype]
    vector = aot.meta(rows)
    ids = aot.meta(rows, dtype=torch.int64)
    tensors = dict(q_ptr=aot.meta(rows, dim, dtype=element), c_ptr=aot.meta(rows, dim, dtype=element),
                   q_scale_ptr=vector, c_scale_ptr=vector, fn_ptr=ids, fn_width=0, tau_ptr=aot.meta())
    sizes = dict(num_queries=rows, num_candidates=rows, dim=dim, stride_q=dim, stride_c=dim)
    tile = dict(UPCAST=False, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    forward_tiles = FORWARD_TILES[element]
    forward_tile = dict(UPCAST=False, BLOCK_M=forward_tiles[0], BLOCK_N=forward_tiles[1], BLOCK_K=forward_tiles[2])
    grad_inputs = dict(tensors, labels_ptr=ids, lse_ptr=vector, weight_ptr=vector, upstream_lse_ptr=vector,
                       column_lse_ptr=vector)
    on_tensor_cores = dtype != "fp32"  # fp32 rows take exact fp32 FMAs (input_precision="ieee")
    small_tiles = {"mma_n": "issue 16: 64x64 tiles"} if on_tensor_cores else {}
    scores = aot.Expect(tensor_cores="HGMMA" if on_tensor_cores else None, min_mma_n=128 if on_tensor_cores else 0,
                        async_copy=True, known=small_tiles)
    forward = dataclasses.replace(scores, known={"spills": "issue 16: fp32 score tiles beside the online lse"}
                                  if dtype == "fp32" else {})
    products = aot.Expect(
        tensor_cores="HGMMA" if on_tensor_cores else None, min_mma_n=128 if on_tensor_cores else 0,
        cuda_core_dots=not on_tensor_cores, async_copy=True,
        known={**small_tiles, **({} if on_tensor_cores else {"spills": "issue 16: fp32 dot operands and the d-chunk "
                                                                     "loop"})})
    options = dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    cases = [
        aot.Case(forward_kernel, dtype, dict(tensors, labels_ptr=ids, lse_ptr=vector, positive_ptr=vector,
                                             largest_ptr=vector, **sizes, **forward_tile),
                 forward, num_warps=forward_tiles[3], num_stages=forward_tiles[4]),
        aot.Case(column_lse_kernel, dtype, dict(tensors, column_lse_ptr=vector, num_queries=rows, dim=dim,
                                                stride_q=dim, stride_c=dim, **tile), scores, **options),
    ]
    for symmetric in (False, True):
        label = f"{dtype}, {'symmetric' if symmetric else 'one direction'}"
        programs = triton.cdiv(rows, BLOCK_M)
        cases += [
            aot.Case(grad_queries_kernel, label,
                     dict(grad_inputs, grad_q_ptr=aot.meta(rows, dim), grad_tau_ptr=aot.meta(programs),
                          grad_scale_ptr=aot.meta(1), **sizes,
                          SYMMETRIC=symmetric, **tile), products, **options),
            aot.Case(grad_candidates_kernel, label,
                     dict(grad_inputs, grad_c_ptr=aot.meta(rows, dim), grad_scale_ptr=aot.meta(1), **sizes,
                          SYMMETRIC=symmetric, **tile),
                     products, **options),
        ]
    return cases


AOT_CASES = [case for dtype in aot.DTYPES for case in _aot_cases(dtype)]

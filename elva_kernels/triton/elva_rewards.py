"""Triton kernel: ELVA's rewards and GRPO advantages for one query's G rollouts, in one program.

Program b loads its G queries and their candidates (shared [C, d] rows are read with a zero
rollout stride, never copied), accumulates the raw dot products and both sides' squared norms
over d in BLOCK_D chunks, and scales them into fp32 cosines. The [G, C] scores then become
int64 keys (score bits, then 2**32 - 1 - index: the total order), which one ``tl.sort`` per
rollout ranks on chip: sorted position i is rank i + 1. The rewards follow in float64 from
those fp32 scores, and the group advantages from the G totals, so a call reads the embeddings
once. ``advantage="batch"`` needs the std over all queries: the kernel then writes the float64
totals and the launcher finishes with the reference's [B, G] arithmetic.

Data errors (NaN/Inf score, positive out of range or masked, no unmasked negative) set a flag;
the launcher then runs the reference's checks for the exact message, and returns nothing.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from elva_kernels.reference import elva_rewards as reference
from elva_kernels.triton import aot
from elva_kernels.triton.similarity_topk import KEY_MIN, LOW_WORD, _nonfinite, _score_keys, upcast_for

ADVANTAGE_CODES = {"group": 0, "batch": 1, "none": 2}
# Register budget of the [G, C, BLOCK_D] product tile.
TILE_ELEMENTS = 16384
MAX_CANDIDATES = 512
MAX_GROUP = 16


@triton.jit
def elva_rewards_kernel(
    q_ptr, c_ptr, positive_ptr, mask_ptr,
    total_ptr, margin_ptr, rank_reward_ptr, rank_ptr, advantages_ptr, scores_ptr, total64_ptr,
    error_ptr,  # int32 [1]: set to 1 on bad data
    group, num_candidates, dim,
    stride_qb, stride_qg, stride_cb, stride_cg, stride_cc, stride_mb, stride_mg, stride_mc,
    delta, gamma, alpha, eps, inv_log_base, adv_eps,
    ADVANTAGE: tl.constexpr, RETURN_SCORES: tl.constexpr, UPCAST: tl.constexpr,
    G_PAD: tl.constexpr, C_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, G_PAD)
    c = tl.arange(0, C_PAD)
    kk = tl.arange(0, BLOCK_D)
    g_ok = g < group
    c_ok = c < num_candidates
    pair_ok = g_ok[:, None] & c_ok[None, :]

    # ---- 1. cosines: raw dots and squared norms accumulated over d, then scaled
    q_rows = q_ptr + b * stride_qb + g.to(tl.int64) * stride_qg
    c_rows = c_ptr + b * stride_cb + g.to(tl.int64)[:, None] * stride_cg + c.to(tl.int64)[None, :] * stride_cc
    dots = tl.zeros([G_PAD, C_PAD], dtype=tl.float32)
    q_squares = tl.zeros([G_PAD], dtype=tl.float32)
    c_squares = tl.zeros([G_PAD, C_PAD], dtype=tl.float32)
    for k0 in range(0, dim, BLOCK_D):
        k = k0 + kk
        k_ok = k < dim
        q = tl.load(q_rows[:, None] + k[None, :], mask=g_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        x = tl.load(c_rows[:, :, None] + k[None, None, :], mask=pair_ok[:, :, None] & k_ok[None, None, :],
                    other=0.0).to(tl.float32)
        dots += tl.sum(x * q[:, None, :], axis=2)
        q_squares += tl.sum(q * q, axis=1)
        c_squares += tl.sum(x * x, axis=2)
    q_scale = 1.0 / tl.maximum(tl.sqrt(q_squares), 1e-12)
    c_scale = 1.0 / tl.maximum(tl.sqrt(c_squares), 1e-12)
    scores = (dots * q_scale[:, None]) * c_scale

    # ---- 2. which candidates are real, and the data checks
    positive = tl.load(positive_ptr + b)
    bad = (positive < 0) | (positive >= num_candidates)
    # No mask arrives as one True byte with zero strides. (A constexpr branch instead made the compiler take
    # 30 s for the unmasked variant.)
    kept = tl.load(mask_ptr + b * stride_mb + g[:, None] * stride_mg + c[None, :] * stride_mc, mask=pair_ok, other=0)
    real = pair_ok & (kept != 0)
    is_positive = c[None, :] == positive
    negative = real & ~is_positive
    positive_real = tl.sum((real & is_positive).to(tl.int32), axis=1) > 0
    negatives = tl.sum(negative.to(tl.int32), axis=1)
    bad = bad | (tl.max((g_ok & (~positive_real | (negatives < 1))).to(tl.int32), axis=0) > 0)
    bad = bad | (tl.max(tl.max((real & _nonfinite(scores)).to(tl.int32), axis=1), axis=0) > 0)
    tl.atomic_max(error_ptr, 1, mask=bad)

    # ---- 3. ranks: one sort of the total-order keys per rollout; sorted position i is rank i + 1
    keys = tl.where(real, _score_keys(scores, c[None, :].to(tl.int64)), KEY_MIN)
    ordered = tl.sort(keys, dim=1, descending=True)
    ordered_ids = LOW_WORD - (ordered & LOW_WORD)
    high = (ordered >> 32).to(tl.int32)
    ordered_scores = tl.where(high < 0, high ^ 0x7FFFFFFF, high).to(tl.float32, bitcast=True)
    ordered_negative = (ordered != KEY_MIN) & (ordered_ids != positive)
    ranks = (c + 1).to(tl.float64)
    log_ranks = tl.log(ranks) * inv_log_base
    penalty = tl.sum(tl.where(ordered_negative, ordered_scores.to(tl.float64) * (log_ranks[None, :] - 1.0), 0.0),
                     axis=1)
    positive_key = tl.max(tl.where(is_positive & real, keys, KEY_MIN), axis=1)
    rank = 1 + tl.sum((keys > positive_key[:, None]).to(tl.int64), axis=1)
    s_p = tl.sum(tl.where(is_positive & pair_ok, scores, 0.0), axis=1).to(tl.float64)
    s_top = tl.max(tl.where(negative, scores, float("-inf")), axis=1).to(tl.float64)

    # ---- 4. rewards in float64 from the fp32 scores
    margin = tl.maximum(s_p - s_top - delta, 0.0)
    rank_reward = s_p / (1.0 + tl.log(rank.to(tl.float64)) * inv_log_base) - gamma * penalty
    total = alpha * margin + eps * rank_reward

    # ---- 5. advantages over the G rollouts (reference.group_advantages)
    count = group.to(tl.float64)
    mean = tl.sum(tl.where(g_ok, total, 0.0), axis=0) / count
    largest = tl.max(tl.where(g_ok, total, float("-inf")), axis=0)
    smallest = tl.min(tl.where(g_ok, total, float("inf")), axis=0)
    centered = tl.where(largest == smallest, 0.0, total - mean)  # equal rewards: exactly 0
    if ADVANTAGE == 0:
        var = tl.sum(tl.where(g_ok, centered * centered, 0.0), axis=0) / tl.maximum(count - 1.0, 1.0)
        # The std and the scaling in fp32 (1e-7 relative): fp64 sqrt and division cost half a minute of
        # compile time per kernel variant.
        std = tl.sqrt(tl.where(var > 0, var, 1.0).to(tl.float32))
        advantages = tl.where(var > 0, centered.to(tl.float32) / (std + adv_eps), 0.0)
    else:
        advantages = centered
    if ADVANTAGE == 1:  # the batch std is finished by the launcher
        tl.store(total64_ptr + b * group + g, total, mask=g_ok)

    out = b * group + g
    tl.store(total_ptr + out, total.to(tl.float32), mask=g_ok)
    tl.store(margin_ptr + out, margin.to(tl.float32), mask=g_ok)
    tl.store(rank_reward_ptr + out, rank_reward.to(tl.float32), mask=g_ok)
    tl.store(rank_ptr + out, rank, mask=g_ok)
    tl.store(advantages_ptr + out, advantages.to(tl.float32), mask=g_ok)
    if RETURN_SCORES:
        tl.store(scores_ptr + out[:, None] * num_candidates + c[None, :], tl.where(real, scores, float("-inf")),
                 mask=pair_ok)


def _tile(group: int, num_candidates: int, dim: int) -> tuple[int, int, int]:
    """(G_PAD, C_PAD, BLOCK_D): the [G, C, BLOCK_D] product tile stays within TILE_ELEMENTS registers."""
    g_pad = triton.next_power_of_2(group)
    c_pad = max(16, triton.next_power_of_2(num_candidates))
    return g_pad, c_pad, max(1, min(64, TILE_ELEMENTS // (g_pad * c_pad), triton.next_power_of_2(dim)))


def elva_rewards(query_emb, cand_emb, positive_index, mask, delta, gamma, alpha, eps, log_base, advantage, adv_eps,
                 return_scores):
    """Launcher of ``elva::elva_rewards_triton`` (the schema of ``_library.SIGNATURES["elva_rewards"]``)."""
    num_queries, group, dim = query_emb.shape
    num_candidates = cand_emb.shape[-2]
    if query_emb.stride(2) != 1:
        query_emb = query_emb.contiguous()
    if cand_emb.stride(-1) != 1:
        cand_emb = cand_emb.contiguous()
    shared = cand_emb.dim() == 3
    device = query_emb.device
    outputs = [torch.empty((num_queries, group), dtype=torch.float32, device=device) for _ in range(3)]
    rank = torch.empty((num_queries, group), dtype=torch.int64, device=device)
    advantages = torch.empty((num_queries, group), dtype=torch.float32, device=device)
    scores = torch.empty((num_queries, group, num_candidates) if return_scores else (0,), device=device)
    total64 = torch.empty((num_queries, group) if advantage == "batch" else (0,), dtype=torch.float64, device=device)
    error = torch.zeros(1, dtype=torch.int32, device=device)
    if mask is None:
        kept, mask_strides = torch.ones(1, dtype=torch.uint8, device=device), (0, 0, 0)
    else:
        kept = mask.to(torch.uint8)
        mask_strides = (kept.stride(0), kept.stride(1), kept.stride(2)) if kept.dim() == 3 else (
            kept.stride(0), 0, kept.stride(1))
    g_pad, c_pad, block_d = _tile(group, num_candidates, dim)
    elva_rewards_kernel[(num_queries,)](
        query_emb, cand_emb, positive_index.contiguous(), kept,
        *outputs, rank, advantages, scores, total64, error,
        group, num_candidates, dim,
        query_emb.stride(0), query_emb.stride(1),
        cand_emb.stride(0), 0 if shared else cand_emb.stride(1), cand_emb.stride(-2), *mask_strides,
        delta, gamma, alpha, eps, 1.0 / math.log(log_base), adv_eps,
        ADVANTAGE=ADVANTAGE_CODES[advantage], RETURN_SCORES=return_scores,
        UPCAST=upcast_for(query_emb.dtype, device), G_PAD=g_pad, C_PAD=c_pad, BLOCK_D=block_d,
    )
    if error.item():  # the one host sync: the reference's checks say what is wrong
        reference.check_data(query_emb, cand_emb, positive_index, mask if mask is None else mask.bool())
        raise ValueError("query_emb and cand_emb are finite but a score overflows fp32; scale the embeddings down")
    if advantage == "batch":
        advantages = reference.group_advantages(total64, "batch", adv_eps).float()
    total, margin, rank_reward = outputs
    return total, margin, rank_reward, rank, advantages, scores


# SPEC's headline: B = 512 queries, G = 8 rollouts, C = 101 candidates, d = 1536.
HEADLINE = dict(queries=512, group=8, candidates=101, dim=1536)


def _aot_case(dtype, advantage, return_scores, shared):
    """``shared``: candidates [B, C, d] broadcast over the rollouts with a [B, C] mask; else [B, G, C, d], no mask."""
    b, g, c, d = HEADLINE.values()
    element = aot.DTYPES[dtype]
    g_pad, c_pad, block_d = _tile(g, c, d)
    vector, int64 = aot.meta(b, g), aot.meta(b, g, dtype=torch.int64)
    candidate_strides = (c * d, 0, d) if shared else (g * c * d, c * d, d)
    mask_strides = (c, 0, 1) if shared else (0, 0, 0)
    args = dict(
        q_ptr=aot.meta(b, g, d, dtype=element), c_ptr=aot.meta(b, c, d, dtype=element),
        positive_ptr=aot.meta(b, dtype=torch.int64), mask_ptr=aot.meta(b, c, dtype=torch.uint8),
        total_ptr=vector, margin_ptr=vector, rank_reward_ptr=vector, rank_ptr=int64, advantages_ptr=vector,
        scores_ptr=aot.meta(b, g, c), total64_ptr=aot.meta(b, g, dtype=torch.float64),
        error_ptr=aot.meta(1, dtype=torch.int32), group=g, num_candidates=c, dim=d,
        stride_qb=g * d, stride_qg=d, stride_cb=candidate_strides[0], stride_cg=candidate_strides[1],
        stride_cc=candidate_strides[2], stride_mb=mask_strides[0], stride_mg=mask_strides[1],
        stride_mc=mask_strides[2], delta=0.05, gamma=0.01, alpha=0.4, eps=0.6, inv_log_base=1.0, adv_eps=1e-4,
        ADVANTAGE=ADVANTAGE_CODES[advantage], RETURN_SCORES=return_scores, UPCAST=False, G_PAD=g_pad, C_PAD=c_pad,
        BLOCK_D=block_d,
    )
    label = f"{dtype}, advantage {advantage}" + (", scores" if return_scores else "") + (
        ", shared masked candidates" if shared else ", per-rollout candidates")
    known = {"spills": "issue 16: the [G, C, BLOCK_D] product tile in fp32 registers"} if dtype == "fp32" else {}
    return aot.Case(elva_rewards_kernel, label, args, aot.Expect(known=known))


AOT_CASES = [
    _aot_case(dtype, advantage, return_scores, shared=return_scores)
    for dtype in aot.DTYPES
    for advantage in ADVANTAGE_CODES
    for return_scores in (False, True)
]

"""Reference: ELVA's margin and ranking rewards per rollout, and GRPO advantages (SPEC A3).

For query b, rollout g and every unmasked candidate c, s_c is the cosine of the query and the
candidate. The candidates are ranked by the total order (score descending, then index
ascending); rank_c is 1-based, p is the positive and r = rank_p. From the paper
(arXiv 2606.20280, §3.4):

    R_Margin = max(0, s_p - max_{c != p} s_c - delta)
    R_Rank   = s_p / (1 + log r) - gamma * sum_{c != p} s_c * (log rank_c - 1)
    R_total  = alpha * R_Margin + eps * R_Rank

Masked candidates (mask False: padding) have no score and no rank: both sums skip them.

Two readings the paper leaves open:

* **The log base** is not printed. ``log_base`` is e (2.718281828459045) by default, or 2.0. With
  the natural log, (log rank_c - 1) < 0 for ranks 1 and 2, so the top two negatives *add* reward:
  that is the formula as printed. With base 2, only rank 1 does.
* **Ties** are not addressed: the paper sorts by s. Here they follow the total order, so equal
  scores rank by candidate index, and a positive tied with a negative of smaller index ranks
  below it (r > 1, and the margin before the clamp is -delta).

Scores follow the common convention (``_common``): rows L2-normalised in fp32, products summed in
float64 and rounded once to fp32, so identical candidates tie exactly. Rewards and advantages are
computed in float64 from those fp32 scores and rounded to fp32 at the end.

Extra memory: up to about 64 bytes per score (fp32 scores and sort keys, int64 order and ranks,
float64 reward terms), plus one block of prepared rows holding about ``_common.TILE_ELEMENTS``
candidate elements (fp32 + float64). Shared [B, C, d] candidates are broadcast over the rollouts by a batched
matmul: [B, G, C, d] is never materialised.
"""
from __future__ import annotations

import math

import torch

from elva_kernels import _validate
from elva_kernels.reference import _common


def elva_rewards(
    query_emb: torch.Tensor,
    cand_emb: torch.Tensor,
    positive_index: torch.Tensor,
    mask: torch.Tensor | None,
    delta: float,
    gamma: float,
    alpha: float,
    eps: float,
    log_base: float,
    advantage: str,
    adv_eps: float,
    return_scores: bool,
):
    """(total, margin, rank_reward, rank, advantages, scores): fp32 [B, G] rewards and advantages,
    the int64 [B, G] rank of the positive, and the fp32 [B, G, C] scores (-inf where masked) when
    ``return_scores``, else an empty fp32 [0]."""
    check_data(query_emb, cand_emb, positive_index, mask)
    scores, ranks, negatives = scores_and_ranks(query_emb, cand_emb, positive_index, mask)
    margin, rank_reward, total = rewards(scores, ranks, negatives, positive_index, delta, gamma, alpha, eps, log_base)
    advantages = group_advantages(total, advantage, adv_eps)
    if return_scores:
        scores_out = scores.masked_fill(~real_candidates(mask, scores.shape, scores.device), float("-inf"))
    else:
        scores_out = scores.new_empty(0)
    return (
        total.float(),
        margin.float(),
        rank_reward.float(),
        at_positive(ranks, positive_index),
        advantages.float(),
        scores_out,
    )


def check_data(query_emb, cand_emb, positive_index, mask) -> None:
    """The checks that read tensor data: finite embeddings, every positive in range and unmasked,
    and at least one unmasked negative for every (query, rollout)."""
    _validate.finite("query_emb", query_emb)
    _validate.finite("cand_emb", cand_emb)
    num_candidates = cand_emb.shape[-2]
    _validate.ids_in_range("positive_index", positive_index, num_candidates, pad=False)
    real = real_candidates(mask, (*query_emb.shape[:2], num_candidates), query_emb.device)
    if mask is not None:
        hidden = ~at_positive(real, positive_index)
        if bool(hidden.any()):
            b, g = hidden.nonzero()[0].tolist()
            raise ValueError(
                f"mask must keep every positive (positive_index) unmasked; it hides candidate"
                f" {int(positive_index[b])}, the positive of query {b}, in rollout {g}"
            )
    # The positive is real, so the other real candidates are the negatives.
    lonely = real.sum(2) < 2
    if bool(lonely.any()):
        b, g = lonely.nonzero()[0].tolist()
        name = "cand_emb" if mask is None else "mask"
        raise ValueError(
            f"{name} must leave at least one unmasked negative for every query and rollout;"
            f" query {b}, rollout {g} has only its positive (C = {num_candidates})"
        )


def real_candidates(mask: torch.Tensor | None, shape, device) -> torch.Tensor:
    """bool [B, G, C]: True for the real candidates. A broadcast view, never a copy."""
    if mask is None:
        return torch.ones((), dtype=torch.bool, device=device).expand(shape)
    return (mask if mask.dim() == 3 else mask.unsqueeze(1)).expand(shape)


def at_positive(values: torch.Tensor, positive_index: torch.Tensor) -> torch.Tensor:
    """[B, G, C] -> [B, G]: the entry of each query's positive."""
    index = positive_index.view(-1, 1, 1).expand(*values.shape[:2], 1)
    return values.gather(2, index).squeeze(2)


def cosine_scores(query_emb: torch.Tensor, cand_emb: torch.Tensor) -> torch.Tensor:
    """[B, G, d] queries, [B, G, C, d] or shared [B, C, d] candidates -> fp32 [B, G, C] cosines."""
    num_queries, group = query_emb.shape[:2]
    num_candidates, dim = cand_emb.shape[-2:]
    scores = torch.empty(num_queries, group, num_candidates, device=query_emb.device)
    for b0, b1 in query_blocks(num_queries, group * num_candidates * dim):
        q = _common.prepare(query_emb[b0:b1], "cosine").double()
        c = _common.prepare(cand_emb[b0:b1], "cosine").double()
        if cand_emb.dim() == 3:
            s = q @ c.transpose(1, 2)  # [b, G, d] @ [b, d, C]: shared rows broadcast over G
        else:
            s = (c @ q.unsqueeze(3)).squeeze(3)  # [b, G, C, d] @ [b, G, d, 1]
        scores[b0:b1] = s.float()
    return scores


def query_blocks(num_queries: int, elements_per_query: int):
    """Ranges of queries whose candidate rows hold about ``_common.TILE_ELEMENTS`` elements."""
    step = max(1, _common.TILE_ELEMENTS // elements_per_query)
    for start in range(0, num_queries, step):
        yield start, min(start + step, num_queries)


def scores_and_ranks(query_emb, cand_emb, positive_index, mask):
    """fp32 [B, G, C] scores, int64 [B, G, C] 1-based ranks in the total order among the real
    candidates (masked ones rank after them and count for nothing), bool [B, G, C] real negatives."""
    scores = cosine_scores(query_emb, cand_emb)
    real = real_candidates(mask, scores.shape, scores.device)
    # A stable descending sort keeps equal scores in index order: the total order. Real scores
    # are finite, so the masked ones (-inf) sort last.
    order = torch.sort(scores.masked_fill(~real, float("-inf")), dim=2, descending=True, stable=True).indices
    positions = torch.arange(1, scores.shape[2] + 1, device=scores.device).expand_as(order)
    ranks = torch.empty_like(order).scatter(2, order, positions)
    is_positive = torch.arange(scores.shape[2], device=scores.device) == positive_index.view(-1, 1, 1)
    return scores, ranks, real & ~is_positive


def log_rank(ranks: torch.Tensor, log_base: float) -> torch.Tensor:
    return torch.log(ranks.double()) / math.log(log_base)


def top_negative(ranks: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """int64 [B, G]: the first negative in the total order (the one the margin uses)."""
    return ranks.masked_fill(~negatives, ranks.shape[2] + 1).argmin(2)


def rewards(scores, ranks, negatives, positive_index, delta, gamma, alpha, eps, log_base):
    """float64 [B, G] (margin, rank_reward, total) from the fp32 scores and the ranks."""
    s = scores.double()
    s_p = at_positive(s, positive_index)
    s_top = s.gather(2, top_negative(ranks, negatives).unsqueeze(2)).squeeze(2)
    margin = (s_p - s_top - delta).clamp_min(0)
    penalty = torch.where(negatives, s * (log_rank(ranks, log_base) - 1), 0).sum(2)
    rank_reward = s_p / (1 + log_rank(at_positive(ranks, positive_index), log_base)) - gamma * penalty
    return margin, rank_reward, alpha * margin + eps * rank_reward


def deviation(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """x - its mean over ``dims``, exactly 0 where those values are all equal."""
    centered = x - x.mean(dims, keepdim=True)
    # A float mean of equal values can miss them by an ulp. The correction is a constant, so the
    # gradient stays that of x - mean.
    equal = x.amax(dims, keepdim=True) == x.amin(dims, keepdim=True)
    return centered - torch.where(equal, centered, 0).detach()


def std_axes(rewards: torch.Tensor, mode: str) -> tuple[tuple[int, ...], int]:
    """The dims of [B, G] rewards the std is taken over, and its degrees of freedom (>= 1):
    each group's G rewards for "group", all B*G rewards for "batch" (TRL's scale_rewards="batch")."""
    if mode == "batch":
        return (0, 1), max(rewards.numel() - 1, 1)
    return (1,), max(rewards.shape[1] - 1, 1)


def spread_and_std(rewards: torch.Tensor, mode: str):
    """(spread, std, positive) for [B, G] rewards and mode "group" or "batch": the deviations the
    std is taken from, and the unbiased std where ``positive`` (variance > 0), 1 elsewhere. The
    dummy 1 keeps sqrt away from 0, whose derivative is infinite (0 * inf = NaN in backward)."""
    dims, dof = std_axes(rewards, mode)
    spread = deviation(rewards, dims)
    var = spread.square().sum(dims, keepdim=True) / dof
    positive = var > 0
    return spread, torch.where(positive, var, 1).sqrt(), positive


def group_advantages(rewards: torch.Tensor, mode: str, eps: float) -> torch.Tensor:
    """GRPO advantages of [B, G] rewards, in their dtype: (r - mean_g) / (std + eps) as in TRL,
    with the unbiased std per group ("group") or over the batch ("batch"), or r - mean_g ("none").

    A zero std (one rollout, or equal rewards) gives exactly 0, with no NaN in value or gradient.
    """
    centered = deviation(rewards, (1,))
    if mode == "none":
        return centered
    _, std, positive = spread_and_std(rewards, mode)
    return torch.where(positive, centered / (std + eps), 0)

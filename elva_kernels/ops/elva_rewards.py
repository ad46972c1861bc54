"""A3: ELVA's margin and ranking rewards for G rollouts per query, and their GRPO advantages."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from elva_kernels import _dispatch, _library, _validate
from elva_kernels.reference import _common
from elva_kernels.reference import elva_rewards as reference

OP = "elva_rewards"
# log_base as the user writes it -> the float the schema carries.
LOG_BASES = {"e": math.e, 2: 2.0, "2": 2.0}
ADVANTAGE_MODES = ("group", "batch", "none")

# The GPU backends rank a rollout's C candidates on chip; Triton also holds a query's G rollouts in one program.
MAX_CANDIDATES, MAX_GROUP_TRITON = 512, 16


def _on_chip_limits(max_group: int | None):
    def limits(call: _dispatch.Call) -> list[str]:
        reasons = []
        if call.sizes.get("C", 0) > MAX_CANDIDATES:
            reasons.append(f"C={call.sizes['C']} candidates per rollout; on-chip ranking takes C <= {MAX_CANDIDATES}")
        if max_group is not None and call.sizes.get("G", 0) > max_group:
            reasons.append(f"G={call.sizes['G']} rollouts per query; one program holds G <= {max_group}")
        return reasons

    return limits


_dispatch.register(
    OP,
    [
        _dispatch.Backend("triton", OP, devices=("cuda", "cpu"), limits=_on_chip_limits(MAX_GROUP_TRITON)),
        _dispatch.Backend("cuda", OP, devices=("cuda",), limits=_on_chip_limits(None)),
        _dispatch.Backend("cpu", OP, devices=("cpu",)),
        _dispatch.Backend("torch", OP, devices=("cpu", "cuda")),
    ],
)


class ElvaRewards(NamedTuple):
    """What ``elva_rewards`` returns: [B, G] per rollout, and the [B, G, C] scores on request."""

    total: torch.Tensor
    margin: torch.Tensor
    rank_reward: torch.Tensor
    rank: torch.Tensor
    advantages: torch.Tensor
    scores: torch.Tensor | None


def elva_rewards(
    query_emb: torch.Tensor,
    cand_emb: torch.Tensor,
    *,
    positive_index: int | torch.Tensor = 0,
    delta: float = 0.05,
    gamma: float = 0.01,
    alpha: float = 0.4,
    eps: float = 0.6,
    log_base: str | int = "e",
    mask: torch.Tensor | None = None,
    advantage: str = "group",
    adv_eps: float = 1e-4,
    return_scores: bool = False,
    differentiable: bool = False,
    backend: str = "auto",
) -> ElvaRewards:
    """ELVA's rewards (arXiv 2606.20280, §3.4) for every rollout, with GRPO advantages.

    Per query b and rollout g, s_c = cos(query, candidate c) over the real candidates, ranked
    by the total order (score descending, index ascending); p is the positive and r its rank::

        R_Margin = max(0, s_p - max_{c != p} s_c - delta)
        R_Rank   = s_p / (1 + log r) - gamma * sum_{c != p} s_c * (log rank_c - 1)
        R_total  = alpha * R_Margin + eps * R_Rank

    ``reference/elva_rewards.py`` documents the two readings the paper leaves open (log base, ties).

    Args:
        query_emb: [B, G, d] fp32/fp16/bf16: G rollouts per query.
        cand_emb: [B, G, C, d] (re-encoded per rollout) or [B, C, d] (shared by the rollouts;
            broadcast, never copied); same dtype and device, C >= 2.
        positive_index: the positive's candidate index: an int, or an int64 [B] tensor.
        delta: the margin R_Margin requires (a finite float).
        gamma: weight of the negatives' rank penalty (a finite float).
        alpha, eps: weights of R_Margin and R_Rank in R_total (finite floats; the paper's 0.4, 0.6).
        log_base: "e" (default) or 2, the base of every log above.
        mask: bool [B, C] or [B, G, C], True for the real candidates (False: padding). It must
            keep the positive and at least one negative of every (query, rollout).
        advantage: "group": (R_total - mean_g) / (std_g + adv_eps), unbiased std over the G
            rollouts; "batch": the same with the std of all B*G rewards (TRL's
            scale_rewards="batch"); "none": R_total - mean_g. A zero std (G = 1, or equal
            rewards) gives exactly 0.
        adv_eps: a float >= 0 added to the std.
        return_scores: also return the [B, G, C] scores.
        differentiable: make total, margin, rank_reward, advantages and scores differentiable
            w.r.t. both embeddings, with the ranks (and the top negative) held constant. A group
            whose advantages are 0 because its std is 0 passes no gradient through them.
            Otherwise the op runs on detached inputs.
        backend: "auto", "triton", "cuda", "cpu" or "torch".

    Returns:
        ElvaRewards(total, margin, rank_reward, rank, advantages, scores): fp32 [B, G] except
        ``rank``, the positive's int64 [B, G] 1-based rank among the real candidates, and
        ``scores``, fp32 [B, G, C] with -inf where masked, or None unless ``return_scores``.

    Extra memory:
        torch: up to about 64 bytes per score, B*G*C of them (fp32 scores and sort keys, int64
        order and ranks, float64 reward terms), plus one block of prepared candidate rows of
        about ``_common.TILE_ELEMENTS`` elements (2**20; one query's G*C*d if larger) at 12 bytes
        each (fp32 + float64). The backward recomputes the same, plus the gradients. The shared
        layout never materialises [B, G, C, d].

    Equivalent PyTorch (per-rollout layout, no mask, default "group" advantages)::

        s = torch.einsum("bgd,bgcd->bgc", F.normalize(q.float(), dim=-1), F.normalize(c.float(), dim=-1))
        rank = s.argsort(-1, descending=True, stable=True).argsort(-1) + 1
        s_p, r = s[..., p], rank[..., p]; neg = torch.arange(C) != p
        margin = (s_p - s[..., neg].amax(-1) - delta).clamp_min(0)
        rank_reward = s_p / (1 + r.log()) - gamma * (s * (rank.log() - 1))[..., neg].sum(-1)
        total = alpha * margin + eps * rank_reward
        advantages = (total - total.mean(1, keepdim=True)) / (total.std(1, keepdim=True) + adv_eps)

    Backends and limits:
        triton (CUDA; CPU tensors only under the interpreter): one program per query, C <= 512,
        G <= 16; ``triton/elva_rewards.py``. cuda: one block per query, C <= 512;
        ``csrc/cuda/elva_rewards.cu``. Both check the data in the kernel (one host sync).
        cpu (C++/OpenMP, any C and G): ``csrc/cpu/elva_rewards.cpp``.
        torch (CPU, CUDA; fp32/fp16/bf16): ``reference/elva_rewards.py``. Its data checks (finite
        embeddings, positive_index in [0, C), a mask that keeps the positive and one negative)
        read the inputs once more.

    Example:
        >>> out = elva_rewards(torch.randn(4, 8, 64), torch.randn(4, 101, 64), positive_index=0)
        >>> out.advantages.shape
        torch.Size([4, 8])
    """
    form_q, form_c = "[B, G, d]", "[B, G, C, d] or [B, C, d] with the queries' B, G and d"
    _validate.tensor("query_emb", query_emb, ndim=3, form=form_q)
    _validate.tensor("cand_emb", cand_emb, ndim=(3, 4), form=form_c)
    num_queries, group, dim = query_emb.shape
    _validate.dim_matches("cand_emb", cand_emb, 0, num_queries, "B", form_c)
    if cand_emb.dim() == 4:
        _validate.dim_matches("cand_emb", cand_emb, 1, group, "G", form_c)
    _validate.dim_matches("cand_emb", cand_emb, -1, dim, "d", form_c)
    num_candidates = cand_emb.shape[-2]
    if num_candidates < 2:
        raise ValueError(
            f"cand_emb must hold C >= 2 candidates (the positive and a negative); got shape {tuple(cand_emb.shape)}"
        )
    _validate.same_float_dtype(query_emb=query_emb, cand_emb=cand_emb)
    if isinstance(positive_index, torch.Tensor):
        _validate.tensor("positive_index", positive_index, ndim=1, dtypes=(torch.int64,), form="int64 [B]")
        _validate.dim_matches("positive_index", positive_index, 0, num_queries, "B", "int64 [B]")
    else:
        _validate.int_in_range("positive_index", positive_index, 0, num_candidates - 1)
    if mask is not None:
        form_m = f"bool [B, C] = {(num_queries, num_candidates)} or [B, G, C] = {(num_queries, group, num_candidates)}"
        _validate.tensor("mask", mask, ndim=(2, 3), dtypes=(torch.bool,), form=form_m)
        if tuple(mask.shape) not in ((num_queries, num_candidates), (num_queries, group, num_candidates)):
            raise ValueError(f"mask must be {form_m}; got shape {tuple(mask.shape)}")
    device = _validate.same_device(
        query_emb=query_emb,
        cand_emb=cand_emb,
        positive_index=positive_index if isinstance(positive_index, torch.Tensor) else None,
        mask=mask,
    )
    delta, gamma, alpha, eps = _real("delta", delta), _real("gamma", gamma), _real("alpha", alpha), _real("eps", eps)
    _validate.choice("log_base", log_base, tuple(LOG_BASES))
    _validate.choice("advantage", advantage, ADVANTAGE_MODES)
    adv_eps = _real("adv_eps", adv_eps, minimum=0.0)
    _flag("return_scores", return_scores)
    _flag("differentiable", differentiable)
    call = _dispatch.Call(
        device,
        query_emb.dtype,
        {"query_emb": tuple(query_emb.shape), "cand_emb": tuple(cand_emb.shape)},
        sizes={"G": group, "C": num_candidates},
    )
    chosen = _dispatch.select(OP, backend, call)
    if not isinstance(positive_index, torch.Tensor):
        positive_index = torch.full((num_queries,), positive_index, dtype=torch.int64, device=device)
    if not differentiable:
        query_emb, cand_emb = query_emb.detach(), cand_emb.detach()
    out = chosen.handle(
        query_emb, cand_emb, positive_index, mask, delta, gamma, alpha, eps,
        LOG_BASES[log_base], advantage, adv_eps, return_scores,
    )
    return ElvaRewards(*out[:5], scores=out[5] if return_scores else None)


def group_advantages(rewards: torch.Tensor, mode: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages of [B, G] rewards: the rule ``elva_rewards`` applies, usable alone.

    Args:
        rewards: [B, G] floating point: G rollouts per query.
        mode: "group": (r - mean_g) / (std_g + eps) with the unbiased std over the G rollouts,
            as TRL's GRPO normalises; "batch": the same with the std of all B*G rewards (TRL's
            scale_rewards="batch"); "none": r - mean_g.
        eps: a float >= 0 added to the std.

    Returns:
        [B, G] in the rewards' dtype. A zero std (G = 1, or equal rewards) gives exactly 0, and
        autograd through it gives no NaN.

    Extra memory: a few [B, G] temporaries.

    Equivalent PyTorch ("group")::

        (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)

    Backends and limits: plain torch ops on any device.

    Example:
        >>> group_advantages(torch.tensor([[1.0, 2.0, 3.0]]))
        tensor([[-0.9999,  0.0000,  0.9999]])
    """
    _validate.tensor("rewards", rewards, ndim=2, dtypes=_validate.FLOAT_DTYPES + (torch.float64,), form="[B, G]")
    _validate.choice("mode", mode, ADVANTAGE_MODES)
    return reference.group_advantages(rewards, mode, _real("eps", eps, minimum=0.0))


def _real(name: str, value, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float; got {type(value).__name__}")
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be a finite float{bound}; got {value}")
    return float(value)


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")


torch.library.impl(_library.qualname(OP, "torch"), "CompositeExplicitAutograd")(reference.elva_rewards)


try:
    from elva_kernels.triton.elva_rewards import elva_rewards as triton_elva_rewards
except ImportError:  # no triton: the dispatcher gives the reason
    pass
else:
    # On CPU tensors this serves only the interpreter (TRITON_INTERPRET=1), which the tests use.
    torch.library.impl(_library.qualname(OP, "triton"), ("cuda", "cpu"))(triton_elva_rewards)


def _fake(query_emb, cand_emb, positive_index, mask, delta, gamma, alpha, eps, log_base, advantage, adv_eps,
          return_scores):
    rows = query_emb.shape[:2]
    total, margin, rank_reward, advantages = (query_emb.new_empty(rows, dtype=torch.float32) for _ in range(4))
    scores_shape = (*rows, cand_emb.shape[-2]) if return_scores else (0,)
    rank = query_emb.new_empty(rows, dtype=torch.int64)
    return total, margin, rank_reward, rank, advantages, query_emb.new_empty(scores_shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    query_emb, cand_emb, positive_index, mask = inputs[:4]
    ctx.delta, ctx.gamma, ctx.alpha, ctx.eps, ctx.log_base, ctx.advantage, ctx.adv_eps = inputs[4:11]
    # The backward recomputes scores and ranks (ties break the same way) instead of keeping [B, G, C].
    ctx.save_for_backward(query_emb, cand_emb, positive_index, mask)


def _backward(ctx, grad_total, grad_margin, grad_rank_reward, _grad_rank, grad_advantages, grad_scores):
    """Gradients with the ranks and the top negative n held constant.

    With g_T = grad_total + J_adv^T grad_advantages (the group/batch normalisation's Jacobian),
    the gradient w.r.t. the score s_c of a real candidate is

        (grad_rank_reward + eps * g_T) * (1 / (1 + log r)           if c = p
                                          -gamma * (log rank_c - 1)  otherwise)
      + (grad_margin + alpha * g_T) * [R_Margin > 0] * ([c = p] - [c = n])
      + grad_scores_c

    and masked candidates get none. Scores then flow to the unit rows (s_c = <q', c'_c>) and
    through the normalisation to the embeddings; shared candidates sum over the rollouts.
    """
    query_emb, cand_emb, positive_index, mask = ctx.saved_tensors
    scores, ranks, negatives = reference.scores_and_ranks(query_emb, cand_emb, positive_index, mask)
    margin, _, total = reference.rewards(
        scores, ranks, negatives, positive_index, ctx.delta, ctx.gamma, ctx.alpha, ctx.eps, ctx.log_base
    )
    grad_total = grad_total.double() + _advantages_backward(total, grad_advantages.double(), ctx.advantage, ctx.adv_eps)
    grad_margin = (grad_margin.double() + ctx.alpha * grad_total) * (margin > 0)
    grad_rank_reward = grad_rank_reward.double() + ctx.eps * grad_total

    # One-hot masks, not scatters: with scatters here, Inductor (torch 2.13, CPU) returned NaN
    # gradients under torch.compile.
    candidate = torch.arange(scores.shape[2], device=scores.device)
    is_positive = candidate == positive_index.view(-1, 1, 1)
    is_top = candidate == reference.top_negative(ranks, negatives).unsqueeze(2)
    at_p = 1 / (1 + reference.log_rank(reference.at_positive(ranks, positive_index), ctx.log_base))
    d_rank_reward = torch.where(negatives, -ctx.gamma * (reference.log_rank(ranks, ctx.log_base) - 1), 0)
    d_rank_reward = torch.where(is_positive, at_p.unsqueeze(2), d_rank_reward)
    d_margin = is_positive.double() - is_top.double()
    grad_s = grad_rank_reward.unsqueeze(2) * d_rank_reward + grad_margin.unsqueeze(2) * d_margin
    if grad_scores.numel():
        real = reference.real_candidates(mask, scores.shape, scores.device)
        grad_s = grad_s + torch.where(real, grad_scores, 0)
    grad_q, grad_c = _scores_backward(query_emb, cand_emb, grad_s.float(), *ctx.needs_input_grad[:2])
    return (grad_q, grad_c) + (None,) * 10


def _advantages_backward(total: torch.Tensor, grad: torch.Tensor, mode: str, adv_eps: float) -> torch.Tensor:
    """Vector-Jacobian product of ``reference.group_advantages`` at [B, G] ``total`` (float64)."""
    if mode == "none":
        return grad - grad.mean(1, keepdim=True)
    centered = reference.deviation(total, (1,))
    dims, dof = reference.std_axes(total, mode)
    spread, std, positive = reference.spread_and_std(total, mode)
    # A = centered / (std + eps), with d std / d r_i = spread_i / (dof * std). The spread already
    # sums to 0 over the rewards the std is taken from, so only the direct term needs centring.
    grad_std = -(grad * centered).sum(dims, keepdim=True) / (std + adv_eps) ** 2
    direct = grad / (std + adv_eps)
    return torch.where(positive, direct - direct.mean(1, keepdim=True) + grad_std * spread / (dof * std), 0)


def _scores_backward(query_emb, cand_emb, grad_scores, want_q, want_c):
    """Gradients w.r.t. the embeddings of fp32 [B, G, C] ``grad_scores``, block by block as the forward."""
    num_queries, group = query_emb.shape[:2]
    num_candidates, dim = cand_emb.shape[-2:]
    shared = cand_emb.dim() == 3
    grad_q = torch.empty_like(query_emb) if want_q else None
    grad_c = torch.empty_like(cand_emb) if want_c else None
    for b0, b1 in reference.query_blocks(num_queries, group * num_candidates * dim):
        g = grad_scores[b0:b1]
        if want_q:
            c = _common.prepare(cand_emb[b0:b1], "cosine")
            grad_unit = g @ c if shared else (g.unsqueeze(2) @ c).squeeze(2)  # [b, G, C] x [b, (G,) C, d]
            grad_q[b0:b1] = _common.prepare_backward(query_emb[b0:b1], "cosine", grad_unit)
        if want_c:
            q = _common.prepare(query_emb[b0:b1], "cosine")
            # shared: [b, C, G] @ [b, G, d] sums over the rollouts; per rollout: an outer product.
            grad_unit = g.transpose(1, 2) @ q if shared else g.unsqueeze(3) * q.unsqueeze(2)
            grad_c[b0:b1] = _common.prepare_backward(cand_emb[b0:b1], "cosine", grad_unit)
    return grad_q, grad_c


for _name in _library.variants(OP):
    torch.library.register_fake(_name)(_fake)
    torch.library.register_autograd(_name, _backward, setup_context=_setup_context)

"""elva_rewards and group_advantages: hand-computed cases, a float64 naive implementation, ties,
zero-std groups, gradients with the ranks held fixed, opcheck, torch.compile, bad input, memory."""
import math

import pytest
import torch
import torch._inductor.config
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from elva_kernels import elva_rewards, group_advantages
from elva_kernels.reference import elva_rewards as reference
from tests.helpers import assert_close_verbose

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LN = math.log

# Forward (atol, rtol) against the float64 naive. Both sides see the same upcast inputs, so the
# only error is the op's fp32 normalisation and fp32 score rounding (measured <= 2.1e-7): one row
# serves every dtype. Advantages divide by a group std of ~0.1 (measured <= 1e-6).
REWARD_TOLERANCE = {dtype: (2e-6, 2e-6) for dtype in DTYPES}
ADVANTAGE_TOLERANCE = {dtype: (1e-5, 1e-5) for dtype in DTYPES}
# Backward, relative to the largest gradient entry (fp32 measured <= 1.4e-6). Half-precision
# gradients are returned in the input dtype: twice its unit roundoff (2**-11 fp16, 2**-8 bf16).
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


# ---- the naive implementation -------------------------------------------------------------

def naive(q, c, positive_index, mask=None, *, delta=0.05, gamma=0.01, alpha=0.4, eps=0.6, log_base="e",
          advantage="group", adv_eps=1e-4):
    """SPEC A3 in float64, materialising [B, G, C, d]. Ranks come from the spec's fp32 scores
    (fp32 unit rows, float64 products, one rounding) by a double argsort and are held fixed;
    the values, and autograd through them, are float64 throughout."""
    num_queries, group, _ = q.shape
    if c.dim() == 3:
        c = c.unsqueeze(1).expand(num_queries, group, *c.shape[1:])
    num_candidates = c.shape[2]
    positive_index = torch.as_tensor(positive_index).expand(num_queries).view(-1, 1, 1).expand(num_queries, group, 1)
    real = torch.ones(num_queries, group, num_candidates, dtype=torch.bool)
    if mask is not None:
        real = (mask if mask.dim() == 3 else mask.unsqueeze(1)).expand_as(real)
    s = (F.normalize(q.double(), dim=-1).unsqueeze(2) * F.normalize(c.double(), dim=-1)).sum(-1)
    with torch.no_grad():
        s32 = (F.normalize(q.float(), dim=-1).double().unsqueeze(2) * F.normalize(c.float(), dim=-1).double())
        s32 = s32.sum(-1).float().masked_fill(~real, float("-inf"))
        rank = s32.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1) + 1
    base = math.e if log_base == "e" else 2.0
    log = lambda x: torch.log(x.double()) / math.log(base)  # noqa: E731
    negative = real & (torch.arange(num_candidates) != positive_index)
    s_p, r = s.gather(2, positive_index).squeeze(2), rank.gather(2, positive_index).squeeze(2)
    top = torch.where(negative, rank, num_candidates + 1).argmin(2, keepdim=True)
    margin = (s_p - s.gather(2, top).squeeze(2) - delta).clamp(min=0)
    rank_reward = s_p / (1 + log(r)) - gamma * (s * (log(rank) - 1) * negative).sum(2)
    total = alpha * margin + eps * rank_reward
    centered = total - total.mean(1, keepdim=True)
    if advantage == "none" or group == 1:  # one rollout: centered is already 0
        advantages = centered
    else:
        std = total.std() if advantage == "batch" else total.std(1, keepdim=True)
        advantages = centered / (std + adv_eps)
    return {
        "total": total, "margin": margin, "rank_reward": rank_reward, "rank": r, "advantages": advantages,
        "scores": s.masked_fill(~real, float("-inf")),
    }


def random_case(gen, *, num_queries, group, num_candidates, dim, shared, mask, dtype):
    """Queries, candidates, an int64 positive per query (near the query for even queries, so both
    margin branches occur) and an optional mask that keeps the positive and one negative."""
    q = torch.randn(num_queries, group, dim, generator=gen)
    c = torch.randn(num_queries, *(() if shared else (group,)), num_candidates, dim, generator=gen)
    positive = torch.randint(0, num_candidates, (num_queries,), generator=gen)
    # Even queries get a positive near the query (active margins), odd ones a random one.
    rows = torch.arange(0, num_queries, 2)
    near = q[rows, 0] if shared else q[rows]
    if shared:
        c[rows, positive[rows]] = near + 0.8 * torch.randn(near.shape, generator=gen)
    else:
        c[rows, :, positive[rows]] = near + 0.8 * torch.randn(near.shape, generator=gen)
    real = None
    if mask is not None:
        shape = (num_queries, num_candidates) if mask == "2d" else (num_queries, group, num_candidates)
        real = torch.rand(shape, generator=gen) > 0.3
        one_negative = (positive + torch.randint(1, num_candidates, (num_queries,), generator=gen)) % num_candidates
        for index in (positive, one_negative):
            real.view(num_queries, -1, num_candidates)[torch.arange(num_queries), :, index] = True
    return q.to(dtype), c.to(dtype), positive, real


def compare_forward(out, expected, dtype, what=""):
    atol, rtol = REWARD_TOLERANCE[dtype]
    for name in ("total", "margin", "rank_reward"):
        assert_close_verbose(getattr(out, name), expected[name], atol=atol, rtol=rtol, what=f"{what} {name}")
    atol, rtol = ADVANTAGE_TOLERANCE[dtype]
    assert_close_verbose(out.advantages, expected["advantages"], atol=atol, rtol=rtol, what=f"{what} advantages")
    assert torch.equal(out.rank, expected["rank"]), f"{what} rank"
    for name in ("total", "margin", "rank_reward", "advantages"):
        assert getattr(out, name).dtype == torch.float32
    if out.scores is not None:
        atol, rtol = REWARD_TOLERANCE[dtype]
        assert_close_verbose(out.scores, expected["scores"], atol=atol, rtol=rtol, what=f"{what} scores")


def unit(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---- (a) hand-computed cases ---------------------------------------------------------------
# The query is (1, 0); (4, 3) scores 0.8, (3, 4) 0.6, (0, 1) 0, (-1, 0) -1 and (1, 0) 1.

Q = unit([[1.0, 0.0]])


def run_one(candidates, positive, **options):
    return elva_rewards(Q, candidates.unsqueeze(0), positive_index=positive, backend="torch", **options)


def check(out, *, rank, margin, rank_reward, alpha=0.4, eps=0.6):
    assert out.rank.tolist() == [[rank]]
    torch.testing.assert_close(out.margin, torch.tensor([[margin]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.rank_reward, torch.tensor([[rank_reward]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.total, torch.tensor([[alpha * margin + eps * rank_reward]]), atol=1e-6, rtol=0)


def test_positive_first():
    out = run_one(unit([4, 3], [3, 4], [0, 1], [-1, 0]), 0)
    penalty = 0.6 * (LN(2) - 1) + 0.0 * (LN(3) - 1) + (-1.0) * (LN(4) - 1)
    check(out, rank=1, margin=0.8 - 0.6 - 0.05, rank_reward=0.8 / (1 + LN(1)) - 0.01 * penalty)


def test_positive_last():
    out = run_one(unit([1, 0], [4, 3], [3, 4], [0, 1]), 3)
    penalty = 1.0 * (LN(1) - 1) + 0.8 * (LN(2) - 1) + 0.6 * (LN(3) - 1)
    check(out, rank=4, margin=0.0, rank_reward=0.0 / (1 + LN(4)) - 0.01 * penalty)


def test_log_base_two():
    out = run_one(unit([4, 3], [3, 4], [0, 1], [-1, 0]), 0, log_base=2)
    penalty = 0.6 * (math.log2(2) - 1) + 0.0 * (math.log2(3) - 1) + (-1.0) * (math.log2(4) - 1)
    check(out, rank=1, margin=0.15, rank_reward=0.8 - 0.01 * penalty)
    # With base 2 only rank 1 has a negative weight: the rank-2 negative costs nothing here.
    assert run_one(unit([4, 3], [3, 4]), 0, log_base="2").rank_reward.item() == pytest.approx(0.8, abs=1e-6)


@pytest.mark.parametrize("positive", [1, 2])
def test_identical_candidates_rank_by_index(positive):
    # Candidates 1 and 2 are the same vector (0.8), and so are 0 and 3 (0.6): ranks 3, 1, 2, 4.
    candidates = unit([3, 4], [4, 3], [4, 3], [3, 4])
    out = run_one(candidates, positive, return_scores=True)
    assert out.scores[0, 0, 1] == out.scores[0, 0, 2] and out.scores[0, 0, 0] == out.scores[0, 0, 3]
    ranks = {0: 3, 1: 1, 2: 2, 3: 4}
    penalty = sum(s * (LN(ranks[c]) - 1) for c, s in enumerate([0.6, 0.8, 0.8, 0.6]) if c != positive)
    # The top negative is the positive's twin, so the margin is clamped 0.8 - 0.8 - delta.
    check(out, rank=ranks[positive], margin=0.0, rank_reward=0.8 / (1 + LN(ranks[positive])) - 0.01 * penalty)
    tied = run_one(candidates, positive, delta=-0.1)
    assert tied.margin.item() == pytest.approx(0.1, abs=1e-6)


def test_masked_candidates_have_no_rank():
    candidates = unit([1, 0], [4, 3], [3, 4], [0, 1])
    out = run_one(candidates, 3, mask=torch.tensor([[False, True, True, True]]), return_scores=True)
    # Without candidate 0: 0.8 ranks 1, 0.6 ranks 2 and the positive (0) ranks 3.
    penalty = 0.8 * (LN(1) - 1) + 0.6 * (LN(2) - 1)
    check(out, rank=3, margin=0.0, rank_reward=0.0 / (1 + LN(3)) - 0.01 * penalty)
    assert out.scores[0, 0, 0] == float("-inf")


def test_options_enter_the_total():
    out = run_one(unit([4, 3], [3, 4]), 0, delta=0.1, gamma=0.5, alpha=2.0, eps=-1.0)
    check(out, rank=1, margin=0.1, rank_reward=0.8 - 0.5 * 0.6 * (LN(2) - 1), alpha=2.0, eps=-1.0)


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(group_advantages(rewards), torch.tensor([[-1.0, 0.0, 1.0]]) / (1 + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, "none"), torch.tensor([[-1.0, 0.0, 1.0]]))
    # Batch: group means 2 and 2, the std of (1, 3, 2, 2) is sqrt(2/3).
    batch = group_advantages(torch.tensor([[1.0, 3.0], [2.0, 2.0]]), "batch", 0.0)
    torch.testing.assert_close(batch, torch.tensor([[-1.0, 1.0], [0.0, 0.0]]) / math.sqrt(2 / 3))


@pytest.mark.parametrize("mode", ["group", "batch"])
def test_group_advantages_match_trl(mode):
    rewards = torch.randn(6, 8)
    std = rewards.std() if mode == "batch" else rewards.std(1, keepdim=True)
    expected = (rewards - rewards.mean(1, keepdim=True)) / (std + 1e-4)  # TRL's GRPO normalisation
    torch.testing.assert_close(group_advantages(rewards, mode), expected)


# ---- (b) random cases against the naive implementation --------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("mask", [None, "2d", "3d"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_rollout"])
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("num_candidates", [2, 7, 101])
def test_matches_naive(num_candidates, group, shared, mask, dtype):
    gen = torch.Generator().manual_seed(num_candidates * 100 + group)
    for advantage in ("group", "batch", "none"):
        q, c, positive, real = random_case(
            gen, num_queries=3, group=group, num_candidates=num_candidates, dim=16, shared=shared, mask=mask,
            dtype=dtype,
        )
        out = elva_rewards(q, c, positive_index=positive, mask=real, advantage=advantage, return_scores=True,
                           backend="torch")
        compare_forward(out, naive(q, c, positive, real, advantage=advantage), dtype, what=advantage)


def test_shared_layout_equals_copied_layout():
    q, c, positive, real = random_case(torch.Generator().manual_seed(3), num_queries=4, group=5, num_candidates=33,
                                       dim=24, shared=True, mask="2d", dtype=torch.float32)
    shared = elva_rewards(q, c, positive_index=positive, mask=real, return_scores=True)
    copied = elva_rewards(q, c.unsqueeze(1).expand(-1, 5, -1, -1).contiguous(), positive_index=positive, mask=real,
                          return_scores=True)
    assert torch.equal(shared.rank, copied.rank)
    for name in ("total", "margin", "rank_reward", "advantages", "scores"):
        torch.testing.assert_close(getattr(shared, name), getattr(copied, name), atol=1e-6, rtol=1e-6)


def test_every_option_non_default():
    q, c, positive, real = random_case(torch.Generator().manual_seed(4), num_queries=3, group=4, num_candidates=9,
                                       dim=8, shared=False, mask="3d", dtype=torch.bfloat16)
    options = dict(delta=0.1, gamma=0.05, alpha=0.3, eps=0.7, log_base=2, advantage="batch", adv_eps=1e-3)
    out = elva_rewards(q, c, positive_index=positive, mask=real, return_scores=True, differentiable=True,
                       backend="torch", **options)
    compare_forward(out, naive(q, c, positive, real, **options), torch.bfloat16)


def test_int_positive_index_and_non_contiguous_inputs():
    q = torch.randn(8, 3, 12).transpose(0, 1)  # [B, G, d] = [3, 8, 12]
    c = torch.randn(16, 3, 12)[::2].transpose(0, 1)  # shared [B, C, d] = [3, 8, 12], every other row
    assert not q.is_contiguous() and not c.is_contiguous()
    out = elva_rewards(q, c, positive_index=2, return_scores=True)
    expected = elva_rewards(q.contiguous(), c.contiguous(), positive_index=torch.full((3,), 2), return_scores=True)
    for got, want in zip(out, expected):
        assert torch.equal(got, want)


def test_bitwise_deterministic():
    q, c, positive, real = random_case(torch.Generator().manual_seed(5), num_queries=4, group=8, num_candidates=101,
                                       dim=32, shared=True, mask="3d", dtype=torch.float32)
    runs = []
    for _ in range(2):
        qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
        out = elva_rewards(qq, cc, positive_index=positive, mask=real, return_scores=True, differentiable=True)
        grads = torch.autograd.grad(out.advantages.sum() + out.margin.sum(), (qq, cc))
        runs.append([t.detach() for t in out] + list(grads))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


# ---- (c) one rollout, equal rewards: exactly 0, never NaN -----------------------------------

@pytest.mark.parametrize("advantage", ["group", "batch", "none"])
def test_single_rollout_gives_zero_advantages(advantage):
    out = elva_rewards(torch.randn(5, 1, 8), torch.randn(5, 6, 8), advantage=advantage, adv_eps=0.0)
    assert torch.equal(out.advantages, torch.zeros(5, 1))


@pytest.mark.parametrize("advantage", ["group", "batch", "none"])
@pytest.mark.parametrize("adv_eps", [1e-4, 0.0])
def test_equal_rollouts_give_zero_advantages(advantage, adv_eps):
    # Every rollout of a query is the same vector, so each group's totals are equal; all
    # queries are equal too, which makes the batch std 0.
    q = torch.randn(1, 1, 16).expand(4, 7, 16).requires_grad_()
    out = elva_rewards(q, torch.randn(1, 40, 16).expand(4, 40, 16), advantage=advantage, adv_eps=adv_eps,
                       differentiable=True)
    assert torch.equal(out.advantages, torch.zeros(4, 7))
    (grad,) = torch.autograd.grad(out.advantages, q, torch.randn(4, 7))
    assert torch.isfinite(grad).all()
    if advantage != "none":  # A is held at 0 where the std is 0: no gradient through it
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("mode", ["group", "batch", "none"])
def test_group_advantages_zero_std_no_nan(mode):
    rewards = torch.tensor([[0.1, 0.1, 0.1], [0.3, 0.3, 0.3], [1.0, 2.0, 4.0]], requires_grad=True)
    out = group_advantages(rewards, mode, eps=0.0)
    assert torch.equal(out[:2], torch.zeros(2, 3))
    assert torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out, rewards, torch.randn(3, 3))
    assert torch.isfinite(grad).all()
    assert torch.equal(group_advantages(torch.randn(4, 1), mode), torch.zeros(4, 1))


# ---- (d) gradients with the ranks held fixed -----------------------------------------------

OUTPUTS = ("total", "margin", "rank_reward", "advantages", "scores")


def gradients(outputs, inputs, grad_out):
    return torch.autograd.grad([outputs[n] for n in OUTPUTS], inputs, [grad_out[n] for n in OUTPUTS])


@pytest.mark.parametrize("advantage", ["group", "batch", "none"])
@pytest.mark.parametrize("mask", [None, "3d"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_rollout"])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_gradients_match_naive_autograd(group, shared, mask, advantage):
    gen = torch.Generator().manual_seed(7 * group + 11)
    q, c, positive, real = random_case(gen, num_queries=4, group=group, num_candidates=11, dim=12, shared=shared,
                                       mask=mask, dtype=torch.float32)
    q, c = q.requires_grad_(), c.requires_grad_()
    out = elva_rewards(q, c, positive_index=positive, mask=real, advantage=advantage, return_scores=True,
                       differentiable=True)
    assert (out.margin > 0).any() and (out.margin == 0).any(), "the case should exercise both margin branches"
    grad_out = {n: torch.randn(getattr(out, n).shape, generator=gen) for n in OUTPUTS}
    actual = gradients(out._asdict(), (q, c), grad_out)
    q64, c64 = q.detach().double().requires_grad_(), c.detach().double().requires_grad_()
    expected = gradients(naive(q64, c64, positive, real, advantage=advantage), (q64, c64),
                         {n: g.double() for n, g in grad_out.items()})
    for name, got, want in zip(("query_emb", "cand_emb"), actual, expected):
        scale = GRAD_TOLERANCE[torch.float32] * want.abs().max().item()
        assert_close_verbose(got, want, atol=scale, rtol=GRAD_TOLERANCE[torch.float32], what=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_gradients(dtype):
    gen = torch.Generator().manual_seed(8)
    q, c, positive, real = random_case(gen, num_queries=3, group=4, num_candidates=9, dim=16, shared=True,
                                       mask="2d", dtype=dtype)
    q, c = q.requires_grad_(), c.requires_grad_()
    out = elva_rewards(q, c, positive_index=positive, mask=real, return_scores=True, differentiable=True)
    grad_out = {n: torch.randn(getattr(out, n).shape, generator=gen) for n in OUTPUTS}
    actual = gradients(out._asdict(), (q, c), grad_out)
    q64, c64 = q.detach().double().requires_grad_(), c.detach().double().requires_grad_()
    expected = gradients(naive(q64, c64, positive, real), (q64, c64), {n: g.double() for n, g in grad_out.items()})
    for got, want in zip(actual, expected):
        assert got.dtype == dtype
        scale = GRAD_TOLERANCE[dtype] * want.abs().max().item()
        assert_close_verbose(got, want, atol=scale, rtol=GRAD_TOLERANCE[dtype], what=f"{dtype} grad")


def test_advantage_gradients_match_autograd_of_the_rule():
    # Ties within groups and across the batch, where torch.std has no gradient: compare the op's
    # explicit backward with autograd through group_advantages, the rule the forward applies.
    q = torch.randn(3, 1, 8).repeat(1, 4, 1)
    q[2, 1:] += 0.3 * torch.randn(3, 8)
    c = torch.randn(3, 10, 8)
    for advantage in ("group", "batch", "none"):
        qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
        out = elva_rewards(qq, cc, advantage=advantage, differentiable=True)
        weights = torch.randn(3, 4)
        actual = torch.autograd.grad(out.advantages, (qq, cc), weights)
        qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
        total = elva_rewards(qq, cc, differentiable=True).total.double()
        expected = torch.autograd.grad(group_advantages(total, advantage), (qq, cc), weights.double())
        for got, want in zip(actual, expected):
            torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item() + 1e-7, rtol=1e-4)


def away_from_kinks(q, c, positive, mask, delta, gap):
    """True when every (query, rollout) has its real scores more than ``gap`` apart and its margin more than ``gap``
    from the clamp: a finite-difference step then changes no rank, no top negative and no margin branch."""
    out = torch.ops.elva.elva_rewards_torch.default(q, c, positive, mask, delta, 0.01, 0.4, 0.6, math.e, "none", 0.0,
                                                    True)
    scores = out[5].double()
    ordered = scores.sort(dim=2, descending=True).values
    gaps = ordered[..., :-1] - ordered[..., 1:]
    at = positive.view(-1, 1, 1).expand(*scores.shape[:2], 1)
    top_negative = scores.scatter(2, at, float("-inf")).amax(2)
    before_clamp = scores.gather(2, at).squeeze(2) - top_negative - delta
    return bool((gaps[torch.isfinite(gaps)] > gap).all()) and bool((before_clamp.abs() > gap).all())


@pytest.mark.parametrize("advantage", ["group", "batch", "none"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_rollout"])
def test_gradcheck_float64(shared, advantage):
    """torch.autograd.gradcheck of the reference's backward on float64 inputs (the torch op itself; the public
    function takes fp32/fp16/bf16 only). Ranks are held constant by the op; the case is drawn until no finite
    difference can change them, the top negative or the margin's branch. The forward rounds scores and outputs
    to fp32, hence eps 1e-3 and atol 1e-3 (measured worst error 3e-4; the Jacobian's entries are 1e-2 to 1)."""
    op = torch.ops.elva.elva_rewards_torch.default
    mask = {"group": None, "batch": "2d", "none": "3d"}[advantage]
    delta, gamma, alpha, eps, log_base = 0.03, 0.2, 0.7, 0.5, (math.e if shared else 2.0)
    gen = torch.Generator().manual_seed(17 + 3 * shared + len(advantage))
    for group in (3, 1):
        while True:
            q, c, positive, real = random_case(gen, num_queries=2, group=group, num_candidates=5, dim=4,
                                               shared=shared, mask=mask, dtype=torch.float64)
            if away_from_kinks(q, c, positive, real, delta, gap=0.02):
                break

        def differentiable_outputs(q, c):
            total, margin, rank_reward, _, advantages, scores = op(q, c, positive, real, delta, gamma, alpha, eps,
                                                                   log_base, advantage, 1e-4, True)
            return total, margin, rank_reward, advantages, scores.masked_fill(scores == float("-inf"), 0.0)

        inputs = (q.requires_grad_(), c.requires_grad_())
        assert all(t.dtype == torch.float64 for t in torch.autograd.grad(differentiable_outputs(*inputs)[0].sum(),
                                                                         inputs))
        assert torch.autograd.gradcheck(differentiable_outputs, inputs, eps=1e-3, atol=1e-3, rtol=1e-3)


def test_not_differentiable_by_default():
    q, c = torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True)
    out = elva_rewards(q, c, return_scores=True)
    assert all(not t.requires_grad for t in out)


# ---- (e) opcheck, (f) torch.compile -----------------------------------------------------------

def opcheck_cases():
    gen = torch.Generator().manual_seed(9)
    cases = []
    for shared, mask, advantage, log_base, return_scores, dtype in [
        (True, None, "group", math.e, False, torch.float32),
        (False, "3d", "batch", 2.0, True, torch.float32),
        (True, "2d", "none", math.e, True, torch.float16),
    ]:
        q, c, positive, real = random_case(gen, num_queries=2, group=3, num_candidates=6, dim=8, shared=shared,
                                           mask=mask, dtype=dtype)
        grad = dtype == torch.float32
        cases.append((q.requires_grad_(grad), c.requires_grad_(grad), positive, real, 0.05, 0.01, 0.4, 0.6, log_base,
                      advantage, 1e-4, return_scores))
    return cases


@pytest.mark.parametrize("args", opcheck_cases(), ids=["shared-group", "per_rollout-batch-scores", "half-none"])
def test_opcheck(args):
    torch.library.opcheck(torch.ops.elva.elva_rewards_torch.default, args)


# The compile caches key on the traced forward graph, not on the registered backward's source:
# a stale entry would silently test an older backward.
@torch._inductor.config.patch(force_disable_caches=True)
def test_compile_fullgraph():
    q, c, positive, real = random_case(torch.Generator().manual_seed(10), num_queries=3, group=4, num_candidates=7,
                                       dim=8, shared=True, mask="3d", dtype=torch.float32)

    def run(q, c, positive, real):
        return elva_rewards(q, c, positive_index=positive, mask=real, log_base=2, return_scores=True,
                            differentiable=True)

    compiled = torch.compile(run, fullgraph=True)
    q1, c1 = q.clone().requires_grad_(), c.clone().requires_grad_()
    q2, c2 = q.clone().requires_grad_(), c.clone().requires_grad_()
    eager, got = run(q1, c1, positive, real), compiled(q2, c2, positive, real)
    for a, b in zip(got, eager):
        assert torch.equal(a, b)
    weights = torch.randn(3, 4)
    for a, b in zip(torch.autograd.grad(got.advantages, (q2, c2), weights),
                    torch.autograd.grad(eager.advantages, (q1, c1), weights)):
        torch.testing.assert_close(a, b)
    out = torch.compile(lambda q, c: elva_rewards(q, c, positive_index=1), fullgraph=True)(q, c)
    assert out.scores is None and out.total.shape == (3, 4)


# ---- (g) bad input -------------------------------------------------------------------------

B, G, C, D = 2, 3, 5, 4
QUERIES, CANDIDATES = torch.randn(B, G, D), torch.randn(B, C, D)


def call(**changes):
    args = {"query_emb": QUERIES, "cand_emb": CANDIDATES, "backend": "torch"} | changes
    return elva_rewards(args.pop("query_emb"), args.pop("cand_emb"), **args)


def hide_positive():
    mask = torch.ones(B, G, C, dtype=torch.bool)
    mask[1, 2, 0] = False
    return mask


def no_negative():
    mask = torch.ones(B, G, C, dtype=torch.bool)
    mask[0, 1, 1:] = False
    return mask


BAD = [
    # (changes, error type, words the message must contain)
    ({"positive_index": C}, ValueError, "positive_index must be >= 0 and <= 4"),
    ({"positive_index": -1}, ValueError, "positive_index must be >= 0"),
    ({"positive_index": 1.0}, TypeError, "positive_index must be an int"),
    ({"positive_index": torch.tensor([0, C])}, ValueError, "positive_index holds ids outside [0, 5)"),
    ({"positive_index": torch.tensor([0, 1], dtype=torch.int32)}, TypeError, "positive_index must have dtype"),
    ({"positive_index": torch.tensor([0, 1, 2])}, ValueError, "positive_index must be int64 [B] with B = 2"),
    ({"mask": hide_positive()}, ValueError, "mask must keep every positive (positive_index) unmasked"),
    ({"mask": no_negative()}, ValueError, "mask must leave at least one unmasked negative for every query and rollout;"
     " query 0, rollout 1"),
    ({"cand_emb": torch.randn(B, 1, D)}, ValueError, "cand_emb must hold C >= 2 candidates"),
    ({"query_emb": QUERIES.index_fill(1, torch.tensor([1]), float("nan"))}, ValueError, "query_emb must contain only"),
    ({"cand_emb": CANDIDATES.index_fill(1, torch.tensor([2]), float("inf"))}, ValueError, "cand_emb must contain only"),
    ({"query_emb": torch.randn(B, D)}, ValueError, "query_emb must be a 3-D tensor [B, G, d]"),
    ({"cand_emb": torch.randn(B, G, C, D, 1)}, ValueError, "cand_emb must be a 3-D or 4-D tensor"),
    ({"cand_emb": torch.randn(B + 1, C, D)}, ValueError, "cand_emb must be [B, G, C, d] or [B, C, d]"),
    ({"cand_emb": torch.randn(B, G + 1, C, D)}, ValueError, "with G = 3"),
    ({"cand_emb": torch.randn(B, C, D + 1)}, ValueError, "with d = 4"),
    ({"query_emb": QUERIES.double()}, TypeError, "query_emb must have dtype in (float32, float16, bfloat16)"),
    ({"cand_emb": CANDIDATES.int()}, TypeError, "cand_emb must have dtype"),
    ({"cand_emb": CANDIDATES.half()}, TypeError, "one dtype; got query_emb torch.float32, cand_emb torch.float16"),
    ({"query_emb": QUERIES.tolist()}, TypeError, "query_emb must be a torch.Tensor"),
    ({"query_emb": torch.randn(0, G, D)}, ValueError, "query_emb must not be empty"),
    ({"cand_emb": torch.randn(B, 0, D)}, ValueError, "cand_emb must not be empty"),
    ({"mask": torch.ones(B, C, dtype=torch.uint8)}, TypeError, "mask must have dtype in (bool)"),
    ({"mask": torch.ones(B, C + 1, dtype=torch.bool)}, ValueError, "mask must be bool [B, C] = (2, 5)"),
    ({"mask": torch.ones(B, C, dtype=torch.bool, device="meta")}, ValueError, "mask on meta"),
    ({"log_base": 10}, ValueError, "log_base must be one of ('e', 2, '2'); got 10"),
    ({"advantage": "grp"}, ValueError, "advantage must be one of ('group', 'batch', 'none')"),
    ({"adv_eps": -1e-4}, ValueError, "adv_eps must be a finite float >= 0.0"),
    ({"adv_eps": "1e-4"}, TypeError, "adv_eps must be a float; got str"),
    ({"delta": float("nan")}, ValueError, "delta must be a finite float; got nan"),
    ({"gamma": None}, TypeError, "gamma must be a float"),
    ({"return_scores": 1}, TypeError, "return_scores must be a bool"),
    ({"differentiable": "yes"}, TypeError, "differentiable must be a bool"),
    ({"backend": "fast"}, ValueError, "backend must be one of"),
    ({"backend": "cuda"}, ValueError, "cuda"),
]


@pytest.mark.parametrize("changes, error, words", BAD, ids=[f"{i}-{next(iter(b[0]))}" for i, b in enumerate(BAD)])
def test_bad_input(changes, error, words):
    with pytest.raises(error) as info:
        call(**changes)
    assert words in str(info.value)


@pytest.mark.parametrize("args, error, words", [
    ((torch.randn(4),), ValueError, "rewards must be a 2-D tensor [B, G]"),
    ((torch.ones(2, 3, dtype=torch.int64),), TypeError, "rewards must have dtype"),
    ((torch.randn(2, 3), "mean"), ValueError, "mode must be one of ('group', 'batch', 'none')"),
    ((torch.randn(2, 3), "group", -1.0), ValueError, "eps must be a finite float >= 0.0"),
])
def test_group_advantages_bad_input(args, error, words):
    with pytest.raises(error) as info:
        group_advantages(*args)
    assert words in str(info.value)


# ---- (h) the shared layout never materialises [B, G, C, d] ----------------------------------

class LargestOutput(TorchDispatchMode):
    """Records the largest storage any op returns, in elements. Storage, not numel: an expand
    view has the numel of the broadcast but owns no memory."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.elements = max(self.elements, t.untyped_storage().nbytes() // t.element_size())
        return out


def test_shared_layout_is_broadcast_not_copied():
    num_queries, group, num_candidates, dim = 4, 8, 33, 64
    q, c, positive, real = random_case(torch.Generator().manual_seed(12), num_queries=num_queries, group=group,
                                       num_candidates=num_candidates, dim=dim, shared=True, mask="2d",
                                       dtype=torch.float32)
    broadcast = num_queries * group * num_candidates * dim
    with LargestOutput() as forward:
        reference.elva_rewards(q, c, positive, real, 0.05, 0.01, 0.4, 0.6, math.e, "group", 1e-4, True)
    assert 0 < forward.elements < broadcast
    q, c = q.requires_grad_(), c.requires_grad_()
    out = elva_rewards(q, c, positive_index=positive, mask=real, return_scores=True, differentiable=True)
    with LargestOutput() as backward:
        outputs = [out.advantages, out.scores]
        torch.autograd.grad(outputs, (q, c), [torch.ones_like(t) for t in outputs])
    assert 0 < backward.elements < broadcast

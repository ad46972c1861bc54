"""elva_rewards, fast backends on CPU tensors (the C++/OpenMP kernel, and the Triton kernel under the interpreter):
hand-computed cases, random cases against the reference, zero-std groups, bad input, gradients, opcheck.
tests/ops/test_split_select_gpu.py and test_cuda_matches_cpu.py cover the GPU."""
import math

import pytest
import torch

from elva_kernels import elva_rewards
from tests.helpers import assert_close_verbose, backend_or_skip, ragged_size
from tests.ops import test_elva_rewards as rewards_tests

OP = "elva_rewards"
FAST = ["cpu", "triton"]
LN = math.log
# The interpreter's tl.sort costs about 0.7 s per program at C = 128: keep its cases small.
CASES = {"cpu": 120, "triton": 24}
MAX_C = {"cpu": 512, "triton": 40}


def need(backend):
    backend_or_skip(OP, backend, "cpu", torch.float32)


def run_one(backend, candidates, positive, **options):
    return elva_rewards(rewards_tests.Q, candidates.unsqueeze(0), positive_index=positive, backend=backend, **options)


@pytest.mark.parametrize("backend", FAST)
def test_hand_computed_cases(backend):
    need(backend)
    unit, check = rewards_tests.unit, rewards_tests.check
    # Positive first: scores 0.8 (positive), 0.6, 0, -1.
    out = run_one(backend, unit([4, 3], [3, 4], [0, 1], [-1, 0]), 0)
    penalty = 0.6 * (LN(2) - 1) + 0.0 * (LN(3) - 1) + (-1.0) * (LN(4) - 1)
    check(out, rank=1, margin=0.8 - 0.6 - 0.05, rank_reward=0.8 - 0.01 * penalty)
    # Positive last.
    out = run_one(backend, unit([1, 0], [4, 3], [3, 4], [0, 1]), 3)
    penalty = 1.0 * (LN(1) - 1) + 0.8 * (LN(2) - 1) + 0.6 * (LN(3) - 1)
    check(out, rank=4, margin=0.0, rank_reward=0.0 - 0.01 * penalty)
    # Ties: candidates 1 and 2 are one vector (0.8), 0 and 3 another (0.6): ranks 3, 1, 2, 4.
    for positive in (1, 2):
        out = run_one(backend, unit([3, 4], [4, 3], [4, 3], [3, 4]), positive, return_scores=True)
        assert out.scores[0, 0, 1] == out.scores[0, 0, 2] and out.scores[0, 0, 0] == out.scores[0, 0, 3]
        ranks = {0: 3, 1: 1, 2: 2, 3: 4}
        penalty = sum(s * (LN(ranks[c]) - 1) for c, s in enumerate([0.6, 0.8, 0.8, 0.6]) if c != positive)
        check(out, rank=ranks[positive], margin=0.0, rank_reward=0.8 / (1 + LN(ranks[positive])) - 0.01 * penalty)
    # Base 2 and a mask.
    out = run_one(backend, unit([4, 3], [3, 4], [0, 1], [-1, 0]), 0, log_base=2)
    penalty = 0.6 * (math.log2(2) - 1) + 0.0 * (math.log2(3) - 1) + (-1.0) * (math.log2(4) - 1)
    check(out, rank=1, margin=0.15, rank_reward=0.8 - 0.01 * penalty)
    out = run_one(backend, unit([1, 0], [4, 3], [3, 4], [0, 1]), 3, mask=torch.tensor([[False, True, True, True]]))
    check(out, rank=3, margin=0.0, rank_reward=0.0 - 0.01 * (0.8 * (LN(1) - 1) + 0.6 * (LN(2) - 1)))


@pytest.mark.parametrize("backend", FAST)
def test_matches_reference(backend):
    need(backend)
    gen = torch.Generator().manual_seed(4)
    for case in range(CASES[backend]):
        check_random_case(backend, gen, case, num_queries=ragged_size(gen, 1, 4), group=ragged_size(gen, 1, 16),
                          num_candidates=ragged_size(gen, 2, MAX_C[backend]))


def check_random_case(backend, gen, case, *, num_queries, group, num_candidates, min_dim=1):
    """One random case (the options cycle with ``case``) on ``backend`` against the reference."""
    dtype = (torch.float32, torch.float16, torch.bfloat16)[case % 3]
    shared, mask = bool(case % 2), (None, "2d", "3d")[case % 3 if case % 5 else 0]
    q, c, positive, real = rewards_tests.random_case(
        gen, num_queries=num_queries, group=group, num_candidates=num_candidates, dim=ragged_size(gen, min_dim, 48),
        shared=shared, mask=mask, dtype=dtype,
    )
    if case % 4 == 0 and c.shape[-2] > 3:  # exact duplicates: ties by index
        c[..., 1, :] = c[..., 3, :]
    options = dict(positive_index=positive, mask=real, advantage=("group", "batch", "none")[case % 3],
                   log_base=("e", 2)[case % 2], return_scores=True, delta=0.01 * (case % 4))
    out = elva_rewards(q, c, backend=backend, **options)
    expected = elva_rewards(q, c, backend="torch", **options)
    what = f"case {case} ({tuple(c.shape)}, {dtype}, mask={mask})"
    assert torch.equal(out.rank, expected.rank), what
    for name in ("total", "margin", "rank_reward", "advantages"):
        assert_close_verbose(getattr(out, name), getattr(expected, name), atol=2e-5, rtol=1e-5, what=f"{what} {name}")
    finite = torch.isfinite(expected.scores)
    assert torch.equal(torch.isfinite(out.scores), finite), what
    assert_close_verbose(out.scores[finite], expected.scores[finite], atol=2e-6, rtol=2e-6, what=f"{what} scores")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("advantage", ["group", "batch", "none"])
def test_zero_std_gives_zero_advantages(backend, advantage):
    need(backend)
    out = elva_rewards(torch.randn(3, 1, 8), torch.randn(3, 6, 8), advantage=advantage, adv_eps=0.0, backend=backend)
    assert torch.equal(out.advantages, torch.zeros(3, 1))
    q = torch.randn(1, 1, 16).expand(2, 5, 16)
    out = elva_rewards(q, torch.randn(1, 9, 16).expand(2, 9, 16), advantage=advantage, adv_eps=0.0, backend=backend)
    assert torch.equal(out.advantages, torch.zeros(2, 5))


@pytest.mark.parametrize("backend", FAST)
def test_bad_data_raises(backend):
    need(backend)
    q, c = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    hide = torch.ones(2, 5, dtype=torch.bool)
    hide[1, 0] = False
    with pytest.raises(ValueError, match="mask must keep every positive"):
        elva_rewards(q, c, mask=hide, backend=backend)
    lonely = torch.zeros(2, 5, dtype=torch.bool)
    lonely[:, 0] = True
    with pytest.raises(ValueError, match="at least one unmasked negative"):
        elva_rewards(q, c, mask=lonely, backend=backend)
    with pytest.raises(ValueError, match="positive_index"):
        elva_rewards(q, c, positive_index=torch.tensor([0, 5]), backend=backend)
    bad = c.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="cand_emb must contain only finite values"):
        elva_rewards(q, bad, backend=backend)


@pytest.mark.parametrize("backend", FAST)
def test_gradients_match_reference(backend):
    need(backend)
    gen = torch.Generator().manual_seed(2)
    for shared in (True, False):
        q, c, positive, real = rewards_tests.random_case(gen, num_queries=3, group=4, num_candidates=9, dim=12,
                                                         shared=shared, mask="3d", dtype=torch.float32)
        grads = []
        for name in (backend, "torch"):
            qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
            out = elva_rewards(qq, cc, positive_index=positive, mask=real, differentiable=True, backend=name)
            grads.append(torch.autograd.grad(out.total.sum() + out.advantages.square().sum(), (qq, cc)))
        for ours, theirs in zip(*grads):
            assert_close_verbose(ours, theirs, atol=1e-5, rtol=1e-4, what="gradient")


@pytest.mark.parametrize("backend", FAST)
def test_opcheck(backend):
    need(backend)
    op = getattr(torch.ops.elva, f"{OP}_{backend}").default
    q, c = torch.randn(2, 3, 8), torch.randn(2, 6, 8)
    positive = torch.tensor([0, 2])
    torch.library.opcheck(op, (q, c, positive, None, 0.05, 0.01, 0.4, 0.6, math.e, "group", 1e-4, True))
    mask = torch.ones(2, 3, 6, dtype=torch.bool)
    mask[:, :, 5] = False
    torch.library.opcheck(op, (q, torch.randn(2, 3, 6, 8), positive, mask, 0.05, 0.01, 0.4, 0.6, 2.0, "batch", 1e-4,
                               False))


@pytest.mark.parametrize("backend", FAST)
def test_the_largest_on_chip_group(backend):
    """C = 512 (the GPU backends' limit) with duplicates; there C = 513 is refused with the reason."""
    need(backend)
    gen = torch.Generator().manual_seed(6)
    q, c, positive, real = rewards_tests.random_case(gen, num_queries=1, group=3, num_candidates=512, dim=16,
                                                     shared=True, mask="3d", dtype=torch.float32)
    c[:, 100:200] = c[:, 300:400]
    out = elva_rewards(q, c, positive_index=positive, mask=real, backend=backend)
    expected = elva_rewards(q, c, positive_index=positive, mask=real, backend="torch")
    assert torch.equal(out.rank, expected.rank)
    assert_close_verbose(out.total, expected.total, atol=2e-5, rtol=1e-5, what="total")
    if backend == "triton":
        with pytest.raises(ValueError, match="C=513"):
            elva_rewards(torch.randn(1, 2, 4), torch.randn(1, 513, 4), backend=backend)


# Interpreter cost (measured): about 0.03 s per rollout at C <= 64 and 0.5 s at C = 512; one program per query.
MORE_TRITON_CASES = 16
# (B, G, C or a range for C): the on-chip limits C = 512 and G = 16, and large ragged groups.
LIMIT_SHAPES = [(1, 2, 512), (2, 1, (257, 511)), (1, 3, (129, 256)), (1, 16, (33, 64))]


@pytest.mark.slow  # about 12 s under the interpreter; still run by default
def test_triton_more_random_cases():
    """Another seed for the interpreter: G up to 16 with C up to 64, then a few groups of up to 512 candidates
    (the on-chip limit), each layout, mask, dtype and advantage mode in turn.

    d >= 2 here: at d = 1 every candidate is parallel to the query, the reference's x / |x| gives exact +-1 cosines
    (exact ties, ranked by index) while Triton's x * (1 / |x|) can land 1 ulp off (0.99999994), so the ranks of
    such mathematically tied, non-identical rows differ (seed 41, case 14). SPEC promises exact ties only for
    identical rows, which the duplicates below check."""
    need("triton")
    gen = torch.Generator().manual_seed(41)
    for case in range(MORE_TRITON_CASES):
        check_random_case("triton", gen, case, num_queries=ragged_size(gen, 1, 3), group=ragged_size(gen, 1, 16),
                          num_candidates=ragged_size(gen, 2, 64), min_dim=2)
    for case, (num_queries, group, num_candidates) in enumerate(LIMIT_SHAPES, start=MORE_TRITON_CASES):
        if isinstance(num_candidates, tuple):
            num_candidates = ragged_size(gen, *num_candidates)
        check_random_case("triton", gen, case, num_queries=num_queries, group=group, num_candidates=num_candidates,
                          min_dim=2)

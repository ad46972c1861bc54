"""elva_rewards, C++/OpenMP CPU backend (torch.ops.elva.elva_rewards_cpu) against the torch reference
(torch.ops.elva.elva_rewards_torch): ragged random cases with exact duplicate candidates (ties), masks, both
candidate layouts, every dtype, advantage mode and log base; hand-computed cases; zero-std groups; strided and
broadcast inputs; bad input (the data-check messages are the reference's, word for word); opcheck.

Scores: both sides normalise rows in fp32 and sum the products in float64, but the fp32 norms may differ by an ulp
(the reference's torch.linalg.vector_norm reduces in a CPU-dependent order), so scores agree within a few ulps, not
always bitwise. The positive's rank can therefore differ only where the reference has a near-tie with it. Every
case is checked twice:

* exactly against the reference's own reward rules applied to the CPU backend's scores (ranks equal, rewards and
  advantages within 1e-5): the rank and reward logic, tie order included;
* against the reference op end to end: scores within 2e-6, and, where the ranks agree (all but near-ties, which
  must then be shown to be near-ties), every output within 1e-5.
"""
import math

import pytest
import torch

from elva_kernels.reference import elva_rewards as reference
from tests.helpers import assert_close_verbose, ragged_size

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MODES = ("group", "batch", "none")
LN = math.log
SCORE_TOLERANCE = 2e-6
TOLERANCE = 1e-5  # rewards and advantages (atol and rtol)
DEFAULTS = dict(delta=0.05, gamma=0.01, alpha=0.4, eps=0.6, log_base=math.e, advantage="group", adv_eps=1e-4)


def cpu_op(q, c, positive, mask=None, *, return_scores=False, **options):
    o = {**DEFAULTS, **options}
    return torch.ops.elva.elva_rewards_cpu(q, c, positive, mask, o["delta"], o["gamma"], o["alpha"], o["eps"],
                                           o["log_base"], o["advantage"], o["adv_eps"], return_scores)


def torch_op(q, c, positive, mask=None, *, return_scores=False, **options):
    o = {**DEFAULTS, **options}
    return torch.ops.elva.elva_rewards_torch(q, c, positive, mask, o["delta"], o["gamma"], o["alpha"], o["eps"],
                                             o["log_base"], o["advantage"], o["adv_eps"], return_scores)


NAMES = ("total", "margin", "rank_reward", "rank", "advantages", "scores")


# ---- random cases ---------------------------------------------------------------------------

def random_case(gen, dtype):
    """Ragged sizes, exact duplicate candidates (some duplicating the positive), zero rows, queries near their
    positive for half the queries, an optional mask keeping the positive and one negative, random options."""
    B = ragged_size(gen, 1, 6)
    G = ragged_size(gen, 1, 16)
    C = ragged_size(gen, 2, 512)
    d = ragged_size(gen, 1, 96)
    shared = bool(torch.randint(0, 2, (1,), generator=gen))
    q = torch.randn(B, G, d, generator=gen)
    c = torch.randn(B, *(() if shared else (G,)), C, d, generator=gen)
    positive = torch.randint(0, C, (B,), generator=gen)
    flat = c.view(B, -1, C, d)
    # Queries near their positive for even b: active margins, positives near the top.
    for b in range(0, B, 2):
        flat[b, :, positive[b]] = q[b, : flat.shape[1]] + 0.5 * torch.randn(flat.shape[1], d, generator=gen)
    if C > 2:  # exact duplicates: of random candidates, and of the positive at another index
        n = max(1, C // 4)
        src = torch.randint(0, C, (n,), generator=gen)
        dst = torch.randint(0, C, (n,), generator=gen)
        flat[:, :, dst] = flat[:, :, src]
        twin = (positive + torch.randint(1, C, (B,), generator=gen)) % C
        flat[torch.arange(B), :, twin] = flat[torch.arange(B), :, positive]
        flat[:, :, int(torch.randint(0, C, (1,), generator=gen))] = 0.0  # a zero row scores 0
    mask_kind = int(torch.randint(0, 3, (1,), generator=gen))
    mask = None
    if mask_kind:
        shape = (B, C) if mask_kind == 1 else (B, G, C)
        mask = torch.rand(shape, generator=gen) > float(torch.rand((), generator=gen)) * 0.9
        one_negative = (positive + torch.randint(1, C, (B,), generator=gen)) % C
        view = mask.view(B, -1, C)
        for index in (positive, one_negative):
            view[torch.arange(B), :, index] = True
    options = {
        "advantage": MODES[int(torch.randint(0, 3, (1,), generator=gen))],
        "log_base": (math.e, 2.0)[int(torch.randint(0, 2, (1,), generator=gen))],
        "delta": float(torch.empty(()).uniform_(-0.1, 0.2, generator=gen)),
        "gamma": float(torch.empty(()).uniform_(0.0, 0.1, generator=gen)),
        "alpha": float(torch.empty(()).uniform_(0.0, 1.0, generator=gen)),
        "eps": float(torch.empty(()).uniform_(0.0, 1.0, generator=gen)),
        "adv_eps": (1e-4, 0.0)[int(torch.randint(0, 2, (1,), generator=gen))],
        "return_scores": bool(torch.randint(0, 2, (1,), generator=gen)),
    }
    return q.to(dtype), c.to(dtype), positive, mask, options


def rules_on(scores, positive, mask, options):
    """The reference's ranks, rewards and advantages computed from given fp32 [B, G, C] scores."""
    o = {**DEFAULTS, **options}
    real = reference.real_candidates(mask, scores.shape, scores.device)
    order = torch.sort(scores.masked_fill(~real, float("-inf")), dim=2, descending=True, stable=True).indices
    positions = torch.arange(1, scores.shape[2] + 1).expand_as(order)
    ranks = torch.empty_like(order).scatter(2, order, positions)
    negatives = real & (torch.arange(scores.shape[2]) != positive.view(-1, 1, 1))
    margin, rank_reward, total = reference.rewards(scores, ranks, negatives, positive, o["delta"], o["gamma"],
                                                   o["alpha"], o["eps"], o["log_base"])
    advantages = reference.group_advantages(total, o["advantage"], o["adv_eps"])
    rank = reference.at_positive(ranks, positive)
    return total.float(), margin.float(), rank_reward.float(), rank, advantages.float()


def compare_outputs(actual, expected, what):
    for name, a, e in zip(NAMES[:5], actual[:5], expected[:5]):
        if name == "rank":
            assert a.dtype == torch.int64 and torch.equal(a, e), f"{what} rank: {a.tolist()} != {e.tolist()}"
        else:
            assert a.dtype == torch.float32, f"{what} {name} dtype {a.dtype}"
            assert_close_verbose(a, e, atol=TOLERANCE, rtol=TOLERANCE, what=f"{what} {name}")
            assert not bool(a.isnan().any()), f"{what} {name} has NaN"


def near_tie_rows(ref_scores, positive, mask, rows):
    """For each (b, g) in rows: does a real negative score within SCORE_TOLERANCE of the positive?"""
    real = reference.real_candidates(mask, ref_scores.shape, ref_scores.device)
    out = []
    for b, g in rows:
        s = ref_scores[b, g]
        close = (s - s[positive[b]]).abs() <= SCORE_TOLERANCE
        close &= real[b, g]
        close[positive[b]] = False
        out.append(bool(close.any()))
    return out


def check_case(q, c, positive, mask, options, what):
    return_scores = options.pop("return_scores")
    out = cpu_op(q, c, positive, mask, return_scores=True, **options)
    ref = torch_op(q, c, positive, mask, return_scores=True, **options)
    B, G, C = q.shape[0], q.shape[1], c.shape[-2]
    for t in out[:5]:
        assert t.shape == (B, G)
    assert out[5].shape == (B, G, C) and out[5].dtype == torch.float32
    # Scores: -inf exactly where masked, within a few ulps elsewhere.
    finite = torch.isfinite(ref[5])
    assert torch.equal(torch.isfinite(out[5]), finite), f"{what}: masked scores"
    assert bool((out[5][~finite] == float("-inf")).all())
    assert_close_verbose(torch.where(finite, out[5], 0), torch.where(finite, ref[5], 0), atol=SCORE_TOLERANCE,
                         rtol=0, what=f"{what} scores")
    # (1) The rules, exactly, on the backend's own scores.
    compare_outputs(out, rules_on(out[5], positive, mask, options), f"{what} [rules on cpu scores]")
    # (2) End to end against the reference op.
    differ = (out[3] != ref[3]).nonzero().tolist()
    if differ:
        assert all(near_tie_rows(ref[5], positive, mask, differ)), f"{what}: ranks differ off near-ties at {differ}"
    else:
        compare_outputs(out, ref, f"{what} [reference]")
    # Without return_scores: the same values and an empty fp32 [0] scores tensor.
    if not return_scores:
        plain = cpu_op(q, c, positive, mask, return_scores=False, **options)
        assert plain[5].shape == (0,) and plain[5].dtype == torch.float32
        for name, a, e in zip(NAMES[:5], plain[:5], out[:5]):
            assert torch.equal(a, e), f"{what} {name}: return_scores changed the values"
    return len(differ)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("seed", range(3))
def test_matches_reference(seed, dtype):
    gen = torch.Generator().manual_seed(1000 * seed + DTYPES.index(dtype))
    near_ties = 0
    for i in range(11):  # 3 seeds x 3 dtypes x 11 = 99 cases
        q, c, positive, mask, options = random_case(gen, dtype)
        what = f"case {i}: q {tuple(q.shape)} c {tuple(c.shape)} mask {None if mask is None else tuple(mask.shape)}" \
               f" {options}"
        near_ties += check_case(q, c, positive, mask, options, what)
    assert near_ties <= 2  # rank differences need a near-tie within a few ulps: rare


def test_large_pool_shared_and_per_rollout():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 8, 64, generator=gen)
    positive = torch.tensor([0, 1000, 2047])
    for c in (torch.randn(3, 2048, 64, generator=gen), torch.randn(3, 8, 300, 64, generator=gen)):
        p = positive.clamp_max(c.shape[-2] - 1)
        check_case(q, c, p, None, {"return_scores": False, "advantage": "batch"}, f"c {tuple(c.shape)}")


# ---- hand-computed cases ----------------------------------------------------------------------
# The query is (1, 0); (4, 3) scores 0.8, (3, 4) 0.6, (0, 1) 0, (-1, 0) -1 and (1, 0) 1.

def unit(*rows):
    return torch.tensor(rows, dtype=torch.float32)


Q = unit([[1.0, 0.0]])


@pytest.mark.parametrize("shared", [True, False])
def test_hand_computed(shared):
    candidates = unit([4, 3], [3, 4], [0, 1], [-1, 0])
    c = candidates.unsqueeze(0) if shared else candidates.view(1, 1, 4, 2)
    out = cpu_op(Q, c, torch.tensor([0]), return_scores=True)
    penalty = 0.6 * (LN(2) - 1) + 0.0 * (LN(3) - 1) + (-1.0) * (LN(4) - 1)
    margin, rank_reward = 0.8 - 0.6 - 0.05, 0.8 - 0.01 * penalty
    assert out[3].tolist() == [[1]]
    torch.testing.assert_close(out[1], torch.tensor([[margin]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[2], torch.tensor([[rank_reward]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[0], torch.tensor([[0.4 * margin + 0.6 * rank_reward]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[5], torch.tensor([[[0.8, 0.6, 0.0, -1.0]]]), atol=1e-7, rtol=0)
    assert out[4].tolist() == [[0.0]]  # one rollout


def test_hand_computed_positive_last_base_two():
    out = cpu_op(Q, unit([1, 0], [4, 3], [3, 4], [0, 1]).unsqueeze(0), torch.tensor([3]), log_base=2.0)
    penalty = 1.0 * (0 - 1) + 0.8 * (1 - 1) + 0.6 * (math.log2(3) - 1)
    assert out[3].tolist() == [[4]]
    assert out[1].item() == 0.0
    assert out[2].item() == pytest.approx(0.0 / (1 + 2) - 0.01 * penalty, abs=1e-7)


@pytest.mark.parametrize("positive", [1, 2])
def test_identical_candidates_rank_by_index(positive):
    # Candidates 1 and 2 are the same vector (0.8), and so are 0 and 3 (0.6): ranks 3, 1, 2, 4.
    candidates = unit([3, 4], [4, 3], [4, 3], [3, 4]).unsqueeze(0)
    out = cpu_op(Q, candidates, torch.tensor([positive]), return_scores=True)
    assert out[5][0, 0, 1] == out[5][0, 0, 2] and out[5][0, 0, 0] == out[5][0, 0, 3]
    ranks = {0: 3, 1: 1, 2: 2, 3: 4}
    penalty = sum(s * (LN(ranks[c]) - 1) for c, s in enumerate([0.6, 0.8, 0.8, 0.6]) if c != positive)
    assert out[3].tolist() == [[ranks[positive]]]
    assert out[1].item() == 0.0  # the top negative is the positive's twin: 0.8 - 0.8 - delta, clamped
    assert out[2].item() == pytest.approx(0.8 / (1 + LN(ranks[positive])) - 0.01 * penalty, abs=1e-6)
    assert cpu_op(Q, candidates, torch.tensor([positive]), delta=-0.1)[1].item() == pytest.approx(0.1, abs=1e-6)


def test_masked_candidates_have_no_rank():
    candidates = unit([1, 0], [4, 3], [3, 4], [0, 1]).unsqueeze(0)
    mask = torch.tensor([[False, True, True, True]])
    out = cpu_op(Q, candidates, torch.tensor([3]), mask, return_scores=True)
    penalty = 0.8 * (LN(1) - 1) + 0.6 * (LN(2) - 1)
    assert out[3].tolist() == [[3]]
    assert out[2].item() == pytest.approx(-0.01 * penalty, abs=1e-7)
    assert out[5][0, 0, 0] == float("-inf")


# ---- advantages -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shared", [True, False])
def test_zero_std_groups_give_zero(mode, shared):
    gen = torch.Generator().manual_seed(3)
    # G = 1: every advantage is 0.
    q1, c = torch.randn(5, 1, 16, generator=gen), torch.randn(5, 9, 16, generator=gen)
    c1 = c if shared else c.unsqueeze(1)
    out = cpu_op(q1, c1, torch.arange(5), advantage=mode)
    assert torch.equal(out[4], torch.zeros(5, 1))
    # Identical rollouts (the same query G times): equal rewards, advantages exactly 0, no NaN, even with adv_eps 0.
    q = torch.randn(5, 1, 16, generator=gen).expand(5, 6, 16).contiguous()
    c6 = c if shared else c.unsqueeze(1).expand(5, 6, 9, 16).contiguous()
    out = cpu_op(q, c6, torch.arange(5), advantage=mode, adv_eps=0.0)
    assert torch.equal(out[4], torch.zeros(5, 6)), out[4]
    ref = torch_op(q, c6, torch.arange(5), advantage=mode, adv_eps=0.0)
    assert torch.equal(ref[4], out[4])


def test_advantages_by_hand():
    # Two queries, two rollouts each, shared candidates: rollout totals from the hand-computed scores.
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    c = unit([[4, 3], [3, 4], [0, 1]], [[4, 3], [3, 4], [0, 1]])
    out = cpu_op(q, c, torch.tensor([0, 0]), advantage="group", adv_eps=0.0)
    totals = out[0].double()
    for b in range(2):
        centered = totals[b] - totals[b].mean()
        std = totals[b].std()
        expected = centered / std if std > 0 else torch.zeros(2, dtype=torch.float64)
        torch.testing.assert_close(out[4][b].double(), expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(out[4][1], torch.zeros(2))  # query 1's rollouts are identical
    batch = cpu_op(q, c, torch.tensor([0, 0]), advantage="batch", adv_eps=0.0)
    centered = totals - totals.mean(1, keepdim=True)
    torch.testing.assert_close(batch[4].double(), centered / totals.std(), atol=1e-6, rtol=1e-6)
    none = cpu_op(q, c, torch.tensor([0, 0]), advantage="none")
    torch.testing.assert_close(none[4].double(), centered, atol=1e-7, rtol=0)


# ---- layouts: strided and broadcast views are read in place ----------------------------------------

def test_strided_and_broadcast_inputs():
    gen = torch.Generator().manual_seed(11)
    B, G, C, d = 3, 4, 20, 12
    q = torch.randn(B, G, 2 * d, generator=gen)[..., ::2]  # non-unit last stride: copied
    base = torch.randn(1, C, d, generator=gen)
    cases = [
        base.expand(B, C, d),  # stride 0 over B
        base.unsqueeze(1).expand(B, G, C, d),  # per-rollout layout, stride 0 over B and G
        torch.randn(B, C, d, G, generator=gen).permute(0, 3, 1, 2),  # [B, G, C, d] with strided rows
        torch.randn(C, B, d, generator=gen).transpose(0, 1),  # [B, C, d] with B inner
    ]
    positive = torch.tensor([0, 5, 19])
    mask = (torch.rand(B, C, G, generator=gen) > 0.3).permute(0, 2, 1)  # strided 3-D mask
    mask[torch.arange(B), :, positive] = True
    mask[torch.arange(B), :, (positive + 1) % C] = True
    for c in cases:
        for m in (None, mask, mask[:, 0]):
            check_case(q, c, positive, m, {"return_scores": True}, f"c strides {c.stride()}")


# ---- bad input ----------------------------------------------------------------------------------

def good_args():
    gen = torch.Generator().manual_seed(2)
    q, c = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 5, 8, generator=gen)
    return [q, c, torch.tensor([0, 4]), None, 0.05, 0.01, 0.4, 0.6, math.e, "group", 1e-4, False]


def with_changes(**changes):
    args = good_args()
    index = {"q": 0, "c": 1, "positive": 2, "mask": 3, "log_base": 8, "advantage": 9}
    for key, fn in changes.items():
        args[index[key]] = fn(args[index[key]])
    return args


def nan_at(t, where):
    t = t.clone()
    t[where] = float("nan")
    return t


def hide(mask_shape, b, g, c):
    m = torch.ones(mask_shape, dtype=torch.bool)
    m[(b, g, c) if len(mask_shape) == 3 else (b, c)] = False
    return m


# Data checks: the message must be the reference's, word for word.
DATA_ERRORS = {
    "nan_query": dict(q=lambda q: nan_at(q, (1, 2, 3))),
    "inf_cand": dict(c=lambda c: nan_at(c, (0, 1, 2)).masked_fill(c > 2, float("inf"))),
    "nan_query_and_bad_positive": dict(q=lambda q: nan_at(q, (0, 0, 0)), positive=lambda p: torch.tensor([0, 5])),
    "positive_too_large": dict(positive=lambda p: torch.tensor([0, 5])),
    "positive_negative": dict(positive=lambda p: torch.tensor([-1, 2])),
    "mask_hides_positive_3d": dict(mask=lambda m: hide((2, 3, 5), 1, 2, 4)),
    "mask_hides_positive_2d": dict(mask=lambda m: hide((2, 5), 1, 0, 4)),
    "mask_leaves_no_negative": dict(mask=lambda m: torch.tensor([[True, True, True, True, True],
                                                                 [False, False, False, False, True]])),
    "one_candidate": dict(c=lambda c: c[:, :, :1], positive=lambda p: torch.tensor([0, 0])),
}


@pytest.mark.parametrize("name", list(DATA_ERRORS))
def test_data_errors_match_reference(name):
    args = with_changes(**DATA_ERRORS[name])
    with pytest.raises(ValueError) as expected:
        torch.ops.elva.elva_rewards_torch(*args)
    with pytest.raises(ValueError) as actual:
        torch.ops.elva.elva_rewards_cpu(*args)
    assert str(expected.value).splitlines()[0] == str(actual.value).splitlines()[0]


METADATA_ERRORS = [
    ("query_2d", dict(q=lambda q: q[:, 0]), ValueError, "query_emb"),
    ("cand_2d", dict(c=lambda c: c[0, 0]), ValueError, "cand_emb"),
    ("cand_wrong_b", dict(c=lambda c: c[:1]), ValueError, "cand_emb"),
    ("cand_wrong_g", dict(c=lambda c: c[:, :2]), ValueError, "cand_emb"),
    ("cand_wrong_d", dict(c=lambda c: c[..., :4]), ValueError, "cand_emb"),
    ("int_query", dict(q=lambda q: q.int()), TypeError, "query_emb"),
    ("double_cand", dict(c=lambda c: c.double()), TypeError, "cand_emb"),
    ("mixed_dtypes", dict(c=lambda c: c.half()), TypeError, "share one dtype"),
    ("positive_int32", dict(positive=lambda p: p.int()), TypeError, "positive_index"),
    ("positive_shape", dict(positive=lambda p: p[:1]), ValueError, "positive_index"),
    ("mask_dtype", dict(mask=lambda m: torch.ones(2, 5)), TypeError, "mask"),
    ("mask_shape", dict(mask=lambda m: torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask"),
    ("mask_g", dict(mask=lambda m: torch.ones(2, 2, 5, dtype=torch.bool)), ValueError, "mask"),
    ("advantage", dict(advantage=lambda a: "median"), ValueError, "advantage"),
    ("log_base_one", dict(log_base=lambda b: 1.0), ValueError, "log_base"),
    ("log_base_negative", dict(log_base=lambda b: -2.0), ValueError, "log_base"),
    ("log_base_nan", dict(log_base=lambda b: float("nan")), ValueError, "log_base"),
]


@pytest.mark.parametrize("changes,error,needle", [m[1:] for m in METADATA_ERRORS], ids=[m[0] for m in METADATA_ERRORS])
def test_metadata_errors_name_the_argument(changes, error, needle):
    with pytest.raises(error, match=needle):
        torch.ops.elva.elva_rewards_cpu(*with_changes(**changes))


def test_good_args_run():
    out = torch.ops.elva.elva_rewards_cpu(*good_args())
    assert out[0].shape == (2, 3)


# ---- opcheck ----------------------------------------------------------------------------------------

def opcheck_cases():
    gen = torch.Generator().manual_seed(9)
    cases = []
    for shared, mask, advantage, log_base, return_scores, dtype in [
        (True, None, "group", math.e, False, torch.float32),
        (False, "3d", "batch", 2.0, True, torch.float32),
        (True, "2d", "none", math.e, True, torch.bfloat16),
    ]:
        q = torch.randn(2, 3, 8, generator=gen)
        c = torch.randn(2, *(() if shared else (3,)), 6, 8, generator=gen)
        positive = torch.tensor([1, 5])
        m = None
        if mask:
            m = torch.rand((2, 6) if mask == "2d" else (2, 3, 6), generator=gen) > 0.3
            view = m.view(2, -1, 6)
            view[torch.arange(2), :, positive] = True
            view[torch.arange(2), :, 0] = True
        grad = dtype == torch.float32
        q, c = q.to(dtype).requires_grad_(grad), c.to(dtype).requires_grad_(grad)
        cases.append((q, c, positive, m, 0.05, 0.01, 0.4, 0.6, log_base, advantage, 1e-4, return_scores))
    return cases


@pytest.mark.parametrize("args", opcheck_cases(), ids=["shared-group", "per_rollout-batch-scores", "bf16-none"])
def test_opcheck(args):
    torch.library.opcheck(torch.ops.elva.elva_rewards_cpu.default, args)

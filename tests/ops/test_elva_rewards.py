"""elva_rewards and group_advantages on every backend the registry lists, on every device it runs on.

The torch reference against a float64 naive implementation (shape classes, both layouts, masks, dtypes, advantage
modes, non-default options) and torch.autograd.gradcheck in float64. Every backend, the reference included where the
property is the reference's own too: hand-computed rewards, identical candidates ranked by index, masked candidates,
the log base, the advantage modes by hand, zero-std groups giving exactly 0 without NaN, gradients against autograd
through the naive implementation and through group_advantages, the shared layout equal to its copy, bitwise
determinism, bad arguments refused by name without writing, opcheck and torch.compile(fullgraph=True). Every
backend against the reference over ragged random cases (exact duplicates, zero rows, masks, both layouts, every
dtype, mode and log base), strided and broadcast views, the largest on-chip group (C = 512) and sizes beyond the
registry's limits (run, or refused with the registry's reasons); data errors with the reference's message.
group_advantages by hand, against TRL's normalisation, at zero std and with bad input; the reference never
materialises the shared layout's [B, G, C, d].

Case sizes follow where a backend runs (``runs_as``): the Triton interpreter, whose cost grows with programs x G x C,
gets small ones; a GPU its fixed large shapes.
"""
import math
from itertools import product

import pytest
import torch
import torch._inductor.config
import torch.nn.functional as F
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from elva_kernels import _dispatch, _library, elva_rewards, group_advantages
from elva_kernels.reference import elva_rewards as reference
from tests.helpers import assert_close_verbose, backend_matrix, dtypes_of, ragged_size, require_backend, runs_as

OP = "elva_rewards"
MODES = ("group", "batch", "none")
LN = math.log
# The op's defaults, in the schema's form (log_base a float).
DEFAULTS = dict(delta=0.05, gamma=0.01, alpha=0.4, eps=0.6, log_base=math.e, advantage="group", adv_eps=1e-4)
OUTPUTS = ("total", "margin", "rank_reward", "rank", "advantages", "scores")
DIFFERENTIABLE = ("total", "margin", "rank_reward", "advantages", "scores")

# Against the float64 naive: both sides see the same upcast inputs, so the only error is the op's fp32 normalisation
# and fp32 score rounding (measured <= 2.1e-7): one row serves every dtype. Advantages divide by a group std of ~0.1
# (measured <= 1e-6).
NAIVE_REWARD_TOLERANCE = (2e-6, 2e-6)
NAIVE_ADVANTAGE_TOLERANCE = (1e-5, 1e-5)
# Backward, relative to the largest gradient entry (fp32 measured <= 1.4e-6). Half-precision gradients are returned
# in the input dtype: twice its unit roundoff (2**-11 fp16, 2**-8 bf16).
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}



def on_device(value, device):
    # Meta tensors stand for a device mismatch in the bad-input rows: they stay where they are.
    return value.to(device) if isinstance(value, torch.Tensor) and value.device.type != "meta" else value


def leaf(t, device):
    """A fresh leaf on ``device`` that requires grad (never the caller's tensor)."""
    return t.detach().to(device).requires_grad_()


def on_cpu(out):
    return type(out)(*(None if t is None else t.cpu() for t in out))


def rewards_on(backend, device, q, c, **options):
    """The public elva_rewards on ``device``; the outputs come back to the CPU."""
    options = {name: on_device(value, device) for name, value in options.items()}
    return on_cpu(elva_rewards(on_device(q, device), on_device(c, device), backend=backend, **options))


def op_on(backend, device, q, c, positive, mask=None, *, return_scores=False, **options):
    """The backend's registered op (what the public function calls), with DEFAULTS for the options not given."""
    o = {**DEFAULTS, **options}
    handle = require_backend(OP, backend, device, q.dtype).handle
    out = handle(*(on_device(t, device) for t in (q, c, positive, mask)), o["delta"], o["gamma"], o["alpha"], o["eps"],
                 o["log_base"], o["advantage"], o["adv_eps"], return_scores)
    return tuple(t.cpu() for t in out)


def unit(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


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


def compare_with_naive(out, expected, what):
    atol, rtol = NAIVE_REWARD_TOLERANCE
    for name in ("total", "margin", "rank_reward"):
        assert_close_verbose(getattr(out, name), expected[name], atol=atol, rtol=rtol, what=f"{what} {name}")
    if out.scores is not None:
        assert_close_verbose(out.scores, expected["scores"], atol=atol, rtol=rtol, what=f"{what} scores")
    atol, rtol = NAIVE_ADVANTAGE_TOLERANCE
    assert_close_verbose(out.advantages, expected["advantages"], atol=atol, rtol=rtol, what=f"{what} advantages")
    assert torch.equal(out.rank, expected["rank"]), f"{what} rank"
    for name in ("total", "margin", "rank_reward", "advantages"):
        assert getattr(out, name).dtype == torch.float32


@pytest.mark.parametrize("dtype", dtypes_of(OP, "torch"), ids=dtype_id)
def test_reference_matches_naive(dtype):
    """Every shape class (C = 2, 7, 101; G = 1, 3, 8), layout and mask, then every option at a non-default value.
    The advantage mode turns with the sum of the other choices' positions, so each mode meets every C, G, layout and
    mask (and G = 1, where every mode gives 0)."""
    choices = ((2, 7, 101), (1, 3, 8), (True, False), (None, "2d", "3d"))
    for position in product(*(range(len(values)) for values in choices)):
        num_candidates, group, shared, mask = (values[i] for values, i in zip(choices, position))
        advantage = MODES[sum(position) % len(MODES)]
        gen = torch.Generator().manual_seed(num_candidates * 100 + group)
        q, c, positive, real = random_case(gen, num_queries=3, group=group, num_candidates=num_candidates, dim=16,
                                           shared=shared, mask=mask, dtype=dtype)
        out = elva_rewards(q, c, positive_index=positive, mask=real, advantage=advantage, return_scores=True,
                           backend="torch")
        what = f"C={num_candidates} G={group} shared={shared} mask={mask} {advantage}"
        compare_with_naive(out, naive(q, c, positive, real, advantage=advantage), what)
    q, c, positive, real = random_case(torch.Generator().manual_seed(4), num_queries=3, group=4, num_candidates=9,
                                       dim=8, shared=False, mask="3d", dtype=dtype)
    options = dict(delta=0.1, gamma=0.05, alpha=0.3, eps=0.7, log_base=2, advantage="batch", adv_eps=1e-3)
    out = elva_rewards(q, c, positive_index=positive, mask=real, return_scores=True, differentiable=True,
                       backend="torch", **options)
    compare_with_naive(out, naive(q, c, positive, real, **options), "every option non-default")


# ---- every backend against the reference: ragged random cases -----------------------------------

def ragged_case(gen, dtype, *, limits=None, shape=None):
    """Ragged sizes up to ``limits`` (B, G, C, d), or the fixed ``shape``; exact duplicate candidates (some of the
    positive at another index), a zero row, queries near their positive for even queries, an optional mask keeping
    the positive and one negative, and random options."""
    if shape is None:
        shape = tuple(ragged_size(gen, low, high) for low, high in zip((1, 1, 2, 1), limits))
    num_queries, group, num_candidates, dim = shape
    shared = bool(torch.randint(0, 2, (1,), generator=gen))
    q = torch.randn(num_queries, group, dim, generator=gen)
    c = torch.randn(num_queries, *(() if shared else (group,)), num_candidates, dim, generator=gen)
    positive = torch.randint(0, num_candidates, (num_queries,), generator=gen)
    flat = c.view(num_queries, -1, num_candidates, dim)
    for b in range(0, num_queries, 2):  # active margins, positives near the top
        flat[b, :, positive[b]] = q[b, : flat.shape[1]] + 0.5 * torch.randn(flat.shape[1], dim, generator=gen)
    if num_candidates > 2:
        copies = max(1, num_candidates // 4)
        source = torch.randint(0, num_candidates, (copies,), generator=gen)
        flat[:, :, torch.randint(0, num_candidates, (copies,), generator=gen)] = flat[:, :, source]
        twin = (positive + torch.randint(1, num_candidates, (num_queries,), generator=gen)) % num_candidates
        flat[torch.arange(num_queries), :, twin] = flat[torch.arange(num_queries), :, positive]
        flat[:, :, int(torch.randint(0, num_candidates, (1,), generator=gen))] = 0.0  # a zero row scores 0
    mask_kind = int(torch.randint(0, 3, (1,), generator=gen))
    mask = None
    if mask_kind:
        mask_shape = (num_queries, num_candidates) if mask_kind == 1 else (num_queries, group, num_candidates)
        mask = torch.rand(mask_shape, generator=gen) > float(torch.rand((), generator=gen)) * 0.9
        one_negative = (positive + torch.randint(1, num_candidates, (num_queries,), generator=gen)) % num_candidates
        for index in (positive, one_negative):
            mask.view(num_queries, -1, num_candidates)[torch.arange(num_queries), :, index] = True
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


def score_tolerance(backend, device, dim):
    """Scores agree within a few ulps where both sides sum the products in float64 (the C++ backend; its fp32 norms
    may differ by an ulp); Triton and the GPU sum in fp32: d * 2**-24 for unit rows."""
    return 2e-6 if runs_as(backend, device) == "cpu" else max(2e-6, dim * 2.0**-24)


# Rewards and advantages (atol, rtol): the C++ backend reduces like the reference; the others reduce in fp32.
REWARD_TOLERANCE = {"cpu": (1e-5, 1e-5), "interpreter": (2e-5, 1e-5), "gpu": (2e-5, 1e-5)}


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


def compare_outputs(actual, expected, tolerance, what):
    atol, rtol = tolerance
    for name, a, e in zip(OUTPUTS[:5], actual[:5], expected[:5]):
        if name == "rank":
            assert a.dtype == torch.int64 and torch.equal(a, e), f"{what} rank: {a.tolist()} != {e.tolist()}"
        else:
            assert a.dtype == torch.float32, f"{what} {name} dtype {a.dtype}"
            assert_close_verbose(a, e, atol=atol, rtol=rtol, what=f"{what} {name}")
            assert not bool(a.isnan().any()), f"{what} {name} has NaN"


def near_tie_rows(ref_scores, positive, mask, rows, tolerance):
    """For each (b, g) in rows: does a real negative score within ``tolerance`` of the positive?"""
    real = reference.real_candidates(mask, ref_scores.shape, ref_scores.device)
    out = []
    for b, g in rows:
        s = ref_scores[b, g]
        close = ((s - s[positive[b]]).abs() <= tolerance) & real[b, g]
        close[positive[b]] = False
        out.append(bool(close.any()))
    return out


def check_case(backend, device, q, c, positive, mask, options, what):
    """One case on ``backend`` against the reference on CPU tensors, twice: exactly against the reference's rules
    applied to the backend's own scores (ranks equal, tie order included; rewards within 1e-5), and end to end
    (scores within the score tolerance; where the ranks agree every output within the reward tolerance, and where
    they differ the reference must have a near-tie with the positive). Returns how many ranks differ."""
    options = dict(options)
    return_scores = options.pop("return_scores")
    out = op_on(backend, device, q, c, positive, mask, return_scores=True, **options)
    ref = op_on("torch", "cpu", q, c, positive, mask, return_scores=True, **options)
    num_queries, group, num_candidates = q.shape[0], q.shape[1], c.shape[-2]
    for t in out[:5]:
        assert t.shape == (num_queries, group)
    assert out[5].shape == (num_queries, group, num_candidates) and out[5].dtype == torch.float32
    tolerance = score_tolerance(backend, device, q.shape[-1])
    finite = torch.isfinite(ref[5])
    assert torch.equal(torch.isfinite(out[5]), finite), f"{what}: masked scores"
    assert bool((out[5][~finite] == float("-inf")).all())
    assert_close_verbose(torch.where(finite, out[5], 0), torch.where(finite, ref[5], 0), atol=tolerance, rtol=0,
                         what=f"{what} scores")
    compare_outputs(out, rules_on(out[5], positive, mask, options), (1e-5, 1e-5), f"{what} [rules on its scores]")
    differ = (out[3] != ref[3]).nonzero().tolist()
    if differ:
        assert all(near_tie_rows(ref[5], positive, mask, differ, tolerance)), f"{what}: ranks differ at {differ}"
    else:
        compare_outputs(out, ref, REWARD_TOLERANCE[runs_as(backend, device)], f"{what} [reference]")
    if not return_scores:  # the same values, and an empty fp32 [0] scores tensor
        plain = op_on(backend, device, q, c, positive, mask, return_scores=False, **options)
        assert plain[5].shape == (0,) and plain[5].dtype == torch.float32
        for name, a, e in zip(OUTPUTS[:5], plain[:5], out[:5]):
            assert torch.equal(a, e), f"{what} {name}: return_scores changed the values"
    return len(differ)


def describe(q, c, mask, options):
    return f"q {tuple(q.shape)} c {tuple(c.shape)} mask {None if mask is None else tuple(mask.shape)} {options}"


# (ragged cases per dtype, their limits (B, G, C, d)), then fixed shapes (B, G, C or a range of C, d), which take
# the dtypes in turn. The interpreter's reach the program's G = 16 and a C that pads to 512; a GPU's are its kernels'
# tile classes, 36 cases per dtype in all.
REFERENCE_CASES = {
    "cpu": ((12, (6, 16, 512, 96)), []),
    "interpreter": ((3, (2, 6, 40, 48)), [(1, 16, (33, 64), 8), (1, 1, (257, 511), 16)]),
    "gpu": ((4, (6, 16, 512, 96)), [(3, 8, 101, 96), (2, 16, 512, 40), (4, 1, 2, 8), (5, 5, 33, 1536)] * 24),
}


# The torch reference on CPU is what the others are compared with; on CUDA it must give the CPU's result too.
@pytest.mark.parametrize(
    "backend,device", [p for p in backend_matrix(OP, reference=True) if p.values != ("torch", "cpu")]
)
def test_matches_reference(backend, device):
    (ragged, limits), fixed = REFERENCE_CASES[runs_as(backend, device)]
    dtypes = dtypes_of(OP, backend)
    for dtype in dtypes:
        require_backend(OP, backend, device, dtype)
    gen = torch.Generator().manual_seed(1000)
    cases = [(dtype, None) for dtype in dtypes for _ in range(ragged)] + [
        (dtypes[i % len(dtypes)], (b, g, ragged_size(gen, *size) if isinstance(size, tuple) else size, d))
        for i, (b, g, size, d) in enumerate(fixed)
    ]
    near_ties = 0
    for i, (dtype, shape) in enumerate(cases):
        q, c, positive, mask, options = ragged_case(gen, dtype, limits=limits, shape=shape)
        what = f"{dtype} case {i}: {describe(q, c, mask, options)}"
        near_ties += check_case(backend, device, q, c, positive, mask, options, what)
    assert near_ties <= max(2, len(cases) // 30), f"{near_ties} rank differences in {len(cases)} cases: rare near-ties"


@pytest.mark.parametrize("backend,device", backend_matrix(OP))
def test_strided_and_broadcast_inputs(backend, device):
    """Views are read in place: a non-unit last stride, zero strides over B (and G), strided rows, B innermost, and
    a strided 3-D mask and its 2-D slice."""
    require_backend(OP, backend, device)
    gen = torch.Generator().manual_seed(11)
    num_queries, group, num_candidates, dim = 3, 4, 20, 12
    q = torch.randn(num_queries, group, 2 * dim, generator=gen)[..., ::2]
    base = torch.randn(1, num_candidates, dim, generator=gen)
    layouts = [
        base.expand(num_queries, num_candidates, dim),
        base.unsqueeze(1).expand(num_queries, group, num_candidates, dim),
        torch.randn(num_queries, num_candidates, dim, group, generator=gen).permute(0, 3, 1, 2),
        torch.randn(num_candidates, num_queries, dim, generator=gen).transpose(0, 1),
    ]
    positive = torch.tensor([0, 5, 19])
    mask = (torch.rand(num_queries, num_candidates, group, generator=gen) > 0.3).permute(0, 2, 1)
    mask[torch.arange(num_queries), :, positive] = True
    mask[torch.arange(num_queries), :, (positive + 1) % num_candidates] = True
    masks = [None, mask, mask[:, 0]]
    # The interpreter pairs each layout with one mask instead of all three.
    if runs_as(backend, device) == "interpreter":
        pairs = [(c, masks[i % len(masks)]) for i, c in enumerate(layouts)]
    else:
        pairs = list(product(layouts, masks))
    for c, m in pairs:
        check_case(backend, device, q, c, positive, m, {"return_scores": True}, f"c strides {c.stride()}")


@pytest.mark.parametrize("backend,device", backend_matrix(OP))
def test_the_largest_on_chip_group_and_beyond(backend, device):
    """C = 512 (the GPU backends' limit) with duplicates against the reference; then sizes past the registry's
    limits (2048 shared candidates, 513 per rollout, G = 17): a backend the registry limits refuses them with its
    reasons, the others must match the reference."""
    registered = require_backend(OP, backend, device)
    gen = torch.Generator().manual_seed(6)
    q, c, positive, real = random_case(gen, num_queries=1, group=2, num_candidates=512, dim=16, shared=True,
                                       mask="3d", dtype=torch.float32)
    c[:, 100:200] = c[:, 300:400]
    check_case(backend, device, q, c, positive, real, {"return_scores": True}, "C = 512")
    beyond = [
        (torch.randn(3, 8, 64, generator=gen), torch.randn(3, 2048, 64, generator=gen), torch.tensor([0, 1000, 2047])),
        (torch.randn(3, 8, 64, generator=gen), torch.randn(3, 8, 513, 64, generator=gen), torch.tensor([0, 300, 512])),
        (torch.randn(2, 17, 16, generator=gen), torch.randn(2, 20, 16, generator=gen), torch.tensor([0, 19])),
    ]
    for q, c, positive in beyond:
        what = f"q {tuple(q.shape)} c {tuple(c.shape)}"
        call = _dispatch.Call(torch.device(device), q.dtype, {}, sizes={"G": q.shape[1], "C": c.shape[-2]})
        reasons = registered.refusal_reasons(call)
        if reasons:
            with pytest.raises(ValueError) as refused:
                elva_rewards(q.to(device), c.to(device), positive_index=positive.to(device), backend=backend)
            assert all(reason in str(refused.value) for reason in reasons), f"{what}: {refused.value}"
        else:
            check_case(backend, device, q, c, positive, None, {"return_scores": False, "advantage": "batch"}, what)


# ---- hand-computed cases ---------------------------------------------------------------------
# The query is (1, 0); (4, 3) scores 0.8, (3, 4) 0.6, (0, 1) 0, (-1, 0) -1 and (1, 0) 1.

Q = unit([[1.0, 0.0]])


def run_one(backend, device, candidates, positive, *, shared=True, **options):
    c = candidates.unsqueeze(0) if shared else candidates.view(1, 1, *candidates.shape)
    return rewards_on(backend, device, Q, c, positive_index=positive, **options)


def check(out, *, rank, margin, rank_reward, alpha=0.4, eps=0.6):
    assert out.rank.tolist() == [[rank]]
    if margin == 0.0:  # clamped: exactly 0
        assert out.margin.item() == 0.0
    torch.testing.assert_close(out.margin, torch.tensor([[margin]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.rank_reward, torch.tensor([[rank_reward]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.total, torch.tensor([[alpha * margin + eps * rank_reward]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_hand_computed(backend, device):
    """The positive first (both layouts: the scores too, and one rollout's advantage 0), last, and every weight
    changed."""
    require_backend(OP, backend, device)
    penalty = 0.6 * (LN(2) - 1) + 0.0 * (LN(3) - 1) + (-1.0) * (LN(4) - 1)
    for shared in (True, False):
        out = run_one(backend, device, unit([4, 3], [3, 4], [0, 1], [-1, 0]), 0, shared=shared, return_scores=True)
        check(out, rank=1, margin=0.8 - 0.6 - 0.05, rank_reward=0.8 / (1 + LN(1)) - 0.01 * penalty)
        torch.testing.assert_close(out.scores, torch.tensor([[[0.8, 0.6, 0.0, -1.0]]]), atol=1e-7, rtol=0)
        assert out.advantages.tolist() == [[0.0]]
    out = run_one(backend, device, unit([1, 0], [4, 3], [3, 4], [0, 1]), 3)
    penalty = 1.0 * (LN(1) - 1) + 0.8 * (LN(2) - 1) + 0.6 * (LN(3) - 1)
    check(out, rank=4, margin=0.0, rank_reward=0.0 / (1 + LN(4)) - 0.01 * penalty)
    out = run_one(backend, device, unit([4, 3], [3, 4]), 0, delta=0.1, gamma=0.5, alpha=2.0, eps=-1.0)
    check(out, rank=1, margin=0.1, rank_reward=0.8 - 0.5 * 0.6 * (LN(2) - 1), alpha=2.0, eps=-1.0)


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_log_base_two(backend, device):
    require_backend(OP, backend, device)
    out = run_one(backend, device, unit([4, 3], [3, 4], [0, 1], [-1, 0]), 0, log_base=2)
    penalty = 0.6 * (math.log2(2) - 1) + 0.0 * (math.log2(3) - 1) + (-1.0) * (math.log2(4) - 1)
    check(out, rank=1, margin=0.15, rank_reward=0.8 - 0.01 * penalty)
    # With base 2 only rank 1 has a negative weight: the rank-2 negative costs nothing here.
    assert run_one(backend, device, unit([4, 3], [3, 4]), 0, log_base="2").rank_reward.item() == pytest.approx(
        0.8, abs=1e-6)
    out = run_one(backend, device, unit([1, 0], [4, 3], [3, 4], [0, 1]), 3, log_base=2)
    penalty = 1.0 * (0 - 1) + 0.8 * (1 - 1) + 0.6 * (math.log2(3) - 1)
    check(out, rank=4, margin=0.0, rank_reward=0.0 / (1 + 2) - 0.01 * penalty)


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_identical_candidates_rank_by_index(backend, device):
    require_backend(OP, backend, device)
    # Candidates 1 and 2 are the same vector (0.8), and so are 0 and 3 (0.6): ranks 3, 1, 2, 4.
    candidates = unit([3, 4], [4, 3], [4, 3], [3, 4])
    ranks = {0: 3, 1: 1, 2: 2, 3: 4}
    for positive in (1, 2):
        out = run_one(backend, device, candidates, positive, return_scores=True)
        assert out.scores[0, 0, 1] == out.scores[0, 0, 2] and out.scores[0, 0, 0] == out.scores[0, 0, 3]
        penalty = sum(s * (LN(ranks[c]) - 1) for c, s in enumerate([0.6, 0.8, 0.8, 0.6]) if c != positive)
        # The top negative is the positive's twin, so the margin is clamped 0.8 - 0.8 - delta.
        check(out, rank=ranks[positive], margin=0.0, rank_reward=0.8 / (1 + LN(ranks[positive])) - 0.01 * penalty)
        tied = run_one(backend, device, candidates, positive, delta=-0.1)
        assert tied.margin.item() == pytest.approx(0.1, abs=1e-6)


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_masked_candidates_have_no_rank(backend, device):
    require_backend(OP, backend, device)
    candidates = unit([1, 0], [4, 3], [3, 4], [0, 1])
    out = run_one(backend, device, candidates, 3, mask=torch.tensor([[False, True, True, True]]), return_scores=True)
    # Without candidate 0: 0.8 ranks 1, 0.6 ranks 2 and the positive (0) ranks 3.
    penalty = 0.8 * (LN(1) - 1) + 0.6 * (LN(2) - 1)
    check(out, rank=3, margin=0.0, rank_reward=0.0 / (1 + LN(3)) - 0.01 * penalty)
    assert out.scores[0, 0, 0] == float("-inf")


# ---- advantages --------------------------------------------------------------------------------

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


@pytest.mark.parametrize("mode", MODES)
def test_group_advantages_zero_std_no_nan(mode):
    rewards = torch.tensor([[0.1, 0.1, 0.1], [0.3, 0.3, 0.3], [1.0, 2.0, 4.0]], requires_grad=True)
    out = group_advantages(rewards, mode, eps=0.0)
    assert torch.equal(out[:2], torch.zeros(2, 3))
    assert torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out, rewards, torch.randn(3, 3))
    assert torch.isfinite(grad).all()
    assert torch.equal(group_advantages(torch.randn(4, 1), mode), torch.zeros(4, 1))


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


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_advantages_by_hand(backend, device):
    """Two queries, two rollouts each, shared candidates: every mode from the op's own totals; query 1's rollouts
    are identical, so its group advantages are exactly 0."""
    require_backend(OP, backend, device)
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    c = unit([[4, 3], [3, 4], [0, 1]], [[4, 3], [3, 4], [0, 1]])
    positive = torch.tensor([0, 0])
    out = rewards_on(backend, device, q, c, positive_index=positive, advantage="group", adv_eps=0.0)
    totals = out.total.double()
    for b in range(2):
        std = totals[b].std()
        expected = (totals[b] - totals[b].mean()) / std if std > 0 else torch.zeros(2, dtype=torch.float64)
        torch.testing.assert_close(out.advantages[b].double(), expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(out.advantages[1], torch.zeros(2))
    centered = totals - totals.mean(1, keepdim=True)
    batch = rewards_on(backend, device, q, c, positive_index=positive, advantage="batch", adv_eps=0.0)
    torch.testing.assert_close(batch.advantages.double(), centered / totals.std(), atol=1e-6, rtol=1e-6)
    none = rewards_on(backend, device, q, c, positive_index=positive, advantage="none")
    torch.testing.assert_close(none.advantages.double(), centered, atol=1e-7, rtol=0)


# (B, G, C, d) of the equal-rollout case.
ZERO_STD_SIZES = {"cpu": (4, 7, 40, 16), "interpreter": (2, 3, 9, 16), "gpu": (4, 7, 40, 16)}


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_zero_std_gives_zero_advantages(backend, device):
    """One rollout, or G equal rollouts of equal queries (so the batch std is 0 too): exactly 0 in every mode, also
    with adv_eps 0 and in both layouts; the gradient has no NaN, and a zero std passes none."""
    require_backend(OP, backend, device)
    num_queries, group, num_candidates, dim = ZERO_STD_SIZES[runs_as(backend, device)]
    gen = torch.Generator().manual_seed(3)
    single_q, single_c = torch.randn(3, 1, 8, generator=gen), torch.randn(3, 6, 8, generator=gen)
    query = torch.randn(1, 1, dim, generator=gen).expand(num_queries, group, dim)
    shared = torch.randn(1, num_candidates, dim, generator=gen).expand(num_queries, num_candidates, dim)
    per_rollout = shared.unsqueeze(1).expand(num_queries, group, num_candidates, dim)
    for advantage in MODES:
        out = rewards_on(backend, device, single_q, single_c, advantage=advantage, adv_eps=0.0)
        assert torch.equal(out.advantages, torch.zeros(3, 1)), advantage
        for candidates, adv_eps in ((shared, 1e-4), (shared, 0.0), (per_rollout, 0.0)):
            q = leaf(query, device)
            out = elva_rewards(q, candidates.to(device), advantage=advantage, adv_eps=adv_eps, differentiable=True,
                               backend=backend)
            what = f"{advantage}, adv_eps {adv_eps}, c {tuple(candidates.shape)}"
            assert torch.equal(out.advantages.cpu(), torch.zeros(num_queries, group)), what
            (grad,) = torch.autograd.grad(out.advantages, q, torch.randn(num_queries, group, device=device))
            assert torch.isfinite(grad).all(), what
            if advantage != "none":  # A is held at 0 where the std is 0: no gradient through it
                assert torch.equal(grad, torch.zeros_like(grad)), what


# ---- gradients with the ranks held fixed -----------------------------------------------------

def check_gradients(backend, device, gen, q, c, positive, real, advantage, what):
    """The op's gradients of every differentiable output, under random upstream gradients, against autograd through
    the float64 naive implementation; they come back in the input dtype."""
    dtype = q.dtype
    require_backend(OP, backend, device, dtype)
    q_leaf, c_leaf = leaf(q, device), leaf(c, device)
    out = elva_rewards(q_leaf, c_leaf, positive_index=positive.to(device), mask=on_device(real, device),
                       advantage=advantage, return_scores=True, differentiable=True, backend=backend)
    grad_out = {name: torch.randn(getattr(out, name).shape, generator=gen) for name in DIFFERENTIABLE}
    actual = torch.autograd.grad([getattr(out, name) for name in DIFFERENTIABLE], (q_leaf, c_leaf),
                                 [grad_out[name].to(device) for name in DIFFERENTIABLE])
    q64, c64 = q.detach().double().requires_grad_(), c.detach().double().requires_grad_()
    expected_out = naive(q64, c64, positive, real, advantage=advantage)
    expected = torch.autograd.grad([expected_out[name] for name in DIFFERENTIABLE], (q64, c64),
                                   [grad_out[name].double() for name in DIFFERENTIABLE])
    for name, got, want in zip(("query_emb", "cand_emb"), actual, expected):
        assert got.dtype == dtype, f"{what} grad {name} dtype"
        scale = GRAD_TOLERANCE[dtype] * want.abs().max().item()
        assert_close_verbose(got.cpu(), want, atol=scale, rtol=GRAD_TOLERANCE[dtype], what=f"{what} grad {name}")
    return out


# (G, shared, mask, advantage). The interpreter takes every 7th: each G, layout, mask and mode still occurs.
GRADIENT_CASES = list(product((1, 3, 8), (True, False), (None, "3d"), MODES))
GRADIENT_CASE_STEP = {"cpu": 1, "interpreter": 7, "gpu": 1}


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_gradients_match_naive_autograd(backend, device):
    """fp32 over group sizes, layouts, masks and modes, both margin branches in every case; then fp16 and bf16."""
    for group, shared, mask, advantage in GRADIENT_CASES[:: GRADIENT_CASE_STEP[runs_as(backend, device)]]:
        gen = torch.Generator().manual_seed(7 * group + 11)
        q, c, positive, real = random_case(gen, num_queries=4, group=group, num_candidates=11, dim=12, shared=shared,
                                           mask=mask, dtype=torch.float32)
        what = f"G={group} shared={shared} mask={mask} {advantage}"
        out = check_gradients(backend, device, gen, q, c, positive, real, advantage, what)
        assert (out.margin > 0).any() and (out.margin == 0).any(), f"{what} should exercise both margin branches"
    for dtype in dtypes_of(OP, backend):
        if dtype != torch.float32:
            gen = torch.Generator().manual_seed(8)
            q, c, positive, real = random_case(gen, num_queries=3, group=4, num_candidates=9, dim=16, shared=True,
                                               mask="2d", dtype=dtype)
            check_gradients(backend, device, gen, q, c, positive, real, "group", dtype_id(dtype))


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_advantage_gradients_match_autograd_of_the_rule(backend, device):
    """Ties within groups and across the batch, where torch.std has no gradient: the op's explicit backward against
    autograd through group_advantages, the rule the forward applies."""
    require_backend(OP, backend, device)
    q = torch.randn(3, 1, 8).repeat(1, 4, 1)
    q[2, 1:] += 0.3 * torch.randn(3, 8)
    q, c = q.to(device), torch.randn(3, 10, 8, device=device)
    q_rule, c_rule = leaf(q, device), leaf(c, device)
    total = elva_rewards(q_rule, c_rule, differentiable=True, backend=backend).total.double()
    for advantage in MODES:
        q_op, c_op = leaf(q, device), leaf(c, device)
        out = elva_rewards(q_op, c_op, advantage=advantage, differentiable=True, backend=backend)
        weights = torch.randn(3, 4, device=device)
        actual = torch.autograd.grad(out.advantages, (q_op, c_op), weights)
        expected = torch.autograd.grad(group_advantages(total, advantage), (q_rule, c_rule), weights.double(),
                                       retain_graph=True)
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


@pytest.mark.parametrize("advantage", MODES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_rollout"])
def test_gradcheck_float64(shared, advantage):
    """torch.autograd.gradcheck of the reference's backward on float64 inputs (the torch op itself; the public
    function and the other backends take fp32/fp16/bf16 only). Ranks are held constant by the op; the case is drawn
    until no finite difference can change them, the top negative or the margin's branch. The forward rounds scores
    and outputs to fp32, hence eps 1e-3 and atol 1e-3 (measured worst error 3e-4; the Jacobian's entries are 1e-2
    to 1)."""
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


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_not_differentiable_by_default(backend, device):
    require_backend(OP, backend, device)
    q = torch.randn(2, 3, 8, device=device, requires_grad=True)
    c = torch.randn(2, 5, 8, device=device, requires_grad=True)
    out = elva_rewards(q, c, return_scores=True, backend=backend)
    assert all(not t.requires_grad for t in out)


# ---- layouts, determinism ---------------------------------------------------------------------

# (B, G, C, d): the interpreter's program holds G x C, so its case is smaller.
LAYOUT_SIZES = {"cpu": (4, 5, 33, 24), "interpreter": (2, 3, 9, 24), "gpu": (4, 5, 33, 24)}


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_layouts_agree(backend, device):
    """Shared candidates give what their per-rollout copy gives; an int positive_index what its tensor gives; and
    non-contiguous inputs bitwise what their contiguous copies give."""
    require_backend(OP, backend, device)
    num_queries, group, num_candidates, dim = LAYOUT_SIZES[runs_as(backend, device)]
    q, c, positive, real = random_case(torch.Generator().manual_seed(3), num_queries=num_queries, group=group,
                                       num_candidates=num_candidates, dim=dim, shared=True, mask="2d",
                                       dtype=torch.float32)
    copied = c.unsqueeze(1).expand(-1, group, -1, -1).contiguous()
    shared = rewards_on(backend, device, q, c, positive_index=positive, mask=real, return_scores=True)
    per_rollout = rewards_on(backend, device, q, copied, positive_index=positive, mask=real, return_scores=True)
    assert torch.equal(shared.rank, per_rollout.rank)
    for name in ("total", "margin", "rank_reward", "advantages", "scores"):
        torch.testing.assert_close(getattr(shared, name), getattr(per_rollout, name), atol=1e-6, rtol=1e-6)
    q = torch.randn(group, num_queries, dim, device=device).transpose(0, 1)  # [B, G, d]
    c = torch.randn(2 * num_candidates, num_queries, dim, device=device)[::2].transpose(0, 1)  # [B, C, d], strided
    assert not q.is_contiguous() and not c.is_contiguous()
    out = elva_rewards(q, c, positive_index=2, return_scores=True, backend=backend)
    expected = elva_rewards(q.contiguous(), c.contiguous(), positive_index=torch.full((num_queries,), 2, device=device),
                            return_scores=True, backend=backend)
    for name, got, want in zip(OUTPUTS, out, expected):
        assert torch.equal(got, want), name


# (B, G, C, d)
DETERMINISM_SIZES = {"cpu": (4, 8, 101, 32), "interpreter": (2, 4, 33, 32), "gpu": (2, 16, 512, 40)}


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_bitwise_deterministic(backend, device):
    require_backend(OP, backend, device)
    num_queries, group, num_candidates, dim = DETERMINISM_SIZES[runs_as(backend, device)]
    q, c, positive, real = random_case(torch.Generator().manual_seed(5), num_queries=num_queries, group=group,
                                       num_candidates=num_candidates, dim=dim, shared=True, mask="3d",
                                       dtype=torch.float32)
    runs = []
    for _ in range(2):
        q_leaf, c_leaf = leaf(q, device), leaf(c, device)
        out = elva_rewards(q_leaf, c_leaf, positive_index=positive.to(device), mask=real.to(device),
                           return_scores=True, differentiable=True, backend=backend)
        grads = torch.autograd.grad(out.advantages.sum() + out.margin.sum(), (q_leaf, c_leaf))
        runs.append([t.detach() for t in out] + list(grads))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


# ---- bad input -------------------------------------------------------------------------------

B, G, C, D = 2, 3, 5, 4
QUERIES, CANDIDATES = torch.randn(B, G, D), torch.randn(B, C, D)


def hide_positive():
    mask = torch.ones(B, G, C, dtype=torch.bool)
    mask[1, 2, 0] = False
    return mask


def no_negative():
    mask = torch.ones(B, G, C, dtype=torch.bool)
    mask[0, 1, 1:] = False
    return mask


BAD_ARGUMENTS = [
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
]


def good_args():
    """The registered op's arguments (schema order) of a valid per-rollout call."""
    gen = torch.Generator().manual_seed(2)
    q, c = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 5, 8, generator=gen)
    return [q, c, torch.tensor([0, 4]), None, 0.05, 0.01, 0.4, 0.6, math.e, "group", 1e-4, False]


def with_changes(**changes):
    args = good_args()
    index = {"q": 0, "c": 1, "positive": 2, "mask": 3, "log_base": 8, "advantage": 9}
    for key, change in changes.items():
        args[index[key]] = change(args[index[key]])
    return args


def nan_at(t, where):
    t = t.clone()
    t[where] = float("nan")
    return t


def hide(mask_shape, b, g, c):
    m = torch.ones(mask_shape, dtype=torch.bool)
    m[(b, g, c) if len(mask_shape) == 3 else (b, c)] = False
    return m


# The op's own metadata checks (the C++ bindings read raw pointers after them): the message names the argument.
# One candidate is here too: a binding may refuse it with the shape, the reference as a query with no negative.
METADATA_ERRORS = [
    ("query_2d", dict(q=lambda q: q[:, 0]), ValueError, "query_emb"),
    ("cand_2d", dict(c=lambda c: c[0, 0]), ValueError, "cand_emb"),
    ("cand_wrong_b", dict(c=lambda c: c[:1]), ValueError, "cand_emb"),
    ("cand_wrong_g", dict(c=lambda c: c[:, :2]), ValueError, "cand_emb"),
    ("cand_wrong_d", dict(c=lambda c: c[..., :4]), ValueError, "cand_emb"),
    ("one_candidate", dict(c=lambda c: c[:, :, :1], positive=lambda p: torch.tensor([0, 0])), ValueError, "cand_emb"),
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
}


def snapshot(tensors):
    return [t.clone() for t in tensors if isinstance(t, torch.Tensor) and t.device.type != "meta"]


def assert_unchanged(tensors, before, what):
    after = snapshot(tensors)
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(after, before)), f"{what}: input modified"


def checks_its_own_metadata(backend, device):
    """Whether the op's kernel on ``device`` is one of the C++ extension's bindings (csrc/bindings), which check the
    metadata before reading raw pointers. The Python kernels (the reference, the Triton launcher) rely on
    elva_rewards' checks."""
    return "csrc/bindings/" in str(torch.library.get_kernel(_library.qualname(OP, backend), device.upper()))


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_bad_arguments_name_the_argument(backend, device):
    """Through elva_rewards, every bad argument (the data errors included) raises naming it; through an op that
    checks its own metadata, every bad metadata too. Nothing is written into the inputs."""
    require_backend(OP, backend, device)
    for i, (changes, error, words) in enumerate(BAD_ARGUMENTS):
        args = {name: on_device(value, device) for name, value in ({"query_emb": QUERIES, "cand_emb": CANDIDATES}
                                                                   | changes).items()}
        before = snapshot(args.values())
        with pytest.raises(error) as info:
            elva_rewards(**args, backend=backend)
        assert words in str(info.value), f"row {i}: {info.value}"
        assert_unchanged(args.values(), before, f"row {i}")
    if checks_its_own_metadata(backend, device):
        handle = require_backend(OP, backend, device).handle
        for name, changes, error, needle in METADATA_ERRORS:
            with pytest.raises(error, match=needle):
                handle(*(on_device(a, device) for a in with_changes(**changes)))
        assert handle(*(on_device(a, device) for a in good_args()))[0].shape == (2, 3)


def test_unknown_and_unavailable_backends_are_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        elva_rewards(QUERIES, CANDIDATES, backend="fast")
    for registered in _dispatch.backends(OP):
        reasons = registered.availability_reasons("cpu")
        if reasons:
            with pytest.raises(ValueError) as refused:
                elva_rewards(QUERIES, CANDIDATES, backend=registered.name)
            assert registered.name in str(refused.value) and all(r in str(refused.value) for r in reasons)


@pytest.mark.parametrize("backend,device", backend_matrix(OP))
def test_data_errors_match_reference(backend, device):
    """The op's data checks (finite embeddings, positives in range and unmasked, a negative left) raise the
    reference's message, checked in the reference's order, and write nothing into the inputs."""
    handle = require_backend(OP, backend, device).handle
    for name, changes in DATA_ERRORS.items():
        args = with_changes(**changes)
        with pytest.raises(ValueError) as expected:
            torch.ops.elva.elva_rewards_torch(*args)
        args = [on_device(a, device) for a in args]
        before = snapshot(args)
        with pytest.raises(ValueError) as actual:
            handle(*args)
        assert str(actual.value).splitlines()[0] == str(expected.value).splitlines()[0], name
        assert_unchanged(args, before, name)


# ---- the shared layout never materialises [B, G, C, d] ----------------------------------------

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
    """The reference's forward (called as a function: a registered op is one opaque call to the mode) and the
    backward every backend shares."""
    num_queries, group, num_candidates, dim = 4, 8, 33, 64
    q, c, positive, real = random_case(torch.Generator().manual_seed(12), num_queries=num_queries, group=group,
                                       num_candidates=num_candidates, dim=dim, shared=True, mask="2d",
                                       dtype=torch.float32)
    broadcast = num_queries * group * num_candidates * dim
    with LargestOutput() as forward:
        reference.elva_rewards(q, c, positive, real, 0.05, 0.01, 0.4, 0.6, math.e, "group", 1e-4, True)
    assert 0 < forward.elements < broadcast
    q, c = q.requires_grad_(), c.requires_grad_()
    out = elva_rewards(q, c, positive_index=positive, mask=real, return_scores=True, differentiable=True,
                       backend="torch")
    with LargestOutput() as backward:
        outputs = [out.advantages, out.scores]
        torch.autograd.grad(outputs, (q, c), [torch.ones_like(t) for t in outputs])
    assert 0 < backward.elements < broadcast


# ---- opcheck, torch.compile ----------------------------------------------------------------------

def opcheck_cases(dtypes, device, *, with_grad):
    """The op's arguments on ``device``: fp32 in both layouts, with no mask and a 3-D one (inputs that require grad
    ``with_grad``: opcheck then traces the backward too), then each half dtype with a 2-D mask."""
    gen = torch.Generator().manual_seed(9)
    halves = [dtype for dtype in dtypes if dtype != torch.float32]
    for shared, mask, advantage, log_base, return_scores, dtype in [
        (True, None, "group", math.e, False, torch.float32),
        (False, "3d", "batch", 2.0, True, torch.float32),
    ] + [(True, "2d", "none", math.e, True, dtype) for dtype in halves]:
        q, c, positive, real = random_case(gen, num_queries=2, group=3, num_candidates=6, dim=8, shared=shared,
                                           mask=mask, dtype=dtype)
        grad = with_grad and dtype == torch.float32
        yield (q.to(device).requires_grad_(grad), c.to(device).requires_grad_(grad), positive.to(device),
               on_device(real, device), 0.05, 0.01, 0.4, 0.6, log_base, advantage, 1e-4, return_scores)


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_opcheck(backend, device):
    """Schema, fake tensors, autograd registration and the dynamic-shape AOT trace of every variant. The backward is
    one function registered for every variant, fed only the saved inputs: its dynamic-shape trace (about 1.5 s a
    case) runs with the reference's forward; with another variant's it would trace the same graph again."""
    handle = require_backend(OP, backend, device).handle
    for args in opcheck_cases(dtypes_of(OP, backend), device, with_grad=backend == "torch"):
        torch.library.opcheck(handle, args)


@pytest.fixture(scope="module")
def fresh_inductor_cache(tmp_path_factory):
    """An Inductor cache that starts empty. The caches key on the traced forward graph, not on the registered
    backward's source, so an entry from an earlier run would silently test an older backward; within this module the
    backends, whose backward graphs are the same, share one compilation of it."""
    with temporary_cache_dir(str(tmp_path_factory.mktemp("inductor"))):
        yield


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_compile_fullgraph(backend, device, fresh_inductor_cache):
    """One graph, no break, over the Python dispatch in front of the op: the shared layout with a tensor
    positive_index, a mask and differentiable outputs, whose backward Inductor compiles; the per-rollout layout with
    an int positive_index (a tensor made in the graph), by name and by auto. Static shapes: one compilation."""
    require_backend(OP, backend, device)
    gen = torch.Generator().manual_seed(10)
    q, c, positive, real = random_case(gen, num_queries=3, group=4, num_candidates=7, dim=8, shared=True, mask="3d",
                                       dtype=torch.float32)
    per_rollout = torch.randn(3, 4, 7, 8, generator=gen).to(device)
    q, c, positive, real = (t.to(device) for t in (q, c, positive, real))

    def rewards(q, c, per_rollout, positive, mask):
        differentiable = elva_rewards(q, c, positive_index=positive, mask=mask, log_base=2, return_scores=True,
                                      differentiable=True, backend=backend)
        by_name = elva_rewards(q, per_rollout, positive_index=1, backend=backend)
        auto = elva_rewards(q, per_rollout, positive_index=1)
        return differentiable, by_name, auto

    # Scalar C++ code: vectorising the fused backward kernel costs Inductor about 10 s more here and proves no more
    # about the graph.
    with torch._inductor.config.patch({"cpp.vec_isa_ok": False}):
        compiled = torch.compile(rewards, fullgraph=True, dynamic=False)
        q_eager, c_eager, q_compiled, c_compiled = leaf(q, device), leaf(c, device), leaf(q, device), leaf(c, device)
        eager = rewards(q_eager, c_eager, per_rollout, positive, real)
        got = compiled(q_compiled, c_compiled, per_rollout, positive, real)
        for got_out, eager_out in zip(got, eager):
            for a, b in zip(got_out, eager_out):
                assert (a is None and b is None) or torch.equal(a, b)
        assert got[1].scores is None and got[1].total.shape == (3, 4)
        weights = torch.randn(3, 4, device=device)
        for a, b in zip(torch.autograd.grad(got[0].advantages, (q_compiled, c_compiled), weights),
                        torch.autograd.grad(eager[0].advantages, (q_eager, c_eager), weights)):
            torch.testing.assert_close(a, b)

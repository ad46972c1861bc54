"""A4 infonce_loss (torch backend) against a materialised float64 InfoNCE, plus its contracts:
bad input, opcheck, torch.compile, memory linearity and torch.distributed gathering."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from elva_kernels import infonce_loss
from elva_kernels.reference import _common
from tests.helpers import spawn_gloo
from elva_kernels.reference.infonce_loss import infonce_loss as reference_infonce_loss

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Ragged shapes (B, N, d): N >= B, extra negatives, d = 1 (cosine is +-1: ties everywhere).
SHAPES = [(1, 1, 1), (1, 4, 5), (3, 3, 64), (3, 10, 5), (17, 17, 1), (17, 40, 64), (17, 300, 5)]

# Tolerances against float64, from the one deliberate rounding: scores are fp32 (SPEC A), so
# z = s / tau carries an absolute error ~2**-24 / tau, and everything scales with 1/tau.
# fp16/bf16 inputs are upcast before any arithmetic and the float64 oracle sees the same
# rounded inputs, so the loss is as exact as for fp32; the gradients come back in the input
# dtype and so add its rounding (2**-11 for fp16, 2**-8 for bf16, twice that as margin).
# Worst seen over 6 seeds x every case: about 1/7 of each bound.
LOSS_RTOL, LOSS_ATOL_TAU = 1e-5, 2e-6  # |err| <= rtol |ref| + atol / tau
GRAD_RTOL_TAU = 1e-6  # embeddings: |err| <= (rtol / tau + dtype rounding) max|ref| + 1e-6
GRAD_DTYPE_ROUNDING = {torch.float32: 0.0, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# dL/dtau = -sum_ij dL/dz_ij s_ij / tau^2 cancels: bound its error by B max|weight| / tau^3.
TAU_GRAD_ATOL = 2e-7


def naive_infonce(q, c, labels, tau, symmetric=False, false_negatives=None):
    """The [B, N] float64 InfoNCE that the op must equal: (loss [B], lse [B])."""
    z = F.normalize(q.double(), dim=1, eps=1e-12) @ F.normalize(c.double(), dim=1, eps=1e-12).T / tau
    if false_negatives is not None:
        n = z.shape[1]
        listed = torch.zeros(z.shape[0], n + 1, dtype=torch.bool)
        listed.scatter_(1, torch.where(false_negatives >= 0, false_negatives, n), True)
        z = z.masked_fill(listed[:, :n], float("-inf"))
    loss = F.cross_entropy(z, labels, reduction="none")
    if symmetric:
        num_queries = q.shape[0]
        reverse = F.cross_entropy(z[:, :num_queries].T, torch.arange(num_queries), reduction="none")
        loss = (loss + reverse) / 2
    return loss, z.logsumexp(1)


def _assert_within(err, bound, what):
    bad = err > bound
    if bad.any():
        first = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} mismatches, first at {first}, max err {err.max():.3g}")


def assert_loss_close(actual, expected, tau, what="loss"):
    err = (actual.double() - expected).abs()
    bound = LOSS_RTOL * expected.abs() + LOSS_ATOL_TAU / tau
    _assert_within(err, bound, what)


def assert_grad_close(actual, expected, tau, name):
    rtol = GRAD_RTOL_TAU / tau + GRAD_DTYPE_ROUNDING[actual.dtype]
    err = (actual.double() - expected).abs()
    bound = rtol * expected.abs().max() + 1e-6
    _assert_within(err, bound, f"grad {name}")


def assert_tau_grad_close(actual, expected, tau, rows, weight):
    bound = TAU_GRAD_ATOL * rows * weight / tau**3
    err = abs(actual.double() - expected)
    assert err <= bound, f"grad temperature: {actual.item()} vs {expected.item()}, err {err:.3g} > {bound:.3g}"


def make_case(shape, dtype, symmetric, with_false_negatives, seed=0):
    num_queries, num_candidates, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(num_queries, d, generator=g).to(dtype)
    c = torch.randn(num_candidates, d, generator=g).to(dtype)
    labels = None if symmetric else torch.randint(0, num_candidates, (num_queries,), generator=g)
    dense_labels = torch.arange(num_queries) if labels is None else labels
    false_negatives = None
    if with_false_negatives:
        false_negatives = torch.randint(-1, num_candidates, (num_queries, 3), generator=g)
        false_negatives = torch.where(false_negatives == dense_labels[:, None], -1, false_negatives)
    weights = torch.randn(num_queries, generator=g), torch.randn(num_queries, generator=g)
    return q, c, labels, dense_labels, false_negatives, weights


CASES = list(itertools.product(SHAPES, DTYPES, (False, True), (False, True), (0.05, 0.01)))


@pytest.mark.parametrize(
    "shape,dtype_name,symmetric,with_fn,tau",
    CASES,
    ids=[
        f"{dt}-B{s[0]}-N{s[1]}-d{s[2]}-{'sym' if sy else 'q2c'}-{'fn' if fn else 'nofn'}-tau{tau}"
        for s, dt, sy, fn, tau in CASES
    ],
)
def test_matches_float64(shape, dtype_name, symmetric, with_fn, tau):
    q, c, labels, dense_labels, false_negatives, (w_loss, w_lse) = make_case(
        shape, DTYPES[dtype_name], symmetric, with_fn
    )
    q.requires_grad_()
    c.requires_grad_()
    temperature = torch.tensor(tau, requires_grad=True)
    loss, lse = infonce_loss(
        q, c, labels=labels, temperature=temperature, symmetric=symmetric,
        false_negatives=false_negatives, reduction="none", return_lse=True,
    )
    assert loss.shape == lse.shape == (shape[0],) and loss.dtype == lse.dtype == torch.float32
    q64, c64, t64 = (x.detach().double().requires_grad_() for x in (q, c, temperature))
    ref_loss, ref_lse = naive_infonce(q64, c64, dense_labels, t64, symmetric, false_negatives)
    assert_loss_close(loss, ref_loss, tau)
    assert_loss_close(lse, ref_lse, tau, "lse")

    grads = torch.autograd.grad((loss * w_loss).sum() + (lse * w_lse).sum(), (q, c, temperature))
    ref_grads = torch.autograd.grad((ref_loss * w_loss).sum() + (ref_lse * w_lse).sum(), (q64, c64, t64))
    assert grads[0].dtype == q.dtype and grads[1].dtype == c.dtype
    assert_grad_close(grads[0], ref_grads[0], tau, "queries")
    assert_grad_close(grads[1], ref_grads[1], tau, "candidates")
    weight = max(w_loss.abs().max(), w_lse.abs().max()).item()
    assert_tau_grad_close(grads[2], ref_grads[2], tau, shape[0], weight)


@pytest.mark.parametrize("symmetric,with_fn", [(False, True), (True, False), (True, True)])
def test_many_tiles(monkeypatch, symmetric, with_fn):
    # Small blocks: 3 query blocks x 3 candidate blocks (256 is the smallest candidate block),
    # so the running max/sum, the labels, the false negatives and the reverse direction's
    # columns all cross tile borders.
    monkeypatch.setattr(_common, "QUERY_BLOCK", 128)
    monkeypatch.setattr(_common, "TILE_ELEMENTS", 1)
    q, c, labels, dense_labels, fn, (w_loss, w_lse) = make_case((300, 700, 16), torch.float32, symmetric, with_fn)
    q.requires_grad_()
    c.requires_grad_()
    tau = torch.tensor(0.05, requires_grad=True)
    loss, lse = infonce_loss(
        q, c, labels=labels, temperature=tau, symmetric=symmetric, false_negatives=fn,
        reduction="none", return_lse=True,
    )
    q64, c64, t64 = (x.detach().double().requires_grad_() for x in (q, c, tau))
    ref_loss, ref_lse = naive_infonce(q64, c64, dense_labels, t64, symmetric, fn)
    assert_loss_close(loss, ref_loss, 0.05)
    assert_loss_close(lse, ref_lse, 0.05, "lse")
    grads = torch.autograd.grad((loss * w_loss).sum() + (lse * w_lse).sum(), (q, c, tau))
    ref_grads = torch.autograd.grad((ref_loss * w_loss).sum() + (ref_lse * w_lse).sum(), (q64, c64, t64))
    assert_grad_close(grads[0], ref_grads[0], 0.05, "queries")
    assert_grad_close(grads[1], ref_grads[1], 0.05, "candidates")
    weight = max(w_loss.abs().max(), w_lse.abs().max()).item()
    assert_tau_grad_close(grads[2], ref_grads[2], 0.05, 300, weight)


def test_default_labels_are_arange():
    q, c = torch.randn(5, 8), torch.randn(12, 8)
    default = infonce_loss(q, c, reduction="none")
    assert torch.equal(default, infonce_loss(q, c, labels=torch.arange(5), reduction="none"))
    assert_loss_close(default, naive_infonce(q, c, torch.arange(5), 0.05)[0], 0.05)


def test_reductions_and_return_lse():
    q, c = torch.randn(6, 16), torch.randn(20, 16)
    per_row, lse = infonce_loss(q, c, reduction="none", return_lse=True)
    assert torch.allclose(infonce_loss(q, c), per_row.mean())
    assert torch.allclose(infonce_loss(q, c, reduction="sum"), per_row.sum())
    assert infonce_loss(q, c).shape == ()
    mean, mean_lse = infonce_loss(q, c, return_lse=True)
    assert mean.shape == () and torch.equal(mean_lse, lse)


def test_float_and_tensor_temperature_agree():
    q, c = torch.randn(6, 16), torch.randn(20, 16)
    from_float = infonce_loss(q, c, temperature=0.07, reduction="none")
    from_tensor = infonce_loss(q, c, temperature=torch.tensor(0.07), reduction="none")
    assert torch.equal(from_float, from_tensor)
    # A float64 temperature parameter gets its gradient in its own dtype.
    tau = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    infonce_loss(q, c, temperature=tau).backward()
    assert tau.grad is not None and tau.grad.dtype == torch.float64


@pytest.mark.parametrize("tau", [0.01, 1e-4])
def test_small_temperature_does_not_overflow(tau):
    # exp(1 / 1e-4) overflows any float: only the online max shift keeps this finite.
    q, c = torch.randn(8, 32, requires_grad=True), torch.randn(30, 32, requires_grad=True)
    loss, lse = infonce_loss(q, c, temperature=tau, symmetric=True, reduction="none", return_lse=True)
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all()
    assert_loss_close(loss, naive_infonce(q.detach(), c.detach(), torch.arange(8), tau, True)[0], tau)
    loss.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(c.grad).all()


def test_all_equal_scores():
    # Identical candidates: every score ties, so the loss is log N exactly and the gradient w.r.t. tau is 0.
    c = torch.ones(7, 4, requires_grad=True)
    tau = torch.tensor(0.05, requires_grad=True)
    loss = infonce_loss(torch.randn(3, 4), c, temperature=tau, reduction="none")
    assert torch.allclose(loss, torch.full((3,), torch.log(torch.tensor(7.0)).item()), rtol=1e-6)
    loss.sum().backward()
    assert abs(tau.grad.item()) < 1e-3


def test_zero_rows():
    # A zero vector normalises to zero (eps 1e-12), as F.normalize does: all its scores are 0.
    q, c = torch.zeros(2, 4), torch.randn(5, 4)
    assert_loss_close(infonce_loss(q, c, reduction="none"), naive_infonce(q, c, torch.arange(2), 0.05)[0], 0.05)


def test_non_contiguous_inputs_and_determinism():
    base_q, base_c = torch.randn(9, 32), torch.randn(40, 2 * 16)
    q, c = base_q[:, ::2], base_c[::2, 1::2]  # strided views
    fn = torch.tensor([[3, -1]] * 9)
    fn[3, 0] = -1

    def run(q, c):
        q, c = q.detach().requires_grad_(), c.detach().requires_grad_()
        tau = torch.tensor(0.05, requires_grad=True)
        loss, lse = infonce_loss(q, c, temperature=tau, symmetric=True, false_negatives=fn, return_lse=True)
        grads = torch.autograd.grad(loss + lse.sum(), (q, c, tau))
        return (loss, lse) + grads

    first, second, contiguous = run(q, c), run(q, c), run(q.contiguous(), c.contiguous())
    for a, b, e in zip(first, second, contiguous):
        assert torch.equal(a, b), "two runs must be bitwise equal"
        # The row norms may reduce in another order for strided rows: equal up to fp32 rounding.
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_every_option_non_default():
    q, c, _, dense_labels, fn, (w, _) = make_case((6, 15, 12), torch.bfloat16, True, True, seed=3)
    tau = torch.tensor(0.02, requires_grad=True)
    loss, lse = infonce_loss(
        q, c, temperature=tau, symmetric=True, false_negatives=fn, reduction="sum", return_lse=True, backend="torch"
    )
    ref_loss, ref_lse = naive_infonce(q, c, dense_labels, 0.02, True, fn)
    # The sum adds up 6 rows' errors.
    torch.testing.assert_close(loss.double(), ref_loss.sum(), rtol=LOSS_RTOL, atol=6 * LOSS_ATOL_TAU / 0.02)
    assert_loss_close(lse, ref_lse, 0.02, "lse")


def test_false_negatives_transposed_in_reverse_direction():
    # Row 0 lists candidate 1: pair (0, 1) leaves query 0's softmax and candidate 1's softmax.
    q, c = torch.randn(3, 8), torch.randn(3, 8)
    fn = torch.tensor([[1], [-1], [-1]])
    loss = infonce_loss(q, c, temperature=0.1, symmetric=True, false_negatives=fn, reduction="none")
    z = F.normalize(q.double(), dim=1) @ F.normalize(c.double(), dim=1).T / 0.1
    forward = torch.stack([z[0, [0, 2]].logsumexp(0), z[1].logsumexp(0), z[2].logsumexp(0)]) - z.diagonal()
    reverse = torch.stack([z[:, 0].logsumexp(0), z[[1, 2], 1].logsumexp(0), z[:, 2].logsumexp(0)]) - z.diagonal()
    assert_loss_close(loss, (forward + reverse) / 2, 0.1)


OPCHECK_CASES = {
    "plain": dict(shape=(5, 9, 8), symmetric=False, fn=False, dtype=torch.float32),
    "symmetric-fn": dict(shape=(5, 9, 8), symmetric=True, fn=True, dtype=torch.float32),
    "labels-fn-bf16": dict(shape=(4, 2050, 3), symmetric=False, fn=True, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("case", OPCHECK_CASES.values(), ids=OPCHECK_CASES.keys())
def test_opcheck(case):
    q, c, _, labels, fn, _ = make_case(case["shape"], case["dtype"], case["symmetric"], case["fn"])
    tau = torch.tensor(0.07, requires_grad=True)
    args = (q.requires_grad_(), c.requires_grad_(), labels, tau, case["symmetric"], fn)
    torch.library.opcheck(torch.ops.elva.infonce_loss_torch.default, args)


def test_torch_compile_fullgraph():
    q, c, _, _, fn, _ = make_case((6, 14, 16), torch.float32, True, True)

    def loss_fn(q, c, tau, fn):
        loss, lse = infonce_loss(q, c, temperature=tau, symmetric=True, false_negatives=fn, return_lse=True)
        return loss + lse.mean()

    def run(fn_to_run):
        qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
        tau = torch.tensor(0.05, requires_grad=True)
        out = fn_to_run(qq, cc, tau, fn)
        return (out,) + torch.autograd.grad(out, (qq, cc, tau))

    torch._dynamo.reset()
    compiled = run(torch.compile(loss_fn, fullgraph=True))
    for got, expected in zip(compiled, run(loss_fn)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    default = torch.compile(lambda q, c: infonce_loss(q, c), fullgraph=True)
    torch.testing.assert_close(default(q, c), infonce_loss(q, c))


def _inputs(**overrides):
    base = dict(queries=torch.randn(4, 8), candidates=torch.randn(10, 8))
    base.update(overrides)
    return base


BAD_INPUTS = {
    "queries-1d": (_inputs(queries=torch.randn(8)), ValueError, "queries"),
    "candidates-3d": (_inputs(candidates=torch.randn(2, 10, 8)), ValueError, "candidates"),
    "mismatched-d": (_inputs(candidates=torch.randn(10, 7)), ValueError, "candidates"),
    "int-queries": (_inputs(queries=torch.ones(4, 8, dtype=torch.int32)), TypeError, "queries"),
    "float64-candidates": (_inputs(candidates=torch.randn(10, 8, dtype=torch.float64)), TypeError, "candidates"),
    "mixed-dtypes": (_inputs(candidates=torch.randn(10, 8).half()), TypeError, "candidates"),
    "mixed-devices": (_inputs(candidates=torch.randn(10, 8, device="meta")), ValueError, "candidates"),
    "queries-list": (_inputs(queries=[[1.0] * 8] * 4), TypeError, "queries"),
    "empty-queries": (_inputs(queries=torch.randn(0, 8)), ValueError, "queries"),
    "empty-candidates": (_inputs(candidates=torch.randn(0, 8)), ValueError, "candidates"),
    "empty-d": (_inputs(queries=torch.randn(4, 0), candidates=torch.randn(10, 0)), ValueError, "queries"),
    "nan-queries": (_inputs(queries=torch.tensor([[float("nan")] * 8] * 4)), ValueError, "queries"),
    "inf-candidates": (_inputs(candidates=torch.full((10, 8), float("inf"))), ValueError, "candidates"),
    "labels-int32": (_inputs(labels=torch.zeros(4, dtype=torch.int32)), TypeError, "labels"),
    "labels-shape": (_inputs(labels=torch.zeros(5, dtype=torch.int64)), ValueError, "labels"),
    "labels-2d": (_inputs(labels=torch.zeros(4, 1, dtype=torch.int64)), ValueError, "labels"),
    "label-too-large": (_inputs(labels=torch.tensor([0, 1, 2, 10])), ValueError, "labels"),
    "label-negative": (_inputs(labels=torch.tensor([0, 1, -1, 3])), ValueError, "labels"),
    "fn-out-of-range": (_inputs(false_negatives=torch.tensor([[5], [10], [-1], [-1]])), ValueError, "false_negatives"),
    "fn-below-padding": (_inputs(false_negatives=torch.tensor([[-2], [5], [-1], [-1]])), ValueError, "false_negatives"),
    "fn-equals-label": (_inputs(false_negatives=torch.tensor([[5], [-1], [2], [-1]])), ValueError, "false_negatives"),
    "fn-rows": (_inputs(false_negatives=torch.tensor([[5], [6]])), ValueError, "false_negatives"),
    "fn-1d": (_inputs(false_negatives=torch.tensor([5, 6, 7, 8])), ValueError, "false_negatives"),
    "fn-float": (_inputs(false_negatives=torch.tensor([[5.0]] * 4)), TypeError, "false_negatives"),
    "tau-zero": (_inputs(temperature=0.0), ValueError, "temperature"),
    "tau-negative": (_inputs(temperature=-0.1), ValueError, "temperature"),
    "tau-nan": (_inputs(temperature=float("nan")), ValueError, "temperature"),
    "tau-string": (_inputs(temperature="0.05"), TypeError, "temperature"),
    "tau-tensor-zero": (_inputs(temperature=torch.tensor(0.0)), ValueError, "temperature"),
    "tau-tensor-negative": (_inputs(temperature=torch.tensor(-1.0, requires_grad=True)), ValueError, "temperature"),
    "tau-tensor-inf": (_inputs(temperature=torch.tensor(float("inf"))), ValueError, "temperature"),
    "tau-tensor-1d": (_inputs(temperature=torch.tensor([0.05])), ValueError, "temperature"),
    "tau-tensor-int": (_inputs(temperature=torch.tensor(1)), TypeError, "temperature"),
    "symmetric-with-labels": (_inputs(symmetric=True, labels=torch.arange(4)), ValueError, "labels"),
    "symmetric-too-few-candidates": (_inputs(symmetric=True, candidates=torch.randn(3, 8)), ValueError, "candidates"),
    "symmetric-not-bool": (_inputs(symmetric=1), TypeError, "symmetric"),
    "return-lse-not-bool": (_inputs(return_lse="yes"), TypeError, "return_lse"),
    "reduction": (_inputs(reduction="avg"), ValueError, "reduction"),
    "backend-unknown": (_inputs(backend="fastest"), ValueError, "backend"),
    "backend-not-yet": (_inputs(backend="cuda"), ValueError, "cuda"),
    "group-without-distributed": (_inputs(group=object()), ValueError, "group"),
}


@pytest.mark.parametrize("kwargs,error,name", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_names_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        infonce_loss(kwargs.pop("queries"), kwargs.pop("candidates"), **kwargs)


def test_registered_op_checks_symmetric_labels():
    # Called directly, the op still refuses symmetric with labels other than arange(B).
    q, c = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="labels"):
        torch.ops.elva.infonce_loss_torch(q, c, torch.tensor([1, 0, 2]), torch.tensor(0.05), True, None)


class LargestOutput(TorchDispatchMode):
    """Records the largest numel among the outputs of every op run under it."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), func
        return out


def test_memory_is_linear(monkeypatch):
    # A small tile makes B * N dominate at a size that runs in a second; the bound is then
    # the docstring's: a few tiles, or the (B + N) x d embeddings and gradients.
    monkeypatch.setattr(_common, "TILE_ELEMENTS", 1 << 18)
    # Tiles this small gain nothing from intra-op threads, and on a busy machine their
    # contention made this test 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_memory_is_linear()
    finally:
        torch.set_num_threads(threads)


def _check_memory_is_linear():
    num_queries, num_candidates, d = 64, 200_000, 8
    q = torch.randn(num_queries, d, requires_grad=True)
    c = torch.randn(num_candidates, d, requires_grad=True)
    tau = torch.tensor(0.05, requires_grad=True)
    labels = torch.arange(num_queries)
    fn = torch.randint(num_queries, num_candidates, (num_queries, 4))
    bound = max(4 * _common.TILE_ELEMENTS, (num_queries + num_candidates) * d)
    assert bound * 4 < num_queries * num_candidates

    inputs = q.detach(), c.detach(), labels, tau.detach(), True, fn
    with LargestOutput() as forward:
        reference_infonce_loss(*inputs)
    assert forward.numel <= bound, f"forward allocated {forward.numel} elements in {forward.op}"

    loss, lse = torch.ops.elva.infonce_loss_torch(q, c, labels, tau, True, fn)
    with LargestOutput() as backward:
        torch.autograd.grad(loss.sum() + lse.sum(), (q, c, tau))
    assert backward.op is not None, "the backward ran outside the recording mode"
    assert backward.numel <= bound, f"backward allocated {backward.numel} elements in {backward.op}"


# ---- torch.distributed: 2 gloo processes against one process on the concatenated batch ----


def _distributed_cases():
    """Per-rank inputs with uneven sizes: rank 0 holds B=3, N=5 and rank 1 holds B=2, N=4."""
    g = torch.Generator().manual_seed(7)
    sizes = [(3, 5), (2, 4)]
    queries = [torch.randn(b, 6, generator=g) for b, _ in sizes]
    candidates = [torch.randn(n, 6, generator=g) for _, n in sizes]
    weights = [(torch.randn(b, generator=g), torch.randn(b, generator=g)) for b, _ in sizes]
    return {
        # Rank 0 passes local labels, rank 1 the default; false negatives are global ids
        # (row 0 of rank 0 lists candidate 6, which lives on rank 1).
        "labels": dict(
            queries=queries, candidates=candidates, weights=weights, symmetric=False,
            labels=[torch.tensor([1, 0, 4]), None],
            false_negatives=[torch.tensor([[6, -1], [-1, -1], [0, 8]]), torch.tensor([[0, 6], [-1, 5]])],
        ),
        "symmetric": dict(
            queries=queries, candidates=candidates, weights=weights, symmetric=True,
            labels=[None, None], false_negatives=[None, None],
        ),
    }


def _run_case(case, rank, group):
    q = case["queries"][rank].clone().requires_grad_()
    c = case["candidates"][rank].clone().requires_grad_()
    tau = torch.tensor(0.05, requires_grad=True)
    loss, lse = infonce_loss(
        q, c, labels=case["labels"][rank], temperature=tau, symmetric=case["symmetric"],
        false_negatives=case["false_negatives"][rank], reduction="none", return_lse=True, group=group,
    )
    w_loss, w_lse = case["weights"][rank]
    grads = torch.autograd.grad((loss * w_loss).sum() + (lse * w_lse).sum(), (q, c, tau))
    return (loss.detach(), lse.detach()) + grads


def _distributed_worker(rank, out_dir):
    import torch.distributed as dist

    results = {name: _run_case(case, rank, dist.group.WORLD) for name, case in _distributed_cases().items()}
    torch.save(results, out_dir / f"rank{rank}.pt")


def _single_process(case):
    """The same case in one process: every rank's rows concatenated, labels shifted."""
    queries, candidates, sizes = case["queries"], case["candidates"], [len(c) for c in case["candidates"]]
    offsets = [0, sizes[0]]
    q = torch.cat(queries).requires_grad_()
    if case["symmetric"]:
        # Positives first (rank order), then every rank's extra negatives.
        order = [p for r in range(2) for p in range(offsets[r], offsets[r] + len(queries[r]))]
        order += [e for r in range(2) for e in range(offsets[r] + len(queries[r]), offsets[r] + sizes[r])]
        labels, fn = None, None
    else:
        order = list(range(sum(sizes)))
        labels = torch.cat([
            (torch.arange(len(queries[r])) if lab is None else lab) + offsets[r]
            for r, lab in enumerate(case["labels"])
        ])
        fn = torch.cat(case["false_negatives"])
    c_all = torch.cat(candidates).requires_grad_()
    tau = torch.tensor(0.05, requires_grad=True)
    loss, lse = infonce_loss(
        q, c_all[order], labels=labels, temperature=tau, symmetric=case["symmetric"],
        false_negatives=fn, reduction="none", return_lse=True,
    )
    w_loss = torch.cat([w[0] for w in case["weights"]])
    w_lse = torch.cat([w[1] for w in case["weights"]])
    grads = torch.autograd.grad((loss * w_loss).sum() + (lse * w_lse).sum(), (q, c_all, tau))
    return loss, lse, grads


def test_group_matches_single_process(tmp_path):
    spawn_gloo(_distributed_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, case in _distributed_cases().items():
        loss, lse, (grad_q, grad_c, grad_tau) = _single_process(case)
        per_rank = [r[name] for r in ranks]
        assert_loss_close(torch.cat([r[0] for r in per_rank]), loss.detach().double(), 0.05, f"{name} loss")
        assert_loss_close(torch.cat([r[1] for r in per_rank]), lse.detach().double(), 0.05, f"{name} lse")
        assert_grad_close(torch.cat([r[2] for r in per_rank]), grad_q.double(), 0.05, f"{name} queries")
        assert_grad_close(torch.cat([r[3] for r in per_rank]), grad_c.double(), 0.05, f"{name} candidates")
        # Each rank's temperature sees its own queries' losses: the ranks' gradients add up.
        weight = max(w.abs().max().item() for pair in case["weights"] for w in pair)
        assert_tau_grad_close(per_rank[0][4] + per_rank[1][4], grad_tau.double(), 0.05, len(loss), weight)

"""infonce_loss on every backend the registry lists, on every device it runs on.

Every backend (the torch reference included, on CPU and CUDA) against a materialised float64 InfoNCE: loss, lse and
the gradients of queries, candidates and temperature, over fixed edge shapes (B = N = d = 1, d = 1 where every score
ties) and ragged random ones (N > B, symmetric, false negatives, tau from 1e-4 to 1, every dtype), over several
blocks, with all-equal scores, zero rows and strided views; dL/dtau also against finite differences of the float64
loss; the backward op's output mask; bitwise determinism; data errors named in the forward and backward ops;
opcheck and torch.compile. The public API's reductions, defaults, argument errors and torch.distributed gathering.
Case counts follow where a backend runs: the Triton interpreter gets fewer cases. Memory: tests/ops/test_memory.py.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from elva_kernels import infonce_loss
from elva_kernels.reference import _common
from tests.helpers import backend_matrix, ragged_size, require_backend, runs_as, spawn_gloo

OP = "infonce_loss"
OPS = torch.ops.elva
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tolerances against float64, from the one deliberate rounding: scores are fp32 (SPEC A), so z = s / tau carries an
# absolute error ~2**-24 sqrt(d) / tau, and everything scales with 1 / tau. fp16/bf16 inputs are upcast before any
# arithmetic and the float64 oracle sees the same rounded inputs, so the loss is as exact as for fp32; the gradients
# come back in the input dtype and so add its rounding (2**-11 for fp16, 2**-8 for bf16, twice that as margin).
LOSS_RTOL, LOSS_ATOL_TAU = 1e-5, 2e-6  # |err| <= rtol |ref| + atol / tau
GRAD_RTOL_TAU = 1e-6  # embeddings: |err| <= (rtol / tau + rounding) max|ref| + 1e-6
# The fast backends sum the gradient tiles in another order than the reference's fp64-accumulated dot products.
GRAD_ROUNDING = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# dL/dtau = -sum_ij dL/dz_ij s_ij / tau^2 cancels: bound its error by B max|weight| / tau^3.
TAU_GRAD_ATOL = 4e-7


def naive_infonce(q, c, labels, tau, symmetric=False, false_negatives=None):
    """The [B, N] float64 InfoNCE that every backend must equal: (loss [B], lse [B])."""
    z = F.normalize(q.double(), dim=1, eps=1e-12) @ F.normalize(c.double(), dim=1, eps=1e-12).T / tau
    if false_negatives is not None:
        n = z.shape[1]
        listed = torch.zeros(z.shape[0], n + 1, dtype=torch.bool)
        listed.scatter_(1, torch.where(false_negatives >= 0, false_negatives, n).cpu(), True)
        z = z.masked_fill(listed[:, :n].to(z.device), float("-inf"))
    loss = F.cross_entropy(z, labels, reduction="none")
    if symmetric:
        num_queries = q.shape[0]
        reverse = F.cross_entropy(z[:, :num_queries].T, torch.arange(num_queries, device=z.device), reduction="none")
        loss = (loss + reverse) / 2
    return loss, z.logsumexp(1)


def _assert_within(err, bound, what):
    bad = ~(err <= bound)
    if bad.any():
        first = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} mismatches, first at {first}, max err {err.max():.3g}")


def assert_loss_close(actual, expected, tau, what="loss"):
    err = (actual.double().cpu() - expected.cpu()).abs()
    _assert_within(err, LOSS_RTOL * expected.cpu().abs() + LOSS_ATOL_TAU / tau, what)


def assert_grad_close(actual, expected, tau, what):
    rtol = GRAD_RTOL_TAU / tau + GRAD_ROUNDING[actual.dtype]
    err = (actual.double().cpu() - expected.cpu()).abs()
    _assert_within(err, rtol * expected.abs().max().cpu() + 1e-6, what)


def assert_tau_grad_close(actual, expected, tau, rows, weight, what="grad temperature"):
    bound = TAU_GRAD_ATOL * rows * weight / tau**3 + 1e-5 * abs(float(expected))
    err = abs(float(actual) - float(expected))
    assert err <= bound, f"{what}: {float(actual)} vs {float(expected)}, err {err:.3g} > {bound:.3g}"


def make_case(shape, dtype, symmetric, with_false_negatives, seed=0):
    """CPU inputs (q, c, labels or None, dense labels, false negatives or None, loss and lse weights)."""
    num_queries, num_candidates, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(num_queries, d, generator=g)
    c = torch.randn(num_candidates, d, generator=g)
    c[:num_queries] = 0.5 * c[:num_queries] + q  # positives near their queries: a real loss landscape
    labels = None if symmetric else torch.randint(0, num_candidates, (num_queries,), generator=g)
    dense_labels = torch.arange(num_queries) if labels is None else labels
    false_negatives = None
    if with_false_negatives:
        false_negatives = torch.randint(-1, num_candidates, (num_queries, 1 + seed % 4), generator=g)
        false_negatives = torch.where(false_negatives == dense_labels[:, None], -1, false_negatives)
    weights = torch.randn(num_queries, generator=g), torch.randn(num_queries, generator=g)
    return q.to(dtype), c.to(dtype), labels, dense_labels, false_negatives, weights


def on_device(values, device):
    return [v.to(device) if isinstance(v, torch.Tensor) else v for v in values]


def check_against_float64(backend, device, case, tau, symmetric, *, reduction_weights=None):
    """Loss, lse and all three gradients of ``backend`` on ``device`` against float64 autograd of the naive loss."""
    q, c, labels, dense_labels, fn, (w_loss, w_lse) = case
    q_dev, c_dev, labels_dev, fn_dev, w_loss_dev, w_lse_dev = on_device((q, c, labels, fn, w_loss, w_lse), device)
    q_dev.requires_grad_()
    c_dev.requires_grad_()
    temperature = torch.tensor(tau, device=device, requires_grad=True)
    loss, lse = infonce_loss(q_dev, c_dev, labels=labels_dev, temperature=temperature, symmetric=symmetric,
                             false_negatives=fn_dev, reduction="none", return_lse=True, backend=backend)
    assert loss.shape == lse.shape == (q.shape[0],) and loss.dtype == lse.dtype == torch.float32
    q64, c64 = (x.double().requires_grad_() for x in (q, c))
    t64 = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    ref_loss, ref_lse = naive_infonce(q64, c64, dense_labels, t64, symmetric, fn)
    what = f"{backend}/{device} B={q.shape[0]} N={c.shape[0]} d={q.shape[1]} {q.dtype} tau={tau} sym={symmetric}"
    assert_loss_close(loss.detach(), ref_loss.detach(), tau, f"{what} loss")
    assert_loss_close(lse.detach(), ref_lse.detach(), tau, f"{what} lse")

    grads = torch.autograd.grad((loss * w_loss_dev).sum() + (lse * w_lse_dev).sum(), (q_dev, c_dev, temperature))
    ref_grads = torch.autograd.grad((ref_loss * w_loss).sum() + (ref_lse * w_lse).sum(), (q64, c64, t64))
    assert grads[0].dtype == q.dtype and grads[1].dtype == c.dtype
    assert all(torch.isfinite(g).all() for g in grads), f"{what}: a gradient is not finite"
    assert_grad_close(grads[0], ref_grads[0], tau, f"{what} grad queries")
    assert_grad_close(grads[1], ref_grads[1], tau, f"{what} grad candidates")
    weight = max(w_loss.abs().max(), w_lse.abs().max()).item()
    assert_tau_grad_close(grads[2], ref_grads[2], tau, q.shape[0], weight, f"{what} grad temperature")


# Fixed edge shapes (B, N, d): one row, N > B, d = 1 (cosine is +-1: ties everywhere).
SHAPES = [(1, 1, 1), (1, 4, 5), (3, 3, 64), (3, 10, 5), (17, 17, 1), (17, 40, 64), (17, 300, 5)]
FIXED_CASES = list(itertools.product(SHAPES, DTYPES, (False, True), (0.05, 0.01)))
# Ragged random cases, largest (B, extra negatives, d): (cases, limits). The interpreter gets every third fixed case.
RANDOM_CASES = {"cpu": (24, (70, 400, 130)), "interpreter": (6, (45, 60, 40)), "gpu": (24, (70, 400, 130))}


@pytest.mark.parametrize("symmetric", [False, True], ids=["q2c", "symmetric"])
@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_matches_float64(backend, device, symmetric):
    for dtype in DTYPES:
        require_backend(OP, backend, device, dtype)
    step = 3 if runs_as(backend, device) == "interpreter" else 1
    for number, (shape, dtype, with_fn, tau) in enumerate(FIXED_CASES[::step]):
        case = make_case(shape, dtype, symmetric, with_fn, seed=number)
        check_against_float64(backend, device, case, tau, symmetric)
    count, (max_rows, max_extra, max_dim) = RANDOM_CASES[runs_as(backend, device)]
    gen = torch.Generator().manual_seed(int(symmetric))
    for number in range(count):
        rows = ragged_size(gen, 1, max_rows)
        shape = (rows, rows + ragged_size(gen, 0, max_extra), ragged_size(gen, 1, max_dim))
        case = make_case(shape, DTYPES[number % 3], symmetric, number % 2 == 1, seed=100 + number)
        check_against_float64(backend, device, case, (0.05, 0.01, 1.0)[number % 3], symmetric)


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_many_blocks(backend, device, monkeypatch):
    """Several query and candidate blocks with ragged ends, so the running max and sum, the labels, the false
    negatives and the reverse direction's columns all cross block borders. The reference gets small tiles (3 query
    blocks x 3 candidate blocks; 256 is its smallest candidate block)."""
    require_backend(OP, backend, device)
    if backend == "torch":
        monkeypatch.setattr(_common, "QUERY_BLOCK", 128)
        monkeypatch.setattr(_common, "TILE_ELEMENTS", 1)
    for symmetric, with_fn in [(False, True), (True, False), (True, True)]:
        case = make_case((300, 700, 24), torch.float32, symmetric, with_fn, seed=3)
        check_against_float64(backend, device, case, 0.05, symmetric)


@pytest.mark.parametrize("tau", [0.01, 1e-4])
@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_small_temperature_does_not_overflow(backend, device, tau):
    # exp(1 / 1e-4) overflows any float: only the online max shift keeps this finite.
    require_backend(OP, backend, device)
    q, c = torch.randn(8, 32, device=device, requires_grad=True), torch.randn(30, 32, device=device, requires_grad=True)
    loss, lse = infonce_loss(q, c, temperature=tau, symmetric=True, reduction="none", return_lse=True, backend=backend)
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all()
    expected = naive_infonce(q.detach().cpu(), c.detach().cpu(), torch.arange(8), tau, True)[0]
    assert_loss_close(loss.detach(), expected, tau)
    loss.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(c.grad).all()


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_half_gradients_keep_small_terms(backend, device):
    """fp16 rows where every dL/ds is tiny: p ~ 1 / 2000 over tau = 1000 puts it near 6e-7, among fp16's subnormals
    (spacing 6e-8). Backends that round dL/ds to the rows' dtype for tensor-core products must first scale it into
    the normal range. The gradients are that small too, so each may be off by its own rounding to fp16 and 1% of the
    largest (rounded unscaled, the query gradients are 4% off)."""
    require_backend(OP, backend, device, torch.float16)
    q, c, _, dense_labels, _, (_, lse_weight) = make_case((8, 2000, 32), torch.float16, True, False, seed=4)
    q_dev, c_dev = (x.to(device).requires_grad_() for x in (q, c))
    _, lse = infonce_loss(q_dev, c_dev, temperature=1000.0, symmetric=True, reduction="none", return_lse=True,
                          backend=backend)
    grads = torch.autograd.grad((lse * 8 * lse_weight.sign().to(device)).sum(), (q_dev, c_dev))
    q64, c64 = q.double().requires_grad_(), c.double().requires_grad_()
    ref_lse = naive_infonce(q64, c64, dense_labels, 1000.0, True)[1]
    expected = torch.autograd.grad((ref_lse * 8 * lse_weight.sign()).sum(), (q64, c64))
    for name, got, want in zip(("queries", "candidates"), grads, expected):
        rounding = (want.half().double() - want).abs()
        _assert_within((got.double().cpu() - want).abs(), rounding + 1e-2 * want.abs().max(), f"grad {name}")


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_all_equal_scores(backend, device):
    # Identical candidates: every score ties, so the loss is log N exactly and the gradient w.r.t. tau is 0.
    require_backend(OP, backend, device)
    c = torch.ones(7, 4, device=device, requires_grad=True)
    tau = torch.tensor(0.05, device=device, requires_grad=True)
    loss = infonce_loss(torch.randn(3, 4, device=device), c, temperature=tau, reduction="none", backend=backend)
    torch.testing.assert_close(loss.detach().cpu(), torch.full((3,), torch.log(torch.tensor(7.0)).item()), rtol=1e-6,
                               atol=0)
    loss.sum().backward()
    assert abs(tau.grad.item()) < 1e-3


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_zero_rows(backend, device):
    # A zero vector normalises to zero (eps 1e-12), as F.normalize does: all its scores are 0.
    require_backend(OP, backend, device)
    q, c = torch.zeros(2, 4), torch.randn(5, 4)
    loss = infonce_loss(q.to(device), c.to(device), reduction="none", backend=backend)
    assert_loss_close(loss, naive_infonce(q, c, torch.arange(2), 0.05)[0], 0.05)


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_false_negatives_transposed_in_reverse_direction(backend, device):
    # Row 0 lists candidate 1: pair (0, 1) leaves query 0's softmax and candidate 1's softmax.
    require_backend(OP, backend, device)
    q, c = torch.randn(3, 8), torch.randn(3, 8)
    fn = torch.tensor([[1], [-1], [-1]])
    loss = infonce_loss(q.to(device), c.to(device), temperature=0.1, symmetric=True, false_negatives=fn.to(device),
                        reduction="none", backend=backend)
    z = F.normalize(q.double(), dim=1) @ F.normalize(c.double(), dim=1).T / 0.1
    forward = torch.stack([z[0, [0, 2]].logsumexp(0), z[1].logsumexp(0), z[2].logsumexp(0)]) - z.diagonal()
    reverse = torch.stack([z[:, 0].logsumexp(0), z[[1, 2], 1].logsumexp(0), z[:, 2].logsumexp(0)]) - z.diagonal()
    assert_loss_close(loss, (forward + reverse) / 2, 0.1)


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_every_option_non_default(backend, device):
    require_backend(OP, backend, device, torch.bfloat16)
    q, c, _, dense_labels, fn, _ = make_case((6, 15, 12), torch.bfloat16, True, True, seed=3)
    loss, lse = infonce_loss(*on_device((q, c), device), temperature=torch.tensor(0.02, device=device),
                             symmetric=True, false_negatives=fn.to(device), reduction="sum", return_lse=True,
                             backend=backend)
    ref_loss, ref_lse = naive_infonce(q, c, dense_labels, 0.02, True, fn)
    # The sum adds up 6 rows' errors.
    torch.testing.assert_close(loss.double().cpu(), ref_loss.sum(), rtol=LOSS_RTOL, atol=6 * LOSS_ATOL_TAU / 0.02)
    assert_loss_close(lse, ref_lse, 0.02, "lse")


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_grad_temperature_matches_finite_differences(backend, device):
    """dL/dtau against central differences of the float64 loss (independent of any autograd formula)."""
    require_backend(OP, backend, device)
    q, c, _, dense_labels, fn, (g, h) = make_case((20, 50, 16), torch.float32, True, True, seed=11)
    tau, step = 0.3, 1e-4

    def objective(t):
        loss, lse = naive_infonce(q, c, dense_labels, t, True, fn)
        return float((loss * g).sum() + (lse * h).sum())

    numeric = (objective(tau + step) - objective(tau - step)) / (2 * step)  # truncation error ~ step**2
    t = torch.tensor(tau, device=device, requires_grad=True)
    q_dev, c_dev, fn_dev, g_dev, h_dev = on_device((q, c, fn, g, h), device)
    loss, lse = infonce_loss(q_dev, c_dev, temperature=t, symmetric=True, false_negatives=fn_dev, reduction="none",
                             return_lse=True, backend=backend)
    ((loss * g_dev).sum() + (lse * h_dev).sum()).backward()
    assert_tau_grad_close(t.grad, numeric, tau, 20, max(g.abs().max().item(), h.abs().max().item()))


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_backward_output_mask(backend, device):
    """The backward op computes only the gradients asked for; each equals the one computed with all three."""
    require_backend(OP, backend, device)
    q, c, _, labels, fn, (g, h) = make_case((9, 40, 16), torch.float32, True, True, seed=5)
    args = on_device((q, c, labels, torch.tensor(0.05), True, fn), device)
    loss, lse = getattr(OPS, f"{OP}_{backend}")(*args)
    backward = getattr(OPS, f"infonce_loss_backward_{backend}")
    weights = on_device((g, h), device)
    full = backward(*args, loss, lse, *weights, [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True], [True, False, True]):
        got = backward(*args, loss, lse, *weights, mask)
        for name, wanted, part, whole in zip(("queries", "candidates", "temperature"), mask, got, full):
            if wanted:
                assert torch.equal(part, whole), f"mask {mask}: grad {name} differs from the full backward's"
            else:
                assert part.shape == (0,), f"mask {mask}: unwanted grad {name} has shape {tuple(part.shape)}"


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_strided_inputs_and_determinism(backend, device):
    require_backend(OP, backend, device)
    base_q, base_c = torch.randn(9, 32, device=device), torch.randn(40, 2 * 16, device=device)
    q, c = base_q[:, ::2], base_c[::2, 1::2]  # strided views
    fn = torch.tensor([[3, -1]] * 9, device=device)
    fn[3, 0] = -1

    def run(q, c):
        q, c = q.detach().requires_grad_(), c.detach().requires_grad_()
        tau = torch.tensor(0.05, device=device, requires_grad=True)
        loss, lse = infonce_loss(q, c, temperature=tau, symmetric=True, false_negatives=fn, return_lse=True,
                                 backend=backend)
        grads = torch.autograd.grad(loss + lse.sum(), (q, c, tau))
        return (loss, lse) + grads

    first, second, contiguous = run(q, c), run(q, c), run(q.contiguous(), c.contiguous())
    for a, b, e in zip(first, second, contiguous):
        assert torch.equal(a, b), "two runs must be bitwise equal"
        # The row norms may reduce in another order for strided rows: equal up to fp32 rounding.
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


DATA_ERRORS = [
    (dict(q_nan=True), "queries must contain only finite values"),
    (dict(c_inf=True), "candidates must contain only finite values"),
    (dict(tau=0.0), "temperature must be a finite value > 0"),
    (dict(tau=float("nan")), "temperature must be a finite value > 0"),
    (dict(labels=[0, 1, 99]), r"labels holds ids outside \[0, 10\); got 99"),
    (dict(labels=[0, 2, 1], symmetric=True), r"labels must be arange\(B\) = arange\(3\) when symmetric=True"),
    (dict(fn=[[-1], [10], [-1]]), r"false_negatives holds ids outside -1 \(padding\) or \[0, 10\); got 10"),
    (dict(fn=[[-1], [1], [-1]]), "false_negatives must not list a query's own label; row 1 lists its label 1"),
]


@pytest.mark.parametrize("kwargs,message", DATA_ERRORS, ids=[m[:30] for _, m in DATA_ERRORS])
@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_data_errors_name_the_argument(backend, device, kwargs, message):
    """Errors only the values show: the registered forward and backward ops raise them (called directly, as
    opcheck and torch.compile do), with the reference's message."""
    require_backend(OP, backend, device)
    q, c = torch.randn(3, 8), torch.randn(10, 8)
    if kwargs.get("q_nan"):
        q[1, 2] = float("nan")
    if kwargs.get("c_inf"):
        c[7, 0] = float("inf")
    labels = torch.tensor(kwargs.get("labels", [0, 1, 2]))
    fn = torch.tensor(kwargs["fn"]) if "fn" in kwargs else None
    args = (*on_device((q, c, labels, torch.tensor(kwargs.get("tau", 0.05))), device), kwargs.get("symmetric", False),
            None if fn is None else fn.to(device))
    with pytest.raises(ValueError, match=message):
        getattr(OPS, f"{OP}_{backend}")(*args)
    zeros = torch.zeros(3, device=device)
    with pytest.raises(ValueError, match=message):
        getattr(OPS, f"infonce_loss_backward_{backend}")(*args, zeros, zeros, zeros, zeros, [True, True, True])


OPCHECK_CASES = {
    "plain": dict(shape=(5, 9, 8), symmetric=False, fn=False, dtype=torch.float32),
    "symmetric-fn": dict(shape=(5, 9, 8), symmetric=True, fn=True, dtype=torch.float32),
    "labels-fn-bf16": dict(shape=(4, 2050, 3), symmetric=False, fn=True, dtype=torch.bfloat16),
}


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_opcheck(backend, device):
    """The forward op (its fake, autograd and schema) and the backward op with and without an output mask."""
    require_backend(OP, backend, device, torch.bfloat16)
    for case in OPCHECK_CASES.values():
        shape = case["shape"]
        if runs_as(backend, device) == "interpreter":  # several candidate blocks still; 2050 would take 10 s
            shape = (shape[0], min(shape[1], 300), shape[2])
        q, c, _, labels, fn, (g, h) = make_case(shape, case["dtype"], case["symmetric"], case["fn"])
        q, c, labels, fn, g, h = on_device((q, c, labels, fn, g, h), device)
        tau = torch.tensor(0.07, device=device, requires_grad=True)
        args = (q.requires_grad_(), c.requires_grad_(), labels, tau, case["symmetric"], fn)
        torch.library.opcheck(getattr(OPS, f"{OP}_{backend}").default, args)
        loss, lse = getattr(OPS, f"{OP}_{backend}")(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        plain = (q.detach(), c.detach(), labels, tau.detach(), case["symmetric"], fn, loss, lse, g, h)
        for mask in ([True, True, True], [False, True, False]):
            torch.library.opcheck(getattr(OPS, f"infonce_loss_backward_{backend}").default, (*plain, mask))


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_torch_compile_fullgraph(backend, device):
    require_backend(OP, backend, device)
    q, c, _, _, fn, _ = make_case((6, 14, 16), torch.float32, True, True)
    q, c, fn = on_device((q, c, fn), device)

    def loss_fn(q, c, tau, fn):
        loss, lse = infonce_loss(q, c, temperature=tau, symmetric=True, false_negatives=fn, return_lse=True,
                                 backend=backend)
        return loss + lse.mean()

    def run(fn_to_run):
        qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
        tau = torch.tensor(0.05, device=device, requires_grad=True)
        out = fn_to_run(qq, cc, tau, fn)
        return (out,) + torch.autograd.grad(out, (qq, cc, tau))

    torch._dynamo.reset()
    compiled = run(torch.compile(loss_fn, fullgraph=True))
    for got, expected in zip(compiled, run(loss_fn)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# ---- the public API (backend "auto") ----------------------------------------------------------------------------


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
    "backend-cuda-on-cpu-tensors": (_inputs(backend="cuda"), ValueError, "cuda"),
    "group-without-distributed": (_inputs(group=object()), ValueError, "group"),
}


@pytest.mark.parametrize("kwargs,error,name", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_names_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        infonce_loss(kwargs.pop("queries"), kwargs.pop("candidates"), **kwargs)


# ---- torch.distributed: 2 gloo processes against one process on the concatenated batch --------------------------


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

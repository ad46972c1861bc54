"""infonce_loss, C++/OpenMP CPU backend: forward and backward (the backward op directly, and autograd through
elva::infonce_loss_cpu) against the torch variants over ragged random cases (extra negatives, symmetric, false
negatives, small temperatures, every dtype, output_mask variants); grad_temperature against finite differences;
bad input; opcheck; memory that does not grow with B * N."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import elva_kernels  # noqa: F401  (registers the ops and the extension)
from elva_kernels.ops import infonce_loss as _ops  # noqa: F401  (autograd and fakes of every variant)

OPS = torch.ops.elva
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TAUS = [0.01, 0.05, 1.0]

# fp32 scores carry ~2**-24 sqrt(d) absolute error, scaled by 1 / tau in z; the gradients come back in the input
# dtype and add its rounding.
LOSS_RTOL, LOSS_ATOL_TAU = 1e-5, 2e-6
GRAD_RTOL_TAU = 1e-6
GRAD_DTYPE_ROUNDING = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_case(gen, *, symmetric, with_fn, dtype, B=None, N=None, d=None):
    B = B or int(torch.randint(1, 70, (1,), generator=gen))
    N = N or B + int(torch.randint(0, 400, (1,), generator=gen))
    d = d or int(torch.randint(1, 130, (1,), generator=gen))
    q = torch.randn(B, d, generator=gen).to(dtype)
    c = torch.randn(N, d, generator=gen).to(dtype)
    labels = torch.arange(B) if symmetric or bool(torch.rand(1, generator=gen) < 0.3) else torch.randint(
        0, N, (B,), generator=gen
    )
    fn = None
    if with_fn:
        m = int(torch.randint(1, 5, (1,), generator=gen))
        fn = torch.randint(-1, N, (B, m), generator=gen)
        fn = torch.where(fn == labels[:, None], -1, fn)
    return q, c, labels, fn


def assert_close(actual, expected, rtol, atol, what):
    err = (actual.double() - expected.double()).abs()
    bound = rtol * expected.double().abs() + atol
    bad = ~(err <= bound)
    assert not bad.any(), f"{what}: {int(bad.sum())} mismatches, max err {err.max():.3g}, first {bad.nonzero()[0].tolist()}"


def assert_grad_close(actual, expected, tau, what):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    rtol = GRAD_RTOL_TAU / tau + GRAD_DTYPE_ROUNDING[actual.dtype]
    assert_close(actual, expected, 0.0, rtol * scale + 1e-6, what)


def assert_tau_grad_close(actual, expected, tau, rows, weight, what="grad temperature"):
    bound = 4e-7 * rows * weight / tau**3 + 1e-5 * abs(expected.item())
    assert abs(actual.item() - expected.item()) <= bound, f"{what}: {actual.item()} vs {expected.item()}"


CASES = [
    (seed, dtype, symmetric, with_fn, tau)
    for seed, (dtype, symmetric, with_fn, tau) in enumerate(
        (dt, sy, fn, tau) for dt in DTYPES for sy in (False, True) for fn in (False, True) for tau in TAUS
    )
] + [(100 + s, torch.float32, bool(s % 2), bool(s // 2 % 2), TAUS[s % 3]) for s in range(24)]


@pytest.mark.parametrize("seed,dtype,symmetric,with_fn,tau", CASES)
def test_matches_torch_variant(seed, dtype, symmetric, with_fn, tau):
    gen = torch.Generator().manual_seed(seed)
    q, c, labels, fn = make_case(gen, symmetric=symmetric, with_fn=with_fn, dtype=dtype)
    B = q.shape[0]
    temperature = torch.tensor(tau)
    loss, lse = OPS.infonce_loss_cpu(q, c, labels, temperature, symmetric, fn)
    ref_loss, ref_lse = OPS.infonce_loss_torch(q, c, labels, temperature, symmetric, fn)
    assert loss.dtype == lse.dtype == torch.float32 and loss.shape == lse.shape == (B,)
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all()
    assert_close(loss, ref_loss, LOSS_RTOL, LOSS_ATOL_TAU / tau, "loss")
    assert_close(lse, ref_lse, LOSS_RTOL, LOSS_ATOL_TAU / tau, "lse")

    g, h = torch.randn(B, generator=gen), torch.randn(B, generator=gen)
    masks = [[True, True, True], [True, False, False], [False, True, False], [False, False, True], [True, False, True]]
    mask = masks[seed % len(masks)]
    got = OPS.infonce_loss_backward_cpu(q, c, labels, temperature, symmetric, fn, ref_loss, ref_lse, g, h, mask)
    ref = OPS.infonce_loss_backward_torch(q, c, labels, temperature, symmetric, fn, ref_loss, ref_lse, g, h, mask)
    weight = max(g.abs().max().item(), h.abs().max().item())
    for name, want, a, b in zip(("queries", "candidates", "temperature"), mask, got, ref):
        if not want:
            assert a.shape == (0,), f"unwanted grad {name} has shape {tuple(a.shape)}"
            continue
        if name == "temperature":
            assert a.shape == () and a.dtype == temperature.dtype
            assert_tau_grad_close(a, b, tau, B, weight)
        else:
            assert_grad_close(a, b, tau, f"grad {name}")


@pytest.mark.parametrize("symmetric,with_fn", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_through_the_cpu_op(symmetric, with_fn, dtype):
    gen = torch.Generator().manual_seed(7)
    q, c, labels, fn = make_case(gen, symmetric=symmetric, with_fn=with_fn, dtype=dtype, B=45, N=300, d=40)
    tau = 0.05
    g, h = torch.randn(45, generator=gen), torch.randn(45, generator=gen)

    def grads(variant):
        qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
        t = torch.tensor(tau, requires_grad=True)
        loss, lse = getattr(OPS, f"infonce_loss_{variant}")(qq, cc, labels, t, symmetric, fn)
        return torch.autograd.grad((loss * g).sum() + (lse * h).sum(), (qq, cc, t))

    mine, ref = grads("cpu"), grads("torch")
    assert_grad_close(mine[0], ref[0], tau, "grad queries")
    assert_grad_close(mine[1], ref[1], tau, "grad candidates")
    assert_tau_grad_close(mine[2], ref[2], tau, 45, max(g.abs().max().item(), h.abs().max().item()))


def test_many_blocks_and_panels():
    # Several query panels (32) and candidate blocks (264) in both directions, with ragged ends.
    gen = torch.Generator().manual_seed(3)
    for symmetric in (False, True):
        q, c, labels, fn = make_case(gen, symmetric=symmetric, with_fn=True, dtype=torch.float32, B=300, N=700, d=24)
        t = torch.tensor(0.05)
        loss, lse = OPS.infonce_loss_cpu(q, c, labels, t, symmetric, fn)
        ref_loss, ref_lse = OPS.infonce_loss_torch(q, c, labels, t, symmetric, fn)
        assert_close(loss, ref_loss, LOSS_RTOL, LOSS_ATOL_TAU / 0.05, "loss")
        assert_close(lse, ref_lse, LOSS_RTOL, LOSS_ATOL_TAU / 0.05, "lse")
        g, h = torch.randn(300, generator=gen), torch.randn(300, generator=gen)
        got = OPS.infonce_loss_backward_cpu(q, c, labels, t, symmetric, fn, loss, lse, g, h, [True, True, True])
        ref = OPS.infonce_loss_backward_torch(q, c, labels, t, symmetric, fn, ref_loss, ref_lse, g, h, [True] * 3)
        assert_grad_close(got[0], ref[0], 0.05, "grad queries")
        assert_grad_close(got[1], ref[1], 0.05, "grad candidates")
        assert_tau_grad_close(got[2], ref[2], 0.05, 300, max(g.abs().max().item(), h.abs().max().item()))


@pytest.mark.parametrize("tau", [0.01, 1e-4])
def test_small_temperature_does_not_overflow(tau):
    q, c = torch.randn(40, 32), torch.randn(90, 32)
    labels, t = torch.arange(40), torch.tensor(tau)
    loss, lse = OPS.infonce_loss_cpu(q, c, labels, t, True, None)
    assert torch.isfinite(loss).all() and torch.isfinite(lse).all()
    ref_loss, _ = OPS.infonce_loss_torch(q, c, labels, t, True, None)
    assert_close(loss, ref_loss, LOSS_RTOL, LOSS_ATOL_TAU / tau, "loss")
    grads = OPS.infonce_loss_backward_cpu(
        q, c, labels, t, True, None, loss, lse, torch.ones(40), torch.zeros(40), [True, True, True]
    )
    assert all(torch.isfinite(g).all() for g in grads)


def test_grad_temperature_matches_finite_differences():
    gen = torch.Generator().manual_seed(11)
    q, c, labels, fn = make_case(gen, symmetric=True, with_fn=True, dtype=torch.float32, B=20, N=50, d=16)
    q64, c64 = q.double(), c.double()
    tau, step = 0.3, 1e-4
    g, h = torch.randn(20, generator=gen), torch.randn(20, generator=gen)

    def objective(t):  # the float64 reference forward: a smooth function of tau
        loss, lse = OPS.infonce_loss_torch(q64, c64, labels, torch.tensor(t, dtype=torch.float64), True, fn)
        return float((loss.double() * g).sum() + (lse.double() * h).sum())

    numeric = (objective(tau + step) - objective(tau - step)) / (2 * step)
    t = torch.tensor(tau)
    loss, lse = OPS.infonce_loss_cpu(q, c, labels, t, True, fn)
    got = OPS.infonce_loss_backward_cpu(q, c, labels, t, True, fn, loss, lse, g, h, [False, False, True])[2]
    assert abs(got.item() - numeric) <= 1e-3 * max(1.0, abs(numeric)), (got.item(), numeric)


def test_non_contiguous_rows_and_determinism():
    q = torch.randn(40, 64)[:, ::2]
    c = torch.randn(120, 64)[:, 1::2]
    labels, t = torch.randint(0, 120, (40,)), torch.tensor(0.05)
    first = OPS.infonce_loss_cpu(q, c, labels, t, False, None)
    again = OPS.infonce_loss_cpu(q.contiguous(), c.contiguous(), labels, t, False, None)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    g = torch.randn(40)
    args = (q, c, labels, t, False, None, *first, g, torch.zeros(40), [True, True, True])
    one, two = OPS.infonce_loss_backward_cpu(*args), OPS.infonce_loss_backward_cpu(*args)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


BAD = [
    (dict(q_nan=True), "queries must contain only finite values"),
    (dict(c_inf=True), "candidates must contain only finite values"),
    (dict(tau=0.0), "temperature must be a finite value > 0"),
    (dict(tau=float("nan")), "temperature must be a finite value > 0"),
    (dict(labels=[0, 1, 99]), r"labels holds ids outside \[0, 10\); got 99"),
    (dict(labels=[0, 2, 1], symmetric=True), r"labels must be arange\(B\) = arange\(3\) when symmetric=True"),
    (dict(fn=[[-1], [10], [-1]]), r"false_negatives holds ids outside -1 \(padding\) or \[0, 10\); got 10"),
    (dict(fn=[[-1], [1], [-1]]), "false_negatives must not list a query's own label; row 1 lists its label 1"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_input(kwargs, message):
    q, c = torch.randn(3, 8), torch.randn(10, 8)
    if kwargs.get("q_nan"):
        q[1, 2] = float("nan")
    if kwargs.get("c_inf"):
        c[7, 0] = float("inf")
    labels = torch.tensor(kwargs.get("labels", [0, 1, 2]))
    fn = torch.tensor(kwargs["fn"]) if "fn" in kwargs else None
    t = torch.tensor(kwargs.get("tau", 0.05))
    symmetric = kwargs.get("symmetric", False)
    with pytest.raises(ValueError, match=message):
        OPS.infonce_loss_cpu(q, c, labels, t, symmetric, fn)
    z = torch.zeros(3)
    with pytest.raises(ValueError, match=message):
        OPS.infonce_loss_backward_cpu(q, c, labels, t, symmetric, fn, z, z, z, z, [True, True, True])
    # The torch variant raises the same message.
    with pytest.raises(ValueError, match=message):
        OPS.infonce_loss_torch(q, c, labels, t, symmetric, fn)


def test_bad_metadata_names_the_argument():
    q, c, t = torch.randn(3, 8), torch.randn(10, 8), torch.tensor(0.05)
    with pytest.raises(ValueError, match="candidates must be"):
        OPS.infonce_loss_cpu(q, torch.randn(10, 7), torch.arange(3), t, False, None)
    with pytest.raises(TypeError, match="labels must be int64"):
        OPS.infonce_loss_cpu(q, c, torch.arange(3).int(), t, False, None)
    with pytest.raises(ValueError, match="false_negatives must be int64"):
        OPS.infonce_loss_cpu(q, c, torch.arange(3), t, False, torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.parametrize("symmetric,with_fn", [(False, True), (True, False)])
def test_opcheck(symmetric, with_fn):
    gen = torch.Generator().manual_seed(5)
    q, c, labels, fn = make_case(gen, symmetric=symmetric, with_fn=with_fn, dtype=torch.float32, B=6, N=11, d=8)
    q.requires_grad_()
    c.requires_grad_()
    t = torch.tensor(0.1, requires_grad=True)
    torch.library.opcheck(OPS.infonce_loss_cpu.default, (q, c, labels, t, symmetric, fn))
    loss, lse = OPS.infonce_loss_torch(q.detach(), c.detach(), labels, t.detach(), symmetric, fn)
    args = (q.detach(), c.detach(), labels, t.detach(), symmetric, fn, loss, lse, torch.randn(6), torch.randn(6))
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(OPS.infonce_loss_backward_cpu.default, (*args, mask))


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    import elva_kernels
    from elva_kernels.ops import infonce_loss as _ops
    B = N = int(sys.argv[1]); d = 16
    q, c = torch.randn(B, d), torch.randn(N, d)
    labels, t = torch.arange(B), torch.tensor(0.05)
    fn = torch.randint(-1, N, (B, 2)); fn = torch.where(fn == labels[:, None], -1, fn)
    ops = torch.ops.elva
    small = ops.infonce_loss_cpu(q[:64], c[:64], labels[:64], t, True, None)  # warm up the library
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss, lse = ops.infonce_loss_cpu(q, c, labels, t, True, fn)
    grads = ops.infonce_loss_backward_cpu(q, c, labels, t, True, fn, loss, lse, torch.ones(B), torch.ones(B),
                                          [True, True, True])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
    """
)


def test_memory_does_not_grow_with_b_times_n():
    size = 8192
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(size)], capture_output=True, text=True, check=True, timeout=600
    )
    growth = int(out.stdout.strip().splitlines()[-1])
    dense = size * size * 4  # one fp32 [B, N] matrix: 256 MiB
    assert growth < dense / 16, f"peak RSS grew by {growth / 2**20:.1f} MiB; a [B, N] fp32 matrix is {dense / 2**20} MiB"

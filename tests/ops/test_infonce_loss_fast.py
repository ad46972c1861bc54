"""infonce_loss, fast backends on CPU tensors (the C++/OpenMP kernels, and the Triton kernels under the
interpreter): loss, lse and the gradients of queries, candidates and temperature against the reference over
random shapes (N > B, false negatives, symmetric, tau down to 0.01), bad input, opcheck."""
import pytest
import torch

from elva_kernels import infonce_loss
from tests.helpers import assert_close_verbose, backend_or_skip, ragged_size

OP = "infonce_loss"
FAST = ["cpu", "triton"]
# Relative tolerances of the acceptance list: fp32 1e-5, fp16/bf16 1e-2 (the gradients come back in that dtype).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def need(backend):
    backend_or_skip(OP, backend, "cpu", torch.float32)


def random_case(gen, dtype, *, symmetric, with_false_negatives):
    rows = ragged_size(gen, 1, 45)
    pool = rows + ragged_size(gen, 0, 60)  # extra negatives: N >= B
    dim = ragged_size(gen, 1, 40)
    q = torch.randn(rows, dim, generator=gen).to(dtype)
    c = torch.randn(pool, dim, generator=gen)
    c[:rows] = 0.5 * c[:rows] + q.float()  # positives near their queries: a real loss landscape
    labels = None if symmetric else torch.randint(0, pool, (rows,), generator=gen)
    false_negatives = None
    if with_false_negatives:
        false_negatives = torch.randint(-1, pool, (rows, ragged_size(gen, 1, 4)), generator=gen)
        own = torch.arange(rows) if labels is None else labels
        false_negatives[false_negatives == own[:, None]] = -1
    return q, c.to(dtype), labels, false_negatives


def loss_and_grads(backend, q, c, labels, false_negatives, tau, symmetric):
    q, c = q.clone().requires_grad_(), c.clone().requires_grad_()
    t = torch.tensor(tau, requires_grad=True)
    loss, lse = infonce_loss(q, c, labels=labels, temperature=t, symmetric=symmetric, false_negatives=false_negatives,
                             reduction="none", return_lse=True, backend=backend)
    weights = torch.linspace(0.5, 1.5, q.shape[0])
    grads = torch.autograd.grad((loss * weights).sum() + 0.3 * lse.sum(), (q, c, t))
    return (loss, lse, *grads)


def relative_close(actual, expected, tolerance, what, scale=None):
    """Within ``tolerance`` relative to the largest expected magnitude (or ``scale``)."""
    scale = expected.float().abs().max().clamp_min(1e-3) if scale is None else scale
    assert_close_verbose(actual.float(), expected.float(), atol=tolerance * float(scale), rtol=0, what=what)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_reference(backend, symmetric):
    need(backend)
    gen = torch.Generator().manual_seed(int(symmetric))
    for case in range(24):
        dtype = (torch.float32, torch.float16, torch.bfloat16)[case % 3]
        tau = (0.05, 0.01, 1.0)[case % 3 if case % 2 else 1]
        q, c, labels, false_negatives = random_case(gen, dtype, symmetric=symmetric, with_false_negatives=case % 2 == 1)
        ours = loss_and_grads(backend, q, c, labels, false_negatives, tau, symmetric)
        expected = loss_and_grads("torch", q, c, labels, false_negatives, tau, symmetric)
        # loss = lse - z_label cancels: its error is relative to the size of lse, not of the loss.
        lse_scale = expected[1].abs().max().clamp_min(1e-3)
        names = ("loss", "lse", "grad queries", "grad candidates", "grad temperature")
        for name, a, b in zip(names, ours, expected):
            assert torch.isfinite(a).all(), f"case {case} {name}: not finite at tau={tau}"
            relative_close(a, b, TOLERANCE[dtype], f"case {case} ({dtype}, tau={tau}) {name}",
                           scale=lse_scale if name == "loss" else None)


@pytest.mark.parametrize("backend", FAST)
def test_bad_input(backend):
    need(backend)
    q, c = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="labels"):
        infonce_loss(q, c, labels=torch.tensor([0, 1, 2, 6]), backend=backend)
    with pytest.raises(ValueError, match="false_negatives must not list a query's own label"):
        infonce_loss(q, c, false_negatives=torch.tensor([[1], [1], [3], [-1]]), backend=backend)
    with pytest.raises(ValueError, match="temperature"):
        infonce_loss(q, c, temperature=torch.tensor(-0.1), backend=backend)
    bad = c.clone()
    bad[2, 3] = float("inf")
    with pytest.raises(ValueError, match="candidates must contain only finite values"):
        infonce_loss(q, bad, backend=backend)


@pytest.mark.parametrize("backend", FAST)
def test_opcheck(backend):
    need(backend)
    q, c = torch.randn(5, 8, requires_grad=True), torch.randn(9, 8, requires_grad=True)
    op = getattr(torch.ops.elva, f"{OP}_{backend}").default
    t = torch.tensor(0.1)
    torch.library.opcheck(op, (q, c, torch.arange(5), t, True, None))
    torch.library.opcheck(op, (q, c, torch.tensor([8, 0, 1, 2, 3]), t, False, torch.tensor([[4, -1]] * 5)))

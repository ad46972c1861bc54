"""l2_normalize: every registered backend, on every device it serves, against the reference and F.normalize; the op
that proves the harness."""
import pytest
import torch

from elva_kernels import l2_normalize
from tests.helpers import (
    FORWARD_TOLERANCE,
    assert_close_verbose,
    backend_matrix,
    check_backend_against_reference,
    random_rows,
    ragged_size,
    require_backend,
)

OP = "l2_normalize"


def make_case(gen, dtype):
    rows, dim = ragged_size(gen, 1, 40), [1, 3, 129, 1500][ragged_size(gen, 0, 3)]
    x = random_rows(gen, rows, dim, ties=True) * 10 ** ragged_size(gen, -3, 3)
    return {"x": x.to(dtype)}


def run(case, backend):
    return l2_normalize(case["x"], backend=backend)


def compare(actual, expected, case, dtype):
    atol, rtol = FORWARD_TOLERANCE[dtype]
    assert actual.dtype == torch.float32
    assert_close_verbose(actual, expected, atol=atol, rtol=rtol, what=f"l2_normalize {tuple(case['x'].shape)} {dtype}")


@pytest.mark.parametrize("backend,device", backend_matrix(OP))
def test_backend_matches_reference(backend, device):
    check_backend_against_reference(OP, backend, make_case, run, compare, device=device)


def test_reference_is_f_normalize():
    x = torch.randn(7, 33, dtype=torch.float64).float()
    assert_close_verbose(l2_normalize(x, backend="torch"), torch.nn.functional.normalize(x, dim=1), atol=1e-7, rtol=1e-6, what="reference")


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_non_contiguous_rows(backend, device):
    require_backend(OP, backend, device)
    x = torch.randn(64, 40, device=device)[::3, 5:30]
    assert_close_verbose(l2_normalize(x, backend=backend), torch.nn.functional.normalize(x, dim=1), atol=1e-6, rtol=1e-6, what="strided")


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_non_finite_input_raises_and_names_x(backend, device):
    require_backend(OP, backend, device)
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(5, 9)
        x[2, 4] = bad
        with pytest.raises(ValueError, match="x must contain only finite values"):
            l2_normalize(x.to(device), backend=backend)


# Every variant registers the same autograd formula; the forward that feeds it is the backend's own.
@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_gradient_matches_f_normalize(backend, device):
    require_backend(OP, backend, device)
    x = torch.randn(6, 11, device=device, requires_grad=True)
    weight = torch.randn(6, 11, device=device)
    (l2_normalize(x, backend=backend) * weight).sum().backward()
    ours, x.grad = x.grad, None
    (torch.nn.functional.normalize(x, dim=1) * weight).sum().backward()
    assert_close_verbose(ours, x.grad, atol=1e-6, rtol=1e-5, what="grad")


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_opcheck(backend, device):
    x = torch.randn(9, 17, device=device, requires_grad=True)
    torch.library.opcheck(require_backend(OP, backend, device).handle, (x, 1e-12))

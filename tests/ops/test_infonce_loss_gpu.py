"""On a GPU: the Triton and CUDA backends of infonce_loss (forward and backward) against the reference, bf16
included, and at a size where a [B, N] score matrix would not fit the memory the op may use."""
import pytest
import torch

from elva_kernels import infonce_loss
from tests.helpers import backend_or_skip
from tests.ops import test_infonce_loss_fast as fast_tests

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_reference(backend, symmetric):
    backend_or_skip("infonce_loss", backend, "cuda", torch.float32)
    gen = torch.Generator().manual_seed(3)
    for case in range(18):
        dtype = (torch.float32, torch.float16, torch.bfloat16)[case % 3]
        tau = (0.05, 0.01, 1.0)[case % 3 if case % 2 else 1]
        q, c, labels, false_negatives = fast_tests.random_case(gen, dtype, symmetric=symmetric,
                                                               with_false_negatives=case % 2 == 1)
        expected = fast_tests.loss_and_grads("torch", q, c, labels, false_negatives, tau, symmetric)
        on_gpu = [x.cuda() if x is not None else None for x in (q, c, labels, false_negatives)]
        ours = [x.cpu() for x in fast_tests.loss_and_grads(backend, *on_gpu, tau, symmetric)]
        lse_scale = expected[1].abs().max().clamp_min(1e-3)
        for name, a, b in zip(("loss", "lse", "grad queries", "grad candidates", "grad temperature"), ours, expected):
            fast_tests.relative_close(a, b, fast_tests.TOLERANCE[dtype], f"case {case} {dtype} {name}",
                                      scale=lse_scale if name == "loss" else None)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_memory_stays_linear(backend):
    backend_or_skip("infonce_loss", backend, "cuda", torch.bfloat16)
    q = torch.randn(32768, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    c = torch.randn(32768, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    infonce_loss(q, c, symmetric=True, backend=backend).backward()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 512 * 2**20, f"{extra / 2**20:.0f} MiB; a [B, N] fp32 matrix alone is 4096 MiB"

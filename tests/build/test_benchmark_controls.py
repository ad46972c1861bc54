"""The controls benchmarks/compare.py times beside the fused retrieval kernels compute what they claim: the Triton
plain matmul (the threshold pass's main loop storing its scores) is q @ c.T, here under the interpreter."""
import pytest
import torch

import triton_matmul


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_plain_matmul_is_q_times_c_transposed(dtype):
    gen = torch.Generator().manual_seed(0)
    for rows, pool, dim in ((5, 300, 24), (130, 129, 64)):  # ragged tiles, and more than one query tile
        q, c = torch.randn(rows, dim, generator=gen).to(dtype), torch.randn(pool, dim, generator=gen).to(dtype)
        out = triton_matmul.plain_matmul(q, c)
        assert out.dtype == dtype and out.shape == (rows, pool)
        torch.testing.assert_close(out.float(), q.float() @ c.float().T, atol=2e-2 if dtype != torch.float32 else 1e-4,
                                   rtol=1e-3)

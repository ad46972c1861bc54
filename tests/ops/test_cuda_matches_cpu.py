"""On a GPU: every op on CUDA tensors gives the CPU reference's result (same scores, same order)."""
import pytest
import torch

import elva_kernels as ek
from tests.ops import test_rank_statistics_fast as rank_tests
from tests.ops import test_similarity_topk_fast as topk_tests

pytestmark = pytest.mark.gpu


def pair(*shape, dtype=torch.float32):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)
    return x, x.cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_similarity_topk_and_rank_statistics(dtype):
    """Every backend that runs on CUDA, against the CPU reference (within fp32 rounding, near-ties aside)."""
    (q, q_gpu), (c, c_gpu) = pair(33, 96, dtype=dtype), pair(5003, 96, dtype=dtype)
    positives = torch.randint(0, 5003, (33, 2))
    expected = ek.similarity_topk(q, c, 100, backend="torch")
    expected_stats = ek.rank_statistics(q, c, positives, backend="torch")
    case = {"queries": q, "candidates": c, "metric": "cosine", "positives": positives, "exclude": None}
    for backend in on_cuda("similarity_topk", dtype):
        values, indices = ek.similarity_topk(q_gpu, c_gpu, 100, backend=backend)
        topk_tests.compare((values.cpu(), indices.cpu()), expected, case, dtype)
    for backend in on_cuda("rank_statistics", dtype):
        stats = ek.rank_statistics(q_gpu, c_gpu, positives.cuda(), backend=backend)
        rank_tests.compare(type(stats)(*(x.cpu() for x in stats)), expected_stats, case, dtype)


def on_cuda(op, dtype):
    call = ek._dispatch.Call(torch.device("cuda"), dtype, {})
    return [b.name for b in ek._dispatch.backends(op) if not b.refusal_reasons(call)]


def test_mining_rewards_and_infonce():
    (q, q_gpu), (c, c_gpu) = pair(16, 64), pair(3000, 64)
    positives = torch.arange(16)
    mined = ek.mine_hard_negatives(q_gpu, c_gpu, positives.cuda(), n_hard=10, n_random=10, seed=1)
    assert torch.equal(mined.cpu(), ek.mine_hard_negatives(q, c, positives, n_hard=10, n_random=10, seed=1))
    (r, r_gpu), (cand, cand_gpu) = pair(4, 8, 64), pair(4, 101, 64)
    rewards = ek.elva_rewards(r_gpu, cand_gpu)
    assert torch.allclose(rewards.total.cpu(), ek.elva_rewards(r, cand).total, atol=1e-5)
    loss = ek.infonce_loss(q_gpu, c_gpu[:64])
    assert torch.allclose(loss.cpu(), ek.infonce_loss(q, c[:64]), rtol=1e-5)


def test_large_pool_index_arithmetic():
    """B * N above 2**31: ids stay int64 end to end."""
    q = torch.randn(1024, 16, device="cuda")
    c = torch.randn(2_200_000, 16, device="cuda")
    c[2_199_999] = q[7] * 3  # the best match for query 7 sits at the very end
    values, indices = ek.similarity_topk(q, c, 5)
    assert indices.dtype == torch.int64 and indices[7, 0].item() == 2_199_999

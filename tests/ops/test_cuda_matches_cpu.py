"""On a GPU: every op on CUDA tensors gives the CPU reference's result (same scores, same order)."""
import pytest
import torch

import elva_kernels as ek

pytestmark = pytest.mark.gpu


def pair(*shape, dtype=torch.float32):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))).to(dtype)
    return x, x.cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_similarity_topk_and_rank_statistics(dtype):
    (q, q_gpu), (c, c_gpu) = pair(33, 96, dtype=dtype), pair(5003, 96, dtype=dtype)
    for backend in [b.name for b in ek._dispatch.backends("similarity_topk")]:
        values, indices = ek.similarity_topk(q_gpu, c_gpu, 100, backend=backend)
        expected = ek.similarity_topk(q, c, 100, backend="torch")
        assert torch.equal(indices.cpu(), expected[1]) and torch.allclose(values.cpu(), expected[0], atol=1e-6)
    positives = torch.randint(0, 5003, (33, 2))
    stats = ek.rank_statistics(q_gpu, c_gpu, positives.cuda())
    assert torch.equal(stats.rank.cpu(), ek.rank_statistics(q, c, positives).rank)


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

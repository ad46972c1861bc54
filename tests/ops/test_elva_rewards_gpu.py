"""On a GPU: the Triton and CUDA backends of elva_rewards against the reference (both layouts, masks, every
advantage mode, bf16), ties, and the data errors. A few fixed shapes, so that few kernel variants compile."""
import pytest
import torch

from elva_kernels import elva_rewards
from tests.helpers import assert_close_verbose, backend_or_skip
from tests.ops import test_elva_rewards as rewards_tests

pytestmark = pytest.mark.gpu
SHAPES = [(3, 8, 101, 96), (2, 16, 512, 40), (4, 1, 2, 8), (5, 5, 33, 1536)]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(backend, dtype):
    backend_or_skip("elva_rewards", backend, "cuda", dtype)
    gen = torch.Generator().manual_seed(1)
    for case in range(36):
        num_queries, group, num_candidates, dim = SHAPES[case % len(SHAPES)]
        shared, mask = bool(case % 2), (None, "2d", "3d")[case % 3]
        q, c, positive, real = rewards_tests.random_case(gen, num_queries=num_queries, group=group,
                                                         num_candidates=num_candidates, dim=dim, shared=shared,
                                                         mask=mask, dtype=dtype)
        if num_candidates > 3:
            c[..., 1, :] = c[..., 3, :]  # exact duplicates tie by index
        options = dict(positive_index=positive, mask=real, advantage=("group", "batch", "none")[case % 3],
                       return_scores=True)
        expected = elva_rewards(q, c, backend="torch", **options)
        to_gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
        out = elva_rewards(q.cuda(), c.cuda(), backend=backend, **to_gpu)
        what = f"case {case} {tuple(c.shape)} {dtype}"
        assert torch.equal(out.rank.cpu(), expected.rank), what
        for name in ("total", "margin", "rank_reward", "advantages"):
            assert_close_verbose(getattr(out, name).cpu(), getattr(expected, name), atol=2e-5, rtol=1e-5,
                                 what=f"{what} {name}")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bad_data_raises(backend):
    backend_or_skip("elva_rewards", backend, "cuda", torch.float32)
    q, c = torch.randn(2, 3, 8, device="cuda"), torch.randn(2, 5, 8, device="cuda")
    hide = torch.ones(2, 5, dtype=torch.bool, device="cuda")
    hide[1, 0] = False
    with pytest.raises(ValueError, match="mask must keep every positive"):
        elva_rewards(q, c, mask=hide, backend=backend)
    bad = c.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="cand_emb must contain only finite values"):
        elva_rewards(q, bad, backend=backend)

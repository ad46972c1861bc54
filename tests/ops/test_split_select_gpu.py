"""On a GPU: the Triton and CUDA backends of similarity_topk, rank_statistics and mine_hard_negatives (the split
kernels of elva_kernels/_split_select.py) against the reference, over hundreds of ragged random cases, at large
sizes, and with B * N above 2**31."""
import pytest
import torch

import elva_kernels as ek
from tests.helpers import backend_or_skip, check_backend_against_reference, random_rows, ragged_size
from tests.ops import naive
from tests.ops import test_rank_statistics_fast as rank_tests
from tests.ops import test_similarity_topk_fast as topk_tests

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["triton", "cuda"]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_similarity_topk_matches_reference(backend, metric):
    for big in (False, True):
        check_backend_against_reference(
            "similarity_topk", backend, lambda g, dt: topk_tests.make_case(g, dt, metric, big=big), topk_tests.run,
            topk_tests.compare, device="cuda", cases=10 if big else 25,
        )


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_rank_statistics_matches_reference(backend, metric):
    for big in (False, True):
        check_backend_against_reference(
            "rank_statistics", backend, lambda g, dt: rank_tests.make_case(g, dt, metric, big=big), rank_tests.run,
            rank_tests.compare, device="cuda", cases=6 if big else 12,
        )


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_k_ties_and_duplicates(backend, dtype):
    """k up to 4096 over a pool with many exact duplicates: equal scores must come out by index."""
    backend_or_skip("similarity_topk", backend, "cuda", dtype)
    gen = torch.Generator().manual_seed(5)
    base = random_rows(gen, 3000, 128, ties=False)
    c = torch.cat([base, base, base[:1000]]).to(dtype).cuda()  # ids i, i + 3000, (i + 6000) share a vector
    q = random_rows(gen, 300, 128, ties=False).to(dtype).cuda()
    for k in (1, 100, 129, 1000, 4096):
        values, indices = ek.similarity_topk(q, c, k, backend=backend)
        expected = ek.similarity_topk(q, c, k, backend="torch")
        topk_tests.compare((values, indices), expected, {"queries": q, "candidates": c, "metric": "cosine"}, dtype)
        same = values[:, 1:] == values[:, :-1]
        assert bool((indices[:, 1:][same] > indices[:, :-1][same]).all()), "equal scores not by index"
    stats = ek.rank_statistics(q, c, torch.arange(300, device="cuda") + 3000, backend=backend)  # the middle copy
    first = ek.rank_statistics(q, c, torch.arange(300, device="cuda"), backend=backend)
    assert torch.equal(stats.rank, first.rank + 1), "the copy at the smaller id ties and comes first"
    assert torch.equal(stats.pos_score, first.pos_score)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_all_equal_scores_need_several_rounds(backend):
    backend_or_skip("similarity_topk", backend, "cuda", torch.float32)
    values, indices = ek.similarity_topk(torch.ones(70, 8, device="cuda"), torch.ones(20000, 8, device="cuda"), 4096,
                                         backend=backend)
    assert torch.equal(indices, torch.arange(4096, device="cuda").expand(70, -1))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_mining_matches_reference(backend):
    """Equal to the reference on every row without a near-tie (within fp32 rounding) at the n_hard-th place or at
    max_score, where the backends' roundings may decide differently."""
    backend_or_skip("mine_hard_negatives", backend, "cuda", torch.float32)
    gen = torch.Generator().manual_seed(9)
    checked = 0
    for dtype in (torch.float32, torch.bfloat16):
        for case in range(6):
            rows, pool = ragged_size(gen, 1, 200), ragged_size(gen, 2, 20000)
            q = random_rows(gen, rows, 64, ties=False).to(dtype)
            c = random_rows(gen, pool, 64, ties=False).to(dtype)
            positives = torch.randint(0, pool, (rows, 2), generator=gen)
            max_score = 0.3 if case % 2 else None
            n_hard, n_random = ragged_size(gen, 0, 60), ragged_size(gen, 1, 60)
            args = dict(n_hard=n_hard, n_random=n_random, max_score=max_score, seed=case)
            ours = ek.mine_hard_negatives(q.cuda(), c.cuda(), positives.cuda(), backend=backend, **args).cpu()
            expected = ek.mine_hard_negatives(q, c, positives, backend="torch", **args)
            s = naive.scores(q, c)
            tol = 2 * naive.score_tolerance(q, c)
            s[torch.arange(rows)[:, None], positives] = float("-inf")
            unsure = torch.zeros(rows, dtype=torch.bool)
            if max_score is not None:
                unsure |= ((s - max_score).abs() < tol).any(1)
                s = s.masked_fill(s > max_score, float("-inf"))
            if 0 < n_hard < pool:
                top = s.topk(min(n_hard + 1, pool), dim=1).values
                unsure |= (top.diff(dim=1).abs() < tol).any(1)
            sure = ~unsure
            assert torch.equal(ours[sure], expected[sure])
            checked += int(sure.sum())
    assert checked > 0


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_bf16_pool_above_2_31_scores(backend):
    """B * N > 2**31 with bf16 rows: ids and offsets stay 64-bit; checked against torch mm + topk per row chunk."""
    backend_or_skip("similarity_topk", backend, "cuda", torch.bfloat16)
    gen = torch.Generator("cuda").manual_seed(3)
    q = torch.randn(1536, 64, device="cuda", generator=gen).bfloat16()
    c = torch.randn(1_500_000, 64, device="cuda", generator=gen).bfloat16()
    c[-1] = q[5] * 2  # the best match of query 5 is the last candidate
    values, indices = ek.similarity_topk(q, c, 100, metric="dot", backend=backend)
    assert indices[5, 0].item() == c.shape[0] - 1
    for start in range(0, q.shape[0], 256):
        expected_values, _ = torch.topk(q[start : start + 256].float() @ c.float().T, 100)
        torch.testing.assert_close(values[start : start + 256], expected_values, atol=1e-3, rtol=1e-4)
    stats = ek.rank_statistics(q, c, indices[:, 0], metric="dot", backend=backend)
    assert bool((stats.rank == 1).all())
    stats = ek.rank_statistics(q, c, indices[:, 99], metric="dot", backend=backend)
    assert bool((stats.rank == 100).all())

"""similarity_topk: reference against a materialised top-k and faiss-cpu; ties, exclusions, filters, autograd."""
import numpy as np
import pytest
import torch

from elva_kernels import similarity_topk
from tests.helpers import assert_close_verbose, random_rows, ragged_size
from tests.ops import naive


def random_case(gen, dtype, *, ties=True):
    rows, pool, dim = ragged_size(gen, 1, 19), ragged_size(gen, 1, 300), ragged_size(gen, 1, 48)
    queries = random_rows(gen, rows, dim, ties=False).to(dtype)
    candidates = random_rows(gen, pool, dim, ties=ties).to(dtype)
    return queries, candidates, ragged_size(gen, 1, pool)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_reference_matches_materialised_topk(dtype, metric):
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        queries, candidates, k = random_case(gen, dtype)
        values, indices = similarity_topk(queries, candidates, k, metric=metric, backend="torch")
        expected_values, expected_indices = naive.topk(queries, candidates, k, metric)
        assert torch.equal(indices, expected_indices)
        assert torch.equal(values, expected_values)


def test_reference_matches_faiss_exact_search():
    faiss = pytest.importorskip("faiss")  # a dev extra; the GPU machine has none
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        queries, candidates, k = random_case(gen, torch.float32, ties=False)
        k = min(k, 2048)
        values, indices = similarity_topk(queries, candidates, k, backend="torch")
        index = faiss.IndexFlatIP(candidates.shape[1])
        index.add(torch.nn.functional.normalize(candidates, dim=1).numpy())
        faiss_values, faiss_indices = index.search(torch.nn.functional.normalize(queries, dim=1).numpy(), k)
        assert_close_verbose(values, torch.from_numpy(faiss_values), atol=1e-5, rtol=1e-5, what="faiss values")
        # Index sets agree wherever faiss' order is not a near-tie.
        gaps = np.diff(faiss_values, axis=1, prepend=np.inf, append=-np.inf)
        separated = (np.abs(gaps[:, :-1]) > 1e-5) & (np.abs(gaps[:, 1:]) > 1e-5)
        assert np.array_equal(indices.numpy()[separated], faiss_indices[separated])


def test_exact_duplicates_come_out_by_index():
    base = torch.randn(5, 16)
    candidates = torch.cat([base, base, base])  # every vector three times: ids i, i+5, i+10
    values, indices = similarity_topk(base[:2], candidates, 15, backend="torch")
    for row in range(2):
        for i in range(0, 15, 3):
            group = indices[row, i : i + 3]
            assert torch.equal(values[row, i : i + 3], values[row, i].expand(3))
            assert group.tolist() == sorted(group.tolist())
        assert indices[row, :3].tolist() == [row, row + 5, row + 10]


def test_all_equal_scores_give_ascending_indices():
    candidates = torch.ones(50, 4)
    values, indices = similarity_topk(torch.ones(3, 4), candidates, 50, backend="torch")
    assert torch.equal(indices, torch.arange(50).expand(3, -1))


def test_exclude_max_score_and_too_few_eligible():
    gen = torch.Generator().manual_seed(3)
    for _ in range(30):
        queries, candidates, _ = random_case(gen, torch.float32)
        rows, pool = queries.shape[0], candidates.shape[0]
        exclude = torch.randint(-1, pool, (rows, ragged_size(gen, 1, 6)), generator=gen)
        max_score = torch.rand(rows, generator=gen) * 1.2 - 0.4
        values, indices = similarity_topk(queries, candidates, pool, exclude=exclude, max_score=max_score, backend="torch")
        expected_values, expected_indices = naive.topk(queries, candidates, pool, exclude=exclude, max_score=max_score)
        assert torch.equal(indices, expected_indices)
        assert torch.equal(values, expected_values)
        padded = indices == -1
        assert torch.equal(padded, values == float("-inf"))
        assert (padded.int().diff(dim=1) >= 0).all(), "-1 only in the tail"


def test_float_max_score_equals_tensor():
    q, c = torch.randn(4, 8), torch.randn(60, 8)
    a = similarity_topk(q, c, 10, max_score=0.3, backend="torch")
    b = similarity_topk(q, c, 10, max_score=torch.full((4,), 0.3), backend="torch")
    assert torch.equal(a[1], b[1])


def test_k_equals_n_and_tiles_larger_than_one():
    from elva_kernels.reference import _common

    q, c = torch.randn(3, 4), torch.randn(_common.TILE_ELEMENTS // 3 * 2 + 17, 4)  # several candidate tiles
    values, indices = similarity_topk(q, c, 5, backend="torch")
    expected_values, expected_indices = naive.topk(q, c, 5)
    assert torch.equal(indices, expected_indices)
    values, indices = similarity_topk(q[:1], c[:300], 300, backend="torch")
    assert sorted(indices[0].tolist()) == list(range(300))


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_gradient_through_selected_pairs(metric):
    queries = torch.randn(5, 12, requires_grad=True)
    candidates = torch.randn(40, 12, requires_grad=True)
    exclude = torch.tensor([[0, 1]] * 5)
    grad_out = torch.randn(5, 40)
    values, indices = similarity_topk(queries, candidates, 40, metric=metric, exclude=exclude, backend="torch")
    eligible = indices >= 0
    (values.masked_fill(~eligible, 0) * grad_out).sum().backward()
    ours = queries.grad, candidates.grad
    queries.grad = candidates.grad = None
    q, c = queries, candidates
    if metric == "cosine":
        q, c = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(c, dim=1)
    s = q @ c.T
    picked = s.gather(1, indices.clamp_min(0))
    (picked.masked_fill(~eligible, 0) * grad_out).sum().backward()
    assert_close_verbose(ours[0], queries.grad, atol=1e-5, rtol=1e-4, what="grad queries")
    assert_close_verbose(ours[1], candidates.grad, atol=1e-5, rtol=1e-4, what="grad candidates")


def test_opcheck():
    q = torch.randn(4, 8, requires_grad=True)
    c = torch.randn(30, 8, requires_grad=True)
    op = torch.ops.elva.similarity_topk_torch.default
    torch.library.opcheck(op, (q, c, 5, "cosine", None, None))
    torch.library.opcheck(op, (q, c, 30, "dot", torch.tensor([[1, -1]] * 4), torch.full((4,), 0.2)))
    torch.library.opcheck(op, (q.detach().half(), c.detach().half(), 3, "cosine", None, None))


def test_torch_compile_fullgraph():
    q, c = torch.randn(4, 8), torch.randn(30, 8)
    compiled = torch.compile(lambda q, c: similarity_topk(q, c, 5, max_score=0.9), fullgraph=True)
    expected = similarity_topk(q, c, 5, max_score=0.9)
    actual = compiled(q, c)
    assert torch.equal(actual[1], expected[1]) and torch.equal(actual[0], expected[0])

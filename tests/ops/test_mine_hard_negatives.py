"""mine_hard_negatives: the hard part is similarity_topk; the random part is eligible, fresh, seeded, uniform."""
import pytest
import torch

from elva_kernels import mine_hard_negatives, similarity_topk
from tests.helpers import backend_or_skip, random_rows, ragged_size
from tests.ops import naive


def test_hard_part_is_topk_and_random_part_is_eligible():
    gen = torch.Generator().manual_seed(7)
    for case in range(30):
        rows, pool, dim = ragged_size(gen, 1, 9), ragged_size(gen, 2, 150), ragged_size(gen, 2, 16)
        queries = random_rows(gen, rows, dim, ties=False)
        pool_emb = random_rows(gen, pool, dim, ties=True)
        positives = torch.randint(0, pool, (rows, 2), generator=gen)
        n_hard, n_random = ragged_size(gen, 0, 20), ragged_size(gen, 1, 20)
        max_score = 0.6 if case % 2 else None
        mined = mine_hard_negatives(queries, pool_emb, positives, n_hard=n_hard, n_random=n_random, max_score=max_score, seed=case)
        assert mined.shape == (rows, n_hard + n_random)
        if n_hard:
            _, expected_hard = naive.topk(queries, pool_emb, min(n_hard, pool), exclude=positives, max_score=max_score)
            expected_hard = torch.nn.functional.pad(expected_hard, (0, n_hard - expected_hard.shape[1]), value=-1)
            assert torch.equal(mined[:, :n_hard], expected_hard)
        s = naive.scores(queries, pool_emb)
        for row in range(rows):
            hard = [i for i in mined[row, :n_hard].tolist() if i >= 0]
            drawn = mined[row, n_hard:].tolist()
            real = [i for i in drawn if i >= 0]
            assert drawn == real + [-1] * (len(drawn) - len(real)), "-1 only in the tail"
            eligible = {
                c for c in range(pool)
                if c not in positives[row].tolist() and (max_score is None or s[row, c] <= max_score)
            }
            assert len(set(real)) == len(real) and set(real) <= eligible - set(hard)
            assert len(real) == min(n_random, len(eligible - set(hard))), "a short pool still yields all it can"


def test_seeded_and_reproducible():
    queries, pool_emb = torch.randn(6, 8), torch.randn(500, 8)
    positives = torch.arange(6)
    a = mine_hard_negatives(queries, pool_emb, positives, n_hard=5, n_random=20, seed=3)
    b = mine_hard_negatives(queries, pool_emb, positives, n_hard=5, n_random=20, seed=3)
    c = mine_hard_negatives(queries, pool_emb, positives, n_hard=5, n_random=20, seed=4)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], c[:, :5]) and not torch.equal(a[:, 5:], c[:, 5:])


def test_random_part_is_uniform():
    pool, picks, rows = 40, 8, 3000
    queries = torch.randn(1, 4).expand(rows, -1).contiguous()
    mined = mine_hard_negatives(queries, torch.randn(pool, 4), torch.zeros(rows, dtype=torch.int64), n_hard=0, n_random=picks)
    counts = torch.bincount(mined.flatten(), minlength=pool)
    assert counts[0] == 0, "the positive is never drawn"
    expected = rows * picks / (pool - 1)  # ~615 per eligible candidate
    # 5 standard deviations of a binomial count: fails only if the draw is biased.
    spread = 5 * (expected * (1 - picks / (pool - 1))) ** 0.5
    assert ((counts[1:] - expected).abs() < spread).all(), counts.tolist()


def test_matches_similarity_topk_with_positives_excluded():
    queries, pool_emb = torch.randn(5, 12), torch.randn(300, 12)
    positives = torch.tensor([[0, 1], [2, -1], [3, 4], [5, 6], [7, -1]])
    mined = mine_hard_negatives(queries, pool_emb, positives, n_hard=10, n_random=0)
    assert torch.equal(mined, similarity_topk(queries, pool_emb, 10, exclude=positives)[1])


def test_opcheck_and_compile():
    q, pool_emb = torch.randn(4, 8), torch.randn(60, 8)
    positives = torch.tensor([[1, -1], [2, 3], [0, 0], [59, -1]])
    op = torch.ops.elva.mine_hard_negatives_torch.default
    torch.library.opcheck(op, (q, pool_emb, positives, 3, 4, None, 0))
    torch.library.opcheck(op, (q, pool_emb, positives, 0, 5, torch.full((4,), 0.5), 9))
    compiled = torch.compile(lambda q, p: mine_hard_negatives(q, p, positives, n_hard=3, n_random=3), fullgraph=True)
    assert torch.equal(compiled(q, pool_emb), mine_hard_negatives(q, pool_emb, positives, n_hard=3, n_random=3))


@pytest.mark.parametrize("max_score", [None, 0.3])
def test_triton_matches_reference(max_score):
    """The Triton backend (interpreter) draws the same ids; seed 0, row 0, id 0 hashes to 0, the largest key."""
    backend_or_skip("mine_hard_negatives", "triton", "cpu", torch.float32)
    gen = torch.Generator().manual_seed(9)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for seed in range(3):
            rows, pool = ragged_size(gen, 1, 20), ragged_size(gen, 2, 600)
            q = random_rows(gen, rows, 64, ties=False).to(dtype)
            c = random_rows(gen, pool, 64, ties=False).to(dtype)
            positives = torch.randint(1, pool, (rows, 2), generator=gen) if pool > 1 else torch.zeros(rows, 1).long()
            args = dict(n_hard=ragged_size(gen, 0, 60), n_random=ragged_size(gen, 1, 60), max_score=max_score, seed=seed)
            expected = mine_hard_negatives(q, c, positives, backend="torch", **args)
            assert torch.equal(mine_hard_negatives(q, c, positives, backend="triton", **args), expected)

"""mine_hard_negatives on every registered backend and device: the hard part is similarity_topk; the random part
is eligible, fresh, seeded, uniform, and the same ids as the reference's."""
import pytest
import torch

from elva_kernels import mine_hard_negatives, similarity_topk
from tests.helpers import (
    backend_matrix, dtypes_of, host_ops_per_pool, random_rows, ragged_size, require_backend, runs_as,
)
from tests.ops import naive

OP = "mine_hard_negatives"


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_hard_part_is_topk_and_random_part_is_eligible(backend, device):
    require_backend(OP, backend, device)
    gen = torch.Generator().manual_seed(7)
    # Small pools (short ones often) keep the Triton interpreter quick; many splits are test_matches_reference's.
    for case in range(12):
        rows, pool, dim = ragged_size(gen, 1, 9), ragged_size(gen, 2, 60), ragged_size(gen, 2, 16)
        queries = random_rows(gen, rows, dim, ties=False)
        pool_emb = random_rows(gen, pool, dim, ties=True)
        positives = torch.randint(0, pool, (rows, 2), generator=gen)
        n_hard, n_random = 0 if case % 3 == 0 else ragged_size(gen, 1, 20), ragged_size(gen, 1, 20)
        max_score = 0.6 if case % 2 else None
        mined = mine_hard_negatives(queries.to(device), pool_emb.to(device), positives.to(device), n_hard=n_hard,
                                    n_random=n_random, max_score=max_score, seed=case, backend=backend).cpu()
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


def near_tie_rows(q, c, positives, n_hard, max_score, **_):
    """Rows with two eligible scores within twice fp32 rounding of each other at the n_hard-th place, or one that
    close to max_score: there fp32 sums in another order may decide differently from the reference."""
    rows, pool = q.shape[0], c.shape[0]
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
    return unsure


@pytest.mark.parametrize("backend,device", backend_matrix(OP))
def test_matches_reference(backend, device):
    """The reference's ids for every dtype, with and without max_score, over several splits. Under the Triton
    interpreter on every row; elsewhere (the C++ backend's canonical scores, a GPU's), large and ragged, on every
    row without a near-tie. Seed 0 is in the draw: its row 0, id 0 hashes to 0, the largest key (which is also the
    "no bound" key)."""
    runs = runs_as(backend, device)
    rows_max, pool_max, cases = {"interpreter": (20, 300, 2), "cpu": (100, 5000, 6), "gpu": (200, 20000, 6)}[runs]
    gen = torch.Generator().manual_seed(9)
    checked = 0
    for dtype in dtypes_of(OP, backend):
        require_backend(OP, backend, device, dtype)
        for case in range(cases):
            rows, pool = ragged_size(gen, 1, rows_max), ragged_size(gen, 2, pool_max)
            q = random_rows(gen, rows, 64, ties=False).to(dtype)
            c = random_rows(gen, pool, 64, ties=False).to(dtype)
            positives = torch.randint(1, pool, (rows, 2), generator=gen)  # id 0 stays eligible
            max_score = 0.3 if case % 2 else None
            n_hard, n_random = ragged_size(gen, 0, 60), ragged_size(gen, 1, 60)
            args = dict(n_hard=n_hard, n_random=n_random, max_score=max_score, seed=case)
            ours = mine_hard_negatives(q.to(device), c.to(device), positives.to(device), backend=backend, **args).cpu()
            expected = mine_hard_negatives(q, c, positives, backend="torch", **args)
            sure = ~near_tie_rows(q, c, positives, **args) if runs != "interpreter" else torch.ones(rows, dtype=torch.bool)
            assert torch.equal(ours[sure], expected[sure]), f"{dtype} case {case}"
            checked += int(sure.sum())
    assert checked > 0


@pytest.mark.parametrize("backend,device", [p for p in backend_matrix(OP, reference=True) if p.values[1] == "cuda"])
def test_cuda_tensors_give_the_cpu_result(backend, device):
    """A fixed case on CUDA tensors gives exactly the CPU reference's ids, every row."""
    require_backend(OP, backend, device)
    q = torch.randn(16, 64, generator=torch.Generator().manual_seed(80))
    c = torch.randn(3000, 64, generator=torch.Generator().manual_seed(3064))
    positives = torch.arange(16)
    args = dict(n_hard=10, n_random=10, seed=1)
    mined = mine_hard_negatives(q.to(device), c.to(device), positives.to(device), backend=backend, **args)
    assert torch.equal(mined.cpu(), mine_hard_negatives(q, c, positives, backend="torch", **args))


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_seeded_and_reproducible(backend, device):
    require_backend(OP, backend, device)
    queries, pool_emb = torch.randn(6, 8, device=device), torch.randn(100, 8, device=device)
    positives = torch.arange(6, device=device)

    def mine(seed):
        return mine_hard_negatives(queries, pool_emb, positives, n_hard=5, n_random=10, seed=seed, backend=backend)

    a, b, c = mine(3), mine(3), mine(4)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], c[:, :5]) and not torch.equal(a[:, 5:], c[:, 5:])


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_random_part_is_uniform(backend, device):
    require_backend(OP, backend, device)
    pool, picks, rows = 40, 16, 1500
    queries = torch.randn(1, 4, device=device).expand(rows, -1).contiguous()
    positives = torch.zeros(rows, dtype=torch.int64, device=device)
    mined = mine_hard_negatives(queries, torch.randn(pool, 4, device=device), positives, n_hard=0, n_random=picks,
                                backend=backend)
    counts = torch.bincount(mined.flatten().cpu(), minlength=pool)
    assert counts[0] == 0, "the positive is never drawn"
    expected = rows * picks / (pool - 1)  # ~615 per eligible candidate
    # 5 standard deviations of a binomial count: fails only if the draw is biased.
    spread = 5 * (expected * (1 - picks / (pool - 1))) ** 0.5
    assert ((counts[1:] - expected).abs() < spread).all(), counts.tolist()


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_matches_similarity_topk_with_positives_excluded(backend, device):
    require_backend(OP, backend, device)
    queries, pool_emb = torch.randn(5, 12, device=device), torch.randn(300, 12, device=device)
    positives = torch.tensor([[0, 1], [2, -1], [3, 4], [5, 6], [7, -1]], device=device)
    mined = mine_hard_negatives(queries, pool_emb, positives, n_hard=10, n_random=0, backend=backend)
    assert torch.equal(mined, similarity_topk(queries, pool_emb, 10, exclude=positives, backend=backend)[1])


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_opcheck_and_compile(backend, device):
    op = require_backend(OP, backend, device).handle
    q, pool_emb = torch.randn(4, 8, device=device), torch.randn(60, 8, device=device)
    positives = torch.tensor([[1, -1], [2, 3], [0, 0], [59, -1]], device=device)
    torch.library.opcheck(op, (q, pool_emb, positives, 3, 4, None, 0))
    torch.library.opcheck(op, (q, pool_emb, positives, 0, 5, torch.full((4,), 0.5, device=device), 9))

    def mine(q, p):
        return mine_hard_negatives(q, p, positives, n_hard=3, n_random=3, backend=backend)

    assert torch.equal(torch.compile(mine, fullgraph=True)(q, pool_emb), mine(q, pool_emb))


def test_cpu_op_called_directly_names_bad_arguments():
    """elva::mine_hard_negatives_cpu repeats the checks of the public function, naming each argument."""
    op = require_backend(OP, "cpu").handle
    q, pool_emb, positives = torch.randn(3, 8), torch.randn(50, 8), torch.tensor([[0], [1], [2]])
    with pytest.raises(ValueError, match="pool_emb must be \\[N, d\\] with query_emb's d"):
        op(q, torch.randn(50, 7), positives, 2, 2, None, 0)
    with pytest.raises(TypeError, match="pool_emb must have query_emb's dtype"):
        op(q, pool_emb.half(), positives, 2, 2, None, 0)
    with pytest.raises(ValueError, match="positives holds ids outside"):
        op(q, pool_emb, positives + 50, 2, 2, None, 0)
    with pytest.raises(ValueError, match="max_score must be a float32 \\[B\\] tensor with B = 3"):
        op(q, pool_emb, positives, 2, 2, torch.zeros(4), 0)
    with pytest.raises(ValueError, match="n_hard \\+ n_random must be >= 1"):
        op(q, pool_emb, positives, 0, 0, None, 0)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        op(q, pool_emb, positives, 1, 1, None, -1)


@pytest.mark.parametrize("backend,device", [p for p in backend_matrix(OP) if p.values[0] in ("triton", "cuda")])
def test_host_work_does_not_grow_with_the_pool(backend, device):
    """The torch ops around the kernels (scales, the split lists' merges, the draw's merge) are as many for N = 3000
    as for N = 24000 (both pools take the exact path; similarity_topk's test counts the threshold path's). The
    shared implementation is called directly: a mode sees no further than a registered op."""
    from elva_kernels import _retrieval

    require_backend(OP, backend, device)
    kernels = _retrieval._triton_kernels() if backend == "triton" else _retrieval._cuda_kernels()
    counts = host_ops_per_pool(lambda q, c, positives: _retrieval.mine_hard_negatives(kernels, q, c, positives, 5, 5,
                                                                                      None, 0), device)
    assert counts[0] == counts[1], counts

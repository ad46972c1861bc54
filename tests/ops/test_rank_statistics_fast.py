"""rank_statistics, C++/OpenMP CPU backend: against the reference over ragged random cases with ties, several
positives, exclusions and every dtype; duplicates of the positive; Recall@k agreement with similarity_topk's CPU
backend; errors; opcheck."""
import pytest
import torch

from elva_kernels import rank_statistics, similarity_topk
from tests.helpers import assert_close_verbose, backend_or_skip, check_backend_against_reference, random_rows, ragged_size
from tests.ops import naive

OP = "rank_statistics"


# Fast backends on CPU tensors: the C++/OpenMP kernels, and the Triton kernels under the interpreter.
# tests/ops/test_fast_backends_gpu.py runs the Triton and CUDA kernels on a GPU.
FAST = ["cpu", "triton"]
# The interpreter runs a few hundred times slower than the compiled kernels: fewer random cases.
CASES = {"cpu": 25, "triton": 8}


def fast_op(backend="cpu"):
    backend_or_skip(OP, backend, "cpu", torch.float32)
    return getattr(torch.ops.elva, f"{OP}_{backend}")


def random_positives(gen, rows, pool, *, width):
    positives = torch.randint(0, pool, (rows, width), generator=gen)
    positives[:, 1:][torch.rand(rows, width - 1, generator=gen) < 0.4] = -1  # ragged; column 0 always real
    return positives


def make_case(gen, dtype, metric="cosine", *, big=False, limits=None):
    """``limits``: the largest (B, N, d) to draw; ``big`` is (70, 3000, 200), the default (19, 300, 48)."""
    max_rows, max_pool, max_dim = limits or ((70, 3000, 200) if big else (19, 300, 48))
    rows = ragged_size(gen, 1, max_rows)
    pool = ragged_size(gen, 1, max_pool)
    dim = ragged_size(gen, 1, max_dim)
    candidates = random_rows(gen, pool, dim, ties=True)
    positives = random_positives(gen, rows, pool, width=ragged_size(gen, 1, 4))
    if pool > 2:  # exact duplicates of some positives, at other ids
        dup = torch.randint(0, pool, (rows,), generator=gen)
        candidates[dup] = candidates[positives[:, 0]]
    case = {
        "queries": random_rows(gen, rows, dim, ties=False).to(dtype),
        "candidates": candidates.to(dtype),
        "positives": positives,
        "metric": metric,
        "exclude": None,
    }
    if int(torch.randint(0, 2, (1,), generator=gen)):
        exclude = torch.randint(-1, pool, (rows, ragged_size(gen, 1, 6)), generator=gen)
        exclude[:, 0] = positives[:, 0]  # a listed positive stays a positive
        case["exclude"] = exclude
    return case


def run(case, backend):
    return rank_statistics(
        case["queries"], case["candidates"], case["positives"], metric=case["metric"], exclude=case["exclude"],
        backend=backend,
    )


def compare(actual, expected, case, dtype):
    """pos/max-neg scores within the fp32 error bound; ranks equal except for the reference's near-ties with the
    positive."""
    assert actual.rank.dtype == torch.int64 and actual.pos_score.dtype == torch.float32
    device = actual.rank.device
    tol = naive.score_tolerance(case["queries"], case["candidates"], case["metric"]).to(device)
    assert_close_verbose(actual.pos_score, expected.pos_score, atol=float(tol.max()), rtol=0, what="pos_score")
    finite = torch.isfinite(expected.max_neg_score)
    assert torch.equal(torch.isfinite(actual.max_neg_score), finite)
    assert_close_verbose(
        torch.where(finite, actual.max_neg_score, 0.0), torch.where(finite, expected.max_neg_score, 0.0),
        atol=float(tol.max()), rtol=0, what="max_neg_score",
    )
    # Negatives whose score is within 2 tol of the best positive's may fall on either side.
    s = naive.scores(case["queries"], case["candidates"], case["metric"]).float().to(device)
    negative = torch.ones_like(s, dtype=torch.bool)
    for ids in (case["positives"], case["exclude"]):
        if ids is not None:
            rows = torch.arange(s.shape[0], device=device)[:, None].expand_as(ids)
            negative[rows[ids >= 0], ids[ids >= 0]] = False
    near = ((s - expected.pos_score[:, None]).abs() < 2 * tol) & negative
    slack = near.sum(1)
    diff = (actual.rank - expected.rank).abs()
    assert bool((diff <= slack).all()), (
        f"ranks differ beyond near-ties: {actual.rank[diff > slack].tolist()} vs {expected.rank[diff > slack].tolist()}"
    )
    assert torch.equal(actual.rank[slack == 0], expected.rank[slack == 0])


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_matches_reference(backend, metric):
    fast_op(backend)
    check_backend_against_reference(
        OP, backend, lambda g, dt: make_case(g, dt, metric), run, compare, cases=CASES[backend]
    )


@pytest.mark.slow  # about 4 s under the interpreter; still run by default
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_triton_more_random_cases(metric):
    """Another seed for the interpreter, with more ragged shapes: B up to 70 (two query blocks of 64), N up to 700
    (several 128-row splits), d up to 96."""
    fast_op("triton")
    check_backend_against_reference(
        OP, "triton", lambda g, dt: make_case(g, dt, metric, limits=(70, 700, 96)), run, compare, cases=6, seed=37
    )


def test_cpu_matches_reference_several_blocks():
    fast_op("cpu")
    check_backend_against_reference(OP, "cpu", lambda g, dt: make_case(g, dt, big=True), run, compare, cases=5, seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", FAST)
def test_duplicates_of_the_positive(backend, dtype):
    op = fast_op(backend)
    base = torch.randn(6, 16)
    candidates = torch.cat([base, base, base]).to(dtype)  # ids i, i + 6, i + 12 hold the same vector
    q = base[:3].to(dtype)
    rank_first, pos_first, _ = op(q, candidates, torch.tensor([[0], [1], [2]]), "cosine", None)
    rank_mid, pos_mid, neg_mid = op(q, candidates, torch.tensor([[6], [7], [8]]), "cosine", None)
    rank_last, _, _ = op(q, candidates, torch.tensor([[12], [13], [14]]), "cosine", None)
    assert torch.equal(pos_first, pos_mid)
    assert torch.equal(neg_mid, pos_mid)  # the duplicates tie bitwise
    assert torch.equal(rank_mid, rank_first + 1) and torch.equal(rank_last, rank_first + 2)
    assert rank_first.tolist() == [1, 1, 1]
    # Several positives: the best is the smallest id among equals; excluding the duplicates removes them.
    rank, pos, _ = op(q, candidates, torch.tensor([[12, 6, -1], [7, 13, 1], [14, -1, -1]]), "dot", None)
    assert rank.tolist() == [2, 1, 3]
    rank, _, _ = op(q, candidates, torch.tensor([[12], [13], [14]]), "cosine", torch.tensor([[0, 6], [1, -1], [8, 2]]))
    assert rank.tolist() == [1, 2, 1]


@pytest.mark.parametrize("backend", FAST)
def test_all_equal_scores(backend):
    op = fast_op(backend)
    rank, pos, neg = op(torch.ones(3, 4), torch.ones(2000, 4), torch.tensor([[0], [999], [1999]]), "cosine", None)
    assert rank.tolist() == [1, 1000, 2000]
    assert torch.equal(pos, neg)


@pytest.mark.parametrize("backend", FAST)
def test_recall_equals_similarity_topk(backend):
    fast_op(backend)
    gen = torch.Generator().manual_seed(8)
    for metric in ("cosine", "dot"):
        for _ in range(12):
            rows, pool, dim = ragged_size(gen, 1, 40), ragged_size(gen, 2, 1500), ragged_size(gen, 1, 64)
            queries = random_rows(gen, rows, dim, ties=False)
            candidates = random_rows(gen, pool, dim, ties=True)
            positives = random_positives(gen, rows, pool, width=3)
            candidates[torch.randint(0, pool, (rows,), generator=gen)] = candidates[positives[:, 0]]
            ks = (1, 2, 5, 10, pool)
            stats = rank_statistics(queries, candidates, positives, metric=metric, ks=ks, backend=backend)
            _, top = similarity_topk(queries, candidates, pool, metric=metric, backend=backend)
            for row in range(rows):
                pos = {p for p in positives[row].tolist() if p >= 0}
                order = top[row].tolist()
                first = min(order.index(p) for p in pos)
                rank = sum(1 for c in order[:first] if c not in pos) + 1
                assert stats.rank[row].item() == rank
                assert stats.hits[row].tolist() == [rank <= k for k in ks]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("backend", FAST)
def test_non_finite_raises(backend, bad):
    op = fast_op(backend)
    q, c = torch.randn(4, 8), torch.randn(2000, 8)
    p = torch.tensor([[0], [1], [2], [3]])
    q_bad, c_bad = q.clone(), c.clone()
    q_bad[1, 3], c_bad[1500, 2] = bad, bad
    with pytest.raises(ValueError, match="queries must contain only finite values"):
        op(q_bad, c, p, "cosine", None)
    with pytest.raises(ValueError, match="candidates must contain only finite values"):
        op(q, c_bad, p, "dot", None)
    with pytest.raises(ValueError, match="candidates must contain only finite values"):
        op(q, c_bad, torch.tensor([[1500]] * 4), "dot", None)  # the positive itself
    with pytest.raises(ValueError, match="candidates must contain only finite values"):
        rank_statistics(q.half(), c_bad.half(), p, backend=backend)
    with pytest.raises(ValueError, match="candidates must contain only finite values"):
        op(q.bfloat16(), c_bad.bfloat16(), p, "cosine", None)


@pytest.mark.parametrize("backend", FAST)
def test_bad_arguments_raise(backend):
    op = fast_op(backend)
    q, c = torch.randn(4, 8), torch.randn(30, 8)
    p = torch.tensor([[0], [1], [2], [3]])
    with pytest.raises(ValueError, match="positives must list at least one candidate id per query; row 2 has none"):
        op(q, c, torch.tensor([[0], [1], [-1], [3]]), "cosine", None)
    with pytest.raises(ValueError, match="positives must list at least one"):
        rank_statistics(q, c, torch.tensor([0, 1, -1, 3]), backend=backend)
    with pytest.raises(ValueError, match="positives holds ids outside"):
        op(q, c, torch.tensor([[0], [30], [2], [3]]), "cosine", None)
    with pytest.raises(ValueError, match="positives"):
        op(q, c, torch.tensor([[0], [-2], [2], [3]]), "cosine", None)
    with pytest.raises(ValueError, match="exclude holds ids outside"):
        op(q, c, p, "cosine", torch.tensor([[0, 30]] * 4))
    with pytest.raises(ValueError, match="exclude"):
        rank_statistics(q, c, p, exclude=torch.tensor([[0, 30]] * 4), backend=backend)
    with pytest.raises(ValueError, match="metric"):
        op(q, c, p, "l2", None)
    with pytest.raises(ValueError, match="candidates"):
        op(q, torch.randn(30, 9), p, "cosine", None)
    with pytest.raises(TypeError, match="candidates"):
        op(q, c.half(), p, "cosine", None)
    with pytest.raises(TypeError, match="queries"):
        op(q.double(), c.double(), p, "cosine", None)
    with pytest.raises(TypeError, match="positives"):
        op(q, c, p.int(), "cosine", None)


@pytest.mark.parametrize("backend", FAST)
def test_strided_inputs(backend):
    op = fast_op(backend)
    q, c = torch.randn(6, 20), torch.randn(100, 40)
    p = torch.randint(0, 100, (6, 2))
    expected = op(q, c[:, ::2].contiguous(), p, "cosine", None)
    actual = op(q, c[:, ::2], p, "cosine", None)
    assert all(torch.equal(a, b) for a, b in zip(actual, expected))
    expected = op(q[:, :10].contiguous(), c[:, :10].contiguous(), p, "dot", None)
    actual = op(q[:, :10], c[:, :10], p, "dot", None)
    assert all(torch.equal(a, b) for a, b in zip(actual, expected))


@pytest.mark.parametrize("backend", FAST)
def test_opcheck(backend):
    fast_op(backend)
    q, c = torch.randn(4, 8), torch.randn(30, 8)
    positives = torch.tensor([[1, -1], [2, 3], [0, 0], [29, -1]])
    op = torch.ops.elva.rank_statistics_cpu.default
    torch.library.opcheck(op, (q, c, positives, "cosine", None))
    torch.library.opcheck(op, (q, c, positives, "dot", torch.tensor([[5, -1]] * 4)))
    torch.library.opcheck(op, (q.half(), c.half(), positives, "cosine", None))
    torch.library.opcheck(op, (q.bfloat16(), c.bfloat16(), positives, "dot", None))


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_cpu_positives_near_the_top(metric):
    """Trained-like data (each query close to its positive): few near-ties, so the bf16 screening (where the CPU has
    it) serves the whole pass; results must still match the reference and similarity_topk's CPU backend."""
    fast_op("cpu")
    gen = torch.Generator().manual_seed(21)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        candidates = torch.randn(4000, 96, generator=gen)
        positives = torch.randint(0, 4000, (45, 2), generator=gen)
        queries = candidates[positives[:, 0]] + 0.3 * torch.randn(45, 96, generator=gen)
        candidates[positives[:5, 1] + 0] = candidates[positives[:5, 0]]  # duplicates listed as positives too
        case = {"queries": queries.to(dtype), "candidates": candidates.to(dtype), "positives": positives,
                "metric": metric, "exclude": positives[:, :1].flip(0)}
        compare(run(case, "cpu"), run(case, "torch"), case, dtype)
        stats = run(case, "cpu")
        _, top = similarity_topk(case["queries"], case["candidates"], 50, metric=metric, exclude=None, backend="cpu")
        for row in range(45):
            pos = {p for p in positives[row].tolist() if p >= 0}
            order = top[row].tolist()
            if any(p in order for p in pos):
                first = min(order.index(p) for p in pos if p in order)
                excluded = {case["exclude"][row, 0].item()} - pos
                assert stats.rank[row].item() == sum(1 for c in order[:first] if c not in pos | excluded) + 1

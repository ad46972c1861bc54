"""rank_statistics on every backend the registry lists, on every device it runs on.

The torch reference against a materialised count and against ranx's MRR and hit rate. Every backend (and the
reference on CUDA) against the reference on CPU tensors, over ragged random cases with ties, duplicates of the
positive, several positives, positives listed in ``exclude``, both metrics and every dtype; Recall@k and rank
against the same backend's similarity_topk (on a GPU also with B * N above 2**31); duplicates and all-equal scores
ranked by id; one-dimensional positives with no negative left; trained-like data; non-finite inputs and bad
arguments raising; strided inputs; opcheck and torch.compile. Case sizes follow where a backend runs: the Triton
interpreter gets small ones, a GPU its large ones.
"""
import collections

import pytest
import torch

from elva_kernels import _retrieval, rank_statistics, similarity_topk
from tests.helpers import (
    assert_close_verbose, backend_matrix, dtypes_of, on_device, ragged_size, random_rows, require_backend,
    host_ops_per_pool, runs_as,
)
from tests.ops import naive

OP = "rank_statistics"
METRICS = ["cosine", "dot"]



def on_cpu(stats):
    return type(stats)(*(x.cpu() for x in stats))


def id_tensor(rows, device):
    return torch.tensor(rows, dtype=torch.int64, device=device)


def random_positives(gen, rows, pool, *, width):
    positives = torch.randint(0, pool, (rows, width), generator=gen)
    positives[:, 1:][torch.rand(rows, width - 1, generator=gen) < 0.4] = -1  # ragged; column 0 always real
    return positives


def make_case(gen, dtype, metric="cosine", *, big=False, limits=None):
    """CPU inputs of one random case. ``limits``: the largest (B, N, d) to draw; ``big`` is (70, 3000, 200), the
    default (19, 300, 48)."""
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


def materialised_rank(queries, candidates, positives, metric="cosine", exclude=None):
    """(rank, pos_score, max_neg_score) counted over the full score matrix, one candidate at a time."""
    s = naive.scores(queries, candidates, metric)
    ranks, pos_scores, max_negs = [], [], []
    for row in range(s.shape[0]):
        pos = sorted({p for p in positives[row].tolist() if p >= 0})
        excluded = set() if exclude is None else {e for e in exclude[row].tolist() if e >= 0}
        best = max(pos, key=lambda p: (s[row, p].item(), -p))
        negatives = [c for c in range(s.shape[1]) if c not in pos and c not in excluded]
        ahead = sum(1 for c in negatives if (s[row, c] > s[row, best]) or (s[row, c] == s[row, best] and c < best))
        ranks.append(ahead + 1)
        pos_scores.append(s[row, best].item())
        max_negs.append(max((s[row, c].item() for c in negatives), default=float("-inf")))
    return torch.tensor(ranks), torch.tensor(pos_scores), torch.tensor(max_negs)


@pytest.mark.parametrize("dtype", dtypes_of(OP, "torch"), ids=lambda dtype: str(dtype).removeprefix("torch."))
def test_reference_matches_materialised_count(dtype):
    gen = torch.Generator().manual_seed(4)
    for case in range(30):
        rows, pool, dim = ragged_size(gen, 1, 12), ragged_size(gen, 1, 120), ragged_size(gen, 1, 24)
        queries = random_rows(gen, rows, dim, ties=False).to(dtype)
        candidates = random_rows(gen, pool, dim, ties=True).to(dtype)
        positives = random_positives(gen, rows, pool, width=ragged_size(gen, 1, 4))
        exclude = torch.randint(-1, pool, (rows, 3), generator=gen) if case % 2 else None
        metric = "dot" if case % 3 == 0 else "cosine"
        stats = rank_statistics(queries, candidates, positives, metric=metric, exclude=exclude, backend="torch")
        rank, pos_score, max_neg = materialised_rank(queries, candidates, positives, metric, exclude)
        assert torch.equal(stats.rank, rank)
        assert torch.equal(stats.pos_score, pos_score)
        assert torch.equal(stats.max_neg_score, max_neg)
        assert torch.equal(stats.margin, pos_score - max_neg)
        assert torch.equal(stats.reciprocal_rank, 1.0 / rank.float())


def test_matches_ranx_mrr_and_hit_rate():
    # ranx compiles its numba kernels on first use (seconds, whatever the size): a small pool proves as much.
    from ranx import Qrels, Run, evaluate

    gen = torch.Generator().manual_seed(5)
    queries, candidates = torch.randn(16, 8, generator=gen), torch.randn(40, 8, generator=gen)
    positives = random_positives(gen, 16, 40, width=3)
    stats = rank_statistics(queries, candidates, positives, ks=(1, 5, 10), backend="torch")
    s = naive.scores(queries, candidates)
    qrels = Qrels({f"q{i}": {f"d{p}": 1 for p in row if p >= 0} for i, row in enumerate(positives.tolist())})
    run = Run({f"q{i}": {f"d{j}": float(v) for j, v in enumerate(row)} for i, row in enumerate(s.tolist())})
    expected = evaluate(qrels, run, ["mrr", "hit_rate@1", "hit_rate@5", "hit_rate@10"])
    assert stats.reciprocal_rank.mean().item() == pytest.approx(expected["mrr"], abs=1e-6)
    for column, k in enumerate((1, 5, 10)):
        assert stats.hits[:, column].float().mean().item() == pytest.approx(expected[f"hit_rate@{k}"], abs=1e-9)


# (make_case keywords, cases per dtype, seed): the default sizes, then larger ones. The interpreter's larger set has
# B up to 70 (two query blocks of 64), N up to 700 (several 128-row splits) and d up to 96 (two 64-wide steps); the
# CPU's spans several of its 264-candidate blocks.
REFERENCE_CASE_SETS = {
    "cpu": [({}, 25, 0), ({"big": True}, 5, 3)],
    "interpreter": [({}, 6, 0), ({"limits": (70, 700, 96)}, 5, 37)],
    "gpu": [({}, 12, 0), ({"big": True}, 6, 0)],
}


# The torch reference on CPU is what the others are compared with; on CUDA it must give the CPU's result too.
@pytest.mark.parametrize(
    "backend,device", [p for p in backend_matrix(OP, reference=True) if p.values != ("torch", "cpu")]
)
@pytest.mark.parametrize("metric", METRICS)
def test_matches_reference(backend, device, metric):
    for make_args, cases, seed in REFERENCE_CASE_SETS[runs_as(backend, device)]:
        for dtype in dtypes_of(OP, backend):
            require_backend(OP, backend, device, dtype)
            gen = torch.Generator().manual_seed(seed)
            for _ in range(cases):
                case = make_case(gen, dtype, metric, **make_args)
                compare(on_cpu(run(on_device(case, device), backend)), run(case, "torch"), case, dtype)


def assert_ranks_match_topk(stats, top, positives, ks):
    """rank = 1 + the non-positives ahead of the first positive in the top list, and hits = rank <= k."""
    for row, order in enumerate(top.tolist()):
        pos = {p for p in positives[row].tolist() if p >= 0}
        first = min(order.index(p) for p in pos)
        rank = sum(1 for c in order[:first] if c not in pos) + 1
        assert stats.rank[row].item() == rank
        assert stats.hits[row].tolist() == [rank <= k for k in ks]


# (cases per metric, largest (B, N, d)). similarity_topk with k = N makes the interpreter pay for every 128-long list
# merge, so it draws fewer, smaller pools (still up to four splits).
RECALL_CASES = {"cpu": (12, (40, 1500, 64)), "interpreter": (4, (40, 400, 16)), "gpu": (12, (40, 1500, 64))}


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_recall_equals_similarity_topk(backend, device):
    """Under ties and duplicates of the positive, Recall@k is top-k membership in the same backend's similarity_topk
    (the dtypes take turns over the cases). On a GPU also with B * N above 2**31 bf16 scores."""
    dtypes = dtypes_of(OP, backend)
    for dtype in dtypes:
        require_backend(OP, backend, device, dtype)
        require_backend("similarity_topk", backend, device, dtype)
    cases, (max_rows, max_pool, max_dim) = RECALL_CASES[runs_as(backend, device)]
    gen = torch.Generator().manual_seed(8)
    for metric in METRICS:
        for case in range(cases):
            rows, pool, dim = ragged_size(gen, 1, max_rows), ragged_size(gen, 2, max_pool), ragged_size(gen, 1, max_dim)
            queries = random_rows(gen, rows, dim, ties=False)
            candidates = random_rows(gen, pool, dim, ties=True)
            positives = random_positives(gen, rows, pool, width=3)
            candidates[torch.randint(0, pool, (rows,), generator=gen)] = candidates[positives[:, 0]]
            dtype = dtypes[case % len(dtypes)]
            queries, candidates = queries.to(dtype).to(device), candidates.to(dtype).to(device)
            ks = (1, 2, 5, 10, pool)
            stats = rank_statistics(queries, candidates, positives.to(device), metric=metric, ks=ks, backend=backend)
            _, top = similarity_topk(queries, candidates, pool, metric=metric, backend=backend)
            assert_ranks_match_topk(on_cpu(stats), top.cpu(), positives, ks)
    if device == "cuda":
        # ids and offsets stay 64-bit: the first and the 100th of similarity_topk rank 1 and 100.
        gen = torch.Generator("cuda").manual_seed(3)
        q = torch.randn(1536, 64, device="cuda", generator=gen).bfloat16()
        c = torch.randn(1_500_000, 64, device="cuda", generator=gen).bfloat16()
        c[-1] = q[5] * 2  # the best match of query 5 is the last candidate
        _, top = similarity_topk(q, c, 100, metric="dot", backend=backend)
        assert top[5, 0].item() == c.shape[0] - 1
        for place in (0, 99):
            stats = rank_statistics(q, c, top[:, place], metric="dot", backend=backend)
            assert bool((stats.rank == place + 1).all())


# (queries, distinct rows, d) of a pool holding each row twice and a third of them three times.
COPIES = {"cpu": (70, 600, 48), "interpreter": (70, 300, 16), "gpu": (300, 3000, 128)}


@pytest.mark.parametrize("backend,device", backend_matrix(OP))
def test_duplicates_of_the_positive(backend, device):
    """Exact copies score bitwise-equal, so among them the smaller id comes first."""
    op = require_backend(OP, backend, device).handle
    base = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    num_queries, distinct, dim = COPIES[runs_as(backend, device)]
    gen = torch.Generator().manual_seed(5)
    pool = random_rows(gen, distinct, dim, ties=False)
    pool_queries = random_rows(gen, num_queries, dim, ties=False)

    def ids(rows):
        return id_tensor(rows, device)

    for dtype in dtypes_of(OP, backend):
        require_backend(OP, backend, device, dtype)
        candidates = torch.cat([base, base, base]).to(dtype).to(device)  # ids i, i + 6, i + 12 hold the same vector
        q = base[:3].to(dtype).to(device)
        rank_first, pos_first, _ = op(q, candidates, ids([[0], [1], [2]]), "cosine", None)
        rank_mid, pos_mid, neg_mid = op(q, candidates, ids([[6], [7], [8]]), "cosine", None)
        rank_last, _, _ = op(q, candidates, ids([[12], [13], [14]]), "cosine", None)
        assert torch.equal(pos_first, pos_mid)
        assert torch.equal(neg_mid, pos_mid)  # the duplicates tie bitwise
        assert torch.equal(rank_mid, rank_first + 1) and torch.equal(rank_last, rank_first + 2)
        assert rank_first.tolist() == [1, 1, 1]
        # Several positives: the best is the smallest id among equals; excluding the duplicates removes them.
        rank, _, _ = op(q, candidates, ids([[12, 6, -1], [7, 13, 1], [14, -1, -1]]), "dot", None)
        assert rank.tolist() == [2, 1, 3]
        rank, _, _ = op(q, candidates, ids([[12], [13], [14]]), "cosine", ids([[0, 6], [1, -1], [8, 2]]))
        assert rank.tolist() == [1, 2, 1]
        # Over several candidate blocks (or splits) and two query blocks: the middle copy ranks right after the first.
        copies = torch.cat([pool, pool, pool[: distinct // 3]]).to(dtype).to(device)
        queries = pool_queries.to(dtype).to(device)
        first = rank_statistics(queries, copies, torch.arange(num_queries, device=device), backend=backend)
        middle = rank_statistics(queries, copies, torch.arange(num_queries, device=device) + distinct, backend=backend)
        assert torch.equal(middle.rank, first.rank + 1)
        assert torch.equal(middle.pos_score, first.pos_score)


@pytest.mark.parametrize("backend,device", backend_matrix(OP))
@pytest.mark.parametrize("metric", METRICS)
def test_long_pools_over_several_splits(backend, device, metric, monkeypatch):
    """A few queries over 2000 candidates cut into several splits: most candidate tiles hold no listed id of any
    row (the GPU kernels' short epilogue), copies of each positive sit in such tiles before and after it (ties
    rank by id), one copy is excluded and the last tile is ragged."""
    monkeypatch.setattr(_retrieval, "multiprocessor_count", lambda device: 7)  # splits in the interpreter too
    require_backend(OP, backend, device)
    gen = torch.Generator().manual_seed(11)
    candidates = random_rows(gen, 2000, 16, ties=True)
    positives = torch.tensor([[1000, -1], [50, 1900], [1999, -1]])
    for positive, copies in ((1000, [3, 700, 1500]), (50, [400, 1800]), (1999, [10, 1200])):
        candidates[copies] = candidates[positive].clone()
    exclude = torch.tensor([[700, -1], [-1, -1], [1200, 5]])
    for dtype in dtypes_of(OP, backend):
        require_backend(OP, backend, device, dtype)
        case = {"queries": random_rows(gen, 3, 16, ties=False).to(dtype), "candidates": candidates.to(dtype),
                "positives": positives, "metric": metric, "exclude": exclude}
        actual, expected = on_cpu(run(on_device(case, device), backend)), run(case, "torch")
        compare(actual, expected, case, dtype)
        assert torch.equal(actual.rank, expected.rank)


def test_splits_fill_whole_waves():
    """The counting grid (row tiles x splits) of the headline sizes keeps an H100's 132 SMs busy to the last wave."""
    for row_tiles in (8, 32):  # B = 1024 and 4096 in 128-query tiles; N = 1M in 128-candidate tiles
        per_split = _retrieval.split_tiles(row_tiles, 7813, 132)
        programs = row_tiles * -(-7813 // per_split)
        assert programs >= 132 and row_tiles * 7813 / (-(-programs // 132) * 132 * per_split) > 0.96
    assert _retrieval.split_tiles(3, 1, 132) == 1


@pytest.mark.parametrize("backend,device", [p for p in backend_matrix(OP) if p.values[0] in ("triton", "cuda")])
def test_host_work_does_not_grow_with_the_pool(backend, device):
    """The torch ops around the counting kernel (scales, the positives' keys, the partials' sums) are as many for
    N = 3000 as for N = 24000. The shared implementation is called directly: a mode sees no further than a
    registered op."""
    require_backend(OP, backend, device)
    kernels = _retrieval._triton_kernels() if backend == "triton" else _retrieval._cuda_kernels()
    counts = host_ops_per_pool(lambda q, c, positives: _retrieval.rank_statistics(kernels, q, c, positives, "cosine",
                                                                                  None), device)
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("backend,device", backend_matrix(OP))
def test_all_equal_scores(backend, device):
    op = require_backend(OP, backend, device).handle
    positives = torch.tensor([[0], [999], [1999]], device=device)
    rank, pos, neg = op(torch.ones(3, 4, device=device), torch.ones(2000, 4, device=device), positives, "cosine", None)
    assert rank.tolist() == [1, 1000, 2000]
    assert torch.equal(pos, neg)


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_one_dimensional_positives_and_no_negatives(backend, device):
    """[B] positives; every other candidate excluded (row 0 lists its positive too, which stays a positive)."""
    require_backend(OP, backend, device)
    q, c = torch.randn(2, 4, device=device), torch.randn(3, 4, device=device)
    exclude = torch.tensor([[1, 2, 0], [0, 1, -1]], device=device)
    stats = rank_statistics(q, c, torch.tensor([0, 2], device=device), exclude=exclude, backend=backend)
    assert stats.rank.tolist() == [1, 1]
    assert torch.isinf(stats.max_neg_score).all() and torch.isinf(stats.margin).all()


# (queries, candidates, d): the CPU's size lets its bf16 screening (where it has one) serve many blocks.
NEAR_THE_TOP = {"cpu": (45, 4000, 96), "interpreter": (45, 600, 32), "gpu": (45, 4000, 96)}
# The positives are near the top: a top-16 list (similarity_topk's short list) holds as many as a top-50 one.
NEAR_THE_TOP_K = 16


@pytest.mark.parametrize("backend,device", backend_matrix(OP))
@pytest.mark.parametrize("metric", METRICS)
def test_positives_near_the_top(backend, device, metric):
    """Trained-like data (each query close to its positive): few near-ties, so a CPU's bf16 screening serves the
    whole pass; results must still match the reference and the same backend's similarity_topk."""
    num_queries, num_candidates, dim = NEAR_THE_TOP[runs_as(backend, device)]
    gen = torch.Generator().manual_seed(21)
    for dtype in dtypes_of(OP, backend):
        require_backend(OP, backend, device, dtype)
        candidates = torch.randn(num_candidates, dim, generator=gen)
        positives = torch.randint(0, num_candidates, (num_queries, 2), generator=gen)
        queries = candidates[positives[:, 0]] + 0.3 * torch.randn(num_queries, dim, generator=gen)
        candidates[positives[:5, 1]] = candidates[positives[:5, 0]]  # duplicates listed as positives too
        case = {"queries": queries.to(dtype), "candidates": candidates.to(dtype), "positives": positives,
                "metric": metric, "exclude": positives[:, :1].flip(0)}
        stats = on_cpu(run(on_device(case, device), backend))
        compare(stats, run(case, "torch"), case, dtype)
        _, top = similarity_topk(case["queries"].to(device), case["candidates"].to(device), NEAR_THE_TOP_K,
                                 metric=metric, backend=backend)
        for row, order in enumerate(top.tolist()):
            pos = {p for p in positives[row].tolist() if p >= 0}
            if any(p in order for p in pos):
                first = min(order.index(p) for p in pos if p in order)
                excluded = {case["exclude"][row, 0].item()} - pos
                assert stats.rank[row].item() == sum(1 for c in order[:first] if c not in pos | excluded) + 1


@pytest.mark.parametrize("backend,device", backend_matrix(OP))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_raises(backend, device, bad):
    # The bad candidate sits past the first block of every backend (264 candidates on the CPU, 128-row splits).
    op = require_backend(OP, backend, device).handle
    q, c = torch.randn(4, 8, device=device), torch.randn(400, 8, device=device)
    p = torch.tensor([[0], [1], [2], [3]], device=device)
    q_bad, c_bad = q.clone(), c.clone()
    q_bad[1, 3], c_bad[300, 2] = bad, bad
    for dtype in dtypes_of(OP, backend):
        require_backend(OP, backend, device, dtype)
        with pytest.raises(ValueError, match="queries must contain only finite values"):
            op(q_bad.to(dtype), c.to(dtype), p, "cosine", None)
        with pytest.raises(ValueError, match="candidates must contain only finite values"):
            op(q.to(dtype), c_bad.to(dtype), p, "dot", None)
        with pytest.raises(ValueError, match="candidates must contain only finite values"):
            op(q.to(dtype), c_bad.to(dtype), torch.full((4, 1), 300, device=device), "dot", None)  # it is the positive
        with pytest.raises(ValueError, match="candidates must contain only finite values"):
            rank_statistics(q.to(dtype), c_bad.to(dtype), p, backend=backend)


@pytest.mark.parametrize("backend,device", backend_matrix(OP))
def test_bad_arguments_raise(backend, device):
    op = require_backend(OP, backend, device).handle
    q, c = torch.randn(4, 8, device=device), torch.randn(30, 8, device=device)

    def ids(rows):
        return id_tensor(rows, device)

    p = ids([[0], [1], [2], [3]])
    with pytest.raises(ValueError, match="positives must list at least one candidate id per query; row 2 has none"):
        op(q, c, ids([[0], [1], [-1], [3]]), "cosine", None)
    with pytest.raises(ValueError, match="positives must list at least one"):
        rank_statistics(q, c, ids([0, 1, -1, 3]), backend=backend)
    with pytest.raises(ValueError, match="positives holds ids outside"):
        op(q, c, ids([[0], [30], [2], [3]]), "cosine", None)
    with pytest.raises(ValueError, match="positives"):
        op(q, c, ids([[0], [-2], [2], [3]]), "cosine", None)
    with pytest.raises(ValueError, match="exclude holds ids outside"):
        op(q, c, p, "cosine", ids([[0, 30]] * 4))
    with pytest.raises(ValueError, match="exclude"):
        rank_statistics(q, c, p, exclude=ids([[0, 30]] * 4), backend=backend)
    with pytest.raises(ValueError, match="metric"):
        op(q, c, p, "l2", None)
    with pytest.raises(ValueError, match="candidates"):
        op(q, torch.randn(30, 9, device=device), p, "cosine", None)
    with pytest.raises(TypeError, match="candidates"):
        op(q, c.half(), p, "cosine", None)
    with pytest.raises(TypeError, match="queries"):
        op(q.double(), c.double(), p, "cosine", None)
    with pytest.raises(TypeError, match="positives"):
        op(q, c, p.int(), "cosine", None)


@pytest.mark.parametrize("backend,device", backend_matrix(OP))
def test_strided_inputs(backend, device):
    op = require_backend(OP, backend, device).handle
    q, c = torch.randn(6, 20, device=device), torch.randn(100, 40, device=device)
    p = torch.randint(0, 100, (6, 2), device=device)
    expected = op(q, c[:, ::2].contiguous(), p, "cosine", None)
    actual = op(q, c[:, ::2], p, "cosine", None)
    assert all(torch.equal(a, b) for a, b in zip(actual, expected))
    expected = op(q[:, :10].contiguous(), c[:, :10].contiguous(), p, "dot", None)
    actual = op(q[:, :10], c[:, :10], p, "dot", None)
    assert all(torch.equal(a, b) for a, b in zip(actual, expected))


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_opcheck_and_compile(backend, device):
    op = require_backend(OP, backend, device).handle
    q, c = torch.randn(4, 8, device=device), torch.randn(30, 8, device=device)
    positives = torch.tensor([[1, -1], [2, 3], [0, 0], [29, -1]], device=device)
    exclude = torch.tensor([[5, -1]] * 4, device=device)
    for dtype in dtypes_of(OP, backend):
        require_backend(OP, backend, device, dtype)
        torch.library.opcheck(op, (q.to(dtype), c.to(dtype), positives, "cosine", None))
        torch.library.opcheck(op, (q.to(dtype), c.to(dtype), positives, "dot", exclude))
    # The Python dispatch in front of the op, by name or auto, must not break the graph.
    for choice in (backend, "auto"):
        def ranks(q, c, choice=choice):
            return rank_statistics(q, c, positives, backend=choice).rank

        assert torch.equal(torch.compile(ranks, fullgraph=True)(q, c), ranks(q, c))


# ---- the CUDA backend's chunked pass (cuBLAS chunks, then a count kernel), on its CPU twins ---------------------


@pytest.fixture
def chunked(monkeypatch):
    """``run`` for the CUDA backend's design on the CPU: its drivers with the CPU twins of its kernels
    (``pair_scores_cpu``, ``rank_counts_cpu``), in chunks of one count run's 512 candidates, so that small pools
    span several, end in a short one, and most runs take the count's short rule (no listed id in the run)."""
    from elva_kernels.ops.rank_statistics import check_arguments

    monkeypatch.setattr(_retrieval, "chunk_columns", lambda queries: 512)
    kernels = _retrieval.chunked_kernels(None, "cpu")

    def run_chunked(case):
        q, c = case["queries"], case["candidates"]
        positives, exclude, _ = check_arguments(q, c, case["positives"], case["metric"], case["exclude"])
        rank, pos_score, max_neg_score = _retrieval.rank_statistics(kernels, q, c, positives, case["metric"], exclude)
        return Ranks(rank, pos_score, max_neg_score)

    return run_chunked


Ranks = collections.namedtuple("Ranks", "rank pos_score max_neg_score")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_chunked_pass_matches_reference(chunked, dtype, metric):
    for make_args, cases, seed in REFERENCE_CASE_SETS["cpu"]:
        gen = torch.Generator().manual_seed(seed + 100)
        for _ in range(cases):
            case = make_case(gen, dtype, metric, **make_args)
            compare(chunked(case), run(case, "torch"), case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_chunked_pass_ties_copies_by_id_across_chunks(chunked, dtype):
    """Copies of the positive before it, after it, in other chunks and in the short last one rank by id (every GEMM
    has one shape, so a copy scores bitwise like the positive); an excluded copy does not count."""
    gen = torch.Generator().manual_seed(11)
    candidates = random_rows(gen, 2000, 16, ties=True)
    positives = torch.tensor([[1000, -1], [50, 1900], [1999, -1]])
    for positive, copies in ((1000, [3, 700, 1500]), (50, [400, 1800, 1950]), (1999, [10, 1200])):
        candidates[copies] = candidates[positive].clone()
    exclude = torch.tensor([[700, -1], [-1, -1], [1200, 5]])
    case = {"queries": random_rows(gen, 3, 16, ties=False).to(dtype), "candidates": candidates.to(dtype),
            "positives": positives, "metric": "cosine", "exclude": exclude}
    actual, expected = chunked(case), run(case, "torch")
    compare(actual, expected, case, dtype)
    assert torch.equal(actual.rank, expected.rank)


def test_chunked_pass_all_equal_scores(chunked):
    case = {"queries": torch.ones(3, 4), "candidates": torch.ones(2000, 4),
            "positives": torch.tensor([[0], [999], [1999]]), "metric": "cosine", "exclude": None}
    actual = chunked(case)
    assert actual.rank.tolist() == [1, 1000, 2000]
    assert torch.equal(actual.pos_score, actual.max_neg_score)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_chunked_pass_non_finite_raises(chunked, bad):
    q, c = torch.randn(4, 8), torch.randn(700, 8)
    c[600, 2] = bad  # in the third chunk
    case = {"queries": q, "candidates": c, "positives": torch.tensor([[0], [1], [2], [3]]), "metric": "dot",
            "exclude": None}
    with pytest.raises(ValueError, match="candidates must contain only finite values"):
        chunked(case)


def test_chunked_pass_host_work_does_not_grow_with_the_pool(monkeypatch):
    monkeypatch.setattr(_retrieval, "chunk_columns", lambda queries: 512)
    kernels = _retrieval.chunked_kernels(None, "cpu")
    counts = host_ops_per_pool(lambda q, c, positives: _retrieval.rank_statistics(kernels, q, c, positives, "cosine",
                                                                                  None), "cpu")
    assert counts[0] == counts[1], counts


def test_chunked_kernels_refuse_bad_arguments_by_name():
    q, c = torch.randn(3, 8), torch.randn(50, 8)
    scales = torch.ones(3), torch.ones(50)
    listed = torch.full((3, 1), 2**31 - 1, dtype=torch.int32)
    positive = torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.int32)
    counts, pairs = torch.ops.elva.rank_counts_cpu.default, torch.ops.elva.pair_scores_cpu.default
    with pytest.raises(ValueError, match="chunk_columns"):
        counts(q, c, *scales, listed, *positive, 6)
    with pytest.raises(TypeError, match="listed must be int32"):
        counts(q, c, *scales, listed.long(), *positive, 256)
    with pytest.raises(TypeError, match="pos_id must be a int32"):
        counts(q, c, *scales, listed, *positive[:2], positive[2].long(), 256)
    with pytest.raises(ValueError, match="candidate_scale must be a float32 \\[N\\] tensor with N = 50"):
        counts(q, c, scales[0], torch.ones(49), listed, *positive, 256)
    with pytest.raises(TypeError, match="ids must be int64"):
        pairs(q, c, *scales, torch.zeros(3, 1, dtype=torch.int32), 256)
    with pytest.raises(TypeError, match="candidates must have the queries' dtype"):
        pairs(q, c.half(), *scales, torch.zeros(3, 1, dtype=torch.int64), 256)

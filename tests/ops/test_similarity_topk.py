"""similarity_topk on every backend the registry lists, on every device it runs on.

The torch reference against a materialised top-k (float64 scores) with ties, exclusions and max_score, over several
score tiles. Every backend (and the reference on CUDA) against the reference on CPU tensors, over ragged random cases
with ties, exclusions and max_score, both metrics and every dtype, and against faiss-cpu's exact search; large k (up to
4096, and k = N) with and without filters that leave fewer than k eligible (-1 / -inf tails); exact duplicates and
all-equal scores ordered by id; non-finite inputs and bad arguments raising; strided inputs; gradients through the
selected pairs; opcheck and torch.compile. The C++ backend's kernel variants (ISA, bf16 screening) agree bitwise. On a
GPU also B * N above 2**31. Case sizes follow where a backend runs: the Triton interpreter gets small ones, a GPU its
large ones.
"""
import dataclasses

import pytest
import torch

from elva_kernels import similarity_topk
from tests.helpers import (
    CountOps, assert_close_verbose, backend_matrix, dtypes_of, on_device, ragged_size, random_rows, require_backend,
    runs_as,
)
from tests.ops import naive

OP = "similarity_topk"
METRICS = ["cosine", "dot"]



def on_cpu(result):
    return tuple(x.cpu() for x in result)


def make_case(gen, dtype, metric="cosine", *, big=False, limits=None):
    """CPU inputs of one random case. ``limits``: the largest (B, N, d) to draw; ``big`` is (40, 2500, 300), the
    default (19, 300, 48)."""
    max_rows, max_pool, max_dim = limits or ((40, 2500, 300) if big else (19, 300, 48))
    rows = ragged_size(gen, 1, max_rows)
    pool = ragged_size(gen, 1, max_pool)
    dim = ragged_size(gen, 1, max_dim)
    case = {
        "queries": random_rows(gen, rows, dim, ties=False).to(dtype),
        "candidates": random_rows(gen, pool, dim, ties=True).to(dtype),
        "k": ragged_size(gen, 1, pool),
        "metric": metric,
        "exclude": None,
        "max_score": None,
    }
    if int(torch.randint(0, 2, (1,), generator=gen)):
        case["exclude"] = torch.randint(-1, pool, (rows, ragged_size(gen, 1, 6)), generator=gen)
    if int(torch.randint(0, 2, (1,), generator=gen)):
        scale = 1.0 if metric == "cosine" else float(dim) ** 0.5
        case["max_score"] = (torch.rand(rows, generator=gen) * 1.2 - 0.4) * scale
    return case


def run(case, backend):
    return similarity_topk(
        case["queries"], case["candidates"], case["k"], metric=case["metric"], exclude=case["exclude"],
        max_score=case["max_score"], backend=backend,
    )


def candidates_within(s, centres, radius):
    """[B, k]: how many of a row's scores ``s`` [B, N] lie strictly within ``radius`` [B, 1] of each centre; by
    binary search in the sorted row, so k near 4096 with N near 5000 needs no [B, k, N] temporary."""
    ordered = s.sort(dim=1).values
    low = torch.searchsorted(ordered, (centres - radius).contiguous(), right=True)
    high = torch.searchsorted(ordered, (centres + radius).contiguous(), right=False)
    return high - low


def compare(actual, expected, case, dtype):
    """Values within the fp32 error bound; indices exact except inside near-ties of the reference (then as value
    multisets)."""
    values, indices = actual
    ref_values, ref_indices = expected
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    padded = ref_indices == -1
    assert torch.equal(indices == -1, padded), "the -1 tails differ"
    assert torch.equal(values[padded], ref_values[padded])
    real = ~padded
    # Scores within the fp32 accumulation error bound of the float64 reference.
    finite = torch.where(real, ref_values, 0.0)
    tol = 1e-5 * finite.abs().amax(1, keepdim=True).clamp_min(1.0)  # relative 1e-5 when the inputs are unknown
    if "queries" in case:
        bound = naive.score_tolerance(case["queries"], case["candidates"], case["metric"]).to(values.device)
        tol = torch.maximum(tol, bound)
    bad = real & ((values - ref_values).abs() > tol)
    assert not bool(bad.any()), f"values: {int(bad.sum())} beyond tolerance; first {bad.nonzero()[:3].tolist()}"
    # A slot is a near-tie when another candidate scores within 2 tol of it: there the backends' roundings may
    # order candidates differently, including across the k-th place.
    near = torch.zeros_like(real)
    if "queries" in case:
        s = naive.scores(case["queries"], case["candidates"], case["metric"]).float().to(values.device)
        near = real & (candidates_within(s, ref_values, 2 * tol) > 1)
    else:
        gaps = ref_values.diff(dim=1).abs() < 2 * tol
        near[:, 1:] |= gaps
        near[:, :-1] |= gaps
    exact = real & ~near
    assert torch.equal(indices[exact], ref_indices[exact]), "indices differ outside near-ties"
    # Inside near-ties the candidates may come in another order, but their scores are the same multiset, and
    # within this backend equal scores come out by index.
    for row in range(values.shape[0]):
        ours = values[row][real[row]].sort().values
        theirs = ref_values[row][real[row]].sort().values
        assert_close_verbose(ours, theirs, atol=float(tol[row]), rtol=0, what=f"row {row} value multiset")
        v, i = values[row][real[row]], indices[row][real[row]]
        same = v[1:] == v[:-1]
        assert bool((i[1:][same] > i[:-1][same]).all()), "equal scores not by index"
        assert bool((v[1:] <= v[:-1]).all()), "values not descending"


def unfiltered_case(gen, dtype, *, ties=True):
    """(queries, candidates, k) of the default sizes, with no exclusions or max_score."""
    rows, pool, dim = ragged_size(gen, 1, 19), ragged_size(gen, 1, 300), ragged_size(gen, 1, 48)
    queries = random_rows(gen, rows, dim, ties=False).to(dtype)
    candidates = random_rows(gen, pool, dim, ties=ties).to(dtype)
    return queries, candidates, ragged_size(gen, 1, pool)


# ---- the torch reference against materialised scores ------------------------------------------------------------


@pytest.mark.parametrize("dtype", dtypes_of(OP, "torch"), ids=lambda dtype: str(dtype).removeprefix("torch."))
@pytest.mark.parametrize("metric", METRICS)
def test_reference_matches_materialised_topk(dtype, metric):
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        queries, candidates, k = unfiltered_case(gen, dtype)
        values, indices = similarity_topk(queries, candidates, k, metric=metric, backend="torch")
        expected_values, expected_indices = naive.topk(queries, candidates, k, metric)
        assert torch.equal(indices, expected_indices)
        assert torch.equal(values, expected_values)


def test_reference_exclusions_and_max_score_match_materialised():
    """k = N under exclusions and max_score: fewer than k eligible, so -1 / -inf fill the tail, and only the tail."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(30):
        queries, candidates, _ = unfiltered_case(gen, torch.float32)
        rows, pool = queries.shape[0], candidates.shape[0]
        exclude = torch.randint(-1, pool, (rows, ragged_size(gen, 1, 6)), generator=gen)
        max_score = torch.rand(rows, generator=gen) * 1.2 - 0.4
        values, indices = similarity_topk(queries, candidates, pool, exclude=exclude, max_score=max_score,
                                          backend="torch")
        expected_values, expected_indices = naive.topk(queries, candidates, pool, exclude=exclude, max_score=max_score)
        assert torch.equal(indices, expected_indices)
        assert torch.equal(values, expected_values)
        padded = indices == -1
        assert torch.equal(padded, values == float("-inf"))
        assert (padded.int().diff(dim=1) >= 0).all(), "-1 only in the tail"


def test_reference_over_several_score_tiles():
    from elva_kernels.reference import _common

    q, c = torch.randn(3, 4), torch.randn(_common.TILE_ELEMENTS // 3 * 2 + 17, 4)  # several candidate tiles
    values, indices = similarity_topk(q, c, 5, backend="torch")
    expected_values, expected_indices = naive.topk(q, c, 5)
    assert torch.equal(indices, expected_indices) and torch.equal(values, expected_values)
    values, indices = similarity_topk(q[:1], c[:300], 300, backend="torch")
    assert sorted(indices[0].tolist()) == list(range(300))


# ---- every backend against the reference -----------------------------------------------------------------------


# (make_case keywords, cases per dtype, seed): the default sizes, then larger ones. Each dtype draws its own shapes
# (seed + its position). The interpreter's larger set has B up to 70 and d up to 96 (two query blocks of 64 and two
# 64-wide steps are certain in test_exact_duplicates_come_out_by_index); the CPU's spans several of its blocks.
REFERENCE_CASE_SETS = {
    "cpu": [({}, 25, 0), ({"big": True}, 3, 5)],
    "interpreter": [({}, 2, 0), ({"limits": (70, 300, 96)}, 1, 31)],
    "gpu": [({}, 25, 0), ({"big": True}, 10, 0)],
}


# The torch reference on CPU is what the others are compared with; on CUDA it must give the CPU's result too.
@pytest.mark.parametrize(
    "backend,device", [p for p in backend_matrix(OP, reference=True) if p.values != ("torch", "cpu")]
)
@pytest.mark.parametrize("metric", METRICS)
def test_matches_reference(backend, device, metric):
    for make_args, cases, seed in REFERENCE_CASE_SETS[runs_as(backend, device)]:
        for position, dtype in enumerate(dtypes_of(OP, backend)):
            require_backend(OP, backend, device, dtype)
            gen = torch.Generator().manual_seed(seed + position)
            for _ in range(cases):
                case = make_case(gen, dtype, metric, **make_args)
                compare(on_cpu(run(on_device(case, device), backend)), run(case, "torch"), case, dtype)
    if device == "cuda":
        # A pool of 5003 (no 128-row multiple) at k = 100, d = 96.
        gen = torch.Generator().manual_seed(7)
        for dtype in dtypes_of(OP, backend):
            case = {"queries": torch.randn(33, 96, generator=gen).to(dtype),
                    "candidates": torch.randn(5003, 96, generator=gen).to(dtype),
                    "k": 100, "metric": metric, "exclude": None, "max_score": None}
            compare(on_cpu(run(on_device(case, device), backend)), run(case, "torch"), case, dtype)


def faiss_search(queries, candidates, k, metric):
    """faiss-cpu's exact inner-product search (IndexFlatIP), on unit rows for "cosine"."""
    faiss = pytest.importorskip("faiss")  # a dev extra; the GPU machine has none
    q, c = queries.float(), candidates.float()
    if metric == "cosine":
        q, c = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(c, dim=1)
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c.numpy())
    values, indices = index.search(q.numpy(), k)
    return torch.from_numpy(values), torch.from_numpy(indices)


def compare_with_faiss(actual, queries, candidates, k, metric):
    """Values within both sides' fp32 error of faiss'; indices equal wherever faiss' scores are apart by more than
    those errors (faiss orders ties its own way). faiss is asked for k + 1, so a near-tie across the k-th place
    counts as one. Every returned id must also carry its own score. Returns how many slots were compared by id."""
    values, indices = actual
    pool = candidates.shape[0]
    faiss_values, faiss_indices = faiss_search(queries, candidates, min(k + 1, pool), metric)
    tol = 2 * naive.score_tolerance(queries, candidates, metric)  # ours and faiss' fp32 sums, each within 1 bound
    assert bool((indices >= 0).all()), "k <= N with no filter: every slot holds a candidate"
    assert_close_verbose(values - faiss_values[:, :k], torch.zeros_like(values), atol=float(tol.max()), rtol=0,
                         what=f"values against faiss (k={k}, N={pool}, {metric})")
    own = naive.scores(queries, candidates, metric).gather(1, indices)
    assert_close_verbose(values - own, torch.zeros_like(values), atol=float(tol.max()) / 2, rtol=0, what="own scores")
    gaps = torch.cat([torch.full_like(faiss_values[:, :1], float("inf")), faiss_values,
                      torch.full_like(faiss_values[:, :1], float("-inf"))], 1).diff(dim=1).abs()
    separated = ((gaps[:, :-1] > 2 * tol) & (gaps[:, 1:] > 2 * tol))[:, :k]
    assert torch.equal(indices[separated], faiss_indices[:, :k][separated]), f"indices differ from faiss (k={k})"
    assert len(set(indices[0].tolist())) == k, "an id came twice"
    return int(separated.sum())


# (ragged random fp32 cases of the default sizes, fixed (B, N, d, k)): k = min(N, 4096) on a pool larger than 4096,
# and k = N.
FAISS_CASES = {
    "cpu": (20, [(7, 5000, 33, 4096), (3, 3000, 20, 3000)]),
    "interpreter": (2, []),
    "gpu": (20, [(7, 5000, 33, 4096), (3, 3000, 20, 3000)]),
}


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
@pytest.mark.parametrize("metric", METRICS)
def test_matches_faiss_exact_search(backend, device, metric):
    require_backend(OP, backend, device)
    random_cases, fixed_cases = FAISS_CASES[runs_as(backend, device)]
    gen = torch.Generator().manual_seed(23)
    cases = []
    for _ in range(random_cases):
        rows, pool, dim = ragged_size(gen, 1, 19), ragged_size(gen, 1, 300), ragged_size(gen, 1, 48)
        cases.append((rows, pool, dim, ragged_size(gen, 1, pool)))
    checked = 0
    for rows, pool, dim, k in cases + fixed_cases:
        queries = random_rows(gen, rows, dim, ties=False)
        candidates = random_rows(gen, pool, dim, ties=False)
        result = similarity_topk(queries.to(device), candidates.to(device), k, metric=metric, backend=backend)
        checked += compare_with_faiss(on_cpu(result), queries, candidates, k, metric)
    assert checked > 1000, "too few slots outside faiss near-ties to say anything"


# (B, N, d, k) with no filter. The interpreter pays for every candidate a list of k > 128 takes in (about a second
# per thousand), so its k = N is small; its k = 4096 is the filtered test's (a row there fills all 4096).
UNFILTERED_LARGE_K = {
    "cpu": [(7, 5000, 33, 4096), (7, 5000, 33, 5000)],
    "interpreter": [(7, 400, 8, 400)],
    "gpu": [(7, 5000, 33, 4096), (7, 4096, 33, 4096)],
}


@pytest.mark.parametrize("backend,device", backend_matrix(OP))
def test_large_k_and_k_equals_n(backend, device):
    op = require_backend(OP, backend, device).handle
    gen = torch.Generator().manual_seed(11)
    for rows, pool, dim, k in UNFILTERED_LARGE_K[runs_as(backend, device)]:
        q, c = random_rows(gen, rows, dim, ties=False), random_rows(gen, pool, dim, ties=True)
        values, indices = on_cpu(op(q.to(device), c.to(device), k, "cosine", None, None))
        compare((values, indices), similarity_topk(q, c, k, backend="torch"), {}, torch.float32)
        if k == pool:
            assert all(sorted(row) == list(range(pool)) for row in indices.tolist())


def robust_max_score(gen, s, k, tol):
    """A per-row max_score that leaves from about k - 300 up to all candidates eligible (the ones at or below it),
    placed in the widest gap between 32 neighbouring scores so that no backend's rounding (``tol``) can move a
    candidate across it. Row 0 always leaves fewer than k eligible; one other row in four gets no filter."""
    pool = s.shape[1]
    ordered = s.sort(dim=1, descending=True).values
    limits = torch.empty(s.shape[0])
    for row in range(s.shape[0]):
        eligible = ragged_size(gen, max(1, k - 300), k - 33 if row == 0 else pool - 1)
        start = pool - eligible  # the window's first score stays above the limit
        window = ordered[row, start - 1 : start + 32]
        if (row > 0 and bool(torch.randint(0, 4, (1,), generator=gen) == 0)) or window.numel() < 2:
            limits[row] = 1e30
            continue
        widths = window[:-1] - window[1:]
        gap = int(widths.argmax())
        # A zero width is an exact tie (duplicates score the same on every backend); else it must dwarf the error.
        usable = widths[gap] == 0 or widths[gap] > 4 * tol[row, 0]
        limits[row] = float((window[gap] + window[gap + 1]) / 2) if usable else 1e30
    return limits


def large_k_case(gen, case_number, *, max_rows, max_k):
    metric = METRICS[case_number % 2]
    rows = ragged_size(gen, 1, max_rows)
    pool = ragged_size(gen, 4100, 5200)
    dim = ragged_size(gen, 1, 64)
    # k = 4096 (the GPU backends' limit) in one case of three; a backend with no limit gets k = N in another.
    k = {0: 4096, 2: pool if max_k is None else None}.get(case_number % 3) or ragged_size(gen, 3500, 4096)
    queries, candidates = random_rows(gen, rows, dim, ties=False), random_rows(gen, pool, dim, ties=True)
    s = naive.scores(queries, candidates, metric)
    exclude = torch.randint(-1, pool, (rows, ragged_size(gen, 1, 300)), generator=gen)
    exclude[:, :5] = naive.total_order(s)[:, :5]  # the best candidates themselves, so the exclusions matter
    return {"queries": queries, "candidates": candidates, "k": k, "metric": metric, "exclude": exclude,
            "max_score": robust_max_score(gen, s, k, naive.score_tolerance(queries, candidates, metric))}


# (cases, largest B): the interpreter affords one case of three rows (about 10 s: N > 4096 candidates, all taken in).
FILTERED_LARGE_K = {"cpu": (8, 9), "interpreter": (1, 3), "gpu": (8, 9)}


@pytest.mark.parametrize("backend,device", backend_matrix(OP))
def test_large_k_with_exclusions_and_max_score(backend, device):
    """k from 3500 to 4096 (and k = N where the backend has no limit) on N = 4100..5200 with ties, exclusions and
    max_score filters that leave from fewer than k to all candidates eligible: both kinds of row must occur."""
    max_k = require_backend(OP, backend, device).max_k
    cases, max_rows = FILTERED_LARGE_K[runs_as(backend, device)]
    gen = torch.Generator().manual_seed(29)
    short = full = 0
    for case_number in range(cases):
        case = large_k_case(gen, case_number, max_rows=max_rows, max_k=max_k)
        expected = run(case, "torch")
        compare(on_cpu(run(on_device(case, device), backend)), expected, case, torch.float32)
        short += int((expected[1] == -1).any(1).sum())
        full += int((expected[1] >= 0).all(1).sum())
    assert short > 0 and full > 0, f"{short} rows with fewer than k eligible, {full} with k"


# ---- ties, duplicates and filters ------------------------------------------------------------------------------


# (queries, distinct rows, d, ks) of a pool holding each row twice and a third of them three times: the copies sit
# in other candidate blocks / splits, B > 64 and d > 64 take two query blocks and two 64-wide steps, and (but on the
# interpreter, whose random cases do it) k crosses the 128-long split lists.
COPIES = {
    "cpu": (70, 600, 96, (1, 100, 129, 1000)),
    "interpreter": (70, 60, 96, (16,)),
    "gpu": (300, 3000, 128, (1, 100, 129, 1000, 4096)),
}


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_exact_duplicates_come_out_by_index(backend, device):
    """Exact copies score bitwise-equal, so among them the smaller id comes first."""
    op = require_backend(OP, backend, device).handle
    base = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    num_queries, distinct, dim, ks = COPIES[runs_as(backend, device)]
    gen = torch.Generator().manual_seed(5)
    pool = random_rows(gen, distinct, dim, ties=False)
    pool_queries = random_rows(gen, num_queries, dim, ties=False)
    for dtype in dtypes_of(OP, backend):
        require_backend(OP, backend, device, dtype)
        candidates = torch.cat([base, base, base]).to(dtype).to(device)  # ids i, i + 5, i + 10 hold the same vector
        values, indices = on_cpu(op(base[:2].to(dtype).to(device), candidates, 15, "cosine", None, None))
        for row in range(2):
            for i in range(0, 15, 3):
                assert torch.equal(values[row, i : i + 3], values[row, i].expand(3))
                group = indices[row, i : i + 3].tolist()
                assert group == sorted(group) and len({g % 5 for g in group}) == 1
            assert indices[row, :3].tolist() == [row, row + 5, row + 10]
        copies = torch.cat([pool, pool, pool[: distinct // 3]]).to(dtype)
        queries = pool_queries.to(dtype)
        case = {"queries": queries, "candidates": copies, "metric": "cosine"}
        for k in ks:
            values, indices = on_cpu(op(queries.to(device), copies.to(device), k, "cosine", None, None))
            compare((values, indices), similarity_topk(queries, copies, k, backend="torch"), case, dtype)
            same = values[:, 1:] == values[:, :-1]
            assert bool((indices[:, 1:][same] > indices[:, :-1][same]).all()), "equal scores not by index"


# (B, N, k) of all-equal scores; on a GPU k = 4096 of 20000 takes the split lists several rounds.
ALL_EQUAL = {"cpu": (3, 2000, 2000), "interpreter": (3, 300, 300), "gpu": (70, 20000, 4096)}


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_all_equal_scores_give_ascending_indices(backend, device):
    op = require_backend(OP, backend, device).handle
    rows, pool, k = ALL_EQUAL[runs_as(backend, device)]
    values, indices = op(torch.ones(rows, 8, device=device), torch.ones(pool, 8, device=device), k, "cosine", None,
                         None)
    assert torch.equal(indices.cpu(), torch.arange(k).expand(rows, -1))
    assert bool((values == values[0, 0]).all())


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_too_few_eligible(backend, device):
    op = require_backend(OP, backend, device).handle
    q, c = torch.randn(3, 8, device=device), torch.randn(20, 8, device=device)
    exclude = torch.tensor([[0, 1, 2, -1]] * 3, device=device)
    values, indices = op(q, c, 20, "dot", exclude, torch.full((3,), -1e30, device=device))
    assert torch.equal(indices.cpu(), torch.full((3, 20), -1)) and bool((values == float("-inf")).all())
    values, indices = op(q, c, 20, "dot", exclude, None)
    assert bool((indices[:, 17:] == -1).all()) and bool((indices[:, :17] >= 3).all())
    assert torch.equal(indices == -1, values == float("-inf"))


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_float_max_score_equals_tensor(backend, device):
    require_backend(OP, backend, device)
    q, c = torch.randn(4, 8, device=device), torch.randn(60, 8, device=device)
    by_float = similarity_topk(q, c, 10, max_score=0.3, backend=backend)
    by_tensor = similarity_topk(q, c, 10, max_score=torch.full((4,), 0.3, device=device), backend=backend)
    assert torch.equal(by_float[0], by_tensor[0]) and torch.equal(by_float[1], by_tensor[1])


# ---- errors and layouts ----------------------------------------------------------------------------------------


# (which input holds it, its dtype, the bad value, metric, through the op or the public function): every non-finite
# value in the queries and in the candidates, every dtype on both sides, each side through both ways in.
NON_FINITE = [
    ("queries", torch.float32, float("nan"), "cosine", "public"),
    ("queries", torch.float16, float("inf"), "dot", "op"),
    ("queries", torch.bfloat16, float("-inf"), "cosine", "public"),
    ("candidates", torch.float32, float("-inf"), "dot", "op"),
    ("candidates", torch.float16, float("nan"), "cosine", "public"),
    ("candidates", torch.bfloat16, float("inf"), "dot", "op"),
]


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_non_finite_raises(backend, device):
    """Raises naming the input that holds it, and leaves the inputs as they were."""
    op = require_backend(OP, backend, device).handle
    # The bad candidate sits past the first block of every backend (264 candidates on the CPU, 128-row splits).
    clean = {"queries": torch.randn(4, 8), "candidates": torch.randn(300, 8)}
    for name, dtype, bad, metric, way in NON_FINITE:
        require_backend(OP, backend, device, dtype)
        inputs = {key: value.to(dtype).to(device, copy=True) for key, value in clean.items()}
        inputs[name][1 if name == "queries" else 280, 3] = bad
        before = {key: value.clone() for key, value in inputs.items()}
        with pytest.raises(ValueError, match=f"{name} must contain only finite values"):
            if way == "op":
                op(inputs["queries"], inputs["candidates"], 3, metric, None, None)
            else:
                similarity_topk(inputs["queries"], inputs["candidates"], 3, metric=metric, backend=backend)
        for key, value in inputs.items():
            assert torch.equal(value.nan_to_num(), before[key].nan_to_num()), f"{key} was modified"


@pytest.mark.parametrize("backend,device", backend_matrix(OP))
def test_bad_arguments_raise(backend, device):
    op = require_backend(OP, backend, device).handle
    q, c = torch.randn(4, 8, device=device), torch.randn(30, 8, device=device)

    def ids(rows):
        return torch.tensor(rows, dtype=torch.int64, device=device)

    with pytest.raises(ValueError, match="exclude"):
        op(q, c, 3, "cosine", ids([[0, 30]] * 4), None)
    with pytest.raises(ValueError, match="exclude"):
        op(q, c, 3, "cosine", ids([[-2]] * 4), None)
    with pytest.raises(ValueError, match="exclude"):
        similarity_topk(q, c, 3, exclude=ids([[0, 30]] * 4), backend=backend)
    with pytest.raises(ValueError, match="k"):
        op(q, c, 31, "cosine", None, None)
    with pytest.raises(ValueError, match="k"):
        op(q, c, 0, "cosine", None, None)
    with pytest.raises(ValueError, match="metric"):
        op(q, c, 3, "l2", None, None)
    with pytest.raises(ValueError, match="candidates"):
        op(q, torch.randn(30, 9, device=device), 3, "cosine", None, None)
    with pytest.raises(TypeError, match="candidates"):
        op(q, c.half(), 3, "cosine", None, None)
    with pytest.raises(TypeError, match="queries"):
        op(q.double(), c.double(), 3, "cosine", None, None)
    with pytest.raises(ValueError, match="max_score"):
        op(q, c, 3, "cosine", None, torch.zeros(5, device=device))


@pytest.mark.parametrize("backend,device", backend_matrix(OP))
def test_strided_inputs(backend, device):
    op = require_backend(OP, backend, device).handle
    q, c = torch.randn(6, 20, device=device), torch.randn(100, 40, device=device)
    expected = similarity_topk(q, c[:, ::2].contiguous(), 9, backend="torch")
    _, indices = op(q, c[:, ::2], 9, "cosine", None, None)  # non-unit column stride: copied
    assert torch.equal(indices, expected[1])
    expected = similarity_topk(q[:, :10], c[:, :10], 9, backend="torch")
    _, indices = op(q[:, :10], c[:, :10], 9, "cosine", None, None)  # padded rows: used in place
    assert torch.equal(indices, expected[1])


# ---- autograd, opcheck, torch.compile --------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
@pytest.mark.parametrize("metric", METRICS)
def test_gradient_through_selected_pairs(backend, device, metric):
    """The gradient of the values is that of the selected pairs of the materialised score matrix; excluded and
    unselected candidates (k < N) and the -1 tail (k = N with exclusions) get none."""
    require_backend(OP, backend, device)
    gen = torch.Generator().manual_seed(2)
    queries = torch.randn(5, 12, generator=gen).to(device).requires_grad_()
    candidates = torch.randn(40, 12, generator=gen).to(device).requires_grad_()
    exclude = torch.tensor([[0, 1]] * 5, device=device)
    for k in (7, 40):
        grad_out = torch.randn(5, k, generator=gen).to(device)
        values, indices = similarity_topk(queries, candidates, k, metric=metric, exclude=exclude, backend=backend)
        eligible = indices >= 0
        (values.masked_fill(~eligible, 0) * grad_out).sum().backward()
        ours = queries.grad, candidates.grad
        queries.grad = candidates.grad = None
        q, c = queries, candidates
        if metric == "cosine":
            q, c = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(c, dim=1)
        picked = (q @ c.T).gather(1, indices.clamp_min(0))
        (picked.masked_fill(~eligible, 0) * grad_out).sum().backward()
        assert_close_verbose(ours[0], queries.grad, atol=1e-5, rtol=1e-4, what=f"grad queries (k={k})")
        assert_close_verbose(ours[1], candidates.grad, atol=1e-5, rtol=1e-4, what=f"grad candidates (k={k})")
        queries.grad = candidates.grad = None


@pytest.mark.parametrize("backend,device", backend_matrix(OP, reference=True))
def test_opcheck_and_compile(backend, device):
    op = require_backend(OP, backend, device).handle
    q = torch.randn(4, 8, device=device, requires_grad=True)
    c = torch.randn(30, 8, device=device, requires_grad=True)
    # Every dtype, with gradients; the filters and k = N in one of them.
    filtered = (30, "dot", torch.tensor([[1, -1]] * 4, device=device), torch.full((4,), 0.2, device=device))
    for position, dtype in enumerate(dtypes_of(OP, backend)):
        require_backend(OP, backend, device, dtype)
        q_typed, c_typed = (x.detach().to(dtype).requires_grad_() for x in (q, c))
        arguments = filtered if position == 1 else (5, "cosine", None, None)
        torch.library.opcheck(op, (q_typed, c_typed, *arguments))
    # The Python dispatch in front of the op, by name or auto, must not break the graph.
    q, c = q.detach(), c.detach()
    for choice in (backend, "auto"):
        def top(q, c, choice=choice):
            return similarity_topk(q, c, 5, max_score=0.9, backend=choice)

        actual, expected = torch.compile(top, fullgraph=True)(q, c), top(q, c)
        assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


# ---- the threshold path (backends with a threshold pass) ---------------------------------------------------------


def threshold_backends():
    """(backend, device) pairs whose kernels have the threshold pass, and "chunked" on CPU: the CUDA backend's
    chunked pass (its chunk loop and select rule, ``threshold_topk_cpu``) with Triton's exact-path kernels."""
    from elva_kernels import _retrieval

    kernels = {"triton": _retrieval._triton_kernels(), "cuda": _retrieval._cuda_kernels()}
    pairs = [p for p in backend_matrix(OP) if p.values[0] in kernels and
             (kernels[p.values[0]] is None or kernels[p.values[0]].threshold_topk is not None)]
    return pairs + [pytest.param("chunked", "cpu", id="chunked-cpu")]


def threshold_kernels(backend):
    from elva_kernels import _retrieval

    if backend == "chunked":
        return _retrieval.chunked_kernels(_retrieval._triton_kernels().split_topk, "cpu")
    return _retrieval._triton_kernels() if backend == "triton" else _retrieval._cuda_kernels()


def run_threshold(case, backend):
    """``run`` for a threshold backend; "chunked" calls the shared implementation with its kernels directly."""
    from elva_kernels import _retrieval
    from elva_kernels.ops.similarity_topk import check_arguments

    if backend != "chunked":
        return run(case, backend)
    q, c = case["queries"], case["candidates"]
    exclude, max_score, _ = check_arguments(q, c, case["k"], case["metric"], case["exclude"], case["max_score"])
    return _retrieval.similarity_topk(threshold_kernels(backend), q, c, case["k"], case["metric"], exclude,
                                         max_score)


def require_threshold_backend(backend, device, dtype=torch.float32):
    require_backend(OP, "triton" if backend == "chunked" else backend, device, dtype)


@pytest.fixture
def small_sample(monkeypatch):
    """A 256-candidate sample, no pool-size floor and 256-candidate chunks, so the threshold path runs at
    interpreter sizes over several chunks; returns the module, its fallback counter cleared."""
    from elva_kernels import _retrieval

    monkeypatch.setattr(_retrieval, "SAMPLE_SIZES", (256, 256))
    monkeypatch.setattr(_retrieval, "MAX_CAPACITY_FRACTION", 1.0)
    monkeypatch.setattr(_retrieval, "CHUNK_BYTES", 0)
    _retrieval.FALLBACKS.clear()
    return _retrieval


# (B, N, d, k, dtype, exclude width, max_score): ragged, both half dtypes, filters that leave few eligible.
THRESHOLD_CASES = [
    (5, 3000, 32, 10, torch.float32, 0, None),
    (40, 2500, 64, 50, torch.float16, 3, None),
    (7, 5000, 33, 200, torch.float32, 4, 0.3),
    (3, 4000, 16, 1, torch.float16, 1, -0.2),
    (6, 3000, 33, 10, torch.float16, 2, None),  # 66-byte rows: pointer loads, not TMA
]


def test_threshold_pass_loads_half_rows_by_tma():
    """Half rows with 16-byte-multiple strides get TMA descriptors; fp32 rows and other strides keep pointers."""
    from elva_kernels.triton.similarity_topk import tma_descriptors

    def uses_tma(rows, dim, dtype):
        return tma_descriptors(torch.zeros(rows, dim, dtype=dtype), torch.zeros(300, dim, dtype=dtype), 128, 128,
                               64)[2]

    assert uses_tma(5, 64, torch.float16) and uses_tma(5, 24, torch.bfloat16)
    assert not uses_tma(5, 33, torch.float16) and not uses_tma(5, 64, torch.float32)


def test_autotune_times_only_large_passes():
    from elva_kernels.triton import similarity_topk as kernels

    configs = ["first", "second"]
    assert kernels._tune_large_passes(configs, {"num_queries": 1024, "num_candidates": 100_000}) == ["first"]
    assert kernels._tune_large_passes(configs, {"num_queries": 1024, "num_candidates": 10**6}) == configs


def test_every_autotuned_config_is_exact(small_sample, monkeypatch):
    """Each tile config of the autotune table past the first (which the interpreter's autotuner runs in every other
    test), on two half cases of the threshold path: ragged tiles with exclusions by TMA, and rows TMA cannot read
    (d = 33: K steps masked)."""
    require_threshold_backend("triton", "cpu", torch.float16)
    from elva_kernels.triton import similarity_topk as kernels

    cases = [case for case in THRESHOLD_CASES if case[4] == torch.float16 and case[5] > 1]
    assert {case[2] % 16 == 0 for case in cases} == {True, False}, "a TMA case and a pointer case"
    for tiles in kernels.TUNED_TILES[torch.float16][1:]:
        monkeypatch.setitem(kernels.TUNED_THRESHOLD_KERNELS, torch.float16, kernels.tuned_threshold_kernel([tiles]))
        gen = torch.Generator().manual_seed(22)
        for rows, pool, dim, k, dtype, width, max_score in cases:
            check_threshold_case("triton", "cpu", gen, rows, pool, dim, k, dtype, width, max_score)


def check_threshold_case(backend, device, gen, rows, pool, dim, k, dtype, width, max_score, *, candidates=None):
    case = {
        "queries": random_rows(gen, rows, dim, ties=False).to(dtype),
        "candidates": (random_rows(gen, pool, dim, ties=True) if candidates is None else candidates).to(dtype),
        "k": k, "metric": "cosine",
        "exclude": torch.randint(-1, pool, (rows, width), generator=gen) if width else None,
        "max_score": None if max_score is None else torch.full((rows,), max_score),
    }
    compare(on_cpu(run_threshold(on_device(case, device), backend)), run(case, "torch"), case, dtype)


@pytest.mark.parametrize("backend,device", threshold_backends())
def test_threshold_path_matches_reference(backend, device, small_sample):
    require_threshold_backend(backend, device, torch.float16)
    gen = torch.Generator().manual_seed(21)
    for rows, pool, dim, k, dtype, width, max_score in THRESHOLD_CASES:
        assert small_sample.threshold_plan(rows, pool, k) is not None, "the case must take the threshold path"
        check_threshold_case(backend, device, gen, rows, pool, dim, k, dtype, width, max_score)
    # max_score = -0.2 leaves few eligible samples above the threshold: some rows may go the exact way, none wrong.


@pytest.mark.parametrize("backend,device", threshold_backends())
def test_threshold_path_raises_on_non_finite_inputs(backend, device, small_sample):
    """NaN/Inf in a query or a candidate past the sample's first chunk: the fused pass flags it and the error names
    the input, as on the exact path. The bad candidate's tile holds no survivor of any query (its rows point away
    from all of them), so only the NaN/Inf check can send it to the rare branch."""
    require_threshold_backend(backend, device)
    gen = torch.Generator().manual_seed(23)
    base = torch.randn(8, generator=gen)
    candidates = torch.randn(3000, 8, generator=gen)
    candidates[2688:2816] = -base + 0.1 * torch.randn(128, 8, generator=gen)
    clean = {"queries": base + 0.1 * torch.randn(4, 8, generator=gen), "candidates": candidates}
    for name, dtype, bad, metric, _ in NON_FINITE:
        require_threshold_backend(backend, device, dtype)
        inputs = {key: value.to(dtype).to(device, copy=True) for key, value in clean.items()}
        inputs[name][1 if name == "queries" else 2800, 3] = bad
        assert small_sample.threshold_plan(4, 3000, 5) is not None
        case = {**inputs, "k": 5, "metric": metric, "exclude": None, "max_score": None}
        with pytest.raises(ValueError, match=f"{name} must contain only finite values"):
            run_threshold(case, backend)


@pytest.mark.parametrize("backend,device", [p for p in threshold_backends() if p.values[1] == "cuda"])
def test_threshold_path_ties_exact_duplicates_by_id_on_gpu(backend, device):
    """At production sizes (the threshold path, 128 x 128 tiles; cuBLAS chunks on CUDA), exact copies of candidates
    placed anywhere in the pool score bitwise-equal whatever tile or chunk column holds them, so of two copies the
    smaller id never ranks behind the larger one, and equal scores come out by id."""
    require_threshold_backend(backend, device, torch.bfloat16)
    gen = torch.Generator(device).manual_seed(31)
    q = torch.randn(300, 128, device=device, generator=gen).bfloat16()
    c = torch.randn(200_000, 128, device=device, generator=gen).bfloat16()
    c[:2000] = q[torch.arange(2000, device=device) % 300] + 0.5 * c[:2000]  # near each query: in its top k
    sources = torch.randperm(2000, device=device, generator=gen)[:600]
    copies = torch.randperm(200_000 - 2000, device=device, generator=gen)[:600] + 2000
    c[copies] = c[sources]
    values, ids = similarity_topk(q, c, 100, backend=backend)
    twin = torch.full((200_000,), -1, dtype=torch.int64, device=device)
    twin[sources], twin[copies] = copies, sources
    for row_values, row_ids in zip(values.cpu().tolist(), ids.cpu().tolist()):
        chosen = set(row_ids)
        for value, later_value, first, later in zip(row_values, row_values[1:], row_ids, row_ids[1:]):
            assert value > later_value or (value == later_value and first < later), "ties come out by id"
        for candidate in row_ids:
            other = int(twin[candidate])
            assert other < 0 or other > candidate or other in chosen, "a copy's smaller id was left behind"


@pytest.mark.parametrize("backend,device", threshold_backends())
def test_threshold_overflow_reruns_and_stays_exact(backend, device, small_sample, monkeypatch):
    """A capacity of k: almost every query overflows, is rerun above the k-th best buffered score, and some end
    on the exact path; sorted candidates (the best at the end) and all-equal scores as well."""
    require_threshold_backend(backend, device)
    real_plan = small_sample.threshold_plan
    monkeypatch.setattr(small_sample, "threshold_plan", lambda b, n, k: dataclasses.replace(
        real_plan(b, n, k), capacity=k))
    gen = torch.Generator().manual_seed(22)
    check_threshold_case(backend, device, gen, 6, 3000, 24, 20, torch.float32, 2, None)
    assert small_sample.FALLBACKS["overflow"] > 0
    query = torch.randn(1, 24, generator=gen)
    ranked = query * torch.linspace(-1, 1, 3000)[:, None]  # cosine -1 ... 1 in id order: sorted candidates
    check_threshold_case(backend, device, gen, 4, 3000, 24, 20, torch.float32, 0, None,
                         candidates=ranked + 1e-3 * torch.randn(3000, 24, generator=gen))
    same = {"queries": torch.ones(3, 8, device=device), "candidates": torch.ones(3000, 8, device=device), "k": 20,
            "metric": "cosine", "exclude": None, "max_score": None}
    values, indices = run_threshold(same, backend)
    assert torch.equal(indices.cpu(), torch.arange(20).expand(3, -1)), "all-equal scores: the smallest ids"
    assert small_sample.FALLBACKS["exact"] > 0


@pytest.mark.parametrize("backend,device", threshold_backends())
def test_threshold_underflow_takes_the_exact_path(backend, device, small_sample):
    """Exclusions and max_score that leave fewer than k eligible survivors, and k close to N."""
    require_threshold_backend(backend, device)
    gen = torch.Generator().manual_seed(23)
    rows, pool = 4, 3000
    q = random_rows(gen, rows, 16, ties=False)
    c = random_rows(gen, pool, 16, ties=False)
    # Every query excludes its 300 best candidates, which hold the sampled threshold's survivors.
    best = naive.scores(q, c).topk(300, dim=1).indices
    case = {"queries": q, "candidates": c, "k": 25, "metric": "cosine", "exclude": best, "max_score": None}
    compare(on_cpu(run_threshold(on_device(case, device), backend)), run(case, "torch"), case, torch.float32)
    assert small_sample.FALLBACKS["exact"] > 0
    small_sample.FALLBACKS.clear()
    # max_score leaves fewer than k eligible at all: -inf / -1 tails, from the exact path.
    case.update(exclude=None, k=100, max_score=torch.full((rows,), -0.6))
    compare(on_cpu(run_threshold(on_device(case, device), backend)), run(case, "torch"), case, torch.float32)
    assert small_sample.FALLBACKS["exact"] > 0
    small_sample.FALLBACKS.clear()
    check_threshold_case(backend, device, gen, 3, 3000, 16, 700, torch.float32, 0, None)  # a large k


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_chunked_select_keeps_exactly_the_scores_at_or_above_the_threshold(device, dtype):
    """elva::threshold_topk_{cpu,cuda} against the rule in float64: every survivor counted, the buffer holding
    min(count, capacity) of them (on CPU the first in id order), ragged chunks, max_score, overflow, NaN/Inf."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from elva_kernels import _retrieval

    op = getattr(torch.ops.elva, f"threshold_topk_{device}").default
    gen = torch.Generator().manual_seed(31)
    for rows, pool, dim, rank, capacity, chunk, limited in [(5, 1001, 24, 30, 64, 256, False),
                                                             (9, 777, 40, 50, 20, 4, True),
                                                             (1, 4099, 8, 300, 512, 1024, False)]:
        q, c = random_rows(gen, rows, dim, ties=False).to(dtype), random_rows(gen, pool, dim, ties=False).to(dtype)
        exact = naive.scores(q, c).double()
        ordered = exact.sort(dim=1, descending=True).values
        threshold = ((ordered[:, rank - 1] + ordered[:, rank]) / 2).float()  # midway: no rounding decides
        max_score = ((ordered[:, 3] + ordered[:, 4]) / 2).float() if limited else None
        survives = exact >= threshold[:, None].double()
        if limited:
            survives &= exact <= max_score[:, None].double()
        args = [x.to(device) for x in (q, c, _retrieval.scales(q, "cosine"), _retrieval.scales(c, "cosine"),
                                       threshold)]
        count, scores, ids, nonfinite = op(*args, None if max_score is None else max_score.to(device), capacity,
                                           chunk)
        count, scores, ids = count.cpu(), scores.cpu(), ids.cpu().long()
        assert torch.equal(count.long(), survives.sum(1)) and nonfinite.item() == 0
        for row in range(rows):
            held = ids[row, : min(int(count[row]), capacity)]
            assert survives[row, held].all() and held.unique().numel() == held.numel()
            torch.testing.assert_close(scores[row, : held.numel()].double(), exact[row, held], atol=2e-6, rtol=2e-6)
            if device == "cpu":
                assert torch.equal(held, survives[row].nonzero().flatten()[:capacity]), "CPU keeps id order"
    c[3, 0] = float("inf")
    args = [x.to(device) for x in (q, c, _retrieval.scales(q, "dot"), _retrieval.scales(c, "dot"), threshold)]
    assert op(*args, None, 4, 256)[3].item() == 1, "a NaN/Inf score sets the flag"


def test_chunked_select_refuses_bad_arguments_by_name():
    q, c = torch.randn(3, 8), torch.randn(50, 8)
    ones = torch.ones(3), torch.ones(50)
    op = torch.ops.elva.threshold_topk_cpu.default
    with pytest.raises(ValueError, match="capacity"):
        op(q, c, *ones, torch.zeros(3), None, 0, 256)
    with pytest.raises(ValueError, match="chunk_columns"):
        op(q, c, *ones, torch.zeros(3), None, 4, 6)
    with pytest.raises(ValueError, match="threshold"):
        op(q, c, *ones, torch.zeros(4), None, 4, 256)
    with pytest.raises(TypeError, match="candidate_scale"):
        op(q, c, ones[0], ones[1].double(), torch.zeros(3), None, 4, 256)


@pytest.mark.parametrize("backend,device", threshold_backends())
def test_host_work_does_not_grow_with_the_pool(backend, device, small_sample):
    """The torch ops around the kernels (scales, sample, select, their buffers) are as many for N = 3000 as for
    N = 24000. The backend's implementation is called directly: a mode sees no further than a registered op."""
    require_threshold_backend(backend, device)
    kernels = threshold_kernels(backend)
    counts = []
    for pool in (3000, 24000):
        q, c = torch.randn(4, 16, device=device), torch.randn(pool, 16, device=device)
        with CountOps() as ops:
            small_sample.similarity_topk(kernels, q, c, 10, "cosine", None, None)
        counts.append(ops.count)
    assert small_sample.FALLBACKS["exact"] == 0 and counts[0] == counts[1] > 10, counts


def test_threshold_plan_meets_the_miss_bound():
    """m, j, C as the docstring derives them, for the headline sizes."""
    from elva_kernels import _retrieval

    plan = _retrieval.threshold_plan(1024, 1_000_000, 10)
    assert (plan.sample, plan.rank) == (8192, 6) and 3 * 1024 <= plan.capacity <= 4096
    plan = _retrieval.threshold_plan(4096, 1_000_000, 1000)
    assert (plan.sample, plan.rank) == (16384, 45) and 1000 <= plan.capacity <= 6144
    assert plan.rows * plan.capacity * 8 <= _retrieval.BUFFER_BYTES * 1.2
    assert _retrieval.threshold_plan(1024, 50_000, 10) is None  # too small a pool: the exact path


# ---- the C++ backend's kernel variants ---------------------------------------------------------------------------


def test_cpu_kernel_variants_agree_bitwise(monkeypatch):
    """Every kernel (bf16 screening, AVX-512, AVX2, scalar) reports canonical rescored scores: bitwise-identical."""
    op = require_backend(OP, "cpu").handle
    gen = torch.Generator().manual_seed(13)
    q, c = random_rows(gen, 45, 150, ties=False), random_rows(gen, 1200, 150, ties=True)
    results = []
    for isa in ("", "avx512bf16", "avx512", "avx2", "scalar"):
        monkeypatch.setenv("ELVA_CPU_ISA", isa)
        results.append(op(q, c, 60, "cosine", None, None))
        results.append(op(q[:3], c, 60, "dot", None, None))  # few queries: the threads split the candidates
    for got in results[2:]:
        expected = results[0] if got[0].shape[0] == 45 else results[1]
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("metric", METRICS)
def test_cpu_screening_resolves_differences_below_bf16(monkeypatch, metric):
    """Candidates closer than bf16 can resolve: the bf16-screened search must still give the exact fp32 order."""
    op = require_backend(OP, "cpu").handle
    gen = torch.Generator().manual_seed(17)
    q = torch.randn(40, 96, generator=gen)
    base = q[torch.randint(0, 40, (3000,), generator=gen)]
    c = base + 1e-3 * torch.randn(3000, 96, generator=gen)  # scores within ~1e-3 of each other per query
    c[::7] = c[3::7].clone()  # and exact duplicates
    results = {}
    for isa in ("", "avx512", "scalar"):
        monkeypatch.setenv("ELVA_CPU_ISA", isa)
        results[isa] = op(q, c, 200, metric, None, None)
    for isa in ("avx512", "scalar"):
        assert torch.equal(results[isa][0], results[""][0]) and torch.equal(results[isa][1], results[""][1])
    compare(results[""], similarity_topk(q, c, 200, metric=metric, backend="torch"), {}, torch.float32)


# ---- GPU sizes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", [p for p in backend_matrix(OP) if p.values[1] == "cuda"])
def test_pool_above_2_31_pairs(backend, device):
    """B * N above 2**31: ids and offsets stay int64 end to end."""
    require_backend(OP, backend, device, torch.bfloat16)
    # fp32, cosine: the best match of query 7 sits at the very end of 2.2M candidates.
    q = torch.randn(1024, 16, device=device)
    c = torch.randn(2_200_000, 16, device=device)
    c[-1] = q[7] * 3
    values, indices = similarity_topk(q, c, 5, backend=backend)
    assert indices.dtype == torch.int64 and indices[7, 0].item() == c.shape[0] - 1
    # bf16, dot: checked against torch mm + topk per chunk of queries.
    gen = torch.Generator(device).manual_seed(3)
    q = torch.randn(1536, 64, device=device, generator=gen).bfloat16()
    c = torch.randn(1_500_000, 64, device=device, generator=gen).bfloat16()
    c[-1] = q[5] * 2  # the best match of query 5 is the last candidate
    values, indices = similarity_topk(q, c, 100, metric="dot", backend=backend)
    assert indices[5, 0].item() == c.shape[0] - 1
    for start in range(0, q.shape[0], 256):
        expected_values, _ = torch.topk(q[start : start + 256].float() @ c.float().T, 100)
        torch.testing.assert_close(values[start : start + 256], expected_values, atol=1e-3, rtol=1e-4)

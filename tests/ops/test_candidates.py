"""ek.Candidates, the handle of a fixed pool: every retrieval op on every backend gives bitwise the results it gives
with the bare tensor; the GPU backends' driver reads the handle's scales instead of norming the pool per call; the
scales follow in-place edits; bad pools and bad scales raise errors that name them."""
import pytest
import torch

import elva_kernels as ek
from elva_kernels import _retrieval
from tests.helpers import backend_matrix, dtypes_of, random_rows, require_backend

OPS = ("similarity_topk", "rank_statistics", "mine_hard_negatives")


def call(op, queries, pool, backend, metric):
    positives = torch.tensor([[0, 3], [5, -1], [7, 1]], device=queries.device)
    if op == "similarity_topk":
        return ek.similarity_topk(queries, pool, 7, metric=metric, exclude=positives, backend=backend)
    if op == "rank_statistics":
        return tuple(ek.rank_statistics(queries, pool, positives, metric=metric, backend=backend))
    return (ek.mine_hard_negatives(queries, pool, positives, n_hard=4, n_random=4, max_score=0.5, backend=backend),)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend,device", backend_matrix("similarity_topk", reference=True))
def test_a_handle_gives_the_tensor_results(op, backend, device):
    require_backend(op, backend, device)
    gen = torch.Generator().manual_seed(4)
    for dtype in dtypes_of(op, backend):
        require_backend(op, backend, device, dtype)
        queries = random_rows(gen, 3, 24, ties=False).to(dtype).to(device)
        pool = (random_rows(gen, 700, 24, ties=True) * 3).to(dtype).to(device)  # norms far from 1
        handle = ek.Candidates(pool)
        for metric in ("cosine", "dot") if op != "mine_hard_negatives" else ("cosine",):
            expected, got = call(op, queries, pool, backend, metric), call(op, queries, handle, backend, metric)
            for want, have in zip(expected, got):
                assert torch.equal(want, have), (op, metric, dtype)


class RecordNorms(torch.utils._python_dispatch.TorchDispatchMode):
    """The first-dimension sizes of the tensors whose vector norms are taken under it."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.linalg_vector_norm.default:
            self.rows.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "backend,device", [p for p in backend_matrix("similarity_topk") if p.values[0] in ("triton", "cuda")]
)
def test_the_gpu_driver_norms_the_pool_once(backend, device):
    """With a handle the pool is normed when its scales are first asked for, then never again; the queries still
    are, at every call. The driver is called directly: a mode sees no further than a registered op."""
    require_backend("similarity_topk", backend, device)
    kernels = _retrieval._triton_kernels() if backend == "triton" else _retrieval._cuda_kernels()
    queries, pool = torch.randn(4, 16, device=device), torch.randn(900, 16, device=device)
    handle = ek.Candidates(pool)
    positives = torch.tensor([[1], [2], [3], [4]], device=device)
    with RecordNorms() as bare:
        _retrieval.similarity_topk(kernels, queries, pool, 5, "cosine", None, None)
    with RecordNorms() as first:
        scale = handle.inverse_norms
    with RecordNorms() as handled:
        for _ in range(2):
            _retrieval.similarity_topk(kernels, queries, pool, 5, "cosine", None, None, handle.inverse_norms)
            _retrieval.rank_statistics(kernels, queries, pool, positives, "cosine", None, handle.inverse_norms)
    assert sorted(bare.rows) == [4, 900] and first.rows == [900] and handled.rows == [4] * 4
    assert torch.equal(scale, _retrieval.scales(pool, "cosine"))


def test_scales_follow_in_place_edits_and_inference_tensors():
    pool = torch.randn(50, 8)
    handle = ek.Candidates(pool)
    before = handle.inverse_norms.clone()
    assert handle.inverse_norms is handle.inverse_norms  # computed once
    pool.mul_(2)
    torch.testing.assert_close(handle.inverse_norms, before / 2)
    with torch.inference_mode():
        frozen = ek.Candidates(torch.randn(50, 8))
        assert frozen.inverse_norms is frozen.inverse_norms


def test_bad_pools_and_scales_raise_naming_them():
    with pytest.raises(TypeError, match="embeddings must be a 2-D float32/float16/bfloat16 tensor"):
        ek.Candidates(torch.arange(10).reshape(5, 2))
    with pytest.raises(TypeError, match="embeddings must be a 2-D"):
        ek.Candidates([[1.0, 2.0]])
    pool = torch.randn(20, 4)
    pool[3, 1] = float("nan")
    with pytest.raises(ValueError, match="the Candidates embeddings must contain only finite values"):
        ek.similarity_topk(torch.randn(2, 4), ek.Candidates(pool), 3)
    op = require_backend("similarity_topk", "triton", "cpu").handle
    q, c = torch.randn(2, 4), torch.randn(20, 4)
    with pytest.raises(ValueError, match=r"candidate_scale must be a float32 \[20\] tensor"):
        op(q, c, 3, "cosine", None, None, torch.ones(19))
    with pytest.raises(ValueError, match=r"candidate_scale must be a float32 \[20\] tensor"):
        op(q, c, 3, "cosine", None, None, torch.ones(20, dtype=torch.float64))


@pytest.mark.parametrize("backend,device", backend_matrix("similarity_topk", reference=True))
def test_opcheck_with_scales(backend, device):
    q, c = torch.randn(3, 8, device=device), torch.randn(60, 8, device=device)
    scale = ek.Candidates(c).inverse_norms
    positives = torch.tensor([[1], [2], [3]], device=device)
    for op, args in (("similarity_topk", (q, c, 4, "cosine", None, None, scale)),
                     ("rank_statistics", (q, c, positives, "cosine", None, scale)),
                     ("mine_hard_negatives", (q, c, positives, 2, 2, None, 0, scale))):
        torch.library.opcheck(require_backend(op, backend, device).handle, args)

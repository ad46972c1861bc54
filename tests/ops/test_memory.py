"""No hidden B x N memory: no backend allocates a buffer that grows with B * N (retrieval ops, and InfoNCE forward and
backward), the reference ops allocate tiles (counted op by op), and the C++ backend keeps to its documented buffers."""
import ctypes

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from elva_kernels import infonce_loss, rank_statistics, similarity_topk
from elva_kernels.reference import _common
from elva_kernels.reference.infonce_loss import infonce_loss as reference_infonce_loss
from elva_kernels.reference.mine_hard_negatives import mine_hard_negatives as reference_mine_hard_negatives
from elva_kernels.reference.rank_statistics import rank_statistics as reference_rank_statistics
from elva_kernels.reference.similarity_topk import similarity_topk as reference_similarity_topk
from tests.helpers import backend_matrix, require_backend

B, N, D = 128, 100_000, 8  # B * N = 12.8M elements; one tile is 1M
# Peak memory: a [BATCH, POOL] fp32 score matrix is 586 MiB, far above tiles and top-k state.
BATCH, POOL, DIM, K = 512, 300_000, 16, 100

REFERENCE = {
    "similarity_topk": lambda q, c, positives: reference_similarity_topk(q, c, 100, "cosine", positives, None),
    "rank_statistics": lambda q, c, positives: reference_rank_statistics(q, c, positives, "cosine", positives),
    "mine_hard_negatives": lambda q, c, positives: reference_mine_hard_negatives(q, c, positives, 20, 20, None, 0),
}


def matrix(ops, *, only=None):
    """(op, backend, device) over each op's matrix with the reference (or only the ``only`` backend). Triton on CPU
    tensors is left out: at sizes where B x N dwarfs a tile the interpreter runs for minutes, and the memory it
    uses is numpy's, not the kernel's (on a GPU the same Triton kernels are measured)."""
    return [
        pytest.param(op, *p.values, marks=p.marks, id=f"{op}-{p.id}")
        for op in ops
        for p in backend_matrix(op, reference=True)
        if p.values != ("triton", "cpu") and only in (None, p.values[0])
    ]


class LargestAllocation(TorchDispatchMode):
    """Records the largest number of elements of any new tensor an op returns (views allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def largest_allocation(fn) -> int:
    with LargestAllocation() as mode:
        fn()
    return mode.largest


def _peak_resident_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def peak_growth_mib(fn, device: str) -> float:
    """How far ``fn`` lifts the peak memory of ``device`` above its level before the call. CPU: the process's peak
    resident set, reset to the current one (``clear_refs``) after the freed heap is handed back (``malloc_trim``),
    so pages an earlier test freed cannot hide a new allocation. CUDA: the caching allocator's peak."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    ctypes.CDLL(None).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _peak_resident_kib()
    fn()
    return (_peak_resident_kib() - before) / 1024


def retrieval_call(op, backend, q, c, positives):
    if op == "similarity_topk":
        return lambda: similarity_topk(q, c, K, backend=backend)
    return lambda: rank_statistics(q, c, positives, backend=backend)


@pytest.mark.parametrize("op,backend,device", matrix(REFERENCE, only="torch"))
def test_reference_ops_allocate_tiles_not_score_matrices(op, backend, device):
    require_backend(op, backend, device)
    queries, candidates = torch.randn(B, D, device=device), torch.randn(N, D, device=device)
    positives = torch.randint(0, N, (B, 2), device=device)
    ceiling = 2 * _common.TILE_ELEMENTS  # a tile, plus the running top-k beside it
    assert ceiling < B * N / 4
    assert largest_allocation(lambda: REFERENCE[op](queries, candidates, positives)) <= ceiling


@pytest.mark.parametrize("op,backend,device", matrix(["similarity_topk"]))
def test_similarity_topk_backward_allocates_no_score_matrix(op, backend, device):
    require_backend(op, backend, device)
    queries = torch.randn(B, D, device=device, requires_grad=True)
    candidates = torch.randn(N, D, device=device, requires_grad=True)
    values, _ = similarity_topk(queries, candidates, 50, backend=backend)
    # The candidate gradient itself is [N, d]: that, not B * N, is the bound.
    assert largest_allocation(lambda: values.sum().backward()) <= max(N * D, 2 * _common.TILE_ELEMENTS)


@pytest.mark.parametrize("op,backend,device", matrix(["similarity_topk", "rank_statistics"]))
def test_peak_memory_does_not_grow_with_b_times_n(op, backend, device):
    """Measured, not counted: whatever a backend allocates, inside a kernel or not, must stay well below a
    [B, N] fp32 score matrix."""
    require_backend(op, backend, device)
    q, c = torch.randn(BATCH, DIM, device=device), torch.randn(POOL, DIM, device=device)
    positives = torch.randint(0, POOL, (BATCH,), device=device)
    retrieval_call(op, backend, q[:2], c[:1000], positives[:2] % 1000)()  # warm-up: allocator, thread pools
    grown_mib = peak_growth_mib(retrieval_call(op, backend, q, c, positives), device)
    score_matrix_mib = BATCH * POOL * 4 / 2**20
    assert grown_mib < score_matrix_mib / 4, (
        f"peak memory grew {grown_mib:.0f} MiB; a score matrix is {score_matrix_mib:.0f} MiB"
    )


def test_cpu_backend_peak_memory_is_b_times_k_plus_tiles():
    """The C++ backend, N large: rank_statistics and similarity_topk may add only their documented buffers (the
    prepared queries, top-k entries for B x (k + max(k, 256)) candidates, the [B, k] outputs) plus per-thread
    tiles, never anything that grows with N (not even a prepared [N, d] copy of the pool, 18 MiB here)."""
    q, c = torch.randn(BATCH, DIM), torch.randn(POOL, DIM)
    positives = torch.randint(0, POOL, (BATCH,))
    grown = {}
    for op in ("rank_statistics", "similarity_topk"):
        require_backend(op, "cpu")
        retrieval_call(op, "cpu", q[:2], c[:1000], positives[:2] % 1000)()  # warm-up: allocator, OpenMP threads
        grown[op] = peak_growth_mib(retrieval_call(op, "cpu", q, c, positives), "cpu")
    entry = 16  # a (fp32 score, int64 index) entry, padded
    documented = BATCH * DIM * 4 + BATCH * (K + max(K, 256)) * entry + BATCH * K * (4 + 8)
    bound_mib = documented / 2**20 + 8  # + per-thread candidate blocks and score tiles (a few MiB on 2 cores)
    assert grown["rank_statistics"] <= 8, (
        f"rank_statistics grew peak RSS by {grown['rank_statistics']:.1f} MiB; it keeps O(B) state and tiles"
    )
    assert grown["similarity_topk"] <= bound_mib, (
        f"similarity_topk grew peak RSS by {grown['similarity_topk']:.1f} MiB; O(B k + tile) allows {bound_mib:.0f} MiB"
        f" (a score matrix is {BATCH * POOL * 4 / 2**20:.0f} MiB)"
    )


def test_reference_infonce_allocates_tiles_not_score_matrices(monkeypatch):
    """Forward and backward of the torch reference: no op returns more than a few tiles or the (B + N) x d
    embeddings and gradients. A small tile makes B * N dominate at a size that runs in a second."""
    monkeypatch.setattr(_common, "TILE_ELEMENTS", 1 << 18)
    num_queries, num_candidates, d = 64, 200_000, 8
    q = torch.randn(num_queries, d, requires_grad=True)
    c = torch.randn(num_candidates, d, requires_grad=True)
    tau = torch.tensor(0.05, requires_grad=True)
    labels = torch.arange(num_queries)
    fn = torch.randint(num_queries, num_candidates, (num_queries, 4))
    bound = max(4 * _common.TILE_ELEMENTS, (num_queries + num_candidates) * d)
    assert bound * 4 < num_queries * num_candidates
    assert largest_allocation(lambda: reference_infonce_loss(q.detach(), c.detach(), labels, tau.detach(), True, fn)) <= bound
    loss, lse = torch.ops.elva.infonce_loss_torch(q, c, labels, tau, True, fn)
    assert largest_allocation(lambda: torch.autograd.grad(loss.sum() + lse.sum(), (q, c, tau))) <= bound


# (B = N, d, dtype) per device: a [B, N] fp32 matrix is 1 GiB on the CPU, 4 GiB on a GPU.
INFONCE_SIZES = {"cpu": (16384, 16, torch.float32), "cuda": (32768, 256, torch.bfloat16)}


@pytest.mark.parametrize("op,backend,device", matrix(["infonce_loss"]))
def test_infonce_peak_memory_does_not_grow_with_b_times_n(op, backend, device):
    """Forward and backward, symmetric with false negatives: the peak stays far below one [B, N] fp32 matrix."""
    size, dim, dtype = INFONCE_SIZES[device]
    require_backend(op, backend, device, dtype)
    q = torch.randn(size, dim, device=device, dtype=dtype, requires_grad=True)
    c = torch.randn(size, dim, device=device, dtype=dtype, requires_grad=True)
    fn = torch.randint(-1, size, (size, 2), device=device)
    fn = torch.where(fn == torch.arange(size, device=device)[:, None], -1, fn)

    def forward_and_backward(rows=size, false_negatives=fn):
        infonce_loss(q[:rows], c[:rows], symmetric=True, false_negatives=false_negatives, backend=backend).backward()

    forward_and_backward(64, None)  # warm-up: allocator, thread pools
    grown_mib = peak_growth_mib(forward_and_backward, device)
    score_matrix_mib = size * size * 4 / 2**20
    assert grown_mib < score_matrix_mib / 8, (
        f"peak memory grew {grown_mib:.0f} MiB; a [B, N] fp32 matrix is {score_matrix_mib:.0f} MiB"
    )

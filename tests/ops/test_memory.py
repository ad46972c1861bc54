"""No hidden B x N memory: the reference ops never allocate a buffer that grows with B * N."""
import subprocess
import sys
import textwrap

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from elva_kernels import similarity_topk
from elva_kernels.reference import _common
from elva_kernels.reference.mine_hard_negatives import mine_hard_negatives
from elva_kernels.reference.rank_statistics import rank_statistics
from elva_kernels.reference.similarity_topk import similarity_topk as reference_similarity_topk

B, N, D = 128, 400_000, 8  # B * N = 51.2M elements; one tile is 4.2M


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


def test_reference_ops_allocate_tiles_not_score_matrices():
    queries, candidates = torch.randn(B, D), torch.randn(N, D)
    positives = torch.randint(0, N, (B, 2))
    ceiling = 2 * _common.TILE_ELEMENTS  # a tile, plus the running top-k beside it
    assert ceiling < B * N / 4
    assert largest_allocation(lambda: reference_similarity_topk(queries, candidates, 100, "cosine", positives, None)) <= ceiling
    assert largest_allocation(lambda: rank_statistics(queries, candidates, positives, "cosine", positives)) <= ceiling
    assert largest_allocation(lambda: mine_hard_negatives(queries, candidates, positives, 20, 20, None, 0)) <= ceiling


def test_similarity_topk_backward_allocates_no_score_matrix():
    queries = torch.randn(B, D, requires_grad=True)
    candidates = torch.randn(N, D, requires_grad=True)
    values, _ = similarity_topk(queries, candidates, 50, backend="torch")
    # The candidate gradient itself is [N, d]: that, not B * N, is the bound.
    assert largest_allocation(lambda: values.sum().backward()) <= max(N * D, 2 * _common.TILE_ELEMENTS)


def test_peak_resident_memory_does_not_grow_with_b_times_n():
    """A real process: a [B, N] fp32 buffer would add 1.2 GB here; the op must stay near its tiles."""
    script = textwrap.dedent(
        """
        import resource, torch
        from elva_kernels import rank_statistics, similarity_topk
        torch.manual_seed(0)
        q, c = torch.randn(1024, 16), torch.randn(300_000, 16)
        positives = torch.randint(0, 300_000, (1024,))
        similarity_topk(q[:2], c[:10], 1)  # warm-up: allocator, thread pools
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        similarity_topk(q, c, 100, backend="torch")
        rank_statistics(q, c, positives, backend="torch")
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
        """
    )
    grown_mib = int(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout.split()[-1])
    score_matrix_mib = 1024 * 300_000 * 4 // 2**20
    assert grown_mib < score_matrix_mib / 4, f"peak RSS grew {grown_mib} MiB; a score matrix is {score_matrix_mib} MiB"


def test_cpu_backend_peak_memory_is_b_times_k_plus_tiles():
    """The C++ backend in a real process, N large: rank_statistics and then similarity_topk may add only their
    documented buffers (the prepared queries, top-k entries for B x (k + max(k, 256)) candidates, the [B, k]
    outputs) plus per-thread tiles, never anything that grows with N (a [B, N] fp32 matrix is 1.2 GB here)."""
    from tests.helpers import backend_or_skip

    for op in ("similarity_topk", "rank_statistics"):
        backend_or_skip(op, "cpu", "cpu", torch.float32)
    batch, pool, dim, k = 1024, 300_000, 16, 100
    script = textwrap.dedent(
        f"""
        import resource, torch
        from elva_kernels import rank_statistics, similarity_topk
        torch.manual_seed(0)
        q, c = torch.randn({batch}, {dim}), torch.randn({pool}, {dim})
        positives = torch.randint(0, {pool}, ({batch},))
        similarity_topk(q[:2], c[:1000], 1, backend="cpu")  # warm-up: allocator, OpenMP threads
        rank_statistics(q[:2], c[:1000], positives[:2] % 1000, backend="cpu")
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
        before = peak()
        rank_statistics(q, c, positives, backend="cpu")
        ranked = peak()
        similarity_topk(q, c, {k}, backend="cpu")
        print((ranked - before) // 1024, (peak() - before) // 1024)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    rank_mib, topk_mib = (int(x) for x in result.stdout.split()[-2:])
    entry = 16  # a (fp32 score, int64 index) entry, padded
    documented = batch * dim * 4 + batch * (k + max(k, 256)) * entry + batch * k * (4 + 8)
    bound_mib = documented / 2**20 + 8  # + per-thread candidate blocks and score tiles (a few MiB on 2 cores)
    score_matrix_mib = batch * pool * 4 / 2**20
    assert rank_mib <= 8, f"rank_statistics grew peak RSS by {rank_mib} MiB; it keeps O(B) state and tiles"
    assert topk_mib <= bound_mib, (
        f"similarity_topk grew peak RSS by {topk_mib} MiB; O(B k + tile) allows {bound_mib:.0f} MiB"
        f" (a score matrix is {score_matrix_mib:.0f} MiB)"
    )

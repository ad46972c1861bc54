"""A1, distributed: the global top-k over candidates sharded across a torch.distributed group."""
from __future__ import annotations

import torch
import torch.distributed as dist

from elva_kernels import _validate
from elva_kernels.candidates import Candidates
from elva_kernels.ops.similarity_topk import similarity_topk


def _gather(tensor: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def sharded_similarity_topk(
    queries: torch.Tensor,
    candidate_shard: torch.Tensor | Candidates,
    k: int,
    *,
    group=None,
    shard_offset: int | None = None,
    metric: str = "cosine",
    exclude: torch.Tensor | None = None,
    max_score: float | torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global exact top-k when every rank holds one shard of the candidates.

    Every rank passes the same ``queries`` and its own ``candidate_shard`` [N_r, d] (or an ``ek.Candidates``
    handle of it, for a fixed pool). A global
    id is the shard's offset plus the local index; offsets default to the shard sizes in rank
    order (gathered over ``group``). ``exclude`` holds global ids. Every rank returns the same
    (values [B, k] fp32, global indices [B, k] int64), identical to ``similarity_topk`` on the
    concatenated candidates; k may not exceed the total number of candidates.

    Not differentiable: the result is gathered without gradient (evaluation and mining).

    Extra memory: the local op's, plus world_size x [B, k] for the gathered partial results.
    Communication: one all_gather of the shard sizes, two of [B, k] (values and ids).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("sharded_similarity_topk needs an initialised torch.distributed process group")
    shard = candidate_shard.embeddings if isinstance(candidate_shard, Candidates) else candidate_shard
    _validate.tensor("candidate_shard", shard, ndim=2, form="[N_r, d]")
    device = shard.device
    sizes = torch.stack(_gather(torch.tensor([shard.shape[0]], device=device), group)).flatten().tolist()
    if shard_offset is None:
        shard_offset = sum(sizes[: dist.get_rank(group)])
    _validate.int_in_range("shard_offset", shard_offset, 0)
    _validate.int_in_range("k", k, 1, sum(sizes))
    local_exclude = None
    if exclude is not None:
        exclude = _validate.id_matrix("exclude", exclude, queries.shape[0], allow_1d=False, form="int64 [B, m]")
        local = exclude - shard_offset
        local_exclude = torch.where((exclude >= 0) & (local < shard.shape[0]) & (local >= 0), local, -1)
    with torch.no_grad():
        values, indices = similarity_topk(
            queries,
            candidate_shard,
            min(k, shard.shape[0]),
            metric=metric,
            exclude=local_exclude,
            max_score=max_score,
            backend=backend,
        )
    # Every rank sends k entries (all_gather needs equal sizes); a shard smaller than k pads.
    short = k - values.shape[1]
    values = torch.nn.functional.pad(values, (0, short), value=float("-inf"))
    indices = torch.nn.functional.pad(indices, (0, short), value=-1)
    global_ids = torch.where(indices >= 0, indices + shard_offset, -1)
    all_values = torch.cat(_gather(values, group), 1)
    all_ids = torch.cat(_gather(global_ids, group), 1)
    # Total order over the union: ids ascending first, then a stable sort by score descending.
    padded_ids = all_ids.masked_fill(all_ids < 0, torch.iinfo(torch.int64).max)
    by_id = torch.sort(padded_ids, dim=1, stable=True).indices
    by_score = torch.sort(all_values.gather(1, by_id), dim=1, descending=True, stable=True).indices[:, :k]
    order = by_id.gather(1, by_score)
    return all_values.gather(1, order), all_ids.gather(1, order)

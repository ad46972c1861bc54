"""Kernel demo on a synthetic retrieval problem: the reference against the fastest backend here.

Queries are noisy copies of known candidates, so each query has one true positive. For every
op, the demo runs the ``torch`` reference and what ``backend="auto"`` picks on this machine,
and prints the agreement between the two, the retrieval quality and the timings.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import elva_kernels
from elva_kernels import _dispatch


@dataclass
class Problem:
    queries: torch.Tensor
    candidates: torch.Tensor
    positives: torch.Tensor


def make_problem(num_queries: int, num_candidates: int, dim: int, noise: float, seed: int) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    candidates = torch.randn(num_candidates, dim, generator=gen)
    positives = torch.randperm(num_candidates, generator=gen)[:num_queries]
    queries = candidates[positives] + noise * torch.randn(num_queries, dim, generator=gen)
    return Problem(queries, candidates, positives)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start) * 1e3


def backend_for(op: str, problem: Problem) -> str:
    call = _dispatch.Call(problem.queries.device, problem.queries.dtype, {})
    return _dispatch.select(op, "auto", call).name


def run(num_queries: int = 512, num_candidates: int = 100_000, dim: int = 128, k: int = 10, noise: float = 2.5, seed: int = 0) -> dict:
    problem = make_problem(num_queries, num_candidates, dim, noise, seed)
    q, c, pos = problem.queries, problem.candidates, problem.positives
    print(f"synthetic retrieval: {num_queries} queries, {num_candidates} candidates, d={dim}, k={k}, noise={noise}")
    rows = []

    ref, ref_ms = timed(lambda: elva_kernels.similarity_topk(q, c, k, backend="torch"))
    fast, fast_ms = timed(lambda: elva_kernels.similarity_topk(q, c, k))
    recall = (fast[1] == pos[:, None]).any(1).float().mean().item()
    agree = (fast[1] == ref[1]).float().mean().item()
    rows.append(("similarity_topk", backend_for("similarity_topk", problem), ref_ms, fast_ms, f"top-{k} ids agree {agree:.4f}; Recall@{k} {recall:.4f}"))

    ref, ref_ms = timed(lambda: elva_kernels.rank_statistics(q, c, pos, ks=(1, k), backend="torch"))
    fast, fast_ms = timed(lambda: elva_kernels.rank_statistics(q, c, pos, ks=(1, k)))
    agree = (fast.rank == ref.rank).float().mean().item()
    mrr = fast.reciprocal_rank.mean().item()
    consistent = fast.hits[:, 1].float().mean().item() == recall
    rows.append(("rank_statistics", backend_for("rank_statistics", problem), ref_ms, fast_ms, f"ranks agree {agree:.4f}; MRR {mrr:.4f}; Recall@{k} matches top-k: {consistent}"))

    ref, ref_ms = timed(lambda: elva_kernels.l2_normalize(c, backend="torch"))
    fast, fast_ms = timed(lambda: elva_kernels.l2_normalize(c))
    rows.append(("l2_normalize", backend_for("l2_normalize", problem), ref_ms, fast_ms, f"max |diff| {(fast - ref).abs().max().item():.2e}"))

    batch = c[:num_queries]
    ref, ref_ms = timed(lambda: elva_kernels.infonce_loss(q, batch, backend="torch"))
    fast, fast_ms = timed(lambda: elva_kernels.infonce_loss(q, batch))
    rows.append(("infonce_loss", backend_for("infonce_loss", problem), ref_ms, fast_ms, f"loss {fast.item():.4f} (|diff| {(fast - ref).abs().item():.1e})"))

    hard, _ = timed(lambda: elva_kernels.mine_hard_negatives(q, c, pos, n_hard=50, n_random=50))
    cands = torch.cat([pos[:, None], hard.clamp_min(0)], 1)[:64]
    rollouts = q[:64, None, :] + 0.3 * torch.randn(64, 8, dim, generator=torch.Generator().manual_seed(seed))
    cand_emb = c[cands]  # [64, 101, d]: positive first, then 50 hard and 50 random negatives
    ref, ref_ms = timed(lambda: elva_kernels.elva_rewards(rollouts, cand_emb, backend="torch"))
    fast, fast_ms = timed(lambda: elva_kernels.elva_rewards(rollouts, cand_emb))
    rows.append(("elva_rewards", backend_for("elva_rewards", problem), ref_ms, fast_ms, f"mean R_total {fast.total.mean().item():.4f}; mean rank of positive {fast.rank.float().mean().item():.2f}"))

    print(f"\n{'op':<17}{'auto backend':<14}{'reference ms':>13}{'auto ms':>10}  result")
    for op, backend, ref_ms, fast_ms, result in rows:
        print(f"{op:<17}{backend:<14}{ref_ms:>13.1f}{fast_ms:>10.1f}  {result}")
    return {"recall": recall, "rows": rows}

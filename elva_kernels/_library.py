"""The torch.library namespace ``elva`` and every op's schema, in one place.

Each op has one signature and one registered op per concrete backend
(``elva::similarity_topk_torch``, ``..._cpu``, ``..._cuda``, ``..._triton``): ``auto`` is resolved
in Python before the call, so fakes, autograd and ``opcheck`` always see a concrete op.
The ``torch`` variant is the reference in ``reference/<op>.py``; the others are implemented
by the C++ extension (``csrc/bindings``) or by Triton launchers (``triton/<op>.py``).
"""
from __future__ import annotations

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")

SIGNATURES = {
    # Rows L2-normalised in fp32: the first step of every cosine op.
    "l2_normalize": "(Tensor x, float eps) -> Tensor",
    # max_score arrives as a [B] fp32 tensor (a float is broadcast in Python). candidate_scale (pool_scale): the
    # pool's fp32 [N] inverse L2 norms from an ek.Candidates handle, for cosine; backends that norm each block on
    # the fly (cpu, torch) do not read it.
    "similarity_topk": (
        "(Tensor queries, Tensor candidates, int k, str metric, Tensor? exclude, Tensor? max_score,"
        " Tensor? candidate_scale=None) -> (Tensor values, Tensor indices)"
    ),
    # hits, reciprocal_rank and margin are O(B) arithmetic on these, done in Python.
    "rank_statistics": (
        "(Tensor queries, Tensor candidates, Tensor positives, str metric, Tensor? exclude,"
        " Tensor? candidate_scale=None) -> (Tensor rank, Tensor pos_score, Tensor max_neg_score)"
    ),
    # positive_index is an int64 [B] tensor; scores is empty unless return_scores.
    "elva_rewards": (
        "(Tensor query_emb, Tensor cand_emb, Tensor positive_index, Tensor? mask, float delta, float gamma,"
        " float alpha, float eps, float log_base, str advantage, float adv_eps, bool return_scores)"
        " -> (Tensor total, Tensor margin, Tensor rank_reward, Tensor rank, Tensor advantages, Tensor scores)"
    ),
    # Per-row losses and LSEs; the reduction is plain torch in Python. temperature is a 0-dim fp32 tensor.
    "infonce_loss": (
        "(Tensor queries, Tensor candidates, Tensor labels, Tensor temperature, bool symmetric,"
        " Tensor? false_negatives) -> (Tensor loss, Tensor lse)"
    ),
    # The memory-linear backward of infonce_loss, one per backend: gradients of the loss and lse given their
    # upstream gradients (fp32 [B]). output_mask says which of (queries, candidates, temperature) are wanted;
    # the others come back as empty tensors.
    "infonce_loss_backward": (
        "(Tensor queries, Tensor candidates, Tensor labels, Tensor temperature, bool symmetric,"
        " Tensor? false_negatives, Tensor loss, Tensor lse, Tensor grad_loss, Tensor grad_lse, bool[3] output_mask)"
        " -> (Tensor grad_queries, Tensor grad_candidates, Tensor grad_temperature)"
    ),
    "mine_hard_negatives": (
        "(Tensor query_emb, Tensor pool_emb, Tensor positives, int n_hard, int n_random, Tensor? max_score,"
        " int seed, Tensor? pool_scale=None) -> Tensor"
    ),
}

# Building blocks of the GPU backends (elva_kernels/_retrieval.py drives them; the Triton launchers in
# triton/ take the same arguments, less chunk_columns). Keys, scores and eligibility are defined in that module's
# docstring.
#   split_topk: the list_size largest eligible keys of every (query, candidate split), any order.
#   pair_scores: the score of (row, ids[row, j]) with the arithmetic of the counting pass, -inf for id -1.
#   rank_counts: one counting pass in chunks (csrc/include/elva/rank_count_select.h): per query, the negatives
#     (ids not in listed, int32 [B, L] ascending, INT32_MAX padded) ranked ahead of the best positive (pos_score,
#     its id pos_id; pos_below the next float below pos_score), int32 [B], and the best negative score.
#   threshold_topk: the threshold pass in chunks, a matmul of chunk_columns candidates then the select of
#     csrc/include/elva/threshold_select.h (count int32 [B], scores fp32 [B, capacity], ids int32 [B, capacity]).
# The chunked kernels run every GEMM of a call at one shape (B x chunk_columns x d), so a candidate scores the
# same in every chunk and in pair_scores.
KERNEL_SIGNATURES = {
    "split_topk": (
        "(Tensor queries, Tensor candidates, Tensor query_scale, Tensor candidate_scale, Tensor? exclude,"
        " Tensor? max_score, Tensor upper, int split_size, int list_size, int key_mode, int seed)"
        " -> (Tensor keys, Tensor nonfinite)"
    ),
    "pair_scores": (
        "(Tensor queries, Tensor candidates, Tensor query_scale, Tensor candidate_scale, Tensor ids,"
        " int chunk_columns) -> Tensor"
    ),
    "rank_counts": (
        "(Tensor queries, Tensor candidates, Tensor query_scale, Tensor candidate_scale, Tensor listed,"
        " Tensor pos_score, Tensor pos_below, Tensor pos_id, int chunk_columns)"
        " -> (Tensor ahead, Tensor max_neg_score, Tensor nonfinite)"
    ),
    "threshold_topk": (
        "(Tensor queries, Tensor candidates, Tensor query_scale, Tensor candidate_scale, Tensor threshold,"
        " Tensor? max_score, int capacity, int chunk_columns) -> (Tensor count, Tensor scores, Tensor ids,"
        " Tensor nonfinite)"
    ),
}
# Kernels with a CPU twin: the same loop and rule, so that the CPU tests cover the CUDA design.
CPU_TWINS = ("pair_scores", "rank_counts", "threshold_topk")

lib = torch.library.Library("elva", "DEF")
for _op, _signature in SIGNATURES.items():
    for _backend in BACKENDS:
        lib.define(f"{_op}_{_backend}{_signature}")
for _kernel, _signature in KERNEL_SIGNATURES.items():
    for _device in ("cuda", "cpu") if _kernel in CPU_TWINS else ("cuda",):
        lib.define(f"{_kernel}_{_device}{_signature}")


def qualname(op: str, backend: str) -> str:
    return f"elva::{op}_{backend}"


def handle(op: str, backend: str):
    return getattr(torch.ops.elva, f"{op}_{backend}").default


def variants(op: str) -> list[str]:
    """Qualified names of every backend variant of ``op`` (they share fake and autograd)."""
    return [qualname(op, b) for b in BACKENDS]

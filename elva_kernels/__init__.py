"""elva_kernels: fused retrieval-ranking ops (similarity top-k, rank statistics, ELVA rewards, InfoNCE).

Every op takes ``backend="auto"|"triton"|"cuda"|"cpu"|"torch"``; ``info()`` shows which one
serves each op on this machine and why the others cannot.
"""
from elva_kernels import _library  # noqa: F401  (defines the schemas first)
from elva_kernels._info import info
from elva_kernels.candidates import Candidates
from elva_kernels.ops.elva_rewards import ElvaRewards, elva_rewards, group_advantages
from elva_kernels.ops.infonce_loss import infonce_loss
from elva_kernels.ops.l2_normalize import l2_normalize
from elva_kernels.ops.mine_hard_negatives import mine_hard_negatives
from elva_kernels.ops.rank_statistics import RankStatistics, rank_statistics
from elva_kernels.ops.sharded_similarity_topk import sharded_similarity_topk
from elva_kernels.ops.similarity_topk import similarity_topk

__all__ = [
    "Candidates",
    "ElvaRewards",
    "RankStatistics",
    "elva_rewards",
    "group_advantages",
    "info",
    "infonce_loss",
    "l2_normalize",
    "mine_hard_negatives",
    "rank_statistics",
    "sharded_similarity_topk",
    "similarity_topk",
]

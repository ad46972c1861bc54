"""``Candidates``: a fixed candidate pool whose cosine scales are computed once, for any number of calls.

Cosine scores scale each candidate's dot products by 1 / max(||c||, eps). The GPU backends compute those inverse
norms with one read of the whole pool per call, which costs 13-19% of the matmul itself at d = 1536; over a fixed
pool (evaluation, mining) the handle computes them, and checks the pool for NaN/Inf, once. ``similarity_topk``,
``rank_statistics`` and ``mine_hard_negatives`` take a handle wherever they take the pool, and give the same
results as with the bare tensor: the scales are ``_retrieval.scales`` of the same rows. Backends that norm
each block on the fly (cpu, torch) use the rows alone.

The handle holds the tensor it was made from; it recomputes the scales if that tensor is modified in place
(torch's version counter tells; an inference-mode tensor has none, so its scales are computed once).
"""
from __future__ import annotations

import torch

from elva_kernels import _retrieval, _validate


class Candidates:
    """A candidate pool [N, d] (fp32/fp16/bf16) with its fp32 [N] inverse L2 norms, checked finite once.

    Example:
        >>> pool = Candidates(torch.randn(1000, 64))
        >>> values, ids = similarity_topk(queries, pool, k=10)   # any number of calls, one norm pass
    """

    def __init__(self, embeddings: torch.Tensor):
        is_matrix = isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2
        if not is_matrix or embeddings.dtype not in _validate.FLOAT_DTYPES:
            got = f"shape {tuple(embeddings.shape)}, dtype {embeddings.dtype}" if isinstance(
                embeddings, torch.Tensor) else type(embeddings).__name__
            raise TypeError(f"embeddings must be a 2-D float32/float16/bfloat16 tensor [N, d]; got {got}")
        self.embeddings = embeddings  # may be empty (an empty pool): the ops refuse it when called
        self._inverse_norms: torch.Tensor | None = None
        self._version: int | None = None

    @property
    def inverse_norms(self) -> torch.Tensor:
        """fp32 [N]: 1 / max(||row||, eps), as the kernels scale cosine scores; computed at first use."""
        # Inference tensors keep no version counter: their scales are computed once.
        version = None if self.embeddings.is_inference() else self.embeddings._version
        if self._inverse_norms is None or version != self._version:
            with torch.no_grad():
                _validate.finite("the Candidates embeddings", self.embeddings)
                self._inverse_norms = _retrieval.scales(self.embeddings, "cosine")
            self._version = version
        return self._inverse_norms

    @property
    def shape(self) -> torch.Size:
        return self.embeddings.shape

    def __repr__(self) -> str:
        return f"Candidates({tuple(self.embeddings.shape)}, {self.embeddings.dtype}, {self.embeddings.device})"


def unwrap(candidates, metric: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the pool tensor, its cosine scales or None): a handle's precomputed scales for "cosine", nothing for "dot"
    (whose scales are 1) or for a bare tensor."""
    if isinstance(candidates, Candidates):
        return candidates.embeddings, candidates.inverse_norms if metric == "cosine" else None
    return candidates, None


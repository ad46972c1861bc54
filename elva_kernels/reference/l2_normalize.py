"""Reference: rows L2-normalised in fp32, the first step of every cosine op."""
from __future__ import annotations

import torch

from elva_kernels import _validate


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """x [n, d] -> fp32 [n, d] with y = x / max(||x||_2, eps), as F.normalize does."""
    _validate.finite("x", x)
    x = x.float()
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)

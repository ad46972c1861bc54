"""The common input rules of SPEC Part A, shared by every op.

Two kinds of check live here:

* metadata checks (rank, shape, dtype, device, option values) run in the public
  function before dispatch. They read no tensor data, so they cost nothing and
  trace under ``torch.compile``;
* data checks (ids in range, finite values) read tensor data. The reference
  backend calls them itself; a fast backend may instead fuse them into its kernel
  and raise after the launch, as long as nothing is returned (SPEC "Checks must
  not cost a pass over the data").

Every error names the argument, the expected form and what came.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def tensor(name: str, t, *, ndim: int | Sequence[int], dtypes=FLOAT_DTYPES, form: str) -> torch.Tensor:
    """Check type, rank, dtype and non-emptiness; ``form`` reads like "[B, d]"."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {form}; got {type(t).__name__}")
    ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if t.dim() not in ranks:
        raise ValueError(f"{name} must be a {' or '.join(f'{r}-D' for r in ranks)} tensor {form}; got {_describe(t)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}); got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty {form}; got {_describe(t)}")
    return t


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")
    return next(iter(devices))


def same_float_dtype(**tensors: torch.Tensor) -> None:
    dtypes = {v.dtype for v in tensors.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{k} {v.dtype}" for k, v in tensors.items())
        raise TypeError(f"embeddings must share one dtype; got {listing}")


def dim_matches(name: str, t: torch.Tensor, axis: int, expected: int, what: str, form: str) -> None:
    if t.shape[axis] != expected:
        raise ValueError(f"{name} must be {form} with {what} = {expected}; got shape {tuple(t.shape)}")


def choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}; got {value!r}")


def int_in_range(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" and <= {high}"
        raise ValueError(f"{name} must be >= {low}{upper}; got {value}")
    return value


def positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float; got {type(value).__name__}")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite float > 0; got {value}")
    return float(value)


def id_matrix(name: str, ids, rows: int, *, allow_1d: bool, form: str) -> torch.Tensor:
    """int64 ids [rows] or [rows, m] (-1 = padding). Returns the 2-D view."""
    tensor(name, ids, ndim=(1, 2) if allow_1d else 2, dtypes=(torch.int64,), form=form)
    if ids.shape[0] != rows:
        raise ValueError(f"{name} must be {form} with one row per query ({rows}); got shape {tuple(ids.shape)}")
    return ids if ids.dim() == 2 else ids.unsqueeze(1)


def pool_scale(name: str, scale, rows: int, device: torch.device) -> None:
    """A pool's cosine scales, when given: fp32 [rows] on the pool's device (a ``Candidates`` handle's)."""
    if scale is None:
        return
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or tuple(scale.shape) != (rows,):
        got = _describe(scale) if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(f"{name} must be a float32 [{rows}] tensor (a Candidates handle's inverse norms); got {got}")
    if scale.device != device:
        raise ValueError(f"{name} must be on {device} like the embeddings; got {scale.device}")


def per_query_float(name: str, value, rows: int, device: torch.device) -> torch.Tensor | None:
    """A float or a [rows] float tensor -> a [rows] fp32 tensor (or None)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.shape[0] != rows or not value.is_floating_point():
            raise ValueError(f"{name} must be a float or a float tensor [{rows}]; got {_describe(value)}")
        if value.device != device:
            raise ValueError(f"{name} must be on {device} like the embeddings; got {value.device}")
        return value.float()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a float tensor [{rows}]; got {type(value).__name__}")
    return torch.full((rows,), float(value), dtype=torch.float32, device=device)


# ---- data checks (read the tensors; see the module docstring) -------------------------------

def finite(name: str, t: torch.Tensor, *, chunk_elements: int = 1 << 20) -> None:
    """Row chunks keep the check's temporaries small (isfinite on a whole pool would copy it)."""
    rows = t.reshape(t.shape[0], -1) if t.dim() > 0 else t.reshape(1, 1)
    step = max(1, chunk_elements // max(rows.shape[1], 1))
    bad = 0
    for start in range(0, rows.shape[0], step):
        bad += int((~torch.isfinite(rows[start : start + step])).sum())
    if bad:
        raise ValueError(f"{name} must contain only finite values; found {bad} NaN/Inf entries")


def ids_in_range(name: str, ids: torch.Tensor, n: int, *, pad: bool = True) -> None:
    """Every id in [0, n); -1 is allowed as padding when ``pad``."""
    low = -1 if pad else 0
    bad = (ids < low) | (ids >= n)
    if bool(bad.any()):
        first = ids[bad][0].item()
        allowed = f"-1 (padding) or [0, {n})" if pad else f"[0, {n})"
        raise ValueError(f"{name} holds ids outside {allowed}; got {first}")

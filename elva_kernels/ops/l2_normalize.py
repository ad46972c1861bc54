"""Row L2-normalisation in fp32: the cosine prologue, and the op that proves each backend's harness."""
from __future__ import annotations

import torch

from elva_kernels import _dispatch, _library, _validate
from elva_kernels.reference import _common
from elva_kernels.reference.l2_normalize import l2_normalize as reference_l2_normalize

OP = "l2_normalize"

_dispatch.register(
    OP,
    [
        _dispatch.Backend("triton", OP, devices=("cuda", "cpu")),
        _dispatch.Backend("cuda", OP, devices=("cuda",)),
        _dispatch.Backend("cpu", OP, devices=("cpu",)),
        _dispatch.Backend("torch", OP, devices=("cpu", "cuda")),
    ],
)


def l2_normalize(x: torch.Tensor, *, eps: float = 1e-12, backend: str = "auto") -> torch.Tensor:
    """Rows of ``x`` divided by max(||row||_2, eps), computed and returned in fp32.

    Args:
        x: [n, d] fp32/fp16/bf16.
        eps: floor of the norm (> 0).
        backend: "auto", "triton", "cuda", "cpu" or "torch".

    Returns:
        fp32 [n, d]. Differentiable w.r.t. ``x``.

    Extra memory: none beyond the output.

    Equivalent PyTorch: ``torch.nn.functional.normalize(x.float(), dim=1, eps=eps)``.
    """
    _validate.tensor("x", x, ndim=2, form="[n, d]")
    eps = _validate.positive_float("eps", eps)
    call = _dispatch.Call(x.device, x.dtype, {"x": tuple(x.shape)})
    return _dispatch.select(OP, backend, call).handle(x, eps)


torch.library.impl(_library.qualname(OP, "torch"), "CompositeExplicitAutograd")(reference_l2_normalize)
try:
    from elva_kernels.triton.l2_normalize import l2_normalize as triton_l2_normalize
except ImportError:  # no triton: the dispatcher gives the reason
    pass
else:
    # On CPU tensors this serves only the interpreter (TRITON_INTERPRET=1), which the tests use.
    torch.library.impl(_library.qualname(OP, "triton"), ("cuda", "cpu"))(triton_l2_normalize)


def _fake(x, eps):
    return x.new_empty(x.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.eps = inputs[1]
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    grad_x = _common.normalize_backward(x, grad, ctx.eps)
    return grad_x.to(x.dtype), None


for _name in _library.variants(OP):
    torch.library.register_fake(_name)(_fake)
    torch.library.register_autograd(_name, _backward, setup_context=_setup_context)

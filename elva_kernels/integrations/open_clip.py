"""A drop-in for open_clip's ``ClipLoss`` backed by ``infonce_loss`` (memory-linear CLIP loss).

``ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
use_horovod=False)`` is called as open_clip's: ``loss(image_features, text_features, logit_scale,
logit_bias=None, output_dict=False)``, returning the loss, or ``{"contrastive_loss": loss}`` with
``output_dict=True``. It computes (CE(s * I @ T.T, arange) + CE(s * T @ I.T, arange)) / 2 as
``infonce_loss(I, T, temperature=1 / s, symmetric=True)``, never materialising the logits.

Differences from open_clip, by design:

- **Cosine, not dot.** ``infonce_loss`` scores cosine similarities, so the features are always
  L2-normalised. open_clip models already return normalised features (``normalize=True``), where
  the two agree; on non-normalised features this loss gives the cosine result.
- **logit_bias** is accepted and has no effect on the value: a constant added to every logit does
  not change a softmax cross-entropy. It must be a scalar (one element). A bias that requires grad
  stays in the graph with a zero gradient, as in open_clip (so DDP sees it used).
- ``cache_labels`` is accepted and ignored (no label tensor is built).
- ``use_horovod=True`` raises.

``world_size > 1`` needs an initialised ``torch.distributed`` whose rank and size match ``rank``
and ``world_size``; every rank must hold the same batch size (as open_clip's all_gather needs):

- ``gather_with_grad=True, local_loss=True``: ``infonce_loss(symmetric=True,
  group=WORLD)``; value and gradients equal open_clip's on every rank.
- ``gather_with_grad=True, local_loss=False``: the same op; the value is corrected to the global
  loss (one scalar all-reduce). The feature gradients equal open_clip's on every rank; the
  ``logit_scale`` gradient is this rank's share, so it equals open_clip's once averaged over the
  ranks (which DDP does).
- ``gather_with_grad=False``: the other ranks' features are gathered without gradient, as in
  open_clip; ``local_loss=False`` computes the global loss on every rank, ``local_loss=True`` the
  local rows against the gathered ones. Value and gradients equal open_clip's.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from elva_kernels.ops.infonce_loss import infonce_loss

__all__ = ["ClipLoss"]


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss``, computed by ``infonce_loss`` (see the module docstring).

    Args:
        local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod: as open_clip.
        backend: passed to ``infonce_loss``.

    Example:
        >>> loss_fn = ClipLoss()
        >>> out = model(images, texts)   # open_clip: normalised features and logit_scale.exp()
        >>> loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if use_horovod:
            raise ValueError(
                "use_horovod=True is not supported by elva_kernels' ClipLoss; use torch.distributed "
                "(world_size > 1 with an initialised process group) or open_clip's own ClipLoss"
            )
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int; got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}); got {rank!r}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.backend = backend

    def forward(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        output_dict: bool = False,
    ):
        if image_features.shape != text_features.shape or image_features.dim() != 2:
            raise ValueError(
                "image_features and text_features must both be [B, d] with the same shape; got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        temperature = _temperature(logit_scale)
        if self.world_size == 1:
            loss = infonce_loss(
                image_features, text_features, temperature=temperature, symmetric=True, backend=self.backend
            )
        else:
            loss = self._distributed(image_features, text_features, temperature)
        if logit_bias is not None:
            loss = _with_bias(loss, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed(self, image_features: Tensor, text_features: Tensor, temperature) -> Tensor:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"world_size={self.world_size} needs an initialised torch.distributed process group")
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ValueError(
                f"rank={self.rank}, world_size={self.world_size} do not match torch.distributed's rank "
                f"{dist.get_rank()} of {dist.get_world_size()}"
            )
        group = dist.group.WORLD
        if self.gather_with_grad:
            # Local rows against every rank's rows, gathered with gradient: open_clip's local loss.
            loss = infonce_loss(
                image_features, text_features, temperature=temperature, symmetric=True, group=group,
                backend=self.backend,
            )
            if not self.local_loss:
                # open_clip's global loss is the mean of the ranks' local losses (equal batch sizes),
                # and the gather's backward already sums every rank's feature gradients.
                from torch.distributed import _functional_collectives as funcol

                global_loss = funcol.all_reduce(loss.detach(), "sum", group) / self.world_size
                loss = loss + (global_loss - loss.detach())
            return loss

        # Without gradient through the gather: other ranks' rows are constants, as in open_clip.
        all_images = _gather_no_grad(image_features, self.world_size)
        all_texts = _gather_no_grad(text_features, self.world_size)
        batch = image_features.shape[0]
        rows = slice(self.rank * batch, (self.rank + 1) * batch)
        if not self.local_loss:
            all_images[rows] = image_features
            all_texts[rows] = text_features
            return infonce_loss(
                all_images, all_texts, temperature=temperature, symmetric=True, backend=self.backend
            )
        labels = torch.arange(rows.start, rows.stop, device=image_features.device)
        per_image = infonce_loss(
            image_features, all_texts, labels=labels, temperature=temperature, backend=self.backend
        )
        per_text = infonce_loss(
            text_features, all_images, labels=labels, temperature=temperature, backend=self.backend
        )
        return (per_image + per_text) / 2


def _temperature(logit_scale):
    """1 / logit_scale: a 0-dim tensor that keeps the scale's graph, or a float."""
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must hold one value; got shape {tuple(logit_scale.shape)}")
        return logit_scale.reshape(()).reciprocal()
    return 1.0 / float(logit_scale)


def _with_bias(loss: Tensor, logit_bias) -> Tensor:
    """A constant shift of every logit leaves the cross-entropy unchanged; keep a learnable bias in the
    graph with a zero gradient, as open_clip's loss gives it."""
    if isinstance(logit_bias, Tensor):
        if logit_bias.numel() != 1:
            raise ValueError(
                f"logit_bias must be a scalar (one value added to every logit); got shape {tuple(logit_bias.shape)}"
            )
        if logit_bias.requires_grad:
            loss = loss + 0.0 * logit_bias.reshape(()).to(loss.dtype)
    return loss


def _gather_no_grad(x: Tensor, world_size: int) -> Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)

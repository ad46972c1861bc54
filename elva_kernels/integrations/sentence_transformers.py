"""A drop-in for sentence-transformers' ``MultipleNegativesRankingLoss`` backed by ``infonce_loss``.

``MultipleNegativesRankingLoss(model, scale=20.0, similarity_fct=util.cos_sim, ...)`` takes the
constructor and the ``forward(sentence_features, labels)`` call of sentence-transformers' own class
(the 6.x signature) and subclasses it, so ``isinstance`` checks, ``get_config_dict``, ``citation``
and ``temperature`` (what the trainer's model card reads) keep working. The loss itself is
:func:`elva_kernels.infonce_loss`, which never builds the [B, N] score matrix:

- queries = the anchor column's embeddings [B, d];
- candidates = the positive column followed by every hard-negative column, [B * (1 + n), d], in the
  order sentence-transformers concatenates them (in-batch negatives come for free);
- labels = arange(B), temperature = 1 / ``scale``.

Supported options (anything else raises a ``ValueError`` naming the option):

- ``similarity_fct``: cosine only (``util.cos_sim``, or ``model.similarity`` on a cosine model),
  since ``infonce_loss`` scores cosine similarities;
- ``directions=("query_to_doc",)`` (the default) with either ``partition_mode``;
- ``directions=("query_to_doc", "doc_to_query")`` with ``partition_mode="per_direction"``: the
  symmetric InfoNCE (``infonce_loss(symmetric=True)``);
- ``directions=("query_to_doc", "query_to_query")`` with ``partition_mode="joint"``: the anchors are
  appended to the candidates and each anchor's own copy is masked (``false_negatives``); not with
  ``gather_across_devices`` under an initialised process group;
- ``hardness_mode=None`` (or any mode with ``hardness_strength=0``, which has no effect);
- ``gather_across_devices=True``: ``infonce_loss(group=torch.distributed.group.WORLD)`` when
  ``torch.distributed`` is initialised (candidates and, for the symmetric form, anchors gathered
  with gradient; ranks may hold different batch sizes); the local loss otherwise, as
  sentence-transformers does.

Importing this module needs sentence-transformers; ``elva_kernels`` itself does not.
"""
from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from elva_kernels.ops.infonce_loss import infonce_loss

try:  # sentence-transformers >= 6 moved the losses; the old path still works with a warning.
    from sentence_transformers.sentence_transformer.losses import (
        MultipleNegativesRankingLoss as _STMultipleNegativesRankingLoss,
    )
except ImportError:  # pragma: no cover - older sentence-transformers
    from sentence_transformers.losses import MultipleNegativesRankingLoss as _STMultipleNegativesRankingLoss
from sentence_transformers.util import cos_sim

try:
    from sentence_transformers.util import similarity_fct_name as _similarity_fct_name
except ImportError:  # pragma: no cover - older sentence-transformers
    _similarity_fct_name = None

try:
    from sentence_transformers.base.losses.merged_forward import embed_columns as _embed_columns
except ImportError:  # pragma: no cover - older sentence-transformers
    _embed_columns = None

__all__ = ["MultipleNegativesRankingLoss"]

logger = logging.getLogger(__name__)

_DEFAULT_DIRECTIONS = ("query_to_doc",)
_SYMMETRIC_DIRECTIONS = frozenset({"query_to_doc", "doc_to_query"})
_QUERY_TO_QUERY_DIRECTIONS = frozenset({"query_to_doc", "query_to_query"})


def _similarity_name(similarity_fct: Callable) -> str:
    if _similarity_fct_name is not None:
        try:
            return _similarity_fct_name(similarity_fct)
        except Exception:  # pragma: no cover - exotic callables
            pass
    return getattr(similarity_fct, "__name__", type(similarity_fct).__name__)


def _is_cosine(similarity_fct: Callable) -> bool:
    return similarity_fct is cos_sim or _similarity_name(similarity_fct) == "cos_sim"


class MultipleNegativesRankingLoss(_STMultipleNegativesRankingLoss):
    """sentence-transformers' ``MultipleNegativesRankingLoss``, computed by ``infonce_loss``.

    Same constructor and call as the original (see the module docstring for the supported option
    values); ``backend`` is passed to ``infonce_loss``. ``scale`` may be a float or a 0-dim tensor
    (a learnable scale keeps its gradient: temperature = 1 / scale).

    The loss equals the original's up to float rounding (``infonce_loss`` accumulates the scores in
    fp64 and returns an fp32 loss), and so do the gradients.

    Example:
        >>> from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
        >>> from elva_kernels.integrations.sentence_transformers import MultipleNegativesRankingLoss
        >>> model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
        >>> loss = MultipleNegativesRankingLoss(model, scale=20.0)   # temperature 0.05
        >>> trainer = SentenceTransformerTrainer(model=model, train_dataset=pairs, loss=loss)
    """

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = cos_sim,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = _DEFAULT_DIRECTIONS,
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        *,
        backend: str = "auto",
    ) -> None:
        options = dict(
            scale=scale,
            similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices,
            directions=tuple(directions),
            partition_mode=partition_mode,
            hardness_mode=hardness_mode,
            hardness_strength=hardness_strength,
        )
        # The parent validates and stores what it knows (its signature varies across versions);
        # we store the rest ourselves and check below what infonce_loss can compute.
        accepted = inspect.signature(_STMultipleNegativesRankingLoss.__init__).parameters
        super().__init__(model, **{k: v for k, v in options.items() if k in accepted})
        for key, value in options.items():
            if key not in accepted:
                setattr(self, key, value)
        self.backend = backend
        self._check_supported()

    # ---- configuration -------------------------------------------------------------------------

    def _check_supported(self) -> str:
        """The infonce_loss form of the current options: "plain", "symmetric" or "query_to_query"."""
        name = type(self).__qualname__
        if not _is_cosine(self.similarity_fct):
            raise ValueError(
                f"{name} supports only similarity_fct=sentence_transformers.util.cos_sim (infonce_loss scores "
                f"cosine similarities); got similarity_fct={_similarity_name(self.similarity_fct)!r}. Use "
                "sentence-transformers' own MultipleNegativesRankingLoss for other similarity functions."
            )
        scale = self.scale
        if not (scale > 0):
            raise ValueError(f"scale must be positive (temperature = 1 / scale); got {scale!r}")
        hardness_mode = getattr(self, "hardness_mode", None)
        if hardness_mode is not None and getattr(self, "hardness_strength", 0.0) != 0.0:
            raise ValueError(
                f"{name} does not support hardness weighting; got hardness_mode={hardness_mode!r} with "
                f"hardness_strength={self.hardness_strength!r}. Use hardness_mode=None."
            )
        directions = tuple(getattr(self, "directions", _DEFAULT_DIRECTIONS))
        partition_mode = getattr(self, "partition_mode", "joint")
        if partition_mode not in ("joint", "per_direction"):
            raise ValueError(f"partition_mode must be 'joint' or 'per_direction'; got {partition_mode!r}")
        chosen = frozenset(directions)
        if chosen == frozenset(_DEFAULT_DIRECTIONS):
            return "plain"  # one direction: both partition modes are the same softmax
        if chosen == _SYMMETRIC_DIRECTIONS and partition_mode == "per_direction":
            return "symmetric"
        if chosen == _QUERY_TO_QUERY_DIRECTIONS and partition_mode == "joint":
            return "query_to_query"
        raise ValueError(
            f"{name} supports directions=('query_to_doc',), ('query_to_doc', 'doc_to_query') with "
            "partition_mode='per_direction', or ('query_to_doc', 'query_to_query') with partition_mode='joint'; "
            f"got directions={directions!r} with partition_mode={partition_mode!r}. Use sentence-transformers' "
            "own MultipleNegativesRankingLoss for this combination."
        )

    def _temperature(self):
        scale = self.scale
        if isinstance(scale, Tensor):
            return scale.reshape(()).reciprocal()
        return 1.0 / float(scale)

    def _group(self):
        if not self.gather_across_devices:
            return None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.group.WORLD
        return None  # as sentence-transformers: gathering without a process group is the local loss

    # ---- the loss --------------------------------------------------------------------------------

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """``sentence_features``: the anchor, the positive and optional hard-negative columns, as the
        trainer's collator produces them; ``labels`` is ignored (the positives are the labels)."""
        sentence_features = list(sentence_features)
        if _embed_columns is not None:
            embeddings = _embed_columns(self.model, sentence_features)
        else:  # pragma: no cover - older sentence-transformers
            embeddings = [self.model(features)["sentence_embedding"] for features in sentence_features]
        return self.compute_loss_from_embeddings(embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        """The loss from the columns' embeddings: ``[anchor [B, d], positive [B, d], negative_1, ...]``."""
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings (anchor, positive, ...), got {len(embeddings)}")
        form = self._check_supported()
        queries, docs = embeddings[0], list(embeddings[1:])
        batch = queries.shape[0]
        for i, doc in enumerate(docs):
            if doc.dim() != 2 or doc.shape[0] != batch:
                raise ValueError(
                    f"every column must hold the anchors' {batch} rows as [B, d]; column {i + 1} has shape "
                    f"{tuple(doc.shape)}"
                )
        docs = [doc.to(queries.dtype) for doc in docs]
        candidates = torch.cat(docs, dim=0)
        temperature = self._temperature()
        group = self._group()
        if form == "query_to_query":
            if group is not None:
                raise ValueError(
                    "directions=('query_to_doc', 'query_to_query') is not supported with gather_across_devices=True "
                    "under an initialised torch.distributed; use the default directions"
                )
            # One joint softmax over [documents; anchors], each anchor's own copy masked out.
            own = candidates.shape[0] + torch.arange(batch, device=queries.device)
            return infonce_loss(
                queries, torch.cat([candidates, queries]), temperature=temperature,
                false_negatives=own.unsqueeze(1), backend=self.backend,
            )
        return infonce_loss(
            queries, candidates, temperature=temperature, symmetric=form == "symmetric", group=group,
            backend=self.backend,
        )

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale.item() if isinstance(self.scale, Tensor) else self.scale,
            "similarity_fct": _similarity_name(self.similarity_fct),
            "gather_across_devices": self.gather_across_devices,
            "directions": tuple(getattr(self, "directions", _DEFAULT_DIRECTIONS)),
            "partition_mode": getattr(self, "partition_mode", "joint"),
            "hardness_mode": getattr(self, "hardness_mode", None),
            "hardness_strength": getattr(self, "hardness_strength", 0.0),
            "backend": self.backend,
        }

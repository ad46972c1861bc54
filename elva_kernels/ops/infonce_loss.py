"""A4: memory-linear InfoNCE; forward and backward recompute score tiles, never a [B, N] matrix."""
from __future__ import annotations

import torch

from elva_kernels import _dispatch, _library, _validate
from elva_kernels.reference.infonce_loss import infonce_loss as reference_infonce_loss
from elva_kernels.reference.infonce_loss import infonce_loss_backward as reference_infonce_loss_backward

OP = "infonce_loss"
BACKWARD = "infonce_loss_backward"
REDUCTIONS = ("mean", "sum", "none")

_dispatch.register(
    OP,
    [
        _dispatch.Backend("triton", OP, devices=("cuda", "cpu")),
        _dispatch.Backend("cuda", OP, devices=("cuda",)),
        _dispatch.Backend("cpu", OP, devices=("cpu",)),
        _dispatch.Backend("torch", OP, devices=("cpu", "cuda")),
    ],
)


def infonce_loss(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 0.05,
    symmetric: bool = False,
    false_negatives: torch.Tensor | None = None,
    reduction: str = "mean",
    return_lse: bool = False,
    group=None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE loss -log softmax(cos / tau)[label] of each query over the candidates.

    Args:
        queries: [B, d] fp32/fp16/bf16.
        candidates: [N, d], same dtype and device. The first B are the positives by default;
            the rest are extra negatives (hard negatives).
        labels: int64 [B] index of each query's positive among the candidates; None means
            arange(B).
        temperature: tau, a float > 0 or a 0-dim float tensor (which receives a gradient).
        symmetric: also the candidate->query direction over the first B candidates, averaged
            with the query->candidate one per pair, as CLIP does. Needs labels=None and N >= B.
        false_negatives: int64 [B, m] candidate ids (-1 = padding) that do not count as
            negatives of that query (duplicates, other positives). Listing the query's own
            label is an error. With symmetric=True the mask also applies, transposed, to the
            reverse direction: candidate j < B skips query i when row i lists j.
        reduction: "mean", "sum" or "none" (the [B] per-query losses; per pair i, the mean of
            both directions, when symmetric).
        return_lse: also return lse [B] fp32, the query->candidate log-sum-exp of cos / tau
            over the counted candidates (differentiable).
        group: a torch.distributed process group (None: no communication). Every rank passes
            its local queries [B_r, d] and candidates [N_r, d] (sizes may differ per rank) and
            the same options. Candidates are gathered from all ranks in rank order, with
            gradient; queries stay local. ``labels`` (default arange(B_r)) index the local
            candidates and are shifted by the number of candidates on lower ranks;
            ``false_negatives`` hold global ids into the gathered candidates, since a duplicate
            may live on another rank. Each rank's per-query losses then equal those of a
            single process on the concatenated queries and candidates with the labels shifted;
            with equal B_r, the ranks' mean losses average to the single-process mean.
            symmetric=True also gathers the queries: the reverse direction of each local pair
            runs over every rank's queries, which equals a single process on the queries
            concatenated and the candidates reordered as [every rank's first B_r; every
            rank's extras] (it does not take false_negatives yet). Gradients flow back to each
            rank's own rows (the gather's backward sums them over ranks).
        backend: "auto", "triton", "cuda", "cpu" or "torch".

    Returns:
        The loss (a 0-dim fp32 tensor, or [B] fp32 for reduction="none"), or ``(loss, lse)``
        with return_lse=True. Differentiable w.r.t. queries, candidates and a tensor
        temperature.

    Extra memory:
        torch, with T = ``reference._common.TILE_ELEMENTS`` scores per tile and query blocks of
        b = min(B, ``QUERY_BLOCK``) rows. Forward: 12 T bytes (one fp32 tile + its fp64
        accumulation) + one prepared candidate chunk of max(256, T / b) x d fp32 + 4 B fp32
        (lse, positive scores, loss, a block's running max and sum) + 2 B fp32 for symmetric's
        reverse running max and sum. Backward: a few fp32 tiles + the fp32 [N, d]
        candidate-gradient accumulator + b x d for the queries. No B x N term. ``group`` adds
        the gathered candidates (and, for symmetric, queries).

    Equivalent PyTorch (materialises [B, N], which this op never does)::

        z = F.normalize(q.float(), dim=1) @ F.normalize(c.float(), dim=1).T / tau
        z[i, false_negatives[i]] = -inf           # for each row i, skipping the -1 padding
        loss = F.cross_entropy(z, labels, reduction="none")
        if symmetric:
            loss = (loss + F.cross_entropy(z[:, :B].T, arange(B), reduction="none")) / 2
        lse = z.logsumexp(1)

    Backends and limits:
        triton (CUDA; CPU tensors only under the interpreter): ``triton/infonce_loss.py``, tl.dot
        score tiles with fp32 accumulation; the backward adds fp32 [B, d] and [N, d] gradient
        accumulators. cuda / cpu: ``csrc/cuda|cpu/infonce_loss.*``, the same scheme.
        torch (CPU, CUDA): ``reference/infonce_loss.py``, score tiles with fp64-accumulated dot
        products rounded to fp32. Indices are int64 throughout, so B * N may exceed 2**31.
        Each backend's backward is its own op, ``elva::infonce_loss_backward_<backend>``.

    Example:
        >>> q, c = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8)
        >>> loss = infonce_loss(q, c, temperature=0.05)
        >>> loss.backward()
    """
    form_q, form_c = "[B, d]", "[N, d] with the queries' d"
    _validate.tensor("queries", queries, ndim=2, form=form_q)
    _validate.tensor("candidates", candidates, ndim=2, form=form_c)
    _validate.dim_matches("candidates", candidates, 1, queries.shape[1], "d", form_c)
    _validate.same_float_dtype(queries=queries, candidates=candidates)
    _validate.choice("reduction", reduction, REDUCTIONS)
    for name, flag in (("symmetric", symmetric), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool; got {type(flag).__name__}")
    num_queries = queries.shape[0]
    if labels is not None:
        _validate.tensor("labels", labels, ndim=1, dtypes=(torch.int64,), form="int64 [B]")
        _validate.dim_matches("labels", labels, 0, num_queries, "B", "int64 [B]")
    if symmetric:
        if labels is not None:
            raise ValueError("labels must be None (meaning arange(B)) when symmetric=True; got a tensor")
        if candidates.shape[0] < num_queries:
            raise ValueError(
                f"candidates must have at least B = {num_queries} rows when symmetric=True (the first B are "
                f"the positives); got shape {tuple(candidates.shape)}"
            )
    if false_negatives is not None:
        false_negatives = _validate.id_matrix(
            "false_negatives", false_negatives, num_queries, allow_1d=False, form="int64 [B, m]"
        )
    tensor_temperature = temperature if isinstance(temperature, torch.Tensor) else None
    device = _validate.same_device(
        queries=queries,
        candidates=candidates,
        labels=labels,
        false_negatives=false_negatives,
        temperature=tensor_temperature,
    )
    temperature = _temperature(temperature, device)
    if labels is None:
        labels = torch.arange(num_queries, device=device)

    if group is None:
        loss, lse = _select(queries, candidates, backend)(
            queries, candidates, labels, temperature, symmetric, false_negatives
        )
    elif symmetric:
        if false_negatives is not None:
            raise ValueError("false_negatives is not supported with symmetric=True and group yet; got a tensor")
        loss, lse = _symmetric_over_group(queries, candidates, temperature, group, backend)
    else:
        # Local labels must stay in this rank's block: once shifted, a larger one would
        # silently point at another rank's candidates.
        _validate.ids_in_range("labels", labels, candidates.shape[0], pad=False)
        all_candidates, offset = _gather_rows(candidates, group)
        loss, lse = _select(queries, all_candidates, backend)(
            queries, all_candidates, labels + offset, temperature, False, false_negatives
        )

    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return (loss, lse) if return_lse else loss


def _temperature(value, device: torch.device) -> torch.Tensor:
    """tau as the op's 0-dim fp32 tensor; a tensor keeps its graph (its sign is a data check)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"temperature must be a float or a 0-dim float tensor; got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"temperature must be a float or a 0-dim float tensor; got dtype {value.dtype}")
        return value.float()
    return torch.tensor(_validate.positive_float("temperature", value), dtype=torch.float32, device=device)


def _select(queries: torch.Tensor, candidates: torch.Tensor, backend: str):
    shapes = {"queries": tuple(queries.shape), "candidates": tuple(candidates.shape)}
    return _dispatch.select(OP, backend, _dispatch.Call(queries.device, queries.dtype, shapes)).handle


def _gather_rows(x: torch.Tensor, group) -> tuple[torch.Tensor, int]:
    """Every rank's rows of ``x``, concatenated in rank order with gradient, and this rank's offset."""
    import torch.distributed as dist
    from torch.distributed import _functional_collectives as funcol

    if not dist.is_initialized():
        raise ValueError("group needs an initialised torch.distributed; got a group but no process group is set up")
    # Ranks may hold different numbers of rows (a last, short batch): gather the sizes first
    # (one tiny collective and one host sync), then pad every rank to the largest.
    sizes = funcol.all_gather_single(torch.tensor([x.shape[0]], device=x.device), 0, group).tolist()
    rows = max(sizes)
    padded = torch.nn.functional.pad(x, (0, 0, 0, rows - x.shape[0]))
    # Differentiable: its backward reduce-scatters (sums) every rank's gradient back to the owner.
    gathered = funcol.all_gather_single(padded, 0, group)
    parts = [gathered[r * rows : r * rows + n] for r, n in enumerate(sizes)]
    return torch.cat(parts), sum(sizes[: dist.get_rank(group)])


def _symmetric_over_group(queries, candidates, temperature, group, backend):
    """CLIP over ranks: each local pair's two directions, against every rank's rows.

    The forward direction runs the local queries against all candidates; the reverse one runs
    the local positives (the first B candidates) as queries against all queries. Each is the
    non-symmetric op, so the pair's loss is the mean of the two.
    """
    num_queries = queries.shape[0]
    all_candidates, candidate_offset = _gather_rows(candidates, group)
    all_queries, query_offset = _gather_rows(queries, group)
    local = torch.arange(num_queries, device=queries.device)
    forward, lse = _select(queries, all_candidates, backend)(
        queries, all_candidates, local + candidate_offset, temperature, False, None
    )
    positives = candidates[:num_queries]
    reverse, _ = _select(positives, all_queries, backend)(
        positives, all_queries, local + query_offset, temperature, False, None
    )
    return (forward + reverse) / 2, lse


torch.library.impl(_library.qualname(OP, "torch"), "CompositeExplicitAutograd")(reference_infonce_loss)


def _fake(queries, candidates, labels, temperature, symmetric, false_negatives):
    per_query = (queries.shape[0],)
    return queries.new_empty(per_query, dtype=torch.float32), queries.new_empty(per_query, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    queries, candidates, labels, temperature, symmetric, false_negatives = inputs
    ctx.symmetric = symmetric
    ctx.save_for_backward(queries, candidates, labels, temperature, false_negatives, *output)


def _backward_of(backend: str):
    """Autograd of ``elva::infonce_loss_<backend>``: that backend's memory-linear backward op."""

    def backward(ctx, grad_loss, grad_lse):
        queries, candidates, labels, temperature, false_negatives, loss, lse = ctx.saved_tensors
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]]
        g = grad_loss.float() if grad_loss is not None else torch.zeros_like(loss)
        h = grad_lse.float() if grad_lse is not None else torch.zeros_like(lse)
        grads = _library.handle(BACKWARD, backend)(
            queries, candidates, labels, temperature, ctx.symmetric, false_negatives, loss, lse, g, h, wanted
        )
        grad_q, grad_c, grad_t = (grad if want else None for grad, want in zip(grads, wanted))
        return grad_q, grad_c, None, grad_t, None, None

    return backward


def _fake_backward(queries, candidates, labels, temperature, symmetric, false_negatives, loss, lse, grad_loss,
                   grad_lse, output_mask):
    shapes = (queries.shape, candidates.shape, ())
    return tuple(
        torch.empty(shape if want else (0,), dtype=like.dtype, device=like.device)
        for shape, want, like in zip(shapes, output_mask, (queries, candidates, temperature))
    )


torch.library.impl(_library.qualname(BACKWARD, "torch"), "CompositeExplicitAutograd")(reference_infonce_loss_backward)
try:
    from elva_kernels.triton import infonce_loss as triton_infonce
except ImportError:  # no triton: the dispatcher gives the reason
    pass
else:
    # On CPU tensors these serve only the interpreter (TRITON_INTERPRET=1), which the tests use.
    torch.library.impl(_library.qualname(OP, "triton"), ("cuda", "cpu"))(triton_infonce.infonce_loss)
    torch.library.impl(_library.qualname(BACKWARD, "triton"), ("cuda", "cpu"))(triton_infonce.infonce_loss_backward)
for _backend in _library.BACKENDS:
    torch.library.register_fake(_library.qualname(OP, _backend))(_fake)
    torch.library.register_autograd(_library.qualname(OP, _backend), _backward_of(_backend), setup_context=_setup_context)
    torch.library.register_fake(_library.qualname(BACKWARD, _backend))(_fake_backward)

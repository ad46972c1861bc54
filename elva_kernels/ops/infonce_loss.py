"""A4: memory-linear InfoNCE; forward and backward recompute score tiles, never a [B, N] matrix."""
from __future__ import annotations

import torch

from elva_kernels import _dispatch, _library, _validate
from elva_kernels.reference import _common
from elva_kernels.reference.infonce_loss import infonce_loss as reference_infonce_loss
from elva_kernels.reference.infonce_loss import membership

OP = "infonce_loss"
REDUCTIONS = ("mean", "sum", "none")

_dispatch.register(OP, [_dispatch.Backend("torch", OP, devices=("cpu", "cuda"))])


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
        backend: "auto" or "torch" (the fast backends come later).

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
        torch (CPU, CUDA): ``reference/infonce_loss.py``, score tiles with fp64-accumulated dot
        products rounded to fp32. Indices are int64 throughout, so B * N may exceed 2**31.

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


def _backward(ctx, grad_loss, grad_lse):
    """Memory-linear backward: recompute each score tile, then its softmax from the saved lse.

    With z = s / tau, p_ij = exp(z_ij - lse_i), upstream g (loss) and h (lse), and w = g (g / 2
    for each direction when symmetric):

        dL/dz_ij = (w_i + h_i) p_ij - w_i [j = l_i]
                   + w_j (r_ij - [i = j])            for j < B when symmetric, r_ij = exp(z_ij - rlse_j)
        dL/ds_ij = dL/dz_ij / tau;   dL/dtau = -sum_ij dL/dz_ij s_ij / tau^2

    Masked pairs have z = -inf, hence p = r = 0. dL/ds gives the prepared-row gradients
    dQ' = dS C' and dC' = dS^T Q', mapped back through the normalisation.
    """
    queries, candidates, labels, temperature, false_negatives, loss, lse = ctx.saved_tensors
    want_q, want_c, want_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    num_queries, num_candidates = queries.shape[0], candidates.shape[0]
    g = grad_loss.float() if grad_loss is not None else torch.zeros_like(loss)
    h = grad_lse.float() if grad_lse is not None else torch.zeros_like(lse)
    w = g / 2 if ctx.symmetric else g
    if ctx.symmetric:
        reverse_lse = _reverse_lse(queries, candidates, temperature, loss, lse)
    grad_q = torch.empty_like(queries) if want_q else None
    grad_c_prepared = torch.zeros(candidates.shape, dtype=torch.float32, device=candidates.device) if want_c else None
    grad_t = torch.zeros((), dtype=torch.float64, device=queries.device) if want_t else None
    for q0, q1 in _common.query_blocks(num_queries):
        q = _common.prepare(queries[q0:q1], "cosine")
        grad_q_prepared = torch.zeros_like(q) if want_q else None
        for c0, c1 in _common.candidate_blocks(num_candidates, q1 - q0):
            c = _common.prepare(candidates[c0:c1], "cosine")
            s = _common.score_tile(q, c)
            z = s / temperature
            if false_negatives is not None:
                z = z.masked_fill(membership(false_negatives[q0:q1], c0, c1), float("-inf"))
            label_hit = membership(labels[q0:q1, None], c0, c1).float()
            grad_z = (w + h)[q0:q1, None] * torch.exp(z - lse[q0:q1, None]) - w[q0:q1, None] * label_hit
            if ctx.symmetric and c0 < num_queries:
                # Labels are arange(B) here, so label_hit is also the reverse direction's one-hot.
                n = min(c1, num_queries) - c0
                r = torch.exp(z[:, :n] - reverse_lse[None, c0 : c0 + n])
                grad_z[:, :n] += w[None, c0 : c0 + n] * (r - label_hit[:, :n])
            grad_s = grad_z / temperature
            if want_q:
                grad_q_prepared += grad_s @ c
            if want_c:
                grad_c_prepared[c0:c1] += grad_s.T @ q
            if want_t:
                grad_t += (grad_z * s).sum(dtype=torch.float64)
        if want_q:
            grad_q[q0:q1] = _common.prepare_backward(queries[q0:q1], "cosine", grad_q_prepared)
    grad_c = None
    if want_c:
        grad_c = torch.empty_like(candidates)
        for c0, c1 in _common.candidate_blocks(num_candidates, candidates.shape[1]):
            grad_c[c0:c1] = _common.prepare_backward(candidates[c0:c1], "cosine", grad_c_prepared[c0:c1])
    grad_temperature = None
    if want_t:
        grad_temperature = (-grad_t / temperature.double() ** 2).to(temperature.dtype)
    return grad_q, grad_c, None, grad_temperature, None, None


def _reverse_lse(queries, candidates, temperature, loss, lse) -> torch.Tensor:
    """The candidate->query lse of the first B candidates, recovered from the saved outputs.

    loss_i = (lse_i - z_ii + rlse_i - z_ii) / 2, so rlse_i = 2 loss_i - lse_i + 2 z_ii: O(B d)
    work instead of another pass over the [B, B] score tiles. The error is a few ulps of the
    largest of |loss|, |lse| and |z|, the same order as rlse's own fp32 rounding.
    """
    num_queries = queries.shape[0]
    diagonal = torch.empty(num_queries, device=queries.device)
    for q0, q1 in _common.query_blocks(num_queries):
        q = _common.prepare(queries[q0:q1], "cosine").double()
        c = _common.prepare(candidates[q0:q1], "cosine").double()
        # Summed in float64 and rounded to fp32, like _common.score_tile, so it matches the forward's s_ii.
        diagonal[q0:q1] = (q * c).sum(1).float()
    z_diagonal = diagonal / temperature  # fp32, as in the forward
    return (2 * loss.double() - lse.double() + 2 * z_diagonal.double()).float()


for _name in _library.variants(OP):
    torch.library.register_fake(_name)(_fake)
    torch.library.register_autograd(_name, _backward, setup_context=_setup_context)

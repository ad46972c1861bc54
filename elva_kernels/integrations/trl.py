"""ELVA rewards as a reward function for TRL's ``GRPOTrainer``, and for custom GRPO loops.

``elva_reward_function(embed)`` returns ``fn(prompts, completions, **columns) -> list[float]``, the
signature TRL calls reward functions with. Each completion is embedded with the user's ``embed`` and
scored against its dataset row's candidates (the positive plus the negatives) by
:func:`elva_kernels.elva_rewards`; for example RL of an LLM that rewrites queries for a retriever.

``rewards_for_groups`` is the same reward for a custom loop that already holds the embeddings.

The module imports no TRL: it only relies on TRL's calling convention (dataset columns as keyword
lists with one entry per completion). It calls the public op and holds no backend logic.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from elva_kernels.ops.elva_rewards import ElvaRewards, elva_rewards

# The ElvaRewards fields that are a reward per completion. Not "advantages" (TRL normalises the
# rewards itself) nor "rank" (larger is worse).
REWARD_FIELDS = ("total", "margin", "rank_reward")
# elva_rewards arguments that the reward function sets itself.
_FIXED_OPTIONS = ("positive_index", "mask", "advantage", "return_scores", "differentiable")


def rewards_for_groups(
    completion_emb: torch.Tensor, cand_emb: torch.Tensor, group_size: int, **options: Any
) -> ElvaRewards:
    """ELVA rewards of completions laid out flat, G consecutive ones per query (TRL's order).

    Args:
        completion_emb: [B*G, d]: completions 0..G-1 belong to query 0, G..2G-1 to query 1, ...
        cand_emb: [B, C, d] candidates shared by a query's G completions, or [B*G, C, d] one set
            per completion (same flat order).
        group_size: G, the completions per query; it must divide B*G.
        **options: passed to :func:`elva_kernels.elva_rewards` (positive_index, mask, alpha, eps,
            delta, gamma, advantage, backend, ...). A per-completion ``mask`` is [B*G, C].

    Returns:
        ElvaRewards with [B, G] fields; ``out.total.flatten()`` is back in the flat order.

    Example:
        >>> out = rewards_for_groups(torch.randn(32, 64), torch.randn(4, 101, 64), group_size=8)
        >>> out.total.flatten().shape
        torch.Size([32])
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int; got {group_size!r}")
    if not isinstance(completion_emb, torch.Tensor) or completion_emb.dim() != 2:
        raise ValueError(f"completion_emb must be a [B*G, d] tensor; got {_shape(completion_emb)}")
    if not isinstance(cand_emb, torch.Tensor) or cand_emb.dim() != 3:
        raise ValueError(f"cand_emb must be a [B, C, d] or [B*G, C, d] tensor; got {_shape(cand_emb)}")
    flat = completion_emb.shape[0]
    if flat % group_size:
        raise ValueError(f"completion_emb holds {flat} rows, not a multiple of group_size={group_size}")
    queries = flat // group_size
    query_emb = completion_emb.reshape(queries, group_size, -1)
    if cand_emb.shape[0] == queries:
        return elva_rewards(query_emb, cand_emb, **options)
    if cand_emb.shape[0] != flat:
        raise ValueError(
            f"cand_emb must hold B={queries} (shared) or B*G={flat} (per completion) candidate sets; "
            f"got shape {tuple(cand_emb.shape)}"
        )
    mask = options.get("mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == flat:
        options["mask"] = mask.reshape(queries, group_size, -1)
    return elva_rewards(query_emb, cand_emb.reshape(queries, group_size, *cand_emb.shape[1:]), **options)


def elva_reward_function(
    embed: Callable[[list[str]], Any],
    *,
    positive_column: str = "positive",
    negatives_column: str = "negatives",
    reward: str = "total",
    name: str | None = None,
    **elva_options: Any,
) -> Callable[..., list[float]]:
    """A reward function for TRL's ``GRPOTrainer`` that scores completions with ELVA's rewards.

    Each dataset row carries the text of its positive (``positive_column``, a string) and of its
    negatives (``negatives_column``, a list of strings; rows may hold different numbers). The
    returned ``fn(prompts, completions, **kwargs)`` embeds every completion and every candidate with
    ``embed``, and scores completion i against its own row's candidates (positive first) with
    :func:`elva_kernels.elva_rewards`. It returns the field ``reward`` per completion, in TRL's
    order; TRL then computes its own advantages from it.

    Completions may be strings or conversations (lists of ``{"role", "content"}`` messages, as TRL
    passes for chat datasets): the last message's content is embedded. TRL repeats each row
    ``num_generations`` times consecutively; consecutive completions with the same candidates share
    one candidate embedding. Nothing else depends on the grouping, since a completion's reward
    depends only on its own scores.

    Args:
        embed: ``embed(texts: list[str]) -> [n, d]`` tensor (or array): one embedding per text,
            any scale (scores are cosines). It runs under ``torch.no_grad()``, called twice per
            batch: once for the completions, once for the batch's distinct candidate texts.
            For example ``lambda t: st_model.encode(t, convert_to_tensor=True)``.
        positive_column: the dataset column with each row's positive text.
        negatives_column: the dataset column with each row's list of negative texts (at least one).
        reward: which ElvaRewards field to return: "total" (alpha * margin + eps * rank_reward),
            "margin" or "rank_reward".
        name: the function's ``__name__``, under which TRL logs it (``rewards/<name>/mean``);
            default "elva_reward" for "total", else "elva_<reward>".
        **elva_options: passed to ``elva_rewards``: alpha, eps, delta, gamma, log_base, backend.

    Returns:
        ``fn(prompts, completions, **kwargs) -> list[float]``. When TRL passes its ``log_metric``
        callback, fn also logs the positive's mean rank as ``<name>/positive_rank``.

    Example:
        >>> from trl import GRPOConfig, GRPOTrainer
        >>> from elva_kernels.integrations.trl import elva_reward_function
        >>> # dataset columns: prompt (str), positive (str), negatives (list[str])
        >>> reward = elva_reward_function(lambda texts: retriever.encode(texts, convert_to_tensor=True))
        >>> trainer = GRPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=reward,
        ...                       args=GRPOConfig(output_dir="out"), train_dataset=dataset)
        >>> trainer.train()  # logs rewards/elva_reward/mean
    """
    if not callable(embed):
        raise TypeError(f"embed must be callable (list[str] -> [n, d] tensor); got {type(embed).__name__}")
    if reward not in REWARD_FIELDS:
        raise ValueError(f"reward must be one of {REWARD_FIELDS}; got {reward!r}")
    fixed = sorted(set(elva_options) & set(_FIXED_OPTIONS))
    if fixed:
        raise TypeError(f"elva_reward_function sets {fixed} itself; do not pass them")
    name = name or ("elva_reward" if reward == "total" else f"elva_{reward}")

    def reward_fn(prompts: Sequence, completions: Sequence, **kwargs: Any) -> list[float]:
        count = len(completions)
        for column in (positive_column, negatives_column):
            if column not in kwargs:
                raise KeyError(
                    f"{name}: the dataset has no column {column!r} (columns passed: {sorted(kwargs)}); "
                    "set positive_column / negatives_column, and keep GRPOConfig(remove_unused_columns=False)"
                )
            if len(kwargs[column]) != count:
                raise ValueError(
                    f"{name}: column {column!r} holds {len(kwargs[column])} entries for {count} completions"
                )
        if count == 0:
            return []
        columns = zip(kwargs[positive_column], kwargs[negatives_column])
        rows = [_candidate_texts(positive, negatives, i) for i, (positive, negatives) in enumerate(columns)]

        # Runs of consecutive completions with the same candidates (TRL's groups) share one candidate set.
        run_of, runs = [], []
        for i, row in enumerate(rows):
            if i == 0 or row != rows[i - 1]:
                runs.append(row)
            run_of.append(len(runs) - 1)
        texts = sorted({text for row in runs for text in row})
        with torch.no_grad():
            query = _embeddings(embed, [_completion_text(c) for c in completions], "completions")
            table = _embeddings(embed, texts, "candidate texts").to(device=query.device, dtype=query.dtype)
        if query.shape[1] != table.shape[1]:
            raise ValueError(f"{name}: embed gave {query.shape[1]}-dim completions but {table.shape[1]}-dim candidates")

        # [R, C] candidate ids, padded with the positive (masked out) for rows with fewer negatives.
        row_of = {text: i for i, text in enumerate(texts)}
        width = max(len(row) for row in runs)
        ids = torch.tensor([[row_of[t] for t in row] + [row_of[row[0]]] * (width - len(row)) for row in runs])
        mask = torch.tensor([[True] * len(row) + [False] * (width - len(row)) for row in runs])
        cands = table[ids.to(table.device)]
        mask = mask.to(query.device)
        ragged = any(len(row) < width for row in runs)
        options = dict(elva_options, positive_index=0, advantage="none")

        sizes = torch.bincount(torch.tensor(run_of)).tolist()
        if len(set(sizes)) == 1:  # equal groups: [R, C, d] shared by each group's completions
            out = rewards_for_groups(query, cands, sizes[0], mask=mask if ragged else None, **options)
        else:  # unequal runs (e.g. a batch that cut a group): one candidate set per completion
            index = torch.tensor(run_of, device=query.device)
            out = rewards_for_groups(query, cands[index], 1, mask=mask[index], **options)
        values = getattr(out, reward).flatten()
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric(f"{name}/positive_rank", out.rank.double().mean().item())
        return values.tolist()

    reward_fn.__name__ = reward_fn.__qualname__ = name
    return reward_fn


def _candidate_texts(positive: Any, negatives: Any, index: int) -> tuple[str, ...]:
    if not isinstance(positive, str):
        raise TypeError(f"row {index}: the positive must be a string; got {type(positive).__name__}")
    negatives = [negatives] if isinstance(negatives, str) else list(negatives or ())
    if not negatives:
        raise ValueError(f"row {index}: no negatives (ELVA's rewards need at least one)")
    if not all(isinstance(n, str) for n in negatives):
        raise TypeError(f"row {index}: the negatives must be strings")
    return (positive, *negatives)


def _completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the last message of a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content", "")
    elif isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
    else:
        raise TypeError(f"a completion must be a string or a list of messages; got {type(completion).__name__}")
    if isinstance(content, list):  # multimodal content parts: keep the text ones
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def _embeddings(embed: Callable, texts: list[str], what: str) -> torch.Tensor:
    emb = embed(texts)
    emb = emb if isinstance(emb, torch.Tensor) else torch.as_tensor(emb)
    if emb.dim() != 2 or emb.shape[0] != len(texts):
        raise ValueError(f"embed must return [n, d] for n={len(texts)} {what}; got shape {tuple(emb.shape)}")
    # elva_rewards takes fp32/fp16/bf16; numpy embedders often give float64.
    return emb if emb.dtype in (torch.float32, torch.float16, torch.bfloat16) else emb.float()


def _shape(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__

"""Stage 3's generative embedding (SPEC Part B): the model writes a short summary of the input, then ``[RET]``; the
final-norm hidden state at ``[RET]`` is the embedding.

:func:`generate_embed` runs in two steps:

1. HF ``generate`` (batched, KV cache) continues the left-padded prompts, sampling (temperature, top-p) or greedy,
   and stops a row at ``[RET]``, at ``<|im_end|>`` or after ``max_new_tokens``.
2. One teacher-forced forward over prompt + completion reads the hidden state at ``[RET]`` and the log-probabilities
   of the completion tokens. A row that stopped without ``[RET]`` gets ``[RET]`` appended in place of the stop (not
   an action of the policy: its mask is 0).

``generate`` never feeds its last token through the model, so reading ``[RET]`` takes a forward in every case; it
is the same computation (:func:`score_completions`) the GRPO loss differentiates, so the rollout-time
log-probabilities equal the first update's and the policy ratio starts at exactly 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = ["Generation", "generate_embed", "score_completions", "teach_summaries", "GenerativeEncoder", "encoder_for"]


@dataclass
class Generation:
    """Rollouts of n inputs. ``prompt`` is the collated prompt batch (CPU; left-padded, P columns).

    - ``completion_ids`` int64 [n, T]: the summary tokens, then ``[RET]``, then padding;
    - ``completion_mask`` bool [n, T]: the tokens the policy sampled (``[RET]`` included when it was generated);
    - ``ret_index`` int64 [n]: the column of ``[RET]`` in ``completion_ids``;
    - ``logprobs`` fp32 [n, T]: log pi(token) under temperature-scaled logits, 0 outside the mask;
    - ``embeddings`` fp32 [n, hidden]: the L2-normalised hidden state at ``[RET]``.
    """

    prompt: dict
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    ret_index: torch.Tensor
    logprobs: torch.Tensor
    embeddings: torch.Tensor
    temperature: float

    @property
    def ret_generated(self) -> torch.Tensor:
        """bool [n]: whether the policy wrote ``[RET]`` itself."""
        return self.completion_mask.gather(1, self.ret_index[:, None].to(self.completion_mask.device))[:, 0]

    @property
    def lengths(self) -> torch.Tensor:
        """int64 [n]: sampled tokens per row."""
        return self.completion_mask.sum(1)


def _completions(new_tokens: torch.Tensor, ret_id: int, stop_ids: Sequence[int], pad_id: int):
    """(completion_ids, completion_mask, ret_index) from generate's new tokens [n, T'] (CPU)."""
    n, width = new_tokens.shape
    is_stop = torch.zeros_like(new_tokens, dtype=torch.bool)
    for token in (ret_id, *stop_ids):
        is_stop |= new_tokens == token
    has_stop = is_stop.any(1)
    first_stop = torch.where(has_stop, is_stop.int().argmax(1), torch.full((n,), width))
    ret_generated = has_stop & (new_tokens.gather(1, first_stop.clamp(max=width - 1)[:, None])[:, 0] == ret_id)
    columns = torch.arange(width + 1)
    ids = torch.full((n, width + 1), pad_id, dtype=torch.long)
    ids[:, :width] = new_tokens
    ids[columns[None, :] == first_stop[:, None]] = ret_id  # a generated stop becomes [RET]; a capped row gets one
    ids[columns[None, :] > first_stop[:, None]] = pad_id
    mask = (columns[None, :] < first_stop[:, None]) | ((columns[None, :] == first_stop[:, None]) & ret_generated[:, None])
    used = int(first_stop.max()) + 1
    return ids[:, :used], mask[:, :used], first_stop


def score_completions(embedder, prompt: Mapping[str, torch.Tensor], completion_ids: torch.Tensor,
                      ret_index: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over prompt + completion: (log-probs fp32 [n, T] of every completion token under
    ``logits / temperature`` with the suppressed tokens removed, embeddings fp32 [n, hidden] at ``[RET]``). Differentiable; columns after ``[RET]``
    hold padding and their log-probs are meaningless (mask them)."""
    hf = embedder._hf_model()
    device = embedder.device
    prompt_ids = prompt["input_ids"].to(device)
    completion_ids = completion_ids.to(device)
    ret_index = ret_index.to(device)
    n, width = prompt_ids.shape
    columns = torch.arange(completion_ids.shape[1], device=device)
    completion_attention = (columns[None, :] <= ret_index[:, None]).long()
    kwargs = {
        "input_ids": torch.cat([prompt_ids, completion_ids], 1),
        "attention_mask": torch.cat([prompt["attention_mask"].to(device), completion_attention], 1),
        "mm_token_type_ids": torch.cat([prompt["mm_token_type_ids"].to(device),
                                        torch.zeros_like(completion_ids)], 1),
        "use_cache": False,
    }
    if "pixel_values" in prompt:
        kwargs["pixel_values"] = prompt["pixel_values"].to(device, hf.dtype)
        kwargs["image_grid_thw"] = prompt["image_grid_thw"].to(device)
    hidden = hf.model(**kwargs).last_hidden_state
    # Position P-1+t predicts completion token t; only those T rows go through the LM head.
    logits = hf.lm_head(hidden[:, width - 1:width - 1 + completion_ids.shape[1]]).float() / temperature
    logits[:, :, embedder.suppressed_token_ids] = float("-inf")  # the distribution generate samples from
    logprobs = torch.log_softmax(logits, -1).gather(2, completion_ids[:, :, None])[:, :, 0]
    logprobs = torch.where(completion_attention.bool(), logprobs, 0.0)  # padding is a suppressed token: -inf
    pooled = hidden[torch.arange(n, device=device), width + ret_index]
    return logprobs, F.normalize(pooled.float(), dim=-1)


def teach_summaries(embedder, items: Sequence, instructions, summaries: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced ``summary [RET]`` after the generative prompt of each item: (mean next-token NLL over the
    summary tokens and ``[RET]``, embeddings fp32 [n, hidden] at ``[RET]``). Differentiable; the generative cold
    start trains on both. A summary is cut to ``generative_max_new_tokens - 1`` tokens, so that greedy decoding
    under the same cap can write all of it and ``[RET]``."""
    keep = embedder.config.generative_max_new_tokens - 1
    token_ids = [embedder.tokenizer(text, add_special_tokens=False)["input_ids"][:keep] for text in summaries]
    ret_index = torch.tensor([len(ids) for ids in token_ids])
    completion_ids = torch.full((len(token_ids), int(ret_index.max()) + 1), embedder.collator.pad_token_id,
                                dtype=torch.long)
    for row, ids in enumerate(token_ids):
        completion_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        completion_ids[row, len(ids)] = embedder.ret_token_id
    prompt = embedder.collator(items, instructions, generative=True)
    logprobs, embeddings = score_completions(embedder, prompt, completion_ids, ret_index)
    # score_completions zeroes every column after [RET]; each row teaches ret_index + 1 tokens.
    return -logprobs.sum() / (ret_index + 1).sum(), embeddings


def generate_embed(embedder, items: Sequence, instructions=None, *, sample: bool = False, temperature: float = 1.0,
                   top_p: float = 1.0, max_new_tokens: int = 32) -> Generation:
    """Generative embeddings of ``items`` (str, PIL image or (image, text)) with optional per-item instructions.

    ``sample=False`` decodes greedily (evaluation); ``sample=True`` draws from ``softmax(logits / temperature)``
    restricted to the top-p nucleus, with torch's global RNG. Runs without gradients; :func:`score_completions` on
    the returned prompt and completions gives the same log-probs and embeddings with gradients.
    """
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    if sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1; got temperature={temperature}, "
                         f"top_p={top_p}")
    tokenizer = embedder.tokenizer
    ret_id = embedder.ret_token_id
    stop_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    pad_id = embedder.collator.pad_token_id
    prompt = embedder.collator(items, instructions, generative=True)
    hf = embedder._hf_model()
    device = embedder.device
    config = GenerationConfig(
        do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
        top_k=0 if sample else None,
        max_new_tokens=max_new_tokens, eos_token_id=[ret_id, *stop_ids], pad_token_id=pad_id,
        suppress_tokens=embedder.suppressed_token_ids,
    )
    inputs = {k: v.to(device) for k, v in prompt.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(hf.dtype)
    was_training = embedder.training
    embedder.eval()
    try:
        with torch.no_grad():
            sequences = hf.generate(**inputs, generation_config=config)
            ids, mask, ret_index = _completions(sequences[:, prompt["input_ids"].shape[1]:].cpu(), ret_id, stop_ids,
                                                pad_id)
            logprobs, embeddings = score_completions(embedder, prompt, ids, ret_index,
                                                     temperature if sample else 1.0)
    finally:
        embedder.train(was_training)
    logprobs = torch.where(mask.to(logprobs.device), logprobs, 0.0)
    return Generation(prompt, ids, mask, ret_index, logprobs, embeddings,
                      temperature if sample else 1.0)


class GenerativeEncoder:
    """An ``embed``-compatible view of an :class:`~elva.model.ElvaEmbedder` that uses greedy generative extraction,
    so evaluation and mining code can run on stage 3's embeddings unchanged."""

    def __init__(self, embedder):
        self.embedder = embedder

    def embed(self, items: Sequence, instructions=None, batch_size: int = 32) -> torch.Tensor:
        return self.embedder.embed(items, instructions, batch_size, extraction="generative")


def encoder_for(embedder, extraction: str | None = None):
    """What evaluation calls ``embed`` on: ``embedder`` itself for "emb", a :class:`GenerativeEncoder` for
    "generative"; None takes the model's own ``config.extraction`` (stage 3 saves "generative")."""
    config = getattr(embedder, "config", None)
    extraction = extraction or getattr(config, "extraction", "emb")
    if extraction == "emb":
        return embedder
    if extraction != "generative":
        raise ValueError(f"extraction must be 'emb', 'generative' or None; got {extraction!r}")
    if not hasattr(embedder, "generate_embed"):
        raise TypeError(f"generative extraction needs an ElvaEmbedder; got {type(embedder).__name__}")
    return GenerativeEncoder(embedder)

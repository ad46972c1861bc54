"""Stage 3: ELVA's ranking-driven RL, GRPO with rule-based ranking rewards (SPEC Part B, stage 3).

Per optimizer step, for each query of the batch:

1. **Rollouts.** G generative embeddings of the query (:func:`elva.generative.generate_embed`, sampled): a summary,
   then ``[RET]``, whose hidden state is the embedding. Candidates (the positive, ``n_hard`` mined hard negatives and
   ``n_random`` random ones) are encoded greedily once and shared by the group (``rl.rollout_candidates: query``),
   or sampled in every rollout (``all``; their summaries then carry the rollout's advantage too).
2. **Rewards.** ``elva_kernels.elva_rewards`` ranks each rollout's candidates and gives R_Margin, R_Rank, R_total and
   the group-normalised advantages in one op.
3. **Loss** (:func:`grpo_loss`): the token-level clipped importance ratio against the rollout-time log-probs, plus
   beta times the k3 KL to the reference policy, which is the same model with its LoRA adapters (and any
   ``model.lora_modules_to_save`` copies) disabled: the starting model, since stage 3 folds any adapter it starts
   with into the weights and attaches fresh ones. The paper starts from stage 2; the tiny recipe starts from the
   generative cold start (configs/tiny_coldstart.yaml).

Negatives are mined once with the starting model (its own extraction) into ``run_dir/negatives.jsonl`` unless
``data.negatives`` names a file from ``elva mine``. Logs use TRL's GRPO metric names (``logs.csv``), sample
rollouts go to ``rollouts.jsonl``, and checkpoints and resume work as in stages 1-2. The final model
(``run_dir/model``) records ``extraction: generative``, so ``elva eval`` reads it through ``[RET]``.

    python -m elva.train.grpo configs/tiny_stage3.yaml --data-dir data/multigrain train.init_from=runs/s2/model
    torchrun --nproc_per_node 8 -m elva.train.grpo configs/qwen2vl_2b_stage3.yaml --data-dir /data/M-BEIR
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from elva.config import RlConfig, RunConfig
from elva.generative import Generation, generate_embed, score_completions
from elva.train.contrastive import MBeirPairDataset, select_queries
from elva.train.loop import (CsvLogger, ShardedBatchSampler, average_gradients, build_model, check_resolved,
                             open_run_dir, run_on_ranks, resume, save_checkpoint,
                             optimizer_and_schedule, seed_everything, stage_main)

logger = logging.getLogger(__name__)

__all__ = ["grpo_loss", "RlExample", "RlDataset", "Rollouts", "collect_rollouts", "policy_loss", "run_grpo", "main"]

LOG_COLUMNS = ("step", "loss", "reward", "reward_std", "rewards/margin/mean", "rewards/rank/mean", "positive_rank",
               "kl", "clip_ratio", "frac_reward_zero_std", "completion_length", "lr", "seconds", "rollouts_per_s")


# --------------------------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------------------------
def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, clip: float = 0.2, beta: float = 0.2,
              aggregation: str = "sequence") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped surrogate with a k3 KL penalty, over n sequences of T tokens.

    With ratio = exp(logprobs - old_logprobs) and A the sequence's advantage, every token in ``mask`` costs
    ``-min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A) + beta * (exp(ref - logprobs) - (ref - logprobs) - 1)``.
    "sequence" averages each sequence's tokens and then the sequences with any token (DeepSeekMath); "token"
    averages all tokens of the batch (DAPO). Returns (loss, {"kl": mean k3 per token, "clip_ratio": the fraction of
    tokens whose ratio left the clip range in the direction the advantage pushes}).
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    advantage = advantages.to(logprobs.dtype)[:, None]
    per_token = -torch.minimum(ratio * advantage, torch.clamp(ratio, 1 - clip, 1 + clip) * advantage)
    kl = torch.zeros_like(logprobs)
    if ref_logprobs is not None:
        log_ratio = ref_logprobs - logprobs
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + beta * kl
    tokens = mask.sum()
    if aggregation == "sequence":
        per_sequence = mask.sum(1)
        has_tokens = per_sequence > 0
        loss = ((per_token * mask).sum(1)[has_tokens] / per_sequence[has_tokens]).sum() / has_tokens.sum().clamp(min=1)
    elif aggregation == "token":
        loss = (per_token * mask).sum() / tokens.clamp(min=1)
    else:
        raise ValueError(f"aggregation must be 'sequence' or 'token'; got {aggregation!r}")
    clipped = ((ratio < 1 - clip) & (advantage < 0)) | ((ratio > 1 + clip) & (advantage > 0))
    stats = {"kl": (kl * mask).sum() / tokens.clamp(min=1),
             "clip_ratio": (clipped.to(mask.dtype) * mask).sum() / tokens.clamp(min=1)}
    return loss, stats


# --------------------------------------------------------------------------------------------------------------------
# Data: queries with their positive and mined negatives
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RlExample:
    qid: str
    query: Any  # an ElvaEmbedder item
    instruction: str | None
    candidates: list  # the positive first, then the negatives


class RlDataset(MBeirPairDataset):
    """Stage 3's queries (``data.query_fraction`` of each dataset, drawn with the seed), each with its positive (drawn
    as in stage 2, so a resumed run sees the same examples) followed by its mined negatives."""

    def __init__(self, config: RunConfig, negatives: str | os.PathLike):
        d = config.data
        super().__init__(d.queries, d.pool, d.instructions, d.image_root, config.train.seed, d.query_fraction)
        self.negatives = _read_negatives(negatives, {q.qid for q in self.queries}, self.pool)

    def __getitem__(self, key) -> RlExample:
        q, positive, instruction = self.draw(key)
        record = self.negatives[q.qid]
        dids = [positive.did, *record["hard"], *record["random"]]
        return RlExample(q.qid, self.item(q), instruction, [self.item(self.pool[did]) for did in dids])


def _read_negatives(path, qids: set[str], pool) -> dict[str, dict]:
    """The mined negatives of every selected query; errors name the file and line."""
    found: dict[str, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                qid, hard, rand = record["qid"], list(record["hard"]), list(record["random"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{line_no}: a negatives line must be JSON with qid, hard and random "
                                 f"({exc})") from None
            unknown = [did for did in hard + rand if did not in pool]
            if unknown:
                raise ValueError(f"{path}:{line_no}: candidate ids {unknown[:3]} are not in the pool")
            if qid in qids:
                found[qid] = {"hard": hard, "random": rand}
    missing = sorted(qids - set(found))
    if missing:
        raise ValueError(f"{path} has no negatives for {len(missing)} selected queries (e.g. {missing[:3]}); mine "
                         "them again for this query set (elva mine, or data.negatives=null)")
    return found


def _mine_negatives(model, config: RunConfig, out: Path) -> Path:
    """Mine with the starting model over the selected queries and the training pool (rank 0)."""
    from elva.data.mbeir import load_instructions, load_pool
    from elva.mine import mine_records, write_records

    d, rl = config.data, config.rl
    pool = load_pool(d.pool)
    queries = select_queries(d.queries, pool, d.query_fraction, config.train.seed)
    records = mine_records(model, [("rl queries", queries)], pool, d.image_root, load_instructions(d.instructions),
                           n_hard=rl.n_hard, n_random=rl.n_random, max_score=rl.max_score, seed=config.train.seed,
                           progress=False)
    return write_records(records, out)


# --------------------------------------------------------------------------------------------------------------------
# Rollouts and the policy loss
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Rollouts:
    """One batch of Q queries x G rollouts. ``generations`` are the sampled sequences; ``advantage_rows`` maps each
    of their rows to its (query, rollout) pair, flattened as q * G + g."""

    generations: list[Generation]
    advantage_rows: list[torch.Tensor]
    rewards: Any  # elva_kernels.ElvaRewards, [Q, G]
    ref_logprobs: list[torch.Tensor | None]
    query_embeddings: torch.Tensor  # [Q, G, d]
    candidate_embeddings: torch.Tensor  # [Q, C, d] or [Q, G, C, d]
    candidate_mask: torch.Tensor  # bool [Q, C]


def _scatter_candidates(flat: torch.Tensor, counts: list[int], width: int, leading: tuple[int, ...]) -> torch.Tensor:
    """[*leading, width, d] from the rows of ``flat`` ([sum(counts) * prod(leading[1:]), d]), zero padded."""
    out = flat.new_zeros(*leading, width, flat.shape[-1])
    view = out.view(leading[0], -1, width, flat.shape[-1])
    offset = 0
    for q, count in enumerate(counts):
        per_q = view.shape[1] * count
        view[q, :, :count] = flat[offset:offset + per_q].view(view.shape[1], count, -1)
        offset += per_q
    return out


@torch.no_grad()
def collect_rollouts(model, examples: Sequence[RlExample], rl: RlConfig) -> Rollouts:
    import elva_kernels

    G = rl.group_size
    counts = [len(e.candidates) for e in examples]
    width = max(counts)
    Q = len(examples)
    query_gen = generate_embed(model, [e.query for e in examples for _ in range(G)],
                               [e.instruction for e in examples for _ in range(G)], sample=True,
                               temperature=rl.temperature, top_p=rl.top_p, max_new_tokens=rl.max_new_tokens)
    generations, rows = [query_gen], [torch.arange(Q * G)]
    if rl.rollout_candidates == "query":
        cand_gen = generate_embed(model, [c for e in examples for c in e.candidates],
                                  max_new_tokens=rl.max_new_tokens)
        candidates = _scatter_candidates(cand_gen.embeddings, counts, width, (Q,))
    else:
        cand_gen = generate_embed(model, [c for e in examples for _ in range(G) for c in e.candidates], sample=True,
                                  temperature=rl.temperature, top_p=rl.top_p, max_new_tokens=rl.max_new_tokens)
        candidates = _scatter_candidates(cand_gen.embeddings, counts, width, (Q, G))
        generations.append(cand_gen)
        rows.append(torch.cat([torch.full((G * n,), q * G, dtype=torch.long).view(G, n) + torch.arange(G)[:, None]
                               for q, n in enumerate(counts)]).flatten())
    mask = torch.arange(width)[None, :] < torch.tensor(counts)[:, None]
    query_emb = query_gen.embeddings.view(Q, G, -1)
    r = rl.reward
    rewards = elva_kernels.elva_rewards(
        query_emb, candidates, positive_index=0, delta=r.delta, gamma=r.gamma, alpha=r.alpha, eps=r.eps,
        log_base=r.log_base if r.log_base == "e" else 2, mask=mask.to(query_emb.device), advantage="group",
        adv_eps=r.adv_eps,
    )
    ref = [_reference_logprobs(model, g) if rl.beta > 0 else None for g in generations]
    return Rollouts(generations, rows, rewards, ref, query_emb, candidates, mask)


def _reference_logprobs(model, generation: Generation) -> torch.Tensor:
    """Log-probs under the reference policy: the same weights with the LoRA adapters switched off."""
    with model.model.disable_adapter():
        logprobs, _ = score_completions(model, generation.prompt, generation.completion_ids, generation.ret_index,
                                        generation.temperature)
    return logprobs


def _padded_cat(tensors: Sequence[torch.Tensor], value: float = 0.0) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value) for t in tensors])


def policy_loss(model, rollouts: Rollouts, rl: RlConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of the current policy on ``rollouts`` (with gradients), plus the auxiliary differentiable-reward
    term when ``rl.aux_weight`` > 0."""
    import elva_kernels

    advantages = rollouts.rewards.advantages.flatten()
    new, old, ref, adv, mask, query_emb = [], [], [], [], [], None
    for generation, rows, ref_logprobs in zip(rollouts.generations, rollouts.advantage_rows, rollouts.ref_logprobs):
        logprobs, embeddings = score_completions(model, generation.prompt, generation.completion_ids,
                                                 generation.ret_index, generation.temperature)
        if query_emb is None:
            query_emb = embeddings
        device = logprobs.device
        new.append(logprobs)
        old.append(generation.logprobs.to(device))
        ref.append(ref_logprobs.to(device) if ref_logprobs is not None else logprobs.detach())
        adv.append(advantages[rows.to(advantages.device)].to(device))
        mask.append(generation.completion_mask.to(device))
    loss, stats = grpo_loss(_padded_cat(new), _padded_cat(old), _padded_cat(ref) if rl.beta > 0 else None,
                            torch.cat(adv), _padded_cat(mask), clip=rl.clip, beta=rl.beta,
                            aggregation=rl.loss_aggregation)
    if rl.aux_weight > 0:
        r = rl.reward
        differentiable = elva_kernels.elva_rewards(
            query_emb.view_as(rollouts.query_embeddings), rollouts.candidate_embeddings, positive_index=0,
            delta=r.delta, gamma=r.gamma, alpha=r.alpha, eps=r.eps, log_base=r.log_base if r.log_base == "e" else 2,
            mask=rollouts.candidate_mask.to(query_emb.device), advantage="none", differentiable=True,
        )
        loss = loss - rl.aux_weight * differentiable.total.mean()
    return loss, stats


def rollout_metrics(rollouts: Rollouts) -> dict[str, torch.Tensor]:
    """TRL's GRPO reward metrics for one batch (means over its rollouts)."""
    rewards = rollouts.rewards
    group_std = rewards.total.std(1) if rewards.total.shape[1] > 1 else torch.zeros_like(rewards.total[:, 0])
    lengths = torch.cat([g.lengths.float() for g in rollouts.generations])
    return {
        "reward": rewards.total.mean(),
        "reward_std": group_std.mean(),
        "rewards/margin/mean": rewards.margin.mean(),
        "rewards/rank/mean": rewards.rank_reward.mean(),
        "positive_rank": rewards.rank.double().mean(),
        "frac_reward_zero_std": (group_std < 1e-6).double().mean(),
        "completion_length": lengths.mean(),
    }


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------
def run_grpo(config: RunConfig) -> Path:
    """Run stage 3 as configured and return the final model folder (``run_dir/model``). Under torchrun every rank
    takes ``train.batch_size / world`` queries per step; gradients are averaged over ranks."""
    check_resolved(config)
    if config.train.stage != 3 or config.data.kind != "mbeir":
        raise ValueError(f"run_grpo trains stage 3 on M-BEIR data; got train.stage={config.train.stage}, "
                         f"data.kind={config.data.kind!r}")
    return run_on_ranks(_train, config)


def _train(config: RunConfig, rank: int, world: int) -> Path:
    tc, rl = config.train, config.rl
    run_dir = Path(config.run_dir)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    resume_from = open_run_dir(config, rank)

    seed_everything(tc.seed)
    model = build_model(config).to(device)
    # The reference policy is this model with its adapters off, so start from folded weights and fresh adapters.
    model.merge_lora().add_lora()
    model.eval()  # no dropout: the rollout-time and update-time log-probs must come from the same function
    named = {n: p for n, p in model.model.named_parameters() if p.requires_grad}
    params = list(named.values())

    negatives = Path(config.data.negatives) if config.data.negatives else run_dir / "negatives.jsonl"
    if not negatives.is_file():
        if config.data.negatives:
            raise ValueError(f"data.negatives: {negatives} does not exist; run `elva mine` or set it to null")
        if rank == 0:
            _mine_negatives(model, config, negatives)
            logger.info("mined negatives with the starting model into %s", negatives)
        if world > 1:
            dist.barrier()
    dataset = RlDataset(config, negatives)
    micro_global = tc.batch_size // tc.grad_accum
    total_steps, optimizer, scheduler = optimizer_and_schedule(params, tc, len(dataset), rank, world, "queries")

    # In-training randomness (dropout, rollout sampling) differs per rank; the data order does not depend on it.
    step, position = resume(resume_from, named, optimizer, scheduler, tc.seed, rank)

    sampler = ShardedBatchSampler(len(dataset), micro_global, rank, world, tc.seed, start=position)
    # Not a DataLoader: creating its iterator draws from torch's RNG, which would shift the resumed rollouts.
    batches = ([dataset[key] for key in keys] for keys in sampler)
    log = CsvLogger(run_dir, step, LOG_COLUMNS, "reward", "mean R_total") if rank == 0 else None
    samples = _RolloutTable(run_dir / "rollouts.jsonl", step) if rank == 0 else None
    window: list[dict[str, torch.Tensor]] = []
    window_start = time.perf_counter()

    while step < total_steps:
        metrics: dict[str, torch.Tensor] = {}
        batch = []
        for _ in range(tc.grad_accum):
            examples: list[RlExample] = next(batches)
            rollouts = collect_rollouts(model, examples, rl)
            batch.append((examples, rollouts))
            for key, value in rollout_metrics(rollouts).items():
                metrics[key] = metrics.get(key, 0) + value.double().cpu() / tc.grad_accum
        lr = scheduler.get_last_lr()[0]
        for _ in range(rl.num_iterations):  # mu optimizer updates on the same rollouts
            optimizer.zero_grad(set_to_none=True)
            for examples, rollouts in batch:
                loss, stats = policy_loss(model, rollouts, rl)
                (loss / tc.grad_accum).backward()
                for key, value in (("loss", loss), *stats.items()):
                    metrics[key] = metrics.get(key, 0) + value.detach().double().cpu() / (tc.grad_accum *
                                                                                          rl.num_iterations)
            _update(params, world, tc.max_grad_norm, optimizer)
        if samples is not None and (step + 1) % tc.log_every == 0:
            samples.add(step + 1, model.tokenizer, *batch[0], rl.log_rollouts)
        if world > 1:
            keys = sorted(metrics)
            flat = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float64) for k in keys]).to(device)
            dist.all_reduce(flat)
            metrics = dict(zip(keys, (flat / world).cpu()))
        scheduler.step()
        step += 1
        window.append(metrics)

        if step % tc.log_every == 0 or step == total_steps:
            seconds = time.perf_counter() - window_start
            if log is not None:
                row = {key: f"{float(torch.stack([torch.as_tensor(m[key]) for m in window]).mean()):.6g}"
                       for key in LOG_COLUMNS if key in window[0]}
                row.update(step=step, lr=f"{lr:.6g}", seconds=f"{seconds:.4f}",
                           rollouts_per_s=f"{len(window) * tc.batch_size * rl.group_size / max(seconds, 1e-9):.2f}")
                log.log(row)
                logger.info("step %d/%d reward %s (std %s) kl %s clip %s loss %s %.2f s/step", step, total_steps,
                            row["reward"], row["reward_std"], row["kl"], row["clip_ratio"], row["loss"],
                            seconds / len(window))
            window, window_start = [], time.perf_counter()

        if step % tc.save_every == 0 or step == total_steps:
            save_checkpoint(config, step, named, optimizer, scheduler, sampler, rank, world)

    if log is not None:
        log.close()
    out = run_dir / "model"
    if rank == 0:
        if tc.merge_lora_at_end:
            model.merge_lora()
        model.config.extraction = "generative"
        model.config.generative_max_new_tokens = rl.eval_max_new_tokens
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out)
    if world > 1:
        dist.barrier()
    return out


def _update(params: list[torch.nn.Parameter], world: int, max_grad_norm: float | None, optimizer) -> None:
    if world > 1:
        average_gradients(params, world)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()


class _RolloutTable:
    """``rollouts.jsonl``: a few sample rollouts per log row (summary text, reward, advantage, rank of the
    positive). On resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if resume_step > 0 and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def add(self, step: int, tokenizer, examples: Sequence[RlExample], rollouts: Rollouts, count: int) -> None:
        generation, rewards = rollouts.generations[0], rollouts.rewards
        G = rewards.total.shape[1]
        with self.path.open("a", encoding="utf-8") as f:
            for row in range(min(count, generation.completion_ids.shape[0])):
                q, g = divmod(row, G)
                tokens = generation.completion_ids[row, :int(generation.ret_index[row]) + 1]
                f.write(json.dumps({
                    "step": step, "qid": examples[q].qid, "rollout": g,
                    "summary": tokenizer.decode(tokens.tolist()),
                    "reward": round(float(rewards.total[q, g]), 6), "advantage": round(float(rewards.advantages[q, g]), 6),
                    "positive_rank": int(rewards.rank[q, g]),
                }) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Command line (`elva train` dispatches stage-3 configs here)
# --------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, "python -m elva.train.grpo", __doc__.split("\n")[0], run_grpo)


if __name__ == "__main__":
    raise SystemExit(main())

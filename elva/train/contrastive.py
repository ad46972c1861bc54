"""Stages 1-2: InfoNCE contrastive training of the ELVA embedder (SPEC Part B, Stages 1 and 2).

Stage 1 trains on NLI pairs (anchor -> positive sentence), stage 2 on M-BEIR (query with its task instruction ->
positive candidate). Negatives are the other positives of the micro-batch, gathered across ranks with gradient by
``elva_kernels.infonce_loss(..., group=WORLD)``; tau = ``train.temperature`` (0.05 in the paper).

With ``model.extraction: generative``, stage 2 is the *generative cold start* that prepares stage 3 on a model that
cannot write yet (the built-in tiny one; the paper's Qwen2-VL can). Each input gets a teacher-forced summary, then
``[RET]``; the loss is InfoNCE at ``[RET]`` plus ``train.summary_weight`` times the summaries' next-token loss. A
text's summary is the text itself, an image's is its caption from ``data.captions``, an (image, text) candidate's
is its text and an (image, text) query's is its positive's (the scene it asks for).

Single process (CPU or one GPU)::

    python -m elva.train.contrastive configs/tiny_stage2.yaml --data-dir data/multigrain train.max_steps=20

Several GPUs (or CPU processes, gloo)::

    torchrun --nproc_per_node 8 -m elva.train.contrastive configs/qwen2vl_2b.yaml --data-dir /data/M-BEIR

Writes ``run_dir/config.yaml`` (the resolved config), ``run_dir/logs.csv`` (step, loss, lr, seconds, samples_per_s),
``run_dir/checkpoints/step_*`` (see :mod:`elva.train.checkpoint`) and ``run_dir/model`` (the final model, LoRA merged
when ``train.merge_lora_at_end``). Only rank 0 writes.
"""
from __future__ import annotations

import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

from elva.config import RunConfig
from elva.generative import teach_summaries
from elva.train.loop import (CsvLogger, ShardedBatchSampler, average_gradients, build_model, check_resolved,
                             mbeir_item, open_run_dir, run_on_ranks, resume, save_checkpoint,
                             optimizer_and_schedule, seed_everything, stage_main)

logger = logging.getLogger(__name__)

__all__ = ["run_training", "Pair", "NliPairDataset", "MBeirPairDataset", "main"]

_LOG_COLUMNS = ("step", "loss", "lr", "seconds", "samples_per_s")


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    query: Any  # an ElvaEmbedder item: str, PIL image or (image, text)
    instruction: str | None
    candidate: Any
    query_summary: str | None = None  # the generative cold start's teacher-forced summaries
    candidate_summary: str | None = None


class NliPairDataset(torch.utils.data.Dataset):
    """Stage 1: (anchor sentence, positive sentence); keys are ``(index, epoch)``."""

    def __init__(self, path: str):
        from elva.data.nli import load_nli_pairs

        self.pairs = load_nli_pairs(path)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key) -> Pair:
        pair = self.pairs[key[0]]
        return Pair(pair.anchor, None, pair.positive)


class MBeirPairDataset(torch.utils.data.Dataset):
    """Stage 2: (query item with its task instruction, positive candidate item); keys are ``(index, epoch)``.

    The positive (when a query lists several) and the instruction variant are drawn from ``random.Random`` seeded by
    (seed, epoch, index), so a resumed run sees exactly the pairs of an uninterrupted one. ``query_fraction`` < 1
    keeps that fraction of each dataset's queries (:func:`select_queries`). With ``captions`` (a captions jsonl),
    pairs carry the generative cold start's summaries (:meth:`summary`).
    """

    def __init__(self, query_files: Sequence[str], pool: str, instructions: str, image_root: str, seed: int = 0,
                 query_fraction: float = 1.0, captions: str | None = None):
        from elva.data.mbeir import load_captions, load_instructions, load_pool, load_queries

        self.captions_file = captions
        self.captions = load_captions(captions) if captions else None
        self.pool = load_pool(pool)
        if query_fraction < 1:
            self.queries = select_queries(query_files, self.pool, query_fraction, seed)
        else:
            self.queries = [q for path in query_files for q in load_queries(path, pool=self.pool)]
        self.instructions = load_instructions(instructions)
        self.image_root = image_root
        self.seed = seed

    def __len__(self) -> int:
        return len(self.queries)

    def draw(self, key):
        """(query record, positive record, instruction) for ``(index, epoch)``."""
        index, epoch = key
        q = self.queries[index]
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        positive = self.pool[rng.choice(q.pos_cand_list)]
        return q, positive, rng.choice(self.instructions.for_query(q, positive))

    def item(self, record):
        """The ElvaEmbedder item of a query or candidate record."""
        if hasattr(record, "query_modality"):
            return mbeir_item(record.query_txt, record.query_img_path, record.query_modality, self.image_root,
                              record.origin)
        return mbeir_item(record.txt, record.img_path, record.modality, self.image_root, record.origin)

    def summary(self, record, positive=None) -> str:
        """A query's or candidate's cold-start summary: a text itself, an image its caption; with both, a candidate
        its own text and a query its ``positive``'s summary (the scene it asks for)."""
        is_query = hasattr(record, "query_modality")
        text, image, modality = ((record.query_txt, record.query_img_path, record.query_modality) if is_query
                                 else (record.txt, record.img_path, record.modality))
        if modality == "text" or (modality == "image,text" and not is_query):
            return text
        if modality == "image,text":
            return self.summary(positive)
        if image not in self.captions:
            raise ValueError(f"{record.origin}: image {image!r} has no caption in data.captions ({self.captions_file}); "
                             "the generative cold start needs one for every training image")
        return self.captions[image]

    def __getitem__(self, key) -> Pair:
        q, positive, instruction = self.draw(key)
        if self.captions is None:
            return Pair(self.item(q), instruction, self.item(positive))
        return Pair(self.item(q), instruction, self.item(positive), self.summary(q, positive), self.summary(positive))


def select_queries(query_files: Sequence[str], pool, fraction: float, seed: int) -> list:
    """``fraction`` of each dataset's queries in each file (at least one per dataset), the same subset for a given
    seed: the paper's "1% of each M-BEIR training dataset" also from the union file."""
    from elva.data.mbeir import load_queries

    chosen = []
    for path in query_files:
        by_dataset: dict[str, list] = {}
        for query in load_queries(path, pool=pool):
            by_dataset.setdefault(query.dataset_id, []).append(query)
        for dataset_id, queries in by_dataset.items():
            keep = max(1, round(fraction * len(queries)))
            rows = sorted(random.Random(f"{seed}/{Path(path).name}/{dataset_id}").sample(range(len(queries)), keep))
            chosen += [queries[i] for i in rows]
    return chosen


def _build_dataset(config: RunConfig) -> torch.utils.data.Dataset:
    d = config.data
    if d.kind == "nli":
        if not d.nli_pairs:
            raise ValueError("data.nli_pairs must name the NLI pairs file when data.kind is 'nli'; got null")
        return NliPairDataset(d.nli_pairs)
    missing = [name for name in ("pool", "instructions", "image_root") if not getattr(d, name)]
    if missing or not d.queries:
        raise ValueError(f"data.kind 'mbeir' needs data.queries, data.pool, data.instructions and data.image_root; "
                         f"missing {missing + ([] if d.queries else ['queries'])}")
    return MBeirPairDataset(d.queries, d.pool, d.instructions, d.image_root, seed=config.train.seed,
                            captions=d.captions if config.model.extraction == "generative" else None)


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------
def run_training(config: RunConfig) -> Path:
    """Train stage 1 or 2 as configured and return the final model folder (``run_dir/model``).

    Under torchrun (WORLD_SIZE > 1) the process group is created from the environment (nccl on CUDA, gloo on CPU)
    unless one exists; every rank returns the same path once rank 0 has written it.
    """
    if config.train.stage == 3:
        raise ValueError("train.stage 3 is GRPO: use elva.train.run_grpo (or run_stage, which picks by stage)")
    check_resolved(config)
    return run_on_ranks(_train, config)


def _train(config: RunConfig, rank: int, world: int) -> Path:
    import elva_kernels

    tc = config.train
    run_dir = Path(config.run_dir)
    group = dist.group.WORLD if world > 1 else None
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")

    resume_from = open_run_dir(config, rank)

    # The model (and its fresh LoRA) is built from the same seed on every rank, so all ranks start identical.
    seed_everything(tc.seed)
    model = build_model(config).to(device)
    model.train()
    named = {n: p for n, p in model.model.named_parameters() if p.requires_grad}
    params = list(named.values())

    dataset = _build_dataset(config)
    generative = config.model.extraction == "generative"
    micro_global = tc.batch_size // tc.grad_accum
    total_steps, optimizer, scheduler = optimizer_and_schedule(params, tc, len(dataset), rank, world, "pairs")

    # In-training randomness (dropout, rollout sampling) differs per rank; the data order does not depend on it.
    step, position = resume(resume_from, named, optimizer, scheduler, tc.seed, rank)

    sampler = ShardedBatchSampler(len(dataset), micro_global, rank, world, tc.seed, start=position)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=list, num_workers=0)
    batches = iter(loader)
    use_autocast = tc.bf16 and device.type == "cuda"
    loss_name = "InfoNCE at [RET] + summary NLL" if generative else "InfoNCE loss"
    log = CsvLogger(run_dir, step, _LOG_COLUMNS, "loss", loss_name) if rank == 0 else None
    window_losses: list[torch.Tensor] = []
    window_start, window_steps = time.perf_counter(), 0

    while step < total_steps:
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for _ in range(tc.grad_accum):
            pairs: list[Pair] = next(batches)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                if generative:
                    q_nll, q = teach_summaries(model, [p.query for p in pairs], [p.instruction for p in pairs],
                                               [p.query_summary for p in pairs])
                    c_nll, c = teach_summaries(model, [p.candidate for p in pairs], None,
                                               [p.candidate_summary for p in pairs])
                else:
                    q = model.forward_embeddings(model.collator([p.query for p in pairs], [p.instruction for p in pairs]))
                    c = model.forward_embeddings(model.collator([p.candidate for p in pairs]))
            loss = elva_kernels.infonce_loss(q, c, temperature=tc.temperature, group=group)
            if generative:
                loss = loss + tc.summary_weight * (q_nll + c_nll) / 2
            (loss / tc.grad_accum).backward()
            step_loss += loss.detach() / tc.grad_accum
        if world > 1:
            average_gradients(params, world)
            dist.all_reduce(step_loss)
            step_loss /= world
        if tc.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        step += 1
        window_losses.append(step_loss)
        window_steps += 1

        if log is not None and (step % tc.log_every == 0 or step == total_steps):
            loss_value = torch.stack(window_losses).mean().item()  # host sync, once per log row
            seconds = time.perf_counter() - window_start
            log.log({"step": step, "loss": f"{loss_value:.9g}", "lr": f"{lr:.9g}", "seconds": f"{seconds:.4f}",
                     "samples_per_s": f"{window_steps * tc.batch_size / max(seconds, 1e-9):.2f}"})
            logger.info("step %d/%d loss %.4f lr %.3g %.1f ms/step %.1f samples/s", step, total_steps, loss_value,
                        lr, 1000 * seconds / window_steps, window_steps * tc.batch_size / max(seconds, 1e-9))
        if step % tc.log_every == 0 or step == total_steps:
            window_losses, window_start, window_steps = [], time.perf_counter(), 0

        if step % tc.save_every == 0 or step == total_steps:
            save_checkpoint(config, step, named, optimizer, scheduler, sampler, rank, world)

    if log is not None:
        log.close()
    out = run_dir / "model"
    if rank == 0:
        if tc.merge_lora_at_end:
            model.merge_lora()
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out)
    if world > 1:
        dist.barrier()
    return out


# --------------------------------------------------------------------------------------------------------------------
# Command line (the `elva train` command calls run_training the same way)
# --------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    return stage_main(argv, "python -m elva.train.contrastive", __doc__.split("\n")[0], run_training)


if __name__ == "__main__":
    raise SystemExit(main())

"""Stages 1-2: InfoNCE contrastive training of the ELVA embedder (SPEC Part B, Stages 1 and 2).

Stage 1 trains on NLI pairs (anchor -> positive sentence), stage 2 on M-BEIR (query with its task instruction ->
positive candidate). Negatives are the other positives of the micro-batch, gathered across ranks with gradient by
``elva_kernels.infonce_loss(..., group=WORLD)``; tau = ``train.temperature`` (0.05 in the paper).

Single process (CPU or one GPU)::

    python -m elva.train.contrastive configs/tiny_stage2.yaml --data-dir data/multigrain train.max_steps=20

Several GPUs (or CPU processes, gloo)::

    torchrun --nproc_per_node 8 -m elva.train.contrastive configs/qwen2vl_2b.yaml --data-dir /data/M-BEIR

Writes ``run_dir/config.yaml`` (the resolved config), ``run_dir/logs.csv`` (step, loss, lr, seconds, samples_per_s),
``run_dir/checkpoints/step_*`` (see :mod:`elva.train.checkpoint`) and ``run_dir/model`` (the final model, LoRA merged
when ``train.merge_lora_at_end``). Only rank 0 writes.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from elva.config import RunConfig, config_to_dict, load_config, save_config, unresolved_placeholders
from elva.train import checkpoint
from elva.train.loop import (CsvLogger, ShardedBatchSampler, average_gradients, build_model, cosine_with_warmup,
                             init_distributed, mbeir_item)

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
    (seed, epoch, index), so a resumed run sees exactly the pairs of an uninterrupted one.
    """

    def __init__(self, query_files: Sequence[str], pool: str, instructions: str, image_root: str, seed: int = 0):
        from elva.data.mbeir import load_instructions, load_pool, load_queries

        self.pool = load_pool(pool)
        self.queries = [q for path in query_files for q in load_queries(path, pool=self.pool)]
        self.instructions = load_instructions(instructions)
        self.image_root = image_root
        self.seed = seed

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, key) -> Pair:
        index, epoch = key
        q = self.queries[index]
        rng = random.Random(f"{self.seed}/{epoch}/{index}")
        positive = self.pool[rng.choice(q.pos_cand_list)]
        instruction = rng.choice(self.instructions.for_query(q, positive))
        return Pair(
            mbeir_item(q.query_txt, q.query_img_path, q.query_modality, self.image_root, q.origin),
            instruction,
            mbeir_item(positive.txt, positive.img_path, positive.modality, self.image_root, positive.origin),
        )


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
    return MBeirPairDataset(d.queries, d.pool, d.instructions, d.image_root, seed=config.train.seed)


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
    unresolved = unresolved_placeholders(config)
    if unresolved:
        raise ValueError(f"config values still hold placeholders: {unresolved}; pass variables to load_config "
                         "(the CLI's --data-dir fills ${data_dir})")
    rank, world, owns_group = init_distributed()
    try:
        return _train(config, rank, world)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _train(config: RunConfig, rank: int, world: int) -> Path:
    import elva_kernels

    tc = config.train
    run_dir = Path(config.run_dir)
    group = dist.group.WORLD if world > 1 else None
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")

    resume_from = checkpoint.latest(run_dir) if tc.resume else None
    if not tc.resume and checkpoint.latest(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds checkpoints ({checkpoint.latest(run_dir).name}); set "
                         "train.resume=true to continue it, or choose a new run_dir")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")

    # The model (and its fresh LoRA) is built from the same seed on every rank, so all ranks start identical.
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    model = build_model(config).to(device)
    model.train()
    named = {n: p for n, p in model.model.named_parameters() if p.requires_grad}
    params = list(named.values())

    dataset = _build_dataset(config)
    micro_global = tc.batch_size // tc.grad_accum
    probe = ShardedBatchSampler(len(dataset), micro_global, rank, world, tc.seed)
    total_steps = tc.max_steps or int(tc.epochs * probe.batches_per_epoch) // tc.grad_accum
    if total_steps < 1:
        raise ValueError(f"{tc.epochs} epoch(s) of {len(dataset)} pairs is less than one step of {tc.batch_size}; "
                         "set train.max_steps or raise train.epochs")

    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(tc.warmup_steps, total_steps))

    step, position = 0, (0, 0)
    # Dropout and other in-training randomness differ per rank; the data order does not depend on it.
    torch.manual_seed(tc.seed + 7919 * rank)
    if resume_from is not None:
        state = checkpoint.load(resume_from)
        checkpoint.load_into_model(named, state["adapter"], where=str(resume_from))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        position = (int(state["data_position"]["epoch"]), int(state["data_position"]["batch"]))
        checkpoint.set_rng_state(state["rng"])  # rank 0's states; other ranks re-derive their own below
        if rank > 0:
            torch.manual_seed(tc.seed + 7919 * rank + step)
        logger.info("resumed from %s (step %d, epoch %d, batch %d)", resume_from, step, *position)

    sampler = ShardedBatchSampler(len(dataset), micro_global, rank, world, tc.seed, start=position)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=list, num_workers=0)
    batches = iter(loader)
    use_autocast = tc.bf16 and device.type == "cuda"
    log = CsvLogger(run_dir, step, _LOG_COLUMNS, "loss", "InfoNCE loss") if rank == 0 else None
    window_losses: list[torch.Tensor] = []
    window_start, window_steps = time.perf_counter(), 0

    while step < total_steps:
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for _ in range(tc.grad_accum):
            pairs: list[Pair] = next(batches)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                q = model.forward_embeddings(model.collator([p.query for p in pairs], [p.instruction for p in pairs]))
                c = model.forward_embeddings(model.collator([p.candidate for p in pairs]))
            loss = elva_kernels.infonce_loss(q, c, temperature=tc.temperature, group=group)
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
            if rank == 0:
                checkpoint.save(run_dir, step, {n: p.detach() for n, p in named.items()}, optimizer, scheduler,
                                data_position={"epoch": sampler.epoch, "batch": sampler.batch,
                                               "micro_batch_global": micro_global, "world_size": world},
                                config=config_to_dict(config), keep_last=tc.keep_last)
            if world > 1:
                dist.barrier()

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
    parser = argparse.ArgumentParser(prog="python -m elva.train.contrastive", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="run YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    parser.add_argument("--data-dir", default=None, help="fills ${data_dir} in the config")
    parser.add_argument("--resume", action="store_true", help="same as train.resume=true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    variables = {"data_dir": args.data_dir} if args.data_dir else {}
    out = run_training(load_config(args.config, overrides, variables))
    if int(os.environ.get("RANK", "0")) == 0:
        print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

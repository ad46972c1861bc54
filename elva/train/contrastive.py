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
import csv
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from elva.config import RunConfig, config_to_dict, load_config, save_config, unresolved_placeholders
from elva.train import checkpoint

logger = logging.getLogger(__name__)

__all__ = ["run_training", "Pair", "NliPairDataset", "MBeirPairDataset", "ShardedBatchSampler", "main"]

_LOG_COLUMNS = ("step", "loss", "lr", "seconds", "samples_per_s")


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    query: Any  # an ElvaEmbedder item: str, PIL image or (image, text)
    instruction: str | None
    candidate: Any


def _load_image(image_root: str, relative: str, origin: str):
    from PIL import Image

    from elva.data.mbeir import resolve_image

    with Image.open(resolve_image(image_root, relative, referenced_by=origin)) as image:
        return image.convert("RGB")


def _item(text: str | None, image_path: str | None, modality: str, image_root: str, origin: str):
    image = _load_image(image_root, image_path, origin) if "image" in modality else None
    text = text if "text" in modality else None
    if image is not None and text:
        return (image, text)
    return image if image is not None else text


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
            _item(q.query_txt, q.query_img_path, q.query_modality, self.image_root, q.origin),
            instruction,
            _item(positive.txt, positive.img_path, positive.modality, self.image_root, positive.origin),
        )


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Endless micro-batches of ``(index, epoch)`` keys: this rank's contiguous shard of each global micro-batch.

    Epoch ``e`` visits ``randperm(n)`` seeded by (seed, e); its global micro-batch ``b`` is
    ``perm[b*G:(b+1)*G]`` (G = ``global_batch``; the last partial batch is dropped) and rank r reads rows
    ``[r*G/W, (r+1)*G/W)`` of it, so the ranks' candidates gathered in rank order are the global batch in order.
    ``start`` = (epoch, batch) is the position to resume from.
    """

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start: tuple[int, int] = (0, 0)):
        if global_batch % world:
            raise ValueError(f"the micro-batch (batch_size / grad_accum = {global_batch}) must be divisible by the "
                             f"world size ({world}); change train.batch_size or train.grad_accum")
        if n < global_batch:
            raise ValueError(f"the dataset has {n} pairs, fewer than one micro-batch ({global_batch}); lower "
                             "train.batch_size or raise train.grad_accum")
        self.n, self.global_batch, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.batches_per_epoch = n // global_batch
        self.epoch, self.batch = start

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        per_rank = self.global_batch // self.world
        while True:
            perm = self._perm(self.epoch)
            while self.batch < self.batches_per_epoch:
                lo = self.batch * self.global_batch + self.rank * per_rank
                keys = [(int(i), self.epoch) for i in perm[lo:lo + per_rank]]
                self.batch += 1  # the position after this batch: what a checkpoint taken now resumes from
                yield keys
            self.epoch, self.batch = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.batches_per_epoch


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
# Model, optimizer, schedule
# --------------------------------------------------------------------------------------------------------------------
def _build_model(config: RunConfig):
    from elva.model import ElvaEmbedder

    mcfg = {k: v for k, v in config.model.to_dict().items() if v is not None}
    source = config.train.init_from or config.model_path
    if source == "tiny":
        model = ElvaEmbedder.tiny(seed=config.train.seed, config=mcfg)
    else:
        model = ElvaEmbedder.from_pretrained(source, config=mcfg)
    if not model.trainable_parameters():
        raise ValueError(f"the model has no trainable parameters (model.lora_r={config.model.lora_r}); set "
                         "model.lora_r > 0")
    return model


def _cosine_with_warmup(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


# --------------------------------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------------------------------
def _init_distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether this call created the process group); torchrun's env when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if world <= 1:
        return 0, 1, False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), True


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average the gradients over ranks in one flat all-reduce.

    Each rank's loss is the mean over its own queries against all gathered candidates, and the gather's backward has
    already summed every rank's gradient into the rows each rank owns; averaging the ranks' gradients therefore gives
    the gradient of the global mean loss, as one process on the whole batch would.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


# --------------------------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------------------------
class _Logger:
    """Rank 0's CSV (and TensorBoard when importable). On resume, rows after the checkpoint's step are dropped."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.path = run_dir / "logs.csv"
        rows = []
        if resume_step > 0 and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except Exception:  # tensorboard not installed: CSV only
            self.tb = None

    def log(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=_LOG_COLUMNS).writerow(row)
        if self.tb is not None:
            for key in ("loss", "lr", "samples_per_s"):
                self.tb.add_scalar(f"train/{key}", row[key], row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        self.plot()

    def plot(self) -> None:
        """run_dir/loss.png: the training loss by step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            return
        figure, axes = plt.subplots(figsize=(6, 3.5))
        axes.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows])
        axes.set(xlabel="step", ylabel="InfoNCE loss", title=self.path.parent.name)
        figure.tight_layout()
        figure.savefig(self.path.with_name("loss.png"), dpi=100)
        plt.close(figure)


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------
def run_training(config: RunConfig) -> Path:
    """Train stage 1 or 2 as configured and return the final model folder (``run_dir/model``).

    Under torchrun (WORLD_SIZE > 1) the process group is created from the environment (nccl on CUDA, gloo on CPU)
    unless one exists; every rank returns the same path once rank 0 has written it.
    """
    unresolved = unresolved_placeholders(config)
    if unresolved:
        raise ValueError(f"config values still hold placeholders: {unresolved}; pass variables to load_config "
                         "(the CLI's --data-dir fills ${data_dir})")
    rank, world, owns_group = _init_distributed()
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
    model = _build_model(config).to(device)
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(tc.warmup_steps, total_steps))

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
    log = _Logger(run_dir, step) if rank == 0 else None
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
            _average_gradients(params, world)
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

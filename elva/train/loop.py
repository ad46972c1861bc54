"""What the training stages share: data order, distributed set-up, model construction, schedule and CSV logging."""
from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from elva.config import RunConfig

logger = logging.getLogger(__name__)

__all__ = ["ShardedBatchSampler", "init_distributed", "average_gradients", "build_model", "cosine_with_warmup",
           "CsvLogger", "load_image", "mbeir_item", "check_resolved", "open_run_dir", "resume", "save_checkpoint",
           "stage_main", "run_on_ranks", "seed_everything", "optimizer_and_schedule"]


def load_image(image_root: str, relative: str, origin: str):
    from PIL import Image

    from elva.data.mbeir import resolve_image

    with Image.open(resolve_image(image_root, relative, referenced_by=origin)) as image:
        return image.convert("RGB")


def mbeir_item(text: str | None, image_path: str | None, modality: str, image_root: str, origin: str):
    """An ElvaEmbedder item (str, PIL image or (image, text)) from an M-BEIR record's fields; a missing image is
    reported with the file and line that reference it (``origin``)."""
    image = load_image(image_root, image_path, origin) if "image" in modality else None
    text = text if "text" in modality else None
    if image is not None and text:
        return (image, text)
    return image if image is not None else text


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


def build_model(config: RunConfig):
    """The run's ElvaEmbedder: ``train.init_from`` or ``model_path`` ("tiny" = the built-in model), with LoRA."""
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


def seed_everything(seed: int) -> None:
    """Python, numpy and torch from one seed (the same on every rank, so all ranks build the same model)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def optimizer_and_schedule(params: list, train, n_items: int, rank: int, world: int, what: str = "pairs"):
    """(total optimizer steps, AdamW, warmup + cosine LambdaLR) for ``n_items`` examples under ``train``
    (TrainConfig): ``max_steps``, else ``epochs`` passes of ``batch_size``."""
    micro_global = train.batch_size // train.grad_accum
    probe = ShardedBatchSampler(n_items, micro_global, rank, world, train.seed)
    total_steps = train.max_steps or int(train.epochs * probe.batches_per_epoch) // train.grad_accum
    if total_steps < 1:
        raise ValueError(f"{train.epochs} epoch(s) of {n_items} {what} is less than one step of {train.batch_size}; "
                         "set train.max_steps or raise train.epochs")
    optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(train.warmup_steps, total_steps))
    return total_steps, optimizer, scheduler


def cosine_with_warmup(warmup: int, total: int):
    """LambdaLR factor: linear warmup, then cosine decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def init_distributed() -> tuple[int, int, bool]:
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


def run_on_ranks(train, config: RunConfig):
    """``train(config, rank, world)`` inside the process group torchrun's environment describes (if any); a group
    created here is destroyed afterwards."""
    rank, world, owns_group = init_distributed()
    try:
        return train(config, rank, world)
    finally:
        if owns_group:
            dist.destroy_process_group()


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
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


class CsvLogger:
    """Rank 0's ``run_dir/logs.csv`` (and TensorBoard when importable) with the given columns, the first being
    "step"; ``close`` plots ``plot_column`` by step into ``run_dir/<plot_column>.png``. On resume, rows after the
    checkpoint's step are dropped."""

    def __init__(self, run_dir: Path, resume_step: int, columns: Sequence[str], plot_column: str = "loss",
                 plot_label: str = "loss"):
        self.path = run_dir / "logs.csv"
        self.columns = tuple(columns)
        self.plot_column, self.plot_label = plot_column, plot_label
        rows = []
        if resume_step > 0 and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
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
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)
        if self.tb is not None:
            for key in self.columns[1:]:
                self.tb.add_scalar(f"train/{key}", float(row[key]), row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        self.plot()

    def plot(self) -> None:
        """run_dir/<plot_column>.png: that column by step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            return
        figure, axes = plt.subplots(figsize=(6, 3.5))
        axes.plot([int(r["step"]) for r in rows], [float(r[self.plot_column]) for r in rows])
        axes.set(xlabel="step", ylabel=self.plot_label, title=self.path.parent.name)
        figure.tight_layout()
        figure.savefig(self.path.with_name(f"{self.plot_column}.png"), dpi=100)
        plt.close(figure)


# --------------------------------------------------------------------------------------------------------------------
# Run folder, resume and checkpoints
# --------------------------------------------------------------------------------------------------------------------
def check_resolved(config: RunConfig) -> None:
    from elva.config import unresolved_placeholders

    unresolved = unresolved_placeholders(config)
    if unresolved:
        raise ValueError(f"config values still hold placeholders: {unresolved}; pass variables to load_config "
                         "(the CLI's --data-dir fills ${data_dir})")


def open_run_dir(config: RunConfig, rank: int) -> Path | None:
    """Refuse a fresh run into a folder with checkpoints; rank 0 writes ``config.yaml``. Returns the checkpoint to
    resume from (``train.resume``), or None."""
    from elva.config import save_config
    from elva.train import checkpoint

    run_dir = Path(config.run_dir)
    latest = checkpoint.latest(run_dir)
    if not config.train.resume and latest is not None:
        raise ValueError(f"{run_dir} already holds checkpoints ({latest.name}); set train.resume=true to continue "
                         "it, or choose a new run_dir")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    return latest if config.train.resume else None


def resume(path: Path | None, named: dict, optimizer, scheduler, seed: int, rank: int) -> tuple[int, tuple[int, int]]:
    """Seed this rank's in-training randomness, then restore a checkpoint (adapter, optimizer, schedule, RNG) when
    ``path`` is given. Returns (step, (epoch, batch)). Rank 0 gets the saved RNG states; other ranks re-derive
    theirs from the step."""
    from elva.train import checkpoint

    torch.manual_seed(seed + 7919 * rank)
    if path is None:
        return 0, (0, 0)
    state = checkpoint.load(path)
    checkpoint.load_into_model(named, state["adapter"], where=str(path))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step = int(state["step"])
    position = (int(state["data_position"]["epoch"]), int(state["data_position"]["batch"]))
    checkpoint.set_rng_state(state["rng"])
    if rank > 0:
        torch.manual_seed(seed + 7919 * rank + step)
    logger.info("resumed from %s (step %d, epoch %d, batch %d)", path, step, *position)
    return step, position


def save_checkpoint(config: RunConfig, step: int, named: dict, optimizer, scheduler, sampler: ShardedBatchSampler,
                    rank: int, world: int) -> None:
    """Rank 0 writes the step's checkpoint (with the sampler's position); every rank waits for it."""
    from elva.config import config_to_dict
    from elva.train import checkpoint

    if rank == 0:
        checkpoint.save(Path(config.run_dir), step, {n: p.detach() for n, p in named.items()}, optimizer, scheduler,
                        data_position={"epoch": sampler.epoch, "batch": sampler.batch,
                                       "micro_batch_global": sampler.global_batch, "world_size": world},
                        config=config_to_dict(config), keep_last=config.train.keep_last)
    if world > 1:
        dist.barrier()


def stage_main(argv: list[str] | None, prog: str, description: str, run) -> int:
    """The ``python -m elva.train.<stage> CONFIG [overrides] [--data-dir D] [--resume]`` command."""
    import argparse

    from elva.config import load_config

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", help="run YAML file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    parser.add_argument("--data-dir", default=None, help="fills ${data_dir} in the config")
    parser.add_argument("--resume", action="store_true", help="same as train.resume=true")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    variables = {"data_dir": args.data_dir} if args.data_dir else {}
    out = run(load_config(args.config, overrides, variables))
    if int(os.environ.get("RANK", "0")) == 0:
        print(out)
    return 0

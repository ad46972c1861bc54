"""What the training stages share: data order, distributed set-up, model construction, schedule and CSV logging."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from elva.config import RunConfig

__all__ = ["ShardedBatchSampler", "init_distributed", "average_gradients", "build_model", "cosine_with_warmup",
           "CsvLogger", "load_image", "mbeir_item"]


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

"""``elva bench train`` / ``elva bench rl``: stage-2 and stage-3 throughput of a randomly initialised Qwen2-VL
(no download).

Each step embeds a batch of (image, instructed text) queries and their image positives, takes InfoNCE through
``elva_kernels.infonce_loss`` and updates the LoRA adapters with AdamW, as stage 2 does. Reports the median step
time, LLM tokens per second, peak memory and MFU. FLOPs per step: the frozen vision tower's forward
(2 * params * patches) plus the LLM's forward and the backward through its activations (4 * params * tokens);
the LoRA weight gradients are negligible. MFU divides by the GPU's dense bf16 peak (table below).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

import elva_kernels
from elva.model import QWEN2VL_2B_SIZES, QWEN2VL_2B_VOCAB, TINY_MODEL_CONFIG, ElvaEmbedder, ModelConfig

SIZES = {"tiny": (TINY_MODEL_CONFIG, None), "2b": (QWEN2VL_2B_SIZES, QWEN2VL_2B_VOCAB)}
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched on the device name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


@dataclass(frozen=True)
class TrainThroughput:
    size: str
    device: str
    batch_size: int
    step_ms: float
    tokens_per_s: float
    peak_memory_mib: float | None
    mfu: float | None


def _batches(embedder: ElvaEmbedder, batch_size: int, image_size: int, text_words: int, seed: int):
    rng = np.random.default_rng(seed)
    from PIL import Image

    def image():
        return Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))

    words = "a large red circle at the left on a grey background".split()
    text = " ".join(words[i % len(words)] for i in range(text_words))
    queries = embedder.collate([(image(), text) for _ in range(batch_size)], "Retrieve the image that matches.")
    positives = embedder.collate([image() for _ in range(batch_size)])
    return queries, positives


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bench_train(size: str = "2b", *, batch_size: int = 32, steps: int = 10, warmup: int = 3, image_size: int = 224,
                text_words: int = 32, device: str | None = None, seed: int = 0) -> TrainThroughput:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes, vocab = SIZES[size]
    on_gpu = device.type == "cuda"
    config = ModelConfig(dtype="bfloat16" if on_gpu else "float32", lora_r=64, lora_alpha=128,
                         gradient_checkpointing=on_gpu, max_pixels=image_size * image_size)
    embedder = ElvaEmbedder.random(sizes, seed=seed, config=config, vocab_size=vocab).to(device)
    queries, positives = _batches(embedder, batch_size, image_size, text_words, seed)
    optimizer = torch.optim.AdamW(embedder.trainable_parameters(), lr=1e-4)
    hf = embedder._hf_model()
    vision_params = _params(hf.model.visual)
    llm_params = _params(hf.model.language_model)
    tokens = queries["input_ids"].numel() + positives["input_ids"].numel()
    patches = sum(int(b["image_grid_thw"].prod(1).sum()) for b in (queries, positives) if "image_grid_thw" in b)
    flops = 2 * vision_params * patches + 4 * llm_params * tokens

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            loss = elva_kernels.infonce_loss(embedder.forward_embeddings(queries),
                                             embedder.forward_embeddings(positives))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if on_gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if on_gpu:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    peak = next((value for key, value in PEAK_BF16.items() if key in name), None)
    return TrainThroughput(
        size=size, device=name, batch_size=batch_size, step_ms=seconds * 1e3, tokens_per_s=tokens / seconds,
        peak_memory_mib=torch.cuda.max_memory_allocated(device) / 2**20 if on_gpu else None,
        mfu=flops / seconds / peak if peak else None,
    )


@dataclass(frozen=True)
class RlThroughput:
    size: str
    device: str
    queries: int
    group_size: int
    candidates: int
    max_new_tokens: int
    step_ms: float
    rollout_ms: float
    rollouts_per_s: float
    peak_memory_mib: float | None


def bench_rl(size: str = "2b", *, queries: int = 8, group_size: int = 8, candidates: int = 101,
             max_new_tokens: int = 32, rollout_candidates: str = "query", steps: int = 5, warmup: int = 1,
             image_size: int = 224, text_words: int = 32, device: str | None = None, seed: int = 0) -> RlThroughput:
    """Stage-3 GRPO steps of a randomly initialised Qwen2-VL: ``queries`` (image, instructed text) queries with
    ``candidates`` image candidates each, ``group_size`` sampled rollouts per query of up to ``max_new_tokens``
    summary tokens, ELVA rewards, the reference pass and one clipped-ratio update. Reports the median step time, the
    median rollout time (generation, candidate encoding, rewards, reference log-probs) and rollouts per second."""
    from elva.config import RlConfig
    from elva.train.grpo import RlExample, collect_rollouts, policy_loss

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes, vocab = SIZES[size]
    on_gpu = device.type == "cuda"
    config = ModelConfig(dtype="bfloat16" if on_gpu else "float32", lora_r=64, lora_alpha=128,
                         gradient_checkpointing=on_gpu, max_pixels=image_size * image_size)
    embedder = ElvaEmbedder.random(sizes, seed=seed, config=config, vocab_size=vocab).to(device)
    rng = np.random.default_rng(seed)
    from PIL import Image

    def image():
        return Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8))

    words = "a large red circle at the left on a grey background".split()
    text = " ".join(words[i % len(words)] for i in range(text_words))
    examples = [RlExample(str(q), (image(), text), "Retrieve the image that matches.",
                          [image() for _ in range(candidates)]) for q in range(queries)]
    rl = RlConfig(group_size=group_size, max_new_tokens=max_new_tokens, rollout_candidates=rollout_candidates)
    optimizer = torch.optim.AdamW(embedder.trainable_parameters(), lr=1e-6)
    torch.manual_seed(seed)

    def sync():
        if on_gpu:
            torch.cuda.synchronize(device)

    def step() -> tuple[float, float]:
        start = time.perf_counter()
        rollouts = collect_rollouts(embedder, examples, rl)
        sync()
        rolled = time.perf_counter()
        loss, _ = policy_loss(embedder, rollouts, rl)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start, rolled - start

    for _ in range(warmup):
        step()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    totals, rollout_times = zip(*(step() for _ in range(steps)))
    seconds = statistics.median(totals)
    return RlThroughput(
        size=size, device=torch.cuda.get_device_name(device) if on_gpu else "cpu", queries=queries,
        group_size=group_size, candidates=candidates, max_new_tokens=max_new_tokens, step_ms=seconds * 1e3,
        rollout_ms=statistics.median(rollout_times) * 1e3, rollouts_per_s=queries * group_size / seconds,
        peak_memory_mib=torch.cuda.max_memory_allocated(device) / 2**20 if on_gpu else None,
    )

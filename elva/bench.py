"""``elva bench train``: stage-2 training throughput of a randomly initialised Qwen2-VL (no download).

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

#!/usr/bin/env python
"""Time each elva_kernels op side by side with the torch way and its peers, in one process.

    python benchmarks/compare.py --op similarity_topk --device cpu --preset cpu
    python benchmarks/compare.py --all --device cuda --preset gpu --out "$OUT"
    python benchmarks/compare.py --all --device cpu --preset smoke        # seconds; for CI

Every provider of a case runs in this process on the same inputs: each backend of the op (one
that refuses the call becomes a row carrying its reasons, not a crash), the torch way, and peers
such as faiss-cpu. The ratio column divides by the case's baseline, measured in the same run: the
bare ``q @ c.T`` where SPEC's target is relative to it (A1, A2), otherwise the torch way.

Presets: "smoke" (seconds, any device), "cpu" (SPEC's CPU workloads, or CPU-sized ones) and "gpu"
(SPEC's headline GPU workloads). Inputs are random unit rows, so the ops' default cosine metric
and the anchors' plain products give the same scores.

Timing: one warm-up call, one call for memory (which also sizes the repeats), then repeats for
about --seconds (3 to 100 of them); CUDA events on GPU, time.perf_counter on CPU. Rows report
the median and p20/p80. On CUDA a 256 MiB buffer is zeroed before each repeat, outside its events,
so no repeat finds the last one's operands in L2 (as triton.testing.do_bench does).

The retrieval cases on CUDA add two controls beside the cuBLAS ``q @ c.T``: "triton matmul (same
tiles)", the threshold pass's own main loop storing its scores (benchmarks/triton_matmul.py), so a
reader can tell the main loop's efficiency from the epilogue's cost.
Peak extra memory: on CUDA, max_memory_allocated during the call minus memory_allocated before it
(outputs included); on CPU, the growth of the peak resident set (VmHWM after resetting it through
/proc/self/clear_refs), which also sees faiss's native allocations.

Outputs go to benchmarks/results/<device-slug>/, or --out: compare.csv (appended, one row per
provider, written as soon as measured), <op>-<preset>.md and <op>-<preset>.png (when matplotlib
imports). The Markdown tables are also printed.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import importlib
import math
import os
import pkgutil
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
# Benchmark the checkout this script belongs to, installed or not.
sys.path.insert(0, str(REPO))

from elva_kernels import _dispatch  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ROUNDS_MIN, ROUNDS_MAX = 3, 100
L2_FLUSH_BYTES = 256 * 2**20  # above any GPU's L2 (H100: 50 MB, H200: 60 MB)
CSV_COLUMNS = [
    "utc", "op", "preset", "shape", "provider", "dtype", "median_ms", "p20_ms", "p80_ms", "reps",
    "peak_extra_MiB", "memory_method", "ratio", "baseline", "note", "device", "torch", "triton", "git_sha",
]  # fmt: skip

# Each preset is a list of cases; every case gives one row per provider.
_A1_CPU = dict(B=256, N=200_000, d=768, dtype="fp32")
_A1_GPU = dict(B=1024, N=1_000_000, d=1536, dtype="bf16")
_A1_SMOKE = dict(B=64, N=20_000, d=128, dtype="fp32")
PRESETS: dict[str, dict[str, list[dict]]] = {
    "similarity_topk": {
        "smoke": [dict(_A1_SMOKE, k=10)],
        "cpu": [dict(_A1_CPU, k=100)],
        "gpu": [dict(_A1_GPU, B=b, k=k) for b in (1024, 4096) for k in (10, 100, 1000)],
    },
    "rank_statistics": {"smoke": [_A1_SMOKE], "cpu": [_A1_CPU], "gpu": [_A1_GPU]},
    "elva_rewards": {
        "smoke": [dict(B=8, G=4, C=11, d=64, dtype="fp32")],
        "cpu": [dict(B=64, G=8, C=101, d=1536, dtype="fp32")],
        "gpu": [dict(B=b, G=8, C=101, d=1536, dtype="bf16") for b in (64, 512)],
    },
    "infonce_loss": {
        "smoke": [dict(B=512, d=128, dtype="fp32")],
        "cpu": [dict(B=4096, d=768, dtype="fp32")],
        "gpu": [dict(B=b, d=1536, dtype="bf16") for b in (16384, 65536)],
    },
    "mine_hard_negatives": {
        "smoke": [dict(_A1_SMOKE, n_hard=10, n_random=10)],
        "cpu": [dict(_A1_CPU, n_hard=50, n_random=50)],
        "gpu": [dict(_A1_GPU, n_hard=50, n_random=50)],
    },
    "l2_normalize": {
        "smoke": [dict(n=20_000, d=128, dtype="fp32")],
        "cpu": [dict(n=200_000, d=768, dtype="fp32")],
        "gpu": [dict(n=1_000_000, d=1536, dtype="bf16")],
    },
}


@dataclass
class Provider:
    """One way to compute a case: ``fn`` runs it once; when it cannot run, ``fn`` is None and ``reason`` says why."""

    name: str
    fn: Callable[[], object] | None
    reason: str = ""


@dataclass
class Case:
    op: str
    shape: str
    dtype: str
    baseline: str  # the provider that the ratio column divides by
    providers: list[Provider]


def unit_rows(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    """Random rows of unit L2 norm (normalised in fp32, then cast), reproducible per seed."""
    x = torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device)
    return x.div_(torch.linalg.vector_norm(x, dim=-1, keepdim=True)).to(dtype)


def backend_providers(op: str, call: _dispatch.Call, bind: Callable[[Callable, str], Callable]) -> list[Provider]:
    """One provider per registered backend of ``op``: ``bind(public_fn, name)`` when it accepts ``call``."""
    try:
        public = getattr(importlib.import_module(f"elva_kernels.ops.{op}"), op)
    except (ImportError, AttributeError) as error:
        return [Provider(f"elva:{op}", None, f"not importable yet ({error})")]
    providers = []
    for backend in _dispatch.backends(op):
        reasons = backend.refusal_reasons(call)
        if backend.name == "torch" and call.device.type == "cuda" and not reasons:
            reasons = ["the float64 reference is the correctness oracle, not a GPU contender (seconds per call)"]
        fn = None if reasons else bind(public, backend.name)
        providers.append(Provider(f"elva:{backend.name}", fn, "; ".join(reasons)))
    return providers


def matmul_controls(q: torch.Tensor, c: torch.Tensor) -> list[Provider]:
    """cuBLAS ``q @ c.T`` and, on CUDA with Triton, the same product by the fused kernels' main loop."""
    providers = [Provider("q@c.T", lambda: q @ c.T)]
    if q.is_cuda:
        try:
            from triton_matmul import plain_matmul
        except ImportError as error:
            providers.append(Provider("triton matmul (same tiles)", None, f"triton is not importable ({error})"))
        else:
            providers.append(Provider("triton matmul (same tiles)", lambda: plain_matmul(q, c)))
    return providers


def setup_similarity_topk(case: dict, device: str) -> Case:
    B, N, d, k, dtype = case["B"], case["N"], case["d"], case["k"], DTYPES[case["dtype"]]
    q, c = unit_rows((B, d), dtype, device, 0), unit_rows((N, d), dtype, device, 1)
    call = _dispatch.Call(torch.device(device), dtype, {"queries": (B, d), "candidates": (N, d)}, k=k)
    providers = backend_providers("similarity_topk", call, lambda f, name: lambda: f(q, c, k, backend=name))
    providers += [
        Provider("torch.topk(q@c.T)", lambda: torch.topk(q @ c.T, k)),
        *matmul_controls(q, c),
    ]
    if device == "cpu":
        providers.append(_faiss_flat_ip(q, c, k))
    return Case("similarity_topk", f"B={B} N={N} d={d} k={k}", case["dtype"], "q@c.T", providers)


def _faiss_flat_ip(q: torch.Tensor, c: torch.Tensor, k: int) -> Provider:
    """faiss-cpu exact inner-product search; building the index (a copy of c) is setup, not timed."""
    name = "faiss IndexFlatIP"
    try:
        import faiss
    except ImportError as error:
        return Provider(name, None, f"faiss is not importable ({error})")
    if q.dtype != torch.float32:
        return Provider(name, None, f"faiss-cpu takes fp32 only; got {q.dtype}")
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c.numpy())
    queries = q.numpy()
    return Provider(name, lambda: index.search(queries, k))


def setup_rank_statistics(case: dict, device: str) -> Case:
    B, N, d, dtype = case["B"], case["N"], case["d"], DTYPES[case["dtype"]]
    q, c = unit_rows((B, d), dtype, device, 0), unit_rows((N, d), dtype, device, 1)
    positives = torch.randint(N, (B,), generator=torch.Generator(device).manual_seed(2), device=device)
    call = _dispatch.Call(torch.device(device), dtype, {"queries": (B, d), "candidates": (N, d)})
    providers = backend_providers("rank_statistics", call, lambda f, name: lambda: f(q, c, positives, backend=name))

    def torch_rank():
        s = q @ c.T
        return (s > s.gather(1, positives[:, None])).sum(1)

    providers += [Provider("torch (s > s[pos]).sum(1)", torch_rank), *matmul_controls(q, c)]
    return Case("rank_statistics", f"B={B} N={N} d={d}", case["dtype"], "q@c.T", providers)


def setup_elva_rewards(case: dict, device: str) -> Case:
    B, G, C, d, dtype = case["B"], case["G"], case["C"], case["d"], DTYPES[case["dtype"]]
    q, c = unit_rows((B, G, d), dtype, device, 0), unit_rows((B, G, C, d), dtype, device, 1)
    shapes = {"query_emb": (B, G, d), "cand_emb": (B, G, C, d)}
    call = _dispatch.Call(torch.device(device), dtype, shapes, sizes={"G": G, "C": C})
    providers = backend_providers("elva_rewards", call, lambda f, name: lambda: f(q, c, backend=name))

    def torch_way(delta=0.05, gamma=0.01, alpha=0.4, eps=0.6, adv_eps=1e-4):
        """SPEC A3 in plain torch, positive at index 0: einsum, a double argsort, the formula, group advantages."""
        s = torch.einsum("bgd,bgcd->bgc", F.normalize(q, dim=-1), F.normalize(c, dim=-1)).float()
        order = torch.argsort(s, dim=-1, descending=True, stable=True)
        log_rank = (torch.argsort(order, dim=-1) + 1).float().log()
        positive, negatives = s[..., 0], s[..., 1:]
        margin = (positive - negatives.amax(-1) - delta).clamp_min(0)
        rank_reward = positive / (1 + log_rank[..., 0]) - gamma * (negatives * (log_rank[..., 1:] - 1)).sum(-1)
        total = alpha * margin + eps * rank_reward
        return (total - total.mean(1, keepdim=True)) / (total.std(1, keepdim=True) + adv_eps)

    providers += [
        Provider("torch way (einsum+argsort)", torch_way),
        # What any kernel must pay: reading cand_emb once.
        Provider("floor: read cand_emb once", lambda: c.amax()),
    ]
    return Case("elva_rewards", f"B={B} G={G} C={C} d={d}", case["dtype"], "torch way (einsum+argsort)", providers)


def setup_infonce_loss(case: dict, device: str) -> Case:
    """Forward + backward; the first B candidates are the positives (labels = arange(B))."""
    B, d, dtype, temperature = case["B"], case["d"], DTYPES[case["dtype"]], 0.05
    q = unit_rows((B, d), dtype, device, 0).requires_grad_()
    c = unit_rows((B, d), dtype, device, 1).requires_grad_()
    labels = torch.arange(B, device=device)

    def fwd_bwd(loss_fn):
        def run():
            q.grad = c.grad = None  # a fresh gradient each call, as in a training step
            loss_fn().backward()

        return run

    def torch_way(mm_dtype):
        def loss():
            qn, cn = F.normalize(q.to(mm_dtype), dim=1), F.normalize(c.to(mm_dtype), dim=1)
            return F.cross_entropy((qn @ cn.T).float() / temperature, labels)

        return loss

    call = _dispatch.Call(torch.device(device), dtype, {"queries": (B, d), "candidates": (B, d)})
    providers = backend_providers(
        "infonce_loss", call, lambda f, name: fwd_bwd(lambda: f(q, c, temperature=temperature, backend=name))
    )
    baseline = f"torch {case['dtype']} mm + CE"
    providers.append(Provider(baseline, fwd_bwd(torch_way(dtype))))
    if dtype != torch.float32:
        providers.append(Provider("torch fp32 mm + CE", fwd_bwd(torch_way(torch.float32))))
    providers.append(Provider("floor: 8 B N d at the GEMM rate", gemm_floor(q.detach(), c.detach())))
    return Case("infonce_loss", f"B=N={B} d={d} fwd+bwd", case["dtype"], baseline, providers)


def gemm_floor(q: torch.Tensor, c: torch.Tensor, chunk_bytes: int = 2**30) -> Callable:
    """The memory-linear InfoNCE's work floor as plain GEMMs of its shapes: per chunk of query rows, the scores
    (forward), their recomputation, dQ = dS C and dC += dS^T Q, i.e. 4 x 2 B N d flops, with one chunk of [rows, N]
    products (about ``chunk_bytes``) instead of a B x N matrix."""
    rows = max(1, chunk_bytes // (c.shape[0] * c.element_size()))
    grad_c = torch.empty_like(c)

    def run():
        grad_c.zero_()
        for first in range(0, q.shape[0], rows):
            part = q[first:first + rows]
            torch.mm(part, c.T)
            scores = torch.mm(part, c.T)  # stands in for dS, of the same shape and dtype
            torch.mm(scores, c)
            grad_c.addmm_(scores.T, part)

    return run


def setup_mine_hard_negatives(case: dict, device: str) -> Case:
    B, N, d, dtype = case["B"], case["N"], case["d"], DTYPES[case["dtype"]]
    n_hard, n_random = case["n_hard"], case["n_random"]
    q, c = unit_rows((B, d), dtype, device, 0), unit_rows((N, d), dtype, device, 1)
    generator = torch.Generator(device).manual_seed(2)
    positives = torch.randint(N, (B, 1), generator=generator, device=device)
    call = _dispatch.Call(torch.device(device), dtype, {"query_emb": (B, d), "pool_emb": (N, d)})
    providers = backend_providers(
        "mine_hard_negatives",
        call,
        lambda f, name: lambda: f(q, c, positives, n_hard=n_hard, n_random=n_random, backend=name),
    )

    def torch_way():
        """Top n_hard of the masked score matrix, then n_random of the rest by random keys."""
        s = (q @ c.T).scatter_(1, positives, float("-inf"))
        hard = s.topk(n_hard, dim=1).indices
        keys = torch.rand(s.shape, generator=generator, device=device).scatter_(1, torch.cat([positives, hard], 1), -1)
        return torch.cat([hard, keys.topk(n_random, dim=1).indices], 1)

    providers.append(Provider("torch topk(q@c.T) + random keys", torch_way))
    shape = f"B={B} N={N} d={d} hard={n_hard} random={n_random}"
    return Case("mine_hard_negatives", shape, case["dtype"], "torch topk(q@c.T) + random keys", providers)


def setup_l2_normalize(case: dict, device: str) -> Case:
    n, d, dtype = case["n"], case["d"], DTYPES[case["dtype"]]
    x = torch.randn((n, d), generator=torch.Generator(device).manual_seed(0), device=device).to(dtype)
    call = _dispatch.Call(torch.device(device), dtype, {"x": (n, d)})
    providers = backend_providers("l2_normalize", call, lambda f, name: lambda: f(x, backend=name))
    providers.append(Provider("F.normalize(x.float())", lambda: F.normalize(x.float(), dim=1)))
    return Case("l2_normalize", f"n={n} d={d}", case["dtype"], "F.normalize(x.float())", providers)


SETUPS: dict[str, Callable[[dict, str], Case]] = {
    "similarity_topk": setup_similarity_topk,
    "rank_statistics": setup_rank_statistics,
    "elva_rewards": setup_elva_rewards,
    "infonce_loss": setup_infonce_loss,
    "mine_hard_negatives": setup_mine_hard_negatives,
    "l2_normalize": setup_l2_normalize,
}


def provider_table(op: str, preset: str = "smoke", device: str = "cpu") -> list[tuple[str, Provider]]:
    """(id, provider) for every case of a preset: what the pytest-benchmark files parametrise over."""
    table = []
    for sizes in PRESETS[op][preset]:
        case = SETUPS[op](sizes, device)
        table += [(re.sub(r"\s+", "_", f"{p.name}-{case.dtype}-{case.shape}"), p) for p in case.providers]
    return table


def registered_ops() -> list[str]:
    """Import every module of elva_kernels.ops (each registers its backends) and list the ops."""
    import elva_kernels.ops

    for module in pkgutil.iter_modules(elva_kernels.ops.__path__):
        try:
            importlib.import_module(f"elva_kernels.ops.{module.name}")
        except ImportError as error:
            print(f"note: elva_kernels.ops.{module.name} does not import ({error})")
    return _dispatch.ops()


# ---------------------------------------------------------------- measurement


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {field}")


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> tuple[float | None, float]:
    """(peak extra MiB during one call, or None where it cannot be measured; the call's seconds)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        del out
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, seconds
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        before = _proc_status_mib("VmRSS")
    except OSError:
        before = None
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    # Memory the process already holds (glibc keeps freed blocks under 32 MiB) is reused without
    # growing the resident set, so small figures read as about 0; a trimmed heap can even shrink it.
    peak = None if before is None else max(0.0, _proc_status_mib("VmHWM") - before)
    del out
    return peak, seconds


def time_calls(fn: Callable[[], object], device: torch.device, estimate_s: float, seconds: float) -> list[float]:
    """Milliseconds of enough repeats to fill about ``seconds`` (ROUNDS_MIN to ROUNDS_MAX of them)."""
    reps = min(ROUNDS_MAX, max(ROUNDS_MIN, int(seconds / max(estimate_s, 1e-6))))
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def measure(provider: Provider, device: torch.device, seconds: float) -> dict:
    """The timing fields of one row; a provider that fails gets its error as the note."""
    if provider.fn is None:
        return {"note": f"refused: {provider.reason}"}
    if device.type == "cuda":
        torch.cuda.empty_cache()  # one provider's cached blocks must not push the next one out of memory
    try:
        provider.fn()  # warm-up: compilation, autotuning, lazy initialisation
        peak, estimate_s = peak_extra_mib(provider.fn, device)
        samples = time_calls(provider.fn, device, estimate_s, seconds)
    except Exception as error:  # an out-of-memory or a backend bug is a row, not the end of the run
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"note": f"error: {type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"}
    quantiles = torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)
    median, p20, p80 = torch.tensor(samples, dtype=torch.float64).quantile(quantiles).tolist()
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80, "reps": len(samples), "peak_extra_MiB": peak}


# ---------------------------------------------------------------- environment and outputs


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    model = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {
        "device": model if device.type == "cuda" else f"{model} ({torch.get_num_threads()} threads)",
        "slug": re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-"),
        "torch": torch.__version__,
        "triton": triton_version,
        "git_sha": git_sha(),
        "memory_method": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS growth (VmHWM)",
        # The CPU machine is shared: a busy neighbour slows every row, so the header records it.
        "load": f"{os.getloadavg()[0]:.2f}",
    }


def git_sha() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def fmt(x: float | None) -> str:
    """Three significant digits, never in exponent form."""
    if x is None or x == "":
        return ""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}"


def append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({key: "" if row.get(key) is None else row.get(key, "") for key in CSV_COLUMNS})


def markdown(rows: list[dict], env: dict, op: str, preset: str, command: str) -> str:
    memory = "peak extra MiB (CUDA allocator)" if "cuda" in env["memory_method"] else "peak RSS growth MiB"
    lines = [
        f"### {op}, preset `{preset}`: {env['device']}",
        "",
        (
            f"{rows[0]['utc'] if rows else ''} UTC; torch {env['torch']}, triton {env['triton']}, "
            f"git {env['git_sha']}; 1-min load average {env['load']}; `{command}`. "
            "Ratio = median / the baseline's median in this run (baseline marked *)."
        ),
        "",
        f"| shape | provider | dtype | median ms | p20-p80 ms | x baseline | {memory} | note |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        spread = f"{fmt(r['p20_ms'])}-{fmt(r['p80_ms'])}" if r.get("median_ms") is not None else ""
        star = " *" if r["provider"] == r["baseline"] else ""
        lines.append(
            f"| {r['shape']} | {r['provider']}{star} | {r['dtype']} | {fmt(r.get('median_ms'))} | {spread} "
            f"| {fmt(r.get('ratio'))} | {fmt(r.get('peak_extra_MiB'))} | {r.get('note', '')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Horizontal bars of the medians with p20-p80 whiskers; skipped when matplotlib is missing."""
    timed = [r for r in rows if r.get("median_ms") is not None]
    if not timed:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not importable, so {path.name} was not drawn")
        return
    medians = [r["median_ms"] for r in timed]
    whiskers = [[r["median_ms"] - r["p20_ms"] for r in timed], [r["p80_ms"] - r["median_ms"] for r in timed]]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.4 * len(timed)))
    colors = ["tab:orange" if r["provider"] == r["baseline"] else "tab:blue" for r in timed]
    ax.barh(range(len(timed)), medians, xerr=whiskers, color=colors)
    ax.set_yticks(range(len(timed)), [f"{r['shape']} | {r['provider']}" for r in timed], fontsize=8)
    ax.invert_yaxis()
    if max(medians) > 50 * min(medians):
        ax.set_xscale("log")
    ax.set_xlabel("ms (median, whiskers p20-p80; orange = baseline)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_case(op: str, preset: str, sizes: dict, device: torch.device, seconds: float, out: Path, env: dict):
    """Rows of one case, each appended to the CSV as soon as it is measured."""
    case = SETUPS[op](sizes, device.type)
    # The baseline first, so every later row has its ratio when written; the torch reference,
    # usually the slowest provider, last, so that a step timeout costs only its own row.
    order = sorted(case.providers, key=lambda p: (p.name != case.baseline, p.name == "elva:torch"))
    rows, baseline_ms = [], None
    for provider in order:
        row = {"utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
               "op": op, "preset": preset, "shape": case.shape, "provider": provider.name, "dtype": case.dtype,
               "baseline": case.baseline, **env}  # fmt: skip
        row.update(measure(provider, device, seconds))
        if provider.name == case.baseline:
            baseline_ms = row.get("median_ms")
        if baseline_ms and row.get("median_ms") is not None:
            row["ratio"] = row["median_ms"] / baseline_ms
        append_csv(out / "compare.csv", row)
        rows.append(row)
        print(f"  {case.shape:<36} {provider.name:<32} {fmt(row.get('median_ms')) or '-':>9} ms  {row.get('note', '')}",
              flush=True)  # fmt: skip
    return rows


def run_op(op: str, preset: str, device: torch.device, seconds: float, out: Path, env: dict, command: str) -> str:
    """Measure every case of ``op``'s preset; write the Markdown table and the plot; return the table."""
    rows = []
    for sizes in PRESETS[op][preset]:
        rows += run_case(op, preset, sizes, device, seconds, out, env)
        gc.collect()  # the case's inputs go before the next case allocates its own
    table = markdown(rows, env, op, preset, command)
    (out / f"{op}-{preset}.md").write_text(table)
    plot(rows, out / f"{op}-{preset}.png", f"{op} ({preset}) on {env['device']}")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="\n\n".join(__doc__.split("\n\n")[:2]), formatter_class=argparse.RawTextHelpFormatter
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--op", choices=sorted(SETUPS), help="one op")
    which.add_argument("--all", action="store_true", help="every op that has a benchmark setup")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", choices=("smoke", "cpu", "gpu"), help="default: gpu on cuda, cpu on cpu")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<device-slug>/)")
    parser.add_argument("--seconds", type=float, default=1.0, help="time budget of the timed repeats per provider")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    device = torch.device(args.device)
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    env = environment(device)
    out = args.out or REPO / "benchmarks" / "results" / env["slug"]
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    ops = sorted(SETUPS) if args.all else [args.op]
    if args.all:
        for op in sorted(set(registered_ops()) - set(SETUPS)):
            print(f"note: {op} is registered but has no benchmark setup")
    tables = []
    for op in ops:
        print(f"{op} ({preset}) on {env['device']}:", flush=True)
        tables.append(run_op(op, preset, device, args.seconds, out, env, command))
    print("\n" + "\n".join(tables))
    print(f"results in {out}")


if __name__ == "__main__":
    main()

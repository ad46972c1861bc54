"""Shared test machinery: run any backend against the reference over random cases."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from elva_kernels import _dispatch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Forward tolerances (atol, rtol) per input dtype for fp32 outputs. Half inputs are upcast
# exactly, so the only error is fp32 accumulation order: they share the fp32 row.
FORWARD_TOLERANCE = {torch.float32: (2e-6, 2e-6), torch.float16: (2e-6, 2e-6), torch.bfloat16: (2e-6, 2e-6)}


def backend_matrix(op: str, *, reference: bool = False) -> list:
    """Parametrisation values ``(backend, device)`` for every backend the registry lists for ``op`` and every
    device it runs on: the op's test matrix. CUDA pairs carry the ``gpu`` marker (skipped without a GPU); the
    ``torch`` reference joins only with ``reference=True`` (it is what the others are compared against)."""
    params = []
    for backend in _dispatch.backends(op):
        if backend.name == "torch" and not reference:
            continue
        for device in sorted(backend.devices, key=lambda d: d != "cpu"):
            marks = [pytest.mark.gpu] if device == "cuda" else []
            params.append(pytest.param(backend.name, device, id=f"{backend.name}-{device}", marks=marks))
    return params


def require_backend(op: str, name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> _dispatch.Backend:
    """The registered backend, which must be able to run here: a refusal fails the test (a missing build would
    otherwise hide as a skip). Only a CUDA device that is not there skips."""
    registered = {b.name: b for b in _dispatch.backends(op)}
    assert name in registered, f"{op} has no {name} backend in the registry"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    reasons = registered[name].refusal_reasons(_dispatch.Call(torch.device(device), dtype, {}))
    assert not reasons, f"{name} cannot run {op} on {device}/{dtype}: " + "; ".join(reasons)
    return registered[name]


def runs_as(backend: str, device: str) -> str:
    """What case sizes a (backend, device) pair can afford: "gpu", "interpreter" (Triton on CPU tensors, a few
    hundred times slower than compiled kernels; its cost grows with programs x loop steps) or "cpu"."""
    if device == "cuda":
        return "gpu"
    return "interpreter" if backend == "triton" else "cpu"


def on_device(case: dict, device: str) -> dict:
    """``case`` with every tensor moved to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def dtypes_of(op: str, name: str) -> tuple[torch.dtype, ...]:
    """The dtypes the registry says ``name`` serves for ``op``."""
    return next(b.dtypes for b in _dispatch.backends(op) if b.name == name)


class CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the torch ops run under it (each one a launch or less on a GPU)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def host_ops_per_pool(run: Callable, device: str, pools=(3000, 24000)) -> list[int]:
    """How many torch ops (CountOps) ``run(queries, candidates, positives)`` issues for each pool size: 4 queries,
    d = 16, one positive each (the first, a middle and the last candidate among them)."""
    counts = []
    for pool in pools:
        q, c = torch.randn(4, 16, device=device), torch.randn(pool, 16, device=device)
        positives = torch.tensor([[0], [5], [pool - 1], [pool // 2]], device=device)
        with CountOps() as ops:
            run(q, c, positives)
        counts.append(ops.count)
    return counts


def ragged_size(gen: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def random_rows(gen: torch.Generator, rows: int, dim: int, *, ties: bool) -> torch.Tensor:
    """Gaussian rows; with ``ties`` some rows are exact copies of others and one is all zeros."""
    x = torch.randn(rows, dim, generator=gen)
    if ties and rows > 2:
        copies = torch.randint(0, rows, (rows // 3,), generator=gen)
        x[torch.randint(0, rows, (rows // 3,), generator=gen)] = x[copies]
        x[rows // 2] = 0.0
    return x


def assert_close_verbose(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str) -> None:
    """allclose that reports the mismatch count and the first offending indices."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol, equal_nan=True)
    if bool(bad.any()):
        where = bad.nonzero()[:5].tolist()
        sample = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in where]
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} mismatches (atol {atol}, rtol {rtol}); first {sample}")


def check_backend_against_reference(
    op: str,
    backend: str,
    make_case: Callable[[torch.Generator, torch.dtype], dict],
    run: Callable[[dict, str], object],
    compare: Callable[[object, object, dict, torch.dtype], None],
    *,
    device: str = "cpu",
    cases: int = 12,
    seed: int = 0,
) -> None:
    """For every dtype the backend supports, run ``cases`` random cases through ``backend`` and the
    ``torch`` reference and ``compare`` them. ``make_case`` builds CPU inputs (ragged, with ties)."""
    checked = 0
    for dtype in dtypes_of(op, backend):
        require_backend(op, backend, device, dtype)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(cases):
            case = on_device(make_case(gen, dtype), device)
            compare(run(case, backend), run(case, "torch"), case, dtype)
            checked += 1
    assert checked > 0, f"no case of {op} ran on {backend}"


def _gloo_entry(rank, world_size, port, worker, args):
    import torch.distributed as dist

    torch.set_num_threads(1)  # the ranks share the cores; test tensors are small
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn_gloo(worker: Callable, *args, world_size: int = 2) -> None:
    """Run ``worker(rank, *args)`` in ``world_size`` processes joined by a gloo group on loopback."""
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_entry, args=(world_size, port, worker, args), nprocs=world_size, join=True)


def free_port() -> int:
    """A free TCP port on loopback (for a torchrun master)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_until_killed(module: str, config_file, run_dir, cwd, timeout: float = 120.0) -> int:
    """Run ``python -m <module> <config_file>``, SIGKILL it as soon as ``run_dir`` holds a checkpoint, and return the
    step of that checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    from elva.train import checkpoint

    proc = subprocess.Popen([sys.executable, "-m", module, str(config_file)], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while checkpoint.latest(run_dir) is None:
            assert proc.poll() is None, "the training subprocess ended before writing a checkpoint"
            assert time.monotonic() < deadline, f"no checkpoint after {timeout:.0f} s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    return int(checkpoint.latest(run_dir).name.split("_")[1])

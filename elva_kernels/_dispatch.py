"""Backend registry: which backend serves a call, and why the others cannot.

Capabilities are data (xformers' fmha pattern). Each op lists its backends in
priority order; ``auto`` takes the first whose ``refusal_reasons`` is empty, and an
explicit backend that cannot serve the call raises ``ValueError`` with the inputs and
every reason. ``elva_kernels.info()`` prints the same reasons for this machine.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from elva_kernels import _library, _native

BACKEND_CHOICES = ("auto",) + _library.BACKENDS


@dataclass(frozen=True)
class Call:
    """What a backend needs to know about one call: no tensor data, only metadata."""

    device: torch.device
    dtype: torch.dtype
    shapes: dict[str, tuple[int, ...]]
    k: int | None = None
    # Op-specific sizes a backend may limit (for example "group size" for elva_rewards).
    sizes: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        lines = [f"  {name:<16} {shape}" for name, shape in self.shapes.items()]
        extra = ", ".join(f"{k}={v}" for k, v in (({"k": self.k} if self.k else {}) | self.sizes).items())
        return "\n".join(lines + [f"  device={self.device}, dtype={self.dtype}" + (f", {extra}" if extra else "")])


def triton_unavailable(device_type: str) -> list[str]:
    """Why Triton cannot run on this device type (empty when it can)."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return [f"triton is not importable ({error})"]
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ["triton runs on CPU tensors only under TRITON_INTERPRET=1 (the interpreter, for tests)"]
        return []
    if device_type == "cuda" and torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        return [] if major >= 8 else [f"triton kernels need compute capability >= 8.0; this GPU has {major}.x"]
    return [f"triton does not run on device type {device_type!r}"]


@dataclass(frozen=True)
class Backend:
    """One concrete implementation of an op and what it supports."""

    name: str
    op: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    max_k: int | None = None
    # Extra, op-specific limits: returns reasons for a call (empty = fine).
    limits: Callable[[Call], list[str]] | None = None

    @property
    def qualname(self) -> str:
        return _library.qualname(self.op, self.name)

    @property
    def handle(self):
        return _library.handle(self.op, self.name)

    def availability_reasons(self, device_type: str) -> list[str]:
        """Why this backend cannot run on ``device_type`` at all, whatever the inputs."""
        if device_type not in self.devices:
            return [f"device type {device_type!r} not supported (supported: {', '.join(self.devices)})"]
        if self.name == "triton":
            return triton_unavailable(device_type)
        if self.name in ("cpu", "cuda"):
            if _native.LOAD_ERROR is not None:
                return [_native.LOAD_ERROR]
            key = "CPU" if self.name == "cpu" else "CUDA"
            if not _native.has_kernel(self.qualname, key):
                hint = " HINT: build on a machine with nvcc and a CUDA torch" if key == "CUDA" else ""
                return [f"the extension was built without {self.qualname} for {key}.{hint}"]
            if key == "CUDA" and not torch.cuda.is_available():
                return ["no CUDA device is available"]
        return []

    def refusal_reasons(self, call: Call) -> list[str]:
        reasons = self.availability_reasons(call.device.type)
        if call.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype={call.dtype} (supported: {names})")
        if self.max_k is not None and call.k is not None and call.k > self.max_k:
            reasons.append(f"k={call.k} is above this backend's limit of {self.max_k}")
        if self.limits is not None:
            reasons += self.limits(call)
        return reasons


_REGISTRY: dict[str, list[Backend]] = {}


def register(op: str, backends: list[Backend]) -> None:
    """Record ``op``'s backends, fastest first."""
    _REGISTRY[op] = backends


def backends(op: str) -> list[Backend]:
    return _REGISTRY[op]


def ops() -> list[str]:
    return list(_REGISTRY)


def select(op: str, requested: str, call: Call) -> Backend:
    """Resolve ``requested`` ("auto" or a backend name) for ``call``, or raise with the reasons."""
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}; got {requested!r}")
    candidates = _REGISTRY[op]
    if requested != "auto":
        by_name = {b.name: b for b in candidates}
        if requested not in by_name:
            raise ValueError(f"{op} has no {requested!r} backend yet (it has: {', '.join(by_name)})")
        reasons = by_name[requested].refusal_reasons(call)
        if reasons:
            raise ValueError(
                f"backend {requested!r} cannot run {op} with inputs:\n{call.describe()}\nbecause:\n"
                + "\n".join(f"  - {r}" for r in reasons)
            )
        return by_name[requested]
    refused = []
    for backend in candidates:
        reasons = backend.refusal_reasons(call)
        if backend.name == "triton" and call.device.type == "cpu":
            reasons.append("auto never picks the Triton interpreter (it is for tests)")
        if not reasons:
            return backend
        refused.append(f"  {backend.name}: " + "; ".join(reasons))
    raise ValueError(f"no backend can run {op} with inputs:\n{call.describe()}\n" + "\n".join(refused))

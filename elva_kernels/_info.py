"""``info()``: which backend serves each op on this machine, and why the others cannot."""
from __future__ import annotations

import platform

import torch

from elva_kernels import _dispatch, _library, _native


def _device_types() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def report() -> dict:
    """{op: {device_type: {backend: "auto" | "available" | reasons}}} for fp32 inputs."""
    table: dict = {}
    for op in _dispatch.ops():
        registered = {b.name: b for b in _dispatch.backends(op)}
        table[op] = {}
        for device_type in _device_types():
            call = _dispatch.Call(torch.device(device_type), torch.float32, {})
            try:
                chosen = _dispatch.select(op, "auto", call).name
            except ValueError:
                chosen = None
            row = {}
            for name in _library.BACKENDS:
                if name not in registered:
                    row[name] = [f"no {name} implementation of {op} yet"]
                    continue
                reasons = registered[name].refusal_reasons(call)
                if name == chosen:
                    row[name] = "auto"
                elif reasons:
                    row[name] = reasons
                elif name == "triton" and device_type == "cpu":
                    row[name] = "available (the interpreter, for tests; auto never picks it)"
                else:
                    row[name] = "available"
            table[op][device_type] = row
    return table


def info() -> dict:
    """Print versions, the native build and, per op and device, the backend ``auto`` picks and why the
    others are refused. Returns the same facts as a dict."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    facts = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "native": _native.build_info(),
        "ops": report(),
    }
    print(f"elva_kernels: python {facts['python']}, torch {facts['torch']}, triton {facts['triton']}")
    print(f"  CUDA device: {facts['cuda_device'] or 'none'}")
    native = facts["native"]
    print(f"  native extension: {'loaded ' + str({k: v for k, v in native.items() if k != 'loaded'}) if native['loaded'] else native['reason']}")
    for op, devices in facts["ops"].items():
        print(f"\n{op}")
        for device_type, row in devices.items():
            for name, status in row.items():
                if status == "auto":
                    text = "<- auto picks this"
                elif isinstance(status, str):
                    text = status
                else:
                    text = "refused: " + "; ".join(status)
                print(f"  {device_type:<5} {name:<7} {text}")
    return facts

"""Trainer checkpoints: one folder per step under ``<run_dir>/checkpoints/step_XXXXXXXX``, written atomically.

A checkpoint folder holds

- ``adapter.safetensors``: the trainable (LoRA) parameters by their module names;
- ``trainer.pt``: optimizer and scheduler state dicts, and the RNG states (python, numpy, torch CPU, CUDA if any);
- ``state.json``: step, data position, the resolved config, elva and torch versions.

It is written into ``.tmp-step_XXXXXXXX-<pid>`` and renamed with ``os.replace``, so a crash (even SIGKILL) leaves
either the whole folder or none; leftover temp folders are ignored and cleaned at the next save.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["save", "latest", "load", "list_checkpoints", "rng_state", "set_rng_state", "load_into_model"]

_NAME = re.compile(r"^step_(\d{8})$")
_DIR = "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / _DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save(run_dir: str | os.PathLike, step: int, model_lora_state: Mapping[str, torch.Tensor], optimizer, scheduler,
         *, data_position: Mapping[str, Any], config: Mapping[str, Any] | None = None, keep_last: int = 2,
         rng: Mapping[str, Any] | None = None) -> Path:
    """Write the checkpoint of ``step`` atomically and delete all but the newest ``keep_last``. Returns its folder."""
    from safetensors.torch import save_file

    root = Path(run_dir) / _DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in model_lora_state.items()},
              str(tmp / "adapter.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": dict(rng) if rng is not None else rng_state()}, tmp / "trainer.pt")
    import elva

    state = {"step": step, "data_position": dict(data_position), "config": dict(config or {}),
             "elva_version": getattr(elva, "__version__", "unknown"), "torch_version": torch.__version__}
    (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str) + "\n", encoding="utf-8")
    if final.exists():  # a rerun of the same step (resume after a crash right after this save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint folder: ``{"step", "data_position", "config", "adapter", "optimizer", "scheduler", "rng"}``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "state.json").is_file():
        raise ValueError(f"{path} is not a checkpoint folder (no state.json)")
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    # weights_only=False: the RNG states hold python/numpy objects; the file is one this trainer wrote.
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    state.update(adapter=load_file(str(path / "adapter.safetensors")), **trainer)
    return state


def load_into_model(named_params: Mapping[str, torch.nn.Parameter], adapter: Mapping[str, torch.Tensor],
                    where: str = "checkpoint") -> None:
    """Copy saved trainable weights into the model's; ValueError says which names or shapes differ."""
    missing = sorted(set(named_params) - set(adapter))
    extra = sorted(set(adapter) - set(named_params))
    shapes = [f"{k}: model {tuple(named_params[k].shape)} vs saved {tuple(adapter[k].shape)}"
              for k in named_params if k in adapter and named_params[k].shape != adapter[k].shape]
    if missing or extra or shapes:
        raise ValueError(f"{where} does not match the model's trainable parameters (check model.lora_r/"
                         f"lora_target_modules against the run's config.yaml): missing {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}, shape mismatches {shapes[:3]}")
    with torch.no_grad():
        for k, p in named_params.items():
            p.copy_(adapter[k])

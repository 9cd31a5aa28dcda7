"""Training checkpoints as both trainers write them, for exact resume.

A checkpoint directory holds checkpoint.safetensors (the model's tensors and the optimizer's
state as "opt.<param index>.<name>") and checkpoint.json (the step, the run's record, the
optimizer's `param_groups` and the config identity it must match). Used by engine.training.train
and engine.training.finetune_dense. Nothing is pickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from incstream.paths import checkpoints_dir


def checkpoint_dir(explicit: str | None, run_name: str) -> Path:
    """Where a run's checkpoints go: `explicit` (--checkpoint-dir), else
    <data home>/checkpoints/<run_name>."""
    return Path(explicit) if explicit else checkpoints_dir() / run_name


def config_identity(config: Any, not_shaping: tuple[str, ...]) -> dict:
    """The settings of a run config (a dataclass) a checkpoint must share to be resumed: all
    but `not_shaping` (paths, the device, how often to save)."""
    d = asdict(config)
    for key in not_shaping:
        d.pop(key)
    return d


def read_checkpoint(path: Path, identity: dict) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(meta, tensors) of the checkpoint in `path`, None if there is none; a checkpoint made
    with other settings (its "config" is not `identity`) is an error, never silently reused."""
    if not (path / "checkpoint.json").exists():
        return None
    meta = json.loads((path / "checkpoint.json").read_text())
    if meta["config"] != identity:
        raise ValueError(f"checkpoint {path} was made with other settings; delete it or pass "
                         "another --checkpoint-dir")
    return meta, load_file(str(path / "checkpoint.safetensors"))


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """({"opt.<pid>.<name>": tensor on CPU}, param_groups) of `opt`'s state_dict."""
    state = opt.state_dict()
    tensors = {f"opt.{pid}.{name}": torch.as_tensor(t).contiguous().cpu()
               for pid, st in state["state"].items() for name, t in st.items()}
    return tensors, state["param_groups"]


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      param_groups: list, device: torch.device) -> None:
    """Load what optimizer_tensors saved (other keys in `tensors` are ignored). Adam's "step"
    stays on the CPU, as torch keeps it when not capturable."""
    state: dict = {"state": {}, "param_groups": param_groups}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state["state"].setdefault(int(pid), {})[name] = v if name == "step" else v.to(device)
    opt.load_state_dict(state)

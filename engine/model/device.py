"""Which torch device the engine runs on: CUDA when present, CPU otherwise, overridable."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None` or "auto" picks CUDA when `torch.cuda.is_available()`, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)

"""Which torch device the engine runs on: CUDA when present, CPU otherwise, overridable."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None` or "auto" picks CUDA when `torch.cuda.is_available()`, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    """The device as a benchmark records it: "cuda:0 (NVIDIA H100 ...)", "cpu (AMD EPYC ...)":
    the same code runs 3x apart on two CPUs, so a figure without its processor means little."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{device} ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    import platform

    return f"{device} ({platform.processor() or platform.machine()})"

"""The one rule for choosing a device: `auto` is CUDA when present, else the CPU. A device
that is not there is a ConfigError (one line), found before any work starts."""

from __future__ import annotations

import torch

from .config import ConfigError


def resolve_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"params.yaml: device {name!r} is not a device; use auto, cpu, cuda "
                          f"or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"params.yaml: device {name!r} but CUDA is not available here; "
                              f"use 'auto' or 'cpu'")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"params.yaml: device {name!r} but this machine has {count} "
                              f"GPU{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
    return device


def check_processes(name: str, nproc: int) -> None:
    """One training process per GPU: on CUDA, no more processes than GPUs."""
    if nproc > 1 and resolve_device(name).type == "cuda":
        count = torch.cuda.device_count()
        if nproc > count:
            raise ConfigError(f"params.yaml: train.nproc is {nproc}, but this machine has "
                              f"{count} GPU{'s' if count != 1 else ''} (one process per GPU); "
                              f"set train.nproc to at most {count}")

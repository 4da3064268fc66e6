"""The one rule for choosing a device: `auto` is CUDA when present, else the CPU."""

from __future__ import annotations

import torch

from .config import ConfigError


def resolve_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"params.yaml: device {name!r} but CUDA is not available here; "
                          f"use 'auto' or 'cpu'")
    return torch.device(name)

"""Checkpoints as plain data: state dicts, counters, RNG states and the config.

Written atomically (a crash mid-write leaves the previous file intact) and
loaded with `weights_only=True`, so loading never runs pickled code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import atomic


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be read."""


def save(path: str | Path, payload: dict[str, Any]) -> None:
    atomic.write_with(path, lambda tmp: torch.save(payload, tmp))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # truncated, not a checkpoint, or made by pickling code
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err}); "
                         f"delete it to start over") from None


def differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable list of keys whose values differ between two nested dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, prefix=f"{name}.")
        elif a != b:
            out.append(f"{name}: checkpoint has {a!r}, params say {b!r}")
    return out

"""uint8 images on disk, [-1, 1] floats in the model: the one pair of conversions.

torch only, so the model runs wherever torch does."""

from __future__ import annotations

import torch


def to_model(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float().div(127.5).sub(1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped, rounded)."""
    return x.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)

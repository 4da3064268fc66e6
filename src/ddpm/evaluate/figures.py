"""The PNG and GIF writers for sample grids and diffusion strips (uint8 images)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .. import atomic


MIN_TILE = 64  # pixels: smaller images are shown enlarged, nearest neighbour, in figures


def grid(images: torch.Tensor, ncol: int, pad: int = 2, min_tile: int = MIN_TILE) -> np.ndarray:
    """uint8 N x 3 x H x W -> one H' x W' x 3 array, row-major, white gutters. Images smaller
    than `min_tile` are enlarged by a whole factor (nearest neighbour: every pixel a block),
    so a 32 x 32 sample is 64 px on screen."""
    images = images.detach().cpu()
    n, c, h, w = images.shape
    scale = max(1, -(-min_tile // min(h, w)))
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        h, w = h * scale, w * scale
    nrow = -(-n // ncol)
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y:y + h, x:x + w] = img
    return canvas


def save_png(array: np.ndarray, path: str | Path) -> None:
    image = Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array)
    atomic.write_with(path, lambda tmp: image.save(tmp, format="PNG"))


def save_grid(images: torch.Tensor, path: str | Path, ncol: int | None = None) -> None:
    ncol = ncol or max(1, int(np.ceil(np.sqrt(len(images)))))
    save_png(grid(images, ncol), path)


def save_strip(frames: Sequence[torch.Tensor], path: str | Path) -> None:
    """frames: F tensors of uint8 B x 3 x H x W -> B rows of F frames, left to right."""
    stacked = torch.stack(list(frames), dim=1)  # B x F x 3 x H x W
    save_grid(stacked.flatten(0, 1), path, ncol=len(frames))


def save_gif(frames: Sequence[torch.Tensor], path: str | Path,
             duration_ms: int = 60, hold_last_ms: int = 1500) -> None:
    """An animation of uint8 B x 3 x H x W frames, each frame a grid of the B images."""
    pictures = [Image.fromarray(grid(frame, ncol=max(1, int(np.ceil(np.sqrt(len(frame)))))))
                for frame in frames]
    durations = [duration_ms] * (len(pictures) - 1) + [hold_last_ms]
    atomic.write_with(path, lambda tmp: pictures[0].save(
        tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=durations, loop=0))

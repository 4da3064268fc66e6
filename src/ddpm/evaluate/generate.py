"""Sampling from a trained model: batches of samples, and the figures of the generate stage.

Every image has its own seed (generate.seed, its index), so a sample does not
change with the batch size or the number of devices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..config import GenerateConfig
from ..model.diffusion import Schedule
from .figures import save_gif, save_grid, save_strip
from ..model.pixels import to_model, to_uint8
from ..model.samplers import (ImageNoise, forward_frames, get_sampler, sample_with_frames,
                             sampler_steps)


def generate_samples(denoise: Callable, schedule: Schedule, cfg: GenerateConfig, image_size: int,
                     device: torch.device, count: Optional[int] = None, start: int = 0,
                     progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """`count` (default generate.num_samples) uint8 samples N x 3 x S x S, images start.. ."""
    sampler = get_sampler(cfg.sampler)
    steps = sampler_steps(cfg.sampler, schedule, cfg.steps)
    count = cfg.num_samples if count is None else count
    out = np.empty((count, 3, image_size, image_size), dtype=np.uint8)
    for first in range(0, count, cfg.batch_size):
        indices = range(start + first, start + min(first + cfg.batch_size, count))
        noise = ImageNoise(cfg.seed, indices, device)
        x_T = noise.randn((3, image_size, image_size))
        x0 = sampler(denoise, schedule, x_T, noise, steps=steps, eta=cfg.eta, clip=cfg.clip,
                     variance=cfg.variance)
        out[first:first + len(indices)] = to_uint8(x0).cpu().numpy()
        if progress is not None:
            progress(len(indices))
    return out


def write_figures(denoise: Callable, schedule: Schedule, cfg: GenerateConfig, samples: np.ndarray,
                  real: Optional[np.ndarray], out_dir: Path, device: torch.device,
                  rows: int = 4) -> list[Path]:
    """Sample grid, forward strip (real images), reverse strip and its animation."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    grid = torch.from_numpy(samples[:cfg.grid_size])
    save_grid(grid, out_dir / "samples.png")
    written.append(out_dir / "samples.png")

    if real is not None and len(real):
        pick = np.linspace(0, len(real) - 1, min(rows, len(real))).round().astype(int)
        x0 = to_model(torch.from_numpy(real[pick]).to(device))
        frames = forward_frames(schedule, x0, ImageNoise(cfg.seed, range(len(pick)), device))
        save_strip([to_uint8(f) for f in frames], out_dir / "forward.png")
        written.append(out_dir / "forward.png")

    # The reverse process for `rows` images with the configured sampler; the
    # strip keeps 9 frames (the seed's), the GIF every step.
    size = samples.shape[-1]
    noise = ImageNoise(cfg.seed, range(rows), device)
    states = sample_with_frames(cfg.sampler, denoise, schedule, noise.randn((3, size, size)), noise,
                                steps=cfg.steps, eta=cfg.eta, every_step=True, clip=cfg.clip,
                                variance=cfg.variance)
    n = len(states) - 1
    keep = [0] + [int(round((k + 1) * n / 8)) for k in range(8)]
    save_strip([to_uint8(states[i]) for i in keep], out_dir / "reverse.png")
    gif_frames = [to_uint8(states[i]) for i in sorted(set(np.linspace(0, n, min(n + 1, 64)).round().astype(int)))]
    save_gif(gif_frames, out_dir / "reverse.gif")
    written += [out_dir / "reverse.png", out_dir / "reverse.gif"]
    return written

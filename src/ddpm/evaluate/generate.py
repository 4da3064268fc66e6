"""Sampling from a trained model: batches of samples, and the figures of the generate stage.

Every image has its own seed (generate.seed, its index), so a sample does not
change with the batch size or the number of devices.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Callable, Mapping, Optional

import numpy as np
import torch

from ..config import ConfigError, GenerateConfig, Sampler, _check_steps_fit, default_eta
from ..model.diffusion import Schedule
from .figures import save_gif, save_grid, save_strip
from ..model.pixels import to_model, to_uint8
from ..model.samplers import (ImageNoise, forward_frames, get_sampler, sample_with_frames,
                             sampler_steps)


def request_config(diffusion_steps: Optional[int], *, num_samples: int, sampler: str,
                   steps: Optional[int] = None, eta: Optional[float] = None,
                   batch_size: int = 256, seed: int = 0, weights: str = "ema",
                   clip: bool = True, variance: str = "posterior",
                   names: Mapping[str, str] = {}) -> GenerateConfig:
    """The settings of a request for samples outside the pipeline (`ddpm sample`, the MLflow
    model), checked by the generate stage's rules: steps default to all of the model's
    `diffusion_steps`, eta to the sampler's default. A ConfigError names the setting as
    `names` spells it (e.g. {"steps": "--steps"}). With `diffusion_steps` None (the model
    not loaded yet) only what does not depend on the model is checked."""
    def fail(key: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{names.get(key, key)}: {message}")

    samplers = typing.get_args(Sampler)
    if sampler not in samplers:
        fail("sampler", f"unknown sampler {sampler!r}; choose one of {', '.join(samplers)}")
    cfg = GenerateConfig(num_samples=num_samples, sampler=sampler,  # type: ignore[arg-type]
                         steps=steps if steps is not None else diffusion_steps or 1,
                         eta=default_eta(sampler) if eta is None else eta,
                         batch_size=batch_size, seed=seed, weights=weights,  # type: ignore
                         clip=clip, variance=variance)  # type: ignore[arg-type]
    try:
        cfg.check("generate")
        if diffusion_steps is not None:
            _check_steps_fit("generate.steps", cfg.sampler, cfg.steps, diffusion_steps)
    except ConfigError as err:
        message = str(err).removeprefix("params.yaml: generate.")
        key, _, rest = message.partition(": ")
        fail(key, rest.replace("diffusion.steps", "the model's diffusion steps"))
    return cfg


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

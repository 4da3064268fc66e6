"""Reverse-diffusion samplers: free functions with one signature.

    sampler(denoise, schedule, x_T, noise, steps=..., eta=..., clip=True,
            variance="posterior", callback=None) -> x0

`denoise(x_t, t) -> eps` is the model (EMA weights, autocast, compiled: the
caller decides). `noise` gives each image its own random stream, so an image
depends only on (seed, its index), never on batch size or device count.
`callback(i, t, x)` is called after each of the sampler's steps (previews,
strips, progress).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .diffusion import Schedule, ddim_step, ddpm_step, q_sample

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image `index` of a run seeded with `seed`."""
    return int(np.random.SeedSequence([seed, index]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


class ImageNoise:
    """One generator per image: draws are stacked along the batch dimension."""

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(image_seed(seed, int(i)))
                           for i in indices]

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.stack([torch.randn(tuple(shape), generator=g, device=self.device)
                            for g in self.generators])


def ddim_timesteps(T: int, steps: int) -> torch.Tensor:
    """`steps` of the T training steps, evenly spaced, descending from T-1 to 0."""
    picked = np.linspace(T - 1, 0, steps).round().astype(np.int64)
    return torch.from_numpy(np.unique(picked)[::-1].copy())


@torch.no_grad()
def sample_ddpm(denoise: Denoiser, schedule: Schedule, x_T: torch.Tensor, noise: ImageNoise,
                steps: Optional[int] = None, eta: float = 1.0, clip: bool = True,
                variance: str = "posterior",
                callback: Optional[StepCallback] = None) -> torch.Tensor:
    """Ancestral sampling over all T steps (Ho et al. 2020, Algorithm 2); `clip` and
    `variance` as `diffusion.ddpm_step` takes them."""
    if steps not in (None, schedule.T):
        raise ValueError(f"the ddpm sampler takes all {schedule.T} steps, got steps={steps}; "
                         f"use sampler 'ddim' for fewer")
    x = x_T
    batch = x.shape[0]
    for i, t in enumerate(range(schedule.T - 1, -1, -1)):
        t_batch = torch.full((batch,), t, device=x.device, dtype=torch.long)
        eps = denoise(x, t_batch).float()
        x = ddpm_step(schedule, x, t_batch, eps, noise.randn(x.shape[1:]), clip=clip,
                      variance=variance)
        if callback is not None:
            callback(i, t, x)
    return x


@torch.no_grad()
def sample_ddim(denoise: Denoiser, schedule: Schedule, x_T: torch.Tensor, noise: ImageNoise,
                steps: Optional[int] = None, eta: float = 0.0, clip: bool = True,
                variance: str = "posterior",
                callback: Optional[StepCallback] = None) -> torch.Tensor:
    """DDIM (Song et al. 2021) over `steps` evenly spaced steps; eta = 0 is deterministic.
    Its noise scale is eta's: `variance` other than the default is refused."""
    if variance != "posterior":
        raise ValueError(f"the ddim sampler takes its noise from eta, not variance={variance!r}")
    timesteps = ddim_timesteps(schedule.T, steps or schedule.T).tolist()
    x = x_T
    batch = x.shape[0]
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        t_batch = torch.full((batch,), t, device=x.device, dtype=torch.long)
        t_prev_batch = torch.full((batch,), t_prev, device=x.device, dtype=torch.long)
        eps = denoise(x, t_batch).float()
        # eta = 0 adds no noise, so none is drawn: on a GPU each draw is one small
        # kernel per image (500 per step at generate.batch_size 500).
        z = noise.randn(x.shape[1:]) if eta else None
        x = ddim_step(schedule, x, t_batch, t_prev_batch, eps, z, eta=eta, clip=clip)
        if callback is not None:
            callback(i, t, x)
    return x


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim}


def get_sampler(name: str):
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}") from None


def sampler_steps(name: str, schedule: Schedule, steps: Optional[int]) -> int:
    return schedule.T if name == "ddpm" else min(steps or schedule.T, schedule.T)


def sample_with_frames(sampler_name: str, denoise: Denoiser, schedule: Schedule, x_T: torch.Tensor,
                       noise: ImageNoise, steps: Optional[int] = None, eta: float = 0.0,
                       frames: int = 9, every_step: bool = False, clip: bool = True,
                       variance: str = "posterior") -> list[torch.Tensor]:
    """Run a sampler and keep x_T plus `frames - 1` evenly spaced states ending at x0.

    With T = 512 and 9 frames these are the seed's: the noise, then every T/8-th
    step. `every_step` keeps all states (for an animation).
    """
    sampler = get_sampler(sampler_name)
    n = sampler_steps(sampler_name, schedule, steps)
    keep = set(range(n)) if every_step else {
        int(round((k + 1) * n / (frames - 1))) - 1 for k in range(frames - 1)}
    kept = [x_T.detach().clone()]

    def record(i: int, t: int, x: torch.Tensor) -> None:
        if i in keep:
            kept.append(x.detach().clone())

    sampler(denoise, schedule, x_T, noise, steps=n if sampler_name == "ddim" else None,
            eta=eta, clip=clip, variance=variance, callback=record)
    return kept


def forward_frames(schedule: Schedule, x0: torch.Tensor, noise: ImageNoise,
                   frames: int = 7) -> list[torch.Tensor]:
    """q(x_t | x0) at `frames` steps equally spaced in t from 0 to T-1 (the seed's 7)."""
    eps = noise.randn(x0.shape[1:])
    ts = np.linspace(0, schedule.T - 1, frames).round().astype(int)
    out = []
    for t in ts:
        t_batch = torch.full((x0.shape[0],), int(t), device=x0.device, dtype=torch.long)
        out.append(x0 if t == 0 else q_sample(schedule, x0, t_batch, eps))
    return out

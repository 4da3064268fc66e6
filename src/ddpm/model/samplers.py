"""Reverse-diffusion samplers: free functions with one signature.

    sampler(denoise, schedule, x_T, noise, steps=..., eta=..., clip=True,
            variance="posterior", callback=None) -> x0

`denoise(x_t, t) -> eps` is the model (EMA weights, autocast, compiled: the
caller decides), through `eps_denoiser` when it predicts v or x0. `noise` gives
each image its own random stream, so an image depends only on (seed, its
index), never on batch size or device count.
`callback(i, t, x)` is called after each of the sampler's steps (previews,
strips, progress).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .diffusion import (Schedule, check_prediction, ddim_step, ddpm_step, eps_from,
                        q_sample)

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int, torch.Tensor], None]


def eps_denoiser(net: Denoiser, schedule: Schedule, prediction: str) -> Denoiser:
    """The noise predictor the samplers call, from `net(x_t, t)` that outputs `prediction`
    (eps, v or x0: `diffusion.prediction`, which a model file records). The one place a
    model's output is read as what it predicts: training's strips and FID, generate,
    sweep, `ddpm sample` and the MLflow model all sample through it."""
    check_prediction(prediction)
    if prediction == "eps":
        return net
    on_device: dict[torch.device, Schedule] = {}  # the schedule where x_t is, copied once

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x_t.device not in on_device:
            on_device[x_t.device] = schedule.to(x_t.device)
        return eps_from(prediction, on_device[x_t.device], x_t, t, net(x_t, t).to(x_t.dtype))

    return denoise


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


def log_snr(schedule: Schedule) -> np.ndarray:
    """lambda_t = log(alpha_t / sigma_t) for t = 0 .. T-1 in float64, decreasing in t
    (alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t))."""
    alpha_bar = schedule.alpha_bar.double().cpu().numpy()
    return 0.5 * (np.log(alpha_bar) - np.log1p(-alpha_bar))


def lambda_timesteps(schedule: Schedule, steps: int) -> torch.Tensor:
    """`steps` distinct training steps descending from T-1 to 0, as evenly spaced in
    lambda as integer t allows. Where lambda moves more than one grid spacing per step
    (near t = 0 of a linear schedule at many steps, near T-1 of a cosine one), the
    nearest steps collide and are pushed apart, so a run keeps `steps` evaluations."""
    T = schedule.T
    lam = log_snr(schedule)
    targets = np.linspace(lam[-1], lam[0], steps)  # increasing lambda: t from T-1 down
    picked = np.abs(lam[None, :] - targets[:, None]).argmin(1)
    picked[-1], picked[0] = 0, T - 1
    i = np.arange(steps)
    picked = np.clip(picked, steps - 1 - i, T - 1 - i)  # room for the steps on either side
    for k in range(steps - 2, -1, -1):
        picked[k] = max(picked[k], picked[k + 1] + 1)
    return torch.from_numpy(picked.astype(np.int64))


def no_zero(grid):
    """A grid that does not spend one of its `steps` evaluations at t = 0: `grid` of steps + 1
    points without its last (t = 0), so the last step goes from t ~ T/steps straight to the
    clean image. At sigma_0 (0.01 for the seed's schedule) the model's x0 is the input
    itself: that evaluation buys next to nothing. With steps = T there is no room to leave
    t = 0 out, and the grid is `grid`'s own."""
    def timesteps(schedule: Schedule, steps: int) -> torch.Tensor:
        if steps >= schedule.T:
            return grid(schedule, steps)
        return grid(schedule, steps + 1)[:-1]
    return timesteps


def linspace_timesteps(schedule: Schedule, steps: int) -> torch.Tensor:
    """`steps` points evenly spaced in t, rounded, counted up from 0 to T-1 (diffusers'
    "linspace" timestep spacing; DDIM's grid counts down from T-1, which rounds a tie such
    as 255.5 the other way), descending."""
    picked = np.linspace(0, schedule.T - 1, steps).round().astype(np.int64)
    return torch.from_numpy(np.unique(picked)[::-1].copy())


# Timestep grids of the DPM-Solver++ samplers, by name: "time" is DDIM's (even in t),
# "lambda" even in log-SNR; "_no_zero" leaves out the evaluation at t = 0 (`no_zero`):
# "time_no_zero" is diffusers' DPMSolverMultistepScheduler's default (linspace spacing,
# final sigma zero).
SPACINGS = {"time": lambda schedule, steps: ddim_timesteps(schedule.T, steps),
            "lambda": lambda_timesteps, "time_no_zero": no_zero(linspace_timesteps),
            "lambda_no_zero": no_zero(lambda_timesteps)}


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


# The DPM-Solver++ samplers' grid: diffusers' default, evenly spaced in t without an
# evaluation at t = 0 (`no_zero`). It won by FID on trained models of both schedules
# (256 samples against the 600 real images of the demo's data, 2026-12-04,
# scripts/grid_fid.py; docs/samplers.md has the table): on the seed's linear T = 512,
# dpmpp_2m 108.4 / 101.3 / 104.1 at 10 / 20 / 50 evaluations against 113.9 / 109.7 /
# 111.4 on "time" (DDIM's grid, the old default) and 111.1 / 110.3 / 111.7 on "lambda";
# dpmpp_2m_sde 91.7 / 86.7 / 86.3 against 146.7 / 113.0 / 98.3 and 90.0 / 90.1 / 88.8.
# On the closed-form Gaussian of tests/test_dpm_solver.py it beats DDIM at 10, 20 and 50
# evaluations on both schedules (that test holds the rule); "lambda" ends closer still on
# the linear schedule, but farther than this grid on the cosine one at 20 and 50.
DPMPP_SPACING = "time_no_zero"


def _dpmpp_2m(denoise: Denoiser, schedule: Schedule, x_T: torch.Tensor, noise: ImageNoise,
              steps: Optional[int], eta: float, clip: bool, callback: Optional[StepCallback],
              spacing: str) -> torch.Tensor:
    """DPM-Solver++(2M) in data prediction (Lu et al. 2022, Algorithm 2) for eta = 0, and
    its SDE form for eta > 0, over the grid's timesteps t_0 = T-1 > ... > t_{n-1} (0, or
    about T/n on a `_no_zero` grid), then t_n = -1.

    With m_i = x_theta(x_i, t_i) = (x_i - sigma_i eps(x_i, t_i)) / alpha_i (clamped to
    [-1, 1] if `clip`), h_i = lambda_{t_{i+1}} - lambda_{t_i}, r_i = h_{i-1} / h_i and
    c = 1 + eta^2:

        D_i     = m_i + (m_i - m_{i-1}) / (2 r_i)         (D_0 = m_0: first order)
        x_{i+1} = (sigma_{i+1} / sigma_i) e^{-eta^2 h_i} x_i + alpha_{i+1} (1 - e^{-c h_i}) D_i
                  + sigma_{i+1} sqrt(1 - e^{-2 eta^2 h_i}) z_i

    For y = x / alpha this integrates exactly, over one step with x_theta held at D_i,
        dy = c (x_theta - y) dlambda + eta sqrt(2) e^{-lambda} dw:
    the probability-flow ODE (eta = 0: Algorithm 2 line for line) plus eta^2 times
    Langevin dynamics at the current noise level, which keep every marginal; eta = 1 is
    the reverse SDE, whose first-order step is the DDPM posterior step (DDIM, eta = 1).
    D_i is Algorithm 2's combination for every eta; integrating the line through
    m_{i-1}, m_i exactly instead differs by O(h^3) per step, the truncation's order.

    The last step, from t_{n-1} to t = -1 (alpha_bar = 1, sigma = 0, as DDIM's last step),
    has h = inf and r = 0: it is first order and returns m, the predicted clean image,
    with no noise (diffusers' `lower_order_final` with a zero final sigma).
    """
    T = schedule.T
    steps = T if steps is None else steps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be 1 .. {T} (the training steps), got {steps}")
    try:
        timesteps = SPACINGS[spacing](schedule, steps).tolist()
    except KeyError:
        raise ValueError(f"unknown spacing {spacing!r}; allowed: {', '.join(SPACINGS)}") from None
    # Per-step coefficients are float64 numbers from one host copy of the schedule: no
    # device sync per step, and x keeps its dtype.
    alpha_bar = np.append(schedule.alpha_bar.double().cpu().numpy(), 1.0)  # [-1]: t = -1
    alpha, sigma = np.sqrt(alpha_bar).tolist(), np.sqrt(1 - alpha_bar).tolist()
    lam = log_snr(schedule).tolist()
    x = x_T
    batch = x.shape[0]
    m_prev = h_prev = None
    for i, t in enumerate(timesteps):
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        t_batch = torch.full((batch,), t, device=x.device, dtype=torch.long)
        # At x's dtype (float32 in use, undoing a bf16 autocast; float64 in the tests).
        eps = denoise(x, t_batch).to(x.dtype)
        m = (x - sigma[t] * eps) / alpha[t]
        if clip:
            m = m.clamp(-1, 1)
        if t_next < 0:
            x = m  # alpha = 1, sigma = 0
        else:
            h = lam[t_next] - lam[t]
            d = m if m_prev is None else m + (m - m_prev) * (h / h_prev / 2)
            x = (sigma[t_next] / sigma[t] * math.exp(-eta**2 * h)) * x \
                + (alpha[t_next] * -math.expm1(-(1 + eta**2) * h)) * d
            if eta:
                z = noise.randn(x.shape[1:])
                x = x + (sigma[t_next] * math.sqrt(-math.expm1(-2 * eta**2 * h))) * z
            m_prev, h_prev = m, h
        if callback is not None:
            callback(i, t, x)
    return x


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, schedule: Schedule, x_T: torch.Tensor, noise: ImageNoise,
                    steps: Optional[int] = None, eta: float = 0.0, clip: bool = True,
                    variance: str = "posterior", callback: Optional[StepCallback] = None,
                    spacing: str = DPMPP_SPACING) -> torch.Tensor:
    """DPM-Solver++(2M): the probability-flow ODE in `steps` model evaluations (default
    T), deterministic given x_T; the math is `_dpmpp_2m`'s. It adds no noise, so eta
    must be 0 and variance the default; `clip` clamps each predicted x0 to [-1, 1]."""
    if variance != "posterior":
        raise ValueError(f"the dpmpp_2m sampler adds no noise; variance={variance!r} is for ddpm")
    if eta != 0:
        raise ValueError(f"the dpmpp_2m sampler is deterministic and takes eta=0, got "
                         f"eta={eta}; for noise use dpmpp_2m_sde")
    return _dpmpp_2m(denoise, schedule, x_T, noise, steps, 0.0, clip, callback, spacing)


@torch.no_grad()
def sample_dpmpp_2m_sde(denoise: Denoiser, schedule: Schedule, x_T: torch.Tensor,
                        noise: ImageNoise, steps: Optional[int] = None, eta: float = 1.0,
                        clip: bool = True, variance: str = "posterior",
                        callback: Optional[StepCallback] = None,
                        spacing: str = DPMPP_SPACING) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, section 5): the reverse SDE in `steps` model
    evaluations (default T), one draw from `noise` per step but the last; the math is
    `_dpmpp_2m`'s. eta scales the Langevin part: 1 is the paper's SDE, more adds more,
    0 would be the ODE (sampler dpmpp_2m) and is refused. `clip` as dpmpp_2m's."""
    if variance != "posterior":
        raise ValueError(f"the dpmpp_2m_sde sampler takes its noise from eta, not "
                         f"variance={variance!r}")
    if not eta > 0:
        raise ValueError(f"the dpmpp_2m_sde sampler needs eta > 0 (1 = the reverse SDE), got "
                         f"eta={eta}; eta 0 is sampler dpmpp_2m")
    return _dpmpp_2m(denoise, schedule, x_T, noise, steps, eta, clip, callback, spacing)


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m,
            "dpmpp_2m_sde": sample_dpmpp_2m_sde}


def get_sampler(name: str):
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}") from None


def model_evaluations(name: str, steps: int, T: int) -> int:  # noqa: N803 - the paper's T
    """Model calls per image: ddpm takes all T steps, the others `steps`."""
    return T if name == "ddpm" else steps


def sampler_steps(name: str, schedule: Schedule, steps: Optional[int]) -> int:
    return model_evaluations(name, min(steps or schedule.T, schedule.T), schedule.T)


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

    # Every sampler takes steps = sampler_steps(...): ddpm accepts its own T.
    sampler(denoise, schedule, x_T, noise, steps=n, eta=eta, clip=clip, variance=variance,
            callback=record)
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

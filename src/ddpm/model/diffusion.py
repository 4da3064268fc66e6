"""DDPM math (Ho et al. 2020) as pure tensor functions. No I/O, no devices.

Notation, used throughout this module:
    T           number of diffusion steps; t = 0 .. T-1 indexes them (the
                paper's t = 1 .. T)
    beta_t      noise added at step t;  alpha_t = 1 - beta_t
    alpha_bar_t = prod_{s <= t} alpha_s
    x0          a clean image in [-1, 1];  x_t its noisy version at step t
    eps         standard Gaussian noise
    alpha_t, sigma_t  (below, for the objectives) sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t):
                x_t = alpha_t x0 + sigma_t eps;  SNR_t = alpha_t^2 / sigma_t^2
    v           alpha_t eps - sigma_t x0 (Salimans & Ho 2022, section 4)

    The model predicts eps (the seed's), v or x0 from (x_t, t) (`diffusion.prediction`);
    any one gives the others:
        x0  = alpha_t x_t - sigma_t v = (x_t - sigma_t eps) / alpha_t
        eps = sigma_t x_t + alpha_t v = (x_t - alpha_t x0) / sigma_t
    and their squared errors relate as
        |x0 err|^2 = |eps err|^2 / SNR_t = sigma_t^2 |v err|^2 = |v err|^2 / (SNR_t + 1).

    q(x_t | x0)        = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I)          (eq. 4)
    q(x_{t-1} | x_t, x0) = N(mu_tilde, beta_tilde_t I)                       (eqs. 6-7)
        mu_tilde    = coef_x0_t x0 + coef_xt_t x_t
        beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
    loss = || eps - eps_theta(x_t, t) ||^2                                    (eq. 14)
        for eps-prediction; in general w_t || target - model(x_t, t) ||^2, with w_t = 1, or
        min(SNR_t, gamma) on the x0 error (min-SNR-gamma, Hang et al. 2023, eq. 8)

Schedule quantities are computed in float64 and cast once to float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import DiffusionConfig


def linear_betas(steps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)


def cosine_betas(steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: alpha_bar follows a squared cosine."""
    f = torch.cos((torch.arange(steps + 1, dtype=torch.float64) / steps + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


BETA_SCHEDULES = {
    "linear": lambda c: linear_betas(c.steps, c.beta_start, c.beta_end),
    "cosine": lambda c: cosine_betas(c.steps),
}


@dataclass(frozen=True)
class Schedule:
    """Per-step constants, each a float32 tensor of shape (T,)."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_coef_x0: torch.Tensor
    posterior_coef_xt: torch.Tensor

    @property
    def T(self) -> int:  # noqa: N802 - the paper's symbol
        return self.betas.shape[0]

    def to(self, device: torch.device | str) -> "Schedule":
        return Schedule(**{k: v.to(device) for k, v in self.__dict__.items()})


def make_schedule(config: DiffusionConfig) -> Schedule:
    try:
        betas = BETA_SCHEDULES[config.schedule](config)
    except KeyError:
        raise ValueError(f"unknown schedule {config.schedule!r}; allowed: "
                         f"{', '.join(BETA_SCHEDULES)}") from None
    return schedule_from_betas(betas)


def schedule_from_betas(betas: torch.Tensor) -> Schedule:
    betas = betas.to(torch.float64)
    alphas = 1 - betas
    alpha_bar = torch.cumprod(alphas, dim=0)
    alpha_bar_prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    consts = dict(
        betas=betas,
        alphas=alphas,
        alpha_bar=alpha_bar,
        alpha_bar_prev=alpha_bar_prev,
        posterior_variance=betas * (1 - alpha_bar_prev) / (1 - alpha_bar),
        posterior_coef_x0=betas * alpha_bar_prev.sqrt() / (1 - alpha_bar),
        posterior_coef_xt=(1 - alpha_bar_prev) * alphas.sqrt() / (1 - alpha_bar),
    )
    return Schedule(**{k: v.float() for k, v in consts.items()})


def _at(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, 1) to broadcast over images."""
    return values.to(t.device)[t].view(-1, 1, 1, 1)


def q_sample(s: Schedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x0), eq. 4, reparameterised with the given eps."""
    ab = _at(s.alpha_bar, t)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def predict_x0(s: Schedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Invert eq. 4 for x0 given the (predicted) noise."""
    ab = _at(s.alpha_bar, t)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def q_posterior(s: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x0), eqs. 6-7."""
    mean = _at(s.posterior_coef_x0, t) * x0 + _at(s.posterior_coef_xt, t) * x_t
    return mean, _at(s.posterior_variance, t)


def loss_per_image(eps_pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Eq. 14 (L_simple) per image: mean squared error over pixels, shape (B,). For another
    prediction, the same error of that quantity against its `target`."""
    return (eps_pred.float() - eps.float()).pow(2).flatten(1).mean(1)


PREDICTIONS = ("eps", "v", "x0")
WEIGHTINGS = ("none", "min_snr")


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")


def snr(s: Schedule) -> torch.Tensor:
    """SNR_t = alpha_bar_t / (1 - alpha_bar_t), shape (T,), float64."""
    alpha_bar = s.alpha_bar.double()
    return alpha_bar / (1 - alpha_bar)


def target(prediction: str, s: Schedule, x0: torch.Tensor, eps: torch.Tensor,
           t: torch.Tensor) -> torch.Tensor:
    """What a `prediction` model is trained to output for x_t = q_sample(x0, t, eps)."""
    check_prediction(prediction)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    ab = _at(s.alpha_bar, t)
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0  # v


def eps_from(prediction: str, s: Schedule, x_t: torch.Tensor, t: torch.Tensor,
             out: torch.Tensor) -> torch.Tensor:
    """The noise a model's output `out` (of kind `prediction`) denotes at (x_t, t)."""
    check_prediction(prediction)
    if prediction == "eps":
        return out
    ab = _at(s.alpha_bar, t)
    if prediction == "v":
        return (1 - ab).sqrt() * x_t + ab.sqrt() * out
    return (x_t - ab.sqrt() * out) / (1 - ab).sqrt()  # x0


def x0_from(prediction: str, s: Schedule, x_t: torch.Tensor, t: torch.Tensor,
            out: torch.Tensor) -> torch.Tensor:
    """The clean image a model's output `out` (of kind `prediction`) denotes at (x_t, t)."""
    check_prediction(prediction)
    if prediction == "x0":
        return out
    if prediction == "eps":
        return predict_x0(s, x_t, t, out)
    ab = _at(s.alpha_bar, t)
    return ab.sqrt() * x_t - (1 - ab).sqrt() * out  # v


def x0_error_scale(prediction: str, s: Schedule) -> torch.Tensor:
    """Per t, |x0 err|^2 / |error of the predicted quantity|^2: 1/SNR_t for eps,
    1/(SNR_t + 1) for v, 1 for x0. Shape (T,), float64."""
    check_prediction(prediction)
    ratio = snr(s)
    return {"eps": 1 / ratio, "v": 1 / (ratio + 1), "x0": torch.ones_like(ratio)}[prediction]


def loss_weights(prediction: str, weighting: str, s: Schedule, gamma: float = 5.0) -> torch.Tensor:
    """w_t on the mean squared error of the predicted quantity, shape (T,), float32.

    none: 1. min_snr: min(SNR_t, gamma) on the x0 error (Hang et al. 2023), which on the
    predicted quantity is min(SNR_t, gamma) times `x0_error_scale`: min(SNR_t, gamma) /
    SNR_t for eps, min(SNR_t, gamma) / (SNR_t + 1) for v, min(SNR_t, gamma) for x0.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
    if weighting == "none":
        check_prediction(prediction)
        return torch.ones(s.T)
    return (snr(s).clamp(max=gamma) * x0_error_scale(prediction, s)).float()


VARIANCES = ("posterior", "beta")


def ddpm_step(s: Schedule, x_t: torch.Tensor, t: torch.Tensor, eps_pred: torch.Tensor,
              noise: torch.Tensor, clip: bool = True, variance: str = "posterior") -> torch.Tensor:
    """One ancestral step x_t -> x_{t-1} (Algorithm 2).

    sigma_t^2 is beta_tilde_t (`variance="posterior"`) or beta_t (`"beta"`, the
    seed module's); Ho et al. report both equally good (section 3.2). The mean is
    written through the predicted x0, which equals Algorithm 2's
    (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t) when x0 is not
    clipped (the seed module's way); clipping x0 to [-1, 1] (the paper's official
    code) keeps samples in the data range. As in Algorithm 2, no noise is added at
    the last step (t = 0); the seed module adds sigma_0 z there too, at most 0.01,
    about one grey level.
    """
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; allowed: {', '.join(VARIANCES)}")
    x0 = predict_x0(s, x_t, t, eps_pred)
    if clip:
        x0 = x0.clamp(-1, 1)
    mean, var = q_posterior(s, x0, x_t, t)
    if variance == "beta":
        var = _at(s.betas, t)
    nonzero = (t > 0).view(-1, 1, 1, 1).to(x_t.dtype)
    return mean + nonzero * var.sqrt() * noise


def ddim_step(s: Schedule, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              eps_pred: torch.Tensor, noise: Optional[torch.Tensor], eta: float = 0.0,
              clip: bool = True) -> torch.Tensor:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12); t_prev = -1 means x0.

    sigma = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)
    (eq. 16); eta = 1 with consecutive steps is the ancestral DDPM sampler.
    `noise` may be None when eta = 0 (the deterministic sampler adds none).
    """
    if noise is None and eta != 0:
        raise ValueError(f"ddim_step with eta={eta} needs noise")
    ab_t = _at(s.alpha_bar, t)
    ab_prev = torch.where(t_prev >= 0, s.alpha_bar.to(t.device)[t_prev.clamp(min=0)],
                          torch.ones((), device=t.device)).view(-1, 1, 1, 1)
    x0 = predict_x0(s, x_t, t, eps_pred)
    if clip:
        x0 = x0.clamp(-1, 1)
        # Re-derive eps from the clipped x0 so both terms stay consistent.
        eps_pred = (x_t - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()
    sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
    direction = (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps_pred
    x_prev = ab_prev.sqrt() * x0 + direction
    return x_prev if noise is None else x_prev + sigma * noise

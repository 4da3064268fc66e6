"""Math identities of the DDPM module (closed forms against iteration)."""

import pytest
import torch

from ddpm.config import DiffusionConfig
from ddpm.model.diffusion import (cosine_betas, ddim_step, ddpm_step, loss_per_image,
                                  make_schedule, predict_x0, q_posterior, q_sample)
from ddpm.model.samplers import ImageNoise, sample_ddim, sample_ddpm

S = make_schedule(DiffusionConfig(steps=512))


def full(t, n):
    return torch.full((n,), t, dtype=torch.long)


def test_seed_schedule_constants():
    assert S.T == 512
    assert torch.isclose(S.betas[0], torch.tensor(1e-4)) and torch.isclose(S.betas[-1], torch.tensor(0.02))
    # alpha_bar from float64 products: a float32 cumprod would drift by ~1e-6 relative.
    expected = torch.prod(1 - torch.linspace(1e-4, 0.02, 512, dtype=torch.float64))
    assert abs(S.alpha_bar[-1].item() - expected.item()) < 1e-9


def test_closed_form_q_matches_iterating_one_step_kernels():
    """q(x_t | x0) (eq. 4) has the moments of t applications of q(x_t | x_{t-1}) (eq. 2)."""
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    x = x0.clone()
    for t in range(300):
        x = (1 - S.betas[t]).sqrt() * x + S.betas[t].sqrt() * torch.randn(x.shape, generator=gen)
    closed = q_sample(S, x0, full(299, len(x0)), torch.randn(x0.shape, generator=gen))
    for a, b in ((x, closed),):
        assert abs(a.mean() - b.mean()) < 0.02
        assert abs(a.var() - b.var()) < 0.02
    assert abs(x.mean() - S.alpha_bar[299].sqrt() * 0.7) < 0.02
    assert abs(x.var() - (1 - S.alpha_bar[299])) < 0.02


def test_posterior_is_the_gaussian_conditional():
    """beta_tilde and mu_tilde equal Bayes' rule on q(x_{t-1}|x0) and q(x_t|x_{t-1})."""
    t = 100
    ab_prev, beta = S.alpha_bar[t - 1].double(), S.betas[t].double()
    # Precision-weighted combination of the prior N(sqrt(ab_prev) x0, 1-ab_prev)
    # and the likelihood of x_t = sqrt(1-beta) x_{t-1} + sqrt(beta) eps.
    precision = 1 / (1 - ab_prev) + (1 - beta) / beta
    var = 1 / precision
    assert torch.isclose(S.posterior_variance[t].double(), var, rtol=1e-5)
    x0, x_t = torch.tensor([[[[0.3]]]]), torch.tensor([[[[-0.5]]]])
    mean_bayes = var * (ab_prev.sqrt() * x0.double() / (1 - ab_prev) + (1 - beta).sqrt() * x_t.double() / beta)
    mean, _ = q_posterior(S, x0, x_t, full(t, 1))
    assert torch.isclose(mean.double(), mean_bayes, rtol=1e-4).all()


def test_oracle_eps_gives_zero_loss_and_exact_x0():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand((4, 3, 8, 8), generator=gen) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 10, 200, 511])
    x_t = q_sample(S, x0, t, eps)
    assert loss_per_image(eps, eps).abs().max() == 0
    assert loss_per_image(torch.zeros_like(eps), eps).min() > 0.5
    assert torch.allclose(predict_x0(S, x_t, t, eps), x0, atol=1e-3)


def test_ddpm_step_with_an_oracle_lands_on_the_posterior_mean():
    x0 = torch.full((1, 3, 4, 4), 0.25)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    t = full(50, 1)
    x_t = q_sample(S, x0, t, eps)
    out = ddpm_step(S, x_t, t, eps, noise=torch.zeros_like(x0))
    mean, _ = q_posterior(S, x0, x_t, t)
    assert torch.allclose(out, mean, atol=1e-5)
    # The last step adds no noise and returns the clipped x0.
    last = ddpm_step(S, x0, full(0, 1), torch.zeros_like(x0), noise=torch.ones_like(x0))
    assert torch.allclose(last, x0, atol=1e-4)


def test_unclipped_ddpm_step_is_algorithm_2_with_either_variance():
    """The seed module's p_sample: mean (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) /
    sqrt(alpha_t), noise sqrt(beta_t) z; the posterior variance adds sqrt(beta_tilde_t) z."""
    gen = torch.Generator().manual_seed(3)
    x_t = torch.randn((3, 3, 4, 4), generator=gen) * 2  # predicted x0 well outside [-1, 1]
    eps, z = torch.randn(x_t.shape, generator=gen), torch.randn(x_t.shape, generator=gen)
    t = torch.tensor([1, 200, 511])
    b, a, ab = (v[t].view(-1, 1, 1, 1).double() for v in (S.betas, S.alphas, S.alpha_bar))
    mean = (x_t.double() - b / (1 - ab).sqrt() * eps.double()) / a.sqrt()
    for variance, var in (("beta", b), ("posterior", S.posterior_variance[t].view(-1, 1, 1, 1))):
        out = ddpm_step(S, x_t, t, eps, z, clip=False, variance=variance)
        assert torch.allclose(out.double(), mean + var.double().sqrt() * z, atol=1e-4), variance
    clipped = ddpm_step(S, x_t, t, eps, z, clip=True, variance="beta")
    assert not torch.allclose(clipped, ddpm_step(S, x_t, t, eps, z, clip=False, variance="beta"))
    with pytest.raises(ValueError, match="posterior, beta"):
        ddpm_step(S, x_t, t, eps, z, variance="fixed_large")


def test_sampler_options_reach_every_step():
    gen = torch.Generator().manual_seed(4)
    x_T = torch.randn((2, 3, 4, 4), generator=gen)
    small = make_schedule(DiffusionConfig(steps=20))

    def wild(x, t):  # an eps that makes x0 leave [-1, 1]
        return -3 * x

    runs = {(clip, variance): sample_ddpm(wild, small, x_T, ImageNoise(0, range(2)), clip=clip,
                                          variance=variance)
            for clip in (True, False) for variance in ("posterior", "beta")}
    assert len({tuple(r.flatten().tolist()) for r in runs.values()}) == 4
    assert runs[(True, "posterior")].abs().max() <= 1 + 1e-5  # the last step returns x0
    assert runs[(False, "posterior")].abs().max() > 1.5
    unclipped = sample_ddim(wild, small, x_T, ImageNoise(0, range(2)), steps=5, clip=False)
    assert not torch.allclose(unclipped, sample_ddim(wild, small, x_T, ImageNoise(0, range(2)),
                                                     steps=5))
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(wild, small, x_T, ImageNoise(0, range(2)), steps=5, variance="beta")


def test_ddim_with_all_steps_and_eta_1_matches_ancestral_statistics():
    """With every step and eta = 1, DDIM's sigma equals sqrt(beta_tilde): the DDPM sampler."""
    schedule = make_schedule(DiffusionConfig(steps=50))
    target = 0.4

    def oracle(x, t):  # the exact eps for data that is the constant `target`
        ab = schedule.alpha_bar[t].view(-1, 1, 1, 1)
        return (x - ab.sqrt() * target) / (1 - ab).sqrt()

    def run(sampler, **kw):
        noise = ImageNoise(7, range(512))
        x_T = noise.randn((1, 2, 2))
        return sampler(oracle, schedule, x_T, noise, **kw)

    a, b = run(sample_ddpm), run(sample_ddim, steps=50, eta=1.0)
    assert abs(a.mean() - b.mean()) < 0.01 and abs(a.std() - b.std()) < 0.01
    assert abs(a.mean() - target) < 0.01


def test_ddim_eta_zero_is_deterministic_given_x_T():
    schedule = make_schedule(DiffusionConfig(steps=50))
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    model = lambda x, t: 0.1 * x  # noqa: E731
    a = sample_ddim(model, schedule, x_T, ImageNoise(1, range(2)), steps=10, eta=0.0)
    b = sample_ddim(model, schedule, x_T, ImageNoise(99, range(2)), steps=10, eta=0.0)
    assert torch.equal(a, b)


class CountingNoise(ImageNoise):
    def __init__(self, *args):
        super().__init__(*args)
        self.draws = 0

    def randn(self, shape):
        self.draws += 1
        return super().randn(shape)


def test_ddim_draws_noise_only_when_eta_adds_it_and_eta_zero_equals_zero_noise():
    schedule = make_schedule(DiffusionConfig(steps=50))
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    model = lambda x, t: 0.1 * x  # noqa: E731
    counted = {eta: CountingNoise(1, range(2)) for eta in (0.0, 0.5)}
    out = {eta: sample_ddim(model, schedule, x_T, noise, steps=10, eta=eta)
           for eta, noise in counted.items()}
    assert counted[0.0].draws == 0 and counted[0.5].draws == 10
    # The same steps with noise added at weight sigma = 0: the samples do not change.
    from ddpm.model.samplers import ddim_timesteps

    x, ts = x_T, ddim_timesteps(50, 10).tolist() + [-1]
    for t, t_prev in zip(ts, ts[1:]):
        tb, pb = torch.full((2,), t), torch.full((2,), t_prev)
        x = ddim_step(schedule, x, tb, pb, model(x, tb), torch.randn_like(x), eta=0.0)
    assert torch.equal(out[0.0], x)
    with pytest.raises(ValueError, match="needs noise"):
        ddim_step(schedule, x, tb, pb, model(x, tb), None, eta=0.5)


def test_cosine_schedule_is_monotone_and_bounded():
    betas = cosine_betas(1000)
    ab = torch.cumprod(1 - betas, 0)
    assert (betas > 0).all() and (betas <= 0.999).all()
    assert (ab[1:] < ab[:-1]).all() and ab[-1] < 1e-3


def test_ddim_timesteps_start_at_the_top_and_end_at_zero():
    from ddpm.model.samplers import ddim_timesteps

    assert ddim_timesteps(512, 1).tolist() == [511]
    assert ddim_timesteps(512, 2).tolist() == [511, 0]
    assert ddim_timesteps(512, 512).tolist() == list(range(511, -1, -1))
    steps = ddim_timesteps(512, 50).tolist()
    assert len(steps) == 50 and steps[0] == 511 and steps[-1] == 0

"""What the model predicts (diffusion.prediction: eps, v, x0) and how its loss is weighted by t
(train.loss_weighting: none, min_snr): the identities, the weights, the training step that
uses them, and samplers that read any prediction as the same denoiser."""

import dataclasses

import pytest
import torch

from conftest import TINY_MODEL
from ddpm.config import ConfigError, DiffusionConfig, TrainConfig, params_from_dict
from ddpm.model.diffusion import (PREDICTIONS, Schedule, eps_from, loss_weights, make_schedule,
                                  q_sample, snr, target, x0_error_scale, x0_from)
from ddpm.model.samplers import SAMPLERS, ImageNoise, eps_denoiser
from ddpm.train.step import TrainStep, build_state, quartile_of
from test_dpm_solver import Gaussian

T = 512


def float64(schedule: Schedule) -> Schedule:
    return Schedule(**{k: v.double() for k, v in schedule.__dict__.items()})


@pytest.fixture(params=["linear", "cosine"])
def schedule(request):
    return float64(make_schedule(DiffusionConfig(steps=T, schedule=request.param)))


def draws(seed=0, n=6):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand((n, 3, 4, 4), generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn((n, 3, 4, 4), generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 100, 255, 400, T - 1])[:n]
    return x0, eps, t


def test_each_prediction_converts_to_eps_and_x0_and_back(schedule):
    x0, eps, t = draws()
    x_t = q_sample(schedule, x0, t, eps)
    alpha, sigma = (c[t].view(-1, 1, 1, 1) for c in (schedule.alpha_bar.sqrt(),
                                                      (1 - schedule.alpha_bar).sqrt()))
    v = alpha * eps - sigma * x0  # Salimans & Ho's definition, written out
    assert torch.allclose(target("v", schedule, x0, eps, t), v, atol=1e-12)
    assert torch.equal(target("eps", schedule, x0, eps, t), eps)
    assert torch.equal(target("x0", schedule, x0, eps, t), x0)
    for prediction in PREDICTIONS:
        out = target(prediction, schedule, x0, eps, t)
        # Relative to the conditioning of each conversion at the extreme t.
        assert torch.allclose(eps_from(prediction, schedule, x_t, t, out), eps, atol=1e-7), \
            prediction
        assert torch.allclose(x0_from(prediction, schedule, x_t, t, out), x0, atol=1e-7), \
            prediction
    with pytest.raises(ValueError, match="allowed: eps, v, x0"):
        target("score", schedule, x0, eps, t)


def test_the_x0_error_scale_turns_each_error_into_the_x0_error(schedule):
    """|x0 err|^2 = |eps err|^2 / SNR = |v err|^2 / (SNR + 1): for any wrong output."""
    x0, eps, t = draws(1)
    x_t = q_sample(schedule, x0, t, eps)
    wrong = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for prediction in PREDICTIONS:
        out = target(prediction, schedule, x0, eps, t) + 0.1 * wrong
        error = (out - target(prediction, schedule, x0, eps, t)).pow(2).flatten(1).mean(1)
        x0_error = (x0_from(prediction, schedule, x_t, t, out) - x0).pow(2).flatten(1).mean(1)
        scale = x0_error_scale(prediction, schedule)[t]
        assert torch.allclose(error * scale, x0_error, rtol=1e-6), prediction


@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
def test_min_snr_weights_match_their_closed_forms(schedule, gamma):
    ratio = snr(schedule)
    for t in (0, 10, 100, 300, T - 1):
        clipped, r = min(ratio[t].item(), gamma), ratio[t].item()
        expected = {"eps": clipped / r, "v": clipped / (r + 1), "x0": clipped}
        for prediction, weight in expected.items():
            got = loss_weights(prediction, "min_snr", schedule, gamma)[t].item()
            assert got == pytest.approx(weight, rel=1e-6), (prediction, t)
            # ... which is min(SNR, gamma) on the x0 error, whatever is predicted
            scale = x0_error_scale(prediction, schedule)[t].item()
            assert got == pytest.approx(clipped * scale, rel=1e-6)
        for prediction in PREDICTIONS:
            assert loss_weights(prediction, "none", schedule)[t].item() == 1.0
    with pytest.raises(ValueError, match="allowed: none, min_snr"):
        loss_weights("eps", "snr", schedule)


@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_models_that_predict_differently_but_denote_one_denoiser_sample_alike(prediction, name):
    """The Gaussian toy's exact eps, as a v or an x0 model, through `eps_denoiser`, gives
    the eps model's samples from every sampler."""
    schedule = make_schedule(DiffusionConfig(steps=40, schedule="linear"))
    toy = Gaussian(float64(schedule))

    def as_prediction(x, t):  # what a perfect `prediction` model outputs at (x, t)
        eps = toy.eps(x, t)
        alpha, sigma = toy.alpha[t].view(-1, 1, 1, 1), toy.sigma[t].view(-1, 1, 1, 1)
        x0 = (x - sigma * eps) / alpha
        return alpha * eps - sigma * x0 if prediction == "v" else x0

    x_T = torch.randn((2, 1, 4, 4), generator=torch.Generator().manual_seed(2),
                      dtype=torch.float64)
    eta = 1.0 if name == "dpmpp_2m_sde" else 0.0
    runs = [SAMPLERS[name](denoise, schedule, x_T, ImageNoise(4, range(2)), steps=None if
                           name == "ddpm" else 10, eta=eta, clip=False)
            for denoise in (toy.eps, eps_denoiser(as_prediction, schedule, prediction))]
    assert torch.allclose(runs[0], runs[1], atol=1e-5), (runs[0] - runs[1]).abs().max()
    # ... and not merely because the samplers ignore what they are given:
    unread = SAMPLERS[name](as_prediction, schedule, x_T, ImageNoise(4, range(2)),
                            steps=None if name == "ddpm" else 10, eta=eta, clip=False)
    assert not torch.allclose(runs[0], unread, atol=1e-2)


def test_the_fast_path_denoiser_reads_the_prediction_from_the_diffusion_config():
    from ddpm.train.fastpath import denoiser

    class Constant(torch.nn.Module):
        def forward(self, x, t):
            return torch.full_like(x, 0.5)

    diffusion = DiffusionConfig(steps=20)
    x, t = torch.ones(1, 3, 4, 4), torch.tensor([10])
    schedule = make_schedule(diffusion)
    for prediction in PREDICTIONS:
        got = denoiser(Constant(), torch.device("cpu"), "fp32", "off",
                       diffusion=dataclasses.replace(diffusion, prediction=prediction))(x, t)
        assert torch.allclose(got, eps_from(prediction, schedule, x, t, torch.full_like(x, 0.5)))


@pytest.mark.parametrize("prediction,weighting", [("eps", "none"), ("v", "none"),
                                                  ("v", "min_snr"), ("x0", "min_snr"),
                                                  ("eps", "min_snr")])
def test_a_training_step_minimises_the_weighted_error_of_its_target(prediction, weighting):
    """One step's loss and x0 errors, recomputed by hand from the step's documented draws
    (flips, t, eps from the noise generator, in that order)."""
    diffusion = DiffusionConfig(steps=20, prediction=prediction)
    cfg = TrainConfig(batch_size=4, device="cpu", compile="off", precision="fp32", flip=False,
                      loss_weighting=weighting, min_snr_gamma=2.0, seed=7)
    cpu = torch.device("cpu")
    data = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))
    state = build_state(TINY_MODEL, cfg, cpu)
    model = build_state(TINY_MODEL, cfg, cpu).model  # the same initial weights
    step = TrainStep(state, data, diffusion, cfg, cpu)
    step.start_epoch(torch.arange(4))

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    torch.rand(4, generator=gen)  # the flips (unused: flip is off)
    t = torch.randint(0, 20, (4,), generator=gen)
    eps = torch.randn((4, 3, 16, 16), generator=gen)
    schedule = make_schedule(diffusion)
    x0 = data.float() / 127.5 - 1
    x_t = q_sample(schedule, x0, t, eps)
    with torch.no_grad():
        out = model(x_t, t)
    error = (out - target(prediction, schedule, x0, eps, t)).pow(2).flatten(1).mean(1)
    weight = loss_weights(prediction, weighting, schedule, 2.0)[t]
    x0_error = (x0_from(prediction, schedule, x_t, t, out) - x0).pow(2).flatten(1).mean(1)

    step(1e-4)
    loss_sum, q_sum, q_x0_sum, q_count = step.take_epoch()
    assert loss_sum.item() == pytest.approx((error * weight).mean().item(), rel=1e-5)
    q = quartile_of(t, 20)
    expected_x0 = torch.zeros(4).index_add_(0, q, x0_error)
    assert torch.allclose(q_x0_sum, expected_x0, rtol=1e-4, atol=1e-7)
    assert torch.equal(q_count, torch.zeros(4).index_add_(0, q, torch.ones(4)))


def test_the_objective_is_validated_in_params():
    with pytest.raises(ConfigError, match="diffusion.prediction: 'score' is not allowed; "
                                          "allowed: eps, v, x0"):
        params_from_dict({"diffusion": {"prediction": "score"}})
    with pytest.raises(ConfigError, match="train.loss_weighting: 'snr' is not allowed"):
        params_from_dict({"train": {"loss_weighting": "snr"}})
    for bad in (0, -1, float("nan")):
        with pytest.raises(ConfigError, match="train.min_snr_gamma: must be > 0"):
            params_from_dict({"train": {"min_snr_gamma": bad}})
    seed = params_from_dict({})
    assert (seed.diffusion.prediction, seed.train.loss_weighting) == ("eps", "none")


def test_the_objective_is_part_of_what_a_resume_must_match():
    from ddpm.config import ModelConfig
    from ddpm.train.checkpoint import differences
    from ddpm.train.loop import run_config

    seed = run_config(DiffusionConfig(), ModelConfig(), TrainConfig(), "0" * 64)
    for diffusion, train, key in [
            (DiffusionConfig(prediction="v"), TrainConfig(), "diffusion.prediction"),
            (DiffusionConfig(), TrainConfig(loss_weighting="min_snr"), "train.loss_weighting"),
            (DiffusionConfig(), TrainConfig(min_snr_gamma=1.0), "train.min_snr_gamma")]:
        changed = run_config(diffusion, ModelConfig(), train, "0" * 64)
        assert [d.split(":")[0] for d in differences(seed, changed)] == [key]


def test_a_model_file_records_its_prediction_and_one_without_it_is_an_eps_model():
    from ddpm.evaluate.model_file import load_model
    from ddpm.model.unet import UNet

    weights = UNet(TINY_MODEL).state_dict()
    config = {"model": dataclasses.asdict(TINY_MODEL), "image_size": 16,
              "diffusion": {"steps": 20, "schedule": "linear", "beta_start": 1e-4,
                            "beta_end": 0.02}}  # as every model file before v-prediction
    _, diffusion, _ = load_model({"config": config, "ema": weights})
    assert diffusion.prediction == "eps"
    config["diffusion"]["prediction"] = "v"
    _, diffusion, _ = load_model({"config": config, "ema": weights})
    assert diffusion.prediction == "v"

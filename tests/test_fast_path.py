"""The GPU fast path's pieces, checked on the CPU: bf16 autocast and torch.compile."""

import numpy as np
import torch

from ddpm.config import DiffusionConfig, ModelConfig, TrainConfig
from ddpm.training import autocast_for, train
from ddpm.unet import UNet

MODEL = ModelConfig(channels=(32, 64), attention=(False, True), blocks_per_level=1, dropout=0.0)


def test_bf16_training_follows_the_fp32_loss_curve():
    """Tolerance: the mean loss of each 30-step window within 10 % of fp32's."""
    # Smooth pictures (4x4 colour fields, upsampled): structure a model learns quickly.
    coarse = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (24, 3, 4, 4))).float()
    images = torch.nn.functional.interpolate(coarse, size=16, mode="bilinear").round().to(torch.uint8)
    curves = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(epochs=40, batch_size=8, lr=1e-3, warmup_epochs=1, seed=5, device="cpu",
                          log_every=1, strip_every=0, compile="off", precision=precision)
        state = train(images, DiffusionConfig(steps=50), MODEL, cfg, device=torch.device("cpu"))
        curves[precision] = np.array([row["loss"] for row in state.history])
    fp32, bf16 = (c.reshape(-1, 30).mean(1) for c in (curves["fp32"], curves["bf16"]))
    assert len(curves["fp32"]) == 120
    assert fp32[-1] < 0.7 * fp32[0]  # it learned something
    print("fp32", fp32.round(4), "bf16", bf16.round(4))
    assert np.all(np.abs(bf16 - fp32) < 0.10 * fp32), (fp32, bf16)


def test_bf16_autocast_is_used_only_where_asked():
    cpu = torch.device("cpu")
    model = UNet(MODEL)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with autocast_for(cpu, "auto"):
        assert model(x, t).dtype == torch.float32  # auto = fp32 on CPU
    with autocast_for(cpu, "bf16"):
        assert model(x, t).dtype == torch.bfloat16


def test_compiled_and_eager_models_agree():
    torch.manual_seed(0)
    model = UNet(MODEL).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 40])
    with torch.no_grad():
        eager = model(x, t)
        compiled = torch.compile(model)(x, t)
    assert torch.allclose(eager, compiled, atol=1e-4, rtol=1e-4)


def test_a_model_that_cannot_compile_runs_eager_and_later_errors_surface(monkeypatch):
    import pytest

    from ddpm import training

    calls = {"n": 0}

    def broken_compile(model):
        def run(*args):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("no C++ compiler")
            return model(*args)
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = UNet(MODEL).eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([1])
    forward = training.maybe_compile(model, "on", torch.device("cpu"))
    with pytest.warns(UserWarning, match="running eager"):
        assert torch.equal(forward(x, t), model(x, t))
    assert torch.equal(forward(x, t), model(x, t)) and calls["n"] == 1  # stays eager

    def flaky_compile(model):
        def run(*args):
            calls["n"] += 1
            if calls["n"] > 2:
                raise RuntimeError("CUDA out of memory")
            return model(*args)
        return run

    monkeypatch.setattr(torch, "compile", flaky_compile)
    forward = training.maybe_compile(model, "on", torch.device("cpu"))
    forward(x, t)  # the first call compiles fine
    with pytest.raises(RuntimeError, match="out of memory"):
        forward(x, t)

"""The GPU fast path's pieces, checked on the CPU: bf16 autocast, channels-last and
torch.compile, and the train stage with all of them on."""

import dataclasses
import json

import numpy as np
import torch

from conftest import TINY, run_stage, write_params, write_processed, TINY_MODEL
from ddpm.config import DiffusionConfig, TrainConfig
from ddpm.train.fastpath import autocast_for, maybe_compile
from ddpm.train.step import build_state
from ddpm.train.loop import train
from ddpm.model.unet import UNet

MODEL = TINY_MODEL
ONE_LEVEL = {"channels": [32], "attention": [True], "blocks_per_level": 1, "dropout": 0.0}


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

    from ddpm.train import fastpath

    calls = {"n": 0}

    def broken_compile(model, mode=None, dynamic=None):
        def run(*args):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("no C++ compiler")
            return model(*args)
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = UNet(MODEL).eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([1])
    forward = fastpath.maybe_compile(model, "on", torch.device("cpu"))
    with pytest.warns(UserWarning, match="running eager"):
        assert torch.equal(forward(x, t), model(x, t))
    assert torch.equal(forward(x, t), model(x, t)) and calls["n"] == 1  # stays eager

    def flaky_compile(model, mode=None, dynamic=None):
        def run(*args):
            calls["n"] += 1
            if calls["n"] > 2:
                raise RuntimeError("CUDA out of memory")
            return model(*args)
        return run

    monkeypatch.setattr(torch, "compile", flaky_compile)
    forward = fastpath.maybe_compile(model, "on", torch.device("cpu"))
    forward(x, t)  # the first call compiles fine
    with pytest.raises(RuntimeError, match="out of memory"):
        forward(x, t)


def test_compile_mode_reaches_torch_compile(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile",
                        lambda model, mode=None, dynamic=None: seen.append((mode, dynamic)) or model)
    model, cpu = UNet(MODEL), torch.device("cpu")
    maybe_compile(model, "on", cpu, "reduce-overhead")
    maybe_compile(model, "on", cpu)
    # None: torch.compile's default mode; shapes are static (one batch size per compile)
    assert seen == [("reduce-overhead", False), (None, False)]
    assert maybe_compile(model, "auto", cpu, "reduce-overhead") is model  # auto: CUDA only


def _smooth_images(n: int, size: int = 16) -> torch.Tensor:
    coarse = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 3, 4, 4))).float()
    return torch.nn.functional.interpolate(coarse, size=size, mode="bilinear").round().to(torch.uint8)


def test_channels_last_trains_the_same_weights_and_resumes_across_layouts():
    cpu = torch.device("cpu")
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, warmup_epochs=0, seed=3, device="cpu",
                      log_every=1, strip_every=0, compile="off", precision="fp32")
    initial = build_state(MODEL, cfg, cpu).model.state_dict()
    runs = {mode: train(_smooth_images(8), DiffusionConfig(steps=40), MODEL,
                        dataclasses.replace(cfg, channels_last=mode), device=cpu)
            for mode in ("off", "on")}
    assert runs["on"].model.stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert runs["off"].model.stem.weight.is_contiguous()
    off, on = runs["off"].model.state_dict(), runs["on"].model.state_dict()

    def mean_abs(diffs):
        return float(sum(d.abs().sum() for d in diffs) / sum(d.numel() for d in diffs))

    # Rounding differs (other conv kernels); Adam amplifies it on near-zero gradients.
    # Measured: mean |w_on - w_off| 6.8e-7 against a mean training move of 1.6e-3.
    moved = mean_abs([off[k] - initial[k] for k in off])
    assert mean_abs([on[k] - off[k] for k in off]) < 1e-3 * moved

    # A checkpoint written contiguous, resumed channels-last: Adam's moments take each
    # parameter's layout (fused Adam pairs elements by memory order, not by index).
    resumed = build_state(MODEL, dataclasses.replace(cfg, channels_last="on"), cpu)
    resumed.load_state_dict(runs["off"].state_dict())
    saved = runs["off"].optimizer.state_dict()["state"]
    mismatched = 0
    for i, param in enumerate(resumed.model.parameters()):
        if i not in saved:  # the unused attention norms (model.attention_norm: false)
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            moment = resumed.optimizer.state[param][key]
            assert moment.stride() == param.stride(), key
            assert torch.equal(moment, saved[i][key])
            mismatched += saved[i][key].stride() != param.stride()
    assert mismatched  # the case was exercised: some saved moments had the other layout


def test_train_stage_with_every_fast_path_switch_on_writes_the_same_outputs(tmp_path):
    """On a CPU: bf16 autocast, channels-last and torch.compile (where a compiler exists)."""
    data = write_processed(tmp_path / "data", _smooth_images(32).numpy())
    outputs = {}
    for name, switches in (("plain", {"precision": "fp32", "compile": "off", "channels_last": "off"}),
                           ("fast", {"precision": "bf16", "compile": "on", "channels_last": "on"})):
        work = tmp_path / name
        work.mkdir()
        # One level (no down/upsampling) compiles in 2/3 of TINY's time; the numerics of
        # a compiled TINY are test_compiled_and_eager_models_agree's.
        write_params(work / "params.yaml", {**TINY, "model": ONE_LEVEL, "train": {
            "epochs": 2, "batch_size": 8, "device": "cpu", "log_every": 2, "strip_every": 1,
            "warmup_epochs": 0, "lr": 1e-3, **switches}, "mlflow": {"enabled": False}})
        done = run_stage("train", "--data", str(data), cwd=work, timeout=600)
        assert "running eager" not in done.stderr  # it compiled (this machine has a compiler)
        files = sorted(str(p.relative_to(work)) for p in work.rglob("*") if p.is_file())
        report = json.loads((work / "reports/train.json").read_text())
        outputs[name] = (files, report)
    (plain_files, plain), (fast_files, fast) = outputs["plain"], outputs["fast"]
    assert plain_files == fast_files and "models/model.pt" in fast_files
    assert fast["steps"] == plain["steps"] == 8
    assert abs(fast["final_loss"] - plain["final_loss"]) < 0.05 * plain["final_loss"]


def test_strips_wrap_the_ema_model_once_and_follow_its_updates(tmp_path):
    from ddpm.train.callbacks import Strips, reverse_strip
    from ddpm.model.diffusion import make_schedule
    from ddpm.train.fastpath import denoiser

    cpu, diffusion = torch.device("cpu"), DiffusionConfig(steps=40)
    schedule = make_schedule(diffusion)
    wrapped = []

    def fast(model):
        wrapped.append(model)
        return denoiser(model, cpu, precision="bf16", compile="off", diffusion=diffusion)

    cfg = TrainConfig(epochs=3, batch_size=4, lr=1e-3, warmup_epochs=0, seed=3, device="cpu",
                      log_every=1, compile="off", precision="fp32")
    strips = Strips(tmp_path, schedule, 16, seed=0, every=1, epochs=3, device=cpu, fast=fast)
    state = train(_smooth_images(8), diffusion, MODEL, cfg, device=cpu, callbacks=(strips,))
    assert len(wrapped) == 1 and wrapped[0] is state.ema.model
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"reverse_epoch000{e}.png" for e in (1, 2, 3)]

    # The wrapper made at epoch 1 draws the EMA weights of epoch 3, as the model does.
    kept, fresh = (torch.stack(reverse_strip(d, schedule, 16, 0, cpu)).float()
                   for d in (strips.denoise, denoiser(state.ema.model, cpu, "bf16", "off",
                                                              diffusion=diffusion)))
    assert torch.equal(kept, fresh)
    fp32 = torch.stack(reverse_strip(state.ema.model, schedule, 16, 0, cpu)).float()
    # bf16 against fp32 after 40 steps: measured mean 0.05, max 1 uint8 level.
    assert (kept - fp32).abs().mean() < 0.5 and (kept - fp32).abs().max() <= 4


def test_strips_replay_cuda_graphs_on_cuda_and_follow_train_compile_mode_elsewhere(monkeypatch):
    """Decided without running: torch.compile is lazy, so no CUDA call is made here."""
    from ddpm.train.fastpath import strip_denoiser

    seen = []
    monkeypatch.setattr(torch, "compile",
                        lambda model, mode=None, dynamic=None: seen.append(mode) or model)
    cfg = TrainConfig(compile="on", compile_mode="max-autotune", channels_last="off",
                      precision="fp32")  # bf16 autocast for "cuda" would warn on a CPU host
    model = UNet(MODEL).eval()
    diffusion = DiffusionConfig(steps=20)
    strip_denoiser(model, torch.device("cuda"), cfg, diffusion)
    strip_denoiser(model, torch.device("cpu"), cfg, diffusion)
    strip_denoiser(model, torch.device("cuda"), dataclasses.replace(cfg, compile="off"), diffusion)
    assert seen == ["reduce-overhead", "max-autotune"]  # compile off: nothing compiled

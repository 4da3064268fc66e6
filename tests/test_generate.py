"""Sampling: per-image seeds, figures, and the `ddpm sample` / `ddpm fid` commands."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, TINY_DIFFUSION

from ddpm.train import checkpoint
from ddpm.config import GenerateConfig
from ddpm.model.diffusion import make_schedule
from ddpm.train.fastpath import denoiser
from ddpm.evaluate.generate import generate_samples, write_figures
from ddpm.model.unet import UNet

MODEL = TINY_MODEL
DIFFUSION = TINY_DIFFUSION


def tiny_model():
    torch.manual_seed(0)
    return UNet(MODEL).eval()


def test_samples_do_not_depend_on_batch_size_or_position():
    model, schedule, device = tiny_model(), make_schedule(DIFFUSION), torch.device("cpu")
    denoise = denoiser(model, device, precision="fp32", diffusion=DIFFUSION)
    for sampler, steps in (("ddpm", 20), ("ddim", 5)):
        cfg = GenerateConfig(num_samples=5, sampler=sampler, steps=steps, eta=0.5, seed=11)
        one = generate_samples(denoise, schedule, GenerateConfig(**{**cfg.__dict__, "batch_size": 5}), 16, device)
        two = generate_samples(denoise, schedule, GenerateConfig(**{**cfg.__dict__, "batch_size": 2}), 16, device)
        assert np.abs(one.astype(int) - two.astype(int)).max() <= 1, sampler
        tail = generate_samples(denoise, schedule, cfg, 16, device, count=2, start=3)
        assert np.abs(one[3:].astype(int) - tail.astype(int)).max() <= 1
        other = generate_samples(denoise, schedule, GenerateConfig(**{**cfg.__dict__, "seed": 12}), 16, device)
        assert np.abs(one.astype(int) - other.astype(int)).mean() > 5


def test_only_the_first_batch_size_runs_compiled(monkeypatch):
    """Figures (a few images) and a last partial batch must not trigger recompiles."""
    compiled_batches = []

    def fake_compile(model, mode=None, dynamic=None):
        def run(x, t):
            compiled_batches.append(x.shape[0])
            return model(x, t)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    model, schedule, device = tiny_model(), make_schedule(DIFFUSION), torch.device("cpu")
    denoise = denoiser(model, device, precision="fp32", compile="on", diffusion=DIFFUSION)
    cfg = GenerateConfig(num_samples=5, sampler="ddim", steps=3, batch_size=2, seed=1)
    samples = generate_samples(denoise, schedule, cfg, 16, device)
    assert compiled_batches == [2] * 6  # two full batches of 3 steps; the last image eager
    eager = generate_samples(denoiser(model, device, precision="fp32", compile="off",
                                    diffusion=DIFFUSION),
                             schedule, cfg, 16, device)
    assert np.array_equal(samples, eager)


def test_figures_are_written(tmp_path):
    model, schedule, device = tiny_model(), make_schedule(DIFFUSION), torch.device("cpu")
    cfg = GenerateConfig(num_samples=4, sampler="ddim", steps=10, grid_size=4)
    denoise = denoiser(model, device, diffusion=DIFFUSION)
    samples = generate_samples(denoise, schedule, cfg, 16, device)
    real = np.random.default_rng(0).integers(0, 256, (6, 3, 16, 16), dtype=np.uint8)
    written = write_figures(denoise, schedule, cfg, samples, real, tmp_path, device)
    assert sorted(p.name for p in written) == ["forward.png", "reverse.gif", "reverse.png", "samples.png"]
    from PIL import Image
    strip = Image.open(tmp_path / "reverse.png")
    forward = Image.open(tmp_path / "forward.png")
    assert strip.width > 8 * 16 and forward.width > 6 * 16  # 9 and 7 frames
    assert Image.open(tmp_path / "reverse.gif").n_frames == 11  # x_T + 10 DDIM steps


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "dpmpp_2m_sde"])
def test_sample_command_writes_the_pngs_generate_samples_gives(tmp_path, sampler):
    from PIL import Image

    model = tiny_model()
    payload = {"config": {"model": {**MODEL.__dict__, "channels": [32, 64], "attention": [False, True]},
                          "diffusion": DIFFUSION.__dict__, "image_size": 16},
               "model": model.state_dict(), "ema": model.state_dict()}
    checkpoint.save(tmp_path / "model.pt", payload)
    done = subprocess.run([sys.executable, "-m", "ddpm.tools.cli", "sample", "--model",
                           str(tmp_path / "model.pt"), "-n", "3", "--out", str(tmp_path / "out"),
                           "--steps", "4", "--device", "cpu", "--sampler", sampler, "--seed", "7"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    files = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in files] == ["000000.png", "000001.png", "000002.png"]
    assert f"3 samples ({sampler}, 4 steps)" in done.stdout
    eta = 1.0 if sampler == "dpmpp_2m_sde" else 0.0  # the command's default for each
    cfg = GenerateConfig(num_samples=3, sampler=sampler, steps=4, eta=eta, seed=7)
    expected = generate_samples(denoiser(model.eval(), torch.device("cpu"), diffusion=DIFFUSION),
                                make_schedule(DIFFUSION), cfg, 16, torch.device("cpu"))
    for file, image in zip(files, expected):
        assert np.array_equal(np.asarray(Image.open(file)), image.transpose(1, 2, 0))


def test_small_images_are_shown_enlarged_pixel_for_pixel(tmp_path):
    from PIL import Image

    from ddpm.evaluate.figures import save_grid, save_strip

    tiny = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))
    save_grid(tiny, tmp_path / "grid.png")
    save_strip([tiny[:2], tiny[2:]], tmp_path / "strip.png")
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 + 2 * 66, 2 + 2 * 66, 3)  # 2 x 2 tiles of 64 px, 2 px gutters
    tile = grid[2:66, 2:66]
    assert np.array_equal(tile[::2, ::2], tiny[0].permute(1, 2, 0).numpy())  # nearest
    assert np.array_equal(tile[1::2, 1::2], tile[::2, ::2])
    assert Image.open(tmp_path / "strip.png").size == (2 + 2 * 66, 2 + 2 * 66)
    big = torch.zeros(1, 3, 80, 80, dtype=torch.uint8)
    save_grid(big, tmp_path / "big.png")
    assert Image.open(tmp_path / "big.png").size == (84, 84)  # not enlarged

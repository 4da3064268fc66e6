#!/usr/bin/env python3
"""FID of the few-step samplers on each timestep grid, for one trained model: the measurement
behind `model.samplers.DPMPP_SPACING` (docs/samplers.md).

    python3 scripts/grid_fid.py MODEL.pt STATS.npz [--samples 256] [--steps 10 20 50]
        [--spacings time lambda time_no_zero lambda_no_zero]

Every setting samples the same noise maps (image i from seed (--seed, i)) from the EMA
weights, clipped as the generate stage's default, and is scored with `fid.scores`
against the reference statistics. DDIM (eta 0 and 1) has one grid, its own; the
DPM-Solver++ samplers run on each grid of --spacings. Prints one row per setting.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddpm.config import GenerateConfig, default_eta  # noqa: E402
from ddpm.evaluate import fid, model_file  # noqa: E402
from ddpm.evaluate.generate import generate_samples  # noqa: E402
from ddpm.model import samplers  # noqa: E402
from ddpm.model.diffusion import make_schedule  # noqa: E402
from ddpm.train.fastpath import denoiser  # noqa: E402


@contextlib.contextmanager
def on_grid(name: str, spacing: str):
    """The sampler `name` on the grid `spacing` while inside (generate_samples looks samplers
    up by name)."""
    original = samplers.SAMPLERS[name]
    samplers.SAMPLERS[name] = lambda *a, **k: original(*a, spacing=spacing, **k)
    try:
        yield
    finally:
        samplers.SAMPLERS[name] = original


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("stats", type=Path)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--spacings", nargs="+", default=list(samplers.SPACINGS),
                   choices=list(samplers.SPACINGS))
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    device = torch.device("cpu")
    model, diffusion, size = model_file.load_model(model_file.load(args.model), "ema", device)
    schedule, denoise = make_schedule(diffusion), denoiser(model, device, diffusion=diffusion)
    reference, network = fid.load_stats(args.stats), fid.load_inception(device)
    settings = [("ddim", 0.0, None), ("ddim", 1.0, None)] + [
        (name, default_eta(name), spacing) for name in ("dpmpp_2m", "dpmpp_2m_sde")
        for spacing in args.spacings]
    print(f"{diffusion.schedule} T = {diffusion.steps}, {diffusion.prediction} model; "
          f"{args.samples} samples against {int(reference['count'])} real; default grid "
          f"{samplers.DPMPP_SPACING}")
    print(f"{'sampler':>12} {'eta':>4} {'grid':>15} {'steps':>5} {'FID':>8} {'KID':>8} {'s':>6}")
    for name, eta, spacing in settings:
        for steps in args.steps:
            cfg = GenerateConfig(num_samples=args.samples, sampler=name, steps=steps, eta=eta,
                                 batch_size=args.samples, seed=args.seed)
            with on_grid(name, spacing) if spacing else contextlib.nullcontext():
                start = time.perf_counter()
                images = generate_samples(denoise, schedule, cfg, size, device)
                seconds = time.perf_counter() - start
            stats = fid.feature_stats(fid.extract_features(images, network))
            got = fid.scores(stats, reference, kid_subsets=50,
                             kid_subset_size=min(100, args.samples))
            print(f"{name:>12} {eta:4g} {spacing or 'ddim':>15} {steps:>5} {got['fid']:8.2f} "
                  f"{got['kid']:8.4f} {seconds:6.1f}", flush=True)


if __name__ == "__main__":
    main()

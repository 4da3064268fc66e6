#!/usr/bin/env python3
"""FID of the DPM-Solver++ samplers with their two timestep grids, for one trained model:
the measurement behind `model.samplers.DPMPP_SPACING`.

    python3 scripts/spacing_fid.py MODEL.pt STATS.npz [--samples 256] [--steps 10 20]

Every setting samples the same noise maps (image i from seed (--seed, i)) from the EMA
weights, clipped as the generate stage's default, and is scored with `fid.scores`
against the reference statistics. Prints one row per (sampler, spacing, steps).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddpm.evaluate import fid  # noqa: E402
from ddpm.evaluate.generate import generate_samples  # noqa: E402
from ddpm.config import GenerateConfig, default_eta  # noqa: E402
from ddpm.model import samplers  # noqa: E402
from ddpm.model.diffusion import make_schedule  # noqa: E402
from ddpm.evaluate import model_file  # noqa: E402
from ddpm.train.fastpath import denoiser  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("stats", type=Path)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20])
    p.add_argument("--samplers", nargs="+", default=["dpmpp_2m", "dpmpp_2m_sde"])
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    device = torch.device("cpu")
    model, diffusion, size = model_file.load_model(model_file.load(args.model), "ema", device)
    schedule, denoise = make_schedule(diffusion), denoiser(model, device)
    reference, network = fid.load_stats(args.stats), fid.load_inception(device)
    print(f"{'sampler':>14} {'spacing':>8} {'steps':>5} {'FID':>8} {'KID':>8} {'s':>6}  "
          f"({args.samples} samples vs {int(reference['count'])} real)")
    for name in args.samplers:
        for spacing in samplers.SPACINGS:
            for steps in args.steps:
                cfg = GenerateConfig(num_samples=args.samples, sampler=name, steps=steps,
                                     eta=default_eta(name), batch_size=args.samples,
                                     seed=args.seed)
                original = samplers.SAMPLERS[name]
                samplers.SAMPLERS[name] = lambda *a, _f=original, **k: _f(*a, spacing=spacing, **k)
                try:
                    start = time.perf_counter()
                    images = generate_samples(denoise, schedule, cfg, size, device)
                    seconds = time.perf_counter() - start
                finally:
                    samplers.SAMPLERS[name] = original
                stats = fid.feature_stats(fid.extract_features(images, network))
                got = fid.scores(stats, reference, kid_subsets=50,
                                 kid_subset_size=min(100, args.samples))
                print(f"{name:>14} {spacing:>8} {steps:>5} {got['fid']:8.2f} {got['kid']:8.4f} "
                      f"{seconds:6.1f}", flush=True)


if __name__ == "__main__":
    main()

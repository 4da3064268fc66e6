#!/usr/bin/env python3
"""How close each DPM-Solver++ grid ends to the exact probability-flow ODE solution on
closed-form Gaussian data, against DDIM and diffusers' default grid: the toy table of
docs/samplers.md, on the data of tests/test_dpm_solver.py (every pixel of x0 ~ N(0.3, 0.5^2),
25 starting values x_T in [-3, 3]; exact eps, so only the solver errs).

    python3 scripts/grid_toy.py [--steps 10 20 50]

Prints the maximum end-point error per schedule, grid and number of model evaluations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from ddpm.config import DiffusionConfig  # noqa: E402
from ddpm.model.diffusion import make_schedule  # noqa: E402
from ddpm.model.samplers import DPMPP_SPACING, SPACINGS, sample_ddim, sample_dpmpp_2m  # noqa: E402
from test_dpm_solver import diffusers_default_grid, end_error  # noqa: E402

SCHEDULES = [("linear", 512), ("cosine", 64), ("cosine", 512), ("linear", 1000)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    args = p.parse_args()
    SPACINGS["diffusers"] = diffusers_default_grid
    columns = ["ddim", *SPACINGS]
    print(f"max |end - exact end| at {' / '.join(map(str, args.steps))} evaluations "
          f"(default grid: {DPMPP_SPACING})")
    print(f"{'schedule':>12} " + " ".join(f"{c:>24}" for c in columns))
    for name, T in SCHEDULES:
        schedule = make_schedule(DiffusionConfig(steps=T, schedule=name))
        cells = []
        for column in columns:
            errors = [end_error(sample_ddim, schedule, n) if column == "ddim" else
                      end_error(sample_dpmpp_2m, schedule, n, spacing=column)
                      for n in args.steps]
            cells.append(" / ".join(f"{e:.2g}" for e in errors))
        print(f"{f'{name} {T}':>12} " + " ".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    main()

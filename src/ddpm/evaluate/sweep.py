"""FID against model evaluations: what each sampler setting buys, per trained model.

For every point of `sweep.points` (sampler, steps, eta) the same `sweep.num_samples`
noise maps (image i from seed (sweep.seed, i)) are sampled from the EMA model and
scored against the reference statistics with `fid.scores`, the pipeline's one FID. A
row per point: its curve (the sampler, with eta when not the sampler's default),
model evaluations (ddpm: all T), the seconds and images/s of the sampling alone,
FID and KID. The sweep stage writes the rows to reports/sweep.csv, a DVC plot of FID
against model evaluations, one line per curve.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import GenerateConfig, SweepConfig, SweepPoint, default_eta
from ..model.diffusion import Schedule
from ..model.samplers import Denoiser, sampler_steps
from . import fid
from .generate import generate_samples

SWEEP_COLUMNS = ("curve", "sampler", "steps", "eta", "evaluations", "seconds", "images_per_s",
                 "fid", "kid", "samples")
KID_SUBSETS = 100


def curve(point: SweepPoint) -> str:
    """The line a point belongs to: its sampler, with eta when not the sampler's default
    (ddpm takes none)."""
    if point.sampler == "ddpm" or point.noise == default_eta(point.sampler):
        return point.sampler
    return f"{point.sampler}_eta{point.noise:g}"


def point_config(point: SweepPoint, cfg: SweepConfig, schedule: Schedule) -> GenerateConfig:
    """The generate settings of one point; every field is set here (variance: the
    posterior's, the generate stage's default)."""
    return GenerateConfig(num_samples=cfg.num_samples, sampler=point.sampler,
                          steps=sampler_steps(point.sampler, schedule, point.steps),
                          eta=point.noise, batch_size=min(cfg.batch_size, cfg.num_samples),
                          seed=cfg.seed, clip=cfg.clip, variance="posterior")


def run_sweep(denoise: Denoiser, schedule: Schedule, cfg: SweepConfig, image_size: int,
              device: torch.device, reference: dict[str, Any], network: torch.nn.Module,
              feature_batch: int = 100,
              on_row: Optional[Callable[[dict[str, Any]], None]] = None) -> list[dict[str, Any]]:
    """One row per point, in order; `on_row(row)` as each is done."""
    rows = []
    for point in cfg.points:
        settings = point_config(point, cfg, schedule)
        started = time.perf_counter()
        images = generate_samples(denoise, schedule, settings, image_size, device)  # synced
        seconds = time.perf_counter() - started
        stats = fid.feature_stats(fid.extract_features(images, network, batch_size=feature_batch))
        scored = fid.scores(stats, reference, kid=True, kid_subsets=KID_SUBSETS,
                            kid_subset_size=min(1000, len(images), int(reference["count"])))
        row = {"curve": curve(point), "sampler": point.sampler, "steps": settings.steps,
               "eta": point.noise, "evaluations": settings.steps, "seconds": seconds,
               "images_per_s": len(images) / seconds, "fid": float(scored["fid"]),
               "kid": float(scored["kid"]), "samples": int(scored["count_a"])}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def sweep_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SWEEP_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def read_sweep_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(Path(path).read_text().splitlines()))

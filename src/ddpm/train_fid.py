"""FID while training: a curve per run, and the weights that scored best.

Every `train.fid_every` epochs (and at the last; 0 = never) `TrainFid` samples
`train.fid_samples` images from the EMA model with DDIM over `train.fid_steps`
steps, eta 0, through the fast-path denoiser. Image i always starts from the
noise of seed (train.seed, i), so two evaluations differ only by the weights:
the curve is not sampling noise. They are scored against the reference
statistics (the reference stage's) with `fid.scores`, the pipeline's one FID.

The history lives in the training state (`state.extra["fid"]`), so it survives a
resume; `reports/train_fid.csv` is rewritten from it. `models/best.pt` holds
the EMA (and raw) weights of the best FID so far, in models/model.pt's format.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from . import atomic, checkpoint, fid
from .callbacks import AtCadence
from .config import GenerateConfig
from .diffusion import Schedule
from .generate import generate_samples
from .samplers import Denoiser
from .step import TrainState
from .training import EpochSummary, final_weights

FID_COLUMNS = ("epoch", "step", "seconds", "fid", "kid", "samples")
SAMPLE_BATCH = 500  # images per sampling batch (the samples do not depend on it)
KID_SUBSETS = 100  # KID as the evaluate stage computes it by default, on fewer images


class FidEvaluator:
    """Sample `samples` images from a model and score them against `reference` (statistics
    as `fid.load_stats` gives them). `fast(model)` wraps the EMA model once."""

    def __init__(self, reference: dict[str, Any], samples: int, steps: int, schedule: Schedule,
                 image_size: int, seed: int, device: torch.device,
                 fast: Callable[[torch.nn.Module], Denoiser],
                 network: Optional[torch.nn.Module] = None):
        self.reference, self.schedule, self.size, self.device = reference, schedule, image_size, device
        self.cfg = GenerateConfig(num_samples=samples, sampler="ddim",
                                  steps=min(steps, schedule.T), eta=0.0,
                                  batch_size=min(samples, SAMPLE_BATCH), seed=seed)
        self.fast, self.network = fast, network
        self.denoise: Optional[Denoiser] = None

    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:
        if self.denoise is None:  # the EMA model is updated in place: wrapped once
            self.denoise = self.fast(model)
        if self.network is None:
            self.network = fid.load_inception(self.device)
        images = generate_samples(self.denoise, self.schedule, self.cfg, self.size, self.device)
        stats = fid.feature_stats(fid.extract_features(images, self.network,
                                                       batch_size=self.cfg.batch_size))
        subset = min(1000, len(images), int(self.reference["count"]))
        return fid.scores(stats, self.reference, kid=True, kid_subsets=KID_SUBSETS,
                          kid_subset_size=subset)


def best_of(history: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The evaluation with the lowest FID; the earliest of equal ones."""
    return min(history, key=lambda row: row["fid"]) if history else None


def write_fid_csv(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FID_COLUMNS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic.write_text(path, buf.getvalue())


class TrainFid(AtCadence):
    """The training callback: evaluate at the cadence, keep the history and the best weights.

    `score(ema_model) -> {"fid", "kid", "count_a", ...}` is a `FidEvaluator` in the train
    stage. `on_scored(row, best)` is told of each evaluation (the tracker, the console).
    """

    def __init__(self, score: Callable[[torch.nn.Module], dict[str, Any]], every: int,
                 epochs: int, csv_path: Path, best_path: Path, run_config: dict[str, Any],
                 image_size: int,
                 on_scored: Optional[Callable[[dict[str, Any], dict[str, Any]], None]] = None):
        self.score, self.every, self.epochs = score, every, epochs
        self.csv_path, self.best_path = csv_path, best_path
        self.run_config, self.image_size, self.on_scored = run_config, image_size, on_scored
        self.saver = checkpoint.BackgroundSaver()

    def run(self, state: TrainState, summary: EpochSummary) -> None:
        started = time.perf_counter()
        result = self.score(state.ema.model)
        row = {"epoch": summary.epoch, "step": summary.step,
               "seconds": sum(e["seconds"] for e in state.epochs_done),  # training time so far
               "fid": float(result["fid"]), "kid": float(result["kid"]),
               "samples": int(result["count_a"]),
               "eval_seconds": time.perf_counter() - started}
        history = state.extra.setdefault("fid", [])
        history.append(row)
        best = best_of(history)
        if best is row:
            self.saver.save(self.best_path, best_weights(state, self.run_config,
                                                         self.image_size, row))
        write_fid_csv(self.csv_path, history)
        if self.on_scored is not None:
            self.on_scored(row, best)

    def close(self) -> None:
        self.saver.wait()


def best_weights(state: TrainState, run_config: dict[str, Any], image_size: int,
                 row: Optional[dict[str, Any]]) -> dict[str, Any]:
    """models/best.pt: the weights of now, in model.pt's format, with why they were kept."""
    selected = ({"by": "in-training FID", **{k: row[k] for k in FID_COLUMNS}} if row else
                {"by": "the last epoch: no in-training FID (train.fid_every is 0)"})
    return {**final_weights(state, run_config, image_size), "selected": selected}


def check_reference(reference: dict[str, Any], dataset_sha256: str, path: Path) -> None:
    """The statistics must be of the data being trained on."""
    made_from = reference["meta"].get("dataset_sha256")
    if made_from != dataset_sha256:
        raise fid.FidInputError(f"{path} holds the statistics of another data set "
                                f"({made_from}, not {dataset_sha256}); rerun the reference "
                                f"stage (dvc repro reference)")


def summary_fields(history: list[dict[str, Any]]) -> dict[str, Any]:
    """What reports/train.json says of the in-training FID."""
    best = best_of(history)
    if best is None:
        return {"best_fid": None, "best_epoch": None, "fid_samples": None}
    return {"best_fid": best["fid"], "best_epoch": best["epoch"], "best_kid": best["kid"],
            "final_fid": history[-1]["fid"], "fid_samples": best["samples"],
            "fid_evaluations": len(history),
            "fid_eval_seconds": float(np.sum([r["eval_seconds"] for r in history]))}

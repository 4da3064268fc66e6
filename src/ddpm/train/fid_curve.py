"""FID while training: a curve per run, and the weights that scored best.

Every `train.fid_every` epochs (and at the last; 0 = never) `TrainFid` samples
`train.fid_samples` images from the EMA model with `train.fid_sampler` over
`train.fid_steps` model evaluations with `train.fid_eta` (by default the generate
stage's sampling, so the curve and the final score are one measurement), through
the fast-path denoiser. Image i always starts from the
noise of seed (train.seed, i), so two evaluations differ only by the weights:
the curve is not sampling noise. They are scored against the reference
statistics (the reference stage's) with `fid.scores`, the pipeline's one FID,
features taken `evaluate.batch_size` images at a time.

The history lives in the training state (`state.extra["fid"]`, every row with
the settings it was scored with), so it survives a resume; `reports/train_fid.csv`
is rewritten from it. The best is chosen among evaluations made with the same
settings (sampler, steps, eta, sample count) only: a resume with other
`train.fid_*` settings keeps the earlier rows in the history and the CSV, and
starts choosing the best afresh (`continue_best`).

One commit point for the best weights: a new best is written to
`best-epochNNNN.pt` beside the checkpoint, by the writer that then writes the
checkpoint naming it (`state.extra["fid_best"]`), so a checkpoint on disk
always names a best file on disk; files no checkpoint names any more are
deleted once the next checkpoint is in place (`prune_best`), and after a kill by
the resume. `models/best.pt` is the named file, published when the stage ends.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .. import atomic
from . import checkpoint
from ..evaluate import fid
from .callbacks import AtCadence
from ..config import GenerateConfig
from ..model.diffusion import Schedule
from ..evaluate.generate import generate_samples
from ..model.samplers import Denoiser, sampler_steps
from .step import TrainState
from .loop import EpochSummary, final_weights

FID_COLUMNS = ("epoch", "step", "seconds", "fid", "kid", "samples", "sampler", "steps", "eta")
SETTINGS = ("sampler", "steps", "eta", "samples")  # what makes two evaluations comparable
SAMPLE_BATCH = 500  # images per sampling batch (the samples do not depend on it)
KID_SUBSETS = 100  # KID as the evaluate stage computes it by default, on fewer images
BEST_PATTERN = "best-epoch*.pt"


class FidEvaluator:
    """Sample `samples` images from a model and score them against `reference` (statistics
    as `fid.load_stats` gives them). `fast(model)` wraps the EMA model once; the Inception
    features are taken `feature_batch` images at a time (`evaluate.batch_size`)."""

    def __init__(self, reference: dict[str, Any], samples: int, steps: int, schedule: Schedule,
                 image_size: int, seed: int, device: torch.device,
                 fast: Callable[[torch.nn.Module], Denoiser],
                 network: Optional[torch.nn.Module] = None, feature_batch: int = 100,
                 sampler: str = "ddim", eta: float = 0.0):
        self.reference, self.schedule, self.size, self.device = reference, schedule, image_size, device
        # Every sampling setting is written here: none comes from GenerateConfig's defaults.
        # clip and variance are the generate stage's defaults.
        self.cfg = GenerateConfig(num_samples=samples, sampler=sampler,
                                  steps=sampler_steps(sampler, schedule, steps), eta=eta,
                                  batch_size=min(samples, SAMPLE_BATCH), seed=seed, clip=True,
                                  variance="posterior")
        self.fast, self.network, self.feature_batch = fast, network, feature_batch
        self.denoise: Optional[Denoiser] = None

    @property
    def settings(self) -> dict[str, Any]:
        """What a row of the history records of how it was scored (SETTINGS)."""
        return {"sampler": self.cfg.sampler, "steps": self.cfg.steps, "eta": self.cfg.eta,
                "samples": self.cfg.num_samples}

    def __call__(self, model: torch.nn.Module) -> dict[str, Any]:
        if self.denoise is None:  # the EMA model is updated in place: wrapped once
            self.denoise = self.fast(model)
        if self.network is None:
            self.network = fid.load_inception(self.device)
        images = generate_samples(self.denoise, self.schedule, self.cfg, self.size, self.device)
        stats = fid.feature_stats(fid.extract_features(images, self.network,
                                                       batch_size=self.feature_batch))
        subset = min(1000, len(images), int(self.reference["count"]))
        return fid.scores(stats, self.reference, kid=True, kid_subsets=KID_SUBSETS,
                          kid_subset_size=subset)


def same_settings(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(key) == b.get(key) for key in SETTINGS)


def continue_best(extra: dict[str, Any], settings: dict[str, Any]) -> Optional[str]:
    """On resume: keep the best so far only if it was scored with `settings`. Returns why
    it was dropped (for the console), or None."""
    best = extra.get("fid_best")
    if best is None or same_settings(best, settings):
        return None
    extra["fid_best"] = None
    was = ", ".join(f"{k} {best.get(k)}" for k in SETTINGS)
    now = ", ".join(f"{k} {settings[k]}" for k in SETTINGS)
    return (f"the in-training FID settings changed ({was} -> {now}): earlier rows stay in "
            f"the history; the best is chosen among evaluations with the new settings")


def best_file(folder: Path, epoch: int) -> Path:
    return Path(folder) / f"best-epoch{epoch:04d}.pt"


def named_best(extra: dict[str, Any], folder: Path) -> Optional[Path]:
    """The best-weights file a checkpoint's `extra` names, or None."""
    best = extra.get("fid_best")
    return best_file(folder, best["epoch"]) if best else None


def prune_best(folder: Path, keep: Optional[Path]) -> list[Path]:
    """Delete the best-weights files in `folder` other than `keep`; return them."""
    gone = [p for p in sorted(Path(folder).glob(BEST_PATTERN)) if p != keep]
    for path in gone:
        path.unlink(missing_ok=True)
    return gone


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
    stage (its `settings` go into each row). A new best is written to `best_file(folder,
    epoch)` by `saver`, which the checkpointer shares, so the file is on disk before the
    checkpoint that names it. `on_scored(row, best)` is told of each evaluation.
    """

    def __init__(self, score: Callable[[torch.nn.Module], dict[str, Any]], every: int,
                 epochs: int, csv_path: Path, folder: Path, run_config: dict[str, Any],
                 image_size: int, saver: Optional[checkpoint.BackgroundSaver] = None,
                 on_scored: Optional[Callable[[dict[str, Any], dict[str, Any]], None]] = None):
        self.score, self.every, self.epochs = score, every, epochs
        self.csv_path, self.folder = csv_path, folder
        self.run_config, self.image_size, self.on_scored = run_config, image_size, on_scored
        self.saver = saver or checkpoint.BackgroundSaver()
        self.settings = dict(getattr(score, "settings", {}))

    def run(self, state: TrainState, summary: EpochSummary) -> None:
        started = time.perf_counter()
        result = self.score(state.ema.model)
        row = {"epoch": summary.epoch, "step": summary.step,
               "seconds": sum(e["seconds"] for e in state.epochs_done),  # training time so far
               "fid": float(result["fid"]), "kid": float(result["kid"]),
               "samples": int(result["count_a"]), **self.settings,
               "eval_seconds": time.perf_counter() - started}
        state.extra.setdefault("fid", []).append(row)
        best = state.extra.get("fid_best")
        if best is None or row["fid"] < best["fid"]:  # the earliest of equal ones stays
            state.extra["fid_best"] = best = row
            self.saver.save(best_file(self.folder, row["epoch"]),
                            best_weights(state, self.run_config, self.image_size, row))
        write_fid_csv(self.csv_path, state.extra["fid"])
        if self.on_scored is not None:
            self.on_scored(row, best)

    def catch_up(self, state: TrainState) -> bool:
        """Score the last epoch if nothing scored with the current settings is the best:
        a finished run resumed with other train.fid_* settings trains no epoch. True if it
        scored (then a checkpoint should record it)."""
        if not (self.every and state.epochs_done) or state.extra.get("fid_best") is not None:
            return False
        self.run(state, EpochSummary(**state.epochs_done[-1]))
        return True

    def close(self) -> None:
        self.saver.wait()


def best_weights(state: TrainState, run_config: dict[str, Any], image_size: int,
                 row: Optional[dict[str, Any]]) -> dict[str, Any]:
    """models/best.pt: the weights of now, in model.pt's format, with why they were kept."""
    selected = ({"by": "in-training FID", **{k: row[k] for k in FID_COLUMNS if k in row}} if row else
                {"by": "the last epoch: no in-training FID (train.fid_every is 0)"})
    return {**final_weights(state, run_config, image_size), "selected": selected}


def check_reference(reference: dict[str, Any], dataset_sha256: str, path: Path) -> None:
    """The statistics must be of the data being trained on."""
    made_from = reference["meta"].get("dataset_sha256")
    if made_from != dataset_sha256:
        raise fid.FidInputError(f"{path} holds the statistics of another data set "
                                f"({made_from}, not {dataset_sha256}); rerun the reference "
                                f"stage (dvc repro reference)")


def summary_fields(extra: dict[str, Any]) -> dict[str, Any]:
    """What reports/train.json says of the in-training FID (`state.extra`)."""
    history, best = extra.get("fid", []), extra.get("fid_best")
    if best is None:
        return {"best_fid": None, "best_epoch": None, "fid_samples": None}
    return {"best_fid": best["fid"], "best_epoch": best["epoch"], "best_kid": best["kid"],
            "final_fid": history[-1]["fid"], "fid_samples": best["samples"],
            "fid_evaluations": len(history),
            "fid_eval_seconds": float(np.sum([r["eval_seconds"] for r in history]))}

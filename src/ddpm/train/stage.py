"""The train stage's work, behind one call (`run`) that `stages/train.py` makes.

    check the inputs and devices -> [train.nproc > 1: start that many workers, each
    re-running the stage] -> join the process group -> rank 0 tidies the outputs and
    reads the checkpoint -> resume it, or start fresh -> `loop.train` with rank
    0's callbacks (progress, loss CSV, strips, in-training FID, checkpoints, tracking)
    -> rank 0 writes models/model.pt, models/best.pt and the reports.

A checkpoint is resumed only when it was made by the same code (`lineage.code_digest`
of this stage's import closure), with the same model, diffusion, result-affecting
training settings and data (`loop.run_config`), and the best weights it names are
on disk; then its MLflow run continues. Otherwise the stage says what differs (the
files, the settings) and trains from scratch. One that cannot be read is moved aside,
with a message.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .. import atomic, lineage, stageutil
from . import checkpoint, distributed
from ..evaluate import model_file
from ..evaluate import fid
from .callbacks import (Checkpointer, EpochLog, LossCsv, Progress, Strips, TrackMetrics,
                              write_loss_csv)
from ..config import ConfigError, Params, flatten
from ..device import check_processes, resolve_device
from ..model.diffusion import make_schedule
from ..model.samplers import model_evaluations
from .fastpath import denoiser, strip_denoiser
from ..data.processed import load_processed
from ..tracking import (MAX_WORK, ParamConflictError, Tracker, run_tags, select,
                        training_dataset)
from .fid_curve import (FidEvaluator, TrainFid, best_weights, check_reference,
                              continue_best, named_best, prune_best, summary_fields,
                              write_fid_csv)
from .loop import EpochSummary, final_weights, run_config, steps_per_epoch, train
from .step import noise_device
from ..model.unet import UNet, count_parameters

TRAIN_SECTIONS = ("data", "preprocess", "diffusion", "model", "train")


@dataclass(frozen=True)
class TrainPaths:
    data: Path  # data/processed
    model: Path  # models/model.pt
    checkpoints: Path  # models/checkpoints (persisted, for resume)
    reports: Path  # reports/: train.json, train_loss.csv
    strips: Path  # reports/strips
    run_file: Path  # reports/mlflow_run.json
    reference: Path  # data/reference/stats.npz, for the in-training FID
    best: Path  # models/best.pt

    @property
    def checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def fid_csv(self) -> Path:
        return self.reports / "train_fid.csv"


def run(params: Params, paths: TrainPaths, *, script: str | Path, argv: list[str]) -> None:
    """The whole stage. With train.nproc > 1 (and not already a worker of torchrun or of
    this launcher) it starts that many workers running `script argv` and waits."""
    stageutil.die_with_launcher()
    inputs = load_inputs(params, paths)  # before any worker starts
    code = lineage.code_digest(Path(script))
    if params.train.nproc > 1 and not distributed.is_worker():
        launch(params.train.nproc, script, argv)
        return
    rank, device = distributed.init(params.train.device)
    try:
        _train_process(params, paths, inputs, code, rank, device)
    finally:
        distributed.close()


@dataclass(frozen=True)
class Inputs:
    images: np.ndarray  # uint8 N x 3 x S x S
    manifest: dict[str, Any]
    reference: dict[str, Any]  # the reference statistics ({} without in-training FID)


def load_inputs(params: Params, paths: TrainPaths) -> Inputs:
    """The processed images, their manifest and the reference statistics, after every check
    that needs no training: the devices, shapes, the process split, and for the
    in-training FID the reference and the network."""
    cfg = params.train
    resolve_device(cfg.device)
    check_processes(cfg.device, cfg.nproc)
    images, manifest = load_processed(paths.data)
    size, factor = images.shape[-1], params.model.downsample_factor
    if size % factor:
        raise ConfigError(f"{paths.data} holds {size}x{size} images but the U-Net needs a "
                          f"multiple of {factor}; rerun preprocess or change model.channels")
    batch, ranks = min(cfg.batch_size, len(images)), cfg.nproc
    if batch % ranks:
        raise ConfigError(f"params.yaml: train.batch_size ({batch}) must divide evenly over "
                          f"train.nproc ({ranks}) processes")
    reference: dict[str, Any] = {}
    if cfg.fid_every:
        reference = fid.load_stats(paths.reference)
        check_reference(reference, manifest["sha256"], paths.reference)
        fid.verified_weights()
    return Inputs(images, manifest, reference)


# ---------------------------------------------------------------- the launcher


class WorkerFailed(RuntimeError):
    """A training worker failed; the message is its own error line, or its exit status."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def launch(nproc: int, script: str | Path, argv: list[str]) -> None:
    """Run `python script argv` in `nproc` worker processes with torch's elastic agent (what
    torchrun runs, here without its console output) and wait. The first worker to fail
    stops the others; its error line is raised as WorkerFailed. Workers end with this
    process, even on SIGKILL (`stageutil.die_with_launcher`)."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # torchrun's defaults: one thread per worker unless set, a loopback rendezvous.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ[stageutil.LAUNCHED_ENV] = "1"
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)(str(script), *argv)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", "")
        if not (isinstance(message, str) and message.startswith("error: ")):
            how = (f"was killed by signal {-failure.exitcode}" if failure.exitcode < 0
                   else f"exited with code {failure.exitcode}")
            message = f"error: training process {rank} of {nproc} {how}; its output is above"
        raise WorkerFailed(message.removeprefix("error: "),
                           failure.exitcode if failure.exitcode > 0 else 1) from None


# ---------------------------------------------------------------- one process


def _train_process(params: Params, paths: TrainPaths, inputs: Inputs, code: dict[str, str],
                   rank: int, device: torch.device) -> None:
    cfg = params.train
    images, manifest = inputs.images, inputs.manifest
    # Under several processes the others only compute; rank 0 logs, tracks and writes.
    log = stageutil.log if rank == 0 else (lambda message: None)
    run_cfg = run_config(params.diffusion, params.model, cfg, manifest["sha256"])
    size = images.shape[-1]
    evaluator = fid_evaluator(params, inputs.reference, size, device)
    resume = None
    if rank == 0:
        prepare_outputs(paths, log)
        saved = read_checkpoint(paths.checkpoint, log)
        if saved is not None and resumable(saved, run_cfg, code, paths, device, log):
            resume = saved
    # One decision, rank 0's: the other ranks never judge the files rank 0 tidies next.
    if distributed.from_rank0(resume is not None) and rank != 0:
        resume = model_file.load(paths.checkpoint)
    distributed.barrier()  # every rank holds the checkpoint before rank 0 touches the files
    if rank == 0:
        start_outputs(paths, resume, evaluator.settings, log)
    n_params = count_parameters(UNet(params.model))
    log(f"training {n_params:,} parameters on {len(images)} images of {size}x{size}, "
        f"{cfg.epochs} epochs, device {device}" + (f", {cfg.nproc} processes" if cfg.nproc > 1
                                                   else ""))

    tracker = Tracker(params.mlflow, enabled=rank == 0).start(
        run_id=resume.get("mlflow_run_id") if resume else None,
        run_name=os.environ.get("DVC_EXP_NAME"),
        tags=run_tags(data_source=params.data.source, dataset_hash=manifest["sha256"],
                      device=str(device), parameters=n_params),
        system_metrics=True)
    with tracker:
        try:
            tracker.log_params(select(flatten(params), *TRAIN_SECTIONS))
        except ParamConflictError as err:  # a resumed run with changed cadence/device settings
            log(f"warning: {err}; the run keeps its first values")
        if rank == 0:
            tracker.write_run_file(paths.run_file)
        rank0 = Rank0(params, paths, run_cfg, code, len(images), size, device, resume,
                      evaluator, tracker, log) if rank == 0 else None
        state = train(torch.from_numpy(images), params.diffusion, params.model, cfg,
                      device=device, resume=resume,
                      callbacks=rank0.callbacks if rank0 is not None else ())
        if rank0 is not None:
            rank0.finish(state)
            write_outputs(state, paths, run_cfg, size, n_params, len(images), device, tracker)
            log_to_mlflow(tracker, params, paths, state, manifest["sha256"], len(images), size)
            log(f"model written to {paths.model}; strips in {paths.strips}")


def prepare_outputs(paths: TrainPaths, log: Callable[[str], None]) -> None:
    """What a killed run left, and outputs DVC expects even when empty."""
    stale = atomic.remove_stale_temps_in(paths.checkpoints) + atomic.remove_stale_temps_in(
        paths.strips)
    for path in (paths.model, paths.best, paths.fid_csv, paths.reports / "train.json",
                 paths.reports / "train_loss.csv", paths.run_file):
        stale += atomic.remove_stale_temps(path)
    for path in stale:
        log(f"removed {path}, left by an interrupted write")
    paths.strips.mkdir(parents=True, exist_ok=True)  # declared even with train.strip_every: 0


def start_outputs(paths: TrainPaths, resume: Optional[dict[str, Any]],
                  fid_settings: dict[str, Any], log: Callable[[str], None]) -> None:
    """Bring the outputs in line with the state training starts from. A best-weights file
    stays as long as a checkpoint on disk names it.

    From scratch: the checkpoint that is not resumed goes first, then every best file
    (none is named any more), the strips and the FID history of that run. On resume:
    the best file the checkpoint names is the only one kept (a later one was written
    after it, by the run that was killed) and train_fid.csv is its history. When the
    train.fid_* settings changed, that file still stays: the checkpoint on disk names it
    until the next one, which names the best among the new settings' rows, replaces it
    (then `Checkpointer`'s `after` deletes the old file). models/best.pt is published from
    the named file when the stage ends."""
    paths.best.unlink(missing_ok=True)
    if resume is None:
        if paths.checkpoint.exists():
            paths.checkpoint.unlink()
            log(f"removed {paths.checkpoint}: training from scratch")
        for path in prune_best(paths.checkpoints, None):
            log(f"removed {path}: the best weights of the checkpoint not resumed")
        shutil.rmtree(paths.strips, ignore_errors=True)
        paths.strips.mkdir(parents=True)
        paths.fid_csv.unlink(missing_ok=True)
        return
    extra = resume.setdefault("extra", {})
    named = named_best(extra, paths.checkpoints)  # what the checkpoint on disk names
    dropped = continue_best(extra, fid_settings)
    if dropped:
        log(f"note: {dropped}")
    for path in prune_best(paths.checkpoints, named):
        log(f"removed {path}: not the best weights of the run being resumed")
    write_fid_csv(paths.fid_csv, extra.get("fid", []))


def read_checkpoint(path: Path, log: Callable[[str], None]) -> Optional[dict[str, Any]]:
    """The checkpoint, None if there is none, or - when it cannot be read (truncated, not a
    checkpoint, refused by weights_only) - None after moving it aside for inspection."""
    try:
        return model_file.load(path)
    except FileNotFoundError:
        return None
    except model_file.CheckpointError as err:
        aside = path.with_name(path.name + ".unreadable")
        os.replace(path, aside)
        log(f"warning: {err.reason}: moved it to {aside} and training from scratch "
            f"(delete that file once you no longer need it)")
        return None


def resumable(saved: dict[str, Any], run_cfg: dict[str, Any], code: dict[str, str],
              paths: TrainPaths, device: torch.device, log: Callable[[str], None]) -> bool:
    """Whether `saved` can be continued by this code, settings and data (exactly, bit for
    bit, on the same kind of device and precision; on another the noise stream differs)."""
    reasons = []
    if "code" not in saved:
        reasons.append("it does not name the code that made it (written before checkpoints "
                       "did)")
    else:
        changed = lineage.code_differences(saved["code"], code)
        if changed:
            reasons.append("it was made by other code (" + ", ".join(changed) + ")")
    settings = checkpoint.differences(saved.get("run", {}), run_cfg)
    if settings:
        reasons.append("it was made with other settings (" + "; ".join(settings) + ")")
    best = named_best(saved.get("extra", {}), paths.checkpoints)
    if not reasons and best is not None and not best.exists():
        reasons.append(f"the best weights it names, {best}, are missing")
    if reasons:
        log(f"not resuming from {paths.checkpoint}: " + "; ".join(reasons)
            + "; training from scratch")
        return False
    log(f"resuming from {paths.checkpoint} at epoch {saved['epoch']} (step {saved['step']})")
    was = noise_device(saved)
    if was != device.type:
        log(f"note: the checkpoint was written on {was}, training goes on on {device.type}: "
            f"t, eps and the flips come from a new {device.type} stream seeded by (train.seed, "
            f"step), so the run continues but not bit for bit as on {was}")
    return True


def fid_evaluator(params: Params, reference: dict[str, Any], size: int,
                  device: torch.device) -> FidEvaluator:
    cfg = params.train
    return FidEvaluator(reference, cfg.fid_samples, cfg.fid_steps,
                        make_schedule(params.diffusion).to(device), size, cfg.seed, device,
                        fast=lambda model: denoiser(model, device, cfg.precision, cfg.compile,
                                                    cfg.compile_mode, cfg.channels_last,
                                                    diffusion=params.diffusion),
                        feature_batch=params.evaluate.batch_size, sampler=cfg.fid_sampler,
                        eta=cfg.fid_eta)


class Rank0:
    """Rank 0's side of training: the callbacks, and the end of the run."""

    def __init__(self, params: Params, paths: TrainPaths, run_cfg: dict[str, Any],
                 code: dict[str, str], n_images: int, size: int, device: torch.device,
                 resume: Optional[dict[str, Any]], evaluator: FidEvaluator, tracker: Tracker,
                 log: Callable[[str], None]):
        cfg = params.train
        epoch_steps = steps_per_epoch(n_images, cfg.batch_size)
        schedule = evaluator.schedule

        def scored(row: dict[str, Any], best: dict[str, Any]) -> None:
            tracker.log_metrics({"train/fid": row["fid"], "train/kid": row["kid"],
                                 "train/seconds": row["seconds"],
                                 "train/best_fid": best["fid"],
                                 "train/best_epoch": best["epoch"],
                                 "train/fid_eval_seconds": row["eval_seconds"]},
                                step=row["step"])
            log(f"epoch {row['epoch']}: FID {row['fid']:.2f}, KID {row['kid']:.4f} on "
                f"{row['samples']} {row['sampler']}-{row['steps']} samples "
                f"({row['eval_seconds']:.1f} s); "
                f"best FID {best['fid']:.2f} at epoch {best['epoch']}")

        # One writer for the best weights and the checkpoints, in call order: the best
        # file is on disk before the checkpoint that names it (train_fid's commit point).
        saver = checkpoint.BackgroundSaver()
        self.fid = TrainFid(evaluator, cfg.fid_every, cfg.epochs, paths.fid_csv,
                            paths.checkpoints, run_cfg, size, saver=saver, on_scored=scored)
        self.checkpointer = Checkpointer(
            paths.checkpoint, run_cfg, cfg.checkpoint_every, cfg.epochs,
            extra={"mlflow_run_id": tracker.run_id, "code": code}, saver=saver,
            after=lambda state: functools.partial(
                prune_best, paths.checkpoints, named_best(state.extra, paths.checkpoints)))
        self.callbacks = (
            Progress(cfg.epochs, epoch_steps, resume["step"] if resume else 0),
            LossCsv(paths.reports / "train_loss.csv"),
            Strips(paths.strips, schedule, size, cfg.seed, cfg.strip_every, cfg.epochs, device,
                   on_saved=lambda path, epoch: tracker.log_image(path, "reverse_strip", epoch),
                   fast=lambda model: strip_denoiser(model, device, cfg,
                                                             params.diffusion)),
            self.fid,
            self.checkpointer,
            TrackMetrics(tracker),
            EpochLog(log, epochs=cfg.epochs),
        )

    def finish(self, state: Any) -> None:
        """After the loop: a finished run resumed with other FID settings is scored once at
        its last epoch, and a checkpoint records it."""
        if self.fid.catch_up(state):
            self.checkpointer.run(state, EpochSummary(**state.epochs_done[-1]))
            self.checkpointer.close()


def write_outputs(state: Any, paths: TrainPaths, run_cfg: dict[str, Any], size: int,
                  n_params: int, n_images: int, device: torch.device, tracker: Tracker) -> None:
    checkpoint.save(paths.model, final_weights(state, run_cfg, size))
    write_loss_csv(paths.reports / "train_loss.csv", state.history)
    write_fid_csv(paths.fid_csv, state.extra.get("fid", []))  # a header alone without FID
    publish_best(paths, state, run_cfg, size)
    last = state.epochs_done[-1]
    report = {
        "epochs": state.epoch,
        "steps": state.step,
        "final_loss": last["loss"],
        "final_loss_by_t_quartile": list(last["loss_quartiles"]),
        "final_x0_error_by_t_quartile": list(last.get("x0_error_quartiles", ())),
        "images_per_s": last["images_per_s"],
        "seconds": sum(e["seconds"] for e in state.epochs_done),
        "parameters": n_params,
        "images": n_images,
        "device": str(device),
        "step_variant": last.get("variant", ""),
        **summary_fields(state.extra),
    }
    atomic.write_json(paths.reports / "train.json", report)
    # train/final_loss, train/best_fid, ...: the run's numbers as top-level metrics
    tracker.log_metrics({f"train/{k}" if k.startswith(("final_", "best_")) else f"train/final_{k}": v
                         for k, v in report.items() if isinstance(v, (int, float))},
                        step=state.step)
    tracker.log_artifact(paths.reports / "train_loss.csv", "reports")
    tracker.log_artifact(paths.fid_csv, "reports")


def log_to_mlflow(tracker: Tracker, params: Params, paths: TrainPaths, state: Any,
                  data_sha256: str, n_images: int, size: int) -> None:
    """The run's training data as its input, and its models as LoggedModels: the final one
    (registered) at the last step, the best one at its epoch's step when that is another."""
    cfg = params.train
    tracker.log_dataset(training_dataset(params.data, data_sha256, n_images, size))
    if not params.mlflow.log_model:
        return
    # What predict() samples with when a request leaves a setting out: the in-training
    # FID's sampler (train.fid_*, which default to the generate stage's). It refuses a
    # request above max_work model evaluations (samples x steps; ddpm: all T): MAX_WORK,
    # or the default request's if that is more.
    evaluations = model_evaluations(cfg.fid_sampler, cfg.fid_steps, params.diffusion.steps)
    sampling = {"num_samples": 16, "seed": 0, "sampler": cfg.fid_sampler,
                "steps": cfg.fid_steps, "eta": cfg.fid_eta, "clip": True,
                "batch_size": 256, "max_samples": 256, "device": "auto"}
    sampling["max_work"] = max(MAX_WORK, sampling["num_samples"] * evaluations)
    tracker.log_model("final", paths.model, state.step, sampling,
                      register=params.mlflow.registered_model,
                      version_tags={"dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
                                    "git.commit": os.environ.get("DVC_EXP_BASELINE_REV"),
                                    "ddpm.dataset_sha256": data_sha256})
    best = state.extra.get("fid_best")
    if best is not None and best.get("step", state.step) != state.step:
        tracker.log_model("best", paths.best, best["step"], sampling)


def publish_best(paths: TrainPaths, state: Any, run_cfg: dict[str, Any], size: int) -> None:
    """models/best.pt: the best-weights file the final checkpoint names, or with no
    in-training FID (train.fid_every: 0) the final weights, saying so."""
    named = named_best(state.extra, paths.checkpoints)
    if named is None:
        checkpoint.save(paths.best, best_weights(state, run_cfg, size, None))
        return
    if not named.exists():
        raise model_file.CheckpointError(f"{named}, the best weights of this run, is missing",
                                         "it was deleted while training; retrain from scratch "
                                         "(remove models/checkpoints/last.pt)")
    atomic.write_with(paths.best, lambda tmp: shutil.copyfile(named, tmp))

"""Stage `train`: DDPM training on data/processed -> models/model.pt, strips, loss reports.

Resumes from models/checkpoints/last.pt when it was made with the same model,
diffusion, training and data settings (and then continues its MLflow run);
otherwise says what differs and starts fresh (the stale checkpoint is
overwritten at the first new checkpoint).
"""

import datetime
import os
import shutil
from pathlib import Path

import torch

from ddpm import atomic, checkpoint, stageutil
from ddpm.callbacks import (Checkpointer, EpochLog, LossCsv, Progress, Strips, TrackMetrics,
                            strip_denoiser, write_loss_csv)
from ddpm.checkpoint import CheckpointError, CheckpointWriteError
from ddpm.config import ConfigError, flatten
from ddpm.diffusion import make_schedule
from ddpm.preprocess import load_processed
from ddpm.tracking import ParamConflictError, Tracker, run_tags, select
from ddpm.device import resolve_device
from ddpm.training import (NonFiniteLossError, final_weights, run_config, steps_per_epoch,
                           train)
from ddpm.unet import UNet, count_parameters

TRAIN_SECTIONS = ("data", "preprocess", "diffusion", "model", "train")


def resume_state(path: Path, run_cfg: dict, log) -> dict | None:
    if not path.exists():
        return None
    saved = checkpoint.load(path)
    diffs = checkpoint.differences(saved.get("run", {}), run_cfg)
    if diffs:
        log(f"not resuming from {path}: it was made with other settings ("
                      + "; ".join(diffs) + "); training from scratch")
        return None
    log(f"resuming from {path} at epoch {saved['epoch']} (step {saved['step']})")
    return saved


def init_distributed(device_name: str) -> tuple[int, torch.device]:
    """Under torchrun (WORLD_SIZE > 1): join the process group; NCCL on GPUs, gloo on CPUs."""
    rank_count = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if rank_count == 1:
        return 0, device
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    # Ranks wait at their first all-reduce of an epoch while rank 0 ends the last one
    # (strip, checkpoint; the first strip compiles the EMA model): allow for it, rather
    # than NCCL's default 10 minutes.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=60))
    return dist.get_rank(), device


def main() -> None:
    p = stageutil.parser(__doc__)
    p.add_argument("--data", type=Path, default=Path("data/processed"))
    p.add_argument("--model", type=Path, default=Path("models/model.pt"))
    p.add_argument("--checkpoints", type=Path, default=Path("models/checkpoints"))
    p.add_argument("--reports", type=Path, default=Path("reports"))
    p.add_argument("--strips", type=Path, default=Path("reports/strips"))
    p.add_argument("--run-file", type=Path, default=Path("reports/mlflow_run.json"))
    args = p.parse_args()
    stageutil.die_with_launcher()
    params = stageutil.load(args)
    cfg = params.train

    images, manifest = load_processed(args.data)
    size = images.shape[-1]
    factor = params.model.downsample_factor
    if size % factor:
        raise ConfigError(f"{args.data} holds {size}x{size} images but the U-Net needs a multiple "
                          f"of {factor}; rerun preprocess or change model.channels")
    rank, device = init_distributed(cfg.device)
    # Under torchrun the other ranks only compute; rank 0 logs, tracks and writes.
    log = stageutil.log if rank == 0 else (lambda message: None)
    run_cfg = run_config(params.diffusion, params.model, cfg, manifest["sha256"])
    ckpt_path = args.checkpoints / "last.pt"
    if rank == 0:
        for path in (ckpt_path, args.model):
            for stale in atomic.remove_stale_temps(path):
                log(f"removed {stale}, left by an interrupted write")
    resume = resume_state(ckpt_path, run_cfg, log)
    if resume is None and args.strips.exists() and rank == 0:
        shutil.rmtree(args.strips)  # strips of another run
    n_params = count_parameters(UNet(params.model))
    log(f"training {n_params:,} parameters on {len(images)} images of {size}x{size}, "
                  f"{cfg.epochs} epochs, device {device}")

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
            stageutil.log(f"warning: {err}; the run keeps its first values")
        if rank == 0:
            tracker.write_run_file(args.run_file)

        epoch_steps = steps_per_epoch(len(images), cfg.batch_size)
        callbacks = (
            Progress(cfg.epochs, epoch_steps, resume["step"] if resume else 0),
            LossCsv(args.reports / "train_loss.csv"),
            Strips(args.strips, make_schedule(params.diffusion).to(device), size, cfg.seed,
                   cfg.strip_every, cfg.epochs, device,
                   on_saved=lambda path, epoch: tracker.log_image(path, "reverse_strip", epoch),
                   fast=lambda model: strip_denoiser(model, device, cfg)),
            Checkpointer(ckpt_path, run_cfg, cfg.checkpoint_every, cfg.epochs,
                         extra={"mlflow_run_id": tracker.run_id}),
            TrackMetrics(tracker),
            EpochLog(log),
        ) if rank == 0 else ()
        state = train(torch.from_numpy(images), params.diffusion, params.model, cfg,
                      device=device, resume=resume, callbacks=callbacks)
        if rank != 0:
            return

        checkpoint.save(args.model, final_weights(state, run_cfg, size))
        write_loss_csv(args.reports / "train_loss.csv", state.history)
        last = state.epochs_done[-1]
        report = {
            "epochs": state.epoch,
            "steps": state.step,
            "final_loss": last["loss"],
            "final_loss_by_t_quartile": list(last["loss_quartiles"]),
            "images_per_s": last["images_per_s"],
            "seconds": sum(e["seconds"] for e in state.epochs_done),
            "parameters": n_params,
            "images": int(len(images)),
            "device": str(device),
        }
        atomic.write_json(args.reports / "train.json", report)
        tracker.log_metrics({f"train/final_{k}": v for k, v in report.items()
                             if isinstance(v, (int, float))}, step=state.step)
        tracker.log_artifact(args.model, "model")
        tracker.log_artifact(args.reports / "train_loss.csv", "reports")
    stageutil.log(f"model written to {args.model}; strips in {args.strips}")


if __name__ == "__main__":
    stageutil.run(main, expected=(NonFiniteLossError, CheckpointError, CheckpointWriteError))

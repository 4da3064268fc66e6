"""Stage `train`: DDPM training on data/processed -> models/model.pt, strips, loss reports.

Resumes from models/checkpoints/last.pt when it was made with the same model,
diffusion, training and data settings; otherwise says what differs and starts
fresh (the stale checkpoint is overwritten at the first new checkpoint).
"""

import shutil
from pathlib import Path

import torch

from ddpm import atomic, checkpoint, stageutil
from ddpm.callbacks import Checkpointer, EpochLog, LossCsv, Progress, Strips, write_loss_csv
from ddpm.checkpoint import CheckpointError
from ddpm.config import ConfigError
from ddpm.diffusion import make_schedule
from ddpm.preprocess import load_processed
from ddpm.training import (NonFiniteLossError, final_weights, resolve_device, run_config,
                           steps_per_epoch, train)
from ddpm.unet import UNet, count_parameters


def resume_state(path: Path, run_cfg: dict) -> dict | None:
    if not path.exists():
        return None
    saved = checkpoint.load(path)
    diffs = checkpoint.differences(saved.get("run", {}), run_cfg)
    if diffs:
        stageutil.log(f"not resuming from {path}: it was made with other settings ("
                      + "; ".join(diffs) + "); training from scratch")
        return None
    stageutil.log(f"resuming from {path} at epoch {saved['epoch']} (step {saved['step']})")
    return saved


def main() -> None:
    p = stageutil.parser(__doc__)
    p.add_argument("--data", type=Path, default=Path("data/processed"))
    p.add_argument("--model", type=Path, default=Path("models/model.pt"))
    p.add_argument("--checkpoints", type=Path, default=Path("models/checkpoints"))
    p.add_argument("--reports", type=Path, default=Path("reports"))
    p.add_argument("--strips", type=Path, default=Path("reports/strips"))
    args = p.parse_args()
    params = stageutil.load(args)
    cfg = params.train

    images, manifest = load_processed(args.data)
    size = images.shape[-1]
    factor = params.model.downsample_factor
    if size % factor:
        raise ConfigError(f"{args.data} holds {size}x{size} images but the U-Net needs a multiple "
                         f"of {factor}; rerun preprocess or change model.channels")
    device = resolve_device(cfg.device)
    run_cfg = run_config(params.diffusion, params.model, cfg, manifest["sha256"])
    ckpt_path = args.checkpoints / "last.pt"
    resume = resume_state(ckpt_path, run_cfg)
    if resume is None and args.strips.exists():
        shutil.rmtree(args.strips)  # strips of another run
    n_params = count_parameters(UNet(params.model))
    stageutil.log(f"training {n_params:,} parameters on {len(images)} images of {size}x{size}, "
                  f"{cfg.epochs} epochs, device {device}")

    epoch_steps = steps_per_epoch(len(images), cfg.batch_size)
    callbacks = (
        Progress(cfg.epochs, epoch_steps, resume["step"] if resume else 0),
        LossCsv(args.reports / "train_loss.csv"),
        Strips(args.strips, make_schedule(params.diffusion).to(device), size, cfg.seed,
               cfg.strip_every, cfg.epochs, device),
        Checkpointer(ckpt_path, run_cfg, cfg.checkpoint_every, cfg.epochs),
        EpochLog(stageutil.log),
    )
    state = train(torch.from_numpy(images), params.diffusion, params.model, cfg,
                  device=device, resume=resume, callbacks=callbacks)

    checkpoint.save(args.model, final_weights(state, run_cfg, size))
    write_loss_csv(args.reports / "train_loss.csv", state.history)
    last = state.epochs_done[-1]
    atomic.write_json(args.reports / "train.json", {
        "epochs": state.epoch,
        "steps": state.step,
        "final_loss": last["loss"],
        "final_loss_by_t_quartile": list(last["loss_quartiles"]),
        "images_per_s": last["images_per_s"],
        "seconds": sum(e["seconds"] for e in state.epochs_done),
        "parameters": n_params,
        "images": int(len(images)),
        "device": str(device),
    })
    stageutil.log(f"model written to {args.model}; strips in {args.strips}")


if __name__ == "__main__":
    stageutil.run(main, expected=(NonFiniteLossError, CheckpointError))

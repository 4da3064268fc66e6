"""The training loop: DDPM (eps, v or x0 prediction) on a uint8 image tensor.

The loop reads in phases: set up (or resume) -> for each epoch: the data order,
then `TrainStep` once per batch (draws, noise, loss, Adam, EMA: `step.py`) ->
end-of-epoch maintenance, where callbacks (strips, checkpoints, FID, logs,
trackers) run at their own cadence. It imports no tracker and writes no files.

Host-device syncs happen only at the logging cadence (`train.log_every`) and
at epoch ends; the running loss stays on the device in between.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import numpy as np
import torch

from ..config import ConfigError, DiffusionConfig, ModelConfig, TrainConfig, as_dict
from .distributed import all_mean, world
from .step import TrainState, TrainStep, build_state


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint was left intact."""


def lr_at(step: int, epoch_steps: int, cfg: TrainConfig) -> float:
    """Linear warm-up for `warmup_epochs`, then cosine decay to lr * min_lr_ratio."""
    total = cfg.epochs * epoch_steps
    warmup = int(cfg.warmup_epochs * epoch_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


@dataclass(frozen=True)
class EpochSummary:
    epoch: int  # 1-based number of the epoch just finished
    step: int
    loss: float  # mean over the epoch
    loss_quartiles: tuple[float, ...]  # mean loss for t in each quarter of [0, T)
    lr: float
    images_per_s: float
    seconds: float
    variant: str = ""  # the training step as it ran (`TrainStep.variant`)
    # Mean unweighted x0 error |x0 - x0_theta|^2 per t quarter: comparable across
    # diffusion.prediction and train.loss_weighting (loss_quartiles are not).
    x0_error_quartiles: tuple[float, ...] = ()


class Callback(Protocol):
    """Called at the logging cadence and at each epoch end. A callback with work still
    running in the background (a checkpoint being written) also has `close()`, which
    `train` calls when it returns or raises."""

    def on_log(self, row: dict[str, float]) -> None: ...
    def on_epoch_end(self, state: TrainState, summary: EpochSummary) -> None: ...


def run_config(diffusion: DiffusionConfig, model: ModelConfig, train: TrainConfig,
               data_hash: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed. Left out: how fast or where it trains
    (device, compile, layout, graphs), the cadences, and the in-training FID's settings
    (every train.fid_* key: its rows keep the settings they were scored with and the best
    is chosen among like rows, `fid_curve.continue_best`)."""
    sticky = {k: v for k, v in as_dict(train).items()
              if k not in ("device", "checkpoint_every", "strip_every", "log_every", "compile",
                           "compile_mode", "channels_last", "cuda_graph", "fid_every",
                           "fid_samples", "fid_sampler", "fid_steps", "fid_eta")}
    return {"diffusion": as_dict(diffusion), "model": as_dict(model), "train": sticky,
            "data_hash": data_hash}


def dropout_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of torch's default generators (dropout's masks) for one rank's epoch.

    Each rank has its own stream, so ranks never share masks, and a resumed
    epoch draws what it drew the first time without any rank's RNG state saved.
    """
    state = np.random.SeedSequence([seed, rank, epoch]).generate_state(2, np.uint32)
    return int(state.view(np.uint64)[0] >> 1)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch: the incomplete last batch is dropped so shapes stay fixed."""
    return n // min(batch_size, n)


def train(images: torch.Tensor, diffusion_cfg: DiffusionConfig, model_cfg: ModelConfig,
          cfg: TrainConfig, *, device: torch.device, resume: Optional[dict[str, Any]] = None,
          callbacks: tuple[Callback, ...] = ()) -> TrainState:
    """Train on uint8 `images` (N x 3 x S x S) and return the final state.

    Under torchrun every rank runs this with the same seed: the data order,
    t, noise and flips are drawn for the whole global batch on every rank,
    and each rank takes its own slice, so N ranks compute what one process
    would on the same global batch (DDP averages the gradients) - exactly so
    up to float rounding when model.dropout is 0; dropout masks come from a
    stream per rank and epoch (`dropout_seed`). Callbacks should be given on
    rank 0 only.
    """
    try:
        state = _train(images, diffusion_cfg, model_cfg, cfg, device, resume, callbacks)
    except BaseException:
        _close(callbacks, failing=True)
        raise
    _close(callbacks, failing=False)  # e.g. the last checkpoint is on disk before it is read
    return state


def _close(callbacks: tuple[Callback, ...], failing: bool) -> None:
    """Call every callback's close(). While training is already failing, a close error is
    only warned about, so the error that stopped training is the one raised."""
    errors = []
    for cb in callbacks:
        close = getattr(cb, "close", None)
        if close is None:
            continue
        try:
            close()
        except Exception as err:  # noqa: BLE001 - every callback gets its close
            errors.append(err)
    if not errors:
        return
    import warnings

    for err in errors if failing else errors[1:]:
        warnings.warn(f"closing a training callback failed: {type(err).__name__}: {err}",
                      stacklevel=3)
    if not failing:
        raise errors[0]


def _train(images: torch.Tensor, diffusion_cfg: DiffusionConfig, model_cfg: ModelConfig,
           cfg: TrainConfig, device: torch.device, resume: Optional[dict[str, Any]],
           callbacks: tuple[Callback, ...]) -> TrainState:
    # --- set up -----------------------------------------------------------
    rank, ranks = world()
    state = build_state(model_cfg, cfg, device)
    if resume is not None:
        state.load_state_dict(resume)
    data = images.to(device)  # the whole uint8 set lives on the device: no loader
    if min(cfg.batch_size, len(data)) % ranks:
        raise ConfigError(f"params.yaml: train.batch_size ({min(cfg.batch_size, len(data))}) "
                          f"must divide evenly over {ranks} processes")
    module = state.model
    if ranks > 1:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(state.model,
                                         device_ids=[device] if device.type == "cuda" else None)
    step = TrainStep(state, data, diffusion_cfg, cfg, device, rank=rank, ranks=ranks,
                     model=module)
    epoch_steps, batch = step.steps_per_epoch, step.batch

    for epoch in range(state.epoch, cfg.epochs):
        # --- one epoch ----------------------------------------------------
        torch.manual_seed(dropout_seed(cfg.seed, rank, epoch))
        state.model.train()
        started = time.perf_counter()
        step.start_epoch(torch.randperm(len(data), generator=state.order_gen))
        window_start, window_steps = started, 0
        for i in range(epoch_steps):
            lr = lr_at(state.step, epoch_steps, cfg)
            step(lr)
            window_steps += 1
            if window_steps == cfg.log_every or i == epoch_steps - 1:
                window = step.take_window()
                all_mean(window)
                mean = (window / window_steps).item()  # the host sync, once per window
                now = time.perf_counter()
                _check_finite(mean, state)
                row = {"step": state.step, "epoch": epoch + (i + 1) / epoch_steps,
                       "loss": mean, "lr": lr,
                       "images_per_s": window_steps * batch / max(now - window_start, 1e-9)}
                state.history.append(row)
                for cb in callbacks:
                    cb.on_log(row)
                window_start, window_steps = now, 0

        # --- end-of-epoch maintenance -------------------------------------
        seconds = time.perf_counter() - started
        loss_sum, q_sum, q_x0_sum, q_count = step.take_epoch()
        all_mean(loss_sum, q_sum, q_x0_sum, q_count)
        epoch_loss = (loss_sum / epoch_steps).item()
        _check_finite(epoch_loss, state)
        quartiles = (q_sum / q_count.clamp(min=1)).tolist()
        x0_quartiles = (q_x0_sum / q_count.clamp(min=1)).tolist()
        state.epoch = epoch + 1
        summary = EpochSummary(epoch=state.epoch, step=state.step, loss=epoch_loss,
                               loss_quartiles=tuple(quartiles), lr=lr,
                               images_per_s=epoch_steps * batch / seconds, seconds=seconds,
                               variant=step.variant, x0_error_quartiles=tuple(x0_quartiles))
        state.epochs_done.append(dataclasses.asdict(summary))
        for cb in callbacks:
            cb.on_epoch_end(state, summary)
    return state


def _check_finite(value: float, state: TrainState) -> None:
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"the training loss became {value} at step {state.step} (epoch {state.epoch + 1}); "
            f"training stopped and the last checkpoint was left as it was. Lower train.lr, "
            f"set train.grad_clip (e.g. 1.0) or train.precision: fp32, then rerun")


def final_weights(state: TrainState, run_cfg: dict[str, Any], image_size: int) -> dict[str, Any]:
    """models/model.pt: EMA and raw weights plus what is needed to rebuild the model."""
    return {"config": {**run_cfg, "image_size": image_size}, "model": state.model.state_dict(),
            "ema": state.ema.model.state_dict(), "epoch": state.epoch, "step": state.step}

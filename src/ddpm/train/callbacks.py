"""Training callbacks: progress bar, loss CSV, reverse-diffusion strips, checkpoints.

Each decides its own cadence; the loop in `loop.py` just calls them.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .. import atomic
from . import checkpoint
from ..model.diffusion import Schedule
from ..evaluate.figures import save_strip
from ..model.pixels import to_uint8
from ..model.samplers import Denoiser, ImageNoise, sample_with_frames
from .step import TrainState
from .loop import EpochSummary

LOSS_COLUMNS = ("step", "epoch", "loss", "lr", "images_per_s")


def due(epoch: int, every: int, epochs: int) -> bool:
    """Whether a callback with cadence `every` (0 = never) runs at 1-based `epoch`: every
    `every`-th epoch and the last one."""
    return bool(every) and (epoch % every == 0 or epoch == epochs)


class AtCadence:
    """A callback that works at the end of every `every`-th epoch and the last (`due`):
    subclasses set `every` and `epochs` and write `run`."""

    every: int
    epochs: int

    def on_log(self, row: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, state: TrainState, summary: EpochSummary) -> None:
        if due(summary.epoch, self.every, self.epochs):
            self.run(state, summary)

    def run(self, state: TrainState, summary: EpochSummary) -> None:
        raise NotImplementedError


def write_loss_csv(path: Path, history: list[dict[str, float]]) -> None:
    """The whole loss history (kept in the checkpoint, so it survives a resume)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOSS_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic.write_text(path, buf.getvalue())


def reverse_strip(denoise: Denoiser, schedule: Schedule, image_size: int, seed: int,
                  device: torch.device, rows: int = 1, frames: int = 9) -> list[torch.Tensor]:
    """The seed's reverse strip: x_T and every T/8-th step, from fixed noise maps.
    `denoise` is the model itself or `fastpath.denoiser` of it."""
    noise = ImageNoise(seed, range(rows), device)
    x_T = noise.randn((3, image_size, image_size))
    kept = sample_with_frames("ddpm", denoise, schedule, x_T, noise, frames=frames)
    return [to_uint8(x) for x in kept]


class Progress:
    """A tqdm bar per epoch with the running loss and images/s."""

    def __init__(self, epochs: int, steps_per_epoch: int, start_step: int):
        self.epochs, self.total, self.last_step = epochs, steps_per_epoch, start_step
        self.bar = self._open(start_step // steps_per_epoch + 1)

    def _open(self, epoch: int):
        from tqdm import tqdm

        if epoch > self.epochs:
            return None
        return tqdm(total=self.total, desc=f"epoch {epoch}/{self.epochs}", unit="step")

    def on_log(self, row: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(int(row["step"]) - self.last_step)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}")
        self.last_step = int(row["step"])

    def on_epoch_end(self, state: TrainState, summary: EpochSummary) -> None:
        self.close()
        self.bar = self._open(summary.epoch + 1)

    def close(self) -> None:
        """Before an error is printed, so the bar's last redraw does not follow it."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LossCsv:
    def __init__(self, path: Path):
        self.path = path

    def on_log(self, row: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, state: TrainState, summary: EpochSummary) -> None:
        write_loss_csv(self.path, state.history)


class Strips(AtCadence):
    """A reverse-diffusion strip with the EMA model every `every` epochs (and the last).

    The strip runs T batch-1 model calls, twice as many as the seed's epoch has
    training steps: `fast(model)` wraps the EMA model for them once, e.g. with
    `strip_denoiser` (the train stage's); by default it is called as is.
    """

    def __init__(self, out_dir: Path, schedule: Schedule, image_size: int, seed: int,
                 every: int, epochs: int, device: torch.device,
                 on_saved: Optional[Callable[[Path, int], None]] = None,
                 fast: Callable[[torch.nn.Module], Denoiser] = lambda model: model):
        self.out_dir, self.schedule, self.image_size = out_dir, schedule, image_size
        self.seed, self.every, self.epochs, self.device = seed, every, epochs, device
        self.on_saved, self.fast = on_saved, fast
        self.denoise: Optional[Denoiser] = None

    def run(self, state: TrainState, summary: EpochSummary) -> None:
        if self.denoise is None:  # the EMA model is updated in place: wrapped once
            self.denoise = self.fast(state.ema.model)
        frames = reverse_strip(self.denoise, self.schedule, self.image_size, self.seed,
                               self.device)
        path = self.out_dir / f"reverse_epoch{summary.epoch:04d}.png"
        save_strip(frames, path)
        if self.on_saved is not None:
            self.on_saved(path, summary.epoch)


class Checkpointer(AtCadence):
    """The full training state every `every` epochs and after the last one, written in
    the background (`checkpoint.BackgroundSaver`); `close()` waits for the last write.

    `saver` may be shared with other writers (the best weights): one write at a time, in
    call order, so what a checkpoint names was written before it. `after(state)` gives
    the work to do once this checkpoint is on disk (run in the writer thread), e.g.
    deleting files no checkpoint names any more."""

    def __init__(self, path: Path, run_config: dict[str, Any], every: int, epochs: int,
                 extra: Optional[dict[str, Any]] = None,
                 saver: Optional[checkpoint.BackgroundSaver] = None,
                 after: Optional[Callable[[TrainState], Callable[[], None]]] = None):
        self.path, self.run_config, self.every, self.epochs = path, run_config, every, epochs
        self.extra = extra or {}  # e.g. the tracking run id and the code digest
        self.saver = saver or checkpoint.BackgroundSaver()
        self.after = after

    def run(self, state: TrainState, summary: EpochSummary) -> None:
        self.saver.save(self.path, {"run": self.run_config, **self.extra, **state.state_dict()},
                        then=self.after(state) if self.after is not None else None)

    def close(self) -> None:
        self.saver.wait()


class EpochLog:
    """One line per epoch on the console: the loss, the speed, the epoch's seconds and, given
    `epochs` (the run's total), the training time left at the speed measured so far.

    The estimate counts the training steps only (the epoch's own seconds), not strips,
    checkpoints or in-training FID. It averages this process's epochs, leaving out the
    first once there are others: the first also compiles and warms up (on a GPU)."""

    def __init__(self, print_fn: Callable[[str], None] = print, epochs: Optional[int] = None):
        self.print, self.epochs = print_fn, epochs
        self.seconds: list[float] = []

    def on_log(self, row: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, state: TrainState, summary: EpochSummary) -> None:
        quartiles = " ".join(f"{q:.4f}" for q in summary.loss_quartiles)
        x0 = " ".join(f"{q:.4g}" for q in summary.x0_error_quartiles)
        line = (f"epoch {summary.epoch}: loss {summary.loss:.4f} (t quartiles {quartiles}; "
                f"x0 error {x0}), lr {summary.lr:.2e}, {summary.images_per_s:.1f} img/s, "
                f"{summary.seconds:.1f} s")
        self.seconds.append(summary.seconds)
        left = (self.epochs or 0) - summary.epoch
        if left > 0:
            measured = self.seconds[1:] or self.seconds
            minutes = left * sum(measured) / len(measured) / 60
            line += (f"; {left} epoch{'s' if left > 1 else ''} left, about {minutes:.1f} min "
                     f"at this speed")
        self.print(line)


class TrackMetrics:
    """Live metrics for a tracker (anything with log_metrics(dict, step))."""

    def __init__(self, tracker: Any):
        self.tracker = tracker

    def on_log(self, row: dict[str, float]) -> None:
        self.tracker.log_metrics({"train/loss": row["loss"], "train/lr": row["lr"],
                                  "train/images_per_s": row["images_per_s"]}, step=int(row["step"]))

    def on_epoch_end(self, state: TrainState, summary: EpochSummary) -> None:
        quartiles = {f"train/loss_t_q{i + 1}": q for i, q in enumerate(summary.loss_quartiles)}
        quartiles.update({f"train/x0_error_t_q{i + 1}": q
                          for i, q in enumerate(summary.x0_error_quartiles)})
        self.tracker.log_metrics({"train/epoch_loss": summary.loss, "train/epoch": summary.epoch,
                                  "train/epoch_images_per_s": summary.images_per_s, **quartiles},
                                 step=summary.step)

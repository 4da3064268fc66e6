"""The training loop: epsilon-prediction DDPM on a uint8 image tensor.

The loop reads in phases: set up (or resume) -> for each epoch: shuffle, then
per batch: augment, noise, loss, step, EMA -> end-of-epoch maintenance, where
callbacks (strips, checkpoints, logs, trackers) run at their own cadence. It
imports no tracker and writes no files itself.

Host-device syncs happen only at the logging cadence (`train.log_every`) and
at epoch ends; the running loss stays on the device in between.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch
from torch import nn

from .config import ConfigError, DiffusionConfig, ModelConfig, TrainConfig, as_dict
from .diffusion import Schedule, loss_per_image, make_schedule, q_sample
from .images import to_model
from .unet import UNet


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


class EMA:
    """Exponential moving average of the weights (updated with foreach ops).

    With warm-up the decay at update n is min(decay, (1 + n) / (10 + n)), so a
    short run is not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool):
        self.decay, self.warmup = decay, warmup
        self.model = _clone_frozen(model)
        self.updates = 0
        # (source model, its parameters, ours): listing 332 parameters took 0.7 of the
        # 1.3 ms an update took on a CPU core, so the lists are made once per source model.
        self._pairs: Optional[tuple[nn.Module, list[nn.Parameter], list[nn.Parameter]]] = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.decay
        if self.warmup:
            decay = min(decay, (1 + self.updates) / (10 + self.updates))
        if self._pairs is None or self._pairs[0] is not model:
            self._pairs = (model, list(model.parameters()), list(self.model.parameters()))
        _, params, ema_params = self._pairs
        torch._foreach_lerp_(ema_params, params, 1 - decay)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def _clone_frozen(model: nn.Module) -> nn.Module:
    # A deep copy keeps the device and the memory format (channels-last on CUDA):
    # foreach ops take their fast multi-tensor path only when the layouts match.
    clone = copy.deepcopy(model)
    clone.eval().requires_grad_(False)
    return clone


@dataclass
class TrainState:
    """Everything a resumed run needs to continue exactly where it stopped."""

    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    order_gen: torch.Generator  # epoch shuffles (CPU)
    noise_gen: torch.Generator  # t, eps and flips (on the training device)
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    history: list[dict[str, float]] = field(default_factory=list)  # one row per log
    epochs_done: list[dict[str, Any]] = field(default_factory=list)  # EpochSummary as dicts

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "order": self.order_gen.get_state(),
               "noise": self.noise_gen.get_state()}
        if self.noise_gen.device.type == "cuda":  # dropout on this process's GPU
            rng["cuda"] = torch.cuda.get_rng_state(self.noise_gen.device)
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                "step": self.step, "history": self.history,
                "epochs_done": self.epochs_done, "rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        _match_layouts(self.optimizer)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        self.epochs_done = list(state["epochs_done"])
        torch.set_rng_state(state["rng"]["torch"])
        self.order_gen.set_state(state["rng"]["order"])
        self.noise_gen.set_state(state["rng"]["noise"])
        if "cuda" in state["rng"] and self.noise_gen.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.noise_gen.device)


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give loaded optimizer state its parameter's memory format: a checkpoint written with
    another train.channels_last would otherwise pair mismatched layouts in fused Adam."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if (torch.is_tensor(value) and value.shape == param.shape
                    and value.stride() != param.stride()):
                state[key] = torch.empty_like(param).copy_(value)


@dataclass(frozen=True)
class EpochSummary:
    epoch: int  # 1-based number of the epoch just finished
    step: int
    loss: float  # mean over the epoch
    loss_quartiles: tuple[float, ...]  # mean loss for t in each quarter of [0, T)
    lr: float
    images_per_s: float
    seconds: float


class Callback(Protocol):
    """Called at the logging cadence and at each epoch end. A callback with work still
    running in the background (a checkpoint being written) also has `close()`, which
    `train` calls when it returns or raises."""

    def on_log(self, row: dict[str, float]) -> None: ...
    def on_epoch_end(self, state: TrainState, summary: EpochSummary) -> None: ...


def run_config(diffusion: DiffusionConfig, model: ModelConfig, train: TrainConfig,
               data_hash: str) -> dict[str, Any]:
    """What a checkpoint must match to be resumed exactly."""
    sticky = {k: v for k, v in as_dict(train).items()
              if k not in ("device", "checkpoint_every", "strip_every", "log_every", "compile",
                           "compile_mode", "channels_last")}
    return {"diffusion": as_dict(diffusion), "model": as_dict(model), "train": sticky,
            "data_hash": data_hash}


def build_state(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device) -> TrainState:
    torch.manual_seed(cfg.seed)  # the initial weights and dropout
    model = UNet(model_cfg).to(device)
    if use_channels_last(device, cfg.channels_last):
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr,
                                 fused=device.type == "cuda" or None)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    return TrainState(model, EMA(model, cfg.ema_decay, cfg.ema_warmup), optimizer,
                      order_gen, noise_gen)


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast where asked (auto = on CUDA); norms and the loss stay float32."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def use_channels_last(device: torch.device, mode: str) -> bool:
    """Whether the model and its inputs go channels-last (auto = on CUDA)."""
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def maybe_compile(model: nn.Module, mode: str, device: torch.device,
                  compile_mode: str = "default") -> Callable:
    """torch.compile where asked (auto = on CUDA), falling back to eager if compiling fails;
    `compile_mode` is torch.compile's mode (default, reduce-overhead, max-autotune, ...)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return model
    return _CompiledOrEager(model, compile_mode)


class _CompiledOrEager:
    """Calls the compiled module; the first call that fails to compile switches to eager.

    torch.compile defers all its work (and its failures: no compiler, an
    unsupported op) to the first call, so that is where the fallback lives.
    Shapes are static (`dynamic=False`): training drops its last partial batch
    and a denoiser compiles one batch size, so a second compile of UNet.forward
    (the EMA model's strips, sampling after training in `ddpm bench`) gets its
    own static graph instead of torch's automatic switch to a symbolic batch.
    """

    CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")

    def __init__(self, model: nn.Module, mode: str = "default"):
        self.model, self.mode, self.proven = model, mode, False
        self.compiled = torch.compile(model, mode=None if mode == "default" else mode,
                                      dynamic=False)

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            return self.model(*args)
        if self.mode in self.CUDA_GRAPH_MODES:
            # Each call is a new step for CUDA graph trees: the previous call's outputs
            # have been used (a training step's backward, a sampler step's update).
            torch.compiler.cudagraph_mark_step_begin()
        if self.proven:  # later errors (OOM, NCCL) are real errors, not compile failures
            return self.compiled(*args)
        try:
            out = self.compiled(*args)
        except Exception as err:  # noqa: BLE001 - compilation fails in many ways
            import warnings

            warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); "
                          f"running eager", stacklevel=2)
            self.compiled = None
            return self.model(*args)
        self.proven = True
        return out


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


def quartile_of(t: torch.Tensor, T: int) -> torch.Tensor:
    return (t * 4) // T


def world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed (torchrun), else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_mean(*tensors: torch.Tensor) -> None:
    """Average tensors over ranks in place (a no-op in one process)."""
    import torch.distributed as dist

    if world()[1] > 1:
        for x in tensors:
            dist.all_reduce(x)
            x /= dist.get_world_size()


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
    schedule: Schedule = make_schedule(diffusion_cfg).to(device)
    data = images.to(device)  # the whole uint8 set lives on the device: no loader
    n = data.shape[0]
    batch = min(cfg.batch_size, n)  # the global batch
    if batch % ranks:
        raise ConfigError(f"params.yaml: train.batch_size ({batch}) must divide evenly over "
                          f"{ranks} processes")
    mine = slice(rank * batch // ranks, (rank + 1) * batch // ranks)
    epoch_steps = steps_per_epoch(n, cfg.batch_size)
    module = state.model
    if ranks > 1:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(state.model, device_ids=[device] if device.type == "cuda" else None)
    forward = maybe_compile(module, cfg.compile, device, cfg.compile_mode)
    channels_last = use_channels_last(device, cfg.channels_last)
    autocast = autocast_for(device, cfg.precision)
    T = schedule.T

    for epoch in range(state.epoch, cfg.epochs):
        # --- one epoch ----------------------------------------------------
        torch.manual_seed(dropout_seed(cfg.seed, rank, epoch))
        state.model.train()
        started = time.perf_counter()
        order = torch.randperm(n, generator=state.order_gen).to(device)
        loss_sum = torch.zeros((), device=device)
        q_sum = torch.zeros(4, device=device)
        q_count = torch.zeros(4, device=device)
        window_sum, window_start, window_steps = torch.zeros((), device=device), started, 0
        for i in range(epoch_steps):
            lr = lr_at(state.step, epoch_steps, cfg)
            for group in state.optimizer.param_groups:
                group["lr"] = lr
            # Draws for the global batch, then this rank's slice of it.
            flip = torch.rand(batch, device=device, generator=state.noise_gen)[mine] < 0.5
            t = torch.randint(0, T, (batch,), device=device, generator=state.noise_gen)[mine]
            eps = torch.randn((batch, *data.shape[1:]), device=device,
                              generator=state.noise_gen)[mine]
            x0 = to_model(data[order[i * batch:(i + 1) * batch][mine]])
            if cfg.flip:
                x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
            x_t = q_sample(schedule, x0, t, eps)
            if channels_last:
                x_t = x_t.contiguous(memory_format=torch.channels_last)

            with autocast:
                eps_pred = forward(x_t, t)
            losses = loss_per_image(eps_pred, eps)  # float32, shape (B,)
            loss = losses.mean()
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
            state.optimizer.step()
            state.ema.update(state.model)
            state.step += 1

            detached = losses.detach()
            loss_sum += loss.detach()
            window_sum += loss.detach()
            q = quartile_of(t, T)
            q_sum.index_add_(0, q, detached)
            q_count.index_add_(0, q, torch.ones_like(detached))
            window_steps += 1

            if window_steps == cfg.log_every or i == epoch_steps - 1:
                _all_mean(window_sum)
                mean = (window_sum / window_steps).item()  # the host sync, once per window
                now = time.perf_counter()
                _check_finite(mean, state)
                row = {"step": state.step, "epoch": epoch + (i + 1) / epoch_steps,
                       "loss": mean, "lr": lr,
                       "images_per_s": window_steps * batch / max(now - window_start, 1e-9)}
                state.history.append(row)
                for cb in callbacks:
                    cb.on_log(row)
                window_sum.zero_()
                window_start, window_steps = now, 0

        # --- end-of-epoch maintenance -------------------------------------
        seconds = time.perf_counter() - started
        _all_mean(loss_sum, q_sum, q_count)
        epoch_loss = (loss_sum / epoch_steps).item()
        _check_finite(epoch_loss, state)
        quartiles = (q_sum / q_count.clamp(min=1)).tolist()
        state.epoch = epoch + 1
        summary = EpochSummary(epoch=state.epoch, step=state.step, loss=epoch_loss,
                               loss_quartiles=tuple(quartiles), lr=lr,
                               images_per_s=epoch_steps * batch / seconds, seconds=seconds)
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


def load_model(payload: dict[str, Any], weights: str = "ema",
               device: torch.device | str = "cpu") -> tuple[UNet, DiffusionConfig, int]:
    """Rebuild the U-Net from a models/model.pt payload: (model, diffusion config, image size)."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    cfg = payload["config"]
    model_cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in cfg["model"].items()})
    model = UNet(model_cfg)
    model.load_state_dict(payload["ema" if weights == "ema" else "model"])
    model.to(device).eval().requires_grad_(False)
    return model, DiffusionConfig(**cfg["diffusion"]), int(cfg["image_size"])

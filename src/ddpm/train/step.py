"""One optimisation step of DDPM training: the one definition the train stage and the bench run.

    draw flips, t and eps -> x0 from the epoch's data order -> x_t = q_sample(x0, t, eps)
    -> model(x_t, t) -> its error against the target (eps, v or x0: diffusion.prediction),
    weighted by t (train.loss_weighting) -> backward -> [clip] -> Adam -> EMA -> loss sums

The step is built to be captured whole in one CUDA graph (PyTorch's CUDA notes,
"whole-network capture"), so everything it reads or writes lives in a static
device buffer: the epoch's data order (written once per epoch) and a cursor into
it, the learning rate and the EMA weight (0-d tensors filled before each step),
and the loss sums. t, eps and the flips are drawn inside the step from the device
generator, in this order: flips, t, eps, each for the whole global batch (a
rank takes its slice). Nothing inside the step reads back to the host; the loop
reads the sums at its logging cadence.

On a CPU, and on CUDA with `train.cuda_graph: off`, the same code runs eagerly.
With capture on, the first GRAPH_WARMUP_STEPS steps run eagerly on a side stream
(compiling, allocating), the next is captured and every step from then on is a
replay; if capture fails, training stops with `CaptureError` (one line, naming
the cause and `train.cuda_graph: off`).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..config import DiffusionConfig, ModelConfig, TrainConfig
from ..model.diffusion import (loss_per_image, loss_weights, make_schedule, q_sample, target,
                               x0_error_scale)
from .fastpath import autocast_for, maybe_compile, use_channels_last
from ..model.pixels import to_model
from ..model.samplers import image_seed
from ..model.unet import UNet

GRAPH_WARMUP_STEPS = 3  # eager steps before capture: compiles, lazy allocations, cuDNN choices


class EMA:
    """Exponential moving average of the weights, updated in place with foreach ops.

    With warm-up the decay at update n is min(decay, (1 + n) / (10 + n)), so a
    short run is not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool):
        self.decay, self.warmup = decay, warmup
        # A deep copy keeps the device and the memory format (channels-last on CUDA):
        # foreach ops take their fast multi-tensor path only when the layouts match.
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def lerp_(ema: list[torch.Tensor], params: list[torch.Tensor], weight: torch.Tensor) -> None:
    """ema += weight * (params - ema) with a 0-d device tensor weight: the List overload
    broadcasts it without the host read a Scalar weight would need (and rounds as the
    Scalar overload does)."""
    torch._foreach_lerp_(ema, params, [weight] * len(ema))


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
    extra: dict[str, Any] = field(default_factory=dict)  # what callbacks keep across a resume

    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "order": self.order_gen.get_state(),
               "noise": self.noise_gen.get_state(), "noise_device": self.noise_gen.device.type}
        if self.noise_gen.device.type == "cuda":  # dropout on this process's GPU
            rng["cuda"] = torch.cuda.get_rng_state(self.noise_gen.device)
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                "step": self.step, "history": self.history,
                "epochs_done": self.epochs_done, "extra": self.extra, "rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        # Optimizer.load_state_dict takes every setting of the saved param groups, not only
        # Adam's moments: the LR (ours is a 0-d device tensor the step writes) and the
        # implementation flags of the device that saved it. This device's are kept.
        live = {key: self.optimizer.param_groups[0][key] for key in ("lr", *ADAM_FLAGS)
                if key in self.optimizer.param_groups[0]}
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:
            group.update(live)
        _match_layouts(self.optimizer)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state["history"])
        self.epochs_done = list(state["epochs_done"])
        self.extra = dict(state.get("extra", {}))
        torch.set_rng_state(state["rng"]["torch"])
        self.order_gen.set_state(state["rng"]["order"])
        if noise_device(state) == self.noise_gen.device.type:
            self.noise_gen.set_state(state["rng"]["noise"])
        else:
            # A CUDA generator's state (Philox: seed and offset, 16 bytes) means nothing to a
            # CPU one (Mersenne Twister, 5,056 bytes) and the reverse: the draws go on from a
            # stream of this device seeded by (the run's noise seed, the step).
            # (image_seed's derivation, with the step where it takes the image's index.)
            self.noise_gen.manual_seed(image_seed(self.noise_gen.initial_seed(), self.step))
        if "cuda" in state["rng"] and self.noise_gen.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.noise_gen.device)


def noise_device(state: dict[str, Any]) -> str:
    """The device type a checkpoint's noise generator ran on (`cpu` or `cuda`); checkpoints
    that do not say are told apart by the state's size (a CUDA generator's is 16 bytes)."""
    rng = state["rng"]
    if "noise_device" in rng:
        return rng["noise_device"]
    return "cuda" if rng["noise"].numel() == 16 else "cpu"


ADAM_FLAGS = ("fused", "capturable", "foreach")  # which implementation of Adam runs


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give loaded optimizer state its parameter's memory format and device: a checkpoint
    written with another train.channels_last would otherwise pair mismatched layouts in
    fused Adam. The step counts go where this device's Adam keeps them: on the
    parameter's device for fused or capturable Adam, a CPU float32 scalar otherwise (torch
    placed them by the saved flags)."""
    group = optimizer.param_groups[0]
    on_device = bool(group.get("fused") or group.get("capturable"))
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if not torch.is_tensor(value):
                continue
            if key == "step":
                state[key] = value.to(device=param.device if on_device else "cpu",
                                      dtype=torch.float32)
            elif value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param).copy_(value)
            elif value.device != param.device:
                state[key] = value.to(param.device)


def adam_variant(optimizer: torch.optim.Optimizer) -> str:
    """The Adam that runs, as its param groups say (`optimizer.defaults` only says how it
    was built)."""
    group = optimizer.param_groups[0]
    if group.get("fused"):
        return "fused capturable Adam" if group.get("capturable") else "fused Adam"
    return "capturable Adam" if group.get("capturable") else "Adam"


def build_state(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device) -> TrainState:
    """The model, EMA, optimizer and generators a run starts from, all from train.seed."""
    torch.manual_seed(cfg.seed)  # the initial weights
    model = UNet(model_cfg).to(device)
    if use_channels_last(device, cfg.channels_last):
        model = model.to(memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    # The LR is a 0-d tensor on the device, written before each step: a Python float
    # would be baked into a captured graph. Fused and capturable on CUDA (no host read
    # of the step count); the CPU keeps torch's default Adam, which reads a tensor LR
    # back as a Python number, so float64 there gives exactly the float LR's steps.
    lr = torch.tensor(cfg.lr, dtype=torch.float32 if cuda else torch.float64, device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=cuda or None,
                                 capturable=cuda)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    return TrainState(model, EMA(model, cfg.ema_decay, cfg.ema_warmup), optimizer,
                      order_gen, noise_gen)


def quartile_of(t: torch.Tensor, T: int) -> torch.Tensor:
    return (t * 4) // T


class TrainStep:
    """One optimisation step on `data` (uint8 N x 3 x S x S, on the device) for `state`.

        step = TrainStep(state, data, diffusion, cfg, device, rank, ranks)
        step.start_epoch(order)           # a permutation of range(N), once per epoch
        step(lr)                          # one step; state.step and the EMA count advance
        step.take_window() / step.take_epoch()  # the loss sums, read at the log cadence

    `model` is what runs the forward pass: `state.model`, or its DDP wrapper. Beside the
    training loss (weighted as train.loss_weighting says) the step sums each image's x0
    error, |x0 - x0_theta|^2 however the model predicts and weighs: a loss by t quartile
    that compares across `diffusion.prediction` and `train.loss_weighting` settings.
    """

    def __init__(self, state: TrainState, data: torch.Tensor, diffusion: DiffusionConfig,
                 cfg: TrainConfig, device: torch.device, *, rank: int = 0, ranks: int = 1,
                 model: Optional[nn.Module] = None):
        self.state, self.data, self.cfg = state, data, cfg
        self.schedule = make_schedule(diffusion).to(device)
        self.prediction = diffusion.prediction
        self.device = device
        n = data.shape[0]
        self.batch = min(cfg.batch_size, n)  # the global batch
        self.mine = slice(rank * self.batch // ranks, (rank + 1) * self.batch // ranks)
        self.steps_per_epoch = n // self.batch  # the last partial batch is dropped
        self.forward = maybe_compile(model or state.model, cfg.compile, device,
                                     cfg.compile_mode)
        self.channels_last = use_channels_last(device, cfg.channels_last)
        self.autocast = autocast_for(device, cfg.precision)
        self.params = list(state.model.parameters())
        self.ema_params = list(state.ema.model.parameters())
        self.lr = state.optimizer.param_groups[0]["lr"]

        def buffer(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        # --- the static buffers the step reads and writes ---
        self.order = buffer(n, dtype=torch.long)  # the epoch's data order
        self.cursor = buffer(dtype=torch.long)  # batches of the epoch done
        self.offsets = torch.arange(self.batch, device=device)
        self.ema_weight = buffer()  # 1 - the EMA decay of this step
        self.epoch_sum = buffer()  # sum of batch losses this epoch
        self.window_sum = buffer()  # ... since the last log
        self.q_sum, self.q_count = buffer(4), buffer(4)  # per-image losses by t quartile
        self.q_x0_sum = buffer(4)  # per-image x0 errors by t quartile
        # Per t: the loss weight, and the factor from the predicted quantity's squared
        # error to the x0 error (diffusion.x0_error_scale).
        self.weight = (None if cfg.loss_weighting == "none" else
                       loss_weights(self.prediction, cfg.loss_weighting, self.schedule,
                                    cfg.min_snr_gamma).to(device))
        self.x0_scale = x0_error_scale(self.prediction, self.schedule).float().to(device)

        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.capture_pending = want_cuda_graph(cfg, device, ranks)
        self._side = torch.cuda.Stream(device) if self.capture_pending else None
        self.calls = 0

    # --- what the loop calls ---------------------------------------------------

    def start_epoch(self, order: torch.Tensor) -> None:
        self.order.copy_(order)
        self.cursor.zero_()
        for x in (self.epoch_sum, self.window_sum, self.q_sum, self.q_count, self.q_x0_sum):
            x.zero_()

    def __call__(self, lr: float) -> None:
        state = self.state
        self.lr.fill_(lr)
        self.ema_weight.fill_(1 - state.ema.decay_at(state.ema.updates))
        if self.graph is not None:
            self.graph.replay()
        elif self.capture_pending and self.calls >= GRAPH_WARMUP_STEPS:
            self._capture()
        elif self.capture_pending:
            self._on_side_stream()
        else:
            self.body()
        self.calls += 1
        state.step += 1
        state.ema.updates += 1

    def take_window(self) -> torch.Tensor:
        """The mean batch loss since the last call, as a 0-d device tensor (not synced)."""
        window = self.window_sum.clone()
        self.window_sum.zero_()
        return window

    def take_epoch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sum of batch losses, per-quartile loss sums, per-quartile x0-error sums,
        per-quartile counts) of the epoch."""
        return (self.epoch_sum.clone(), self.q_sum.clone(), self.q_x0_sum.clone(),
                self.q_count.clone())

    @property
    def variant(self) -> str:
        """What actually runs, after any fallback: precision, layout, compile, graph, Adam."""
        compiled = getattr(self.forward, "compiled", None) is not None
        mode = getattr(self.forward, "mode", "default")
        parts = ["bf16 autocast" if isinstance(self.autocast, torch.autocast) else "fp32",
                 "channels_last" if self.channels_last else "contiguous",
                 ("torch.compile" + ("" if mode == "default" else f" ({mode})"))
                 if compiled else "eager"]
        if self.graph is not None:
            parts.append("whole-step CUDA graph")
        parts.append(adam_variant(self.state.optimizer))
        return ", ".join(parts)

    # --- the step itself ---------------------------------------------------------

    def body(self) -> None:
        """The step's device work: no host reads, no Python-side state (a replay skips it)."""
        state, cfg, data, mine = self.state, self.cfg, self.data, self.mine
        batch, T, device, gen = self.batch, self.schedule.T, self.device, state.noise_gen
        # Draws for the global batch, then this rank's slice of it.
        flip = torch.rand(batch, device=device, generator=gen)[mine] < 0.5
        t = torch.randint(0, T, (batch,), device=device, generator=gen)[mine]
        eps = torch.randn((batch, *data.shape[1:]), device=device, generator=gen)[mine]
        x0 = to_model(data[self.order[self.cursor * batch + self.offsets][mine]])
        if cfg.flip:
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
        x_t = q_sample(self.schedule, x0, t, eps)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)

        with self.autocast:
            out = self.forward(x_t, t)
        errors = loss_per_image(out, target(self.prediction, self.schedule, x0, eps, t))  # (B,)
        losses = errors if self.weight is None else errors * self.weight[t]
        loss = losses.mean()
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        state.optimizer.step()
        with torch.no_grad():
            lerp_(self.ema_params, self.params, self.ema_weight)
            detached = losses.detach()
            self.epoch_sum += loss.detach()
            self.window_sum += loss.detach()
            q = quartile_of(t, T)
            self.q_sum.index_add_(0, q, detached)
            self.q_x0_sum.index_add_(0, q, errors.detach() * self.x0_scale[t])
            self.q_count.index_add_(0, q, torch.ones_like(detached))
            self.cursor += 1

    def _on_side_stream(self) -> None:
        # Warm-up before capture runs on a side stream (CUDA notes, "whole-network capture").
        current = torch.cuda.current_stream(self.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            self.body()
        current.wait_stream(self._side)

    def _capture(self) -> None:
        """Record this step's kernels in one graph and replay it. A failed capture stops
        training: an exception inside `torch.cuda.graph` can leave the registered generator
        or the caching allocator mid-capture, so carrying on uncaptured could train on a
        broken state."""
        self.capture_pending = False
        try:
            graph = torch.cuda.CUDAGraph()
            graph.register_generator_state(self.state.noise_gen)
            self.state.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                self.body()
        except Exception as err:  # noqa: BLE001 - capture fails in many ways
            detail = " ".join(str(err).split())[:200]
            raise CaptureError(f"train.cuda_graph: on: capturing the training step in a CUDA "
                               f"graph failed ({type(err).__name__}: {detail}); set "
                               f"train.cuda_graph: off to train uncaptured") from None
        self.graph = graph
        graph.replay()


class CaptureError(RuntimeError):
    """Capturing the training step failed; training stops rather than go on uncaptured."""


def want_cuda_graph(cfg: TrainConfig, device: torch.device, ranks: int) -> bool:
    """Whether to capture the step: `on` on one CUDA process. `auto` is off until a GPU run
    has shown the captured step equal to the ordinary one and faster (docs/speed.md);
    under DDP it is off (NCCL capture not yet tried)."""
    if cfg.cuda_graph != "on":
        return False
    if device.type != "cuda":
        warnings.warn(f"train.cuda_graph: on needs a CUDA device; on {device.type} the step "
                      f"runs uncaptured", stacklevel=3)
        return False
    if ranks > 1:
        warnings.warn(f"train.cuda_graph: on is ignored with {ranks} processes: whole-step "
                      f"capture under DDP has not been shown to work yet; training uncaptured",
                      stacklevel=3)
        return False
    return True

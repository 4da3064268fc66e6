"""The GPU fast path's rules, in one place: bf16 autocast, channels-last, torch.compile with
its fallback, and the denoiser that samplers and strips call the model through.

`auto` turns each on for CUDA only: on a CPU the code runs plain fp32 eager, so a
GPU makes training fast, never correct. Which of them pays on a given GPU is
measured by `ddpm bench` (docs/speed.md), not assumed.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..config import DiffusionConfig, TrainConfig
from ..model.diffusion import make_schedule
from ..model.samplers import Denoiser, eps_denoiser


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


def denoiser(model: nn.Module, device: torch.device, precision: str = "auto",
             compile: str = "auto", compile_mode: str = "default",
             channels_last: str = "auto", *, diffusion: DiffusionConfig) -> Denoiser:
    """The noise model(x_t, t) denotes, with training's fast-path rules (auto: bf16,
    channels-last and torch.compile on CUDA; plain fp32 on a CPU); float32 out. `diffusion`
    is the model's (its file's): what its output means (`diffusion.prediction`, read by
    `samplers.eps_denoiser`) on which schedule.

    Only the first batch size seen runs compiled: the figures' few images and a
    last partial batch run eager instead of paying a recompile (tens of seconds).
    """
    autocast = autocast_for(device, precision)
    to_channels_last = use_channels_last(device, channels_last)
    if to_channels_last:
        model = model.to(memory_format=torch.channels_last)
    compiled = maybe_compile(model, compile, device, compile_mode)
    compiled_batch: Optional[int] = None  # the batch size the compiled model serves

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal compiled_batch
        if to_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if compiled_batch is None:
            compiled_batch = x.shape[0]
        forward = compiled if x.shape[0] == compiled_batch else model
        with autocast:
            return forward(x, t).float()

    return eps_denoiser(denoise, make_schedule(diffusion), diffusion.prediction)


def strip_denoiser(model: nn.Module, device: torch.device, cfg: TrainConfig,
                   diffusion: DiffusionConfig) -> Denoiser:
    """The EMA model as the strips and the in-training FID call it: training's precision,
    compile and layout rules (`denoiser`). A strip is T batch-1 calls, each a few hundred small kernels
    that the host launches one by one, so on CUDA a compiled strip replays CUDA graphs
    (torch.compile's reduce-overhead mode) whatever train.compile_mode says."""
    mode = "reduce-overhead" if device.type == "cuda" else cfg.compile_mode
    return denoiser(model, device, cfg.precision, cfg.compile, mode, cfg.channels_last,
                    diffusion=diffusion)

"""`ddpm bench`: how fast this machine trains, samples and scores, for the current params.

One run measures, on random data with the real pieces (U-Net, schedule, loss,
Adam, EMA, samplers, Inception):

- training images/s and TFLOP/s of the fast path and of plain eager float32
  (the seed's way), and their ratio;
- MFU: achieved TFLOP/s over a dense matmul peak measured in the same run;
- the projected time of 300 epochs of the 16,185 Stanford Cars images;
- sampling images/s for DDPM over all T steps and DDIM-50, timed over a few
  steps of one batch and extrapolated to the full step count;
- Inception features/s (FID), and peak memory.

A training step = forward + backward + Adam + EMA, the FLOP of one image =
3 x forward (`unet.forward_flops`, attention counted as its matmuls). It is a
benchmark that prints figures, not a test: nothing here passes or fails except
the targets printed beside the figures on a GPU (DESIGN.md, "Cost of the work").
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import atomic
from .config import Params
from .diffusion import Schedule, loss_per_image, make_schedule, q_sample
from .generate import denoiser
from .samplers import ImageNoise, sample_ddim, sample_ddpm
from .training import EMA, autocast_for, maybe_compile
from .unet import UNet, count_parameters, forward_flops

EPOCHS, DATASET_IMAGES, SAMPLES = 300, 16_185, 10_000  # the seed's run, the FID sample count
DDIM_STEPS = 50
CPU_TRAIN_BATCH, CPU_SAMPLE_BATCH = 8, 4  # a 2-core CPU takes seconds per step at batch 64

# Targets for the default model on one H200 (PASS/MISS is printed on CUDA only).
TARGET_SPEEDUP = 3.0
TARGET_MFU = 0.35
TARGET_TRAIN_S = 15 * 60
TARGET_DDPM_S = 5 * 60
TARGET_DDIM_S = 30


@dataclass(frozen=True)
class Counts:
    """Iterations of each measurement; warm-up iterations are never timed."""

    train_warmup: int
    train_steps: int
    sample_warmup: int
    sample_steps: int
    matmul_size: int
    matmul_iters: int
    inception_images: int


def counts_for(device: torch.device, quick: bool) -> Counts:
    if device.type == "cuda":
        # The first fast step compiles (about a minute); the rest take milliseconds.
        return Counts(3, 10, 2, 5, 8192, 20, 500) if quick else Counts(5, 40, 3, 20, 8192, 50, 2000)
    return Counts(2, 3, 1, 2, 2048, 3, 8) if quick else Counts(3, 10, 2, 5, 2048, 10, 64)


@dataclass(frozen=True)
class FastPath:
    """The fast training path on this device and what was turned on."""

    bf16: bool
    channels_last: bool
    compile: bool
    fused_adam: bool

    def describe(self) -> str:
        return ", ".join([
            "bf16 autocast" if self.bf16 else "fp32",
            "channels_last" if self.channels_last else "contiguous",
            "torch.compile" if self.compile else "eager",
            "fused Adam" if self.fused_adam else "Adam",
        ])


def fast_path_for(params: Params, device: torch.device) -> FastPath:
    """CUDA: bf16 + channels_last + compile + fused Adam (train.precision/compile may turn
    bf16 or compile off). CPU: bf16 where the CPU has native bf16, compile only when
    train.compile is 'on' (it takes minutes on a small CPU)."""
    cfg = params.train
    cuda = device.type == "cuda"
    cpu_bf16 = not cuda and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and (cuda or cpu_bf16))
    compile_ = cfg.compile == "on" or (cfg.compile == "auto" and cuda)
    return FastPath(bf16=bf16, channels_last=True, compile=compile_, fused_adam=True)


# ---------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_loop(step: Callable[[], None], warmup: int, iters: int,
               device: torch.device) -> tuple[float, float]:
    """(seconds of the first call, mean seconds per call after `warmup` calls)."""
    start = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)  # the only sync in the timed loop
    return first, (time.perf_counter() - start) / iters


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, iters: int) -> float:
    """TFLOP/s of a size^3 matmul loop: the practical dense peak of this device."""
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    out = torch.empty_like(a)
    _, seconds = _time_loop(lambda: torch.matmul(a, b, out=out), 3, iters, device)
    return 2 * size ** 3 / seconds / 1e12


# ---------------------------------------------------------------- training


@dataclass
class Trainer:
    """One model, optimizer and EMA, and a step() that does what the training loop does."""

    model: torch.nn.Module
    forward: Callable
    optimizer: torch.optim.Optimizer
    ema: EMA
    autocast: Any
    channels_last: bool
    schedule: Schedule
    x0: torch.Tensor
    gen: torch.Generator

    def step(self) -> None:
        batch = self.x0.shape[0]
        t = torch.randint(0, self.schedule.T, (batch,), device=self.x0.device, generator=self.gen)
        eps = torch.randn(self.x0.shape, device=self.x0.device, generator=self.gen)
        x_t = q_sample(self.schedule, self.x0, t, eps)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with self.autocast:
            eps_pred = self.forward(x_t, t)
        loss = loss_per_image(eps_pred, eps).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.ema.update(self.model)


def make_trainer(params: Params, device: torch.device, batch: int,
                 fast: Optional[FastPath]) -> Trainer:
    """`fast=None` is the seed's way: fp32, eager, contiguous, torch's default Adam."""
    torch.manual_seed(params.train.seed)
    model = UNet(params.model).to(device).train()
    if fast is not None and fast.channels_last:
        model = model.to(memory_format=torch.channels_last)
    fused = fast is not None and fast.fused_adam
    optimizer = torch.optim.Adam(model.parameters(), lr=params.train.lr, fused=fused or None)
    precision = "bf16" if fast is not None and fast.bf16 else "fp32"
    forward = maybe_compile(model, "on" if fast is not None and fast.compile else "off", device)
    gen = torch.Generator(device).manual_seed(params.train.seed + 1)
    size = params.preprocess.image_size
    x0 = torch.rand(batch, 3, size, size, device=device, generator=gen) * 2 - 1
    return Trainer(model, forward, optimizer,
                   EMA(model, params.train.ema_decay, params.train.ema_warmup),
                   autocast_for(device, precision), fast is not None and fast.channels_last,
                   make_schedule(params.diffusion).to(device), x0, gen)


EAGER_DESCRIPTION = "fp32, contiguous, eager, Adam"


def _tf32_note(device: torch.device) -> str:
    """The seed ran with torch's defaults, which on CUDA let cuDNN convolve in TF32."""
    if device.type != "cuda":
        return ""
    tf32 = torch.backends.cudnn.allow_tf32  # also read through torch >= 2.9's fp32_precision
    return " (cuDNN TF32 convolutions, torch's default)" if tf32 else ""


def _reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 160 else text[:157] + "..."


# ---------------------------------------------------------------- sampling


class _Enough(Exception):
    """Raised from a sampler's callback once the timed steps are done."""


def time_sampler(sampler: Callable, denoise: Callable, schedule: Schedule, batch: int, size: int,
                 device: torch.device, warmup: int, timed: int, seed: int, **kwargs) -> float:
    """Mean seconds per reverse step of the real sampler on a batch, after `warmup` steps.

    The sampler is stopped from its callback once the `timed` steps are done."""
    noise = ImageNoise(seed, range(batch), device)
    x_T = noise.randn((3, size, size))
    marks: dict[int, float] = {}

    def callback(i: int, t: int, x: torch.Tensor) -> None:
        if i in (warmup - 1, warmup + timed - 1):
            _sync(device)
            marks[i] = time.perf_counter()
        if i == warmup + timed - 1:
            raise _Enough

    with contextlib.suppress(_Enough):
        sampler(denoise, schedule, x_T, noise, callback=callback, **kwargs)
    return (marks[warmup + timed - 1] - marks[warmup - 1]) / timed


# ---------------------------------------------------------------- the run


class _Report:
    """Collects printed lines (for the .txt) while printing them."""

    def __init__(self, print_fn: Callable[[str], Any]):
        self.print_fn, self.lines = print_fn, []

    def __call__(self, line: str = "") -> None:
        self.lines.append(line)
        self.print_fn(line)


def _verdict(cuda: bool, ok: bool, target: str) -> str:
    return f"target {target}" + (f"  {'PASS' if ok else 'MISS'}" if cuda else "")


def _fmt_s(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 3 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_bench(params: Params, device: torch.device, quick: Optional[bool] = None,
              out_path: Optional[Path] = None, print_fn: Callable[[str], Any] = print,
              *, train_batch: Optional[int] = None, sample_batch: Optional[int] = None,
              counts: Optional[Counts] = None) -> dict[str, Any]:
    """Measure and print the figures; write them to `out_path` (JSON) and beside it (.txt).

    `quick` (default: on the CPU) takes few iterations; `counts` sets them all.
    Batches default to train.batch_size and generate.batch_size on CUDA, and to
    8 and 4 on a CPU.
    """
    started = time.perf_counter()
    device = torch.device(device)
    cuda = device.type == "cuda"
    quick = (not cuda) if quick is None else quick
    n = counts or counts_for(device, quick)
    fast = fast_path_for(params, device)
    size = params.preprocess.image_size
    batch = train_batch or (params.train.batch_size if cuda
                            else min(params.train.batch_size, CPU_TRAIN_BATCH))
    s_batch = sample_batch or (params.generate.batch_size if cuda
                               else min(params.generate.batch_size, CPU_SAMPLE_BATCH))
    say = _Report(print_fn)
    memory: dict[str, int] = {}

    model = UNet(params.model)
    n_params = count_parameters(model)
    flop_per_image = 3 * forward_flops(model, size)
    del model
    say(f"ddpm bench  {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}"
        f"  ({'quick' if quick else 'full'})")
    say(f"device: {device_name(device)}; torch {torch.__version__}")
    say(f"model: {n_params:,} parameters, {list(params.model.channels)}, image {size}x{size}, "
        f"{flop_per_image / 3e9:.2f} GFLOP forward, {flop_per_image / 1e9:.1f} GFLOP per "
        f"training image (3x)")
    note = "" if batch == params.train.batch_size else f" (train.batch_size {params.train.batch_size} lowered on {device.type})"
    s_note = "" if s_batch == params.generate.batch_size else f" (generate.batch_size {params.generate.batch_size} lowered on {device.type})"
    say(f"train batch {batch}{note}; sampling batch {s_batch}{s_note}")

    # --- peak ---------------------------------------------------------------
    peak_dtype = torch.bfloat16 if fast.bf16 else torch.float32
    peak_name = f"{'bf16' if fast.bf16 else 'fp32'} matmul {n.matmul_size}^3"
    peak = matmul_peak(device, peak_dtype, n.matmul_size, n.matmul_iters)
    say(f"peak: {peak_name}: {peak:.1f} TFLOP/s (the MFU denominator)")

    # --- training -----------------------------------------------------------
    say()
    say(f"training: forward + backward + Adam + EMA at batch {batch}, random data "
        f"({n.train_warmup} warm-up steps, {n.train_steps} timed)")
    rows = {}
    compile_note = None
    for name, path in (("eager_fp32", None), ("fast", fast)):
        _reset_peak(device)
        trainer = make_trainer(params, device, batch, path)
        try:
            first, seconds = _time_loop(trainer.step, n.train_warmup, n.train_steps, device)
        except Exception as err:  # noqa: BLE001 - compile failures come in every kind
            if path is None or not path.compile:
                raise
            compile_note = f"compile: unavailable ({_reason(err)}); fast path timed eager"
            torch._dynamo.reset()
            fast = dataclasses.replace(fast, compile=False)
            trainer = make_trainer(params, device, batch, fast)
            first, seconds = _time_loop(trainer.step, n.train_warmup, n.train_steps, device)
        ips = batch / seconds
        tflops = ips * flop_per_image / 1e12
        rows[name] = {"images_per_s": ips, "tflops": tflops, "mfu": tflops / peak,
                      "step_s": seconds, "first_step_s": first, "steps": n.train_steps,
                      "config": EAGER_DESCRIPTION + _tf32_note(device) if path is None
                      else fast.describe()}
        memory[f"train_{name}"] = _peak_memory(device)
        if name == "eager_fp32":
            del trainer  # free its weights before the fast path is measured
    speedup = rows["fast"]["images_per_s"] / rows["eager_fp32"]["images_per_s"]
    for name, label in (("eager_fp32", "eager fp32"), ("fast", "fast")):
        r = rows[name]
        say(f"  {label:<10} {r['images_per_s']:9.1f} img/s  {r['tflops']:8.2f} TFLOP/s  "
            f"{100 * r['mfu']:5.1f} % MFU  {1e3 * r['step_s']:8.1f} ms/step  "
            f"(first step {_fmt_s(r['first_step_s'])}; {r['config']})")
    if compile_note:
        say(f"  {compile_note}")
    elif not fast.compile:
        say("  compile: off (train.compile is 'auto' = CUDA only, or 'off')")
    say(f"  fast / eager fp32: {speedup:.2f}x   {_verdict(cuda, speedup >= TARGET_SPEEDUP, f'>= {TARGET_SPEEDUP:g}x')}")
    mfu = rows["fast"]["mfu"]
    say(f"  MFU (fast): {100 * mfu:.1f} %   {_verdict(cuda, mfu >= TARGET_MFU, f'>= {100 * TARGET_MFU:g} %')}")
    train_s = EPOCHS * DATASET_IMAGES / rows["fast"]["images_per_s"]
    say(f"  {EPOCHS} epochs x {DATASET_IMAGES:,} images at the fast rate: {_fmt_s(train_s)}   "
        f"{_verdict(cuda, train_s <= TARGET_TRAIN_S, f'<= {TARGET_TRAIN_S / 60:g} min')}")

    # --- sampling -----------------------------------------------------------
    _reset_peak(device)
    eval_model = trainer.ema.model  # the EMA weights, as the generate stage samples them
    if fast.channels_last:
        eval_model = eval_model.to(memory_format=torch.channels_last)
    del trainer
    precision = "bf16" if fast.bf16 else "fp32"
    denoise = denoiser(maybe_compile(eval_model, "on" if fast.compile else "off", device),
                       device, precision)
    schedule = make_schedule(params.diffusion).to(device)
    T = schedule.T
    ddim_steps = min(DDIM_STEPS, T)
    say()
    say(f"sampling: EMA model, {fast.describe().rsplit(', ', 1)[0]}; batch {s_batch}; "
        f"seconds per step timed over a few steps, extrapolated to the full step count")
    sampling = {}
    for name, sampler, total, kwargs, target in (
            (f"ddpm_{T}", sample_ddpm, T, {}, TARGET_DDPM_S),
            (f"ddim_{ddim_steps}", sample_ddim, ddim_steps,
             {"steps": ddim_steps, "eta": params.generate.eta}, TARGET_DDIM_S)):
        warmup = min(n.sample_warmup, total - 1)
        timed = min(n.sample_steps, total - warmup)
        try:
            step_s = time_sampler(sampler, denoise, schedule, s_batch, size, device, warmup,
                                  timed, params.generate.seed, **kwargs)
        except Exception as err:  # noqa: BLE001 - compiling the eval model failed
            if not fast.compile:
                raise
            say(f"  compile: unavailable for sampling ({_reason(err)}); sampling timed eager")
            torch._dynamo.reset()
            fast = dataclasses.replace(fast, compile=False)
            denoise = denoiser(eval_model, device, precision)
            step_s = time_sampler(sampler, denoise, schedule, s_batch, size, device, warmup,
                                  timed, params.generate.seed, **kwargs)
        ips = s_batch / (step_s * total)
        seconds = SAMPLES / ips
        sampling[name] = {"steps": total, "batch": s_batch, "timed_steps": timed,
                          "step_s": step_s, "images_per_s": ips, "seconds_10k": seconds}
        label = name.replace("_", "-").upper()
        say(f"  {label:<9} {ips:9.2f} img/s  ({1e3 * step_s:.1f} ms per step of {s_batch}, "
            f"{timed} timed)  {SAMPLES:,} samples: {_fmt_s(seconds)}   "
            f"{_verdict(cuda, seconds <= target, f'<= {_fmt_s(target)}')}")
    memory["sampling"] = _peak_memory(device)
    del denoise, eval_model

    # --- inception ----------------------------------------------------------
    _reset_peak(device)
    say()
    inception = measure_inception(params, device, n, say)
    if "unavailable" not in inception:
        memory["inception"] = _peak_memory(device)

    # --- memory and the record ----------------------------------------------
    say()
    if cuda:
        say("peak GPU memory allocated: " + ", ".join(
            f"{k} {v / 2**30:.2f} GiB" for k, v in memory.items()))
    else:
        memory = {"process_rss": _peak_memory(device)}
        say(f"peak RSS of this process: {memory['process_rss'] / 2**30:.2f} GiB")
    total_s = time.perf_counter() - started
    say(f"bench time: {_fmt_s(total_s)}")

    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(device), "torch": torch.__version__, "quick": quick,
        "model": {"parameters": n_params, "image_size": size,
                  "train_flop_per_image": flop_per_image, "channels": list(params.model.channels)},
        "peak": {"tflops": peak, "what": peak_name},
        "train": {"batch_size": batch, "fast_path": fast.describe(), "compile_note": compile_note,
                  **rows, "speedup": speedup,
                  "projected_seconds": {"epochs": EPOCHS, "images": DATASET_IMAGES,
                                        "seconds": train_s}},
        "sampling": sampling,
        "inception": inception,
        "memory_bytes": memory,
        "targets": {
            "speedup": {"value": speedup, "target": TARGET_SPEEDUP, "pass": speedup >= TARGET_SPEEDUP},
            "mfu": {"value": mfu, "target": TARGET_MFU, "pass": mfu >= TARGET_MFU},
            "train_seconds": {"value": train_s, "target": TARGET_TRAIN_S, "pass": train_s <= TARGET_TRAIN_S},
            "ddpm_seconds_10k": {"value": sampling[f"ddpm_{T}"]["seconds_10k"], "target": TARGET_DDPM_S,
                                 "pass": sampling[f"ddpm_{T}"]["seconds_10k"] <= TARGET_DDPM_S},
            "ddim_seconds_10k": {"value": sampling[f"ddim_{ddim_steps}"]["seconds_10k"],
                                 "target": TARGET_DDIM_S,
                                 "pass": sampling[f"ddim_{ddim_steps}"]["seconds_10k"] <= TARGET_DDIM_S},
        },
        "bench_seconds": total_s,
    }
    if out_path is not None:
        out_path = Path(out_path)
        atomic.write_json(out_path, result)
        atomic.write_text(out_path.with_suffix(".txt"), "\n".join(say.lines) + "\n")
    return result


def measure_inception(params: Params, device: torch.device, n: Counts,
                      say: Callable[[str], None]) -> dict[str, Any]:
    """Features/s of the FID network alone and through `fid.extract_features` (with
    clean-fid's CPU resize to 299x299); {"unavailable": why} when it cannot run here."""
    try:
        from . import fid

        model = fid.load_inception(device)
    except Exception as err:  # noqa: BLE001 - a missing module, package or weights file
        say(f"inception: unavailable ({_reason(err)})")
        return {"unavailable": _reason(err)}
    batch = min(params.evaluate.batch_size, n.inception_images)
    gen = torch.Generator().manual_seed(0)
    size = params.preprocess.image_size
    images = torch.randint(0, 256, (n.inception_images, 3, size, size), dtype=torch.uint8,
                           generator=gen)
    x = torch.rand(batch, 3, fid.INPUT_SIZE, fid.INPUT_SIZE, generator=gen).mul(255).to(device)
    with torch.inference_mode(), fid._full_fp32_convolutions(device):  # as extract_features runs it
        _, net_s = _time_loop(lambda: model(x), 1, max(1, n.inception_images // batch), device)
    net_ips = batch / net_s
    out = {"batch": batch, "network_images_per_s": net_ips}
    say(f"inception (TF-Inception pool3, fp32, batch {batch}):")
    say(f"  network on {device.type} (299x299 input): {net_ips:9.1f} img/s")
    try:
        fid.extract_features(images[:batch], model, batch_size=batch, device=device)  # warm-up
        start = time.perf_counter()
        feats = fid.extract_features(images, model, batch_size=batch, device=device)
        seconds = time.perf_counter() - start  # extract_features ends with a host copy: synced
    except Exception as err:  # noqa: BLE001 - e.g. clean-fid missing where only torch is
        say(f"  extract_features: unavailable ({_reason(err)})")
        return out
    assert feats.shape == (len(images), fid.FEATURE_DIM)
    ips = len(images) / seconds
    out.update(images_per_s=ips, images=len(images), seconds_10k=SAMPLES / ips)
    say(f"  extract_features (clean resize on the CPU + network): {ips:9.1f} img/s over "
        f"{len(images)} images; {SAMPLES:,} samples: {_fmt_s(SAMPLES / ips)}")
    return out

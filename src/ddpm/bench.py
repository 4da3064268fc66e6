"""`ddpm bench`: how fast this machine trains, samples and scores, for the current params.

One run measures, on random data with the real pieces (U-Net, schedule, loss,
Adam, EMA, samplers, Inception):

- training images/s and TFLOP/s of the fast path and of plain eager float32
  (the seed's way), and their ratio;
- MFU: achieved TFLOP/s over a dense matmul peak measured in the same run;
- what the train stage adds at an epoch's end: the reverse strip and the time
  training waits for a checkpoint (and what a synchronous save would wait);
- the projected time of the train stage for 300 epochs of the 16,185 Stanford
  Cars images: steps at the fast rate, plus strips, checkpoint waits and the
  in-training FID at the params' cadence;
- sampling images/s for DDPM over all T steps and DDIM-50, timed over a few
  steps of one batch and extrapolated to the full step count;
- Inception features/s (FID), and peak memory.

A training step is the train stage's own (`step.TrainStep`: draws, noising,
forward, backward, Adam, EMA, loss sums), run on random images; the variant
printed is what ran after any fallback. The FLOP of one training image is 3 x
forward (`unet.forward_flops`, attention counted as its matmuls).
This prints figures; it is not a test. Targets for the default model on one
H200 (DESIGN.md, "Cost of the work") are printed beside the figures, with
PASS/MISS on CUDA only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import atomic, checkpoint
from .callbacks import due
from .config import Params, TrainConfig
from .diffusion import Schedule, make_schedule
from .fastpath import denoiser, strip_denoiser
from .samplers import ImageNoise, sample_ddim, sample_ddpm
from .step import TrainStep, build_state
from .training import lr_at
from .unet import UNet, count_parameters, forward_flops

EPOCHS, DATASET_IMAGES, SAMPLES = 300, 16_185, 10_000  # the seed's run; the FID sample count
DDIM_STEPS = 50
JIT_WARMUP_CALLS = 3  # calls before TorchScript (the FID network) runs its optimized graph
CPU_TRAIN_BATCH, CPU_SAMPLE_BATCH = 8, 4  # a 2-core CPU takes seconds per step even at these

TARGETS = {  # name: (target, True when the figure must be at least the target)
    "speedup": (2.5, True),
    "mfu": (0.20, True),
    "train_seconds": (25 * 60, False),
    "ddpm_seconds_10k": (5 * 60, False),
    "ddim_seconds_10k": (30, False),
}


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


TRAIN_MIN_SECONDS_CPU = 3.0  # of timed training steps per variant, on a CPU


def counts_for(device: torch.device, quick: bool) -> Counts:
    if device.type == "cuda":
        # The first fast step compiles (about a minute); later ones take milliseconds.
        return Counts(3, 10, 2, 5, 8192, 20, 500) if quick else Counts(5, 40, 3, 20, 8192, 50, 2000)
    return Counts(2, 3, 1, 2, 2048, 3, 8) if quick else Counts(3, 10, 2, 5, 2048, 10, 64)


# ---------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_loop(step: Callable[[], Any], warmup: int, iters: int,
               device: torch.device, min_seconds: float = 0.0) -> tuple[float, float, int]:
    """(seconds of the first call, mean seconds per call after `warmup` calls, calls timed).

    At least `iters` calls are timed, and on a CPU more until `min_seconds` have passed
    (a GPU's loop is never synced inside, so it times exactly `iters`)."""
    start = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    _sync(device)
    start, calls = time.perf_counter(), 0
    while calls < iters or (device.type == "cpu" and time.perf_counter() - start < min_seconds):
        step()
        calls += 1
    _sync(device)  # the only sync of the timed loop
    return first, (time.perf_counter() - start) / calls, calls


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, iters: int,
                rounds: int = 3) -> float:
    """TFLOP/s of a size^3 matmul loop, the best of `rounds`: the practical dense peak."""
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    out = torch.empty_like(a)
    seconds = min(_time_loop(lambda: torch.matmul(a, b, out=out), 2, iters, device)[1]
                  for _ in range(rounds))
    return 2 * size ** 3 / seconds / 1e12


def bf16_native(device: torch.device) -> bool:
    """Whether the device multiplies bf16 natively: then a bf16 matmul is its peak (the MFU
    denominator) whatever precision training uses. An fp32 peak flatters fp32 training:
    on a 2-core CPU, fp32 training measured faster than a 2048^3 fp32 matmul."""
    if device.type == "cuda":
        return True
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 160 else text[:157] + "..."


# ---------------------------------------------------------------- training


def describe(bf16: bool, channels_last: bool, compiled: bool, compile_mode: str = "default") -> str:
    compiled_as = "torch.compile" + ("" if compile_mode == "default" else f" ({compile_mode})")
    return ", ".join(["bf16 autocast" if bf16 else "fp32",
                      "channels_last" if channels_last else "contiguous",
                      compiled_as if compiled else "eager"])


class BenchStep:
    """The train stage's own step (`step.TrainStep`, as `training.train` builds it) on random
    uint8 images, with the loop's epoch restarts and LR schedule around it."""

    DATA_BATCHES = 8  # batches of random images, cycled as epochs

    def __init__(self, params: Params, cfg: TrainConfig, device: torch.device, batch: int):
        cfg = dataclasses.replace(cfg, batch_size=batch)
        self.cfg, self.device = cfg, device
        state = build_state(params.model, cfg, device)
        size = params.preprocess.image_size
        gen = torch.Generator().manual_seed(cfg.seed)
        data = torch.randint(0, 256, (batch * self.DATA_BATCHES, 3, size, size),
                             dtype=torch.uint8, generator=gen).to(device)
        self.step = TrainStep(state, data, make_schedule(params.diffusion).to(device), cfg,
                              device)
        self.state, self.batch, self.gen, self.calls = state, batch, gen, 0
        self.fallbacks: list[str] = []  # what fell back (compile, capture), and why

    def __call__(self) -> None:
        steps = self.step.steps_per_epoch
        if self.calls % steps == 0:
            self.step.start_epoch(torch.randperm(len(self.step.data), generator=self.gen))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.step(lr_at(self.state.step, steps, self.cfg))
        self.fallbacks += [str(w.message) for w in caught]
        self.calls += 1

    @property
    def variant(self) -> str:
        return self.step.variant

    @property
    def compiled(self) -> bool:
        return getattr(self.step.forward, "compiled", None) is not None


def fast_step(params: Params, device: torch.device, batch: int) -> BenchStep:
    """The step the train stage runs for these params (its precision, layout, compile,
    CUDA-graph and Adam rules)."""
    return BenchStep(params, params.train, device, batch)


def eager_step(params: Params, device: torch.device, batch: int) -> BenchStep:
    """The same step the seed's way: fp32, contiguous, eager, no graph (Adam stays fused on
    CUDA, which only makes this baseline faster than the seed's)."""
    cfg = dataclasses.replace(params.train, precision="fp32", compile="off",
                              channels_last="off", cuda_graph="off")
    return BenchStep(params, cfg, device, batch)


def measure_training(step: BenchStep, n: Counts, device: torch.device) -> dict[str, Any]:
    """Seconds per step after warm-up; `variant` is what ran after any fallback."""
    # A tiny model's CPU step takes milliseconds: 3 of them varied by 30 % between runs.
    first, seconds, timed = _time_loop(step, n.train_warmup, n.train_steps, device,
                                       min_seconds=TRAIN_MIN_SECONDS_CPU)
    return {"images_per_s": step.batch / seconds, "step_s": seconds, "first_step_s": first,
            "timed_steps": timed, "config": step.variant,
            "fallbacks": sorted(set(step.fallbacks))}


def _tf32_note(device: torch.device) -> str:
    """The seed ran with torch's defaults, which on CUDA let cuDNN convolve in TF32."""
    if device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return " (cuDNN TF32 convolutions, torch's default)"
    return ""


# ---------------------------------------------------------------- sampling


class _Enough(Exception):
    """Raised from a sampler's callback once the timed steps are done."""


def time_sampler(sampler: Callable, denoise: Callable, schedule: Schedule, batch: int, size: int,
                 device: torch.device, warmup: int, timed: int, seed: int, **kwargs: Any) -> float:
    """Mean seconds per reverse step of the real sampler on one batch, after `warmup` steps.

    The sampler is stopped from its callback once the `timed` steps are done.
    """
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


def _time_denoiser(make: Callable[[bool], Callable], compiled: bool, say: Callable[[str], None],
                   what: str, **timing: Any) -> tuple[float, float, Callable]:
    """(seconds of a first call, which compiles; `time_sampler`'s seconds per step; the
    denoiser timed): `make(compiled)` builds the denoiser; if compiling it fails, that
    is said and it is timed eager."""

    def run(denoise: Callable) -> tuple[float, float]:
        batch, size, device = timing["batch"], timing["size"], timing["device"]
        x = torch.zeros(batch, 3, size, size, device=device)
        t = torch.zeros(batch, dtype=torch.long, device=device)
        start = time.perf_counter()
        with torch.no_grad():  # as the samplers call it: one compile serves both
            denoise(x, t)
        _sync(device)
        return time.perf_counter() - start, time_sampler(denoise=denoise, **timing)

    denoise = make(compiled)
    try:
        return (*run(denoise), denoise)
    except Exception as err:  # noqa: BLE001 - compiling the eval model failed
        if not compiled:
            raise
        say(f"  compile: unavailable for {what} ({_reason(err)}); {what} timed eager")
        torch._dynamo.reset()
        denoise = make(False)
        return (*run(denoise), denoise)


def measure_sampling(params: Params, device: torch.device, batch: int, n: Counts,
                     say: Callable[[str], None], *, bf16: bool, channels_last: bool,
                     compiled: bool) -> dict[str, dict[str, float]]:
    """DDPM over all T steps and DDIM-50 with an eval-mode U-Net (as `checkpoint.load_model`
    gives the generate stage), with the fast training path's autocast, memory format
    and compile."""
    torch.manual_seed(params.train.seed)
    model = UNet(params.model).to(device).eval().requires_grad_(False)
    precision = "bf16" if bf16 else "fp32"
    layout = "on" if channels_last else "off"
    schedule = make_schedule(params.diffusion).to(device)
    size, T = params.preprocess.image_size, schedule.T
    ddim_steps = min(DDIM_STEPS, T)
    say(f"sampling: eval U-Net, {describe(bf16, channels_last, compiled)}; batch {batch}; "
        f"time per step measured over a few steps, extrapolated to the full step count")
    figures = {}

    built: dict[bool, Callable] = {}  # compiled or not: one denoiser each, for both samplers

    def make(compile_it: bool) -> Callable:
        if compile_it not in built:
            built[compile_it] = denoiser(model, device, precision, "on" if compile_it else "off",
                                         channels_last=layout)
        return built[compile_it]

    for name, sampler, total, kwargs in (
            ("ddpm", sample_ddpm, T, {}),
            ("ddim", sample_ddim, ddim_steps, {"steps": ddim_steps, "eta": params.generate.eta})):
        warmup = min(n.sample_warmup, total - 1)
        timed = min(n.sample_steps, total - warmup)
        first_s, step_s, used = _time_denoiser(
            make, compiled, say, "sampling", sampler=sampler, schedule=schedule, batch=batch,
            size=size, device=device, warmup=warmup, timed=timed, seed=params.generate.seed,
            **kwargs)
        compiled = compiled and used is built.get(True)  # after a fallback, eager from then on
        ips = batch / (step_s * total)
        figures[name] = {"steps": total, "batch": batch, "timed_steps": timed, "step_s": step_s,
                         "first_call_s": first_s, "images_per_s": ips,
                         "seconds_10k": SAMPLES / ips}
    return figures


# ---------------------------------------------------------------- epoch ends


def measure_epoch_end(trainer: BenchStep, params: Params, device: torch.device, n: Counts,
                      say: Callable[[str], None], workdir: Path) -> dict[str, Any]:
    """What the train stage adds to an epoch's steps: the reverse strip (T batch-1 calls of
    the EMA model through `callbacks.strip_denoiser`, as the train stage runs them) and
    the checkpoint (`checkpoint.BackgroundSaver`; a synchronous save, the old way, beside)."""
    cfg = params.train
    schedule = make_schedule(params.diffusion).to(device)
    T, size = schedule.T, params.preprocess.image_size
    warmup = min(n.sample_warmup, T - 1)
    timed = min(n.sample_steps, T - warmup)
    strip_first_s, strip_step_s, _ = _time_denoiser(
        lambda c: strip_denoiser(trainer.state.ema.model, device,
                                 dataclasses.replace(cfg, compile="on" if c else "off")),
        trainer.compiled, say, "the strip", sampler=sample_ddpm, schedule=schedule, batch=1,
        size=size, device=device, warmup=warmup, timed=timed, seed=cfg.seed)
    out: dict[str, Any] = {"strip_seconds": strip_step_s * T, "strip_step_s": strip_step_s,
                           "strip_first_call_s": strip_first_s}

    payload = trainer.state.state_dict()
    saver = checkpoint.BackgroundSaver()
    with tempfile.TemporaryDirectory(prefix=".bench-", dir=workdir) as tmp:
        path = Path(tmp) / "last.pt"
        start = time.perf_counter()
        checkpoint.save(path, payload)
        sync_s = time.perf_counter() - start
        start = time.perf_counter()
        saver.save(path, payload)  # the first background save also allocates its buffers
        first_stall_s = time.perf_counter() - start
        saver.wait()
        start = time.perf_counter()
        saver.save(path, payload)
        stall_s = time.perf_counter() - start
        saver.wait()
        write_s = time.perf_counter() - start
        out.update(checkpoint_bytes=path.stat().st_size, checkpoint_sync_s=sync_s,
                   checkpoint_first_stall_s=first_stall_s, checkpoint_stall_s=stall_s,
                   checkpoint_write_s=write_s)
    say(f"epoch ends (the train stage's strip every {cfg.strip_every} and checkpoint every "
        f"{cfg.checkpoint_every} epochs):")
    say(f"  reverse strip: {T} batch-1 steps of the EMA model, {_fmt_s(out['strip_seconds'])} "
        f"({_fmt_s(strip_step_s)} per step; {timed} timed); the first call "
        f"{_fmt_s(strip_first_s)} (compiling, where it compiles)")
    say(f"  checkpoint {out['checkpoint_bytes'] / 2**20:,.0f} MiB: training waits "
        f"{_fmt_s(stall_s)} (host copy; the first {_fmt_s(first_stall_s)}, allocating), written "
        f"in {_fmt_s(write_s)} in the background; a synchronous save waits {_fmt_s(sync_s)} "
        f"({sync_s / stall_s:.0f}x)")
    return out


def project_stage(step_s: float, first_step_s: float, batch: int, extras: dict[str, Any],
                  cfg: Any) -> dict[str, float]:
    """Seconds of the train stage for EPOCHS epochs of DATASET_IMAGES at `step_s` per step,
    with a strip and a checkpoint at train.strip_every / checkpoint_every. A background
    write that outlasts the epochs until the next checkpoint delays that one. One-off
    costs: what the first step, strip call and checkpoint take beyond the later ones
    (compiling, allocating buffers)."""
    epoch_s = DATASET_IMAGES // batch * step_s
    strips = sum(due(e, cfg.strip_every, EPOCHS) for e in range(1, EPOCHS + 1))
    saves = sum(due(e, cfg.checkpoint_every, EPOCHS) for e in range(1, EPOCHS + 1))
    between = cfg.checkpoint_every * epoch_s  # >= 1, checked when params load
    waits = extras["checkpoint_stall_s"] + max(0.0, extras["checkpoint_write_s"] - between)
    one_off = (max(0.0, first_step_s - step_s)
               + (max(0.0, extras["strip_first_call_s"] - extras["strip_step_s"]) if strips else 0)
               + (max(0.0, extras["checkpoint_first_stall_s"] - extras["checkpoint_stall_s"])
                  if saves else 0))
    evals = sum(due(e, cfg.fid_every, EPOCHS) for e in range(1, EPOCHS + 1))
    if evals:
        one_off += extras.get("fid_first_call_s", 0.0)
    parts = {"steps_seconds": EPOCHS * epoch_s, "strip_seconds": strips * extras["strip_seconds"],
             "checkpoint_seconds": saves * waits,
             "fid_seconds": evals * extras.get("fid_eval_s", 0.0), "one_off_seconds": one_off}
    return {**parts, "seconds": sum(parts.values()), "fid_evaluations": evals}


def fid_eval_cost(cfg: TrainConfig, T: int, ddim: dict[str, Any],  # noqa: N803
                  inception: dict[str, Any]) -> dict[str, float]:
    """Seconds of one in-training FID (`train_fid.FidEvaluator`): fid_samples images x
    fid_steps DDIM steps at the measured DDIM cost per image-step, plus their Inception
    features at the measured rate; its first call also compiles the sampling model (the
    DDIM first call beyond a step). Measured at generate.batch_size, where the evaluator
    samples in batches of up to 500."""
    per_image_step = ddim["step_s"] / ddim["batch"]
    features_s = (cfg.fid_samples / inception["images_per_s"]
                  if "images_per_s" in inception else 0.0)
    steps = min(cfg.fid_steps, T)
    return {"fid_eval_s": cfg.fid_samples * steps * per_image_step + features_s,
            "fid_first_call_s": max(0.0, ddim["first_call_s"] - ddim["step_s"])}


# ---------------------------------------------------------------- inception


def measure_inception(params: Params, device: torch.device, n: Counts,
                      say: Callable[[str], None]) -> dict[str, Any]:
    """Features/s of the FID network alone and through `fid.extract_features` (with
    the resize to 299x299 on the device); {"unavailable": why} when it cannot run here."""
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
        # TorchScript's profiling executor optimizes the graph on the second and third calls
        # (seconds on a GPU): with fewer warm-up calls an H200 measured 513 img/s, not 2,135.
        _, net_s, _ = _time_loop(lambda: model(x), JIT_WARMUP_CALLS,
                              max(1, n.inception_images // batch), device)
    out: dict[str, Any] = {"batch": batch, "network_images_per_s": batch / net_s}
    say(f"inception (TF-Inception pool3, fp32, batch {batch}):")
    say(f"  network alone on {device.type} (299x299 input)  {_num(batch / net_s):>9} img/s")
    try:
        fid.extract_features(images[:batch], model, batch_size=batch, device=device)  # warm-up
        start = time.perf_counter()
        features = fid.extract_features(images, model, batch_size=batch, device=device)
        seconds = time.perf_counter() - start  # extract_features ends with a host copy: synced
    except Exception as err:  # noqa: BLE001 - e.g. out of memory at this batch
        say(f"  extract_features: unavailable ({_reason(err)})")
        return out
    assert features.shape == (len(images), fid.FEATURE_DIM)
    ips = len(images) / seconds
    out.update(images_per_s=ips, images=len(images), seconds_10k=SAMPLES / ips)
    say(f"  extract_features (resize + network)        {_num(ips):>9} img/s over {len(images)} "
        f"images; {SAMPLES:,} images: {_fmt_s(SAMPLES / ips)}")
    return out


# ---------------------------------------------------------------- the run


class _Report:
    """Prints lines and keeps them for the .txt file."""

    def __init__(self, print_fn: Callable[[str], Any]):
        self.print_fn, self.lines = print_fn, []

    def __call__(self, line: str = "") -> None:
        self.lines.append(line)
        self.print_fn(line)


def _num(x: float) -> str:
    """Three significant figures, without scientific notation for everyday sizes."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _fmt_s(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 3 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:,.1f} h"


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


def host_load() -> tuple[Optional[float], int]:
    """(1-minute load average, CPU cores this process may use): other work on the
    host slows every figure, on a small CPU most of all."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return (os.getloadavg()[0] if hasattr(os, "getloadavg") else None), cores


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

    `quick` (default: on a CPU) takes few iterations; `counts` sets them all.
    Batches default to train.batch_size and generate.batch_size on CUDA, and
    to at most 8 and 4 on a CPU.
    """
    started = time.perf_counter()
    device = torch.device(device)
    cuda = device.type == "cuda"
    quick = (not cuda) if quick is None else quick
    n = counts or counts_for(device, quick)
    size = params.preprocess.image_size
    batch = train_batch or (params.train.batch_size if cuda
                            else min(params.train.batch_size, CPU_TRAIN_BATCH))
    s_batch = sample_batch or (params.generate.batch_size if cuda
                               else min(params.generate.batch_size, CPU_SAMPLE_BATCH))
    say = _Report(print_fn)
    memory: dict[str, int] = {}

    def verdict(name: str, value: float, shown: str) -> str:
        target, at_least = TARGETS[name]
        ok = value >= target if at_least else value <= target
        return f"target {'>=' if at_least else '<='} {shown}" + (
            f"  {'PASS' if ok else 'MISS'}" if cuda else "")

    # --- header -------------------------------------------------------------
    model = UNet(params.model)
    n_params = count_parameters(model)
    flop_per_image = 3 * forward_flops(model, size)
    del model
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    say(f"ddpm bench  {date}  ({'quick' if quick else 'full'})")
    load, cores = host_load()
    say(f"device: {device_name(device)}; torch {torch.__version__}; host load average "
        f"{'unknown' if load is None else f'{load:.2f}'} on {cores} cores at the start")
    say(f"model: {n_params:,} parameters, channels {list(params.model.channels)}, "
        f"{size}x{size} images, {flop_per_image / 3e9:.2f} GFLOP forward, "
        f"{flop_per_image / 1e9:.1f} GFLOP per training image (3x forward)")
    lowered = [f"{key} {value} lowered to {used} on the {device.type}" for key, value, used in (
        ("train.batch_size", params.train.batch_size, batch),
        ("generate.batch_size", params.generate.batch_size, s_batch)) if value != used]
    say(f"batches: training {batch}, sampling {s_batch}"
        + (f" ({'; '.join(lowered)})" if lowered else ""))

    bf16 = bf16_native(device)
    peak_name = f"{'bf16' if bf16 else 'fp32'} matmul {n.matmul_size}^3"
    peak = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32,
                       n.matmul_size, n.matmul_iters)
    say(f"peak: {peak_name} on this {device.type}: {_num(peak)} TFLOP/s (the MFU denominator)")

    # --- training -----------------------------------------------------------
    say()
    say(f"training: forward + backward + Adam + EMA on random data "
        f"({n.train_warmup} warm-up steps, then {n.train_steps} timed"
        + (f", or more until {TRAIN_MIN_SECONDS_CPU:g} s have passed" if device.type == "cpu" else "")
        + ")")
    train: dict[str, Any] = {"batch_size": batch}
    _reset_peak(device)
    train["eager_fp32"] = measure_training(eager_step(params, device, batch), n, device)
    train["eager_fp32"]["config"] += _tf32_note(device)
    memory["train_eager_fp32"] = _peak_memory(device)
    _reset_peak(device)
    fast = fast_step(params, device, batch)
    train["fast"] = measure_training(fast, n, device)
    memory["train_fast"] = _peak_memory(device)
    for name in ("eager_fp32", "fast"):
        figures = train[name]
        figures["tflops"] = figures["images_per_s"] * flop_per_image / 1e12
        figures["mfu"] = figures["tflops"] / peak
        say(f"  {name.replace('_', ' '):<10} {_num(figures['images_per_s']):>9} img/s "
            f"{_num(figures['tflops']):>8} TFLOP/s {100 * figures['mfu']:5.1f} % MFU  "
            f"{_fmt_s(figures['step_s'])}/step ({figures['timed_steps']} timed), first "
            f"{_fmt_s(figures['first_step_s'])}  "
            f"[{figures['config']}]")
    for reason in train["fast"]["fallbacks"]:
        say(f"  fell back: {reason}")
    if not fast.compiled:
        say(f"  compile: off (train.compile is {params.train.compile!r}"
            + ("; compiling failed" if train["fast"]["fallbacks"] else "; 'auto' compiles on CUDA")
            + ")")
    if train["fast"]["config"] == train["eager_fp32"]["config"]:
        say("  the fast path is the seed's here: training turns bf16, channels_last and fused "
            "Adam on for CUDA (train.precision: bf16, train.channels_last: on and "
            "train.compile: on force those three)")
    speedup = train["fast"]["images_per_s"] / train["eager_fp32"]["images_per_s"]
    mfu = train["fast"]["mfu"]
    train["speedup"] = speedup
    say(f"  fast / eager fp32: {speedup:.2f}x   {verdict('speedup', speedup, '2.5x')}")
    say(f"  MFU of the fast path: {100 * mfu:.1f} %   {verdict('mfu', mfu, '20 %')}")

    # --- epoch ends and the whole train stage -------------------------------
    say()
    workdir = Path(out_path).parent if out_path is not None else Path.cwd()
    workdir.mkdir(parents=True, exist_ok=True)
    train["epoch_end"] = measure_epoch_end(fast, params, device, n, say, workdir)

    # --- sampling -----------------------------------------------------------
    say()
    _reset_peak(device)
    path = {"bf16": isinstance(fast.step.autocast, torch.autocast),
            "channels_last": fast.step.channels_last, "compiled": fast.compiled}
    del fast  # its weights, gradients and Adam state
    sampling = measure_sampling(params, device, s_batch, n, say, **path)
    memory["sampling"] = _peak_memory(device)
    for name, key, shown in (("ddpm", "ddpm_seconds_10k", "5 min"),
                             ("ddim", "ddim_seconds_10k", "30 s")):
        fig = sampling[name]
        say(f"  {name.upper()}-{fig['steps']:<4} {_num(fig['images_per_s']):>9} img/s  "
            f"({_fmt_s(fig['step_s'])} per step of {fig['batch']}; {fig['timed_steps']} steps "
            f"timed; first call {_fmt_s(fig['first_call_s'])})  {SAMPLES:,} samples: "
            f"{_fmt_s(fig['seconds_10k'])}   "
            f"{verdict(key, fig['seconds_10k'], shown)}")

    # --- inception ----------------------------------------------------------
    say()
    _reset_peak(device)
    inception = measure_inception(params, device, n, say)
    if "unavailable" not in inception:
        memory["inception"] = _peak_memory(device)

    # --- the whole train stage ----------------------------------------------
    say()
    train["epoch_end"].update(fid_eval_cost(params.train, params.diffusion.steps,
                                            sampling["ddim"], inception))
    projected = project_stage(train["fast"]["step_s"], train["fast"]["first_step_s"], batch,
                              train["epoch_end"], params.train)
    train["projected"] = {"epochs": EPOCHS, "images": DATASET_IMAGES, **projected}
    train_s = projected["seconds"]
    cfg = params.train
    say(f"the train stage, {EPOCHS} epochs x {DATASET_IMAGES:,} images "
        f"(step variant: {train['fast']['config']}):")
    say(f"  steps at the fast rate {_fmt_s(projected['steps_seconds'])} + strips "
        f"{_fmt_s(projected['strip_seconds'])} + checkpoint waits "
        f"{_fmt_s(projected['checkpoint_seconds'])} + in-training FID "
        f"{_fmt_s(projected['fid_seconds'])} + once (compiling, allocating) "
        f"{_fmt_s(projected['one_off_seconds'])} = {_fmt_s(train_s)}   "
        f"{verdict('train_seconds', train_s, '25 min')}")
    if cfg.fid_every:
        say(f"  in-training FID: {projected['fid_evaluations']} evaluations of "
            f"{cfg.fid_samples} DDIM-{cfg.fid_steps} samples, "
            f"{_fmt_s(train['epoch_end']['fid_eval_s'])} each "
            f"({projected['fid_seconds'] / max(train_s, 1e-9):.0%} of the stage)")

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

    values = {"speedup": speedup, "mfu": mfu, "train_seconds": train_s,
              "ddpm_seconds_10k": sampling["ddpm"]["seconds_10k"],
              "ddim_seconds_10k": sampling["ddim"]["seconds_10k"]}
    result = {
        "date": date, "device": device_name(device), "torch": torch.__version__, "quick": quick,
        "host": {"load_average_1min": load, "cores": cores},
        "model": {"parameters": n_params, "channels": list(params.model.channels),
                  "image_size": size, "train_flop_per_image": flop_per_image},
        "peak": {"tflops": peak, "what": peak_name},
        "train": train,
        "sampling": sampling,
        "inception": inception,
        "memory_bytes": memory,
        "targets": {k: {"value": v, "target": TARGETS[k][0],
                        "pass": v >= TARGETS[k][0] if TARGETS[k][1] else v <= TARGETS[k][0]}
                    for k, v in values.items()},
        "bench_seconds": total_s,
    }
    if out_path is not None:
        out_path = Path(out_path)
        atomic.write_json(out_path, result)
        atomic.write_text(out_path.with_suffix(".txt"), "\n".join(say.lines) + "\n")
    return result

"""`ddpm bench`: how fast this machine trains, samples and scores, for the current params.

One run measures, with the real pieces on random data (the train stage's own step,
`train.step.TrainStep`; the samplers; the strip and checkpoint writer; Inception):
training images/s, TFLOP/s and MFU of the fast path and of plain eager fp32, and their
ratio; what an epoch's end adds (the reverse strip, the checkpoint wait); sampling
images/s of DDPM over all T steps and of every other sampler at 50 model evaluations;
Inception features/s; peak memory; and
the projected train stage for 300 epochs of the 16,185 Stanford Cars images.

Every timing comes from `torch.utils.benchmark.Timer`: a call timed alone first (it
compiles, allocates), then `blocked_autorange` for at least the budget's seconds (3 s
of training steps on a CPU, where a tiny model's steps vary by 30 % over a few), with
the GPU synchronised by the Timer. The FLOP of a training image is 3 x forward
(`model.unet.forward_flops`). This prints figures; it is not a test. Targets for the
seed model on one H200 (DESIGN.md) are printed beside them, PASS/MISS on CUDA only.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .. import atomic
from ..config import Params, TrainConfig, default_eta
from ..model.diffusion import Schedule, make_schedule, schedule_from_betas
from ..model.samplers import SAMPLERS, ImageNoise, sample_ddpm
from ..model.unet import UNet, count_parameters, forward_flops
from ..train import checkpoint
from ..train.callbacks import due
from ..train.fastpath import denoiser, strip_denoiser
from ..train.loop import lr_at
from ..train.step import TrainStep, build_state
from .bench_report import render
from .machine import (benchmark, bf16_native, device_name, host_load, matmul_peak, peak_memory,
                      train_batch)

EPOCHS, DATASET_IMAGES, SAMPLES = 300, 16_185, 10_000  # the seed's run; the FID sample count
DDIM_STEPS = 50
CPU_SAMPLE_BATCH = 4  # a CPU's sampling images/s hardly depend on the batch
TARGETS = {  # name: (target, True when the figure must be at least the target)
    "speedup": (2.5, True), "mfu": (0.20, True), "train_seconds": (25 * 60, False),
    "ddpm_seconds_10k": (5 * 60, False), "ddim_seconds_10k": (30, False)}


@dataclass(frozen=True)
class Budget:
    """How long each measurement runs (blocked_autorange's min_run_time) and its sizes:
    seconds per training variant and per sampler, model evaluations in one timed sampler
    run, the peak's matmul size and seconds, and images for the Inception timing."""

    train_s: float
    sample_s: float
    sample_evals: int
    matmul_size: int
    matmul_s: float
    inception_images: int


def budget_for(device: torch.device, quick: bool) -> Budget:
    if device.type == "cuda":
        return Budget(2.0, 1.0, 5, 8192, 1.0, 500) if quick else Budget(5.0, 3.0, 10, 8192, 3.0, 2000)
    return Budget(3.0, 1.0, 2, 2048, 1.0, 8) if quick else Budget(10.0, 3.0, 5, 2048, 3.0, 64)


# ---------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], min_run_time: float) -> dict[str, float]:
    """{first_s: the first call alone, per_call_s: the mean of later ones, calls: how many}."""
    first = once(fn)
    later = benchmark().Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
                              ).blocked_autorange(min_run_time=min_run_time)  # default: 1
    return {"first_s": first, "per_call_s": later.mean,
            "calls": len(later.raw_times) * later.number_per_run}


def once(fn: Callable[[], Any]) -> float:
    """Seconds of one call, on torch.utils.benchmark's clock (it synchronises the GPU):
    for first calls (compiling) and one-off work, which Timer.timeit would repeat."""
    clock = benchmark().utils.timer.timer
    start = clock()
    fn()
    return clock() - start


def reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 160 else text[:157] + "..."


# ---------------------------------------------------------------- training


class BenchStep:
    """The train stage's own step (`train.step.TrainStep`, as `train.loop.train` builds it)
    on random uint8 images, with the loop's epoch restarts and LR schedule around it."""

    DATA_BATCHES = 8  # batches of random images, cycled as epochs

    def __init__(self, params: Params, cfg: TrainConfig, device: torch.device, batch: int):
        cfg = dataclasses.replace(cfg, batch_size=batch)
        self.cfg, self.device, self.batch = cfg, device, batch
        self.state = build_state(params.model, cfg, device)
        size = params.preprocess.image_size
        self.gen = torch.Generator().manual_seed(cfg.seed)
        data = torch.randint(0, 256, (batch * self.DATA_BATCHES, 3, size, size),
                             dtype=torch.uint8, generator=self.gen).to(device)
        self.step = TrainStep(self.state, data, params.diffusion, cfg, device)
        self.calls, self.fallbacks = 0, []  # what fell back (compile), and why

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
    """The step the train stage runs for these params (precision, layout, compile, graph)."""
    return BenchStep(params, params.train, device, batch)


def eager_step(params: Params, device: torch.device, batch: int) -> BenchStep:
    """The same step the seed's way: fp32, contiguous, eager, no graph."""
    cfg = dataclasses.replace(params.train, precision="fp32", compile="off",
                              channels_last="off", cuda_graph="off")
    return BenchStep(params, cfg, device, batch)


def measure_training(step: BenchStep, budget: Budget) -> dict[str, Any]:
    t = timed(step, budget.train_s)
    return {"images_per_s": step.batch / t["per_call_s"], "step_s": t["per_call_s"],
            "first_step_s": t["first_s"], "timed_steps": t["calls"], "config": step.variant,
            "fallbacks": sorted(set(step.fallbacks))}


# ---------------------------------------------------------------- sampling, epoch ends


def first_steps(schedule: Schedule, k: int) -> Schedule:
    """The schedule's first k steps: a sampler over it makes exactly k model evaluations,
    each costing what one of the full schedule's does."""
    return schedule_from_betas(schedule.betas[:k].double()).to(schedule.betas.device)


def time_sampler(sampler: Callable, denoise: Callable, schedule: Schedule, batch: int, size: int,
                 device: torch.device, budget: Budget, seed: int, **kwargs: Any) -> dict[str, float]:
    """Seconds per model evaluation of the real sampler, over runs of budget.sample_evals."""
    k = min(budget.sample_evals, schedule.T)
    short = first_steps(schedule, k)
    noise = ImageNoise(seed, range(batch), device)
    x_T = noise.randn((3, size, size))
    t = timed(lambda: sampler(denoise, short, x_T, noise, steps=k, **kwargs), budget.sample_s)
    return {"step_s": t["per_call_s"] / k, "first_call_s": t["first_s"] - t["per_call_s"] * (k - 1) / k,
            "timed_steps": t["calls"] * k}


def measure_sampling(params: Params, device: torch.device, batch: int, budget: Budget, *,
                     bf16: bool, channels_last: bool, compiled: bool) -> dict[str, dict]:
    """Every sampler with an eval-mode U-Net and the fast path's rules: DDPM over all T
    steps, the others over DDIM_STEPS model evaluations (at most T): equal evaluations,
    so their images/s differ by the samplers' own work (and their noise draws)."""
    torch.manual_seed(params.train.seed)
    model = UNet(params.model).to(device).eval().requires_grad_(False)
    denoise = denoiser(model, device, "bf16" if bf16 else "fp32", "on" if compiled else "off",
                       channels_last="on" if channels_last else "off", diffusion=params.diffusion)
    schedule = make_schedule(params.diffusion).to(device)
    size, T, figures = params.preprocess.image_size, schedule.T, {}
    for name, sampler in SAMPLERS.items():
        total = T if name == "ddpm" else min(DDIM_STEPS, T)
        fig = time_sampler(sampler, denoise, schedule, batch, size, device, budget,
                           params.generate.seed, eta=default_eta(name))
        ips = batch / (fig["step_s"] * total)
        figures[name] = {**fig, "steps": total, "batch": batch, "images_per_s": ips,
                         "seconds_10k": SAMPLES / ips}
    return figures


def measure_epoch_end(trainer: BenchStep, params: Params, device: torch.device, budget: Budget,
                      workdir: Path) -> dict[str, Any]:
    """The reverse strip (T batch-1 steps of the EMA model through `strip_denoiser`, as the
    train stage runs them) and the checkpoint (`checkpoint.BackgroundSaver`: the wait, the
    write; a synchronous save, the old way, beside)."""
    schedule = make_schedule(params.diffusion).to(device)
    cfg = dataclasses.replace(params.train, compile="on" if trainer.compiled else "off")
    strip = time_sampler(sample_ddpm, strip_denoiser(trainer.state.ema.model, device, cfg,
                                                        params.diffusion),
                         schedule, 1, params.preprocess.image_size, device, budget, cfg.seed)
    out = {"strip_seconds": strip["step_s"] * schedule.T, "strip_step_s": strip["step_s"],
           "strip_first_call_s": strip["first_call_s"], "strip_timed_steps": strip["timed_steps"]}
    payload, saver = trainer.state.state_dict(), checkpoint.BackgroundSaver()
    with tempfile.TemporaryDirectory(prefix=".bench-", dir=workdir) as tmp:
        path = Path(tmp) / "last.pt"
        out["checkpoint_sync_s"] = once(lambda: checkpoint.save(path, payload))
        out["checkpoint_first_stall_s"] = once(lambda: saver.save(path, payload))  # allocates
        saver.wait()
        out["checkpoint_stall_s"] = once(lambda: saver.save(path, payload))
        out["checkpoint_write_s"] = out["checkpoint_stall_s"] + once(saver.wait)
        out["checkpoint_bytes"] = path.stat().st_size
    return out


def project_stage(step_s: float, first_step_s: float, batch: int, extras: dict[str, Any],
                  cfg: Any) -> dict[str, float]:
    """Seconds of the train stage for EPOCHS epochs of DATASET_IMAGES at `step_s` per step,
    with strips, checkpoints and in-training FIDs at their cadence. A background write that
    outlasts the epochs until the next checkpoint delays that one. One-off costs: what the
    first step, strip call and checkpoint take beyond later ones (compiling, allocating)."""
    epoch_s = DATASET_IMAGES // batch * step_s
    count = lambda every: sum(due(e, every, EPOCHS) for e in range(1, EPOCHS + 1))  # noqa: E731
    strips, saves, evals = count(cfg.strip_every), count(cfg.checkpoint_every), count(cfg.fid_every)
    waits = extras["checkpoint_stall_s"] + max(0.0, extras["checkpoint_write_s"]
                                                - cfg.checkpoint_every * epoch_s)
    one_off = (max(0.0, first_step_s - step_s)
               + (max(0.0, extras["strip_first_call_s"] - extras["strip_step_s"]) if strips else 0)
               + (max(0.0, extras["checkpoint_first_stall_s"] - extras["checkpoint_stall_s"])
                  if saves else 0) + (extras.get("fid_first_call_s", 0.0) if evals else 0))
    parts = {"steps_seconds": EPOCHS * epoch_s, "strip_seconds": strips * extras["strip_seconds"],
             "checkpoint_seconds": saves * waits,
             "fid_seconds": evals * extras.get("fid_eval_s", 0.0), "one_off_seconds": one_off}
    return {**parts, "seconds": sum(parts.values()), "fid_evaluations": evals}


def fid_eval_cost(cfg: TrainConfig, T: int, ddim: dict[str, Any],  # noqa: N803
                  inception: dict[str, Any]) -> dict[str, float]:
    """Seconds of one in-training FID (`train.fid_curve.FidEvaluator`): fid_samples images x
    fid_steps DDIM steps at the measured cost per image-step, plus their Inception features;
    its first call also compiles the sampling model."""
    features_s = cfg.fid_samples / inception["images_per_s"] if "images_per_s" in inception else 0.0
    return {"fid_eval_s": cfg.fid_samples * min(cfg.fid_steps, T) * ddim["step_s"] / ddim["batch"]
            + features_s, "fid_first_call_s": max(0.0, ddim["first_call_s"] - ddim["step_s"])}


def measure_inception(params: Params, device: torch.device, budget: Budget) -> dict[str, Any]:
    """Features/s of the FID network alone and through `fid.extract_features` (with the resize
    to 299x299 on the device); {"unavailable": why} when it cannot run here."""
    from ..evaluate import fid

    try:
        model = fid.load_inception(device)
    except Exception as err:  # noqa: BLE001 - a missing module, package or weights file
        return {"unavailable": reason(err)}
    batch = min(params.evaluate.batch_size, budget.inception_images)
    gen = torch.Generator().manual_seed(0)
    size = params.preprocess.image_size
    images = torch.randint(0, 256, (budget.inception_images, 3, size, size), dtype=torch.uint8,
                           generator=gen)
    x = torch.rand(batch, 3, fid.INPUT_SIZE, fid.INPUT_SIZE, generator=gen).mul(255).to(device)
    with torch.inference_mode(), fid.full_fp32_convolutions(device):
        for _ in range(2):  # TorchScript optimizes its graph on the second and third calls
            model(x)
        net = timed(lambda: model(x), budget.sample_s)
    out: dict[str, Any] = {"batch": batch, "network_images_per_s": batch / net["per_call_s"]}
    try:
        fid.extract_features(images[:batch], model, batch_size=batch, device=device)  # warm-up
        seconds = once(lambda: fid.extract_features(images, model, batch_size=batch,
                                                    device=device))
    except Exception as err:  # noqa: BLE001 - e.g. out of memory at this batch
        return {**out, "extract_unavailable": reason(err)}
    ips = len(images) / seconds
    return {**out, "images_per_s": ips, "images": len(images), "seconds_10k": SAMPLES / ips}


# ---------------------------------------------------------------- the run


def note(message: str) -> None:
    """Progress on stderr while the figures are measured (they are printed at the end)."""
    print(f"bench: {message} ...", file=sys.stderr, flush=True)


def run_bench(params: Params, device: torch.device, quick: Optional[bool] = None,
              out_path: Optional[Path] = None, print_fn: Callable[[str], Any] = print, *,
              budget: Optional[Budget] = None) -> dict[str, Any]:
    """Measure, print (`bench_report.render`), and write the figures to `out_path` (JSON)
    and the printout beside it (.txt). `quick` (default on a CPU) shortens every timing."""
    started = datetime.datetime.now()
    device = torch.device(device)
    cuda = device.type == "cuda"
    quick = (not cuda) if quick is None else quick
    budget = budget or budget_for(device, quick)
    size, cfg = params.preprocess.image_size, params.train
    batch, lowered = train_batch(params, device)
    s_batch = params.generate.batch_size if cuda else min(params.generate.batch_size,
                                                          CPU_SAMPLE_BATCH)
    model = UNet(params.model)
    flop = 3 * forward_flops(model, size)
    load, cores = host_load()
    bf16 = bf16_native(device)
    r: dict[str, Any] = {
        "date": started.astimezone().isoformat(timespec="seconds"), "device": device_name(device),
        "torch": torch.__version__, "quick": quick, "host": {"load_average_1min": load,
                                                            "cores": cores},
        "model": {"parameters": count_parameters(model), "channels": list(params.model.channels),
                  "image_size": size, "train_flop_per_image": flop},
        "batches": {"train": batch, "sample": s_batch, "lowered": [x for x in (
            lowered, f"generate.batch_size {params.generate.batch_size} lowered to {s_batch} "
                     f"on the cpu" if s_batch != params.generate.batch_size else "") if x]},
        "peak": {"what": f"{'bf16' if bf16 else 'fp32'} matmul {budget.matmul_size}^3",
                 "tflops": matmul_peak(device, torch.bfloat16 if bf16 else torch.float32,
                                       budget.matmul_size, budget.matmul_s)}}
    del model
    r["budget"] = dataclasses.asdict(budget)
    memory: dict[str, int] = {}
    peak_memory(device, reset=True)
    note(f"training at batch {batch}: eager fp32, then the fast path")
    train: dict[str, Any] = {"batch_size": batch,
                             "eager_fp32": measure_training(eager_step(params, device, batch),
                                                            budget)}
    memory["train_eager_fp32"] = peak_memory(device, reset=True)
    fast = fast_step(params, device, batch)
    train["fast"] = measure_training(fast, budget)
    memory["train_fast"] = peak_memory(device, reset=True)
    for figures in (train["eager_fp32"], train["fast"]):
        figures["tflops"] = figures["images_per_s"] * flop / 1e12
        figures["mfu"] = figures["tflops"] / r["peak"]["tflops"]
    train["speedup"] = train["fast"]["images_per_s"] / train["eager_fp32"]["images_per_s"]
    train["compiled"] = fast.compiled
    workdir = Path(out_path).parent if out_path is not None else Path.cwd()
    workdir.mkdir(parents=True, exist_ok=True)
    note("epoch ends: the strip, the checkpoint")
    train["epoch_end"] = measure_epoch_end(fast, params, device, budget, workdir)
    path = {"bf16": isinstance(fast.step.autocast, torch.autocast),
            "channels_last": fast.step.channels_last, "compiled": fast.compiled}
    del fast  # its weights, gradients and Adam state
    note("sampling")
    r["sampling"], r["sample_path"] = measure_sampling(params, device, s_batch, budget,
                                                       **path), path
    memory["sampling"] = peak_memory(device, reset=True)
    note("inception")
    r["inception"] = measure_inception(params, device, budget)
    memory["inception"] = peak_memory(device, reset=True)
    train["epoch_end"].update(fid_eval_cost(cfg, params.diffusion.steps, r["sampling"]["ddim"],
                                            r["inception"]))
    projected = project_stage(train["fast"]["step_s"], train["fast"]["first_step_s"], batch,
                              train["epoch_end"], cfg)
    train["projected"] = {"epochs": EPOCHS, "images": DATASET_IMAGES, **projected}
    r["train"] = train
    r["memory_bytes"] = memory if cuda else {"process_rss": peak_memory(device)}
    values = {"speedup": train["speedup"], "mfu": train["fast"]["mfu"],
              "train_seconds": projected["seconds"],
              "ddpm_seconds_10k": r["sampling"]["ddpm"]["seconds_10k"],
              "ddim_seconds_10k": r["sampling"]["ddim"]["seconds_10k"]}
    r["targets"] = {k: {"value": v, "target": TARGETS[k][0],
                        "pass": v >= TARGETS[k][0] if TARGETS[k][1] else v <= TARGETS[k][0]}
                    for k, v in values.items()}
    r["bench_seconds"] = (datetime.datetime.now() - started).total_seconds()
    lines = render(r, params, cuda)
    for line in lines:
        print_fn(line)
    if out_path is not None:
        atomic.write_json(Path(out_path), r)
        atomic.write_text(Path(out_path).with_suffix(".txt"), "\n".join(lines) + "\n")
    return r



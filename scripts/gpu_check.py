#!/usr/bin/env python3
"""What only a CUDA GPU can check, in one run (a lent GPU's time is short):

    python3 scripts/gpu_check.py --out DIR [--only PART,...] [--set KEY=VALUE ...]
        [--inception-standin FILE.pt.xz] [--device cpu] [--profile]
    python3 scripts/gpu_check.py --write-standin FILE.pt.xz   (here, before a device call)

Parts (default bench,graph,agree), each guarded: bench (`ddpm bench --full`), graph (the
whole-step CUDA graph against the ordinary step: img/s, 520 steps' loss beside fp32 eager,
a resume), agree (the fast path against IEEE fp32), stages (download -> generate as
dvc.yaml runs them, train killed and resumed), variants (each fast-path variant's img/s,
per-image noise). The stand-in is the FID network with zeroed weights (40 kB xz, where
87 MB is more than a call may carry), refilled at random. Output: DIR/gpu_check.log and
.json; exit 1 if a part failed. `--device cpu` is a dry run (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ddpm.config import ConfigError, DiffusionConfig, load_params, parse_overrides  # noqa: E402
from ddpm.evaluate import fid  # noqa: E402
from ddpm.model.samplers import ImageNoise  # noqa: E402
from ddpm.model.unet import UNet, forward_flops  # noqa: E402
from ddpm.tools import bench  # noqa: E402
from ddpm.tools.demo import prepare  # noqa: E402
from ddpm.evaluate import model_file  # noqa: E402
from ddpm.train.fastpath import denoiser  # noqa: E402

PARTS = ("bench", "graph", "agree", "stages", "variants")
PROFILE = False  # --profile: the variants part profiles the compiled ones
DEVICE = torch.device("cuda")
OVERRIDES: dict[str, Any] = {}  # --set, applied to the params of every part
results: dict[str, Any] = {}
log_lines: list[str] = []


def say(message: str = "") -> None:
    print(message, flush=True)
    log_lines.append(message)


def fresh_compiles() -> None:
    """Forget compiled graphs: past dynamo's recompile limit (8) a call silently runs eager."""
    torch._dynamo.reset()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def with_train(params, **train):
    return dataclasses.replace(params, train=dataclasses.replace(params.train, **train))


def training_budget() -> bench.Budget:  # 3 s of steps per variant on a GPU; a CPU dry run 0.2
    return dataclasses.replace(bench.budget_for(DEVICE, quick=True),
                               train_s=3.0 if DEVICE.type == "cuda" else 0.2)


def write_standin(path: Path) -> None:
    """The installed FID network with every weight zeroed, xz-compressed (for carrying)."""
    scripted = torch.jit.load(str(fid.verified_weights()), map_location="cpu")
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        for tensor in (t for t in [*scripted.parameters(), *scripted.buffers()]
                       if t.is_floating_point()):
            tensor.zero_()
        torch.jit.save(scripted, f"{tmp}/inception.pt")
        path.write_bytes(lzma.compress(Path(f"{tmp}/inception.pt").read_bytes()))
    print(f"{path}: {path.stat().st_size:,} bytes")


def use_inception_standin(path: Path) -> None:
    """Make `fid.load_inception` load the stand-in, its weights refilled at random."""
    unpacked = Path(tempfile.mkdtemp()) / "inception.pt"
    unpacked.write_bytes(lzma.decompress(path.read_bytes()))

    def load(device: Any = "auto") -> torch.nn.Module:
        scripted = torch.jit.load(str(unpacked), map_location=torch.device(device))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in scripted.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            for b in (b for b in scripted.buffers() if b.is_floating_point()):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
        return fid.InceptionPool3(scripted.net.layers).eval().requires_grad_(False)

    fid.load_inception = load
    say("inception: the stand-in (the real graph, random weights): features/s are real")


# ---------------------------------------------------------------- parts


def part_bench(params, out: Path) -> None:
    figures = bench.run_bench(params, DEVICE, quick=DEVICE.type != "cuda",
                              out_path=out / "bench.json", print_fn=say)
    results["bench"] = figures["targets"]


def part_agree(params, out: Path) -> None:
    """Relative error of each fast-path variant against IEEE fp32 on the same input."""
    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).norm() / b.double().norm())

    torch.manual_seed(0)
    model = UNet(params.model).to(DEVICE).eval().requires_grad_(False)
    batch = params.generate.batch_size if DEVICE.type == "cuda" else 4  # sampling's shape
    size = params.preprocess.image_size
    gen = torch.Generator(DEVICE).manual_seed(1)
    x = torch.randn(batch, 3, size, size, device=DEVICE, generator=gen)
    t = torch.randint(0, params.diffusion.steps, (batch,), device=DEVICE, generator=gen)
    matmul = torch.backends.cuda.matmul
    old, matmul.fp32_precision = matmul.fp32_precision, "ieee"
    with fid.full_fp32_convolutions(DEVICE), torch.no_grad():
        ref = model(x, t)
    matmul.fp32_precision = old
    with torch.no_grad():
        tf32 = model(x, t)
    eager_bf16 = denoiser(model, DEVICE, "bf16", "off", diffusion=DiffusionConfig())(x, t)
    compiled = denoiser(model, DEVICE, "bf16", "on", diffusion=DiffusionConfig())
    compiled(x, t)
    compiled_bf16 = compiled(x, t)
    results["agree"] = fig = {"eager_tf32": rel(tf32, ref), "eager_bf16": rel(eager_bf16, ref),
                              "compiled_bf16": rel(compiled_bf16, ref),
                              "compiled_vs_eager_bf16": rel(compiled_bf16, eager_bf16)}
    say(f"agree (batch {batch}, eval U-Net, ||out - ref|| / ||ref|| against IEEE fp32 eager):")
    for k, v in fig.items():
        say(f"  {k:<24} {v:.2e}")


def _stage(project: Path, name: str, *args: str, timeout: float = 600) -> float:
    """A stage as dvc.yaml runs it (`python stages/<name>.py ...`), its output's tail shown."""
    start = time.perf_counter()  # (the stage imports its project's own src/)
    done = subprocess.run([sys.executable, f"stages/{name}.py", *args], cwd=project,
                          capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    say(f"  {name}: exit {done.returncode} in {seconds:.1f} s")
    for line in [x for x in (done.stdout + done.stderr).splitlines() if x.strip()
                 and "%|" not in x][-8:]:
        say(f"    | {line[:200]}")
    if done.returncode:
        raise RuntimeError(f"stage {name} failed with exit {done.returncode}")
    return seconds


TRAIN_ARGS = ("--data", "data/processed", "--model", "models/model.pt", "--checkpoints",
              "models/checkpoints", "--reports", "reports", "--strips", "reports/strips")


def part_stages(params, out: Path, epochs: int = 3) -> None:
    root = Path(tempfile.mkdtemp(prefix="ddpm-gpu-"))
    cuda = DEVICE.type == "cuda"
    images = 4096 if cuda else 256  # synthetic cars
    common = {"data.source": "synthetic", "data.synthetic_count": images,
              "train.epochs": epochs, "mlflow.enabled": False, "train.device": str(DEVICE),
              "generate.device": str(DEVICE), "generate.num_samples": 1000 if cuda else 32,
              "generate.sampler": "ddim", "generate.steps": 50, "train.fid_every": 0}
    results["stages"] = fig = {"images": images}
    say(f"stages: seed model on {images} synthetic images, {epochs} epochs, in {root}")
    fast = prepare(root / "fast", REPO, REPO / "params.yaml", {**OVERRIDES, **common}, dvc=False)
    fig["download_s"] = _stage(fast, "download", "--out", "data/raw")
    fig["preprocess_s"] = _stage(fast, "preprocess", "--raw", "data/raw", "--out",
                                 "data/processed")
    fig["train_fast_s"] = _stage(fast, "train", *TRAIN_ARGS)
    report = fig["train_fast_report"] = json.loads((fast / "reports/train.json").read_text())
    fig["resume"] = check_resume(fast, prepare(
        root / "resume", REPO, REPO / "params.yaml", {**OVERRIDES, **common}, dvc=False))
    fig["generate_s"] = _stage(fast, "generate", "--model", "models/model.pt", "--data",
                               "data/processed", "--out", "data/generated", "--figures",
                               "reports/figures", "--train-run", "reports/mlflow_run.json",
                               "--run-file", "reports/mlflow_generate_run.json")
    for name in ("samples.png", "reverse.png"):
        shutil.copy(fast / "reports/figures" / name, out / f"stages_{name}")
    fig["epochs"] = model_file.load(fast / "models/checkpoints/last.pt")["epochs_done"]
    say("  epoch  loss     img/s: " + "; ".join(f"{e['epoch']}: {e['loss']:.5f} "
                                               f"{e['images_per_s']:,.0f}" for e in fig["epochs"]))
    fig["train_fast_not_steps_s"] = fig["train_fast_s"] - report["seconds"]
    say(f"  train stage (fast): {fig['train_fast_s']:.1f} s wall, {report['seconds']:.1f} s in "
        f"its epochs' steps (the training compile included), "
        f"{fig['train_fast_not_steps_s']:.1f} s besides (start-up, strips, checkpoints)")
    shutil.rmtree(root, ignore_errors=True)


def check_resume(done: Path, project: Path) -> dict[str, Any]:
    """Kill the train stage after its first checkpoint, rerun, compare with `done`'s weights."""
    shutil.copytree(done / "data/processed", project / "data/processed")
    ckpt = project / "models/checkpoints/last.pt"
    proc = subprocess.Popen([sys.executable, "stages/train.py", *TRAIN_ARGS], cwd=project,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, 9)
    proc.wait()
    fig = {"killed_after_epoch": model_file.load(ckpt)["epoch"] if ckpt.exists() else None,
           "rerun_s": _stage(project, "train", *TRAIN_ARGS)}
    a, b = (model_file.load(p / "models/model.pt") for p in (done, project))
    for key in ("model", "ema"):
        fig[f"{key}_max_abs_diff"] = max(float((a[key][k].float() - b[key][k].float()).abs()
                                               .max()) for k in a[key])
    say(f"  resume: killed after epoch {fig['killed_after_epoch']}'s checkpoint, rerun; max "
        f"|w - w_uninterrupted|: raw {fig['model_max_abs_diff']:.2e}, EMA "
        f"{fig['ema_max_abs_diff']:.2e}")
    return fig


def _losses(step: bench.BenchStep, steps: int, window: int = 20) -> list[float]:
    """The mean loss of each `window` steps (one host read per window, as training does)."""
    out = []
    for i in range(steps):
        step()
        if (i + 1) % window == 0:
            out.append(float(step.step.take_window()) / window)
    return out


def part_graph(params, out: Path, steps: int = 520) -> None:
    """Whole-step CUDA-graph capture (train.cuda_graph: on) against the ordinary step, same
    seed and data: images/s, the loss curve over `steps` steps (20-step means) beside fp32
    eager for the size of bf16's own noise, and a resume at the half (captured again)
    against the uninterrupted captured run. What `auto` waits for (docs/speed.md)."""
    batch, steps = params.train.batch_size, steps if DEVICE.type == "cuda" else 40
    results["graph"] = fig = {"steps": steps, "batch": batch}
    captured = with_train(params, cuda_graph="on")
    runs = {"ordinary": bench.fast_step(with_train(params, cuda_graph="off"), DEVICE, batch),
            "captured": bench.fast_step(captured, DEVICE, batch),
            "fp32 eager": bench.eager_step(params, DEVICE, batch)}
    curves = {}
    for name, step in runs.items():
        start = time.perf_counter()
        curves[name] = _losses(step, steps)
        sync()
        fig[name] = {"variant": step.variant, "fallbacks": sorted(set(step.fallbacks)),
                     "captured": step.step.graph is not None,
                     "seconds": time.perf_counter() - start, "losses": curves[name]}
        say(f"graph: {name:<10} [{step.variant}] {steps} steps in {fig[name]['seconds']:.1f} s")
    for a, b in (("captured", "ordinary"), ("ordinary", "fp32 eager")):
        diffs = [abs(x - y) / y for x, y in zip(curves[a], curves[b])]
        fig[f"{a} vs {b}"] = {"max_rel": max(diffs), "mean_rel": sum(diffs) / len(diffs)}
        say(f"  loss curve {a} vs {b}: mean rel diff {sum(diffs) / len(diffs):.2%}, "
            f"max {max(diffs):.2%}")
    for name, graph, layout in (("ordinary", "off", "auto"), ("captured", "on", "auto"),
                                ("captured contiguous", "on", "off"),  # NHWC GroupNorm copies
                                ("ordinary contiguous", "off", "off")):
        switches = {"cuda_graph": graph, "channels_last": layout}
        fresh_compiles()
        timed = bench.measure_training(bench.fast_step(with_train(params, **switches), DEVICE,
                                                       batch), training_budget())
        fig.setdefault(name, {})["images_per_s"] = timed["images_per_s"]
        say(f"  {name:<20} {timed['images_per_s']:>8,.0f} img/s  [{timed['config']}]")
    fig["speedup"] = fig["captured"]["images_per_s"] / fig["ordinary"]["images_per_s"]
    say(f"  captured / ordinary: {fig['speedup']:.2f}x")

    fresh_compiles()
    half = steps // 2
    whole, resumed = (bench.fast_step(captured, DEVICE, batch) for _ in range(2))
    _losses(whole, half)
    state, calls, gen = copy.deepcopy(whole.state.state_dict()), whole.calls, whole.gen.get_state()
    order, cursor = whole.step.order.clone(), whole.step.cursor.clone()  # the epoch in progress
    _losses(whole, steps - half)
    resumed.state.load_state_dict(state)
    resumed.calls = calls
    resumed.gen.set_state(gen)
    resumed.step.order.copy_(order)
    resumed.step.cursor.copy_(cursor)
    _losses(resumed, steps - half)
    sync()
    fig["resume_max_abs_diff"] = diff = max(float((a - b).abs().max()) for a, b in zip(
        whole.state.model.state_dict().values(), resumed.state.model.state_dict().values()))
    say(f"  resume at step {half}, captured again: max |w - w_uninterrupted| {diff:.2e}"
        + (" (bit-identical)" if diff == 0 else ""))


def part_variants(params, out: Path) -> None:
    """Each fast-path variant's training img/s (H200, 2026-11-28, torch 2.11: eager fp32 855,
    eager bf16 channels-last 970, compiled bf16 channels-last 928-1,059), the fast path at
    larger batches, and the cost of per-image noise."""
    cuda, size, batch = DEVICE.type == "cuda", params.preprocess.image_size, params.train.batch_size
    results["variants"] = fig = {}
    flop = 3 * forward_flops(UNet(params.model), size)
    runs = [("eager fp32 contiguous (seed)", batch, None)] + [
        (f"{'compiled' if c == 'on' else 'eager'} bf16 "
         f"{'channels_last' if cl == 'on' else 'contiguous'}"
         + ("" if mode == "default" else f" {mode}"), batch,
         {"compile": c, "channels_last": cl, "compile_mode": mode})
        for c, cl, mode in (("off", "on", "default"), ("off", "off", "default"),
                            ("on", "off", "default"), ("on", "on", "default"),
                            ("on", "off", "reduce-overhead"))]
    runs = [r for r in runs if cuda or "compiled" not in r[0]]  # a CPU dry run: no compiles
    runs += [(f"fast path at batch {b}", b, {}) for b in ((128, 256) if cuda else (16,))]
    for label, b, switches in runs:
        trainer = (bench.eager_step(params, DEVICE, b) if switches is None
                   else bench.fast_step(with_train(params, **switches), DEVICE, b))
        figures = bench.measure_training(trainer, training_budget())
        fig[label] = {**figures, "tflops": figures["images_per_s"] * flop / 1e12}
        say(f"variants: {label:<42} {figures['images_per_s']:>7,.0f} img/s "
            f"{fig[label]['tflops']:6.1f} TFLOP/s  first step {figures['first_step_s']:.1f} s"
            + (f" (fell back: {'; '.join(figures['fallbacks'])})" if figures["fallbacks"] else ""))
        if PROFILE and cuda and label.startswith("compiled"):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    trainer()
                sync()
            (out / f"profile_{label.replace(' ', '_')}.txt").write_text(prof.key_averages().table(
                sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=100))
        fresh_compiles()
    gen = torch.Generator(DEVICE).manual_seed(0)
    batch = params.generate.batch_size
    for label, draw in (("per-image generators", ImageNoise(0, range(batch), DEVICE).randn),
                        ("one generator", lambda shape: torch.randn((batch, *shape),
                                                                    device=DEVICE, generator=gen))):
        fig[f"noise_{label}"] = s = bench.timed(lambda: draw((3, size, size)), 0.5)["per_call_s"]
        say(f"variants: noise for one sampling step of {batch} images, {label}: {s * 1e3:.2f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--write-standin", type=Path, metavar="FILE.pt.xz",
                   help="write the zeroed FID network for --inception-standin, then exit")
    p.add_argument("--only", default="bench,graph,agree", help=", ".join(PARTS))
    p.add_argument("--inception-standin", type=Path)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile", action="store_true", help="variants: profile compiled steps")
    args = p.parse_args()
    if args.write_standin:
        return write_standin(args.write_standin)
    global DEVICE, PROFILE
    DEVICE, PROFILE = torch.device(args.device), args.profile
    unknown = sorted(set(args.only.split(",")) - set(PARTS))
    problem = ("--out is required" if args.out is None else
               f"unknown part {unknown[0]!r}; parts: {', '.join(PARTS)}" if unknown else
               "no CUDA device; this script is for a GPU machine (--device cpu for a dry run)"
               if DEVICE.type == "cuda" and not torch.cuda.is_available() else None)
    try:
        OVERRIDES.update(parse_overrides(args.set))
        params = load_params(REPO / "params.yaml", OVERRIDES)
    except ConfigError as err:
        problem = problem or str(err)
    if problem:
        sys.exit(f"gpu_check: error: {problem}")
    args.out.mkdir(parents=True, exist_ok=True)
    say(f"gpu_check: {bench.device_name(DEVICE)}; torch {torch.__version__}; "
        f"CUDA {torch.version.cuda}; python {sys.version.split()[0]}")
    with contextlib.suppress(Exception):
        say(subprocess.run(["nvidia-smi", "--format=csv", "--query-gpu=name,driver_version,"
                            "memory.total,clocks.sm,clocks.max.sm,power.limit"],
                           capture_output=True, text=True, timeout=30).stdout.strip())
    if args.inception_standin:
        use_inception_standin(args.inception_standin)
    parts: dict[str, Callable] = {name: globals()[f"part_{name}"] for name in PARTS}  # part_*
    for name in args.only.split(","):
        say()
        start, status = time.perf_counter(), "ok"
        fresh_compiles()
        try:
            parts[name](params, args.out)
        except Exception:  # noqa: BLE001 - report and go on to the next part
            status = "FAILED"
            say(traceback.format_exc())
        results.setdefault("parts", {})[name] = {"status": status,
                                                 "seconds": time.perf_counter() - start}
        say(f"[{name}] {status} in {time.perf_counter() - start:.0f} s")
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
        (args.out / "gpu_check.log").write_text("\n".join(log_lines) + "\n")
    say()
    say("summary: " + "; ".join(f"{k} {v['status']} {v['seconds']:.0f} s"
                                for k, v in results["parts"].items()))
    (args.out / "gpu_check.log").write_text("\n".join(log_lines) + "\n")
    if any(v["status"] != "ok" for v in results["parts"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()

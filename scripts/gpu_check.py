#!/usr/bin/env python3
"""What only a CUDA GPU can check, in one run: a lent GPU's time is short.

    PYTHONPATH=src python3 scripts/gpu_check.py --out DIR [--only PART,...]
        [--inception-standin FILE.pt.xz] [--set KEY=VALUE ...] [--device cpu]
    python3 scripts/gpu_check.py --write-standin FILE.pt.xz   (here, before a device call)

Needs torch, numpy, Pillow, PyYAML and tqdm; not DVC, MLflow, kaggle or
clean-fid (the stages run as plain scripts, tracking off; FID features resize
on the device with torch). Parts, each guarded, so one failure is reported
and the rest still run (default: bench, graph, agree - about 10 minutes on an
H200 by the component timings of 2026-11-28, not yet measured as a whole):

  bench     `ddpm bench --full` for the repository's params (README "Speed").
  graph     the whole-step CUDA graph (train.cuda_graph: on) against the ordinary
            step: img/s in both layouts, the loss over 520 steps beside fp32 eager,
            a resume at the half; what `auto` waits for (see part_graph).
  agree     the seed U-Net on CUDA against an IEEE-fp32 reference: eager TF32,
            eager bf16, compiled bf16 (what sampling runs), as relative errors.
  stages    download -> preprocess -> train -> generate on synthetic data with
            the seed model: the train stage as dvc.yaml runs it (one process, so
            no NCCL) with the fast path; killed after its first checkpoint and rerun
            (weights against the uninterrupted run); again in fp32 eager to
            compare the loss; what the stage spends besides its steps.
  variants  training images/s at larger batches; the cost of per-image noise.
  diag      each fast-path variant timed and profiled (see part_diag).

`--inception-standin` is the FID network's TorchScript with its weights zeroed
(xz-compressed, 40 kB instead of 87 MB, which is more than a device call may
carry; `--write-standin` makes it from the installed weights): its weights are
refilled at random, so its features/s are the real network's, its features
meaningless. Everything printed also goes to DIR/gpu_check.log; the figures to
DIR/gpu_check.json; the exit status is 1 if a part failed. `--device cpu` with
`--set` for a small model is a dry run of the script itself on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
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
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ddpm import bench, fid  # noqa: E402
from ddpm.config import apply_override, load_params, params_from_dict  # noqa: E402
from ddpm.demo import copy_pipeline  # noqa: E402
from ddpm.fastpath import denoiser  # noqa: E402
from ddpm.samplers import ImageNoise  # noqa: E402
from ddpm.unet import UNet  # noqa: E402

PARTS = ("bench", "graph", "agree", "stages", "variants", "diag")
DEVICE = torch.device("cuda")
OVERRIDES: dict[str, Any] = {}  # --set, applied to the params of every part
results: dict[str, Any] = {}
log_lines: list[str] = []


def say(message: str = "") -> None:
    print(message, flush=True)
    log_lines.append(message)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def fresh_compiles() -> None:
    """Forget compiled graphs (and free their memory) between variants: every new model
    compiles UNet.forward again, and past torch._dynamo's recompile limit (8) a call
    silently runs eager, which would time eager under a compiled label."""
    torch._dynamo.reset()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


# ---------------------------------------------------------------- inception stand-in


def write_standin(path: Path) -> None:
    """The installed FID network with every weight zeroed, xz-compressed (for carrying)."""
    scripted = torch.jit.load(str(fid.verified_weights()), map_location="cpu")
    with torch.no_grad():
        for tensor in [*scripted.parameters(), *scripted.buffers()]:
            if tensor.is_floating_point():
                tensor.zero_()
    with tempfile.TemporaryDirectory() as tmp:
        torch.jit.save(scripted, f"{tmp}/inception.pt")
        path.write_bytes(lzma.compress(Path(f"{tmp}/inception.pt").read_bytes()))
    print(f"{path}: {path.stat().st_size:,} bytes")


def use_inception_standin(path: Path) -> None:
    """Make `fid.load_inception` load the stand-in with random weights."""
    unpacked = Path(tempfile.mkdtemp()) / "inception.pt"
    unpacked.write_bytes(lzma.decompress(path.read_bytes()))

    def load(device: Any = "auto") -> torch.nn.Module:
        scripted = torch.jit.load(str(unpacked), map_location=torch.device(device))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in scripted.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            for b in scripted.buffers():
                if b.is_floating_point():
                    b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
        return fid.InceptionPool3(scripted.net.layers).eval().requires_grad_(False)

    fid.load_inception = load
    say("inception: the stand-in (the real graph, random weights): features/s are real, "
        "features are not")


# ---------------------------------------------------------------- parts


def part_bench(params, out: Path) -> None:
    figures = bench.run_bench(params, DEVICE, quick=DEVICE.type != "cuda",
                              out_path=out / "bench.json", print_fn=say)
    results["bench"] = figures["targets"]


def part_agree(params, out: Path) -> None:
    """Relative error of each fast-path variant against IEEE fp32 on the same input."""
    device = DEVICE
    torch.manual_seed(0)
    model = UNet(params.model).to(device).eval().requires_grad_(False)
    # The shape sampling compiles for (bench's compile is then a cache hit).
    batch = params.generate.batch_size if device.type == "cuda" else 4
    size = params.preprocess.image_size
    gen = torch.Generator(device).manual_seed(1)
    x = torch.randn(batch, 3, size, size, device=device, generator=gen)
    t = torch.randint(0, params.diffusion.steps, (batch,), device=device, generator=gen)
    with fid._full_fp32_convolutions(device), _ieee_matmul(), torch.no_grad():
        ref = model(x, t)
    with torch.no_grad():
        tf32 = model(x, t)
    eager_bf16 = denoiser(model, device, "bf16", "off")(x, t)
    compiled = denoiser(model, device, "bf16", "on")
    compiled(x, t)
    compiled_bf16 = compiled(x, t)
    fig = {"eager_tf32": rel(tf32, ref), "eager_bf16": rel(eager_bf16, ref),
           "compiled_bf16": rel(compiled_bf16, ref),
           "compiled_vs_eager_bf16": rel(compiled_bf16, eager_bf16)}
    results["agree"] = fig
    say(f"agree (batch {batch}, eval U-Net, ||out - ref|| / ||ref|| against IEEE fp32 eager):")
    for k, v in fig.items():
        say(f"  {k:<24} {v:.2e}")


@contextlib.contextmanager
def _ieee_matmul():
    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = old


def _params_file(dest: Path, overrides: dict[str, Any]) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in {**OVERRIDES, **overrides}.items():
        apply_override(raw, key, value)
    params_from_dict(raw)
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _env(project: Path) -> dict[str, str]:
    """The environment a stage runs in: the project's own src first."""
    path = [str(project / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1"}


def _stage(project: Path, name: str, *args: str, timeout: float = 600) -> float:
    """A stage as dvc.yaml runs it (`python stages/<name>.py ...`; train starts its own
    workers when train.nproc > 1)."""
    cmd = [sys.executable, f"stages/{name}.py", *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=project, env=_env(project), capture_output=True, text=True,
                          timeout=timeout)
    seconds = time.perf_counter() - start
    tail = [line for line in (done.stdout + done.stderr).splitlines()
            if line.strip() and "%|" not in line]
    say(f"  {name}: exit {done.returncode} "
        f"in {seconds:.1f} s")
    for line in tail[-8:]:
        say(f"    | {line[:200]}")
    if done.returncode:
        raise RuntimeError(f"stage {name} failed with exit {done.returncode}")
    return seconds


TRAIN_ARGS = ("--data", "data/processed", "--model", "models/model.pt", "--checkpoints",
              "models/checkpoints", "--reports", "reports", "--strips", "reports/strips")


def part_stages(params, out: Path, epochs: int = 3) -> None:
    root = Path(tempfile.mkdtemp(prefix="ddpm-gpu-"))
    images = 4096 if DEVICE.type == "cuda" else 256
    common = {"data.source": "synthetic", "data.synthetic_count": images,
              "train.epochs": epochs, "mlflow.enabled": False, "train.device": str(DEVICE),
              "generate.device": str(DEVICE),
              "generate.num_samples": 1000 if DEVICE.type == "cuda" else 32, "generate.sampler": "ddim", "generate.steps": 50}
    fig: dict[str, Any] = {"images": images}
    say(f"stages: seed model on {images} synthetic images, {epochs} epochs, in {root}")
    fast, eager = root / "fast", root / "eager"
    copy_pipeline(REPO, fast)
    _params_file(fast, common)
    fig["download_s"] = _stage(fast, "download", "--out", "data/raw")
    fig["preprocess_s"] = _stage(fast, "preprocess", "--raw", "data/raw", "--out",
                                 "data/processed")
    fig["train_fast_s"] = _stage(fast, "train", *TRAIN_ARGS)
    report = json.loads((fast / "reports/train.json").read_text())
    fig["train_fast_report"] = report
    fig["resume"] = check_resume(fast, root / "resume")
    fig["generate_s"] = _stage(fast, "generate", "--model", "models/model.pt", "--data",
                               "data/processed", "--out", "data/generated", "--figures",
                               "reports/figures", "--train-run", "reports/mlflow_run.json",
                               "--run-file", "reports/mlflow_generate_run.json")
    for name in ("samples.png", "reverse.png"):
        shutil.copy(fast / "reports/figures" / name, out / f"stages_{name}")

    copy_pipeline(REPO, eager)
    _params_file(eager, {**common, "train.precision": "fp32", "train.compile": "off"})
    shutil.copytree(fast / "data/processed", eager / "data/processed")
    fig["train_eager_s"] = _stage(eager, "train", *TRAIN_ARGS)
    fig["train_eager_report"] = json.loads((eager / "reports/train.json").read_text())

    fast_epochs = [e for e in _epochs(fast)][:epochs]
    eager_epochs = _epochs(eager)
    say("  epoch  loss fast  loss fp32-eager  rel diff   img/s fast  img/s eager")
    for f, e in zip(fast_epochs, eager_epochs):
        say(f"  {f['epoch']:>5}  {f['loss']:.5f}    {e['loss']:.5f}          "
            f"{abs(f['loss'] - e['loss']) / e['loss']:7.2%}   {f['images_per_s']:>9,.0f}  "
            f"{e['images_per_s']:>10,.0f}")
    fig["epochs_fast"], fig["epochs_eager"] = fast_epochs, eager_epochs
    # `ddpm bench` times a strip and a checkpoint alone; here is what the stage spent
    # outside its epochs' step loops (which include the training compile, in epoch 1).
    fig["train_fast_not_steps_s"] = fig["train_fast_s"] - report["seconds"]
    say(f"  train stage (fast): {fig['train_fast_s']:.1f} s wall, {report['seconds']:.1f} s "
        f"in its epochs' steps (the training compile included), "
        f"{fig['train_fast_not_steps_s']:.1f} s besides (start-up, {epochs} strips with the "
        f"EMA model's compile, checkpoint waits, the final write)")
    results["stages"] = fig
    shutil.rmtree(root, ignore_errors=True)


def check_resume(done: Path, project: Path) -> dict[str, Any]:
    """SIGKILL the train stage once its first checkpoint exists, rerun it, and compare its
    weights with the uninterrupted run's (`done`)."""
    from ddpm import checkpoint

    copy_pipeline(REPO, project)
    shutil.copy(done / "params.yaml", project / "params.yaml")
    shutil.copytree(done / "data/processed", project / "data/processed")
    cmd = [sys.executable, "stages/train.py", *TRAIN_ARGS]
    ckpt = project / "models/checkpoints/last.pt"
    proc = subprocess.Popen(cmd, cwd=project, env=_env(project), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    while not ckpt.exists() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, 9)
    proc.wait()
    killed_at = checkpoint.load(ckpt)["epoch"] if ckpt.exists() else None
    seconds = _stage(project, "train", *TRAIN_ARGS)
    a = checkpoint.load(done / "models/model.pt")
    b = checkpoint.load(project / "models/model.pt")
    fig: dict[str, Any] = {"killed_after_epoch": killed_at, "rerun_s": seconds}
    for key in ("model", "ema"):
        diffs = [float((a[key][k].float() - b[key][k].float()).abs().max()) for k in a[key]]
        fig[f"{key}_max_abs_diff"] = max(diffs)
    say(f"  resume: killed after epoch {killed_at}'s checkpoint, rerun to the end; "
        f"max |w - w_uninterrupted|: raw {fig['model_max_abs_diff']:.2e}, "
        f"EMA {fig['ema_max_abs_diff']:.2e}")
    return fig


def _epochs(project: Path) -> list[dict[str, Any]]:
    from ddpm import checkpoint

    return checkpoint.load(project / "models/checkpoints/last.pt")["epochs_done"]


def _losses(step: bench.BenchStep, steps: int, window: int = 20) -> list[float]:
    """The mean loss of each `window` steps (one host read per window, as training does)."""
    out = []
    for i in range(steps):
        step()
        if (i + 1) % window == 0:
            out.append(float(step.step.take_window()) / window)
    return out


def _snapshot(step: bench.BenchStep) -> dict[str, Any]:
    import io

    buffer = io.BytesIO()
    torch.save(step.state.state_dict(), buffer)
    # The epoch in progress too: its data order and cursor, as a checkpoint's loop restores
    # them by replaying the epoch's shuffle.
    return {"state": buffer.getvalue(), "calls": step.calls, "gen": step.gen.get_state(),
            "order": step.step.order.clone(), "cursor": step.step.cursor.clone()}


def _restore(step: bench.BenchStep, snap: dict[str, Any]) -> None:
    import io

    step.state.load_state_dict(torch.load(io.BytesIO(snap["state"]), weights_only=True))
    step.calls = snap["calls"]
    step.gen.set_state(snap["gen"])
    step.step.order.copy_(snap["order"])
    step.step.cursor.copy_(snap["cursor"])


def part_graph(params, out: Path, steps: int = 520) -> None:
    """Whole-step CUDA-graph capture (train.cuda_graph: on) against the ordinary step, same
    seed, same data: images/s, the loss curve over `steps` steps (20-step means) beside an
    fp32 eager run for the size of bf16's own noise, and a resume at the half (captured
    again after it) against the uninterrupted captured run's weights. What decides
    whether `auto` may turn capture on (README, "Speed")."""
    import dataclasses

    device, batch = DEVICE, params.train.batch_size
    if device.type != "cuda":
        steps = 40
    fig: dict[str, Any] = {"steps": steps, "batch": batch}
    results["graph"] = fig

    def variant(**train):
        return dataclasses.replace(params, train=dataclasses.replace(params.train, **train))

    captured_params = variant(cuda_graph="on")
    runs = {"ordinary": bench.fast_step(variant(cuda_graph="off"), device, batch),
            "captured": bench.fast_step(captured_params, device, batch),
            "fp32 eager": bench.eager_step(params, device, batch)}
    curves = {}
    for name, step in runs.items():
        start = time.perf_counter()
        curves[name] = _losses(step, steps)
        sync()
        fig[name] = {"variant": step.variant, "fallbacks": sorted(set(step.fallbacks)),
                     "captured": step.step.graph is not None,
                     "seconds": time.perf_counter() - start, "losses": curves[name]}
        say(f"graph: {name:<10} [{step.variant}] {steps} steps in {fig[name]['seconds']:.1f} s"
            + (f"; fell back: {fig[name]['fallbacks']}" if step.fallbacks else ""))
    for a, b in (("captured", "ordinary"), ("ordinary", "fp32 eager")):
        rel = [abs(x - y) / y for x, y in zip(curves[a], curves[b])]
        fig[f"{a} vs {b}"] = {"max_rel": max(rel), "mean_rel": sum(rel) / len(rel)}
        say(f"  loss curve {a} vs {b}: mean rel diff {fig[f'{a} vs {b}']['mean_rel']:.2%}, "
            f"max {fig[f'{a} vs {b}']['max_rel']:.2%}")
    n = bench.Counts(5, 40, 0, 0, 0, 0, 0) if device.type == "cuda" else bench.Counts(1, 3, 0, 0, 0, 0, 0)
    # Speed, and the layout choice: NHWC GroupNorm still copies in torch 2.11, so
    # channels-last may lose once compile fuses the norms.
    timings = {"ordinary": {"cuda_graph": "off"}, "captured": {"cuda_graph": "on"},
               "captured contiguous": {"cuda_graph": "on", "channels_last": "off"},
               "ordinary contiguous": {"cuda_graph": "off", "channels_last": "off"}}
    for name, switches in timings.items():
        fresh_compiles()
        timed = bench.measure_training(bench.fast_step(variant(**switches), device, batch), n,
                                       device)
        fig.setdefault(name, {})["images_per_s"] = timed["images_per_s"]
        say(f"  {name:<20} {timed['images_per_s']:>8,.0f} img/s  [{timed['config']}]")
    fig["speedup"] = fig["captured"]["images_per_s"] / fig["ordinary"]["images_per_s"]
    say(f"  captured / ordinary: {fig['speedup']:.2f}x")

    fresh_compiles()
    half = steps // 2
    whole = bench.fast_step(captured_params, device, batch)
    _losses(whole, half)
    snap = _snapshot(whole)
    _losses(whole, steps - half)
    resumed = bench.fast_step(captured_params, device, batch)
    _restore(resumed, snap)
    _losses(resumed, steps - half)
    sync()
    diff = max(float((a - b).abs().max()) for a, b in
               zip(whole.state.model.state_dict().values(), resumed.state.model.state_dict().values()))
    fig["resume_max_abs_diff"] = diff
    say(f"  resume at step {half}, captured again: max |w - w_uninterrupted| {diff:.2e}"
        + (" (bit-identical)" if diff == 0 else ""))


def part_variants(params, out: Path) -> None:
    device = DEVICE
    cuda = device.type == "cuda"
    n = bench.Counts(3, 20, 2, 10, 8192, 10, 0) if cuda else bench.Counts(1, 2, 1, 2, 256, 2, 0)
    fig: dict[str, Any] = {}
    size = params.preprocess.image_size
    for batch in ((128, 256) if cuda else (16,)):
        trainer = bench.fast_step(params, device, batch)
        figures = bench.measure_training(trainer, n, device)
        fallback = "; ".join(figures["fallbacks"])
        flop = 3 * bench.forward_flops(trainer.state.model, size)
        fig[f"train_batch_{batch}"] = {**figures, "tflops": figures["images_per_s"] * flop / 1e12}
        say(f"variants: fast path at batch {batch}: {figures['images_per_s']:,.0f} img/s, "
            f"{figures['images_per_s'] * flop / 1e12:,.0f} TFLOP/s"
            + (f" (compile fell back: {fallback})" if fallback else ""))
        del trainer
        fresh_compiles()
    batch = params.generate.batch_size
    for label, make in (("per-image generators", lambda: ImageNoise(0, range(batch), device)),
                        ("one generator", None)):
        gen = torch.Generator(device).manual_seed(0)
        draw = (make().randn if make else
                (lambda shape: torch.randn((batch, *shape), device=device, generator=gen)))
        first, seconds, _ = bench._time_loop(lambda: draw((3, size, size)), 5, 50, device)
        fig[f"noise_{label}"] = seconds
        say(f"variants: noise for one sampling step of {batch} images, {label}: "
            f"{seconds * 1e3:.2f} ms")
    results["variants"] = fig


def part_diag(params, out: Path) -> None:
    """Where a training step's time goes, one variant at a time (same batch, random data).

    First H200 run (2026-11-28, torch 2.11): eager fp32 855 img/s, eager bf16 channels-last
    970, compiled bf16 channels-last 928-1,059; cudnn.benchmark changed nothing. Eager
    steps took longer than their GPU work (75 vs 54 ms fp32, 66 vs 48 ms bf16); eager bf16
    channels-last spent 17 of its 48 ms of GPU time in 943 layout/dtype copies around
    GroupNorm. The compiled step was not
    profiled. This part tests those leads: contiguous layout, CUDA graphs, and a profile
    of each compiled variant.
    """
    import dataclasses

    device = DEVICE
    cudnn = torch.backends.cudnn
    info = {"cudnn_available": cudnn.is_available(), "cudnn_version": cudnn.version()
            if cudnn.is_available() else None}
    say(f"diag: {info}")
    fig: dict[str, Any] = {"info": info}
    results["diag"] = fig
    batch = params.train.batch_size
    flop = 3 * bench.forward_flops(UNet(params.model), params.preprocess.image_size)

    def variant(**train):
        return dataclasses.replace(params, train=dataclasses.replace(params.train, **train))

    variants = [  # (label, trainer factory, compiled)
        ("eager fp32 contiguous (seed)", lambda: bench.eager_step(params, device, batch), False),
        ("eager bf16 channels_last", lambda: bench.fast_step(
            variant(compile="off", channels_last="on"), device, batch), False),
        ("eager bf16 contiguous", lambda: bench.fast_step(
            variant(compile="off", channels_last="off"), device, batch), False),
        ("compiled bf16 contiguous", lambda: bench.fast_step(
            variant(compile="on", channels_last="off"), device, batch), True),
        ("compiled bf16 channels_last", lambda: bench.fast_step(
            variant(compile="on", channels_last="on"), device, batch), True),
        ("compiled bf16 contiguous reduce-overhead", lambda: bench.fast_step(
            variant(compile="on", channels_last="off", compile_mode="reduce-overhead"),
            device, batch), True),
    ]
    for label, make, compiled in variants:
        trainer = make()
        figures = bench.measure_training(trainer, bench.Counts(3, 20, 0, 0, 0, 0, 0), device)
        fallback = "; ".join(figures["fallbacks"])
        ips = figures["images_per_s"]
        fig[label] = {"images_per_s": ips, "first_step_s": figures["first_step_s"],
                      "fallback": fallback}
        say(f"  {label:<42} {ips:>7,.0f} img/s {ips * flop / 1e12:6.1f} TFLOP/s  first step "
            f"{figures['first_step_s']:.1f} s" + (f"  (fell back: {fallback})" if fallback else ""))
        if compiled or label.startswith("eager bf16 contiguous"):
            _profile(trainer, label, fig, out)
        del trainer
        fresh_compiles()
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))


def _profile(trainer: Any, label: str, fig: dict[str, Any], out: Path, steps: int = 3) -> None:
    """The kernels of `steps` training steps, by GPU time; GPU busy time against wall time
    tells a host-bound step (launch overhead) from a GPU-bound one."""
    sync()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer()
        sync()
    wall = (time.perf_counter() - start) / steps
    events = sorted(prof.key_averages(), key=_device_us, reverse=True)
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    busy = sum(_device_us(e) for e in kernels) / steps / 1e3
    launches = sum(e.count for e in kernels) / steps
    name = label.replace(" ", "_").replace("(", "").replace(")", "")
    (out / f"profile_{name}.txt").write_text(prof.key_averages().table(
        sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=100))
    say(f"    profiled: {busy:.1f} ms GPU kernels per step in {launches:.0f} launches, "
        f"{wall * 1e3:.1f} ms wall per step (under the profiler)")
    for e in kernels[:8]:
        say(f"    {_device_us(e) / steps / 1e3:7.2f} ms {e.count / steps:5.0f}x  {e.key[:100]}")
    fig[label]["profile"] = {"gpu_ms": busy, "launches": launches, "wall_ms": wall * 1e3,
                             "top": [(e.key[:100], _device_us(e) / steps / 1e3)
                                     for e in kernels[:8]]}


def _device_us(event: Any) -> float:
    """Self device time of a profiler row (the attribute's name changed across torch)."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


# ---------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--write-standin", type=Path, metavar="FILE.pt.xz",
                   help="write the zeroed FID network for --inception-standin, then exit")
    p.add_argument("--only", default="bench,graph,agree",
                   help=f"comma-separated: {', '.join(PARTS)}")
    p.add_argument("--inception-standin", type=Path)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    if args.write_standin:
        write_standin(args.write_standin)
        return
    if args.out is None:
        p.error("--out is required")
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device; this script is for a GPU machine (--device cpu "
                 "for a dry run)")
    for item in args.set:
        key, _, value = item.partition("=")
        OVERRIDES[key] = yaml.safe_load(value)
    args.out.mkdir(parents=True, exist_ok=True)
    params = load_params(REPO / "params.yaml", OVERRIDES)
    say(f"gpu_check: {bench.device_name(DEVICE)}; torch {torch.__version__}; "
        f"CUDA {torch.version.cuda}; python {sys.version.split()[0]}")
    with contextlib.suppress(Exception):
        say(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                            "clocks.sm,clocks.max.sm,power.limit", "--format=csv"],
                           capture_output=True, text=True, timeout=30).stdout.strip())
    if args.inception_standin:
        use_inception_standin(args.inception_standin)
    parts: dict[str, Callable] = {"bench": part_bench, "graph": part_graph, "agree": part_agree,
                                  "stages": part_stages, "variants": part_variants,
                                  "diag": part_diag}
    for name in args.only.split(","):
        say()
        start = time.perf_counter()
        fresh_compiles()
        try:
            parts[name](params, args.out)
            status = "ok"
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

"""`ddpm demo` / `make demo`: the real pipeline, on built-in synthetic cars, on a CPU.

It never touches the repository's params.yaml or data: it lays out a scratch
DVC project (default `demo-run/`) with the pipeline's code, a params.yaml that
is the repository's with DEMO_OVERRIDES applied, and runs `dvc repro` there.
Running it again reuses what is up to date (DVC's cache), so it is quick.

It reads `dvc repro`'s output as it passes it on (`Timeline`): when each stage
starts, and the train stage's first epoch line, after which it prints how long
the rest will take on this machine; the summary gives each stage's time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from ..config import apply_override, params_from_dict

# Sized for a 2-core CPU: the whole pipeline in 7 to 8.5 minutes on a recent one (how fast
# varies by day), with FID against its 600 real images (docs/demo.md has the figures and the
# settings tried). The objective is the seed's: v, x0 and min-SNR scored worse on this budget
# (docs/training.md, scripts/objectives.py).
# Widths (32, 64, 64) for 56 epochs of batch 16 (2,072 steps) scored better in the time
# than (16, 32, 64) for 68 or 120 epochs and than (48, 96, 96); a cosine schedule reaches
# pure noise at T = 64 (the seed's linear betas would leave 28 % of the signal at T = 256).
# The sampler is the best of the demo's own sweep at 20 evaluations: DPM-Solver++(2M) SDE
# (FID 117.4 / KID 0.044 on 64 samples a point) over DDIM with eta 1 (120.7 / 0.048); on
# 128 samples they tied (97.5, 97.8) and the ODE solver trailed (151.0), so it left the
# sweep, as did two of the four in-training FIDs: both to keep a margin to 8 minutes.
DEMO_OVERRIDES = {
    "data.source": "synthetic",
    "data.synthetic_count": 600,
    "preprocess.image_size": 32,
    "diffusion.steps": 64,
    "diffusion.schedule": "cosine",
    "model.channels": [32, 64, 64],
    "model.attention": [False, False, True],
    "model.blocks_per_level": 1,
    "model.dropout": 0.0,
    "model.groups": 8,
    "train.epochs": 56,
    "train.batch_size": 16,
    "train.lr": 0.002,
    "train.warmup_epochs": 1,
    "train.ema_decay": 0.995,
    "train.log_every": 25,
    "train.checkpoint_every": 14,
    "train.strip_every": 28,
    "train.fid_every": 28,
    "train.fid_samples": 48,
    "train.fid_sampler": "dpmpp_2m_sde",
    "train.fid_steps": 20,
    "train.fid_eta": 1.0,
    "generate.num_samples": 256,
    "generate.sampler": "dpmpp_2m_sde",
    "generate.steps": 20,
    "generate.eta": 1.0,
    "generate.batch_size": 128,
    "generate.grid_size": 64,
    "evaluate.kid_subset_size": 100,
    "evaluate.kid_subsets": 50,
    "sweep.num_samples": 64,
    "sweep.batch_size": 64,
    "sweep.points": [{"sampler": "ddim", "steps": 20, "eta": 1.0},
                     {"sampler": "dpmpp_2m_sde", "steps": 20, "eta": 1.0}],
}

# What the scratch project needs from the repository.
COPIED = ("dvc.yaml", "stages", "src", "plots")


def repository_root() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "dvc.yaml").exists() and (parent / "stages").is_dir():
            return parent
    raise FileNotFoundError("the demo needs the repository checkout (dvc.yaml, stages/); "
                            "run it from a clone with `make demo`")


def demo_params(base: Path, overrides: dict[str, Any] = DEMO_OVERRIDES) -> dict:
    """The params file `base` with `overrides` ({dotted key: value}) applied, validated."""
    raw = yaml.safe_load(base.read_text()) or {}
    for key, value in overrides.items():
        apply_override(raw, key, value)
    params_from_dict(raw)  # validate before any work
    return raw


def copy_pipeline(repo: Path, out: Path) -> None:
    """The pipeline's code (dvc.yaml, stages/, src/) into another folder."""
    out.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src, dst = repo / name, out / name
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dst)


def prepare(out: Path, repo: Path, params_path: Path,
            overrides: dict[str, Any] = DEMO_OVERRIDES, dvc: bool = True) -> Path:
    """A scratch project in `out`: the pipeline's code, `params_path` with `overrides`, and
    (with `dvc`) an initialised DVC project."""
    params = demo_params(params_path, overrides)
    copy_pipeline(repo, out)
    (out / "params.yaml").write_text(
        f"# Written from {params_path.name} with overrides (ddpm.tools.demo.prepare)\n"
        + yaml.safe_dump(params, sort_keys=False))
    if dvc and not (out / ".dvc").exists():
        subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=out, check=True)
        subprocess.run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], cwd=out, check=True)
    return out


def run_demo(out: str | Path = "demo-run", params_path: str | Path = "params.yaml") -> None:
    started = time.monotonic()
    repo = repository_root()
    out = Path(out).resolve()
    params_path = Path(params_path)
    if not params_path.is_absolute():
        params_path = (Path.cwd() / params_path) if params_path.exists() else repo / params_path
    prepare(out, repo, params_path)
    print(f"demo: running the pipeline on synthetic data in {out}", flush=True)
    timeline = Timeline(yaml.safe_load((out / "params.yaml").read_text()),
                        previous=read_times(out / TIMES_FILE))
    returncode = repro(out, timeline)
    if returncode:
        sys.exit(returncode)
    write_times(out / TIMES_FILE, timeline)
    summarize(out, timeline, total=time.monotonic() - started)


def repro(out: Path, timeline: "Timeline") -> int:
    """`dvc repro` in `out`, its output passed on line by line through `timeline` (which adds
    the estimate after the first epoch); returns DVC's exit status."""
    # Unbuffered: every stage's lines reach the timeline (and the screen) as they are printed.
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=out, env=env,
                           stdout=subprocess.PIPE, text=True, errors="replace")
    try:
        for line in dvc.stdout:  # stderr (progress bars, warnings) goes to the terminal as is
            sys.stdout.write(line)
            note = timeline.feed(line.rstrip("\n"))
            if note:
                print(note)
            sys.stdout.flush()
    finally:
        returncode = dvc.wait()
        timeline.end()
    return returncode


# ---------------------------------------------------------------- how long it takes

# DVC's lines (dvc 3: stage/run.py, stage/__init__.py, stage/cache.py) and the train
# stage's epoch line (`train.callbacks.EpochLog`; tests/test_demo_time.py holds them to it).
STAGE_RUNS = re.compile(r"^Running stage '(?P<stage>[^']+)':")
STAGE_SKIPPED = re.compile(r"^Stage '(?P<stage>[^']+)' (?P<why>didn't change|is cached)")
EPOCH_LINE = re.compile(r"^epoch (?P<epoch>\d+): loss .* img/s, (?P<seconds>[0-9.]+) s\b")
TIMES_FILE = "demo_times.json"  # each stage's seconds when it last ran, in the scratch project


def duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def model_evaluations(sampler: str, steps: int, diffusion_steps: int) -> int:
    """Model calls per image: ddpm takes all T steps, the others `steps` (samplers'
    rule, written again so that the demo's estimate imports no torch)."""
    return diffusion_steps if sampler == "ddpm" else steps


class Timeline:
    """When each stage of `dvc repro` started, fed its output line by line, and - at the train
    stage's first epoch line - how long the rest of the demo will take on this machine.

    The estimate is built from what this machine measured, and the params' amounts of work:
    - a training image's seconds, from that epoch (its seconds over its images);
    - a model evaluation of sampling as a third of a training image (a forward pass of the
      three that a training step costs: forward, and backward at twice a forward);
    - an Inception image's seconds: the reference stage's time over its images (from this
      run, else from the last run in this scratch project, `previous`);
    - a stage's start-up (imports, loading, MLflow), as the train stage's: the time from
      its start to the end of its first epoch, less that epoch.
    Training left is its remaining epochs, strips and in-training FID evaluations; after
    it, generate, sweep and evaluate each start up, sample and extract features.
    """

    def __init__(self, params: dict[str, Any], previous: Optional[dict[str, float]] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.params, self.previous, self.clock = params, previous or {}, clock
        self.events: list[tuple[str, float, str]] = []  # (stage, when, "ran" | why skipped)
        self.ended: Optional[float] = None
        self.estimate: Optional[float] = None  # seconds left, as said after the first epoch
        self.estimated_at = 0.0

    def feed(self, line: str) -> Optional[str]:
        """Take one line of output; returns the estimate to print after the first epoch."""
        now = self.clock()
        if match := STAGE_RUNS.match(line):
            self.events.append((match["stage"], now, "ran"))
        elif match := STAGE_SKIPPED.match(line):
            why = "up to date" if match["why"] == "didn't change" else "from DVC's run cache"
            self.events.append((match["stage"], now, why))
        elif (match := EPOCH_LINE.match(line)) and self.estimate is None and self.events \
                and self.events[-1][0] == "train":
            self.estimated_at = now
            return self.time_left(int(match["epoch"]), float(match["seconds"]),
                                  now - self.events[-1][1])
        return None

    def end(self) -> None:
        self.ended = self.clock()

    def seconds(self) -> dict[str, float]:
        """Each stage that ran: from its start to the next stage's line (or the end)."""
        ends = [when for _, when, _ in self.events[1:]] + [self.ended or self.clock()]
        return {stage: end - when for (stage, when, how), end in zip(self.events, ends)
                if how == "ran"}

    def time_left(self, epoch: int, epoch_seconds: float, since_start: float) -> str:
        p = self.params
        data, train, T = p["data"], p["train"], p["diffusion"]["steps"]
        n = data["synthetic_count"]  # the demo's data: every image is processed
        batch = min(train["batch_size"], n)
        per_image = epoch_seconds / ((n // batch) * batch)
        per_evaluation = per_image / 3
        startup = max(since_start - epoch_seconds, 0.0)
        reference = self.seconds().get("reference", self.previous.get("reference"))
        per_feature = reference / n if reference else 0.0
        epochs = train["epochs"]

        def due(every: int) -> int:  # cadence events after this epoch (`callbacks.due`)
            return sum(1 for e in range(epoch + 1, epochs + 1)
                       if every and (e % every == 0 or e == epochs))

        def scored(samples: int, sampler: str, steps: int) -> float:
            return samples * (model_evaluations(sampler, steps, T) * per_evaluation
                              + per_feature)

        fids = due(train["fid_every"])
        training = ((epochs - epoch) * epoch_seconds + due(train["strip_every"]) * T
                    * per_evaluation + fids * scored(train["fid_samples"],
                                                     train["fid_sampler"], train["fid_steps"]))
        gen, sweep = p["generate"], p["sweep"]
        after = (3 * startup + scored(gen["num_samples"], gen["sampler"], gen["steps"])
                 + sum(scored(sweep["num_samples"], point["sampler"], point["steps"])
                       for point in sweep["points"]))
        self.estimate = training + after
        inception = (f"Inception at {1 / per_feature:.1f} img/s, as the reference stage ran"
                     if per_feature else "feature extraction left out: the reference stage "
                     "did not run here yet")
        return (f"demo: epoch {epoch} took {epoch_seconds:.1f} s; on this machine about "
                f"{duration(self.estimate)} more: training {duration(training)} "
                f"({epochs - epoch} more epochs, {fids} in-training FIDs), then generate, sweep "
                f"and evaluate {duration(after)}\n      (sampling costed at a third of a "
                f"training image per model evaluation; {inception})")


def read_times(path: Path) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def write_times(path: Path, timeline: Timeline) -> None:
    path.write_text(json.dumps({**read_times(path), **timeline.seconds()}, indent=1))


def stage_lines(timeline: Timeline, total: Optional[float] = None) -> list[str]:
    """The summary's times: every stage in the order it came, with its time or why it did not
    run, then the whole demo's, and the estimate made after the first epoch against what
    the rest took."""
    ran = timeline.seconds()
    lines = []
    for stage, _, how in timeline.events:
        told = duration(ran[stage]) if how == "ran" else how
        lines.append(f"  {'' if lines else 'time by stage':19s} {stage:<11} {told}")
    if total is not None:
        lines.append(f"  {'':19s} {'all':<11} {duration(total)}")
    if timeline.estimate is not None and timeline.ended is not None:
        lines.append(f"  {'':19s} after the first epoch it said {duration(timeline.estimate)} "
                     f"more; that took {duration(timeline.ended - timeline.estimated_at)}")
    return lines


def summarize(out: Path, timeline: Optional[Timeline] = None,
              total: Optional[float] = None) -> None:
    lines = ["", "demo finished. Results:"]
    for label, rel in [("training strips", "reports/strips"), ("figures", "reports/figures"),
                       ("training metrics", "reports/train.json"),
                       ("FID during training", "reports/train_fid.csv"),
                       ("FID by sampler", "reports/sweep.csv"),
                       ("FID / KID", "reports/eval.json"), ("model", "models/model.pt"),
                       ("best weights", "models/best.pt")]:
        if (out / rel).exists():
            lines.append(f"  {label:19s} {out / rel}")
    if (out / "reports" / "eval.json").exists():
        result = json.loads((out / "reports" / "eval.json").read_text())
        lines.append(f"  final FID {result['fid']:.1f}, KID {result.get('kid', float('nan')):.4f} "
                     f"on {result['num_samples']} samples against {result['num_reference']} "
                     f"real images")
    curve = out / "reports" / "train_fid.csv"
    if (out / "reports" / "train.json").exists() and curve.exists():
        import csv

        report = json.loads((out / "reports" / "train.json").read_text())
        rows = list(csv.DictReader(curve.read_text().splitlines()))
        if rows and report.get("best_fid") is not None:
            points = " -> ".join(f"{float(r['fid']):.0f} (epoch {r['epoch']})" for r in rows)
            lines.append(f"  in-training FID    {points}; best {report['best_fid']:.1f} at epoch "
                         f"{report['best_epoch']}")
            last = rows[-1]
            lines.append(f"  {'':19s} ({report['fid_samples']} samples each, {last['sampler']}-"
                         f"{last['steps']} eta {float(last['eta']):g}: the final FID's sampler; "
                         f"`dvc plots show`, or train/fid in MLflow)")
    sweep = out / "reports" / "sweep.csv"
    if sweep.exists():
        import csv

        for row in csv.DictReader(sweep.read_text().splitlines()):
            lines.append(f"  {'sweep':19s} {row['curve']:>14} {int(row['evaluations']):>4} "
                         f"evaluations: FID {float(row['fid']):6.1f}, KID "
                         f"{float(row['kid']):.4f}, {float(row['images_per_s']):.1f} img/s")
    if (out / "mlflow.db").exists():
        run = json.loads((out / "reports" / "mlflow_run.json").read_text())
        lines.append(f"  {'tracking (MLflow)':19s} mlflow ui --backend-store-uri "
                     f"sqlite:///{out / 'mlflow.db'}")
        if run.get("experiment_id"):
            from ..tracking import ui_link

            lines.append(f"  {'':19s} then open {ui_link(run['experiment_id'])}")
    if timeline is not None:
        lines += stage_lines(timeline, total)
    print("\n".join(lines))

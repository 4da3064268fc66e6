"""`ddpm demo` / `make demo`: the real pipeline, on built-in synthetic cars, on a CPU.

It never touches the repository's params.yaml or data: it lays out a scratch
DVC project (default `demo-run/`) with the pipeline's code, a params.yaml that
is the repository's with DEMO_OVERRIDES applied, and runs `dvc repro` there.
Running it again reuses what is up to date (DVC's cache), so it is quick.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ..config import apply_override, params_from_dict

# Sized for a 2-core CPU: the whole pipeline in under 8 minutes, with FID against its
# 600 real images (see README "The demo", which has the figures and the settings tried).
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
    repo = repository_root()
    out = Path(out).resolve()
    params_path = Path(params_path)
    if not params_path.is_absolute():
        params_path = (Path.cwd() / params_path) if params_path.exists() else repo / params_path
    prepare(out, repo, params_path)
    print(f"demo: running the pipeline on synthetic data in {out}", flush=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=out, env=env)
    if done.returncode:
        sys.exit(done.returncode)
    summarize(out)


def summarize(out: Path) -> None:
    import json

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
    print("\n".join(lines))

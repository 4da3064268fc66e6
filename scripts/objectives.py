#!/usr/bin/env python3
"""The objectives table of docs/training.md: the demo's configuration trained with each
prediction (`diffusion.prediction`) and loss weighting (`train.loss_weighting`) as queued
DVC experiments, then one row per experiment from the project's MLflow store.

    python3 scripts/objectives.py run OUT [--grid eps,v,x0 none,min_snr] [--jobs 2]
        [--set KEY=VALUE ...]
    python3 scripts/objectives.py table OUT

`run` lays out the demo's project in OUT (git + DVC, the demo's params), runs the stages
up to the reference statistics once, queues one experiment per grid point (named
PREDICTION-WEIGHTING, with the --set overrides added to each), runs the queue and, when
every experiment is done, prints the table. Each
experiment is the whole pipeline with identical budgets, scored as the demo is (FID and
KID of 256 samples against the 600 real images, with the sampler its sweep picks).
`table` prints the Markdown table from OUT's MLflow store. On a 2-core CPU run the queue
with one thread per job (`OMP_NUM_THREADS=1`, which `run` sets): two jobs of two threads
each oversubscribe the cores and train about ten times slower.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def sh(*cmd: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    """Run `cmd`; a failure ends the script with one line (the command's own output above)."""
    if subprocess.run(cmd, cwd=cwd, env=env).returncode:
        sys.exit(f"objectives: {' '.join(cmd[:4])} ... failed in {cwd} (its output is above)")


def run(out: Path, predictions: list[str], weightings: list[str], jobs: int,
        sets: list[str]) -> None:
    from ddpm.tools.demo import prepare

    if out.exists() and any(out.iterdir()):
        sys.exit(f"objectives: {out} is not empty; give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    prepare(out, REPO, REPO / "params.yaml", dvc=False)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "objectives", "GIT_AUTHOR_EMAIL": "objectives@localhost",
           "GIT_COMMITTER_NAME": "objectives", "GIT_COMMITTER_EMAIL": "objectives@localhost"}
    dvc = [sys.executable, "-m", "dvc"]
    sh("git", "init", "-q", cwd=out, env=env)
    sh(*dvc, "init", "-q", cwd=out, env=env)
    sh(*dvc, "config", "core.analytics", "false", cwd=out, env=env)
    (out / ".gitignore").write_text("mlflow.db*\nmlartifacts/\n.mlflow-spool/\n")
    sh("git", "add", "-A", cwd=out, env=env)
    sh("git", "commit", "-qm", "the demo's pipeline", cwd=out, env=env)
    sh(*dvc, "repro", "reference", cwd=out, env=env)
    sh("git", "add", "-A", cwd=out, env=env)
    sh("git", "commit", "-qm", "data and reference statistics", cwd=out, env=env)
    extra = [arg for item in sets for arg in ("-S", item)]
    for prediction in predictions:
        for weighting in weightings:
            sh(*dvc, "exp", "run", "--queue", "-n", f"{prediction}-{weighting}",
               "-S", f"diffusion.prediction={prediction}",
               "-S", f"train.loss_weighting={weighting}", *extra, cwd=out, env=env)
    sh(*dvc, "queue", "start", "-j", str(jobs), cwd=out, env={**env, "OMP_NUM_THREADS": "1"})
    while True:  # until no task is queued or running
        time.sleep(30)
        status = subprocess.run([*dvc, "queue", "status"], cwd=out, env=env, check=True,
                                capture_output=True, text=True).stdout
        if not any(word in status.split() for word in ("Queued", "Running")):
            break
    print(status)
    table(out)


def table(out: Path) -> None:
    import mlflow

    if not (out / "mlflow.db").is_file():
        sys.exit(f"objectives: no {out / 'mlflow.db'}; run `objectives.py run {out}` first")
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddpm-cars")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    print("| experiment | prediction | weighting | FID | KID | in-training FID | "
          "x0 error by t quartile | loss by t quartile | training s | sweep FID |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def joined(values: list[float | None]) -> str:
        return " / ".join(f"{v:.3g}" for v in values if v is not None)

    for run in runs:
        scores = run.data.metrics
        if "evaluate/fid" not in scores:
            continue
        train = client.get_run(run.data.tags.get("ddpm.train_run_id", run.info.run_id))
        metrics, params = train.data.metrics, train.data.params
        curve = sorted(client.get_metric_history(train.info.run_id, "train/fid"),
                       key=lambda m: m.step)
        sweep = sorted((k.split("/")[1], v) for k, v in metrics.items()
                       if k.startswith("sweep/") and k.endswith("/fid"))
        print(f"| {run.data.tags.get('dvc.exp_name', run.info.run_name)} "
              f"| {params.get('diffusion.prediction')} | {params.get('train.loss_weighting')} "
              f"| {scores['evaluate/fid']:.1f} | {scores.get('evaluate/kid', float('nan')):.4f} "
              f"| {joined([m.value for m in curve])} "
              f"| {joined([metrics.get(f'train/x0_error_t_q{i}') for i in range(1, 5)])} "
              f"| {joined([metrics.get(f'train/loss_t_q{i}') for i in range(1, 5)])} "
              f"| {metrics.get('train/final_seconds', float('nan')):.0f} "
              f"| {', '.join(f'{name} {v:.1f}' for name, v in sweep)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("run", help="lay out OUT, queue the grid and run it")
    start.add_argument("out", type=Path)
    start.add_argument("--grid", nargs=2, default=["eps,v,x0", "none,min_snr"],
                       metavar=("PREDICTIONS", "WEIGHTINGS"))
    start.add_argument("--jobs", type=int, default=2)
    start.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="a params override added to every experiment")
    show = sub.add_parser("table", help="the Markdown table from OUT's MLflow store")
    show.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        run(args.out.resolve(), args.grid[0].split(","), args.grid[1].split(","), args.jobs,
            args.set)
    else:
        table(args.out.resolve())


if __name__ == "__main__":
    main()

"""Stage `sweep`: FID and KID of the trained model at each `sweep.points` sampler setting.

Writes reports/sweep.csv (a DVC plot: FID against model evaluations, one line per
sampler) and logs each point to the training run in MLflow as `sweep/<curve>/fid`,
`/kid` and `/images_per_s` at step = model evaluations, so its compare page overlays
experiments' curves. An empty `sweep.points` writes the CSV's header alone.
"""

import sys
from pathlib import Path

# This checkout's library, not an installed one: the code dvc.lock hashed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddpm import atomic, stageutil  # noqa: E402
from ddpm.config import ConfigError, flatten  # noqa: E402
from ddpm.device import resolve_device  # noqa: E402
from ddpm.evaluate import fid  # noqa: E402
from ddpm.evaluate.sweep import run_sweep, sweep_csv  # noqa: E402
from ddpm.model.diffusion import make_schedule  # noqa: E402
from ddpm.tracking import Tracker, select  # noqa: E402
from ddpm.evaluate import model_file  # noqa: E402
from ddpm.train.fastpath import denoiser  # noqa: E402


def main() -> None:
    p = stageutil.parser(__doc__)
    p.add_argument("--model", type=Path, default=Path("models/model.pt"))
    p.add_argument("--reference", type=Path, default=Path("data/reference/stats.npz"))
    p.add_argument("--out", type=Path, default=Path("reports/sweep.csv"))
    p.add_argument("--train-run", type=Path, default=Path("reports/mlflow_run.json"))
    p.add_argument("--run-file", type=Path, default=Path("reports/mlflow_sweep_run.json"))
    args = p.parse_args()
    params = stageutil.load(args)
    cfg = params.sweep

    # Every check before any sampling: the device, the model, the steps, the reference.
    device = resolve_device(cfg.device)
    payload = model_file.load(args.model, hint="rerun the train stage (dvc repro train)")
    model, diffusion_cfg, size = model_file.load_model(payload, "ema", device, args.model)
    for i, point in enumerate(cfg.points):
        if point.sampler != "ddpm" and point.steps > diffusion_cfg.steps:
            raise ConfigError(f"params.yaml: sweep.points[{i}].steps: the model was trained "
                              f"with {diffusion_cfg.steps} diffusion steps; {point.sampler} "
                              f"can take at most that many model evaluations, got {point.steps}")
    reference = fid.load_stats(args.reference)
    network = fid.load_inception(device) if cfg.points else None
    schedule = make_schedule(diffusion_cfg).to(device)
    stageutil.log(f"sweep: {len(cfg.points)} sampler settings, {cfg.num_samples} samples each, "
                  f"on {device}")

    tracker = Tracker(params.mlflow)
    with tracker.start_for_evaluation(args.train_run, select(flatten(params), "sweep"),
                                      args.run_file):
        def scored(row: dict) -> None:
            stageutil.log(f"  {row['curve']:>16} {row['evaluations']:>4} evaluations: FID "
                          f"{row['fid']:.2f}, KID {row['kid']:.4f} ({row['images_per_s']:.1f} "
                          f"img/s)")
            tracker.log_metrics({f"sweep/{row['curve']}/{name}": row[name]
                                 for name in ("fid", "kid", "images_per_s")},
                                step=row["evaluations"])

        rows = run_sweep(denoiser(model, device, diffusion=diffusion_cfg), schedule, cfg, size, device, reference,
                         network, params.evaluate.batch_size, on_row=scored)
        atomic.write_text(args.out, sweep_csv(rows))
        tracker.log_artifact(args.out, "reports")
    stageutil.log(f"{len(rows)} points in {args.out}")


if __name__ == "__main__":
    stageutil.run(main, expected=(model_file.CheckpointError, fid.FidInputError,
                                  fid.FidWeightsError))

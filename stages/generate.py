"""Stage `generate`: samples from models/model.pt (for FID) and the figures: grid, strips, GIF."""

import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

# This checkout's library, not an installed one: the code dvc.lock hashed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddpm import atomic, stageutil  # noqa: E402
from ddpm.evaluate import model_file  # noqa: E402
from ddpm.evaluate.model_file import CheckpointError  # noqa: E402
from ddpm.config import ConfigError, flatten  # noqa: E402
from ddpm.model.diffusion import make_schedule  # noqa: E402
from ddpm.model.samplers import model_evaluations  # noqa: E402
from ddpm.train.fastpath import denoiser  # noqa: E402
from ddpm.evaluate.generate import generate_samples, write_figures  # noqa: E402
from ddpm.data.processed import ProcessedDataError, load_processed  # noqa: E402
from ddpm.tracking import Tracker, select  # noqa: E402
from ddpm.device import resolve_device  # noqa: E402


def main() -> None:
    p = stageutil.parser(__doc__)
    p.add_argument("--model", type=Path, default=Path("models/model.pt"))
    p.add_argument("--best", type=Path, default=Path("models/best.pt"))
    p.add_argument("--data", type=Path, default=Path("data/processed"))
    p.add_argument("--out", type=Path, default=Path("data/generated"))
    p.add_argument("--figures", type=Path, default=Path("reports/figures"))
    p.add_argument("--train-run", type=Path, default=Path("reports/mlflow_run.json"))
    p.add_argument("--run-file", type=Path, default=Path("reports/mlflow_generate_run.json"))
    args = p.parse_args()
    params = stageutil.load(args)
    cfg = params.generate

    device = resolve_device(cfg.device)
    # The real images for the forward strip, read (and checked) before any sampling.
    real = load_processed(args.data)[0] if args.data.exists() else None
    path = args.best if cfg.checkpoint == "best" else args.model
    payload = model_file.load(path, hint="rerun the train stage (dvc repro train)")
    selected = payload.get("selected", {})
    if cfg.checkpoint == "best":
        stageutil.log(f"generate.checkpoint is best: {path}, selected by {selected.get('by')}"
                      + (f" (epoch {selected['epoch']}, FID {selected['fid']:.2f} on "
                         f"{selected['samples']} samples)" if "fid" in selected else ""))
    model, diffusion_cfg, size = model_file.load_model(payload, cfg.weights, device, path)
    if cfg.sampler != "ddpm" and cfg.steps > diffusion_cfg.steps:
        raise ConfigError(f"params.yaml: generate.steps: the model was trained with "
                          f"{diffusion_cfg.steps} diffusion steps; {cfg.sampler} can take at "
                          f"most that many model evaluations, got {cfg.steps}")
    schedule = make_schedule(diffusion_cfg).to(device)
    denoise = denoiser(model, device, diffusion=diffusion_cfg)
    steps = model_evaluations(cfg.sampler, cfg.steps, diffusion_cfg.steps)
    stageutil.log(f"sampling {cfg.num_samples} images with {cfg.sampler} ({steps} steps, "
                  f"{cfg.weights} weights) on {device}")

    tracker = Tracker(params.mlflow)
    with tracker.start_for_evaluation(args.train_run, select(flatten(params), "generate"),
                                      args.run_file):
        started = time.perf_counter()
        with tqdm(total=cfg.num_samples, desc="sampling", unit="img") as bar:
            samples = generate_samples(denoise, schedule, cfg, size, device, progress=bar.update)
        seconds = time.perf_counter() - started
        with atomic.atomic_directory(args.out) as tmp:
            np.save(tmp / "samples.npy", samples)
            atomic.write_json(tmp / "info.json", {
                "count": int(len(samples)), "sampler": cfg.sampler, "steps": steps, "eta": cfg.eta,
                "variance": cfg.variance, "clip": cfg.clip, "checkpoint": str(path),
                "epoch": payload.get("epoch"),
                "weights": cfg.weights, "seed": cfg.seed, "seconds": seconds,
                "images_per_s": len(samples) / seconds, "device": str(device)})

        figures = write_figures(denoise, schedule, cfg, samples, real, args.figures, device)
        tracker.log_metrics({"generate/images_per_s": len(samples) / seconds,
                             "generate/seconds": seconds, "generate/num_samples": len(samples)})
        for figure in figures:
            tracker.log_artifact(figure, "figures")
        stageutil.log(f"{len(samples)} samples in {args.out} ({len(samples) / seconds:.1f} img/s); "
                      f"figures: {', '.join(str(f) for f in figures)}")


if __name__ == "__main__":
    stageutil.run(main, expected=(CheckpointError, ProcessedDataError))

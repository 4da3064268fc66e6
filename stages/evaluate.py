"""Stage `evaluate`: FID and KID of the generated samples against the reference statistics."""

from pathlib import Path

import numpy as np
from tqdm import tqdm

from ddpm import atomic, fid, stageutil
from ddpm.config import flatten
from ddpm.tracking import Tracker, select


def main() -> None:
    p = stageutil.parser(__doc__)
    p.add_argument("--samples", type=Path, default=Path("data/generated"))
    p.add_argument("--reference", type=Path, default=Path("data/reference/stats.npz"))
    p.add_argument("--out", type=Path, default=Path("reports/eval.json"))
    p.add_argument("--generate-run", type=Path, default=Path("reports/mlflow_generate_run.json"))
    p.add_argument("--run-file", type=Path, default=Path("reports/mlflow_eval_run.json"))
    args = p.parse_args()
    params = stageutil.load(args)
    cfg = params.evaluate

    reference = fid.load_stats(args.reference)
    samples = np.load(args.samples / "samples.npy")
    network = fid.load_inception(cfg.device)
    with tqdm(total=len(samples), desc="sample features", unit="img") as bar:
        features = fid.extract_features(samples, network, cfg.batch_size, progress=bar.update)
    stats = fid.feature_stats(features)
    result = {
        "fid": fid.frechet_distance(stats["mu"], stats["sigma"], reference["mu"], reference["sigma"]),
        "num_samples": int(len(samples)),
        "num_reference": int(reference["meta"].get("count", len(reference["mu"]))),
    }
    if cfg.kid:
        result["kid"], result["kid_std"] = fid.kernel_inception_distance(
            features, reference["features"], num_subsets=cfg.kid_subsets,
            subset_size=cfg.kid_subset_size)
    if len(samples) < 2048:
        result["note"] = "fewer than 2,048 samples: FID is biased upwards (covariance not full rank)"
    atomic.write_json(args.out, result)
    tracker = Tracker(params.mlflow)
    with tracker.start_for_evaluation(args.generate_run, select(flatten(params), "evaluate"),
                                      args.run_file):
        tracker.log_metrics({f"evaluate/{k}": v for k, v in result.items()
                             if isinstance(v, (int, float))})
        tracker.log_artifact(args.out, "reports")
    kid = f", KID {result['kid']:.5f} ± {result['kid_std']:.5f}" if cfg.kid else ""
    stageutil.log(f"FID {result['fid']:.2f}{kid} on {len(samples)} samples -> {args.out}")


if __name__ == "__main__":
    stageutil.run(main, expected=(fid.FidWeightsError,))

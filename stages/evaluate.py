"""Stage `evaluate`: FID and KID of the generated samples against the reference statistics;
in MLflow, the scores go onto the model the samples came from and, when it is a registered
version, onto its description, and the version with the best FID among those scored alike
gets the alias `champion`."""

import json
import sys
from pathlib import Path

from tqdm import tqdm

# This checkout's library, not an installed one: the code dvc.lock hashed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddpm import atomic, stageutil  # noqa: E402
from ddpm.evaluate import fid  # noqa: E402
from ddpm.config import flatten  # noqa: E402
from ddpm.tracking import Tracker, dataset_op, select  # noqa: E402


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

    samples = args.samples / "samples.npy"
    with tqdm(desc="sample features", unit="img") as bar:
        scored = fid.compare(samples, args.reference, device=cfg.device, kid=cfg.kid,
                             batch_size=cfg.batch_size, kid_subsets=cfg.kid_subsets,
                             kid_subset_size=cfg.kid_subset_size, progress=bar.update)
    result = {"fid": scored["fid"], "num_samples": scored["count_a"],
              "num_reference": scored["count_b"]}
    if cfg.kid:
        result["kid"], result["kid_std"] = scored["kid"], scored["kid_std"]
    if scored["count_a"] < 2048:
        result["note"] = "fewer than 2,048 samples: FID is biased upwards (covariance not full rank)"
    atomic.write_json(args.out, result)
    meta = fid.load_stats(args.reference)["meta"]
    reference = dataset_op("reference statistics", f"file:{args.reference.as_posix()}",
                           meta.get("dataset_sha256", "unknown"), "evaluation",
                           {"count": meta.get("count"), "network": meta.get("network")})
    tracker = Tracker(params.mlflow)
    with tracker.start_for_evaluation(args.generate_run, select(flatten(params), "evaluate"),
                                      args.run_file):
        tracker.log_dataset(reference)
        # Attached to the logged model the samples came from (generate.checkpoint's).
        name = "best" if tracker.param("generate.checkpoint") == "best" else "final"
        model = tracker.model_id(name)
        tracker.log_metrics({f"evaluate/{k}": v for k, v in result.items()
                             if isinstance(v, (int, float))}, model_id=model, dataset=reference)
        tracker.log_artifact(args.out, "reports")
        # How the samples were made (generate's info.json): scores are compared only alike.
        info_file = args.samples / "info.json"
        info = json.loads(info_file.read_text()) if info_file.exists() else {}
        settings = {key: info.get(key) for key in ("sampler", "steps", "eta", "clip",
                                                   "variance", "weights")}
        settings.update(samples=result["num_samples"],
                        reference=str(meta.get("dataset_sha256", "unknown"))[:12])
        tracker.score_model(name, settings, {k: v for k, v in result.items()
                                             if k in ("fid", "kid", "kid_std")})
    kid = f", KID {result['kid']:.5f} ± {result['kid_std']:.5f}" if cfg.kid else ""
    stageutil.log(f"FID {result['fid']:.2f}{kid} on {result['num_samples']} samples -> {args.out}")


if __name__ == "__main__":
    stageutil.run(main, expected=(fid.FidWeightsError, fid.FidInputError))

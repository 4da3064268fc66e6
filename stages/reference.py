"""Stage `reference`: Inception statistics of all processed real images, computed once.

It lists no params in dvc.yaml: evaluate.batch_size/device change only how
fast this runs, not the result, and the feature settings are fixed by the
FID protocol (recorded in the file's metadata).
"""

import sys
from pathlib import Path

from tqdm import tqdm

# This checkout's library, not an installed one: the code dvc.lock hashed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddpm.evaluate import fid  # noqa: E402
from ddpm import stageutil  # noqa: E402
from ddpm.data.processed import ProcessedDataError, load_processed  # noqa: E402


def main() -> None:
    p = stageutil.parser(__doc__)
    p.add_argument("--data", type=Path, default=Path("data/processed"))
    p.add_argument("--out", type=Path, default=Path("data/reference/stats.npz"))
    args = p.parse_args()
    cfg = stageutil.load(args).evaluate

    images, manifest = load_processed(args.data)
    network = fid.load_inception(cfg.device)
    with tqdm(total=len(images), desc="reference features", unit="img") as bar:
        features = fid.extract_features(images, network, cfg.batch_size, progress=bar.update)
    stats = {**fid.feature_stats(features), "features": features}
    fid.save_stats(args.out, stats, {"dataset_sha256": manifest["sha256"]})
    stageutil.log(f"reference statistics of {len(images)} real images in {args.out}")


if __name__ == "__main__":
    stageutil.run(main, expected=(fid.FidWeightsError, fid.FidInputError, ProcessedDataError))

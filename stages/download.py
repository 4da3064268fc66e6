"""Stage `download`: the raw images into data/raw/ (data.source decides from where); with
data.source: folder, nothing is copied: the folder is checked and data/raw/ left empty."""

import sys
from pathlib import Path

# This checkout's library, not an installed one: the code dvc.lock hashed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddpm import stageutil  # noqa: E402
from ddpm.atomic import atomic_directory  # noqa: E402
from ddpm.data.download import DownloadError, fetch_archive, fetch_kaggle  # noqa: E402
from ddpm.data.folder import FolderError, open_folder  # noqa: E402
from ddpm.data.synthetic import write_synthetic_dataset  # noqa: E402


def main() -> None:
    p = stageutil.parser(__doc__)
    p.add_argument("--out", type=Path, default=Path("data/raw"))
    args = p.parse_args()
    cfg = stageutil.load(args).data

    if cfg.source == "synthetic":
        stageutil.log(f"drawing {cfg.synthetic_count} synthetic cars (seed {cfg.seed}) into {args.out}")
        with atomic_directory(args.out) as tmp:
            write_synthetic_dataset(tmp, cfg.synthetic_count, cfg.seed)
    elif cfg.source == "archive":
        fetch_archive(Path(cfg.archive).expanduser(), args.out, log=stageutil.log)
    elif cfg.source == "folder":
        # The preprocess stage reads the folder where it is (its dvc.yaml dependency); checked
        # here too, so that a missing or empty folder stops `dvc repro` with one line.
        listing = open_folder(cfg.folder)
        with atomic_directory(args.out):
            pass
        stageutil.log(f"data.source is folder: nothing to download; the preprocess stage reads "
                      f"the {len(listing.files)} images in {cfg.folder} where they are")
        return
    else:
        fetch_kaggle(cfg.kaggle_dataset, args.out, log=stageutil.log)
    stageutil.log(f"raw data ready in {args.out}")


if __name__ == "__main__":
    stageutil.run(main, expected=(DownloadError, FolderError))

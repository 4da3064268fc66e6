"""Stage `preprocess`: every image of data.folder (data/raw, or your own folder) -> one uint8
N x 3 x S x S array + manifest.json."""

import sys
from pathlib import Path

from tqdm import tqdm

# This checkout's library, not an installed one: the code dvc.lock hashed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ddpm import stageutil  # noqa: E402
from ddpm.data.annotations import AnnotationError, read_bboxes  # noqa: E402
from ddpm.data.folder import FolderError, ignored_summary, list_images, open_folder  # noqa: E402
from ddpm.data.preprocess import PreprocessError, preprocess  # noqa: E402


def main() -> None:
    p = stageutil.parser(__doc__)
    p.add_argument("--raw", type=Path, default=None,
                   help="the folder of images (default: data.folder from the params)")
    p.add_argument("--out", type=Path, default=Path("data/processed"))
    args = p.parse_args()
    params = stageutil.load(args)
    cfg = params.preprocess
    images = args.raw or Path(params.data.folder)
    # A folder of your own: missing, unreadable or empty is one line naming data.folder.
    listing = open_folder(images) if params.data.source == "folder" else list_images(images)

    boxes = read_bboxes(images) if cfg.resize == "bbox_crop" else None
    with tqdm(desc="decoding", unit="img") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        manifest = preprocess(images, args.out, cfg, boxes=boxes, progress=progress)
    stageutil.log(f"{manifest['count']} images ({manifest['per_split']}) of "
                  f"{cfg.image_size}x{cfg.image_size} in {args.out}/images.npy; "
                  f"{manifest['skipped_count']} skipped (listed in manifest.json), "
                  f"{manifest['upscaled']} enlarged; not images, left alone: "
                  f"{ignored_summary(listing)}")


if __name__ == "__main__":
    stageutil.run(main, expected=(PreprocessError, AnnotationError, FolderError))

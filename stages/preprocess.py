"""Stage `preprocess`: every raw image -> one uint8 N x 3 x S x S array + manifest.json."""

from pathlib import Path

from tqdm import tqdm

from ddpm import stageutil
from ddpm.annotations import read_bboxes
from ddpm.preprocess import PreprocessError, preprocess


def main() -> None:
    p = stageutil.parser(__doc__)
    p.add_argument("--raw", type=Path, default=Path("data/raw"))
    p.add_argument("--out", type=Path, default=Path("data/processed"))
    args = p.parse_args()
    cfg = stageutil.load(args).preprocess

    boxes = read_bboxes(args.raw) if cfg.resize == "bbox_crop" else None
    with tqdm(desc="decoding", unit="img") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        manifest = preprocess(args.raw, args.out, cfg, boxes=boxes, progress=progress)
    stageutil.log(f"{manifest['count']} images ({manifest['per_split']}) of "
                  f"{cfg.image_size}x{cfg.image_size} in {args.out}/images.npy; "
                  f"{manifest['skipped_count']} skipped (listed in manifest.json)")


if __name__ == "__main__":
    stageutil.run(main, expected=(PreprocessError,))

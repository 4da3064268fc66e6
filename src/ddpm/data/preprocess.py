"""A folder of images (data/raw, or the user's own) -> one uint8 N x 3 x S x S array +
manifest.json.

Images are decoded once here, on all cores; training never touches a JPEG.
Pillow's `draft()` lets the JPEG decoder shrink in the DCT domain, which is
both faster and no worse than decoding at full size before a large downscale.
Which files are images is `folder.list_images`'s rule. Every mode Pillow opens becomes
RGB (`to_rgb`), and the EXIF orientation is applied to the small result, so crops and
boxes are computed on the picture as stored (where the devkit's boxes are).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from .. import atomic
from .annotations import Box
from ..config import PreprocessConfig
from .processed import IMAGES_FILE, MANIFEST_FILE
from .folder import MIN_IMAGES, list_images, require_images

SPLITS = {"cars_train": "train", "cars_test": "test"}


class PreprocessError(RuntimeError):
    """No usable images, or too many unreadable ones."""


@dataclass(frozen=True)
class Job:
    path: Path
    size: int
    resize: str
    box: Optional[Box]
    margin: float


def split_of(relative: str) -> str:
    """The `cars_train`/`cars_test` folder an image sits in ("other" elsewhere); the layout
    is found by globbing, never fixed paths."""
    return next((SPLITS[p] for p in reversed(relative.split("/")) if p in SPLITS), "other")


def expand_box(box: Box, margin: float, width: int, height: int) -> Box:
    """Grow (x1, y1, x2, y2) by `margin` x its size on each side, clipped to the image."""
    x1, y1, x2, y2 = box
    dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
    return (max(0, int(x1 - dx)), max(0, int(y1 - dy)),
            min(width, int(round(x2 + dx))), min(height, int(round(y2 + dy))))


def crop_region(job: Job, width: int, height: int) -> Box:
    """The part of the full-size image that becomes the output picture."""
    if job.resize == "center_crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return (left, top, left + side, top + side)
    if job.resize == "bbox_crop" and job.box is not None:
        region = expand_box(job.box, job.margin, width, height)
        if region[2] - region[0] >= 2 and region[3] - region[1] >= 2:
            return region
    return (0, 0, width, height)  # squash, or a box-less image under bbox_crop


class TooManyPixels(ValueError):
    """An image declares more pixels than Pillow's limit (a decompression bomb)."""


# Transparent pixels are composited onto this colour (what most viewers show behind them).
BACKGROUND = (255, 255, 255)

# EXIF orientation (tag 0x0112) -> the transpose that shows the picture upright, as
# PIL.ImageOps.exif_transpose maps it.
ORIENTATION = 0x0112
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode Pillow opens as 8-bit RGB: 16-bit grayscale keeps its top 8 bits (Pillow's own
    convert clips it, to white); alpha, LA, and palette or grayscale images with a transparent
    colour are composited onto BACKGROUND; the rest (grayscale, palette, CMYK, YCbCr) is
    converted as Pillow converts it."""
    if image.mode.startswith("I;16"):  # 16-bit PNGs and TIFFs
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND + (255,)),
                                     rgba).convert("RGB")
    return image.convert("RGB")


def load_image(job: Job) -> tuple[np.ndarray, bool]:
    """Decode, convert to RGB, crop, resize and turn upright one file: 3 x S x S uint8, and
    whether it was enlarged (its crop narrower or shorter than S)."""
    with warnings.catch_warnings():  # Pillow warns between 1x and 2x its limit: refused below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(job.path)  # reads the header only
    with image:
        full_w, full_h = image.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit and full_w * full_h > limit:  # Pillow itself only warns up to twice this
            raise TooManyPixels(f"declares {full_w}x{full_h} pixels, over Pillow's limit of "
                                f"{limit:,} (Image.MAX_IMAGE_PIXELS): not decoded")
        orientation = image.getexif().get(ORIENTATION, 1)
        region = crop_region(job, full_w, full_h)
        # Let the JPEG decoder downscale while the crop stays >= the target size.
        crop_w, crop_h = region[2] - region[0], region[3] - region[1]
        image.draft("RGB", (max(1, full_w * job.size // crop_w), max(1, full_h * job.size // crop_h)))
        scale_x, scale_y = image.size[0] / full_w, image.size[1] / full_h
        image = to_rgb(image)
        region = (region[0] * scale_x, region[1] * scale_y, region[2] * scale_x, region[3] * scale_y)
        out = image.resize((job.size, job.size), Image.BICUBIC, box=region)
    if orientation in UPRIGHT:  # turning the small square = turning first, then squashing
        out = out.transpose(UPRIGHT[orientation])
    enlarged = crop_w < job.size or crop_h < job.size
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1), enlarged


def _load_or_reason(job: Job) -> tuple[Optional[np.ndarray], bool, str]:
    """The image and whether it was enlarged, or None and why not: no single bad file stops
    the stage."""
    try:
        if job.path.stat().st_size == 0:
            return None, False, "empty file"
        return *load_image(job), ""
    except UnidentifiedImageError:
        return None, False, "not an image Pillow can identify"
    except (TooManyPixels, Image.DecompressionBombError) as err:
        return None, False, f"too large: {err}"
    except Exception as err:  # noqa: BLE001 - truncated, corrupt or odd data of any kind
        return None, False, f"unreadable: {type(err).__name__}: {err}"


def preprocess(raw_dir: Path, out_dir: Path, cfg: PreprocessConfig,
               boxes: Optional[dict[Path, Box]] = None,
               progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Write out_dir/images.npy and out_dir/manifest.json atomically; return the manifest.

    Fails (FolderError, PreprocessError) before decoding anything when raw_dir holds fewer
    than two images, or when bbox_crop has no boxes.
    """
    raw_dir = Path(raw_dir)
    listing = require_images(list_images(raw_dir), str(raw_dir),
                             "run the download stage first (dvc repro download), or point "
                             "data.folder at a folder of images (data.source: folder)")
    found = [(split_of(listing.relative(path)), path) for path in listing.files]
    if cfg.resize == "bbox_crop" and not boxes:
        raise PreprocessError(f"preprocess.resize is 'bbox_crop' but no bounding boxes were found "
                              f"under {raw_dir} (car_devkit/devkit/cars_*_annos.mat, which only "
                              f"the Stanford Cars archive has); use 'squash' (the whole picture) "
                              f"or 'center_crop' (its middle square), or download the full archive")
    boxes = boxes or {}
    jobs = [Job(path, cfg.image_size, cfg.resize,
                boxes.get(path.resolve()), cfg.bbox_margin) for _, path in found]

    workers = cfg.workers or os.cpu_count() or 1
    images, skipped, kept_splits, enlarged = [], [], Counter(), 0
    with multiprocessing.get_context("fork").Pool(workers) if workers > 1 else _Inline() as pool:
        results = pool.imap(_load_or_reason, jobs, chunksize=32)
        for i, ((split, path), (array, upscaled, reason)) in enumerate(zip(found, results)):
            if array is None:
                skipped.append({"file": listing.relative(path), "reason": reason})
            else:
                images.append(array)
                kept_splits[split] += 1
                enlarged += upscaled
            if progress is not None:
                progress(i + 1, len(jobs))

    bad = len(skipped) / len(found)
    examples = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:5])
    if len(images) < MIN_IMAGES:
        raise PreprocessError(f"only {len(images)} of {len(found)} images could be read; the "
                              f"pipeline needs at least {MIN_IMAGES}: e.g. {examples}")
    if bad > cfg.max_bad_fraction:
        raise PreprocessError(
            f"{len(skipped)} of {len(found)} images could not be read ({bad:.1%} > "
            f"preprocess.max_bad_fraction = {cfg.max_bad_fraction:.1%}); e.g. {examples}. "
            f"Re-download the data, or raise preprocess.max_bad_fraction to accept them")

    array = np.stack(images)
    digest = hashlib.sha256(array.tobytes()).hexdigest()
    manifest = {
        "count": int(array.shape[0]),
        "shape": list(array.shape),
        "dtype": "uint8",
        "image_size": cfg.image_size,
        "resize": cfg.resize,
        "found": len(found),
        "per_split": {split: kept_splits.get(split, 0) for split in ("train", "test", "other")},
        "skipped_count": len(skipped),
        "skipped": skipped,
        "upscaled": enlarged,  # kept images whose crop was smaller than image_size
        "sha256": digest,
    }
    with atomic.atomic_directory(out_dir) as tmp:
        np.save(tmp / IMAGES_FILE, array)
        atomic.write_json(tmp / MANIFEST_FILE, manifest)
    return manifest


class _Inline:
    """A one-process stand-in for multiprocessing.Pool (workers = 1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap(self, fn, items, chunksize=1):
        return map(fn, items)

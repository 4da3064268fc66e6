"""Raw Stanford Cars layout -> one uint8 N x 3 x S x S array + manifest.json.

Images are decoded once here, on all cores; training never touches a JPEG.
Pillow's `draft()` lets the JPEG decoder shrink in the DCT domain, which is
both faster and no worse than decoding at full size before a large downscale.
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
from .formats import is_image_name

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


def find_images(raw_dir: Path) -> list[tuple[str, Path]]:
    """Every image under raw_dir, as (split, path), sorted by relative path.

    The split is the `cars_train`/`cars_test` folder an image sits in
    ("other" elsewhere); the layout is found by globbing, never fixed paths.
    """
    found = []
    for path in sorted(raw_dir.rglob("*")):
        if is_image_name(path.name) and path.is_file():
            split = next((SPLITS[p] for p in reversed(path.relative_to(raw_dir).parts)
                          if p in SPLITS), "other")
            found.append((split, path))
    return found


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


def load_image(job: Job) -> np.ndarray:
    """Decode, convert to RGB, crop and resize one file: 3 x S x S uint8."""
    with warnings.catch_warnings():  # Pillow warns between 1x and 2x its limit: refused below
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(job.path)  # reads the header only
    with image:
        full_w, full_h = image.size
        limit = Image.MAX_IMAGE_PIXELS
        if limit and full_w * full_h > limit:  # Pillow itself only warns up to twice this
            raise TooManyPixels(f"declares {full_w}x{full_h} pixels, over Pillow's limit of "
                                f"{limit:,} (Image.MAX_IMAGE_PIXELS): not decoded")
        region = crop_region(job, full_w, full_h)
        # Let the JPEG decoder downscale while the crop stays >= the target size.
        crop_w, crop_h = region[2] - region[0], region[3] - region[1]
        image.draft("RGB", (max(1, full_w * job.size // crop_w), max(1, full_h * job.size // crop_h)))
        scale_x, scale_y = image.size[0] / full_w, image.size[1] / full_h
        image = image.convert("RGB")  # grayscale, CMYK, palette, alpha -> RGB
        region = (region[0] * scale_x, region[1] * scale_y, region[2] * scale_x, region[3] * scale_y)
        out = image.resize((job.size, job.size), Image.BICUBIC, box=region)
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)


def _load_or_reason(job: Job) -> tuple[Optional[np.ndarray], str]:
    """The image, or None and why not: no single bad file stops the stage."""
    try:
        if job.path.stat().st_size == 0:
            return None, "empty file"
        return load_image(job), ""
    except UnidentifiedImageError:
        return None, "not an image Pillow can identify"
    except (TooManyPixels, Image.DecompressionBombError) as err:
        return None, f"too large: {err}"
    except Exception as err:  # noqa: BLE001 - truncated, corrupt or odd data of any kind
        return None, f"unreadable: {type(err).__name__}: {err}"


def preprocess(raw_dir: Path, out_dir: Path, cfg: PreprocessConfig,
               boxes: Optional[dict[Path, Box]] = None,
               progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Write out_dir/images.npy and out_dir/manifest.json atomically; return the manifest."""
    raw_dir = Path(raw_dir)
    found = find_images(raw_dir)
    if not found:
        raise PreprocessError(f"no images found under {raw_dir}; run the download stage first "
                              f"(expected cars_train/ and cars_test/ folders of .jpg files)")
    if cfg.resize == "bbox_crop" and not boxes:
        raise PreprocessError(f"preprocess.resize is 'bbox_crop' but no bounding boxes were found "
                              f"under {raw_dir} (car_devkit/devkit/cars_*_annos.mat); use "
                              f"'squash' or 'center_crop', or download the full archive")
    boxes = boxes or {}
    jobs = [Job(path, cfg.image_size, cfg.resize,
                boxes.get(path.resolve()), cfg.bbox_margin) for _, path in found]

    workers = cfg.workers or os.cpu_count() or 1
    images, skipped, kept_splits = [], [], Counter()
    with multiprocessing.get_context("fork").Pool(workers) if workers > 1 else _Inline() as pool:
        results = pool.imap(_load_or_reason, jobs, chunksize=32)
        for i, ((split, path), (array, reason)) in enumerate(zip(found, results)):
            if array is None:
                skipped.append({"file": str(path.relative_to(raw_dir)), "reason": reason})
            else:
                images.append(array)
                kept_splits[split] += 1
            if progress is not None:
                progress(i + 1, len(jobs))

    bad = len(skipped) / len(found)
    if not images or bad > cfg.max_bad_fraction:
        examples = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:5])
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

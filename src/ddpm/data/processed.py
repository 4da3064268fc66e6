"""The processed data set: what the preprocess stage writes and train, reference and generate
read. A folder holding IMAGES_FILE (uint8 N x 3 x S x S) and MANIFEST_FILE (counts,
skipped files, the array's SHA-256). Reading it needs none of the decoding code.

Whatever is wrong with the folder (missing, a manifest that is not the preprocess
stage's, an array that does not load or does not match it) is one `ProcessedDataError`,
whose message names the file and says to rerun preprocess: every stage that reads the
folder expects it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

IMAGES_FILE, MANIFEST_FILE = "images.npy", "manifest.json"
RERUN = "rerun the preprocess stage (dvc repro preprocess)"


class ProcessedDataError(ValueError):
    """data/processed is missing, incomplete or corrupt."""


def load_manifest(processed_dir: Path) -> dict:
    """manifest.json, checked to hold what the stages read from it (shape, sha256)."""
    path = Path(processed_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ProcessedDataError(f"{Path(processed_dir)} has no {MANIFEST_FILE} (or no "
                                 f"{IMAGES_FILE}); run the preprocess stage first "
                                 f"(dvc repro preprocess)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ProcessedDataError(f"{path} is not valid JSON ({err}); {RERUN}") from None
    shape, digest = (manifest.get("shape"), manifest.get("sha256")) \
        if isinstance(manifest, dict) else (None, None)
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(n, int) for n in shape)
            and isinstance(digest, str)):
        raise ProcessedDataError(f"{path} is not a preprocess manifest (it needs 'shape', "
                                 f"N x 3 x S x S, and 'sha256'); {RERUN}")
    return manifest


def load_processed(processed_dir: Path) -> tuple[np.ndarray, dict]:
    """images.npy and its manifest, checked against each other."""
    processed_dir = Path(processed_dir)
    images_path = processed_dir / IMAGES_FILE
    manifest = load_manifest(processed_dir)
    if not images_path.is_file():
        raise ProcessedDataError(f"{processed_dir} has no {IMAGES_FILE}; {RERUN}")
    try:
        images = np.load(images_path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - truncated, not an .npy, pickled objects
        detail = " ".join(str(err).split())[:160]
        raise ProcessedDataError(f"{images_path} cannot be read ({type(err).__name__}: "
                                 f"{detail}); {RERUN}") from None
    if list(images.shape) != manifest["shape"] or images.dtype != np.uint8:
        raise ProcessedDataError(f"{images_path}: shape {list(images.shape)} / {images.dtype} "
                                 f"does not match its manifest ({manifest['shape']}, uint8); "
                                 f"{RERUN}")
    return images, manifest

"""The processed data set: what the preprocess stage writes and train, reference and generate
read. A folder holding IMAGES_FILE (uint8 N x 3 x S x S) and MANIFEST_FILE (counts,
skipped files, the array's SHA-256). Reading it needs none of the decoding code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

IMAGES_FILE, MANIFEST_FILE = "images.npy", "manifest.json"


def load_processed(processed_dir: Path) -> tuple[np.ndarray, dict]:
    """images.npy and its manifest, checked against each other."""
    processed_dir = Path(processed_dir)
    images_path, manifest_path = processed_dir / IMAGES_FILE, processed_dir / MANIFEST_FILE
    if not images_path.exists() or not manifest_path.exists():
        raise FileNotFoundError(f"{processed_dir} has no images.npy/manifest.json; "
                                f"run the preprocess stage first (dvc repro preprocess)")
    manifest = json.loads(manifest_path.read_text())
    images = np.load(images_path)
    if list(images.shape) != manifest["shape"] or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: shape {images.shape} / {images.dtype} does not match "
                         f"its manifest {manifest['shape']}; rerun preprocess")
    return images, manifest

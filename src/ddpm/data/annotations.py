"""Bounding boxes from the Stanford Cars devkit, real or synthetic.

The devkit's `cars_{train,test}_annos.mat` each hold a 1×N struct array
`annotations` with fields bbox_x1, bbox_y1, bbox_x2, bbox_y2, [class,] fname;
the boxes count pixels from 1 and include both ends. Copies of the archive
differ in where things sit (the Kaggle one nests `cars_train/cars_train/`) and
some carry the test labels as `cars_test_annos_withlabels.mat`, so everything
is found by globbing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

Box = tuple[int, int, int, int]


class AnnotationError(ValueError):
    """A devkit annotation file that cannot be read; the message names it."""

_BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")


def read_bboxes(raw_root: Path) -> dict[Path, Box]:
    """Map each annotated image's resolved path to its (x1, y1, x2, y2) box.

    Boxes are 0-based and end-exclusive, as Pillow's `crop` takes them. They
    are not clipped: a few real boxes reach past the picture's edge. Without a
    devkit, or without the folder of pictures it describes, the result is
    empty (or lacks that split): the caller decides whether that is an error.
    """
    raw_root = Path(raw_root).resolve()
    boxes: dict[Path, Box] = {}
    for split in ("train", "test"):
        folder = _image_folder(raw_root, f"cars_{split}")
        if folder is None:
            continue
        # Matches cars_test_annos.mat and cars_test_annos_withlabels.mat alike;
        # both list the same files with the same boxes.
        for mat_path in sorted(raw_root.glob(f"**/cars_{split}_annos*.mat")):
            for fname, box in _read_annotations(mat_path):
                boxes[folder / fname] = box
    return boxes


def _image_folder(raw_root: Path, name: str) -> Path | None:
    """The first folder called `name` that holds the .jpg files themselves."""
    for folder in sorted(raw_root.glob(f"**/{name}")):
        if folder.is_dir() and next(folder.glob("*.jpg"), None) is not None:
            return folder
    return None


def _read_annotations(mat_path: Path) -> list[tuple[str, Box]]:
    from scipy.io import loadmat

    try:
        annotations = loadmat(mat_path)["annotations"].ravel()
        rows = []
        for record in annotations:
            # Each field is a 1×1 array (uint8 or uint16 in the real devkit): take
            # Python ints before subtracting, so a uint8 never wraps around.
            x1, y1, x2, y2 = (int(np.asarray(record[f]).item()) for f in _BOX_FIELDS)
            fname = str(np.asarray(record["fname"]).item())
            rows.append((fname, (x1 - 1, y1 - 1, x2, y2)))
    except Exception as err:  # noqa: BLE001 - truncated, not a .mat, other fields
        detail = " ".join(str(err).split())[:160]
        raise AnnotationError(
            f"{mat_path} is not a readable devkit annotation file ({type(err).__name__}: "
            f"{detail}); download the data again (delete data/raw, dvc repro download) or "
            f"set preprocess.resize to squash or center_crop, which need no boxes") from None
    return rows

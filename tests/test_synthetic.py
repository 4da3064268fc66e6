"""The synthetic Stanford Cars stand-in: layout, devkit, determinism, boxes that fit the cars."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from ddpm.data import synthetic
from ddpm.data.annotations import read_bboxes
from ddpm.data.synthetic import CLASS_NAMES, render_car, split_counts, write_synthetic_dataset

COUNT, SEED = 200, 0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "raw"
    write_synthetic_dataset(root, COUNT, SEED)
    return root


def all_files(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def jpgs(root: Path, split: str) -> list[Path]:
    return sorted((root / f"cars_{split}" / f"cars_{split}").glob("*.jpg"))


def test_split_sizes_follow_the_real_archive():
    assert split_counts(16185) == (8144, 8041)
    assert split_counts(2) == (1, 1)
    with pytest.raises(ValueError, match="at least 2"):
        split_counts(1)


def test_layout_matches_the_kaggle_archive(dataset):
    devkit = dataset / "car_devkit" / "devkit"
    mats = ["cars_meta.mat", "cars_test_annos.mat", "cars_train_annos.mat"]
    assert sorted(p.name for p in devkit.iterdir()) == mats
    assert sorted(p.name for p in dataset.iterdir()) == ["car_devkit", "cars_test", "cars_train"]
    n_train, n_test = split_counts(COUNT)
    assert n_train + n_test == COUNT and abs(n_train - n_test) <= 2
    for split, n in (("train", n_train), ("test", n_test)):
        assert [p.name for p in jpgs(dataset, split)] == [f"{i:05d}.jpg" for i in range(1, n + 1)]


def test_devkit_has_the_real_structure(dataset):
    devkit = dataset / "car_devkit" / "devkit"
    names = loadmat(devkit / "cars_meta.mat")["class_names"]
    assert names.shape == (1, len(CLASS_NAMES))
    assert [str(cell.item()) for cell in names[0]] == list(CLASS_NAMES)

    n_train, n_test = split_counts(COUNT)
    train = loadmat(devkit / "cars_train_annos.mat")["annotations"]
    test = loadmat(devkit / "cars_test_annos.mat")["annotations"]
    assert train.shape == (1, n_train) and test.shape == (1, n_test)
    boxes = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
    assert train.dtype.names == (*boxes, "class", "fname")
    assert test.dtype.names == (*boxes, "fname")

    classes = [int(r["class"].item()) for r in train[0]]
    assert min(classes) >= 1 and max(classes) <= len(CLASS_NAMES)
    assert len(set(classes)) > len(CLASS_NAMES) // 2
    fnames = [str(r["fname"].item()) for r in test[0]]
    assert fnames == [f"{i:05d}.jpg" for i in range(1, n_test + 1)]


def test_same_seed_same_bytes_and_other_seed_other_pictures(dataset, tmp_path):
    write_synthetic_dataset(tmp_path / "again", COUNT, SEED)
    assert all_files(tmp_path / "again") == all_files(dataset)

    write_synthetic_dataset(tmp_path / "other", 20, SEED + 1)
    first = all_files(dataset)
    for name, data in all_files(tmp_path / "other").items():
        if name.endswith(".jpg"):
            assert data != first[name], name


def test_no_two_pictures_are_the_same(dataset):
    # Train and test must not share pictures: the pipeline trains on both.
    pictures = [p.read_bytes() for split in ("train", "test") for p in jpgs(dataset, split)]
    assert len(set(pictures)) == COUNT


def test_a_picture_does_not_depend_on_the_count(dataset, tmp_path):
    write_synthetic_dataset(tmp_path / "small", 20, SEED)
    first = all_files(dataset)
    small = {k: v for k, v in all_files(tmp_path / "small").items() if k.endswith(".jpg")}
    assert len(small) == 20
    assert all(first[name] == data for name, data in small.items())


def test_pictures_decode_vary_in_size_and_some_are_grayscale(dataset):
    sizes, modes = [], []
    for path in jpgs(dataset, "train") + jpgs(dataset, "test"):
        with Image.open(path) as image:
            image.load()
            sizes.append(image.size)
            modes.append(image.mode)
    widths = np.array([w for w, _ in sizes])
    aspects = np.array([w / h for w, h in sizes])
    assert widths.min() >= 240 and widths.max() <= 480
    assert len(set(widths)) > 50
    assert aspects.min() > 1.28 and aspects.max() < 2.02 and aspects.std() > 0.1
    assert set(modes) == {"RGB", "L"}
    assert 1 <= modes.count("L") <= 12  # about 2 %, as in the real set


def test_read_bboxes_gives_the_drawn_boxes_in_0_based_exclusive_coordinates(dataset):
    boxes = read_bboxes(dataset)
    expected = {p.resolve() for split in ("train", "test") for p in jpgs(dataset, split)}
    assert set(boxes) == expected
    for split in ("train", "test"):
        for path in jpgs(dataset, split)[:25]:
            car = render_car(SEED, split, int(path.stem))
            assert boxes[path.resolve()] == car.bbox == car.mask.getbbox()
            with Image.open(path) as image:
                assert image.size == car.image.size
                x1, y1, x2, y2 = car.bbox
                assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
                # The file on disk is the rendered picture, up to JPEG error.
                on_disk = np.asarray(image, np.float32)
                error = np.abs(on_disk - np.asarray(car.image, np.float32)).mean()
                assert error < 4


def test_boxes_are_tight_around_the_car_pixels(monkeypatch):
    # Over a magenta backdrop (darker under the shadow) every other pixel is car.
    def backdrop(rng, width, height, horizon):
        return Image.new("RGB", (width, height), (255, 0, 255))

    monkeypatch.setattr(synthetic, "_background", backdrop)
    checked = 0
    for number in range(1, 41):
        car = render_car(SEED, "train", number)
        if car.image.mode != "RGB":
            continue
        r, g, b = np.asarray(car.image, np.int32).transpose(2, 0, 1)
        car_pixels = (g > 8) | (np.abs(r - b) > 8) | (r < 100)
        ys, xs = np.nonzero(car_pixels)
        assert car.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        # A side view fills much of its box, not a sliver of it.
        x1, y1, x2, y2 = car.bbox
        assert car_pixels.sum() > 0.5 * (x2 - x1) * (y2 - y1)
        checked += 1
    assert checked > 30


def test_read_bboxes_finds_other_layouts_and_test_labels(tmp_path):
    # The torchvision-style copy: flat picture folders, devkit/ at the top,
    # and test boxes only in cars_test_annos_withlabels.mat.
    nested = tmp_path / "nested"
    write_synthetic_dataset(nested, 6, SEED)
    flat = tmp_path / "flat"
    shutil.copytree(nested / "cars_train" / "cars_train", flat / "cars_train")
    shutil.copytree(nested / "cars_test" / "cars_test", flat / "cars_test")
    (flat / "devkit").mkdir()
    shutil.copy(nested / "car_devkit/devkit/cars_train_annos.mat", flat / "devkit")
    test_annos = nested / "car_devkit/devkit/cars_test_annos.mat"
    shutil.copy(test_annos, flat / "cars_test_annos_withlabels.mat")

    boxes = read_bboxes(flat)
    n_train, n_test = split_counts(6)
    assert len(boxes) == 6
    assert boxes[(flat / "cars_test" / "00001.jpg").resolve()] == render_car(SEED, "test", 1).bbox
    last_train = (flat / "cars_train" / f"{n_train:05d}.jpg").resolve()
    assert boxes[last_train] == render_car(SEED, "train", n_train).bbox


def test_read_bboxes_without_a_devkit_is_empty(tmp_path):
    assert read_bboxes(tmp_path) == {}
    write_synthetic_dataset(tmp_path / "raw", 4, SEED)
    shutil.rmtree(tmp_path / "raw" / "car_devkit")
    assert read_bboxes(tmp_path / "raw") == {}

"""Decoding the raw layout into one uint8 tensor: odd files, crops, atomic output."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import run_stage, write_params
from ddpm.config import PreprocessConfig
from ddpm.data.folder import FolderError
from ddpm.data.preprocess import PreprocessError, expand_box, preprocess
from ddpm.data.processed import load_processed


def save(path, image, fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)


def solid(color, size=(120, 80), mode="RGB"):
    return Image.new(mode, size, color)


@pytest.fixture
def raw(tmp_path):
    root = tmp_path / "raw"
    train, test = root / "cars_train" / "cars_train", root / "cars_test" / "cars_test"
    save(train / "00001.jpg", solid((200, 30, 30)))
    save(train / "00002.jpg", solid(128, mode="L"))  # grayscale
    save(train / "00003.jpg", solid((0, 255, 255, 0), mode="CMYK"))  # CMYK JPEG
    save(test / "00001.jpg", solid((10, 200, 10)), fmt="PNG")  # a PNG named .jpg
    save(test / "00002.jpg", solid((10, 10, 200), size=(300, 100)))
    return root


def cfg(**kw):
    return PreprocessConfig(**{"image_size": 16, "workers": 1, **kw})


def test_odd_but_valid_files_become_rgb(raw, tmp_path):
    manifest = preprocess(raw, tmp_path / "out", cfg())
    images, again = load_processed(tmp_path / "out")
    assert images.shape == (5, 3, 16, 16) and images.dtype == np.uint8
    assert manifest == again and manifest["count"] == 5
    assert manifest["per_split"] == {"train": 3, "test": 2, "other": 0}
    by_file = dict(zip(["test1", "test2", "train1", "train2", "train3"], images))
    assert np.abs(by_file["train1"][:, 8, 8].astype(int) - [200, 30, 30]).max() < 8
    gray = by_file["train2"][:, 8, 8].astype(int)
    assert abs(gray[0] - 128) < 4 and gray[0] == gray[1] == gray[2]
    assert np.abs(by_file["train3"][:, 8, 8].astype(int) - [255, 0, 0]).max() < 12  # CMYK cyan-less = red
    assert np.abs(by_file["test1"][:, 8, 8].astype(int) - [10, 200, 10]).max() < 8


def test_corrupt_truncated_and_empty_files_are_skipped_and_listed(raw, tmp_path):
    bad = raw / "cars_train" / "cars_train"
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    buf = io.BytesIO()
    solid((1, 2, 3), size=(400, 300)).save(buf, format="JPEG")
    (bad / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    manifest = preprocess(raw, tmp_path / "out", cfg(max_bad_fraction=0.5))
    reasons = {s["file"].split("/")[-1]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"empty.jpg", "garbage.jpg", "truncated.jpg"}
    assert reasons["empty.jpg"] == "empty file"
    assert manifest["count"] == 5 and manifest["found"] == 8


def test_too_many_bad_files_fail_and_keep_the_previous_output(raw, tmp_path):
    out = tmp_path / "out"
    preprocess(raw, out, cfg())
    before = (out / "images.npy").read_bytes()
    for i in range(3):
        (raw / "cars_test" / "cars_test" / f"bad{i}.jpg").write_bytes(b"nope")
    with pytest.raises(PreprocessError, match="max_bad_fraction"):
        preprocess(raw, out, cfg(max_bad_fraction=0.1))
    assert (out / "images.npy").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_no_images_is_a_clear_error(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(FolderError, match="holds no images .*run the download stage first"):
        preprocess(tmp_path / "raw", tmp_path / "out", cfg())
    assert not (tmp_path / "out").exists()
    with pytest.raises(FolderError, match="raw does not exist: run the download stage first"):
        preprocess(tmp_path / "nothing" / "raw", tmp_path / "out", cfg())


def test_bbox_crop_takes_the_annotated_car(tmp_path):
    root = tmp_path / "raw"
    image = Image.new("RGB", (200, 100), (0, 0, 255))
    image.paste((255, 0, 0), (120, 40, 180, 90))  # the "car": red box
    path = root / "cars_train" / "cars_train" / "00001.jpg"
    save(path, image, fmt="PNG")
    save(root / "cars_train" / "cars_train" / "00002.jpg", image, fmt="PNG")  # two at least
    boxes = {path.resolve(): (120, 40, 180, 90)}
    manifest = preprocess(root, tmp_path / "crop", cfg(resize="bbox_crop", bbox_margin=0.0), boxes=boxes)
    cropped, _ = load_processed(tmp_path / "crop")
    assert manifest["resize"] == "bbox_crop"
    assert cropped[0, 0].mean() > 240 and cropped[0, 2].mean() < 15  # all red
    preprocess(root, tmp_path / "squash", cfg(resize="squash"))
    squashed, _ = load_processed(tmp_path / "squash")
    assert squashed[0, 2].mean() > 100  # mostly blue background


def test_expand_box_clips_to_the_image():
    assert expand_box((10, 10, 30, 30), 0.5, 35, 100) == (0, 0, 35, 40)


def test_center_crop_is_square_from_the_middle(tmp_path):
    root = tmp_path / "raw"
    image = Image.new("RGB", (300, 100), (0, 255, 0))
    image.paste((255, 255, 255), (100, 0, 200, 100))
    save(root / "cars_test" / "cars_test" / "00001.jpg", image, fmt="PNG")
    save(root / "cars_test" / "cars_test" / "00002.jpg", image, fmt="PNG")  # two at least
    preprocess(root, tmp_path / "out", cfg(resize="center_crop"))
    images, _ = load_processed(tmp_path / "out")
    # Only the white middle square survives (bicubic edges blend a little green in).
    assert images[..., 1:-1].min() > 240 and images[0, 0].min() > 200


def test_preprocess_stage_writes_manifest_that_matches(raw, tmp_path):
    params = write_params(tmp_path / "params.yaml", {"preprocess": {"image_size": 32}})
    run_stage("preprocess", "--params", str(params), "--raw", str(raw), "--out", str(tmp_path / "p"),
              cwd=tmp_path)
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert manifest["shape"] == [5, 3, 32, 32] and manifest["skipped_count"] == 0
    assert len(manifest["sha256"]) == 64


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height pixels, with a tiny compressed body."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("side", [20000, 12000])  # Pillow raises beyond 2x its limit, warns below
def test_a_decompression_bomb_is_skipped_and_listed(raw, tmp_path, side):
    data = bomb_png(side, side)
    assert len(data) < 200
    (raw / "cars_train" / "cars_train" / "bomb.png").write_bytes(data)
    manifest = preprocess(raw, tmp_path / "out", cfg(max_bad_fraction=0.5))
    (skipped,) = manifest["skipped"]
    assert skipped["file"].endswith("bomb.png")
    assert skipped["reason"].startswith("too large") and "limit" in skipped["reason"]
    assert f"{side * side}" in skipped["reason"].replace(",", "") or f"{side}x{side}" in skipped["reason"]
    assert manifest["count"] == 5


def test_the_stage_exits_0_past_a_bomb_in_a_kaggle_layout_zip(tmp_path):
    """The whole path a user takes: data.source archive -> download -> preprocess."""
    import zipfile

    archive = tmp_path / "cars.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(120):
            buf = io.BytesIO()
            solid((i, 80, 160)).save(buf, format="JPEG")
            zf.writestr(f"cars_train/cars_train/{i:05d}.jpg", buf.getvalue())
        zf.writestr("cars_test/cars_test/00001.jpg", bomb_png(20000, 20000))
    params = write_params(tmp_path / "params.yaml", {
        "data": {"source": "archive", "archive": str(archive)},
        "preprocess": {"image_size": 16}})
    run_stage("download", "--params", str(params), "--out", str(tmp_path / "raw"), cwd=tmp_path)
    done = run_stage("preprocess", "--params", str(params), "--raw", str(tmp_path / "raw"),
                     "--out", str(tmp_path / "p"), cwd=tmp_path)
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert [s["file"] for s in manifest["skipped"]] == ["cars_test/cars_test/00001.jpg"]
    assert manifest["skipped"][0]["reason"].startswith("too large") and manifest["count"] == 120

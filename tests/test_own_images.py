"""Training on your own images (a folder, or any zip of images): every readable image of a
nested folder of mixed formats, modes and sizes lands in images.npy, odd files are listed
or counted, the folder is never written, and a zip of it gives the same array."""

from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.config import PreprocessConfig
from ddpm.data.download import fetch_archive
from ddpm.data.folder import FolderError, list_images, open_folder
from ddpm.data.preprocess import preprocess
from ddpm.data.processed import load_processed

SIZE = 16
RED, GREEN, BLUE, WHITE = (220, 20, 20), (20, 200, 20), (20, 20, 220), (255, 255, 255)


def jpeg_with_orientation(orientation: int) -> bytes:
    """120x80, left half red, right half blue, stored sideways: EXIF orientation 6 says
    'turn 90 degrees clockwise to show', so upright the red half is on top."""
    image = Image.new("RGB", (120, 80), BLUE)
    image.paste(RED, (0, 0, 60, 80))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def own_images() -> dict[str, bytes]:
    """Relative path -> bytes: one of each odd kind a user's folder holds."""
    rgba = Image.new("RGBA", (60, 40), GREEN + (255,))
    rgba.paste((0, 0, 0, 0), (30, 0, 60, 40))  # right half fully transparent (black below)
    palette = Image.new("P", (48, 48), 0)
    palette.putpalette([*BLUE, *RED] + [0] * 762)
    palette.paste(1, (0, 0, 48, 24))  # top half index 1 (red), transparent below
    gray16 = Image.fromarray(np.full((40, 40), 128 * 256, dtype=np.uint16))  # mode I;16
    frames = [Image.new("P", (40, 40), 0), Image.new("P", (40, 40), 1)]
    for frame in frames:
        frame.putpalette([*RED, *BLUE] + [0] * 762)
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return {
        "upright/sideways.jpg": jpeg_with_orientation(6),
        "pngs/alpha.png": encoded(rgba, "PNG"),
        "pngs/la.png": encoded(Image.new("LA", (40, 40), (90, 0)), "PNG"),
        "pngs/palette.png": encoded(palette, "PNG", transparency=0),
        "pngs/gray16.png": encoded(gray16, "PNG"),
        "more/deeper/animated.GIF": gif.getvalue(),
        "more/photo.webp": encoded(Image.new("RGB", (90, 50), GREEN), "WEBP", lossless=True),
        "more/old.bmp": encoded(Image.new("RGB", (50, 70), BLUE), "BMP"),
        "more/scan.tiff": encoded(Image.new("RGB", (64, 64), RED), "TIFF"),
        "more/print.jpg": encoded(Image.new("CMYK", (80, 60), (0, 255, 255, 0)), "JPEG"),
        "more/gray.jpeg": encoded(Image.new("L", (100, 40), 128), "JPEG"),
        "small.png": encoded(Image.new("RGB", (8, 8), GREEN), "PNG"),  # under image_size
        "broken.jpg": encoded(Image.new("RGB", (200, 150), RED), "JPEG")[:300],  # truncated
        "notes.txt": b"not an image",
        ".DS_Store": b"\0\0\0\1Bud1",
        "._small.png": b"\0\5\26\7AppleDouble",
        ".thumbnails/small.png": encoded(Image.new("RGB", (8, 8), RED), "PNG"),
    }


READABLE = 12  # own_images() less the truncated file, the text file and the hidden ones


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root (hidden ones too), with the SHA-256 of each file."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


def cfg(**kw) -> PreprocessConfig:
    return PreprocessConfig(**{"image_size": SIZE, "workers": 1, "max_bad_fraction": 0.1, **kw})


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_folder(tmp_path / "my photos", own_images())


def by_name(out: Path, root: Path) -> dict[str, np.ndarray]:
    images, manifest = load_processed(out)
    skipped = {s["file"] for s in manifest["skipped"]}
    kept = [listed for listed in (p.relative_to(root).as_posix() for p in list_images(root).files)
            if listed not in skipped]
    return dict(zip(kept, images))


def mean_rgb(image: np.ndarray, rows=slice(None), cols=slice(None)) -> np.ndarray:
    return image[:, rows, cols].reshape(3, -1).mean(axis=1)


def test_every_readable_image_lands_in_the_array_and_the_folder_is_untouched(folder, tmp_path):
    before = snapshot(folder)
    manifest = preprocess(folder, tmp_path / "out", cfg())
    assert snapshot(folder) == before  # read, never written: no cache, no thumbnail

    assert manifest["count"] == READABLE and manifest["found"] == READABLE + 1
    assert manifest["per_split"] == {"train": 0, "test": 0, "other": READABLE}
    (skipped,) = manifest["skipped"]
    assert skipped["file"] == "broken.jpg" and skipped["reason"].startswith("unreadable")
    assert manifest["upscaled"] == 1  # small.png, 8x8 -> 16x16
    assert manifest["ignored"] == {"hidden": 3, "not an image file name": 1}

    got = by_name(tmp_path / "out", folder)
    assert len(got) == READABLE
    assert set(got) == {rel for rel in own_images() if rel.count(".") == 1
                        and not rel.startswith(".") and rel not in ("notes.txt", "broken.jpg")}
    near = lambda a, b, tol=12: np.abs(np.asarray(a) - np.asarray(b)).max() <= tol  # noqa: E731
    # EXIF orientation 6: the left (red) half of the stored picture is the top when upright.
    assert near(mean_rgb(got["upright/sideways.jpg"], rows=slice(0, 6)), RED, 20)
    assert near(mean_rgb(got["upright/sideways.jpg"], rows=slice(10, 16)), BLUE, 20)
    # Transparent pixels on white: RGBA, LA and a palette with a transparent index.
    assert near(mean_rgb(got["pngs/alpha.png"], cols=slice(0, 6)), GREEN)
    assert near(mean_rgb(got["pngs/alpha.png"], cols=slice(10, 16)), WHITE)
    assert near(mean_rgb(got["pngs/la.png"]), WHITE, 0)
    assert near(mean_rgb(got["pngs/palette.png"], rows=slice(0, 6)), RED)
    assert near(mean_rgb(got["pngs/palette.png"], rows=slice(10, 16)), WHITE)
    assert near(mean_rgb(got["pngs/gray16.png"]), (128, 128, 128), 1)  # 16-bit: top 8 bits
    assert near(mean_rgb(got["more/deeper/animated.GIF"]), RED)  # the first frame
    assert near(mean_rgb(got["more/print.jpg"]), (255, 0, 0), 16)  # CMYK: no cyan = red
    assert near(mean_rgb(got["more/gray.jpeg"]), (128, 128, 128), 3)
    for rel, colour in [("more/photo.webp", GREEN), ("more/old.bmp", BLUE),
                        ("more/scan.tiff", RED), ("small.png", GREEN)]:
        assert near(mean_rgb(got[rel]), colour), rel


def test_a_zip_of_the_folder_gives_the_same_array(folder, tmp_path):
    preprocess(folder, tmp_path / "from-folder", cfg())
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # as a file manager zips it: one top folder
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, f"my photos/{path.relative_to(folder).as_posix()}")
    fetch_archive(archive, tmp_path / "raw")
    manifest = preprocess(tmp_path / "raw", tmp_path / "from-zip", cfg())
    from_folder, folder_manifest = load_processed(tmp_path / "from-folder")
    from_zip, _ = load_processed(tmp_path / "from-zip")
    np.testing.assert_array_equal(from_zip, from_folder)
    assert manifest["sha256"] == folder_manifest["sha256"]
    assert [s["file"] for s in manifest["skipped"]] == ["my photos/broken.jpg"]


def test_symlinks_are_followed_only_to_files_inside_the_folder(tmp_path):
    outside = write_folder(tmp_path / "elsewhere", {"secret.png": own_images()["small.png"],
                                                    "sub/x.png": own_images()["small.png"]})
    root = write_folder(tmp_path / "photos", {k: v for k, v in own_images().items()
                                              if k.startswith("more/")})
    (root / "to-outside.png").symlink_to(outside / "secret.png")
    (root / "outside-folder").symlink_to(outside / "sub")
    (root / "again.bmp").symlink_to(root / "more" / "old.bmp")  # inside: read
    (root / "more-again").symlink_to(root / "more")  # a folder: listed where it really is
    (root / "dangling.jpg").symlink_to(root / "nothing.jpg")
    listing = list_images(root)
    assert [listing.relative(p) for p in listing.files] == [
        "again.bmp", "more/deeper/animated.GIF", "more/gray.jpeg", "more/old.bmp",
        "more/photo.webp", "more/print.jpg", "more/scan.tiff"]
    assert listing.ignored == {"symlink leading outside the folder": 2, "symlinked folder": 1,
                               "broken symlink": 1}
    manifest = preprocess(root, tmp_path / "out", cfg())
    assert manifest["count"] == 7 and not manifest["skipped"]


def test_open_folder_says_what_is_wrong_in_one_line(tmp_path, monkeypatch):
    cases = [(tmp_path / "nowhere", "does not exist"),
             (write_folder(tmp_path, {"one.zip": b"PK"}) / "one.zip", "is a file, not a folder"),
             (write_folder(tmp_path / "texts", {"a.txt": b"", ".b.png": b""}),
              re.escape("holds no images (looked for .jpg .jpeg .png .bmp .gif .webp .tif "
                        ".tiff files")),
             (write_folder(tmp_path / "single", {"sub/only.png": b"x"}),
              r"holds only one image \(sub/only.png\); the pipeline needs at least 2")]
    for path, says in cases:
        with pytest.raises(FolderError, match=says) as err:
            open_folder(path)
        assert "\n" not in str(err.value) and "data.folder" in str(err.value)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as root, chmod can't show it
    with pytest.raises(FolderError, match="which you may not read.*chmod -R u\\+rX"):
        open_folder(tmp_path / "single")

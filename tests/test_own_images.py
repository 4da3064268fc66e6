"""Training on your own images (data.source: folder, or any zip of images): every readable
image of a nested folder of mixed formats, modes and sizes lands in images.npy, odd files
are listed or counted, the folder is never written, a zip of it gives the same array, and
DVC reruns preprocess when an image is added, wherever the folder is."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import dvc, make_dvc_project, run_stage, tiny, write_params
from ddpm.config import ConfigError, PreprocessConfig, params_from_dict
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
    assert list_images(folder).ignored == {"hidden": 3, "not an image file name": 1}

    # A .DS_Store or a thumbnail folder that appears later changes no processed data.
    write_folder(folder, {"more/.DS_Store": b"Bud1", ".thumbnails/x.png": b"", "more/x.txt": b""})
    assert preprocess(folder, tmp_path / "again", cfg()) == manifest

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


@pytest.mark.parametrize("data, preprocess_section, says", [
    ({"source": "folder"}, {}, "data.folder: data.source is 'folder' but data.folder is "
                               "data/raw"),
    ({"source": "kaggle", "folder": "/srv/photos"}, {},
     "data.folder: is '/srv/photos', but data.source is 'kaggle'"),
    ({"source": "folder", "folder": "photos"}, {}, "data.folder: 'photos' is not an absolute "
                                                   "path; write it in full"),
    ({"source": "folder", "folder": "~/photos"}, {}, f"write it in full (here "
                                                     f"'{Path('~/photos').expanduser()}')"),
    ({"source": "folder", "folder": "/srv/photos"}, {"resize": "bbox_crop"},
     "preprocess.resize: 'bbox_crop' crops to the Stanford Cars devkit's bounding boxes"),
])
def test_folder_settings_that_cannot_work_are_refused(data, preprocess_section, says):
    with pytest.raises(ConfigError) as err:
        params_from_dict({"data": data, "preprocess": preprocess_section})
    assert says in str(err.value) and "\n" not in str(err.value)
    if preprocess_section:  # the alternatives are named
        assert "'squash'" in str(err.value) and "'center_crop'" in str(err.value)


def test_the_download_path_is_data_folder_default():
    """config.DOWNLOADED (data.folder's default) is where dvc.yaml's download stage writes."""
    import yaml

    from conftest import REPO
    from ddpm.config import DOWNLOADED

    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert pipeline["vars"][0]["paths"]["raw"] == DOWNLOADED
    assert yaml.safe_load((REPO / "params.yaml").read_text())["data"]["folder"] == DOWNLOADED
    assert params_from_dict({"data": {"source": "folder", "folder": "/srv/x"}}).data.folder == \
        "/srv/x"


def test_the_stages_read_the_folder_where_it_is(folder, tmp_path):
    params = write_params(tmp_path / "params.yaml", {
        "data": {"source": "folder", "folder": str(folder)},
        "preprocess": {"image_size": SIZE, "max_bad_fraction": 0.1}})
    before = snapshot(folder)
    done = run_stage("download", "--params", str(params), "--out", str(tmp_path / "raw"),
                     cwd=tmp_path)
    assert f"the {READABLE + 1} images in {folder}" in done.stdout
    assert list((tmp_path / "raw").iterdir()) == []
    done = run_stage("preprocess", "--params", str(params), "--out", str(tmp_path / "p"),
                     cwd=tmp_path)
    assert f"{READABLE} images" in done.stdout and "1 enlarged" in done.stdout
    assert "left alone: 3 hidden, 1 not an image file name" in done.stdout
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["count"] == READABLE
    assert snapshot(folder) == before


# ------------------------------------------------------------------- with DVC


def test_the_tiny_pipeline_trains_from_a_folder_and_dvc_sees_a_new_image(tmp_path):
    """`dvc repro` end to end from a folder outside the project (by its absolute path), then
    one image more: `dvc status` names the folder, `dvc repro` reruns preprocess and counts
    it, and a --temp experiment (a copy of the project) hashes the same folder."""
    from ddpm.data.synthetic import render_car

    photos = tmp_path / "outside" / "car photos"
    formats = ["JPEG", "PNG", "WEBP"]
    for i in range(24):
        car = render_car(7, "train", i + 1).image
        fmt = formats[i % 3]
        (photos / f"batch{i % 2}").mkdir(parents=True, exist_ok=True)
        car.save(photos / f"batch{i % 2}" / f"car{i:02d}.{fmt.lower()}", fmt)
    (photos / "readme.txt").write_text("my cars")
    before = snapshot(photos)
    overrides = tiny(
        data={"source": "folder", "folder": str(photos)},
        train={"epochs": 1, "batch_size": 8, "log_every": 1, "warmup_epochs": 0},
        generate={"num_samples": 8, "sampler": "ddim", "steps": 4, "batch_size": 8,
                  "grid_size": 4},
        evaluate={"kid_subset_size": 4, "kid_subsets": 2, "batch_size": 24},
        sweep={"points": []},
    )
    root = make_dvc_project(tmp_path / "project", overrides)
    dvc("repro", cwd=root)
    assert json.loads((root / "data/processed/manifest.json").read_text())["count"] == 24
    assert (root / "models/model.pt").is_file()
    assert np.isfinite(json.loads((root / "reports/eval.json").read_text())["fid"])
    import yaml

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    (folder_dep,) = [d for d in lock["stages"]["preprocess"]["deps"] if d["path"] == str(photos)]
    assert folder_dep["md5"].endswith(".dir") and folder_dep["nfiles"] == 25  # readme.txt too
    assert snapshot(photos) == before

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ddpm-cars").experiment_id])
    (training,) = [i for i in run.inputs.dataset_inputs if i.dataset.name == "car photos"]
    assert json.loads(training.dataset.source)["uri"] == f"folder:{photos}"
    manifest = json.loads((root / "data/processed/manifest.json").read_text())
    assert manifest["sha256"].startswith(training.dataset.digest)
    version = client.get_model_version("ddpm-stanford-cars", "1")  # registered as ever
    assert version.tags["ddpm.dataset_sha256"] == manifest["sha256"]

    Image.open(photos / "batch0" / "car00.jpeg").save(photos / "batch1" / "new.png")
    status = dvc("status", cwd=root).stdout
    assert "preprocess:" in status and str(photos) in status and "download:" not in status
    out = dvc("repro", "preprocess", cwd=root).stdout
    assert "Running stage 'preprocess'" in out and "Running stage 'download'" not in out
    assert json.loads((root / "data/processed/manifest.json").read_text())["count"] == 25

    # A --temp experiment runs in a copy under .dvc/tmp/exps/ and hashes the same folder.
    dvc("exp", "run", "--temp", "preprocess", "-S", "preprocess.max_bad_fraction=0.5", cwd=root)
    shown = json.loads(dvc("exp", "show", "--json", cwd=root).stdout)
    revs = [rev for top in shown
            for rev in [top] + [r for exp in top.get("experiments") or [] for r in exp["revs"]]]
    hashes = [dep["hash"] for rev in revs
              for name, dep in ((rev.get("data") or {}).get("deps") or {}).items()
              if name.endswith("car photos") and dep.get("hash")]  # the baseline ran nothing
    assert len(hashes) == 2 and len(set(hashes)) == 1  # workspace and experiment: one hash
    assert len(snapshot(photos)) == len(before) + 1  # only the image added here

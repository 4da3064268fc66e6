"""The download stage's library: safe unzipping, atomic raw folders, and the real
kaggle client end to end against a loopback stand-in (tests/kaggle_standin.py)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
try:
    import ddpm  # noqa: F401
except ImportError:  # not installed into the environment: use the source tree
    sys.path.insert(0, str(ROOT / "src"))

from ddpm.data.download import (  # noqa: E402
    DownloadError,
    extract_zip,
    fetch_archive,
    fetch_kaggle,
    kaggle_credentials_present,
)
from ddpm.data.folder import FolderError  # noqa: E402
from kaggle_standin import DOWNLOAD, INTROSPECT, PORT, KaggleStandIn  # noqa: E402

DATASET = "eduardo4jesus/stanford-cars-dataset"
KEY = "secret-key-123"
TOKEN = "token-secret-456"
LAYOUT = {
    "car_devkit/devkit/cars_meta.mat",
    "car_devkit/devkit/cars_train_annos.mat",
    "car_devkit/devkit/cars_test_annos.mat",
    "cars_train/cars_train/00001.jpg",
    "cars_train/cars_train/00002.jpg",
    "cars_test/cars_test/00001.jpg",
}


def tiny_jpeg(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (shade, 255 - shade, 64)).save(buf, "JPEG")
    return buf.getvalue()


def cars_zip_bytes(compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A tiny archive in the Kaggle layout."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for i, name in enumerate(sorted(LAYOUT)):
            zf.writestr(name, tiny_jpeg(40 * i) if name.endswith(".jpg") else b"MATLAB 5.0 stand-in")
    return buf.getvalue()


def write_zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def populated_raw_dir(tmp_path: Path) -> Path:
    raw = tmp_path / "data" / "raw"
    (raw / "cars_train" / "cars_train").mkdir(parents=True)
    (raw / "cars_train" / "cars_train" / "old.jpg").write_bytes(b"previous download")
    return raw


def assert_untouched(raw: Path) -> None:
    """The previous raw folder is intact and no temporary folder is left beside it."""
    assert files_under(raw) == {"cars_train/cars_train/old.jpg"}
    assert (raw / "cars_train" / "cars_train" / "old.jpg").read_bytes() == b"previous download"
    assert sorted(p.name for p in raw.parent.iterdir()) == ["raw"]


# ------------------------------------------------------------------- zip safety


@pytest.mark.parametrize("evil", ["../evil.txt", "a/../../evil.txt", "..\\evil.txt", "C:/evil.txt",
                                  "ABSOLUTE"])
def test_extract_refuses_entries_outside_dest(tmp_path, evil):
    outside = tmp_path / "outside" / "evil.txt"
    if evil == "ABSOLUTE":
        evil = str(outside)  # /tmp/.../outside/evil.txt
    # The bad entry comes last: an extractor that checks as it goes writes the first.
    archive = write_zip(tmp_path / "evil.zip", [("cars_train/cars_train/1.jpg", tiny_jpeg(0)),
                                                (evil, b"owned")])
    assert evil in zipfile.ZipFile(archive).namelist()  # zipfile kept the name as written
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError, match="refusing") as err:
        extract_zip(archive, dest)
    assert repr(evil) in str(err.value)
    assert not dest.exists()
    assert not outside.exists() and not (tmp_path / "evil.txt").exists()
    assert files_under(tmp_path) == {"evil.zip"}


def test_extract_refuses_symlink_entries(tmp_path):
    link = zipfile.ZipInfo("cars_train/cars_train/link.jpg")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = write_zip(tmp_path / "link.zip", [("cars_test/cars_test/1.jpg", tiny_jpeg(0)),
                                                (link, b"/etc/passwd")])
    with pytest.raises(DownloadError, match="symbolic link"):
        extract_zip(archive, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("evil", ["../evil.txt", "ABSOLUTE"])
def test_fetch_archive_refuses_zip_slip_and_keeps_raw_dir(tmp_path, evil):
    raw = populated_raw_dir(tmp_path)
    if evil == "ABSOLUTE":
        evil = str(tmp_path / "evil.txt")
    archive = write_zip(tmp_path / "evil.zip", [("cars_train/cars_train/1.jpg", tiny_jpeg(0)),
                                                (evil, b"owned")])
    with pytest.raises(DownloadError, match="refusing"):
        fetch_archive(archive, raw)
    assert_untouched(raw)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "data" / "evil.txt").exists()


# --------------------------------------------------------------- fetch_archive


def test_fetch_archive_unpacks_to_the_kaggle_layout_replacing_raw_dir(tmp_path):
    raw = populated_raw_dir(tmp_path)
    archive = tmp_path / "stanford-cars-dataset.zip"
    archive.write_bytes(cars_zip_bytes())
    logs: list[str] = []
    fetch_archive(archive, raw, log=logs.append)
    assert files_under(raw) == LAYOUT  # the stale file is gone: raw/ was replaced whole
    Image.open(raw / "cars_test" / "cars_test" / "00001.jpg").verify()
    assert sorted(p.name for p in raw.parent.iterdir()) == ["raw"]
    assert any("6 files (3 images)" in line for line in logs)


def test_extract_unwraps_a_zip_inside_a_zip(tmp_path):
    archive = write_zip(tmp_path / "outer.zip", [("stanford-cars-dataset.zip", cars_zip_bytes())])
    assert extract_zip(archive, tmp_path / "dest") == len(LAYOUT)
    assert files_under(tmp_path / "dest") == LAYOUT


def test_truncated_zip_keeps_previous_raw_dir(tmp_path):
    raw = populated_raw_dir(tmp_path)
    data = cars_zip_bytes()
    archive = tmp_path / "truncated.zip"
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DownloadError, match="not a zip archive"):
        fetch_archive(archive, raw)
    assert_untouched(raw)


def test_corrupt_member_midway_keeps_previous_raw_dir(tmp_path):
    """The central directory is fine, so unpacking starts; the last member fails its CRC."""
    raw = populated_raw_dir(tmp_path)
    data = bytearray(cars_zip_bytes(zipfile.ZIP_STORED))
    last = zipfile.ZipFile(io.BytesIO(bytes(data))).infolist()[-1]
    start = last.header_offset + 30 + len(last.filename.encode()) + len(last.extra)
    data[start + 20] ^= 0xFF
    archive = tmp_path / "corrupt.zip"
    archive.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match=f"corrupt.*{last.filename}"):
        fetch_archive(archive, raw)
    assert_untouched(raw)


def test_fetch_archive_explains_a_missing_file_or_a_non_zip(tmp_path):
    with pytest.raises(DownloadError, match="does not exist") as err:
        fetch_archive(tmp_path / "nowhere.zip", tmp_path / "raw")
    assert "data.archive" in str(err.value) and "synthetic" in str(err.value)
    text = tmp_path / "notes.zip"
    text.write_text("not a zip")
    with pytest.raises(DownloadError, match="not a zip archive.*data.archive"):
        fetch_archive(text, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_archive_without_images_is_refused(tmp_path):
    """Hidden entries (macOS's AppleDouble ._ files) are not images either."""
    raw = populated_raw_dir(tmp_path)
    archive = write_zip(tmp_path / "other.zip", [("readme.txt", b"hello"),
                                                 ("__MACOSX/._00001.jpg", b"AppleDouble"),
                                                 (".thumbs/00001.jpg", tiny_jpeg(9))])
    with pytest.raises(FolderError, match=r"holds no images \(looked for .jpg .jpeg"):
        fetch_archive(archive, raw)
    assert_untouched(raw)


def test_a_zip_that_would_fill_the_disk_is_refused_before_unpacking(tmp_path, monkeypatch):
    """The declared sizes are checked with the other entries, before anything is written."""
    raw = populated_raw_dir(tmp_path)
    archive = write_zip(tmp_path / "big.zip", [(f"photos/{i}.jpg", tiny_jpeg(i)) for i in range(3)])
    need = sum(i.file_size for i in zipfile.ZipFile(archive).infolist())
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real(p)._replace(free=need - 1))
    with pytest.raises(DownloadError, match="would unpack to .* GB free.*Nothing was unpacked"):
        fetch_archive(archive, raw)
    assert_untouched(raw)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=need))
    fetch_archive(archive, raw)
    assert files_under(raw) == {"photos/0.jpg", "photos/1.jpg", "photos/2.jpg"}


# ---------------------------------------------------------------- credentials


KAGGLE_JSON = json.dumps({"username": "tester", "key": KEY})


@pytest.mark.parametrize("files, env, present", [
    ({}, {}, False),
    ({".kaggle/kaggle.json": KAGGLE_JSON}, {}, True),
    ({"cfg/kaggle.json": KAGGLE_JSON}, {"KAGGLE_CONFIG_DIR": "HOME/cfg"}, True),
    ({".config/kaggle/kaggle.json": KAGGLE_JSON}, {}, True),  # kaggle 2.x's XDG fallback
    ({".kaggle/kaggle.json": "{}"}, {}, False),
    ({}, {"KAGGLE_USERNAME": "tester", "KAGGLE_KEY": KEY}, True),
    ({}, {"KAGGLE_KEY": KEY}, False),  # a key without a user name
    ({}, {"KAGGLE_API_TOKEN": TOKEN}, True),
    ({".kaggle/access_token": TOKEN}, {}, True),
    ({".kaggle/credentials.json": json.dumps({"refresh_token": TOKEN})}, {}, True),
])
def test_credentials_are_found_where_kaggle_looks(tmp_path, files, env, present):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    env = {k: v.replace("HOME", str(tmp_path)) for k, v in env.items()}
    assert kaggle_credentials_present(env, tmp_path) is present


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """A fresh HOME, no Kaggle settings, and no way off this machine."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in list(os.environ):
        if name.startswith("KAGGLE_") or name.lower().endswith("_proxy") or name in (
                "XDG_CONFIG_HOME", "VERBOSE", "VERBOSE_OUTPUT"):
            monkeypatch.delenv(name)
    # Anything not on loopback goes to a closed port and fails at once.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    monkeypatch.setenv("no_proxy", "localhost,127.0.0.1")
    return home


def test_no_credentials_fails_fast_and_says_what_to_do(clean_env, tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError) as err:
        fetch_kaggle(DATASET, tmp_path / "data" / "raw")
    assert time.monotonic() - start < 1.0
    message = str(err.value)
    for needed in ("kaggle.json", "KAGGLE_CONFIG_DIR", "KAGGLE_USERNAME", "KAGGLE_KEY",
                   "KAGGLE_API_TOKEN", "data.source: archive", "data.archive", "synthetic"):
        assert needed in message
    assert not (tmp_path / "data").exists()


def test_no_credentials_never_imports_kaggle(clean_env, tmp_path):
    """In a fresh interpreter: `import kaggle` would print its help page."""
    code = (
        "import json, sys, time\n"
        "from ddpm.data.download import fetch_kaggle, DownloadError\n"
        "start = time.monotonic()\n"
        "try:\n"
        f"    fetch_kaggle({DATASET!r}, {str(tmp_path / 'raw')!r})\n"
        "except DownloadError:\n"
        "    pass\n"
        "print(json.dumps({'kaggle': 'kaggle' in sys.modules, 's': time.monotonic() - start}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60, check=True)
    result = json.loads(done.stdout)
    assert result["kaggle"] is False and result["s"] < 1.0
    assert done.stderr == ""
    assert not (clean_env / ".config").exists()  # kaggle's import creates ~/.config/kaggle


# --------------------------------------------- the real kaggle client, end to end


@pytest.fixture
def port_7777():
    with socket.socket() as probe:
        # SO_REUSEADDR, as the stand-in uses: only a live listener makes the port busy,
        # not the TIME_WAIT connections left by the previous test's server.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", PORT))
        except OSError as e:
            pytest.skip(f"port {PORT} is busy ({e}); the kaggle client's TEST environment "
                        f"is fixed to http://localhost:{PORT}")


@pytest.fixture
def kaggle_test_env(clean_env, monkeypatch, port_7777):
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")
    return clean_env


@pytest.fixture
def standin(kaggle_test_env):
    try:
        server = KaggleStandIn({DATASET: cars_zip_bytes()}, username="tester", key=KEY, token=TOKEN)
    except OSError as e:
        pytest.skip(f"can't serve on 127.0.0.1:{PORT}: {e}")
    with server:
        yield server


def assert_no_secret(tmp_path: Path, texts: list[str]) -> None:
    basic = base64.b64encode(f"tester:{KEY}".encode()).decode()
    for secret in (KEY, TOKEN, basic):
        for text in texts:
            assert secret not in text
        assert not [p for p in tmp_path.rglob("*") if secret in p.name]


def test_kaggle_download_end_to_end_with_a_key(standin, monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("KAGGLE_USERNAME", "tester")
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    raw = populated_raw_dir(tmp_path)
    logs: list[str] = []
    fetch_kaggle(DATASET, raw, log=logs.append)

    assert files_under(raw) == LAYOUT
    assert sorted(p.name for p in raw.parent.iterdir()) == ["raw"]
    post, get = standin.requests[-2:]
    assert (post.method, post.path) == ("POST", DOWNLOAD)
    assert post.body == {"ownerSlug": "eduardo4jesus", "datasetSlug": "stanford-cars-dataset"}
    assert post.headers["Authorization"].startswith("Basic ")
    assert get.method == "GET" and get.path.startswith(f"/blobs/{DATASET}.zip?")
    assert "Authorization" not in get.headers  # the blob host never sees credentials
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # the client's prints go through `log`
    assert any("Dataset URL" in line for line in logs)
    assert_no_secret(tmp_path, [out, err, *logs])


def test_kaggle_download_end_to_end_with_a_token(standin, monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("KAGGLE_API_TOKEN", TOKEN)
    raw = tmp_path / "data" / "raw"
    logs: list[str] = []
    fetch_kaggle(DATASET, raw, log=logs.append)
    assert files_under(raw) == LAYOUT
    paths = [(r.method, r.path) for r in standin.requests]
    assert ("POST", INTROSPECT) in paths and ("POST", DOWNLOAD) in paths
    download = next(r for r in standin.requests if r.path == DOWNLOAD)
    assert download.headers["Authorization"] == f"Bearer {TOKEN}"
    out, err = capfd.readouterr()
    assert_no_secret(tmp_path, [out, err, *logs])


def test_kaggle_refused_key_keeps_raw_dir_and_hides_the_key(standin, monkeypatch, tmp_path, capfd):
    wrong = "wrong-secret-789"
    monkeypatch.setenv("KAGGLE_USERNAME", "tester")
    monkeypatch.setenv("KAGGLE_KEY", wrong)
    raw = populated_raw_dir(tmp_path)
    logs: list[str] = []
    with pytest.raises(DownloadError, match="HTTP 401") as err:
        fetch_kaggle(DATASET, raw, log=logs.append)
    assert_untouched(raw)
    out, errout = capfd.readouterr()
    for text in (str(err.value), out, errout, *logs):
        assert wrong not in text and base64.b64encode(f"tester:{wrong}".encode()).decode() not in text


def test_kaggle_rejected_token_is_a_download_error_not_an_exit(standin, monkeypatch, tmp_path,
                                                                capfd):
    """kaggle prints its help page and calls exit(1) when no credential works."""
    monkeypatch.setenv("KAGGLE_API_TOKEN", "expired-token-000")
    logs: list[str] = []
    with pytest.raises(DownloadError, match="did not accept the token in KAGGLE_API_TOKEN") as err:
        fetch_kaggle(DATASET, tmp_path / "raw", log=logs.append)
    assert "expired-token-000" not in str(err.value) + "".join(logs)
    assert capfd.readouterr() == ("", "")
    assert not (tmp_path / "raw").exists()


def test_kaggle_unknown_dataset(standin, monkeypatch, tmp_path):
    monkeypatch.setenv("KAGGLE_USERNAME", "tester")
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    with pytest.raises(DownloadError, match="HTTP 404.*data.kaggle_dataset"):
        fetch_kaggle("someone/no-such-dataset", tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_kaggle_unreachable_names_the_dataset_and_a_way_out(kaggle_test_env, monkeypatch, tmp_path):
    """Nothing listens on 7777: a connection error, not a hang or a traceback."""
    monkeypatch.setenv("KAGGLE_USERNAME", "tester")
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    raw = populated_raw_dir(tmp_path)
    with pytest.raises(DownloadError) as err:
        fetch_kaggle(DATASET, raw)
    message = str(err.value)
    assert DATASET in message and "network" in message and "data.source: archive" in message
    assert KEY not in message
    assert_untouched(raw)

"""Fetch the raw images into `data/raw/`: the Stanford Cars archive from Kaggle, or a zip.

`data/raw/` gets the archive's own layout: for the Kaggle one `car_devkit/devkit/*.mat`,
`cars_train/cars_train/*.jpg`, `cars_test/cars_test/*.jpg`; for any other zip of images
whatever folders it holds (the preprocess stage takes every image in it by
`folder.list_images`' rules). It is replaced only when a download and unpack has fully
succeeded, so a `data/raw/` that exists is always complete.

Zips are unpacked by our own `extract_zip`, which refuses any entry that would land
outside the destination (zip-slip) or a zip that would not fit on the disk, before
writing anything.

The `kaggle` package (2.x) authenticates when imported and prints a page of
help when it finds no credentials, so credentials are looked for here first,
without importing it, and `kaggle` is imported only inside `fetch_kaggle`.
Keys and tokens never appear in a message: everything the client prints or
raises passes through `_Credentials.scrub` first.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

from ..atomic import atomic_directory
from .folder import list_images, require_images

Log = Optional[Callable[[str], None]]

KAGGLE_PAGE = "https://www.kaggle.com/datasets/{dataset}"


class DownloadError(Exception):
    """The raw data could not be fetched; the message says what to change."""


# --------------------------------------------------------------------------- zips


def _entry_parts(info: zipfile.ZipInfo) -> list[str]:
    """The entry's path components, or DownloadError if it would escape its folder.

    Both separators count: a Windows-made zip may use backslashes, and
    `..\\evil` is as dangerous as `../evil` once it reaches a Windows machine.
    """
    name = info.filename
    posix = name.replace("\\", "/")
    reason = None
    if "\x00" in name:
        reason = "contains a NUL byte"
    elif posix.startswith("/"):
        reason = "is an absolute path"
    elif re.match(r"^[A-Za-z]:", posix):
        reason = "starts with a drive letter"
    elif ".." in posix.split("/"):
        reason = "contains a '..' component"
    elif stat.S_ISLNK(info.external_attr >> 16):
        reason = "is a symbolic link"
    parts = [p for p in posix.split("/") if p not in ("", ".")]
    if reason is None and not parts and not info.is_dir():
        reason = "has no file name"
    if reason is not None:
        raise DownloadError(
            f"refusing to unpack the archive: entry {name!r} {reason}, so it could write "
            "outside the destination folder. Nothing was unpacked; download the archive "
            "again from a trusted source."
        )
    return parts


def _open_zip(archive: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive)
    except FileNotFoundError:
        raise DownloadError(f"{archive} does not exist") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise DownloadError(
            f"{archive} is not a readable zip archive ({type(e).__name__}: {e}); "
            "it may be truncated or corrupt: download it again"
        ) from None


def extract_zip(archive: Path, dest: Path) -> int:
    """Unpack `archive` into `dest` and return how many files it wrote.

    Every entry is checked before anything is written: an absolute path, a
    `..` component, a drive letter or a symbolic link raises DownloadError
    naming the entry, and so do entries whose declared sizes add up to more
    than the free disk space (a zip bomb); `dest` is then neither created nor
    touched. A zip
    whose only entry is another zip (a zip wrapped once more) is unpacked in
    its place, one level deep, so `dest` gets the inner archive's own layout.

    Not atomic by itself: a corrupt member found halfway leaves the files
    before it. Callers unpack into `atomic_directory` (see `fetch_archive`).
    """
    return _extract(Path(archive), Path(dest), unwrap=True)


def _extract(archive: Path, dest: Path, unwrap: bool) -> int:
    with _open_zip(archive) as zf:
        infos = zf.infolist()
        plan = [(info, _entry_parts(info)) for info in infos]  # all checked first
        root = dest.resolve()
        for info, parts in plan:
            if parts and not root.joinpath(*parts).resolve().is_relative_to(root):
                raise DownloadError(f"refusing to unpack the archive: entry {info.filename!r} "
                                    f"resolves outside {dest}")
        files = [(info, parts) for info, parts in plan if not info.is_dir()]
        nested = unwrap and len(files) == 1 and files[0][1][-1].lower().endswith(".zip")
        _require_room(archive, sum(info.file_size for info, _ in files), dest)

        dest.mkdir(parents=True, exist_ok=True)
        if nested:
            return _extract_nested(zf, files[0][0], dest)
        try:
            for info, parts in plan:
                target = dest.joinpath(*parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as e:
            raise DownloadError(
                f"{archive} is corrupt or unsupported at entry {info.filename!r} "
                f"({type(e).__name__}: {e}); download it again"
            ) from None
    return len(files)


def _require_room(archive: Path, size: int, dest: Path) -> None:
    """DownloadError unless `size` bytes fit beside `dest`. zipfile stops at each entry's
    declared size (a larger stream fails its CRC), so the sum bounds what unpacking writes,
    a zip bomb's included."""
    parent = next(p for p in (dest, *dest.parents) if p.exists())
    free = shutil.disk_usage(parent).free
    if size > free:
        raise DownloadError(f"{archive} would unpack to {size / 1e9:.2f} GB, but {parent} has "
                            f"only {free / 1e9:.2f} GB free: free some space, or check that "
                            f"the zip is the one you meant (a zip bomb declares sizes like "
                            f"this). Nothing was unpacked")


def _extract_nested(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path) -> int:
    # The inner zip goes to a hidden, uniquely named file so that none of its
    # own entries can collide with it while it is being read.
    fd, inner = tempfile.mkstemp(prefix=".nested-", suffix=".zip", dir=dest)
    try:
        with os.fdopen(fd, "wb") as out, zf.open(info) as src:
            shutil.copyfileobj(src, out, 1 << 20)
        return _extract(Path(inner), dest, unwrap=False)  # one level: a zip quine stops here
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise DownloadError(f"the zip inside the archive, {info.filename!r}, is corrupt "
                            f"({type(e).__name__}: {e}); download it again") from None
    finally:
        os.unlink(inner)


def fetch_archive(archive: Path, raw_dir: Path, log: Log = None) -> None:
    """Unpack a zip of images into `raw_dir`: the Stanford Cars zip downloaded by hand, or
    any other (every image in it is used, as from a folder).

    `raw_dir` is replaced only when the whole archive unpacked; on any error
    the previous `raw_dir` (if any) is left exactly as it was.
    """
    log = log or (lambda message: None)
    archive, raw_dir = Path(archive).expanduser(), Path(raw_dir)
    fix = ("set data.archive to the path of a zip of images, e.g. the one downloaded from "
           f"{KAGGLE_PAGE.format(dataset='eduardo4jesus/stanford-cars-dataset')} "
           "(the 'Download' button), or use data.source: kaggle, folder or synthetic")
    if not archive.exists():
        raise DownloadError(f"data.archive points to {archive}, which does not exist: {fix}")
    if not archive.is_file():
        raise DownloadError(f"data.archive points to {archive}, which is not a file: {fix}")
    if not zipfile.is_zipfile(archive):
        raise DownloadError(f"data.archive points to {archive}, which is not a zip archive "
                            f"(or is truncated): {fix}")
    log(f"unpacking {archive} ({archive.stat().st_size / 1e6:.1f} MB) into {raw_dir}")
    with atomic_directory(raw_dir) as tmp:
        count = extract_zip(archive, tmp)
        images = len(require_images(list_images(tmp), f"the archive {archive}", fix).files)
    log(f"unpacked {count} files ({images} images) into {raw_dir}")


# --------------------------------------------------------------------- credentials


@dataclass
class _Credentials:
    """Where kaggle 2.x would find credentials, without importing it.

    `sources` describe them (never their values); `secrets` are the values,
    kept only to scrub them from anything shown to the user.
    """

    sources: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    config_dir: Optional[Path] = None  # the folder kaggle reads kaggle.json from

    def scrub(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        # Signed download URLs carry their signature in the query string.
        return re.sub(r"(https?://[^\s?'\"]+)\?[^\s'\"]*", r"\1?…", text)


def _read_text(path: Path) -> Optional[str]:
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def _read_json(path: Path) -> dict:
    text = _read_text(path)
    try:
        data = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _kaggle_config_dir(env: Mapping[str, str], home: Path) -> Path:
    """The folder kaggle 2.x reads `kaggle.json` from (its `KaggleApi.config_dir`)."""
    if env.get("KAGGLE_CONFIG_DIR"):
        return Path(env["KAGGLE_CONFIG_DIR"]).expanduser()
    legacy = home / ".kaggle"
    if sys.platform.startswith("linux") and not legacy.exists():
        return Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"
    return legacy


def _find_credentials(env: Mapping[str, str], home: Path) -> _Credentials:
    """Mirror kaggle 2.2.5's `KaggleApi.authenticate` and kagglesdk's token lookup."""
    creds = _Credentials(config_dir=_kaggle_config_dir(env, home))

    # 1. An access token: KAGGLE_API_TOKEN (the token, or a file holding it), ~/.kaggle/access_token.
    token_var = env.get("KAGGLE_API_TOKEN")
    if token_var:
        from_file = _read_text(Path(token_var)) if Path(token_var).is_file() else None
        creds.secrets.append(token_var)
        if from_file:
            creds.secrets.append(from_file)
        creds.sources.append("the token in KAGGLE_API_TOKEN")
    for name in ("access_token", "access_token.txt"):
        token = _read_text(home / ".kaggle" / name)
        if token:
            creds.secrets.append(token)
            creds.sources.append(f"the token in {home / '.kaggle' / name}")

    # 2. A legacy API key: username and key, each from kaggle.json or KAGGLE_USERNAME / KAGGLE_KEY.
    config_file = creds.config_dir / "kaggle.json"
    config = _read_json(config_file)
    username = env.get("KAGGLE_USERNAME") or config.get("username")
    key = env.get("KAGGLE_KEY") or config.get("key")
    for secret in (env.get("KAGGLE_KEY"), config.get("key")):
        if isinstance(secret, str) and secret:
            creds.secrets.append(secret)
            if username:  # the HTTP Basic header carries base64("user:key")
                creds.secrets.append(base64.b64encode(f"{username}:{secret}".encode()).decode())
    if username and key:
        where = [str(config_file)] if config.get("key") or config.get("username") else []
        where += [v for v in ("KAGGLE_USERNAME", "KAGGLE_KEY") if env.get(v)]
        creds.sources.append("the API key from " + " and ".join(where))

    # 3. OAuth credentials saved by `kaggle auth login`.
    oauth_file = home / ".kaggle" / "credentials.json"
    oauth = _read_json(oauth_file)
    for name in ("refresh_token", "access_token"):
        if isinstance(oauth.get(name), str) and oauth[name]:
            creds.secrets.append(oauth[name])
    if oauth.get("refresh_token"):
        creds.sources.append(f"the OAuth credentials in {oauth_file}")

    creds.secrets = [s for s in dict.fromkeys(creds.secrets) if len(s) >= 4]
    return creds


def kaggle_credentials_present(env: Mapping[str, str] = os.environ, home: Optional[Path] = None) -> bool:
    """Whether the kaggle client would find credentials; reads files only, imports nothing."""
    return bool(_find_credentials(env, Path(home) if home is not None else Path.home()).sources)


def _no_credentials_message(dataset: str, env: Mapping[str, str], home: Path) -> str:
    if env.get("KAGGLE_CONFIG_DIR"):
        where = f"in KAGGLE_CONFIG_DIR, as {_kaggle_config_dir(env, home) / 'kaggle.json'}"
    else:
        where = (f"as ~/.kaggle/kaggle.json ({home / '.kaggle' / 'kaggle.json'}),\n"
                 "    or in the folder named by KAGGLE_CONFIG_DIR,")
    return (
        f"no Kaggle credentials found, so {dataset} can't be downloaded from Kaggle.\n"
        "Create an API token at https://www.kaggle.com/settings/api and give it to the\n"
        "kaggle client in one of these ways:\n"
        f"  - save kaggle.json ({{\"username\": ..., \"key\": ...}}) {where} and chmod 600 it;\n"
        "  - export KAGGLE_USERNAME=<your user name> and KAGGLE_KEY=<your key>;\n"
        "  - export KAGGLE_API_TOKEN=<your token> (or save the token in ~/.kaggle/access_token);\n"
        "    `kaggle auth login` (OAuth) works too.\n"
        "Without Kaggle: download the zip by hand from "
        f"{KAGGLE_PAGE.format(dataset=dataset)} and set\n"
        "  data.source: archive  with  data.archive: path/to.zip\n"
        "or set data.source: synthetic to run on built-in synthetic cars."
    )


# -------------------------------------------------------------------------- kaggle


@contextlib.contextmanager
def _forward_output(log: Log, creds: _Credentials) -> Iterator[None]:
    """Catch what the kaggle client prints and hand it to `log`, scrubbed."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield
    finally:
        for line in out.getvalue().splitlines():
            if log is not None and line.strip() and "authorization" not in line.lower():
                log("kaggle: " + creds.scrub(line.strip()))


def _kaggle_api(creds: _Credentials):
    """An authenticated `KaggleApi`, building its clients for KAGGLE_API_ENVIRONMENT.

    kaggle 2.2.5's `KaggleApi` builds every kagglesdk client for api.kaggle.com
    (or http://localhost for LOCALHOST) and ignores the SDK's other
    environments; kagglesdk's own `get_env()` maps all of them (TEST is
    http://localhost:7777, which the tests serve). With the variable unset both
    give api.kaggle.com. `verbose` stays off: it would print the auth header.
    """
    from kaggle.api.kaggle_api_extended import KaggleApi
    from kagglesdk import KaggleClient
    from kagglesdk.kaggle_env import get_env

    class Api(KaggleApi):
        def build_kaggle_client(self):
            return KaggleClient(
                env=get_env(),
                verbose=False,
                username=self.config_values.get(self.CONFIG_NAME_USER),
                password=self.config_values.get(self.CONFIG_NAME_KEY),
                api_token=self.config_values.get(self.CONFIG_NAME_TOKEN),
                response_processor=self.get_response_processor(),
            )

    api = Api()
    # KaggleApi fixes its config path when `kaggle` is first imported; use the
    # folder that was searched just now instead.
    api.config_dir = str(creds.config_dir)
    api.config = str(creds.config_dir / "kaggle.json")
    try:
        api.authenticate()
    except SystemExit:  # it prints help and calls exit(1) when nothing works
        raise DownloadError(
            f"Kaggle did not accept {', '.join(creds.sources)} "
            "(an expired or revoked token?): create a new token at "
            "https://www.kaggle.com/settings/api"
        ) from None
    return api


def _explain(error: BaseException, dataset: str, creds: _Credentials) -> DownloadError:
    if isinstance(error, ImportError):
        return DownloadError(f"the kaggle client can't be imported ({error}): install it with "
                             "`pip install kaggle`, or use data.source: archive or synthetic")
    detail = creds.scrub(f"{type(error).__name__}: {error}")
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, DownloadError):
        return DownloadError(creds.scrub(str(error)))
    if status in (401, 403):
        return DownloadError(
            f"Kaggle refused to send {dataset} (HTTP {status}) for "
            f"{', '.join(creds.sources)}: check the user name and key or token "
            "(https://www.kaggle.com/settings/api), and that your account can open "
            f"{KAGGLE_PAGE.format(dataset=dataset)} ({detail})"
        )
    if status == 404:
        return DownloadError(
            f"Kaggle has no dataset {dataset} (HTTP 404): check data.kaggle_dataset "
            f"against {KAGGLE_PAGE.format(dataset=dataset)} ({detail})"
        )
    import requests  # a dependency of kaggle, which is imported by now

    if isinstance(error, (requests.ConnectionError, requests.Timeout)) or status is not None:
        return DownloadError(
            f"could not download {dataset} from Kaggle ({detail}). Check the network or "
            "proxy (HTTPS_PROXY) and try again; offline, download the zip by hand and set "
            "data.source: archive with data.archive: path/to.zip, or use data.source: synthetic"
        )
    return DownloadError(f"downloading {dataset} from Kaggle failed ({detail}); "
                         "try again, or use data.source: archive or data.source: synthetic")


def fetch_kaggle(dataset: str, raw_dir: Path, log: Log = None) -> None:
    """Download `dataset` (owner/slug) with the official kaggle client into `raw_dir`.

    Fails fast, before importing `kaggle`, when no credentials are found. The
    zip is downloaded into a temporary folder beside `raw_dir`, unpacked by
    `extract_zip`, and `raw_dir` is replaced only on success.
    """
    say = log or (lambda message: None)
    raw_dir = Path(raw_dir)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+(/\d+)?", dataset or ""):
        raise DownloadError(f"data.kaggle_dataset must be 'owner/dataset', got {dataset!r}")
    home = Path.home()
    creds = _find_credentials(os.environ, home)
    if not creds.sources:
        raise DownloadError(_no_credentials_message(dataset, os.environ, home))

    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    download_dir = Path(tempfile.mkdtemp(prefix=f".{raw_dir.name}.download.", dir=raw_dir.parent))
    try:
        say(f"downloading {dataset} from Kaggle with {', '.join(creds.sources)}")
        start = time.monotonic()
        try:
            with _forward_output(log, creds):
                api = _kaggle_api(creds)
                api.dataset_download_files(dataset, path=str(download_dir), force=True,
                                           quiet=True, unzip=False)
        except Exception as e:
            raise _explain(e, dataset, creds) from None
        zips = sorted(download_dir.glob("*.zip"))
        if len(zips) != 1:
            raise DownloadError(f"the kaggle client left {[p.name for p in zips]} instead of "
                                f"one zip for {dataset}; try again or use data.source: archive")
        size_mb = zips[0].stat().st_size / 1e6
        say(f"downloaded {zips[0].name} ({size_mb:.1f} MB in {time.monotonic() - start:.0f} s); "
            f"unpacking into {raw_dir}")
        with atomic_directory(raw_dir) as tmp:
            count = extract_zip(zips[0], tmp)
            listing = require_images(list_images(tmp), f"the Kaggle dataset {dataset}",
                                     "check data.kaggle_dataset")
            images = len(listing.files)
        say(f"unpacked {count} files ({images} images) into {raw_dir}")
    finally:
        shutil.rmtree(download_dir, ignore_errors=True)

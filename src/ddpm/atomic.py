"""Write files and folders so that a crash never leaves a half-written result.

Everything is first written beside its destination under a temporary name,
then moved into place with `os.replace`, which is atomic on one filesystem.
The result gets the mode `open()` would have given it (0644 files and 0755
folders under a 022 umask), not mkstemp's private 0600.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (os.umask sets
    it while reading, which another thread's file creation could catch)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, directory: bool = False) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside `dest`; on success it replaces `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _usual_mode(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temps(dest: str | Path) -> list[Path]:
    """Delete what a killed writer left beside `dest` (`atomic_path`'s temporary files and
    `atomic_directory`'s temporary folders, which a SIGKILL skips cleaning up: a
    checkpoint's can be most of a gigabyte, and DVC would store it with a persisted
    folder). Only while nothing writes `dest`."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    return _remove(sorted(dest.parent.glob(f".{glob.escape(dest.name)}.*.tmp")))


def remove_stale_temps_in(folder: str | Path) -> list[Path]:
    """`remove_stale_temps` for every output inside `folder` (one that only this writer
    fills, such as the checkpoints folder)."""
    folder = Path(folder)
    return _remove(sorted(folder.glob(".*.tmp"))) if folder.is_dir() else []


def _remove(paths: list[Path]) -> list[Path]:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return paths


def write_bytes(dest: str | Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text(dest: str | Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def write_json(dest: str | Path, obj: Any) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_with(dest: str | Path, writer: Callable[[Path], None]) -> None:
    """`writer(tmp_path)` writes the file (torch.save, np.save, PIL ...)."""
    with atomic_path(dest) as tmp:
        writer(tmp)


@contextlib.contextmanager
def atomic_directory(dest: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `dest`; on success it replaces `dest`.

    On failure the temporary folder is removed and `dest` is left as it was, so
    a folder at `dest` is always a complete one.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        _usual_mode(tmp, directory=True)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""Which files under a folder are the images to train on: one set of rules for data/raw and
for a folder of the user's own (data.source: folder), so that a zip of a folder and the
folder itself give the same images in the same order.

    - every file whose name has an image extension (`formats.IMAGE_SUFFIXES`), in the
      folder and its subfolders, sorted by its path below the folder;
    - hidden files and folders (a name starting with '.', e.g. .DS_Store, .thumbnails/,
      AppleDouble ._*.jpg) are skipped, and so are their contents;
    - a symlink is followed only to a file inside the folder; one that leads outside it,
      a symlinked folder (its images are listed where they really are) and a broken link
      are skipped.

What is skipped is counted by reason, for the stages' log; not for manifest.json, so that a
.DS_Store that appears later changes no processed data and reruns nothing after preprocess.
Nothing here writes anything.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .formats import IMAGE_SUFFIXES, is_image_name

MIN_IMAGES = 2  # the fewest a data set can have: FID and KID need two images a set


class FolderError(ValueError):
    """A folder that is missing, unreadable, or holds too few images; the message says which."""


@dataclass(frozen=True)
class Listing:
    root: Path
    files: list[Path]  # the images, sorted by their path below root
    ignored: Counter = field(default_factory=Counter)  # reason -> how many entries

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def list_images(root: Path) -> Listing:
    """The images under `root` by the rules above (none if `root` does not exist); FolderError
    if a folder can't be read."""
    root = Path(root)
    if not root.exists():
        return Listing(root, [])
    inside = root.resolve()
    files: list[Path] = []
    ignored: Counter = Counter()

    def walk(folder: Path) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError as err:
            raise FolderError(f"cannot read the folder {folder} ({err.strerror or err}): "
                              f"give yourself read access to it (chmod -R u+rX) or move it "
                              f"out of {root}") from None
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                ignored["hidden"] += 1
            elif entry.is_symlink() and not _link_to_a_file_inside(path, inside, ignored):
                continue
            elif entry.is_dir():
                walk(path)
            elif not is_image_name(entry.name):
                ignored["not an image file name"] += 1
            elif entry.is_file():
                files.append(path)
            else:
                ignored["not a regular file"] += 1

    walk(root)
    # Sorted by path components, as sorted(root.rglob("*")) orders them.
    files.sort(key=lambda p: p.relative_to(root).parts)
    return Listing(root, files, ignored)


def _link_to_a_file_inside(link: Path, inside: Path, ignored: Counter) -> bool:
    target = link.resolve()
    if not target.is_relative_to(inside):
        ignored["symlink leading outside the folder"] += 1
    elif not target.exists():
        ignored["broken symlink"] += 1
    elif target.is_dir():
        ignored["symlinked folder"] += 1
    else:
        return True
    return False


def looked_for() -> str:
    """The rules in a few words, for messages that say no images were found."""
    return (f"looked for {' '.join(IMAGE_SUFFIXES)} files (any case) in it and its "
            f"subfolders, skipping hidden ones")


def require_images(listing: Listing, where: str, fix: str) -> Listing:
    """`listing`, or FolderError when it has fewer than MIN_IMAGES images. `where` names the
    place ("data.folder /x", "the archive y.zip"); `fix` says what to do."""
    count = len(listing.files)
    if not listing.root.exists():
        raise FolderError(f"{where} does not exist: {fix}")
    if count == 0:
        raise FolderError(f"{where} holds no images ({looked_for()}): {fix}")
    if count < MIN_IMAGES:
        raise FolderError(f"{where} holds only one image ({listing.relative(listing.files[0])}); "
                          f"the pipeline needs at least {MIN_IMAGES} (FID compares sets of "
                          f"images): {fix}")
    return listing


def open_folder(folder: str | Path, key: str = "data.folder") -> Listing:
    """The images of the user's folder, checked before any work: FolderError (one line) if it
    is missing, not a folder, unreadable, or holds fewer than MIN_IMAGES images."""
    folder = Path(folder)
    fix = f"set {key} to the absolute path of a folder of images"
    if not folder.exists():
        raise FolderError(f"{key} points to {folder}, which does not exist: {fix}")
    if not folder.is_dir():
        raise FolderError(f"{key} points to {folder}, which is a file, not a folder: {fix} "
                          f"(a zip goes in data.archive, with data.source: archive)")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise FolderError(f"{key} points to {folder}, which you may not read: give yourself "
                          f"read access (chmod -R u+rX) or {fix}")
    return require_images(list_images(folder), f"{key} {folder}",
                          f"add images to it or {fix}")


def ignored_summary(listing: Listing) -> str:
    """'3 hidden, 1 not an image file name' (or 'none'): for the stages' log lines."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(listing.ignored.items())) or "none"

"""Checkpoints as plain data: state dicts, counters, RNG states and the config.

Written atomically (a crash mid-write leaves the previous file intact) and
loaded with `weights_only=True` (`ddpm.evaluate.model_file.load`), so loading never
runs pickled code.
`BackgroundSaver` writes them while training goes on.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .. import atomic


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed; the previous file at its path is intact."""


def save(path: str | Path, payload: dict[str, Any]) -> None:
    """torch.save, atomically. A failed write leaves the previous file and no temporary
    one, and raises CheckpointWriteError saying why (a full disk in so many words: torch
    reports it as `[enforce fail at inline_container.cc] unexpected pos`)."""
    def write(tmp: Path) -> None:
        # Through a file object: given a name, torch.save names the archive's root folder
        # after the (random) temporary file, and the same weights would differ in bytes.
        with open(tmp, "wb") as f:
            torch.save(payload, f)

    try:
        atomic.write_with(path, write)
    except Exception as err:  # noqa: BLE001 - a full disk, a bad path, an unpicklable value
        raise CheckpointWriteError(_write_failure(Path(path), payload, err)) from err


def payload_bytes(payload: Any) -> int:
    """The bytes of the tensors in a payload: about the size of its file."""
    if torch.is_tensor(payload):
        return payload.numel() * payload.element_size()
    if isinstance(payload, dict):
        return sum(payload_bytes(v) for v in payload.values())
    if isinstance(payload, (list, tuple)):
        return sum(payload_bytes(v) for v in payload)
    return 0


def _write_failure(path: Path, payload: dict[str, Any], err: BaseException) -> str:
    import errno
    import shutil

    kept = "the previous file was left as it was" if path.exists() else "nothing was written"
    needed = payload_bytes(payload)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = getattr(err, "errno", None) == errno.ENOSPC or (free is not None and free < needed)
    if full:
        shown = "unknown" if free is None else f"{free / 2**20:,.0f} MiB"
        return (f"writing {path} failed: the disk is full ({shown} free in {path.parent}, the "
                f"file needs about {needed / 2**20:,.0f} MiB); {kept}. Free disk space, then "
                f"rerun")
    detail = " ".join(str(err).split())[:200]
    return (f"writing {path} failed ({type(err).__name__}: {detail}); {kept}. Free disk "
            f"space or fix the path, then rerun")


class BackgroundSaver:
    """`save` in a thread, from a host copy taken at the call, so training goes on meanwhile.

    The seed's checkpoint (weights, EMA and Adam's moments) is 874 MB; saving it
    took 2.5-3 s on a 2-core CPU, which every epoch would otherwise wait for. The
    host copy goes into buffers kept from the previous checkpoint (pinned when
    copying from a GPU): refilling them took 0.06 s where fresh ones took 1.1 s.
    One write at a time: a save waits for the previous one first, and `wait()`
    raises a write's error there.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def save(self, path: str | Path, payload: dict[str, Any],
             then: Optional[Callable[[], None]] = None) -> None:
        """Write `payload` to `path` in the background; `then()` runs in the writer thread
        once the file is in place (not if the write failed)."""
        self.wait()
        devices: set[torch.device] = set()
        snapshot = self._copy(payload, (), devices)
        for device in devices:  # the non-blocking copies to pinned memory have landed
            torch.cuda.synchronize(device)
        self._thread = threading.Thread(target=self._write, args=(Path(path), snapshot, then),
                                        name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        """Block until the last save is on disk; raise CheckpointWriteError if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, CheckpointWriteError):
                raise CheckpointWriteError(str(err)) from err
            raise CheckpointWriteError(f"writing a checkpoint failed ({type(err).__name__}: "
                                       f"{err}); the previous checkpoint was left as it was. "
                                       f"Free disk space or fix the path, then rerun") from err

    def _write(self, path: Path, snapshot: dict[str, Any],
               then: Optional[Callable[[], None]]) -> None:
        try:
            save(path, snapshot)
            if then is not None:
                then()
        except BaseException as err:  # noqa: BLE001 - re-raised by wait() in the caller's thread
            self._error = err

    def _copy(self, obj: Any, key: tuple, devices: set[torch.device]) -> Any:
        """A copy the training loop cannot change: tensors into the kept host buffers,
        containers rebuilt (the loss history grows while the thread pickles). `devices`
        collects the GPUs copied from, which the caller synchronizes."""
        if torch.is_tensor(obj):
            buf = self._buffers.get(key)
            if (buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype
                    or buf.stride() != obj.stride()):
                buf = torch.empty_like(obj, device="cpu", pin_memory=obj.is_cuda)
                self._buffers[key] = buf
            if obj.is_cuda:
                devices.add(obj.device)
            return buf.copy_(obj.detach(), non_blocking=obj.is_cuda)
        if isinstance(obj, dict):
            return {k: self._copy(v, key + (k,), devices) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._copy(v, key + (i,), devices) for i, v in enumerate(obj))
        return obj  # numbers, strings, None: immutable


def differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable list of keys whose values differ between two nested dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, prefix=f"{name}.")
        elif a != b:
            out.append(f"{name}: checkpoint has {a!r}, params say {b!r}")
    return out

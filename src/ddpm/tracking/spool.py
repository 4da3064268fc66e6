"""Tracking that never takes training down: the background sender, the offline spool, replay.

Log calls only put a record on a queue; one background thread sends them
(`_Sender`). When a call fails, the tracker warns once on stderr, appends the
call to `<repo root>/.mlflow-spool/<run id>.jsonl`, and spools everything for
the next RETRY_AFTER_S seconds before trying the server again. `ddpm tracking
replay` sends spool files later (`replay_spool`).

Why not MLflow's own async logging (`log_batch(synchronous=False)`): it sends
in the background too, but a failed batch only reaches its RunOperations
future and MLflow's error log, so spooling it would still need this thread's
bookkeeping, and a dead server would stall its flush for every queued batch
in turn (retries x timeout each) where this thread stops trying for a minute.
Images and artifacts have no async path there at all.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from ..atomic import write_text
from ..stageutil import repo_root
from .store import (RECORD_TAG, TrackingError, _apply, _client, _ensure_experiment, _first_line,
                    _mlflow, _not_found, _note, _rejected, _say, public_uri)

SPOOL_DIR = ".mlflow-spool"
RETRY_AFTER_S = 60.0  # after a failure, spool everything this long, then try the server again
SPOOL_COPY_MAX_BYTES = 64 * 2**20  # files up to this size are copied into the spool


class _Spool:
    """Calls that could not be made, as JSON lines after one header line; each record has an
    `id` (the header: the run's), by which a replay knows what it sent already."""

    def __init__(self, directory: Path, header: dict[str, Any]):
        self.directory = directory
        self.header = header
        self.path: Optional[Path] = None
        self.count = 0
        self._lock = threading.Lock()

    def write(self, op: dict[str, Any]) -> None:
        with self._lock:
            if self.path is None:
                self.path = self._open()
            op = self._keep_file({"id": uuid.uuid4().hex, **op})
            with self.path.open("a") as f:
                f.write(json.dumps(op) + "\n")
            self.count += 1

    def _open(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        # A run the store never saw: two in one second of one process get two files.
        name = self.header.get("run_id") or \
            time.strftime(f"new-%Y%m%d-%H%M%S-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        path = self.directory / f"{name}.jsonl"
        if not path.exists() or path.stat().st_size == 0:  # a resumed run appends to its spool
            header = {"op": "run", "id": uuid.uuid4().hex, **self.header}
            path.write_text(json.dumps(header) + "\n")
        return path

    def _keep_file(self, op: dict[str, Any]) -> dict[str, Any]:
        # A queued run's working copy is deleted when it ends, and a retrain rewrites
        # models/model.pt: keep the model's weights and small files here.
        assert self.path is not None
        files = self.path.with_suffix(".files")
        if op["op"] == "model":
            from .models import keep_weights

            try:
                return keep_weights(op, files)
            except Exception as err:  # the record itself still goes to the spool
                _say(f"cannot keep a copy of {op['checkpoint']} in the spool ({err}); the "
                     f"replay logs what the file holds then")
                return op
        source = Path(op.get("path", ""))
        if op["op"] not in ("artifact", "image") or not source.is_file() \
                or source.stat().st_size > SPOOL_COPY_MAX_BYTES:
            return op
        files.mkdir(exist_ok=True)
        kept = Path(tempfile.mkdtemp(dir=files)) / source.name
        shutil.copy2(source, kept)
        return {**op, "path": str(kept)}


_STOP = object()


class _Sender:
    """The background thread that makes the logging calls, or spools them when it cannot."""

    def __init__(self, client: Any, run_id: Optional[str], spool: _Spool):
        self.client = client
        self.run_id = run_id
        self.spool = spool
        # No run to log into (the store was unreachable at start): spool everything.
        self.offline_until = float("inf") if run_id is None else 0.0
        self._queue: queue.Queue = queue.Queue()
        self._warned: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name="mlflow-tracking", daemon=True)
        self._thread.start()

    def submit(self, op: dict[str, Any]) -> None:
        self._queue.put(op)

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is sent or spooled; False on timeout."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float) -> None:
        if not self.flush(timeout):
            # Still stuck in a call: spool what is left here. The call in flight
            # is spooled by the thread if it fails, and lost if the process exits first.
            self.offline_until = float("inf")
            self._spool_queued()
        self._queue.put(_STOP)

    def _spool_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, threading.Event):
                item.set()
            elif item is not _STOP:
                self._to_spool(item)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, threading.Event):
                item.set()
            else:
                self._deliver(item)

    def _deliver(self, op: dict[str, Any]) -> None:
        if time.monotonic() < self.offline_until:
            self._to_spool(op)
            return
        try:
            _apply(self.client, self.run_id, op)
        except Exception as err:
            if _rejected(err):
                self._warn_once("rejected", f"MLflow refused a {op['op']} call, which is "
                                f"dropped: {_first_line(err)}")
                return
            self.offline_until = time.monotonic() + RETRY_AFTER_S
            self._to_spool(op)
            self._warn_once("offline", f"MLflow is not answering; calls go to "
                            f"{self.spool.path} for now (replay them later with `ddpm "
                            f"tracking replay`). The error: {_first_line(err)}")

    def _to_spool(self, op: dict[str, Any]) -> None:
        try:
            self.spool.write(op)
        except Exception as err:  # a full or read-only disk must not stop training either
            self._warn_once("spool", f"cannot write the spool file ({err}); calls are lost")

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            _say(message)


# --- replay ----------------------------------------------------------------------

def replay_spool(path: str | Path, tracking_uri: Optional[str] = None) -> str:
    """Send a spool file's calls to the store, each exactly once; returns the run id they
    went to.

    The store is `tracking_uri`, else MLFLOW_TRACKING_URI, else the one the spool was
    written for. The run is the spooled one if the store has it, else the one an earlier
    replay of this file created (tagged with the header's id), else a new run in the same
    experiment. Each record sent is noted in `<file>.done` at once, so a replay stopped
    anywhere (an error, Ctrl-C, a kill) resends nothing the next time; a record whose call
    went through just before it was stopped is recognised in the store (runs, LoggedModels
    and versions by their record id, images by key, step and time; the other calls are
    idempotent). A replay holds `<file>.lock`: a second one waits, then finds it done.
    On success the file is renamed `*.jsonl.replayed` with the run id in its header; else
    a TrackingError says why in one line, and the file keeps what is left. A record whose
    file is gone (a model's weights, an artifact) is never counted as sent.
    """
    mlflow = _mlflow()
    if mlflow is None:
        raise TrackingError("replaying a spool needs mlflow")
    from filelock import FileLock, Timeout

    path = Path(path)
    replayed = path.with_name(path.name + ".replayed")
    if not path.exists() and not replayed.exists():
        raise FileNotFoundError(f"{path}: no such spool file")
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _note(f"{path} is being replayed by another process; waiting for it to finish")
        lock.acquire()
    try:
        if not path.exists():  # another process replayed it
            return _records(replayed)[0]["run_id"]
        run_id = _replay(mlflow, path, tracking_uri)
        Path(f"{path}.lock").unlink(missing_ok=True)
        return run_id
    finally:
        lock.release()


def _records(path: Path) -> list[dict[str, Any]]:
    """The header and the records of a spool file; records of files written before they had
    ids get `<header id>:<line>` (the file is only ever appended to)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    header = records[0]
    header.setdefault("id", path.name.split(".")[0])
    for number, record in enumerate(records[1:], 1):
        record.setdefault("id", f"{header['id']}:{number}")
    return records


def _replay(mlflow: Any, path: Path, tracking_uri: Optional[str]) -> str:
    header, *ops = _records(path)
    progress = Path(f"{path}.done")
    done = set(progress.read_text().split()) if progress.exists() else set()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or header["tracking_uri"]
    try:
        client = _client(mlflow, uri)
        run_id = _replay_run(client, header, uri)
    except TrackingError:
        raise
    except Exception as err:
        raise TrackingError(f"{public_uri(uri)}: {_first_line(err)}") from err
    # The end of a run goes last, whatever order the threads spooled it in.
    pending = sorted((op for op in ops if op["id"] not in done), key=lambda op: op["op"] == "end")
    sent, gone = len(ops) - len(pending), []
    logged_images = _ImagesSent(client, run_id)
    with progress.open("a") as note:
        for op in pending:
            try:
                if not logged_images.holds(op):
                    _apply(client, run_id, op)
            except FileNotFoundError as err:
                gone.append(str(err.filename or _first_line(err)))
                continue
            except Exception as err:
                raise TrackingError(f"{public_uri(uri)}: {_first_line(err)} ({sent} of "
                                    f"{len(ops)} calls sent; a replay sends the rest)") from err
            note.write(op["id"] + "\n")
            note.flush()
            sent += 1
    if gone:
        raise TrackingError(f"{sent} of {len(ops)} calls sent; {len(gone)} not: their files "
                            f"are gone ({', '.join(gone)}); the spool file is kept: put them "
                            f"back and replay again, or delete it to give them up")
    write_text(path, "".join(json.dumps(record) + "\n"
                             for record in [{**header, "run_id": run_id}, *ops]))
    path.rename(path.with_name(path.name + ".replayed"))
    progress.unlink(missing_ok=True)
    shutil.rmtree(path.with_suffix(".files"), ignore_errors=True)
    return run_id


class _ImagesSent:
    """Whether the run holds an image record's file already (its call went through before a
    replay was stopped): MLflow names each image file with a new uuid, so a resend would add
    a second one."""

    def __init__(self, client: Any, run_id: str):
        self.client, self.run_id = client, run_id
        self.names: Optional[list[str]] = None

    def holds(self, op: dict[str, Any]) -> bool:
        if op["op"] != "image":
            return False
        if self.names is None:
            self.names = [Path(a.path).name for a in
                          self.client.list_artifacts(self.run_id, "images")]
        key = op["key"].replace("/", "~")
        prefix = f"{key}+step+{op['step']}+timestamp+{op['timestamp']}+"
        return any(name.startswith(prefix) for name in self.names)


def _replay_run(client: Any, header: dict[str, Any], uri: str) -> str:
    """The spooled run if the store has it, else the one an earlier replay of this file
    created, else a new run in the same experiment, tagged with the header's id."""
    run_id = header.get("run_id")
    try:
        if run_id:
            client.get_run(run_id)
            return run_id
    except Exception as err:
        if not _not_found(err):
            raise
    experiment_id = _ensure_experiment(client, header["experiment"], uri)
    made = client.search_runs([experiment_id], f"tags.`{RECORD_TAG}` = '{header['id']}'",
                              max_results=1)
    if made:
        return made[0].info.run_id
    return client.create_run(experiment_id, tags={**(header.get("tags") or {}),
                                                  RECORD_TAG: header["id"]},
                             run_name=header.get("run_name")).info.run_id


def spool_files(directory: str | Path | None = None) -> list[Path]:
    """Spool files not replayed yet, oldest first."""
    directory = Path(directory) if directory else repo_root() / SPOOL_DIR
    return sorted(directory.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)


"""Experiment tracking with MLflow: the only module that imports mlflow.

mlflow is imported inside functions, so `import ddpm.tracking` works where it
is not installed; tracking then does nothing, after one warning.

Where runs go
    `MLFLOW_TRACKING_URI` if set (verbatim), else params `mlflow.tracking_uri`
    (a relative sqlite path is taken from the repository root), else
    `sqlite:///<repo root>/mlflow.db`. New experiments in a local sqlite store
    keep their artifacts in `mlartifacts/` beside the database file. The
    repository root is DVC_ROOT, which DVC sets to the real root also for
    `dvc exp run --temp/--queue`: those run in a copy under .dvc/tmp/exps/
    that is deleted afterwards, and would take a store found from the working
    directory with it.

One run per trained model, shared by the stages after it
    train     starts a run (or resumes the one its checkpoint names), logs its
              params, and writes a run file, e.g. reports/mlflow_run.json
              (run id, experiment, tracking URI without credentials), as one
              of its DVC outputs.
    generate  `run_for_evaluation("reports/mlflow_run.json", <generate.* params>,
              "reports/mlflow_generate_run.json")`, then logs into that run.
    evaluate  the same from generate's run file with its evaluate.* params,
              then logs FID/KID into the run it gets.
    The rule: a stage logs into the run it comes from, unless that run already
    holds one of the stage's params with another value (generate or evaluate
    rerun alone with new settings). Then the stage gets a new run in the same
    experiment that copies the source run's params, tags and full metric
    histories, leaves out what belongs to this stage and the ones after it,
    and names the training run in the tag `ddpm.train_run_id`. MLflow params
    are immutable, so a rerun never fails on one, and never overwrites the
    numbers of the run it came from. For the copy to leave stale numbers out,
    the stages after train name their metrics `<section>/<name>`
    (`evaluate/fid`, `generate/seconds`).

Tracking never takes training down
    Log calls only put a record on a queue; one background thread sends them.
    MLflow's HTTP retries and timeout are set low in this process (unless set
    already), so a dead or slow server costs the thread seconds, not minutes.
    When a call fails, the tracker warns once on stderr, appends the call to
    `<repo root>/.mlflow-spool/<run id>.jsonl`, and spools everything for the
    next RETRY_AFTER_S seconds before trying the server again. Replay a spool
    file later with `python -m ddpm.tracking replay [FILE ...]` (no file: all
    of them), or `replay_spool(path)`.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Iterable, Iterator, Mapping, Optional
from urllib.parse import urlsplit, urlunsplit

from .atomic import write_json, write_text
from .config import MlflowConfig
from .stageutil import repo_root

SPOOL_DIR = ".mlflow-spool"
# Stages after train that share its run, in pipeline order (see the docstring).
DOWNSTREAM = ("generate", "evaluate")

# Set in this process unless the environment already has them. Connection
# errors then fail in well under a second, and a server that accepts but never
# answers costs (1 + retries) * timeout seconds of the background thread.
HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
RETRY_AFTER_S = 60.0  # after a failure, spool everything this long, then try the server again
DRAIN_TIMEOUT_S = 30.0  # longest end() waits for queued calls before it spools the rest
SPOOL_COPY_MAX_BYTES = 64 * 2**20  # files up to this size are copied into the spool
# The batch limits of MLflow's log_batch.
MAX_PARAMS, MAX_METRICS, MAX_TAGS = 100, 1000, 100


class TrackingError(RuntimeError):
    """MLflow refused a call that the caller has to fix."""


class ParamConflictError(TrackingError, ValueError):
    """A run already holds a param with another value; MLflow params are immutable."""


def _say(message: str) -> None:
    print(f"warning: tracking: {message}", file=sys.stderr, flush=True)


_missing_warned = False


def _mlflow() -> Optional[ModuleType]:
    """mlflow, or None (with one warning per process) where it is not installed."""
    global _missing_warned
    try:
        import mlflow
    except ImportError as err:
        if not _missing_warned:
            _say(f"mlflow is not importable ({err}); runs are not tracked")
            _missing_warned = True
        return None
    for name, value in HTTP_ENV.items():
        os.environ.setdefault(name, value)
    return mlflow


# --- where runs go ---------------------------------------------------------------

def tracking_uri(config: MlflowConfig) -> str:
    """MLFLOW_TRACKING_URI, else `mlflow.tracking_uri`, else sqlite at the repository root."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = repo_root()
    uri = config.tracking_uri or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = uri[len(prefix):]
        if path and not path.startswith("/") and path != ":memory:":
            return f"{prefix}{root / path}"
    return uri


def artifact_location(uri: str) -> Optional[str]:
    """`mlartifacts/` beside a local sqlite database; None lets any other store decide."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix):] in ("", ":memory:"):
        return None
    db = Path(uri[len(prefix):].split("?")[0]).resolve()
    return (db.parent / "mlartifacts").as_uri()


def public_uri(uri: str) -> str:
    """The URI without user, password or query, fit to be written into an output file."""
    parts = urlsplit(uri)
    if parts.scheme in ("", "file", "sqlite"):
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


# --- small helpers for the stages ------------------------------------------------

def run_tags(**extra: Any) -> dict[str, str]:
    """Tags for a run: the DVC experiment and its baseline commit, plus `ddpm.<key>`
    for each keyword (e.g. data_source=, dataset_hash=, device=). None values are left out."""
    tags = {
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV"),
    }
    tags.update({f"ddpm.{key}": value for key, value in extra.items()})
    return {key: str(value) for key, value in tags.items() if value not in (None, "")}


def select(flat: Mapping[str, Any], *sections: str) -> dict[str, Any]:
    """The flattened params of some sections: `select(flatten(p), "generate")`."""
    return {key: value for key, value in flat.items() if key.split(".")[0] in sections}


def _param_str(value: Any) -> str:
    # MLflow stores every param as str(value); compare in the same form.
    return str(value)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _rejected(err: Exception) -> bool:
    """The call itself is wrong (a bad value or key, a deleted run): a spool would not help.

    Unreachable servers, timeouts and locked databases come as MlflowException
    with a 5xx status, or as OSError: those are worth spooling."""
    status = getattr(err, "get_http_status_code", None)
    if status is not None:
        return 400 <= status() < 500
    return not isinstance(err, OSError)


def _not_found(err: Exception) -> bool:
    return getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _existing_run(client: Any, run_id: Optional[str], uri: str) -> Any:
    """The run, or None (saying so) when the store does not hold it."""
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception as err:
        if not _not_found(err):
            raise
        _say(f"run {run_id} is not in {public_uri(uri)}; starting a new run")
        return None


def _ensure_experiment(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri))
        except Exception:
            # Another queued experiment may have created it in the meantime.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


# --- one logging call, the same for the background thread and for replay ---------

def _apply(client: Any, run_id: str, op: dict[str, Any]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    kind = op["op"]
    if kind == "params":
        params = [Param(key, value) for key, value in op["params"].items()]
        for chunk in _chunks(params, MAX_PARAMS):
            client.log_batch(run_id, params=chunk, synchronous=True)
    elif kind == "metrics":
        metrics = [Metric(key, value, op["timestamp"], op["step"])
                   for key, value in op["metrics"].items()]
        for chunk in _chunks(metrics, MAX_METRICS):
            client.log_batch(run_id, metrics=chunk, synchronous=True)
    elif kind == "tags":
        tags = [RunTag(key, value) for key, value in op["tags"].items()]
        for chunk in _chunks(tags, MAX_TAGS):
            client.log_batch(run_id, tags=chunk, synchronous=True)
    elif kind == "artifact":
        if Path(op["path"]).is_dir():
            client.log_artifacts(run_id, op["path"], op.get("artifact_path"))
        else:
            client.log_artifact(run_id, op["path"], op.get("artifact_path"))
    elif kind == "image":
        from PIL import Image

        with Image.open(op["path"]) as image:
            image.load()
            client.log_image(run_id, image, key=op["key"], step=op["step"],
                             timestamp=op["timestamp"], synchronous=True)
    elif kind == "end":
        client.set_terminated(run_id, op["status"], op["end_time"])
    else:
        raise ValueError(f"unknown tracking record {kind!r}")


class _Spool:
    """Calls that could not be made, as JSON lines after one header line."""

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
            op = self._keep_file(op)
            with self.path.open("a") as f:
                f.write(json.dumps(op) + "\n")
            self.count += 1

    def _open(self) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = self.header.get("run_id") or time.strftime(f"new-%Y%m%d-%H%M%S-{os.getpid()}")
        path = self.directory / f"{name}.jsonl"
        if not path.exists() or path.stat().st_size == 0:  # a resumed run appends to its spool
            path.write_text(json.dumps({"op": "run", **self.header}) + "\n")
        return path

    def _keep_file(self, op: dict[str, Any]) -> dict[str, Any]:
        # A queued run's working copy is deleted when it ends: keep small files here.
        source = Path(op.get("path", ""))
        if op["op"] not in ("artifact", "image") or not source.is_file() \
                or source.stat().st_size > SPOOL_COPY_MAX_BYTES:
            return op
        assert self.path is not None
        files = self.path.with_suffix(".files")
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
                            f"{self.spool.path} for now (replay them later with `python -m "
                            f"ddpm.tracking replay`). The error: {_first_line(err)}")

    def _to_spool(self, op: dict[str, Any]) -> None:
        try:
            self.spool.write(op)
        except Exception as err:  # a full or read-only disk must not stop training either
            self._warn_once("spool", f"cannot write the spool file ({err}); calls are lost")

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            _say(message)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


# --- the tracker -----------------------------------------------------------------

class Tracker:
    """One MLflow run, written from a background thread; does nothing when disabled.

        tracker = Tracker(params.mlflow)
        with tracker.start(run_id=resume_id, run_name=..., tags=run_tags(device="cuda")):
            tracker.log_params(flat)
            tracker.log_metrics({"train/loss": 0.03}, step=epoch)

    Leaving the `with` ends the run FINISHED, FAILED on an exception, KILLED on
    Ctrl-C. Only `log_params` with a conflicting value raises; a store that
    fails is reported once and spooled. Under torchrun, track on rank 0 only:
    `Tracker(config, enabled=rank == 0)`.
    """

    def __init__(self, config: MlflowConfig, *, enabled: bool = True,
                 spool_dir: str | Path | None = None):
        self.config = config
        self._enabled = enabled and config.enabled
        self._spool_dir = Path(spool_dir) if spool_dir else None
        self.uri: Optional[str] = None
        self.run_id: Optional[str] = None
        self.experiment_id: Optional[str] = None
        self.run_name: Optional[str] = None
        self._params: dict[str, str] = {}  # what the run holds, to check immutability here
        self._sender: Optional[_Sender] = None
        self._spool: Optional[_Spool] = None
        self._monitor: Any = None

    @property
    def active(self) -> bool:
        """True between start() and end() when tracking is on."""
        return self._sender is not None

    @property
    def spool_path(self) -> Optional[Path]:
        """The spool file, once something had to be written to it."""
        return self._spool.path if self._spool else None

    def start(self, run_id: Optional[str] = None, run_name: Optional[str] = None,
              tags: Optional[Mapping[str, str]] = None, *,
              system_metrics: bool = False) -> "Tracker":
        """Start a run, or resume `run_id` (a resumed run keeps its params and metrics).

        An unknown `run_id` starts a new run, with a warning. If the store cannot
        be reached, the run is spooled whole, and replay creates it.
        """
        if not self._enabled or self.active:
            return self
        mlflow = _mlflow()
        if mlflow is None:
            return self
        self.uri = tracking_uri(self.config)
        tags = dict(tags or {})
        client = None
        try:
            client = mlflow.MlflowClient(self.uri)
            run = self._open_run(client, run_id, run_name, tags)
            self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
            self.run_name = run.info.run_name
            self._params = dict(run.data.params)
        except Exception as err:
            self.run_id = run_id
            _say(f"cannot open a run in {public_uri(self.uri)} ({_first_line(err)}); "
                 f"everything is spooled and a replay will create the run")
        header = {"run_id": self.run_id, "experiment": self.config.experiment,
                  "run_name": run_name, "tags": tags, "tracking_uri": public_uri(self.uri)}
        self._spool = _Spool(self._spool_dir or repo_root() / SPOOL_DIR, header)
        self._sender = _Sender(client, self.run_id if self.experiment_id else None, self._spool)
        if system_metrics and self.experiment_id:
            self._start_system_metrics(resumed=run_id is not None)
        return self

    def _open_run(self, client: Any, run_id: Optional[str], run_name: Optional[str],
                  tags: dict[str, str]) -> Any:
        if _existing_run(client, run_id, self.uri) is not None:
            client.update_run(run_id, status="RUNNING")
            if tags:
                _apply(client, run_id, {"op": "tags", "tags": tags})
            return client.get_run(run_id)
        experiment_id = _ensure_experiment(client, self.config.experiment, self.uri)
        return client.create_run(experiment_id, tags=_with_context_tags(tags),
                                 run_name=run_name)

    def _start_system_metrics(self, resumed: bool) -> None:
        # CPU, memory, disk and network need psutil; GPUs also need pynvml
        # (nvidia-ml-py), which mlflow looks for by itself.
        try:
            import psutil  # noqa: F401
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resumed,
                                                 tracking_uri=self.uri)
            self._monitor.start()
        except Exception as err:
            self._monitor = None
            _say(f"no system metrics ({_first_line(err)})")

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params; a key the run holds with the same value is skipped.

        Raises ParamConflictError if the run holds a key with another value.
        """
        if not self.active:
            return
        new = {key: _param_str(value) for key, value in params.items()}
        conflicts = {key: (self._params[key], value) for key, value in new.items()
                     if key in self._params and self._params[key] != value}
        if conflicts:
            listed = "; ".join(f"{key}: run has {old!r}, now {value!r}"
                               for key, (old, value) in sorted(conflicts.items()))
            raise ParamConflictError(
                f"MLflow run {self.run_id} already holds other values for its params "
                f"({listed}). Params cannot change within a run: start a new run instead "
                f"of resuming this one.")
        new = {key: value for key, value in new.items() if key not in self._params}
        if new:
            self._params.update(new)
            self._sender.submit({"op": "params", "params": new})

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        if self.active and metrics:
            self._sender.submit({"op": "metrics", "step": int(step), "timestamp": _now_ms(),
                                 "metrics": {key: float(value) for key, value in metrics.items()}})

    def log_artifact(self, path: str | Path, artifact_path: Optional[str] = None) -> None:
        """A file or folder, uploaded later: it must stay in place until end()."""
        if self.active and self._exists(path):
            self._sender.submit({"op": "artifact", "path": str(Path(path).resolve()),
                                 "artifact_path": artifact_path})

    def log_image(self, path: str | Path, key: str, step: int) -> None:
        """An image file shown under `key` with a slider over steps in the MLflow UI."""
        if self.active and self._exists(path):
            self._sender.submit({"op": "image", "path": str(Path(path).resolve()), "key": key,
                                 "step": int(step), "timestamp": _now_ms()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.active and tags:
            self._sender.submit({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def _exists(self, path: str | Path) -> bool:
        if Path(path).exists():
            return True
        _say(f"{path} does not exist; not logged")
        return False

    def write_run_file(self, path: str | Path) -> None:
        """Record this run for the stages after this one (a DVC output)."""
        if self.uri is None:  # tracking off, or mlflow missing
            write_json(path, {"run_id": None, "tracking": "disabled"})
        else:
            write_run_file(path, self.run_id if self.experiment_id else None,
                           self.experiment_id, self.config.experiment, self.uri, self.run_name)

    def flush(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        """Wait until every call so far is sent or spooled; False if `timeout` ran out."""
        return self._sender.flush(timeout) if self.active else True

    def end(self, status: str = "FINISHED", timeout: float = DRAIN_TIMEOUT_S) -> None:
        """End the run (FINISHED, FAILED or KILLED); waits at most `timeout` for queued calls."""
        if not self.active:
            return
        if self._monitor is not None and self._sender.offline_until < time.monotonic():
            try:
                self._monitor.finish()
            except Exception:
                pass
        self._monitor = None
        self._sender.submit({"op": "end", "status": status, "end_time": _now_ms()})
        sender, self._sender = self._sender, None
        sender.close(timeout)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind: Optional[type[BaseException]], error: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        if kind is None or (kind is SystemExit and error.code in (0, None)):
            self.end("FINISHED")
        elif issubclass(kind, KeyboardInterrupt):
            self.end("KILLED")
        else:
            self.end("FAILED")

    def start_for_evaluation(self, source_run_file: str | Path, params: Mapping[str, Any],
                             out_run_file: str | Path,
                             tags: Optional[Mapping[str, str]] = None) -> "Tracker":
        """`run_for_evaluation`, then start (resume) the run it chose and log `params` to it."""
        if not self._enabled:
            write_json(out_run_file, {"run_id": None, "tracking": "disabled"})
            return self
        run_id = run_for_evaluation(source_run_file, params, out_run_file, config=self.config)
        self.start(run_id=run_id, tags=tags)
        if run_id is None and self.active:  # the store came back between the two calls
            self.write_run_file(out_run_file)
        # Already there when the run was found; spooled with the run when it was not.
        self.log_params(params)
        return self


def _with_context_tags(tags: dict[str, str]) -> dict[str, str]:
    """Add what mlflow's own start_run adds: user, source file, git commit."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return resolve_tags(tags)
    except Exception:
        return tags


def write_run_file(path: str | Path, run_id: Optional[str], experiment_id: Optional[str],
                   experiment: str, uri: str, run_name: Optional[str] = None) -> None:
    write_json(path, {"run_id": run_id, "run_name": run_name, "experiment_id": experiment_id,
                      "experiment": experiment, "tracking_uri": public_uri(uri)})


def read_run_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no run file; the stage that writes it has not run")
    return json.loads(path.read_text())


# --- one run shared by train, generate and evaluate -------------------------------

def _stale_sections(params: Mapping[str, Any]) -> set[str]:
    """The sections of `params` and every section after them in DOWNSTREAM."""
    sections = {key.split(".")[0] for key in params}
    later = [DOWNSTREAM.index(s) for s in sections if s in DOWNSTREAM]
    return sections | set(DOWNSTREAM[min(later):] if later else ())


def _section(key: str) -> str:
    # "generate.steps" and "evaluate/fid" both belong to their stage's section.
    return key.split("/")[0].split(".")[0]


def run_for_evaluation(source_run_file: str | Path, params: Mapping[str, Any],
                       out_run_file: str | Path, *, config: MlflowConfig) -> Optional[str]:
    """The run a stage after train logs into; written to `out_run_file` and returned.

    The source run itself when it holds none of `params` or the same values (the
    missing ones are logged); otherwise a new run that carries over the source's
    params, tags and metric histories, except those of these params' sections
    and the sections after them. None when tracking is off or the store cannot be reached.
    """
    source = read_run_file(source_run_file)
    mlflow = _mlflow() if config.enabled else None
    if mlflow is None:
        write_json(out_run_file, {"run_id": None, "tracking": "disabled"})
        return None
    uri = tracking_uri(config)
    wanted = {key: _param_str(value) for key, value in params.items()}
    try:
        client = mlflow.MlflowClient(uri)
        run = _run_for(client, config, uri, source.get("run_id"), wanted)
    except Exception as err:
        _say(f"cannot choose a run in {public_uri(uri)} ({_first_line(err)})")
        write_json(out_run_file, {"run_id": None, "error": _first_line(err)})
        return None
    write_run_file(out_run_file, run.info.run_id, run.info.experiment_id,
                   config.experiment, uri, run.info.run_name)
    return run.info.run_id


def _run_for(client: Any, config: MlflowConfig, uri: str, source_id: Optional[str],
             wanted: dict[str, str]) -> Any:
    source = _existing_run(client, source_id, uri)
    if source is not None:
        held = source.data.params
        if all(held.get(key, value) == value for key, value in wanted.items()):
            missing = {key: value for key, value in wanted.items() if key not in held}
            try:
                if missing:
                    _apply(client, source_id, {"op": "params", "params": missing})
                return source
            except Exception as err:
                # Another experiment evaluating the same model logged other values first.
                if not _rejected(err):
                    raise
                source = client.get_run(source_id)
    return _copy_run(client, config, uri, source, wanted)


def _copy_run(client: Any, config: MlflowConfig, uri: str, source: Any,
              wanted: dict[str, str]) -> Any:
    from mlflow.entities import Metric

    stale = _stale_sections(wanted)
    stage = "+".join(sorted({_section(key) for key in wanted})) or "eval"
    if source is None:
        experiment_id = _ensure_experiment(client, config.experiment, uri)
        run = client.create_run(experiment_id, tags=run_tags(), run_name=stage)
        _apply(client, run.info.run_id, {"op": "params", "params": wanted})
        client.set_terminated(run.info.run_id, "FINISHED")
        return client.get_run(run.info.run_id)

    source_id = source.info.run_id
    train_id = source.data.tags.get("ddpm.train_run_id", source_id)
    tags = {key: value for key, value in source.data.tags.items()
            if not key.startswith("mlflow.") or key == "mlflow.user"
            or key.startswith("mlflow.source.")}
    tags.update({
        "ddpm.train_run_id": train_id,
        "ddpm.source_run_id": source_id,
        "mlflow.note.content": f"Made for new {stage} settings from run {source_id} "
                               f"(training run {train_id}), whose params, tags and metric "
                               f"histories it copies; images and checkpoints stay there.",
    })
    run = client.create_run(source.info.experiment_id, tags=tags,
                            run_name=f"{source.info.run_name}/{stage}")
    run_id = run.info.run_id
    params = {key: value for key, value in source.data.params.items()
              if _section(key) not in stale}
    _apply(client, run_id, {"op": "params", "params": {**params, **wanted}})
    for key in source.data.metrics:
        if _section(key) in stale:
            continue
        history = [Metric(m.key, m.value, m.timestamp, m.step)
                   for m in client.get_metric_history(source_id, key)]
        for chunk in _chunks(history, MAX_METRICS):
            client.log_batch(run_id, metrics=chunk, synchronous=True)
    client.set_terminated(run_id, "FINISHED")
    return client.get_run(run_id)


# --- replay ----------------------------------------------------------------------

def replay_spool(path: str | Path, tracking_uri: Optional[str] = None) -> str:
    """Send a spool file's calls to the store; returns the run id they went to.

    The store is `tracking_uri`, else MLFLOW_TRACKING_URI, else the one the spool
    was written for. The run is the spooled one if the store has it, else a new
    run in the same experiment. On success the file is renamed `*.jsonl.replayed`;
    on failure it keeps what is left, so replaying again resumes there.
    """
    mlflow = _mlflow()
    if mlflow is None:
        raise TrackingError("replaying a spool needs mlflow")
    path = Path(path)
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    header, ops = records[0], records[1:]
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or header["tracking_uri"]
    client = mlflow.MlflowClient(uri)
    run_id = header.get("run_id")
    try:
        if run_id:
            client.get_run(run_id)
    except Exception as err:
        if not _not_found(err):
            raise
        run_id = None
    if run_id is None:
        experiment_id = _ensure_experiment(client, header["experiment"], uri)
        run_id = client.create_run(experiment_id, tags=header.get("tags") or {},
                                   run_name=header.get("run_name")).info.run_id
    # The end of a run goes last, whatever order the threads spooled it in.
    ops.sort(key=lambda op: op["op"] == "end")
    for done, op in enumerate(ops):
        try:
            _apply(client, run_id, op)
        except Exception:
            rest = [{**header, "run_id": run_id}] + ops[done:]
            write_text(path, "".join(json.dumps(record) + "\n" for record in rest))
            raise
    path.rename(path.with_name(path.name + ".replayed"))
    shutil.rmtree(path.with_suffix(".files"), ignore_errors=True)
    return run_id


def spool_files(directory: str | Path | None = None) -> list[Path]:
    """Spool files not replayed yet, oldest first."""
    directory = Path(directory) if directory else repo_root() / SPOOL_DIR
    return sorted(directory.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)


def main(argv: Optional[Iterable[str]] = None) -> int:
    """`python -m ddpm.tracking replay [FILE ...] [--tracking-uri URI]`."""
    parser = argparse.ArgumentParser(prog="python -m ddpm.tracking",
                                     description="MLflow tracking tools")
    commands = parser.add_subparsers(dest="command", required=True)
    replay = commands.add_parser("replay", help="send spooled calls to the tracking store")
    replay.add_argument("files", nargs="*", type=Path,
                        help=f"spool files (default: all in <repo root>/{SPOOL_DIR}/)")
    replay.add_argument("--tracking-uri", help="store to send them to (default: the spooled one)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    files = args.files or spool_files()
    if not files:
        print("nothing to replay")
    failed = 0
    for file in files:
        try:
            run_id = replay_spool(file, args.tracking_uri)
            print(f"{file}: replayed into run {run_id}")
        except Exception as err:
            print(f"{file}: {err}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

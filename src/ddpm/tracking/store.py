"""Where MLflow runs go, and which run a stage after train logs into (the run rule).

See `ddpm.tracking` for the whole picture. mlflow is imported inside functions.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Mapping, Optional
from urllib.parse import urlsplit, urlunsplit

from ..atomic import write_json
from ..config import MlflowConfig
from ..stageutil import repo_root

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
# The batch limits of MLflow's log_batch.
MAX_PARAMS, MAX_METRICS, MAX_TAGS = 100, 1000, 100
# The id of the tracker record that made a run, a LoggedModel or a registered version: a
# replay finds what an earlier, interrupted one made and does not make it again.
RECORD_TAG = "ddpm.record_id"

class TrackingError(RuntimeError):
    """MLflow refused a call that the caller has to fix."""


class ParamConflictError(TrackingError, ValueError):
    """A run already holds a param with another value; MLflow params are immutable."""


def _say(message: str) -> None:
    print(f"warning: tracking: {message}", file=sys.stderr, flush=True)


def _note(message: str) -> None:
    """What tracking did that a user wants to know, and no warning (the registry's champion)."""
    print(f"tracking: {message}", file=sys.stderr, flush=True)


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
    _quiet_sql_errors()
    return mlflow


def _client(mlflow: ModuleType, uri: str) -> Any:
    """An MlflowClient for `uri`; a local sqlite store is made ready first (created once,
    under a lock, or repaired: see `ddpm.tracking.sqlite`)."""
    from .sqlite import prepare  # sqlite.py builds on this module

    prepare(uri)
    return mlflow.MlflowClient(uri)


class _OneLine(logging.Filter):
    """MLflow logs a failed sqlite session with its SQL statement and a traceback. The
    error reaches the caller too, which reports it in one line: here one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info or "\n" in record.getMessage():
            record.msg, record.args = _one_line(record.getMessage()), ()
            record.exc_info = record.exc_text = None
        return True


def _quiet_sql_errors() -> None:
    logger = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _OneLine) for f in logger.filters):
        logger.addFilter(_OneLine())


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


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a local sqlite URI (`sqlite:///<path>`), else None."""
    prefix = "sqlite:///"
    path = uri[len(prefix):].split("?")[0] if uri.startswith(prefix) else ""
    return Path(path).resolve() if path not in ("", ":memory:") else None


def artifact_location(uri: str) -> Optional[str]:
    """`mlartifacts/` beside a local sqlite database; None lets any other store decide."""
    db = sqlite_path(uri)
    return (db.parent / "mlartifacts").as_uri() if db else None


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


def ui_link(experiment_id: str, host: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs table in `mlflow ui`. MLflow 3.17's UI opens a bare experiment
    link on its GenAI overview (empty traces) whatever the experiment's tags say; the
    query parameter is what switches the page to model training (checked in headless
    Chromium, 2026-12-01)."""
    return f"{host}/#/experiments/{experiment_id}?workflowType=machine_learning"


# --- one logging call, the same for the background thread and for replay ---------

def _apply(client: Any, run_id: str, op: dict[str, Any]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    kind = op["op"]
    if kind == "params":
        params = [Param(key, value) for key, value in op["params"].items()]
        for chunk in _chunks(params, MAX_PARAMS):
            client.log_batch(run_id, params=chunk, synchronous=True)
    elif kind == "metrics":
        # Attached to a logged model and a dataset when the record names them.
        link = {key: op[key] for key in ("model_id", "dataset_name", "dataset_digest")
                if op.get(key)}
        metrics = [Metric(key, value, op["timestamp"], op["step"], **link)
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
    elif kind == "model":
        from .models import log_model

        log_model(client, run_id, op)
    elif kind == "dataset":
        from .models import log_dataset

        log_dataset(client, run_id, op)
    elif kind == "score":
        from .models import score_model

        score_model(client, run_id, op)
    elif kind == "end":
        client.set_terminated(run_id, op["status"], op["end_time"])
    else:
        raise ValueError(f"unknown tracking record {kind!r}")


def _one_line(text: str) -> str:
    """`text` up to the SQL statement that sqlalchemy's errors append, on one line."""
    text = text.split("[SQL:")[0]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())[:500]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return _one_line(text[0]) if text else type(err).__name__



# --- run files ---------------------------------------------------------------------

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
        client = _client(mlflow, uri)
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
    # The DVC experiment is this one (a queued `-S generate.*` makes the copy), not the source's.
    tags = {key: value for key, value in source.data.tags.items()
            if not key.startswith(("mlflow.", "dvc.")) or key == "mlflow.user"
            or key.startswith("mlflow.source.")}
    tags.update(run_tags())
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

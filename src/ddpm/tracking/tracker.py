"""The stages' tracker: one MLflow run, written from a background thread.

See `ddpm.tracking` for where runs go and the run rule.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping, Optional

from ..atomic import write_json
from ..config import MlflowConfig
from ..stageutil import repo_root
from .models import MODEL_TAGS, model_op, score_op
from .spool import SPOOL_DIR, _Sender, _Spool
from .store import (ParamConflictError, _apply, _client, _ensure_experiment, _existing_run,
                    _first_line, _mlflow, _now_ms, _param_str, _say, public_uri,
                    run_for_evaluation, tracking_uri, write_run_file)

DRAIN_TIMEOUT_S = 30.0  # longest end() waits for queued calls before it spools the rest
# ... when a model is among them: uploading a checkpoint (218 MB for the seed's model)
# to a remote artifact store takes longer than a few metrics.
MODEL_DRAIN_TIMEOUT_S = 900.0


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
        self._tags: dict[str, str] = {}  # the run's tags when it was opened
        self._drain_timeout = DRAIN_TIMEOUT_S
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
            client = _client(mlflow, self.uri)
            run = self._open_run(client, run_id, run_name, tags)
            self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
            self.run_name = run.info.run_name
            self._params = dict(run.data.params)
            self._tags = dict(run.data.tags)
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

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0, *,
                    model_id: Optional[str] = None,
                    dataset: Optional[Mapping[str, Any]] = None) -> None:
        """Metrics at `step`; with `model_id` attached to that logged model, with `dataset`
        (a `models.dataset_op` record) to that dataset, as MLflow's model page shows them."""
        if self.active and metrics:
            op = {"op": "metrics", "step": int(step), "timestamp": _now_ms(),
                  "metrics": {key: float(value) for key, value in metrics.items()}}
            if model_id:
                op["model_id"] = model_id
            if dataset:
                op.update(dataset_name=dataset["name"], dataset_digest=dataset["digest"])
            self._sender.submit(op)

    def log_model(self, name: str, checkpoint: str | Path, step: int,
                  sampling: Mapping[str, Any], register: str = "",
                  version_tags: Optional[Mapping[str, str]] = None) -> None:
        """Log `checkpoint` as the run's LoggedModel `name` ('final' or 'best') at `step`,
        registered as a new version of `register` unless that is empty (see
        `ddpm.tracking.models`). The file must stay in place until end()."""
        if self.active and self._exists(checkpoint):
            self._drain_timeout = MODEL_DRAIN_TIMEOUT_S
            self._sender.submit(model_op(name, checkpoint, step, sampling, register,
                                         version_tags))

    def score_model(self, name: str, settings: Mapping[str, Any],
                    scores: Mapping[str, float]) -> None:
        """The evaluate stage's scores (fid, kid, ...) of the run's `name` model, sampled with
        `settings`, onto its registered version of `mlflow.registered_model`: its description
        lists them, and it becomes `champion` when it beats the holder under the same
        settings (see `ddpm.tracking.models`)."""
        if self.active and self.config.registered_model:
            self._sender.submit(score_op(name, settings, scores, self.config.registered_model))

    def log_dataset(self, dataset: Mapping[str, Any]) -> None:
        """A run input (a `models.dataset_op` record), shown in the runs table's Datasets."""
        if self.active:
            self._sender.submit(dict(dataset))

    def param(self, key: str) -> Optional[str]:
        """A param the run holds (as MLflow stores it, a string), or None."""
        return self._params.get(key)

    def model_id(self, name: str = "final") -> Optional[str]:
        """The id of the run's logged model `name` ('final', 'best') when it was opened."""
        return self._tags.get(MODEL_TAGS[name])

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

    def end(self, status: str = "FINISHED", timeout: Optional[float] = None) -> None:
        """End the run (FINISHED, FAILED or KILLED); waits at most `timeout` for queued calls
        (default DRAIN_TIMEOUT_S, MODEL_DRAIN_TIMEOUT_S once a model was logged)."""
        if not self.active:
            return
        timeout = self._drain_timeout if timeout is None else timeout
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

"""Experiment tracking with MLflow: the only package that imports mlflow.

    store.py    where runs go, run files, and the run rule below
    tracker.py  `Tracker`, the stages' API: one run, logged from a background thread
    spool.py    that thread, the offline spool, and its replay (`ddpm tracking replay`)
    models.py   the trained model as an MLflow LoggedModel (registered), datasets as inputs
    pyfunc_model.py  that model's code: `predict` samples cars (models from code)
    sqlite.py   a local sqlite store: created once under a lock (several experiments
                start at once), checked when opened, repaired when that is safe; WAL

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
    directory with it. Every client of a local sqlite store comes from
    `store._client`, which makes the file ready first (`sqlite.prepare`); a store
    it cannot make ready is a TrackingError of one line, and the stage spools.

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
    next RETRY_AFTER_S seconds before trying the server again. Replay spool
    files later with `ddpm tracking replay [FILE ...]` (no file: all of them).
"""

from .models import MAX_WORK, dataset_op, training_dataset, training_source
from .spool import SPOOL_DIR, replay_spool, spool_files
from .store import (ParamConflictError, TrackingError, artifact_location, public_uri,
                    read_run_file, run_for_evaluation, run_tags, select, tracking_uri,
                    ui_link, write_run_file)
from .tracker import Tracker

__all__ = ["MAX_WORK", "SPOOL_DIR", "ParamConflictError", "Tracker", "TrackingError",
           "artifact_location", "dataset_op", "public_uri", "read_run_file", "replay_spool",
           "run_for_evaluation", "run_tags", "select", "spool_files", "tracking_uri",
           "training_dataset", "training_source", "ui_link", "write_run_file"]

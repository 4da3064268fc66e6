"""The trained model in MLflow: a LoggedModel per published checkpoint, its registered version,
and the data a run trained and was scored on as the run's dataset inputs.

The train stage (rank 0) logs, when training has ended:

    final   models/model.pt, at the last step: the run's metrics at that step (final loss,
            the last in-training FID/KID) are attached to it; registered as a new version
            of `mlflow.registered_model` unless that is empty, with version tags
            dvc.exp_name, git.commit and ddpm.dataset_sha256.
    best    models/best.pt when another epoch scored best, at that epoch's step.

Each is a pyfunc model from code (`pyfunc_model.py`, no pickled Python object): the
`ddpm` package as its code, the checkpoint in the train stage's format as an artifact, and
pinned pip requirements, so logging never infers an environment (offline: a 120 s
subprocess). The run's tags `ddpm.model_id` / `ddpm.best_model_id` name them; evaluate
attaches its FID/KID to the one its samples came from. Logging goes through the tracker's
background thread like every other call: a store that is down spools it with the rest,
with one warning, and the spool keeps its own copy of the weights (`keep_weights`), so a
retrain before the replay cannot change what is logged.

Exactly once: a model record has an id (`RECORD_TAG`) that its LoggedModel and registered
version carry. Logging it again (a replay after a failure anywhere, a rerun of a finished
training) finds what the first attempt made: a READY model is kept, a half-made one deleted
and made again, a version with the record's id is not registered twice, and a run that
holds the model's tag is done.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from .store import RECORD_TAG

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE = Path(__file__).resolve().parents[1]  # src/ddpm, the model's code
MODEL_TAGS = {"final": "ddpm.model_id", "best": "ddpm.best_model_id"}
# What the model's code imports (ddpm's core, its sampling and the pyfunc wrapper).
REQUIREMENTS = ("torch", "numpy", "pillow", "mlflow")
# MLflow keeps a dataset digest in 36 characters; the whole SHA-256 goes in its profile.
DIGEST_CHARS = 36


def pip_requirements() -> list[str]:
    """The installed versions of what the model needs, pinned (no local build tags)."""
    pinned = []
    for dist in REQUIREMENTS:
        try:
            pinned.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pinned.append(dist)
    return pinned


def model_op(name: str, checkpoint: str | Path, step: int, sampling: Mapping[str, Any],
             register: str = "", version_tags: Optional[Mapping[str, str]] = None) -> dict:
    """The tracker record that logs `checkpoint` as the run's `name` model ('final' or 'best')."""
    if name not in MODEL_TAGS:
        raise ValueError(f"model name must be one of {', '.join(MODEL_TAGS)}, got {name!r}")
    return {"op": "model", "id": uuid.uuid4().hex, "name": name,
            "checkpoint": str(Path(checkpoint).resolve()), "step": int(step),
            "sampling": dict(sampling), "register": register,
            "version_tags": {k: str(v) for k, v in (version_tags or {}).items() if v}}


def log_model(client: Any, run_id: str, op: dict[str, Any]) -> None:
    import mlflow

    run = client.get_run(run_id)
    tag = MODEL_TAGS[op["name"]]
    if tag in run.data.tags:
        return  # logged already
    checkpoint = Path(op["checkpoint"])
    if not checkpoint.is_file():  # not sent: a replay keeps the record and says so
        raise FileNotFoundError(errno.ENOENT, f"the weights of the {op['name']} model are gone",
                                str(checkpoint))
    record = op.get("id") or f"{run_id}/{op['name']}"
    with _fluent_store(client.tracking_uri):
        model = _logged_model(mlflow, client, run, op, record, checkpoint)
        if op.get("register"):
            _register(mlflow, client, run, op, record, model.model_id)
    client.set_tag(run_id, tag, model.model_id)


@contextlib.contextmanager
def _fluent_store(uri: str) -> Iterator[None]:
    """Model.log and register_model use the fluent API's store (and so does the sqlite
    registry when it resolves `models:/<id>`): this client's, for the call only.
    mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which every later subprocess
    (a DVC stage) would inherit. Afterwards the fluent store is unset again
    (`set_tracking_uri(None)`, as MLflow's own `_use_tracking_uri` does; nothing in this
    project sets it otherwise: every call goes through a client with its URI) and
    MLFLOW_TRACKING_URI is put back."""
    import mlflow

    env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _logged_model(mlflow: Any, client: Any, run: Any, op: dict[str, Any], record: str,
                  checkpoint: Path) -> Any:
    """The LoggedModel of `record`: the one an earlier attempt finished, else a new one."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model

    run_id, experiment_id = run.info.run_id, run.info.experiment_id
    for found in client.search_logged_models(
            [experiment_id], filter_string=f"tags.`{RECORD_TAG}` = '{record}'"):
        if found.status == LoggedModelStatus.READY:
            return found
        # Half-made (its run output may be recorded already, which MLflow refuses twice).
        client.delete_logged_model(found.model_id)
    model = client.create_logged_model(
        experiment_id, name=op["name"], source_run_id=run_id, model_type="ddpm",
        params=dict(run.data.params), tags={"ddpm.checkpoint": checkpoint.name,
                                            RECORD_TAG: record})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sampling = Path(tmp, "sampling.json")
            sampling.write_text(json.dumps(op["sampling"], indent=1))
            code = Path(tmp, "ddpm")
            shutil.copytree(PACKAGE, code, ignore=shutil.ignore_patterns("__pycache__"))
            weights = Path(tmp, checkpoint.name)
            ema_only(checkpoint, weights)
            Model.log(None, mlflow.pyfunc, name=op["name"], run_id=run_id,
                      model_id=model.model_id, step=op["step"], python_model=str(MODEL_CODE),
                      artifacts={"checkpoint": str(weights), "sampling": str(sampling)},
                      code_paths=[str(code)], pip_requirements=pip_requirements())
    except BaseException:
        with contextlib.suppress(Exception):
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    return client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


def _register(mlflow: Any, client: Any, run: Any, op: dict[str, Any], record: str,
              model_id: str) -> None:
    """A new version of `op["register"]` for the model, unless `record` made one already."""
    name, run_id = op["register"], run.info.run_id
    if not any(v.tags.get(RECORD_TAG) == record for v in client.search_model_versions(
            f"name = '{name}' AND run_id = '{run_id}'")):
        tags = {**op.get("version_tags", {}), "ddpm.run_id": run_id, RECORD_TAG: record}
        commit = run.data.tags.get("mlflow.source.git.commit")
        if commit:
            tags.setdefault("git.commit", commit)
        mlflow.register_model(f"models:/{model_id}", name, tags=tags)


def ema_only(checkpoint: Path, out: Path) -> None:
    """The checkpoint without its raw (non-EMA) weights: what sampling uses, half the size."""
    import torch

    # Not ddpm.evaluate.model_file.load: importing it here would put it in the code
    # closure of every stage that tracks. The file is the one the train stage just wrote.
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    with open(out, "wb") as f:
        torch.save({key: value for key, value in payload.items() if key != "model"}, f)


def keep_weights(op: dict[str, Any], folder: Path) -> dict[str, Any]:
    """A model record to be spooled, with its own copy of the EMA weights in `folder` (what
    replay logs): a retrain before the replay, or a queued experiment's temporary copy
    going away, cannot change or take them. A file already gone stays named (replay says so)."""
    source = Path(op["checkpoint"])
    if not source.is_file():
        return op
    folder.mkdir(parents=True, exist_ok=True)
    kept = Path(tempfile.mkdtemp(dir=folder)) / source.name
    ema_only(source, kept)
    return {**op, "checkpoint": str(kept)}


# --- datasets ----------------------------------------------------------------------

def dataset_op(name: str, source: str, sha256: str, context: str,
               profile: Mapping[str, Any]) -> dict:
    """The tracker record of a run input: data identified by its SHA-256 (`context`:
    training or evaluation)."""
    return {"op": "dataset", "name": name, "source": source, "digest": sha256[:DIGEST_CHARS],
            "context": context, "profile": {"sha256": sha256, **profile}}


def log_dataset(client: Any, run_id: str, op: dict[str, Any]) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    kind, _, _ = op["source"].partition(":")
    dataset = Dataset(name=op["name"], digest=op["digest"], source_type=kind or "local",
                      source=json.dumps({"uri": op["source"]}),
                      profile=json.dumps(op["profile"]))
    client.log_inputs(run_id, datasets=[DatasetInput(
        dataset, tags=[InputTag("mlflow.data.context", op["context"])])])


def training_dataset(data: Any, sha256: str, count: int, image_size: int) -> dict:
    """The run input of the images a run trained on (`data`: the params' data section)."""
    name = "synthetic-cars" if data.source == "synthetic" else "stanford-cars"
    return dataset_op(name, training_source(data), sha256, "training",
                      {"count": count, "image_size": image_size})


def training_source(data: Any) -> str:
    """Where the training images came from, from the data params."""
    if data.source == "kaggle":
        return f"kaggle:{data.kaggle_dataset}"
    if data.source == "archive":
        return f"archive:{Path(data.archive or '').name}"
    return f"synthetic:seed={data.seed},count={data.synthetic_count}"


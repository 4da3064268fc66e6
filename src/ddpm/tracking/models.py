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
with one warning. A model the run already holds (a replay, a rerun of a finished training)
is not logged twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from .store import _say

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
    return {"op": "model", "name": name, "checkpoint": str(Path(checkpoint).resolve()),
            "step": int(step), "sampling": dict(sampling), "register": register,
            "version_tags": {k: str(v) for k, v in (version_tags or {}).items() if v}}


def log_model(client: Any, run_id: str, op: dict[str, Any]) -> None:
    import mlflow

    run = client.get_run(run_id)
    tag = MODEL_TAGS[op["name"]]
    if tag in run.data.tags:
        return  # logged already
    checkpoint = Path(op["checkpoint"])
    if not checkpoint.is_file():
        _say(f"{checkpoint} is gone; the {op['name']} model of run {run_id} is not logged")
        return
    with _fluent_store(client.tracking_uri):
        _log_and_register(mlflow, client, run, op, tag, checkpoint)


@contextlib.contextmanager
def _fluent_store(uri: str) -> Iterator[None]:
    """Model.log and register_model use the fluent API's store: this client's, for the
    call only. mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which every
    later subprocess (a DVC stage) would inherit: both are put back."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    before, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        utils._tracking_uri = before
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _log_and_register(mlflow: Any, client: Any, run: Any, op: dict[str, Any], tag: str,
                      checkpoint: Path) -> None:
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model

    run_id = run.info.run_id
    model = client.create_logged_model(
        run.info.experiment_id, name=op["name"], source_run_id=run_id, model_type="ddpm",
        params=dict(run.data.params), tags={"ddpm.checkpoint": checkpoint.name})
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
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    if op.get("register"):
        tags = {**op.get("version_tags", {}), "ddpm.run_id": run_id}
        commit = run.data.tags.get("mlflow.source.git.commit")
        if commit:
            tags.setdefault("git.commit", commit)
        mlflow.register_model(f"models:/{model.model_id}", op["register"], tags=tags)
    client.set_tag(run_id, tag, model.model_id)


def ema_only(checkpoint: Path, out: Path) -> None:
    """The checkpoint without its raw (non-EMA) weights: what sampling uses, half the size."""
    import torch

    # Not ddpm.evaluate.model_file.load: importing it here would put it in the code
    # closure of every stage that tracks. The file is the one the train stage just wrote.
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    with open(out, "wb") as f:
        torch.save({key: value for key, value in payload.items() if key != "model"}, f)


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
    names = {"synthetic": "synthetic-cars", "kaggle": "stanford-cars"}
    name = names.get(data.source) or Path(training_source(data).partition(":")[2]).stem
    return dataset_op(name, training_source(data), sha256, "training",
                      {"count": count, "image_size": image_size})


def training_source(data: Any) -> str:
    """Where the training images came from, from the data params: the folder's absolute path
    (as dvc.lock records it) or the zip's file name."""
    if data.source == "kaggle":
        return f"kaggle:{data.kaggle_dataset}"
    if data.source == "archive":
        return f"archive:{Path(data.archive or '').name}"
    if data.source == "folder":
        return f"folder:{data.folder}"
    return f"synthetic:seed={data.seed},count={data.synthetic_count}"

"""The trained model in MLflow: a LoggedModel per published checkpoint, its registered version
(described, scored, and the best of them marked `champion`), and the data a run trained and
was scored on as the run's dataset inputs.

The train stage (rank 0) logs, when training has ended:

    final   models/model.pt, at the last step: the run's metrics at that step (final loss,
            the last in-training FID/KID) are attached to it; registered as a new version
            of `mlflow.registered_model` unless that is empty, with version tags
            dvc.exp_name, git.commit and ddpm.dataset_sha256, and a description (the run,
            the objective, the data's digest; `describe`).
    best    models/best.pt when another epoch scored best, at that epoch's step.

Each is a pyfunc model from code (`pyfunc_model.py`, no pickled Python object): the
`ddpm` package as its code, the checkpoint in the train stage's format as an artifact, the
sampling defaults (with the request work bound) as another, a signature (the request keys,
uint8 N x S x S x 3 out), and pinned pip requirements, so logging never infers an
environment (offline: a 120 s subprocess). The run's tags `ddpm.model_id` /
`ddpm.best_model_id` name them. Logging goes through the tracker's background thread like
every other call: a store that is down spools it with the rest, with one warning, and the
spool keeps its own copy of the weights (`keep_weights`), so a retrain before the replay
cannot change what is logged.

Exactly once: a model record has an id (`RECORD_TAG`) that its LoggedModel and registered
version carry. Logging it again (a replay after a failure anywhere, a rerun of a finished
training) finds what the first attempt made: a READY model is kept, a half-made one deleted
and made again, a version with the record's id is not registered twice, and a run that
holds the model's tag is done.

The evaluate stage scores the model its samples came from (`score_model`): the version's
`ddpm.scores` tag keeps FID/KID per sampling setting, its description lists them, and the
alias `champion` goes to the version with the lower FID among versions scored alike
(`score_key`: sample count, sampler, steps, eta, clip/variance, reference statistics);
it moves only when a new version beats the champion under the champion's own setting.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from .store import RECORD_TAG, TrackingError, _note

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE = Path(__file__).resolve().parents[1]  # src/ddpm, the model's code
MODEL_TAGS = {"final": "ddpm.model_id", "best": "ddpm.best_model_id"}
SCORES_TAG = "ddpm.scores"  # on a version: {score_key: {fid, kid, ..., run_id}} as JSON
MAX_SCORES = 20  # settings a version keeps scores for (MLflow limits a tag's length)
CHAMPION = "champion"
# A served request's bound on work, images x model evaluations (ddpm: all T), unless the
# model's sampling defaults say otherwise: 256 images of 64 steps. On a CPU the seed's U-Net
# takes about 0.1 s per image and evaluation: minutes.
MAX_WORK = 256 * 64
# What a request to the model may ask, and the types `pyfunc_model` checks.
REQUEST_TYPES = {"num_samples": int, "seed": int, "sampler": str, "steps": int, "eta": float,
                 "clip": bool}
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


def score_op(name: str, settings: Mapping[str, Any], scores: Mapping[str, float],
             register: str) -> dict:
    """The tracker record of the evaluate stage's scores of the run's `name` model, sampled
    with `settings` (samples, sampler, steps, eta, clip, variance, weights, reference)."""
    return {"op": "score", "name": name, "register": register, "settings": dict(settings),
            "scores": {key: float(value) for key, value in scores.items()}}


def signature(image_size: Optional[int]) -> Any:
    """The request keys as optional inputs (type Any: `pyfunc_model` says why and checks
    their types), uint8 images N x S x S x 3 as the output."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec
    from mlflow.types.schema import AnyType

    size = image_size or -1
    return ModelSignature(
        inputs=Schema([ColSpec(AnyType(), key, required=False) for key in REQUEST_TYPES]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, size, size, 3))]))


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
            size = ema_only(checkpoint, weights)
            with warnings.catch_warnings():
                # No input example: MLflow would load the model and sample from it to check
                # the example while training logs. The signature is given, so its warning
                # that an example "ensures the signature functions" is noise here.
                warnings.filterwarnings("ignore", message=".*input example was not provided")
                Model.log(None, mlflow.pyfunc, name=op["name"], run_id=run_id,
                          model_id=model.model_id, step=op["step"],
                          python_model=str(MODEL_CODE),
                          artifacts={"checkpoint": str(weights), "sampling": str(sampling)},
                          code_paths=[str(code)], pip_requirements=pip_requirements(),
                          signature=signature(size))
    except BaseException:
        with contextlib.suppress(Exception):
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    return client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)


def _register(mlflow: Any, client: Any, run: Any, op: dict[str, Any], record: str,
              model_id: str) -> None:
    """A new version of `op["register"]` for the model, unless `record` made one already;
    its description says what made it."""
    name, run_id = op["register"], run.info.run_id
    version = next((v for v in client.search_model_versions(
        f"name = '{name}' AND run_id = '{run_id}'") if v.tags.get(RECORD_TAG) == record), None)
    if version is None:
        tags = {**op.get("version_tags", {}), "ddpm.run_id": run_id, RECORD_TAG: record}
        commit = run.data.tags.get("mlflow.source.git.commit")
        if commit:
            tags.setdefault("git.commit", commit)
        version = mlflow.register_model(f"models:/{model_id}", name, tags=tags)
    client.update_model_version(name, version.version, description=describe(version, run))


def ema_only(checkpoint: Path, out: Path) -> Optional[int]:
    """The checkpoint without its raw (non-EMA) weights: what sampling uses, half the size.
    Returns the image size it was trained on (None if it does not say)."""
    import torch

    # Not ddpm.evaluate.model_file.load: importing it here would put it in the code
    # closure of every stage that tracks. The file is the one the train stage just wrote.
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    with open(out, "wb") as f:
        torch.save({key: value for key, value in payload.items() if key != "model"}, f)
    size = (payload.get("config") or {}).get("image_size")
    return int(size) if size else None


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


# --- what a version is: its description, its scores, the champion ---------------------

def describe(version: Any, run: Any) -> str:
    """A version's description (markdown): the run that made it, its objective, its data,
    and its scores per sampling setting (or that it has none yet)."""
    params, tags, own = run.data.params, run.data.tags, version.tags
    weighting = params.get("train.loss_weighting", "none")
    if weighting == "min_snr":
        weighting += f" (gamma {params.get('train.min_snr_gamma', '?')})"
    made = [f"Trained in run `{run.info.run_id}` ({run.info.run_name})"]
    if own.get("dvc.exp_name"):
        made.append(f"DVC experiment `{own['dvc.exp_name']}`")
    if own.get("git.commit"):
        made.append(f"commit `{own['git.commit'][:12]}`")
    digest = own.get("ddpm.dataset_sha256") or tags.get("ddpm.dataset_hash", "unknown")
    lines = [", ".join(made) + ".",
             f"Objective: {params.get('diffusion.prediction', 'eps')} prediction, loss "
             f"weighting {weighting}.",
             f"Data: {tags.get('ddpm.data_source', 'unknown')}, SHA-256 `{digest}`."]
    scores = _scores(version)
    if not scores:
        lines.append("Not scored yet: the evaluate stage adds FID and KID.")
    for key, score in scores.items():
        kid = f", KID {score['kid']:.4g}" if "kid" in score else ""
        kid += f" ± {score['kid_std']:.2g}" if "kid_std" in score else ""
        lines.append(f"FID {score['fid']:.4g}{kid} on {key} (evaluate run "
                     f"`{score.get('run_id', '?')}`).")
    return "\n\n".join(lines)


def score_key(settings: Mapping[str, Any]) -> str:
    """What makes two evaluate scores comparable, in words: sample count, sampler, steps,
    eta (ddpm: its variance instead), clipping, and the reference statistics."""
    parts = [f"{settings['samples']} samples", str(settings["sampler"]),
             f"{settings['steps']} steps"]
    if settings["sampler"] == "ddpm":
        parts.append(f"{settings.get('variance') or 'posterior'} variance")
    else:
        parts.append(f"eta {float(settings['eta']):g}")
    if not settings.get("clip", True):
        parts.append("no clip")
    parts.append(f"reference {settings.get('reference', 'unknown')}")
    return ", ".join(parts)


def _scores(version: Any) -> dict[str, dict[str, Any]]:
    try:
        scores = json.loads(version.tags.get(SCORES_TAG) or "{}")
    except ValueError:
        return {}
    return scores if isinstance(scores, dict) else {}


def score_model(client: Any, run_id: str, op: dict[str, Any]) -> None:
    """The evaluate stage's scores on the registered version of the run's `op["name"]`
    model (if it has one and the samples came from its EMA weights), then the champion."""
    settings, name = op["settings"], op.get("register")
    if not name or settings.get("weights", "ema") != "ema" or not settings.get("sampler"):
        return
    run = client.get_run(run_id)
    model_id = run.data.tags.get(MODEL_TAGS[op["name"]])
    if not model_id:
        return
    trained_in = run.data.tags.get("ddpm.train_run_id", run_id)
    version = next((v for v in client.search_model_versions(
        f"name = '{name}' AND run_id = '{trained_in}'") if v.source == f"models:/{model_id}"),
        None)
    if version is None:
        return  # not registered (the best model, or registration off)
    key = score_key(settings)
    scores = _scores(version)
    scores.pop(key, None)  # the newest last; the oldest go first past MAX_SCORES
    scores[key] = {**op["scores"], "run_id": run_id}
    scores = dict(list(scores.items())[-MAX_SCORES:])
    client.set_model_version_tag(name, version.version, SCORES_TAG, json.dumps(scores))
    version = client.get_model_version(name, version.version)
    client.update_model_version(name, version.version,
                                description=describe(version, client.get_run(trained_in)))
    _crown(client, name, version.version, key, op["scores"]["fid"])


def _crown(client: Any, name: str, version: str, key: str, fid: float) -> None:
    """`champion` to `version` if no version holds it, or if it beats the holder's FID
    under the same settings; never across unlike scores."""
    with _registry_lock(client.tracking_uri):
        holder = client.get_registered_model(name).aliases.get(CHAMPION)
        if holder is not None and str(holder) == str(version):
            return
        theirs = _scores(client.get_model_version(name, holder)).get(key) if holder else None
        if holder is not None and theirs is None:
            _note(f"{name}@{CHAMPION} stays version {holder}: it has no score with these "
                  f"settings ({key}), so version {version}'s FID {fid:.4g} is not compared "
                  f"with it; score both alike to compare")
            return
        if theirs is not None and not fid < theirs["fid"]:
            _note(f"{name}@{CHAMPION} stays version {holder}: FID {theirs['fid']:.4g} "
                  f"against version {version}'s {fid:.4g} ({key})")
            return
        client.set_registered_model_alias(name, CHAMPION, version)
        was = f" (was version {holder}, FID {theirs['fid']:.4g})" if holder else ""
        _note(f"{name}@{CHAMPION} is version {version}: FID {fid:.4g} ({key}){was}")


@contextlib.contextmanager
def _registry_lock(uri: str) -> Iterator[None]:
    """One champion decision at a time among this machine's processes (queued experiments
    evaluate at once); processes on other machines sharing a server are not covered."""
    from filelock import FileLock, Timeout

    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    lock = FileLock(Path(tempfile.gettempdir()) / f"ddpm-registry-{digest}.lock")
    try:
        lock.acquire(timeout=120)
    except Timeout:
        raise TrackingError(f"another process has been choosing the champion of {uri} "
                            f"for 120 s (it holds {lock.lock_file})") from None
    try:
        yield
    finally:
        lock.release()


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

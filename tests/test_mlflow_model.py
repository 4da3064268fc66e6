"""The trained model in MLflow, piece by piece, in real sqlite stores: what the train stage
logs and registers, the version's description and signature, the champion alias, and what
`predict` refuses (the pipeline's own run is tested in test_end_to_end: registration,
scores, predict equal to `ddpm sample`, serving)."""

import json
import os
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ddpm.config import DataConfig, MlflowConfig, params_from_dict
from ddpm.tracking import Tracker, training_source
from ddpm.train.stage import TrainPaths, log_to_mlflow

mlflow = pytest.importorskip("mlflow")
from test_tracking import ENV, empty_db, tiny_checkpoint  # noqa: E402,F401 - empty_db: a fixture

REGISTERED = "ddpm-stanford-cars"


@pytest.fixture(scope="module")
def repo(tmp_path_factory, empty_db):  # noqa: F811
    """A repository root with the default store in it, for the whole module."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copy(empty_db, root / "mlflow.db")
    with pytest.MonkeyPatch.context() as env:
        for name in ENV:
            env.delenv(name, raising=False)
        env.setenv("DVC_ROOT", str(root))
        # Where mlflow.pyfunc.load_model("models:/...") looks.
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        yield root


def client(repo):
    return mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")


def train_paths(folder: Path) -> TrainPaths:
    return TrainPaths(*(folder / name for name in ("data", "model.pt", "ckpt", "reports",
                                                   "strips", "run.json", "ref.npz", "best.pt")))


def train_run(repo, name, best_step=20, mlflow_params=None):
    """What the train stage logs at its end (40 steps), with real weights, into a real run."""
    folder = repo / name
    folder.mkdir()
    paths = train_paths(folder)
    tiny_checkpoint(paths.model, seed=0)
    tiny_checkpoint(paths.best, seed=1)
    params = params_from_dict({"data": {"source": "synthetic", "synthetic_count": 40},
                               "train": {"fid_sampler": "ddim", "fid_steps": 4},
                               "mlflow": {"experiment": "models", **(mlflow_params or {})}})
    state = SimpleNamespace(step=40, extra={"fid_best": {"epoch": 1, "step": best_step}})
    with Tracker(params.mlflow).start(run_name=name) as tracker:
        tracker.log_metrics({"train/loss": 0.5}, step=40)
        log_to_mlflow(tracker, params, paths, state, "ab" * 32, 40, 16)
    return client(repo).get_run(tracker.run_id)


def versions(repo):
    return sorted(client(repo).search_model_versions(f"name = '{REGISTERED}'"),
                  key=lambda v: int(v.version))


def test_the_final_model_is_registered_and_the_best_logged_when_it_is_another(repo, recwarn):
    c = client(repo)
    run = train_run(repo, "both")
    final = c.get_logged_model(run.data.tags["ddpm.model_id"])
    best = c.get_logged_model(run.data.tags["ddpm.best_model_id"])
    assert (final.name, best.name) == ("final", "best")
    assert {o.model_id: o.step for o in run.outputs.model_outputs} == \
        {final.model_id: 40, best.model_id: 20}
    assert {m.key: m.value for m in final.metrics} == {"train/loss": 0.5}
    (version,) = versions(repo)
    assert (version.source, version.run_id) == (f"models:/{final.model_id}", run.info.run_id)
    assert version.tags["ddpm.dataset_sha256"] == "ab" * 32
    # What made it, in its description; its scores come from the evaluate stage.
    assert f"Trained in run `{run.info.run_id}` (both)" in version.description
    assert "Objective: eps prediction, loss weighting none." in version.description
    assert "Not scored yet" in version.description
    # The signature: the request keys in, uint8 images out; no "Add type hints" warning,
    # nor the one about an input example (the demo printed it).
    info = mlflow.models.get_model_info(f"models:/{final.model_id}")
    assert [spec.name for spec in info.signature.inputs.inputs] == \
        ["num_samples", "seed", "sampler", "steps", "eta", "clip"]
    (out,) = info.signature.outputs.inputs
    assert (out.type, out.shape) == (np.dtype(np.uint8), (-1, 16, 16, 3))
    assert not [w for w in recwarn if "Add type hints" in str(w.message)
                or "input example was not provided" in str(w.message)]
    # The best at the final step is the final model; registered_model '' registers nothing.
    run = train_run(repo, "final-only", best_step=40)
    assert "ddpm.best_model_id" not in run.data.tags and len(versions(repo)) == 2
    run = train_run(repo, "unregistered", mlflow_params={"registered_model": ""})
    assert "ddpm.model_id" in run.data.tags and len(versions(repo)) == 2


def test_without_log_model_only_the_dataset_is_logged(repo):
    run = train_run(repo, "no-model", mlflow_params={"log_model": False,
                                                     "registered_model": ""})
    assert not {"ddpm.model_id", "ddpm.best_model_id"} & set(run.data.tags)
    (dataset,) = [i.dataset for i in run.inputs.dataset_inputs]
    assert (dataset.name, dataset.digest) == ("synthetic-cars", "ab" * 18)
    assert json.loads(dataset.source)["uri"] == "synthetic:seed=0,count=40"
    assert json.loads(dataset.profile)["sha256"] == "ab" * 32


def test_the_training_source_names_where_the_images_came_from():
    assert training_source(DataConfig()) == "kaggle:eduardo4jesus/stanford-cars-dataset"
    assert training_source(DataConfig(source="archive", archive="/x/cars.zip")) == \
        "archive:cars.zip"


# --- the champion -----------------------------------------------------------------

def bare_version(repo, c, name):
    """A run with a registered LoggedModel (no artifacts: scoring never loads it)."""
    from ddpm.tracking.models import _fluent_store

    experiment = c.get_experiment_by_name("models") or \
        c.get_experiment(c.create_experiment("models"))
    run = c.create_run(experiment.experiment_id, run_name=name)
    model = c.create_logged_model(experiment.experiment_id, name="final",
                                  source_run_id=run.info.run_id)
    c.set_tag(run.info.run_id, "ddpm.model_id", model.model_id)
    with _fluent_store(c.tracking_uri):
        version = mlflow.register_model(f"models:/{model.model_id}", "champions")
    return run.info.run_id, version.version


def score(c, run_id, fid, samples=24):
    from ddpm.tracking.models import score_op
    from ddpm.tracking.store import _apply

    settings = {"samples": samples, "sampler": "ddim", "steps": 5, "eta": 0.0, "clip": True,
                "variance": "posterior", "weights": "ema", "reference": "abc123"}
    _apply(c, run_id, score_op("final", settings, {"fid": fid, "kid": 0.01}, "champions"))


def test_the_champion_is_the_best_fid_among_versions_scored_alike(repo, capfd):
    c = client(repo)
    (one, v1), (two, v2), (three, v3) = [bare_version(repo, c, f"v{i}") for i in (1, 2, 3)]

    def champion():
        return c.get_registered_model("champions").aliases["champion"]

    score(c, one, 50.0)
    assert champion() == v1  # the first score
    score(c, two, 60.0)
    assert champion() == v1  # worse
    score(c, three, 10.0, samples=2048)
    assert champion() == v1  # better, but on other settings: not compared
    notes = capfd.readouterr().err
    assert f"stays version {v1}: FID 50 against version {v2}'s 60" in notes
    assert f"stays version {v1}: it has no score with these settings (2048 samples" in notes
    score(c, three, 40.0)
    assert champion() == v3  # better, scored alike
    assert f"is version {v3}: FID 40 (24 samples, ddim, 5 steps, eta 0, reference abc123) " \
           f"(was version {v1}, FID 50)" in capfd.readouterr().err
    score(c, three, 45.0)  # a rescore of the champion itself keeps it
    assert champion() == v3
    described = c.get_model_version("champions", v3).description
    assert "FID 45, KID 0.01 on 24 samples, ddim, 5 steps, eta 0, reference abc123" in described
    assert "FID 10, KID 0.01 on 2048 samples" in described


# --- predict: what a request may ask -----------------------------------------------

@pytest.fixture(scope="module")
def champion(repo):
    """The registry's champion, loaded as `mlflow models serve` loads it: a tiny model with
    ddim 2 steps by default and a work bound of 100 model evaluations."""
    folder = repo / "served"
    folder.mkdir()
    sampling = {"num_samples": 4, "seed": 0, "sampler": "ddim", "steps": 2, "eta": 0.0,
                "clip": True, "batch_size": 8, "max_samples": 16, "max_work": 100,
                "device": "cpu"}
    tracker = Tracker(MlflowConfig(experiment="served", registered_model="served"))
    with tracker.start(run_name="served"):
        tracker.log_model("final", tiny_checkpoint(folder / "model.pt"), 40, sampling,
                          register="served")
    with tracker.start(run_id=tracker.run_id):
        tracker.score_model("final", {"samples": 8, "sampler": "ddim", "steps": 2, "eta": 0.0,
                                      "weights": "ema", "reference": "r"}, {"fid": 99.0})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mlflow.pyfunc.load_model("models:/served@champion")
    assert not [w for w in caught if "Add type hints" in str(w.message)]
    return model


def test_the_champion_samples_what_a_request_asks(champion):
    images = champion.predict({"num_samples": 3, "seed": 5, "sampler": "dpmpp_2m_sde",
                               "steps": 3, "eta": 0.5})
    assert images.dtype == np.uint8 and images.shape == (3, 16, 16, 3)
    assert champion.predict({}).shape == (4, 16, 16, 3)  # the defaults
    assert np.array_equal(champion.predict({"seed": 1}), champion.predict([{"seed": 1}]))


# (request, what the one-line refusal says). New with issue 30, passed or failed otherwise
# before: eta NaN/inf (all-black images), seed -1 (a ValueError: a stack trace when served),
# the work bound (none).
REFUSED = [
    ({"sampler": "ddim", "eta": float("nan")}, "eta: must be a finite number, got nan"),
    ({"sampler": "dpmpp_2m_sde", "eta": float("inf")}, "eta: must be a finite number, got inf"),
    ({"sampler": "ddpm", "eta": float("-inf")}, "eta: must be a finite number, got -inf"),
    ({"seed": -1}, "seed: must be 0 or more, got -1"),
    ({"seed": 1.5}, "seed: must be int, got 1.5"),
    ({"steps": 2.5}, "steps: must be int, got 2.5"),
    ({"num_samples": 0}, "num_samples: must be 1 to 16 per request, got 0"),
    ({"num_samples": 17}, "num_samples: must be 1 to 16 per request, got 17"),
    ({"sampler": "euler"}, "sampler: unknown sampler 'euler'"),
    ({"num_samples": 6, "sampler": "ddpm"},
     "work: 6 samples x all 20 steps of ddpm = 120 model evaluations, above this model's "
     "bound of 100 per request"),
    ({"num_samples": 11, "steps": 10}, "bound of 100 per request"),
]


@pytest.mark.parametrize("request_, says", REFUSED, ids=[says.split(":")[0] + f"-{i}"
                                                          for i, (_, says) in enumerate(REFUSED)])
def test_a_bad_request_is_one_line_naming_what_is_wrong(champion, request_, says):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as err:
        champion.predict(request_)
    assert says in err.value.message and "\n" not in err.value.message
    assert err.value.get_http_status_code() == 400


def test_a_request_comes_as_a_dict_a_row_or_what_serving_parses():
    pandas = pytest.importorskip("pandas")
    from ddpm.tracking.pyfunc_model import BadRequest, _request, _typed

    want = {"num_samples": 2, "seed": 3, "sampler": "ddim", "eta": 0.5}
    assert _typed(_request(dict(want))) == want
    assert _typed(_request([dict(want)])) == want
    assert _typed(_request(pandas.DataFrame([want]))) == want
    assert _typed(_request(pandas.DataFrame([]))) == {}  # `{}` after schema enforcement
    served = {"num_samples": np.array(2), "seed": np.array([3]), "sampler": np.array("ddim"),
              "eta": np.array(0.5)}
    assert _typed(_request(served)) == want
    assert _typed(_request({"steps": 4.0, "eta": 1})) == {"steps": 4, "eta": 1.0}
    for bad, says in [({"seed": "one"}, "seed: must be int"), ({"num_samples": True},
                      "num_samples: must be int"), ({"steps": [1, 2]}, "give one value"),
                      ("cars", "must be a dict"), ({"size": 64}, "unknown request key(s) size"),
                      (pandas.DataFrame([want, want]), "one request per call")]:
        with pytest.raises(BadRequest) as err:
            _typed(_request(bad))
        assert says in err.value.message and "\n" not in err.value.message

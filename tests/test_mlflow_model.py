"""The trained model in MLflow, piece by piece (the pipeline's own run is tested in
test_end_to_end: registration, scores, predict equal to `ddpm sample`, serving)."""

from types import SimpleNamespace

import numpy as np
import pytest

from ddpm.config import DataConfig, params_from_dict
from ddpm.tracking import training_source
from ddpm.train.stage import TrainPaths, log_to_mlflow


class Recorder:
    """A tracker that keeps what it is asked to log."""

    def __init__(self):
        self.datasets, self.models = [], []

    def log_dataset(self, dataset):
        self.datasets.append(dataset)

    def log_model(self, name, checkpoint, step, sampling, register="", version_tags=None):
        self.models.append((name, step, register))


def _logged(tmp_path, mlflow=None, best_step=40):
    params = params_from_dict({"data": {"source": "synthetic", "synthetic_count": 40},
                               "mlflow": mlflow or {}})
    paths = TrainPaths(*(tmp_path / name for name in ("data", "m.pt", "ckpt", "reports",
                                                      "strips", "run.json", "ref.npz",
                                                      "best.pt")))
    state = SimpleNamespace(step=40, extra={"fid_best": {"epoch": 1, "step": best_step}})
    tracker = Recorder()
    log_to_mlflow(tracker, params, paths, state, "ab" * 32, 40, 16)
    return tracker


def test_the_final_model_is_registered_and_the_best_logged_when_it_is_another(tmp_path):
    tracker = _logged(tmp_path, best_step=20)
    assert tracker.models == [("final", 40, "ddpm-stanford-cars"), ("best", 20, "")]
    assert _logged(tmp_path, best_step=40).models == [("final", 40, "ddpm-stanford-cars")]
    assert _logged(tmp_path, {"registered_model": ""}).models == [("final", 40, "")]


def test_without_log_model_only_the_dataset_is_logged(tmp_path):
    tracker = _logged(tmp_path, {"log_model": False, "registered_model": ""})
    assert tracker.models == []
    (dataset,) = tracker.datasets
    assert (dataset["name"], dataset["context"], dataset["source"]) == \
        ("synthetic-cars", "training", "synthetic:seed=0,count=40")
    assert dataset["digest"] == "ab" * 18 and dataset["profile"]["sha256"] == "ab" * 32


def test_the_training_source_names_where_the_images_came_from():
    assert training_source(DataConfig()) == "kaggle:eduardo4jesus/stanford-cars-dataset"
    assert training_source(DataConfig(source="archive", archive="/x/cars.zip")) == \
        "archive:cars.zip"


def test_a_request_comes_as_a_dict_a_row_or_what_serving_parses():
    pandas = pytest.importorskip("pandas")
    from ddpm.tracking.pyfunc_model import BadRequest, _request, _typed

    want = {"num_samples": 2, "seed": 3, "sampler": "ddim", "eta": 0.5}
    assert _typed(_request(dict(want))) == want
    assert _typed(_request([dict(want)])) == want
    assert _typed(_request(pandas.DataFrame([want]))) == want
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

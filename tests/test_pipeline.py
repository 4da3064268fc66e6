"""The real stages through `dvc repro` in a scratch git + DVC repository."""

import json
import time

import numpy as np
import pytest
import yaml

from conftest import dvc, make_dvc_project, run_stage, write_params


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = make_dvc_project(tmp_path_factory.mktemp("pipeline"),
                            {"data": {"source": "synthetic", "synthetic_count": 200}})
    dvc("repro", "preprocess", cwd=root)
    return root


def test_synthetic_data_becomes_a_200_image_tensor(project):
    images = np.load(project / "data" / "processed" / "images.npy")
    manifest = json.loads((project / "data" / "processed" / "manifest.json").read_text())
    assert images.shape == (200, 3, 64, 64) and images.dtype == np.uint8
    assert manifest["count"] == 200 and manifest["skipped_count"] == 0
    assert manifest["per_split"]["train"] + manifest["per_split"]["test"] == 200


def test_train_params_do_not_make_data_stages_stale(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["epochs"] = 77
    params["generate"]["steps"] = 50
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = dvc("status", "download", "preprocess", cwd=project).stdout
    assert "changed" not in status and "modified" not in status
    params["preprocess"]["resize"] = "center_crop"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "preprocess" in dvc("status", "preprocess", cwd=project).stdout


def test_kaggle_without_credentials_fails_fast(tmp_path):
    params = write_params(tmp_path / "params.yaml", {"data": {"source": "kaggle"}})
    env = {"HOME": str(tmp_path), "KAGGLE_USERNAME": "", "KAGGLE_KEY": "", "KAGGLE_API_TOKEN": "",
           "KAGGLE_CONFIG_DIR": str(tmp_path / "nokaggle")}
    started = time.monotonic()
    done = run_stage("download", "--params", str(params), "--out", str(tmp_path / "raw"),
                     cwd=tmp_path, check=False, env=env)
    assert time.monotonic() - started < 20
    assert done.returncode != 0
    for fragment in ("kaggle.json", "KAGGLE_USERNAME", "KAGGLE_API_TOKEN", "synthetic"):
        assert fragment in done.stderr
    assert not (tmp_path / "raw").exists()

"""The train stage as a user meets it: bad checkpoints, failures as one line, off cadences."""

import json
import pickle

import numpy as np
import pytest
import torch

from conftest import TINY, dvc, make_dvc_project, run_stage, write_params, write_processed


def processed(tmp_path, n=16):
    images = np.random.default_rng(0).integers(0, 256, (n, 3, 16, 16), dtype=np.uint8)
    return write_processed(tmp_path / "processed", images)


def params(tmp_path, **train):
    return write_params(tmp_path / "params.yaml", {
        **TINY, "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "compile": "off",
                          "strip_every": 0, **train}, "mlflow": {"enabled": False}})


def train_stage(tmp_path, params_file, data, check=True):
    return run_stage("train", "--params", str(params_file), "--data", str(data),
                     "--model", str(tmp_path / "model.pt"), "--checkpoints",
                     str(tmp_path / "ckpt"), "--reports", str(tmp_path / "reports"),
                     "--strips", str(tmp_path / "strips"), "--run-file",
                     str(tmp_path / "run.json"), cwd=tmp_path, check=check)


class Pickled:  # a class weights_only refuses to rebuild
    pass


@pytest.mark.parametrize("kind", ["truncated", "not a checkpoint", "pickled code"])
def test_an_unreadable_checkpoint_is_moved_aside_and_training_starts_fresh(tmp_path, kind):
    data = processed(tmp_path)
    ckpt = tmp_path / "ckpt" / "last.pt"
    ckpt.parent.mkdir()
    if kind == "truncated":
        torch.save({"model": {"w": torch.zeros(1000)}}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:300])
    elif kind == "not a checkpoint":
        ckpt.write_text("hello")
    else:
        ckpt.write_bytes(pickle.dumps({"epoch": 1, "obj": Pickled()}))
    bad = ckpt.read_bytes()
    done = train_stage(tmp_path, params(tmp_path), data)
    assert f"{ckpt} is not a readable checkpoint" in done.stdout
    assert f"moved it to {ckpt}.unreadable and training from scratch" in done.stdout
    assert (tmp_path / "ckpt" / "last.pt.unreadable").read_bytes() == bad  # nothing lost
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1  # the new run's
    assert json.loads((tmp_path / "reports" / "train.json").read_text())["steps"] == 2


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_failing_train_stage_ends_with_one_error_line(tmp_path, nproc):
    """Any number of processes: no traceback from us or from torch's launcher."""
    data = processed(tmp_path)
    done = train_stage(tmp_path, params(tmp_path, lr=1e12, nproc=nproc, log_every=1), data,
                       check=False)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr
    assert lines[-1].startswith("error: the training loss became"), done.stderr
    assert sum(line.startswith("error:") for line in lines) == 1, done.stderr
    assert not (tmp_path / "model.pt").exists()


def test_the_stage_checks_inputs_before_starting_workers(tmp_path):
    data = processed(tmp_path)
    done = train_stage(tmp_path, params(tmp_path, nproc=3), data, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: params.yaml: train.batch_size (8) must divide "
                                   "evenly over train.nproc (3) processes")


def test_off_cadences_work_through_dvc(tmp_path):
    """strip_every: 0 (never), checkpoint_every and log_every beyond the run: every declared
    output is there (empty where nothing was due) and DVC commits the run."""
    root = make_dvc_project(tmp_path / "p", {
        **TINY, "data": {"source": "synthetic", "synthetic_count": 16},
        "train": {"epochs": 2, "batch_size": 8, "strip_every": 0, "checkpoint_every": 50,
                  "log_every": 1000, "compile": "off"}})
    dvc("repro", "train", cwd=root)
    assert (root / "reports" / "strips").is_dir()
    assert list((root / "reports" / "strips").iterdir()) == []
    assert torch.load(root / "models" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    rows = (root / "reports" / "train_loss.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # a reading at each epoch's end
    assert "train" not in dvc("status", "train", cwd=root).stdout.replace("Data and pipelines "
                                                                           "are up to date.", "")

"""A result is its code's: what the train stage resumes, and what it keeps in step.

- a checkpoint made by other code is never resumed (a semantic edit in a copy of the
  repository retrains, and the model changes);
- the best weights, the checkpoint, train_fid.csv and the resumed history agree after a
  kill between their writes (injected faults), and end as an uninterrupted run's;
- the best is chosen among evaluations with the current FID settings only;
- the optimizer runs this device's Adam after a resume; a failed CUDA-graph capture stops.
"""

import csv

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, TINY, TINY_MODEL, dvc, make_dvc_project
from ddpm.evaluate import model_file
from ddpm.train import checkpoint, stage as train_stage
from ddpm.evaluate import fid
from ddpm.config import DiffusionConfig, TrainConfig, params_from_dict
from ddpm.train.fid_curve import FidEvaluator, TrainFid

SCRIPT = REPO / "stages" / "train.py"


def test_a_checkpoint_made_by_other_code_is_not_resumed(tmp_path):
    root = make_dvc_project(tmp_path / "p", {
        **TINY, "data": {"source": "synthetic", "synthetic_count": 16},
        "train": {"epochs": 2, "batch_size": 8, "strip_every": 0, "compile": "off"}})
    dvc("repro", "train", cwd=root)
    before = model_file.load(root / "models" / "model.pt")
    unet = root / "src" / "ddpm" / "model" / "unet.py"
    unet.write_text(unet.read_text().replace("return self.head(h)\n",
                                             "return self.head(h) * 1.01\n", 1))
    out = dvc("repro", "train", cwd=root).stdout
    assert "not resuming from models/checkpoints/last.pt: it was made by other code " \
           "(src/ddpm/model/unet.py changed); training from scratch" in out, out
    after = model_file.load(root / "models" / "model.pt")
    assert after["step"] == before["step"] == 4  # trained again, from scratch
    assert not all(torch.equal(before["ema"][k], after["ema"][k]) for k in before["ema"])
    # The unchanged code resumes its own finished checkpoint: nothing trains again.
    out = dvc("repro", "train", "--force", cwd=root).stdout
    assert "resuming from models/checkpoints/last.pt at epoch 2" in out, out


# ---------------------------------------------------------------- one commit point

FIDS = {1: 80.0, 2: 60.0, 3: 70.0, 4: 50.0}  # new bests at epochs 1, 2 and 4


class Killed(BaseException):
    """An injected fault: the process dies here."""


@pytest.fixture
def scripted_fid(monkeypatch):
    """The in-training FID of each epoch from FIDS, with the real TrainFid around it."""
    epoch = {}
    real_run = TrainFid.run

    def run(self, state, summary):
        epoch["now"] = summary.epoch
        return real_run(self, state, summary)

    monkeypatch.setattr(TrainFid, "run", run)
    monkeypatch.setattr(FidEvaluator, "__call__", lambda self, model: {
        "fid": FIDS[epoch["now"]], "kid": FIDS[epoch["now"]] / 1000,
        "count_a": self.cfg.num_samples})


def stage_setup(tmp_path, name, fid_samples=8, **fid_settings):
    images = np.random.default_rng(0).integers(0, 256, (16, 3, 16, 16), dtype=np.uint8)
    data = tmp_path / "processed"
    if not data.exists():
        from conftest import write_processed

        write_processed(data, images)
        features = np.random.default_rng(1).standard_normal((10, fid.FEATURE_DIM))
        fid.save_stats(tmp_path / "stats.npz", fid.feature_stats(features),
                       {"dataset_sha256": "0" * 64})
    params = params_from_dict({**TINY, "train": {
        "epochs": 4, "batch_size": 8, "device": "cpu", "compile": "off", "strip_every": 0,
        "fid_every": 1, "fid_samples": fid_samples, "log_every": 1, **fid_settings},
        "mlflow": {"enabled": False}})
    out = tmp_path / name
    paths = train_stage.TrainPaths(data, out / "model.pt", out / "ckpt", out / "reports",
                                   out / "strips", out / "run.json", tmp_path / "stats.npz",
                                   out / "best.pt")
    return params, paths


def run_stage_here(params, paths):
    train_stage.run(params, paths, script=SCRIPT, argv=[])


def killed_at_first_fid(monkeypatch, params, paths):
    """Run the stage and kill it at its first in-training FID evaluation."""
    def killed_at_fid(self, model):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(FidEvaluator, "__call__", killed_at_fid)
        with pytest.raises(Killed):
            run_stage_here(params, paths)


def rows(paths):
    return [{k: v for k, v in r.items() if k != "seconds"}
            for r in csv.DictReader(paths.fid_csv.open())]


def assert_same_results(a, b):
    """Two train stage runs ended with the same weights, best weights, history and files."""
    for name in ("model", "best"):
        x, y = model_file.load(getattr(a, name)), model_file.load(getattr(b, name))
        for key in ("model", "ema"):
            assert all(torch.equal(x[key][k], y[key][k]) for k in x[key]), (name, key)
        assert x["epoch"] == y["epoch"]
    sa, sb = (model_file.load(p.best)["selected"] for p in (a, b))
    assert {k: v for k, v in sa.items() if k != "seconds"} == \
        {k: v for k, v in sb.items() if k != "seconds"}
    assert rows(a) == rows(b)
    assert sorted(p.name for p in a.checkpoints.iterdir()) == \
        sorted(p.name for p in b.checkpoints.iterdir()) == ["best-epoch0004.pt", "last.pt"]


@pytest.mark.parametrize("fault", ["after the best file, before the checkpoint",
                                   "after the checkpoint, before pruning"])
def test_a_kill_between_the_writes_resumes_to_the_uninterrupted_result(
        tmp_path, monkeypatch, scripted_fid, fault):
    params, straight = stage_setup(tmp_path, "straight")
    run_stage_here(params, straight)
    assert model_file.load(straight.best)["selected"]["epoch"] == 4

    _, killed = stage_setup(tmp_path, "killed")
    with monkeypatch.context() as patch:
        if fault.startswith("after the best file"):
            real_save = checkpoint.save

            def save(path, payload):  # epoch 2's best file lands, its checkpoint does not
                if path.name == "last.pt" and payload["epoch"] == 2:
                    raise Killed
                real_save(path, payload)

            patch.setattr(checkpoint, "save", save)
        else:
            real_prune = train_stage.prune_best

            def prune(folder, keep):  # epoch 2's checkpoint lands, names best-epoch0002
                if keep is not None and keep.name == "best-epoch0002.pt":
                    raise Killed
                return real_prune(folder, keep)

            patch.setattr(train_stage, "prune_best", prune)
        with pytest.raises(checkpoint.CheckpointWriteError):
            run_stage_here(params, killed)
    saved = model_file.load(killed.checkpoint)
    on_disk = sorted(p.name for p in killed.checkpoints.glob("best-*.pt"))
    assert on_disk == ["best-epoch0001.pt", "best-epoch0002.pt"]
    assert saved["epoch"] == (1 if fault.startswith("after the best file") else 2)
    assert [r["epoch"] for r in saved["extra"]["fid"]] == list(range(1, saved["epoch"] + 1))
    stale = killed.checkpoints / ".best-epoch0003.pt.x1y2.tmp"  # a write the kill cut short
    stale.write_bytes(b"\0" * 100)

    # Killed again at the resumed run's first evaluation: the state it started from is on
    # disk, in agreement (only the best file its checkpoint names, its history as the CSV).
    killed_at_first_fid(monkeypatch, params, killed)
    named = saved["extra"]["fid_best"]["epoch"]
    assert sorted(p.name for p in killed.checkpoints.glob("best-*.pt")) == \
        [f"best-epoch{named:04d}.pt"]
    assert [int(r["epoch"]) for r in rows(killed)] == [r["epoch"] for r in saved["extra"]["fid"]]
    assert not stale.exists() and not killed.best.exists()

    run_stage_here(params, killed)  # the resume
    assert_same_results(straight, killed)
    assert model_file.load(killed.checkpoint)["extra"]["fid_best"]["epoch"] == 4


CHANGED_FID = {"fid_samples": 12, "fid_steps": 6, "fid_sampler": "dpmpp_2m", "fid_eta": 1.0}


@pytest.mark.parametrize("key", sorted(CHANGED_FID))
def test_a_resume_with_other_fid_settings_survives_a_kill_and_chooses_among_like_rows(
        tmp_path, monkeypatch, scripted_fid, capsys, key):
    """Every train.fid_* key may change between runs: the finished run is resumed and scored
    again at its last epoch, and the best is chosen among the new settings' rows. A kill
    during that catch-up evaluation loses nothing: the best file the checkpoint on disk
    names stays until a checkpoint naming another replaces it."""
    monkeypatch.setitem(FIDS, 4, 75.0)  # the first run's best: epoch 2 (60)
    base = {"fid_sampler": "ddim", "fid_steps": 4, "fid_eta": 0.0}
    params, paths = stage_setup(tmp_path, "w", **base)
    run_stage_here(params, paths)
    assert model_file.load(paths.checkpoint)["extra"]["fid_best"]["epoch"] == 2
    changed, _ = stage_setup(tmp_path, "w", **{**base, key: CHANGED_FID[key]})

    killed_at_first_fid(monkeypatch, changed, paths)
    assert "resuming from" in capsys.readouterr().out
    assert model_file.load(paths.checkpoint)["extra"]["fid_best"]["epoch"] == 2
    assert (paths.checkpoints / "best-epoch0002.pt").exists()

    run_stage_here(changed, paths)
    out = capsys.readouterr().out
    assert "resuming from" in out and "the in-training FID settings changed" in out, out
    history = rows(paths)
    assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4, 4]
    column = {"fid_samples": "samples", "fid_steps": "steps", "fid_sampler": "sampler",
              "fid_eta": "eta"}[key]
    before, after = ({yaml.safe_load(r[column]) for r in part} for part in (history[:4],
                                                                             history[4:]))
    assert before == {base.get(key, 8)} and after == {CHANGED_FID[key]}
    selected = model_file.load(paths.best)["selected"]
    assert selected["epoch"] == 4 and selected["fid"] == 75.0  # the only row of its kind
    assert sorted(p.name for p in paths.checkpoints.iterdir()) == ["best-epoch0004.pt",
                                                                   "last.pt"]


def test_a_cuda_checkpoint_resumes_on_a_cpu(tmp_path, scripted_fid, capsys):
    """A CUDA generator's state (16 bytes) cannot be loaded into a CPU generator: the noise
    goes on from a stream seeded by (seed, step), the same for every such resume."""
    params, paths = stage_setup(tmp_path, "w")
    with pytest.MonkeyPatch.context() as patch:
        calls = []

        def killed_at_epoch_3(self, model):
            calls.append(1)
            if len(calls) == 3:
                raise Killed
            return {"fid": 1.0, "kid": 0.0, "count_a": 8}

        patch.setattr(FidEvaluator, "__call__", killed_at_epoch_3)
        with pytest.raises(Killed):
            run_stage_here(params, paths)
    capsys.readouterr()
    saved = model_file.load(paths.checkpoint)
    assert saved["epoch"] == 2
    saved["rng"]["noise"] = torch.arange(16, dtype=torch.uint8)  # as torch.cuda's Philox
    saved["rng"].pop("noise_device", None)  # as checkpoints written before it was recorded
    checkpoint.save(paths.checkpoint, saved)
    results = []
    for _ in range(2):
        checkpoint.save(paths.checkpoint, saved)
        run_stage_here(params, paths)
        out = capsys.readouterr().out
        assert "resuming from" in out and "the checkpoint was written on cuda" in out, out
        results.append(model_file.load(paths.model))
    assert results[0]["step"] == results[1]["step"] == 8
    assert all(torch.equal(results[0]["ema"][k], results[1]["ema"][k]) for k in
               results[0]["ema"])


# ---------------------------------------------------------------- the optimizer, capture


def test_a_resumed_optimizer_runs_this_devices_adam(tmp_path):
    """A checkpoint saved with other Adam flags (as CUDA's fused, capturable Adam saves
    them) resumes on the CPU with the CPU's Adam, and ends as an uninterrupted run."""
    from conftest import Crash, CrashAt
    from ddpm.train.callbacks import Checkpointer
    from ddpm.train.loop import train

    data = torch.randint(0, 256, (8, 3, 16, 16), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)
    diffusion = DiffusionConfig(steps=20)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, warmup_epochs=0, device="cpu",
                      log_every=1, strip_every=0, compile="off", precision="fp32")
    cpu = torch.device("cpu")
    straight = train(data, diffusion, TINY_MODEL, cfg, device=cpu)
    path = tmp_path / "last.pt"
    with pytest.raises(Crash):
        train(data, diffusion, TINY_MODEL, cfg, device=cpu,
              callbacks=(Checkpointer(path, {}, every=1, epochs=2), CrashAt(1)))
    saved = model_file.load(path)
    for group in saved["optimizer"]["param_groups"]:
        group.update(fused=True, capturable=True, foreach=False)
    resumed = train(data, diffusion, TINY_MODEL, cfg, device=cpu, resume=saved)
    live = straight.optimizer.param_groups[0]
    for group in resumed.optimizer.param_groups:
        assert {k: group[k] for k in ("fused", "capturable", "foreach")} == \
            {k: live[k] for k in ("fused", "capturable", "foreach")}
    assert resumed.epochs_done[-1]["variant"].endswith(", Adam")
    for a, b in ((straight.model, resumed.model), (straight.ema.model, resumed.ema.model)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                     b.state_dict().values()))


def test_a_failed_capture_stops_with_one_line(monkeypatch):
    from ddpm.train import step as step_module
    from ddpm.train.step import GRAPH_WARMUP_STEPS, CaptureError, TrainStep, build_state

    class FailingGraph:
        def __init__(self):
            raise RuntimeError("operation not permitted when stream is capturing\nmore text")

    monkeypatch.setattr(step_module.torch.cuda, "CUDAGraph", FailingGraph)
    cfg = TrainConfig(batch_size=4, device="cpu", compile="off", precision="fp32")
    cpu = torch.device("cpu")
    state = build_state(TINY_MODEL, cfg, cpu)
    data = torch.zeros((8, 3, 16, 16), dtype=torch.uint8)
    step = TrainStep(state, data, DiffusionConfig(steps=20), cfg, cpu)
    step.start_epoch(torch.randperm(8))
    step.capture_pending, step.calls = True, GRAPH_WARMUP_STEPS  # as after the warm-up on CUDA
    with pytest.raises(CaptureError) as caught:
        step(1e-4)
    message = str(caught.value)
    assert "\n" not in message and "operation not permitted" in message
    assert message.endswith("set train.cuda_graph: off to train uncaptured")
    assert step.graph is None and state.step == 0

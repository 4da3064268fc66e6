"""Tracking against real MLflow stores: a sqlite file at the repository root, and
an `mlflow server` on loopback that is killed in the middle of a run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
try:
    import ddpm  # noqa: F401
except ImportError:  # not installed into the environment: use the source tree
    sys.path.insert(0, str(ROOT / "src"))

from ddpm import tracking  # noqa: E402
from ddpm.config import MlflowConfig, as_dict  # noqa: E402

mlflow = pytest.importorskip("mlflow")

ENV = ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV",
       "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated store: creating the tables takes seconds, copying it does not."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def repo(tmp_path: Path, empty_db: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository root as DVC gives it to a stage, with the default store in it."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    shutil.copy(empty_db, tmp_path / "mlflow.db")
    return tmp_path


def tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A models/model.pt as the train stage writes it, of conftest's tiny U-Net (16x16)."""
    import torch

    from conftest import TINY_DIFFUSION, TINY_MODEL
    from ddpm.model.unet import UNet

    torch.manual_seed(seed)
    weights = UNet(TINY_MODEL).state_dict()
    payload = {"config": {"model": as_dict(TINY_MODEL), "diffusion": as_dict(TINY_DIFFUSION),
                          "image_size": 16},
               "model": weights, "ema": weights, "epoch": 1, "step": 40}
    with open(path, "wb") as f:
        torch.save(payload, f)
    return path


def png(path: Path, shade: int = 0) -> Path:
    Image.new("RGB", (24, 8), (shade, 80, 160)).save(path)
    return path


def client(uri: str | None = None) -> "mlflow.MlflowClient":
    return mlflow.MlflowClient(uri or tracking.tracking_uri(MlflowConfig()))


def history(c: "mlflow.MlflowClient", run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in c.get_metric_history(run_id, key))


def image_steps(c: "mlflow.MlflowClient", run_id: str, key: str) -> list[int]:
    names = [Path(a.path).name for a in c.list_artifacts(run_id, "images")]
    return sorted(int(n.split("+")[2]) for n in names if n.startswith(f"{key}+step+")
                  and n.endswith(".png"))


# --- where runs go ---------------------------------------------------------------

def test_store_resolution(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = MlflowConfig()
    assert tracking.tracking_uri(default) == f"sqlite:///{repo}/mlflow.db"
    assert tracking.artifact_location(f"sqlite:///{repo}/mlflow.db") == (repo / "mlartifacts").as_uri()
    # A relative sqlite path belongs to the repository, not to DVC's temporary copy.
    monkeypatch.chdir(repo.parent)
    assert tracking.tracking_uri(MlflowConfig(tracking_uri="sqlite:///runs/m.db")) \
        == f"sqlite:///{repo}/runs/m.db"
    assert tracking.tracking_uri(MlflowConfig(tracking_uri="http://h:5000")) == "http://h:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:1")
    assert tracking.tracking_uri(MlflowConfig(tracking_uri="http://h:5000")) == "http://env:1"
    assert tracking.artifact_location("http://env:1") is None
    assert tracking.public_uri("https://me:secret@host:5000/x?token=t") == "https://host:5000/x"


def test_tags_name_the_dvc_experiment(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "lucid-lark")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    assert tracking.run_tags(data_source="synthetic", dataset_hash=None, device="cpu") == {
        "dvc.exp_name": "lucid-lark", "dvc.baseline_rev": "abc123",
        "ddpm.data_source": "synthetic", "ddpm.device": "cpu"}


# --- one run in a sqlite store ---------------------------------------------------

def test_run_logs_params_metrics_images_and_tags(repo: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "lucid-lark")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    strip = png(repo / "strip.png")
    tracker = tracking.Tracker(MlflowConfig(experiment="cars"))
    with tracker.start(run_name="first", tags=tracking.run_tags(device="cpu"),
                       system_metrics=True):
        tracker.log_params({"train.lr": 1e-4, "model.channels": [64, 128]})
        tracker.log_params({"train.lr": 1e-4})  # the same value again: nothing to do
        with pytest.raises(tracking.ParamConflictError, match="train.lr"):
            tracker.log_params({"train.lr": 2e-4})
        for epoch in range(3):
            tracker.log_metrics({"train/loss": 1.0 / (epoch + 1)}, step=epoch)
            tracker.log_image(strip, "reverse_strip", step=epoch)
        tracker.log_artifact(strip, "figures")
        tracker.set_tags({"ddpm.dataset_hash": "d41d8"})
        tracker.write_run_file(repo / "reports" / "mlflow_run.json")
        time.sleep(0.6)  # a few system-metric samples

    c = client()
    run = c.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "first"
    assert run.data.params == {"train.lr": "0.0001", "model.channels": "[64, 128]"}
    assert [(s, v) for s, v, _ in history(c, tracker.run_id, "train/loss")] == \
        [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert image_steps(c, tracker.run_id, "reverse_strip") == [0, 1, 2]
    assert [a.path for a in c.list_artifacts(tracker.run_id, "figures")] == ["figures/strip.png"]
    assert any(key.startswith("system/cpu") for key in run.data.metrics)
    tags = run.data.tags
    assert (tags["dvc.exp_name"], tags["ddpm.device"], tags["ddpm.dataset_hash"]) == \
        ("lucid-lark", "cpu", "d41d8")
    # The store and the artifacts are at the repository root.
    experiment = c.get_experiment(run.info.experiment_id)
    assert experiment.name == "cars"
    assert experiment.artifact_location == (repo / "mlartifacts").as_uri()
    assert (repo / "mlartifacts" / tracker.run_id / "artifacts" / "figures" / "strip.png").exists()
    assert json.loads((repo / "reports" / "mlflow_run.json").read_text()) == {
        "run_id": tracker.run_id, "run_name": "first", "experiment_id": run.info.experiment_id,
        "experiment": "cars", "tracking_uri": f"sqlite:///{repo}/mlflow.db"}
    assert not (repo / tracking.SPOOL_DIR).exists()


def test_resume_continues_the_run_and_errors_mark_it(repo: Path) -> None:
    config = MlflowConfig(experiment="cars")
    tracker = tracking.Tracker(config)
    with pytest.raises(RuntimeError, match="out of memory"):
        with tracker.start(run_name="crashy"):
            tracker.log_params({"train.epochs": 3})
            tracker.log_metrics({"train/loss": 0.9}, step=0)
            raise RuntimeError("out of memory")
    c = client()
    run_id = tracker.run_id
    assert c.get_run(run_id).info.status == "FAILED"

    # Training resumed from its checkpoint continues the same run.
    resumed = tracking.Tracker(config)
    with pytest.raises(KeyboardInterrupt):
        with resumed.start(run_id=run_id):
            resumed.log_params({"train.epochs": 3})
            resumed.log_metrics({"train/loss": 0.5}, step=1)
            raise KeyboardInterrupt
    assert resumed.run_id == run_id
    assert c.get_run(run_id).info.status == "KILLED"

    with tracking.Tracker(config).start(run_id=run_id) as again:
        # What the run holds is checked here, before anything is sent.
        with pytest.raises(tracking.ParamConflictError, match="train.epochs.*'3'.*'4'"):
            again.log_params({"train.epochs": 4})
        again.log_metrics({"train/loss": 0.25}, step=2)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert [(s, v) for s, v, _ in history(c, run_id, "train/loss")] == \
        [(0, 0.9), (1, 0.5), (2, 0.25)]
    assert len(c.search_runs([run.info.experiment_id])) == 1


def test_a_call_mlflow_refuses_is_dropped_with_a_warning(
        repo: Path, capfd: pytest.CaptureFixture) -> None:
    with tracking.Tracker(MlflowConfig(experiment="cars")).start() as tracker:
        tracker.log_image(png(repo / "strip.png"), "no#hash", step=0)  # an invalid key
        tracker.log_image(repo / "missing.png", "strip", step=0)
        tracker.log_metrics({"train/loss": 0.5}, step=0)
    assert client().get_run(tracker.run_id).data.metrics == {"train/loss": 0.5}
    err = capfd.readouterr().err
    assert "refused a image call" in err and "missing.png does not exist" in err
    assert tracker.spool_path is None


def test_disabled_tracking_does_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = MlflowConfig(enabled=False)
    with tracking.Tracker(config).start(system_metrics=True) as tracker:
        tracker.log_params({"train.lr": 1.0})
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.write_run_file(tmp_path / "run.json")
    assert tracker.run_id is None and not tracker.active
    assert tracking.run_for_evaluation(tmp_path / "run.json", {"generate.steps": 1},
                                       tmp_path / "gen.json", config=config) is None
    assert json.loads((tmp_path / "gen.json").read_text())["run_id"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.json", "run.json"]


def test_without_mlflow_tracking_is_a_noop_with_one_warning(tmp_path: Path) -> None:
    script = f"""
import sys
sys.modules["mlflow"] = None  # as if it were not installed
from ddpm.config import MlflowConfig
from ddpm.tracking import Tracker
for _ in range(2):
    with Tracker(MlflowConfig()).start() as t:
        t.log_params({{"a": 1}}); t.log_metrics({{"m": 1.0}}, step=0)
        t.write_run_file({str(tmp_path / "run.json")!r})
from ddpm.tracking import run_for_evaluation
assert run_for_evaluation({str(tmp_path / "run.json")!r}, {{"generate.steps": 1}},
                          {str(tmp_path / "gen.json")!r}, config=MlflowConfig()) is None
"""
    env = {**os.environ, "DVC_ROOT": str(tmp_path),
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("warning: tracking: mlflow is not importable") == 1, done.stderr
    assert json.loads((tmp_path / "run.json").read_text())["run_id"] is None


# --- one run shared by train, generate and evaluate -------------------------------

def train_run(repo: Path, config: MlflowConfig) -> str:
    """What the train stage does: params, a loss history, an image, the run file."""
    with tracking.Tracker(config).start(run_name="train") as tracker:
        tracker.log_params({"train.lr": 1e-4, "train.epochs": 5})
        for epoch in range(5):
            tracker.log_metrics({"train/loss": 1.0 / (epoch + 1), "train/lr": 1e-4}, step=epoch)
        tracker.log_image(png(repo / "strip.png"), "reverse_strip", step=4)
        tracker.write_run_file(repo / "reports" / "mlflow_run.json")
    return tracker.run_id


def test_evaluation_reuses_the_training_run_while_params_agree(repo: Path) -> None:
    config = MlflowConfig(experiment="cars")
    train_id = train_run(repo, config)
    reports = repo / "reports"
    gen = {"generate.steps": 512, "generate.sampler": "ddpm"}
    for _ in range(2):  # a rerun with the same settings lands in the same run
        gen_id = tracking.run_for_evaluation(reports / "mlflow_run.json", gen,
                                             reports / "mlflow_generate_run.json", config=config)
        assert gen_id == train_id
        # Evaluate follows generate's run file and logs FID into that run.
        with tracking.Tracker(config).start_for_evaluation(
                reports / "mlflow_generate_run.json", {"evaluate.kid": True},
                reports / "mlflow_eval_run.json") as tracker:
            tracker.log_metrics({"evaluate/fid": 42.0}, step=0)
        assert tracker.run_id == train_id
    run = client().get_run(train_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.0001", "train.epochs": "5",
                               "generate.steps": "512", "generate.sampler": "ddpm",
                               "evaluate.kid": "True"}
    assert run.data.metrics["evaluate/fid"] == 42.0
    assert json.loads((reports / "mlflow_eval_run.json").read_text())["run_id"] == train_id


def test_changed_evaluation_params_get_a_new_run_with_the_training_history(repo: Path) -> None:
    config = MlflowConfig(experiment="cars")
    train_id = train_run(repo, config)
    reports = repo / "reports"
    tracking.run_for_evaluation(reports / "mlflow_run.json", {"generate.steps": 512},
                                reports / "mlflow_generate_run.json", config=config)
    tracking.run_for_evaluation(reports / "mlflow_generate_run.json", {"evaluate.kid": True},
                                reports / "mlflow_eval_run.json", config=config)
    with tracking.Tracker(config).start(run_id=train_id) as tracker:
        tracker.log_metrics({"evaluate/fid": 42.0}, step=0)
    c = client()
    before = c.get_run(train_id).data
    loss = history(c, train_id, "train/loss")

    # generate.steps changes: generate and evaluate run again, the model does not.
    gen_id = tracking.run_for_evaluation(reports / "mlflow_run.json", {"generate.steps": 50},
                                         reports / "mlflow_generate_run.json", config=config)
    assert gen_id != train_id
    new = c.get_run(gen_id)
    assert new.info.experiment_id == c.get_run(train_id).info.experiment_id
    assert new.info.status == "FINISHED"
    assert new.info.run_name == "train/generate"
    assert new.data.tags["ddpm.train_run_id"] == train_id
    # The training's params and every step of its metrics; nothing of the old
    # generate/evaluate (they were about other samples).
    assert new.data.params == {"train.lr": "0.0001", "train.epochs": "5",
                               "generate.steps": "50"}
    assert history(c, gen_id, "train/loss") == loss
    assert len(history(c, gen_id, "train/lr")) == 5
    assert "evaluate/fid" not in new.data.metrics
    # The run it came from keeps its numbers.
    after = c.get_run(train_id).data
    assert (after.params, after.metrics) == (before.params, before.metrics)
    assert history(c, train_id, "train/loss") == loss
    assert json.loads((reports / "mlflow_generate_run.json").read_text())["run_id"] == gen_id

    # Evaluate follows: same params go into generate's new run, changed ones
    # into one more run that still names the training run.
    same = tracking.run_for_evaluation(reports / "mlflow_generate_run.json",
                                       {"evaluate.kid": True},
                                       reports / "mlflow_eval_run.json", config=config)
    assert same == gen_id
    changed = tracking.run_for_evaluation(reports / "mlflow_generate_run.json",
                                          {"evaluate.kid": False},
                                          reports / "mlflow_eval_run.json", config=config)
    assert changed not in (gen_id, train_id)
    run = c.get_run(changed)
    assert run.data.tags["ddpm.train_run_id"] == train_id
    assert run.data.tags["ddpm.source_run_id"] == gen_id
    assert run.data.params["generate.steps"] == "50"
    assert run.data.params["evaluate.kid"] == "False"
    assert history(c, changed, "train/loss") == loss


# --- an unreachable or slow server -----------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` in its own process group on a loopback port."""

    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port
        self.uri = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> float:
        began = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server",
             "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "server-artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.root, stdout=(self.root / "server.log").open("a"),
            stderr=subprocess.STDOUT, start_new_session=True)
        while time.monotonic() - began < timeout:
            assert self.process.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1):
                    return time.monotonic() - began
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"mlflow server did not answer in {timeout} s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


@pytest.fixture
def server(tmp_path: Path, empty_db: Path):
    root = tmp_path / "server"
    root.mkdir()
    shutil.copy(empty_db, root / "server.db")
    srv = MlflowServer(root, free_port())
    yield srv
    srv.kill()


def test_dead_server_costs_seconds_and_the_spool_replays(
        repo: Path, server: MlflowServer, monkeypatch: pytest.MonkeyPatch,
        capfd: pytest.CaptureFixture) -> None:
    startup = [server.start()]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    strip = png(repo / "strip.png")
    tracker = tracking.Tracker(MlflowConfig(experiment="cars"))
    tracker.start(run_name="through-http")
    tracker.log_params({"train.lr": 1e-4})
    tracker.log_metrics({"train/loss": 1.0}, step=0)
    tracker.log_image(strip, "reverse_strip", step=0)
    tracker.log_artifact(strip, "figures")
    assert tracker.flush(timeout=30)
    c = client(server.uri)
    run_id = tracker.run_id
    assert c.get_run(run_id).data.params == {"train.lr": "0.0001"}
    assert image_steps(c, run_id, "reverse_strip") == [0]
    assert [a.path for a in c.list_artifacts(run_id, "figures")] == ["figures/strip.png"]

    server.kill()
    began = time.monotonic()
    for epoch in range(1, 10):
        tracker.log_metrics({"train/loss": 1.0 / (epoch + 1)}, step=epoch)
    tracker.log_image(strip, "reverse_strip", step=1)
    tracker.set_tags({"ddpm.note": "survived"})
    calls = time.monotonic() - began
    tracker.end()
    total = time.monotonic() - began
    assert calls < 0.5 and total < 5

    err = capfd.readouterr().err
    assert err.count("MLflow is not answering") == 1, err
    spool = tracker.spool_path
    assert spool == repo / tracking.SPOOL_DIR / f"{run_id}.jsonl"
    records = [json.loads(line) for line in spool.read_text().splitlines()]
    assert records[0]["op"] == "run" and records[0]["run_id"] == run_id
    assert sorted(r["step"] for r in records if r["op"] == "metrics") == list(range(1, 10))
    assert {r["op"] for r in records[1:]} == {"metrics", "image", "tags", "end"}

    # Back up (same store, same address): `ddpm tracking replay`.
    startup.append(server.start())
    from ddpm.tools.cli import main

    main(["tracking", "replay"])  # exits non-zero only when a file fails
    with capfd.disabled():
        print(f"\n  mlflow server up in {startup[0]:.1f} s and {startup[1]:.1f} s; during the "
              f"outage 11 calls took {calls * 1000:.1f} ms, with end() {total:.2f} s")
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ddpm.note"] == "survived"
    assert [s for s, _, _ in history(c, run_id, "train/loss")] == list(range(10))
    assert image_steps(c, run_id, "reverse_strip") == [0, 1]
    assert not spool.exists() and spool.with_name(spool.name + ".replayed").exists()


def test_silent_server_is_given_up_on_and_replay_creates_the_run(
        repo: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    # A socket that accepts connections and never answers: a hung server.
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{hung.getsockname()[1]}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # the module keeps what is set
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        began = time.monotonic()
        with tracking.Tracker(MlflowConfig(experiment="cars")).start(
                run_name="offline", tags={"ddpm.device": "cpu"}) as tracker:
            tracker.log_params({"train.lr": 1e-4})
            for epoch in range(3):
                tracker.log_metrics({"train/loss": 1.0 / (epoch + 1)}, step=epoch)
            tracker.write_run_file(repo / "run.json")
        elapsed = time.monotonic() - began
    finally:
        hung.close()
    assert elapsed < 5
    assert capfd.readouterr().err.count("warning: tracking:") == 1
    with capfd.disabled():
        print(f"\n  hung server: the whole run took {elapsed:.2f} s")
    assert json.loads((repo / "run.json").read_text())["run_id"] is None

    # Replayed into a store that works, the run is created there.
    store = f"sqlite:///{repo}/mlflow.db"
    run_id = tracking.replay_spool(tracker.spool_path, tracking_uri=store)
    run = client(store).get_run(run_id)
    assert (run.info.run_name, run.info.status) == ("offline", "FINISHED")
    assert run.data.params == {"train.lr": "0.0001"}
    assert run.data.tags["ddpm.device"] == "cpu"
    assert [s for s, _, _ in history(client(store), run_id, "train/loss")] == [0, 1, 2]


# --- a spool sent exactly once ----------------------------------------------------

SAMPLING = {"num_samples": 2, "seed": 0, "sampler": "ddim", "steps": 2, "eta": 0.0,
            "clip": True, "batch_size": 8, "max_samples": 8, "max_work": 64, "device": "cpu"}


@pytest.fixture(scope="module")
def spooled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The spool of a training whose store was down from its start (a header without a run
    id), holding every kind of record, a registered model among them; then a retrain
    rewrote the weights the model record named. Returns the spool file and the EMA weights
    the model had when it was spooled."""
    import torch

    root = tmp_path_factory.mktemp("spooled")
    with pytest.MonkeyPatch.context() as env:
        for name in ENV:
            env.delenv(name, raising=False)
        env.setenv("DVC_ROOT", str(root))
        env.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
        env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        checkpoint = tiny_checkpoint(root / "model.pt")
        strip = png(root / "strip.png")
        with tracking.Tracker(MlflowConfig(experiment="cars")).start(
                run_name="offline", tags={"ddpm.device": "cpu"}) as tracker:
            tracker.log_params({"train.lr": 1e-4})
            for step in range(3):
                tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
            for step in range(2):
                tracker.log_image(strip, "reverse_strip", step=step)
            tracker.log_artifact(strip, "figures")
            tracker.log_dataset(tracking.dataset_op("cars", "synthetic:x", "ab" * 32,
                                                    "training", {}))
            tracker.log_model("final", checkpoint, 2, SAMPLING, register="cars")
    ema = torch.load(checkpoint, weights_only=True)["ema"]
    tiny_checkpoint(checkpoint, seed=1)  # a retrain before anyone replays
    return tracker.spool_path, ema


def copy_spool(spooled: tuple[Path, dict], repo: Path) -> Path:
    """The spool in this test's repository, its kept files there too."""
    spool, _ = spooled
    folder = repo / tracking.SPOOL_DIR
    shutil.copytree(spool.parent, folder)
    copy = folder / spool.name
    copy.write_text(copy.read_text().replace(str(spool.parent), str(folder)))
    return copy


def store(repo: Path) -> str:
    return f"sqlite:///{repo}/mlflow.db"


def assert_sent_once(repo: Path) -> str:
    """Every record of the spool in the store, each once; returns the run id."""
    c = client(store(repo))
    experiment = c.get_experiment_by_name("cars")
    (run,) = c.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert (run.info.run_name, run.info.status) == ("offline", "FINISHED")
    assert run.data.params == {"train.lr": "0.0001"} and run.data.tags["ddpm.device"] == "cpu"
    assert [s for s, _, _ in history(c, run_id, "train/loss")] == [0, 1, 2]
    assert image_steps(c, run_id, "reverse_strip") == [0, 1]
    assert [a.path for a in c.list_artifacts(run_id, "figures")] == ["figures/strip.png"]
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["cars"]
    (model,) = c.search_logged_models([experiment.experiment_id])
    assert str(model.status) == "READY" and run.data.tags["ddpm.model_id"] == model.model_id
    (version,) = c.search_model_versions("name = 'cars'")
    assert version.source == f"models:/{model.model_id}" and version.run_id == run_id
    return run_id


def test_a_spooled_model_is_logged_as_it_was_when_spooled(
        repo: Path, spooled: tuple[Path, dict]) -> None:
    """A retrain between spool and replay (or a queued experiment's copy deleted) must not
    change or lose the model: the spool keeps its own copy of the EMA weights."""
    import torch

    run_id = tracking.replay_spool(copy_spool(spooled, repo), tracking_uri=store(repo))
    assert assert_sent_once(repo) == run_id
    model_id = client(store(repo)).get_run(run_id).data.tags["ddpm.model_id"]
    local = mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(repo / "m"))
    (logged,) = Path(local, "artifacts").glob("*.pt")
    weights = torch.load(logged, weights_only=True)["ema"]
    _, spooled_ema = spooled
    assert all(torch.equal(weights[key], spooled_ema[key]) for key in spooled_ema)


def test_a_record_whose_file_is_gone_is_kept_not_counted_as_sent(
        repo: Path, spooled: tuple[Path, dict]) -> None:
    spool = copy_spool(spooled, repo)
    (weights,) = [Path(r["checkpoint"]) for r in map(json.loads, spool.read_text().splitlines())
                  if r["op"] == "model"]
    aside = weights.rename(repo / "aside.pt")
    with pytest.raises(tracking.TrackingError) as err:
        tracking.replay_spool(spool, tracking_uri=store(repo))
    assert str(err.value) == (f"9 of 10 calls sent; 1 not: their files are gone ({weights}); "
                              f"the spool file is kept: put them back and replay again, or "
                              f"delete it to give them up")
    assert tracking.spool_files(spool.parent) == [spool]  # kept for the next replay
    c = client(store(repo))
    (run,) = c.search_runs([c.get_experiment_by_name("cars").experiment_id])
    assert "ddpm.model_id" not in run.data.tags
    aside.rename(weights)  # put back: the next replay sends the model, and nothing twice
    tracking.replay_spool(spool, tracking_uri=store(repo))
    assert_sent_once(repo)


def fail_once_after(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
    """`owner.name` does its work, then, the first time, fails as a lost reply would."""
    real, failed = getattr(owner, name), []

    def once(*args, **kwargs):
        result = real(*args, **kwargs)
        if not failed:
            failed.append(name)
            raise ConnectionError(f"injected: the reply to {name} was lost")
        return result

    monkeypatch.setattr(owner, name, once)


@pytest.mark.parametrize("fault", ["create_run", "Model.log", "register_model", "log_image"])
def test_a_replay_that_failed_anywhere_is_resent_exactly_once(
        repo: Path, spooled: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch,
        fault: str) -> None:
    from mlflow.models import Model

    owner = {"create_run": mlflow.MlflowClient, "Model.log": Model,
             "register_model": mlflow, "log_image": mlflow.MlflowClient}[fault]
    spool = copy_spool(spooled, repo)
    with monkeypatch.context() as patch:
        fail_once_after(patch, owner, fault.split(".")[-1])
        with pytest.raises(tracking.TrackingError, match="injected"):
            tracking.replay_spool(spool, tracking_uri=store(repo))
    tracking.replay_spool(spool, tracking_uri=store(repo))
    assert_sent_once(repo)


def test_a_replay_stopped_by_ctrl_c_resends_nothing(
        repo: Path, spooled: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    from ddpm.tracking import spool as spool_module

    spool, real = copy_spool(spooled, repo), spool_module._apply

    def interrupted(client, run_id, op):
        real(client, run_id, op)
        if op["op"] == "model":  # sent, and Ctrl-C before it is noted
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(spool_module, "_apply", interrupted)
        with pytest.raises(KeyboardInterrupt):
            tracking.replay_spool(spool, tracking_uri=store(repo))
    run_id = tracking.replay_spool(spool, tracking_uri=store(repo))
    assert assert_sent_once(repo) == run_id
    # Replayed again from a copy taken before (killed before the rename): nothing more.
    assert tracking.replay_spool(copy_spool(spooled, repo / "again"),
                                 tracking_uri=store(repo)) == run_id
    assert_sent_once(repo)


def test_two_replays_at_once_send_everything_once(
        repo: Path, spooled: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    """After its first call the first replay starts a second one and waits until that one
    waits for the lock (without a lock: until it has sent the whole file); then both end."""
    import threading

    from ddpm.tracking import spool as spool_module

    spool = copy_spool(spooled, repo)
    real_apply, real_note = spool_module._apply, getattr(spool_module, "_note", print)
    first, second_went, returned = threading.current_thread(), threading.Event(), []

    def second() -> None:
        try:
            returned.append(tracking.replay_spool(spool, tracking_uri=store(repo)))
        finally:
            second_went.set()

    thread = threading.Thread(target=second)

    def apply(client, run_id, op):
        real_apply(client, run_id, op)
        if threading.current_thread() is first and thread.ident is None:
            thread.start()
            assert second_went.wait(120)

    def note(message):  # (raising=False: no _note in the code before the lock, to compare)
        real_note(message)
        if "is being replayed by another process" in message:
            second_went.set()

    monkeypatch.setattr(spool_module, "_apply", apply)
    monkeypatch.setattr(spool_module, "_note", note, raising=False)
    run_id = tracking.replay_spool(spool, tracking_uri=store(repo))
    thread.join(120)
    assert returned == [run_id]
    assert assert_sent_once(repo) == run_id

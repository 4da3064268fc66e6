"""The local sqlite store when several processes open it at once, and when it was left
half-migrated: created once under a lock, repaired when that is safe, else one line
saying what to do, and the spool replayed after doing it."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
try:
    import ddpm  # noqa: F401
except ImportError:  # not installed into the environment: use the source tree
    sys.path.insert(0, str(ROOT / "src"))

from ddpm import tracking  # noqa: E402
from ddpm.config import MlflowConfig  # noqa: E402
from conftest import dvc, make_dvc_project  # noqa: E402
from test_end_to_end import TINY_PIPELINE  # noqa: E402

mlflow = pytest.importorskip("mlflow")

ENV = ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")
OLD_REVISION = "867495a8f9d4"  # "add trace tables", MLflow 2.14's schema
RUN_ID = "a" * 32


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository root as DVC gives it to a stage, with no store yet."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def subprocess_env(root: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ENV}
    return {**env, "DVC_ROOT": str(root),
            "PYTHONPATH": str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")}


def tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as con:
        return {name for (name,) in con.execute("SELECT name FROM sqlite_master "
                                                "WHERE type = 'table'")}


def version(db: Path) -> str:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT version_num FROM alembic_version").fetchone()[0]


def dump(db: Path) -> list[str]:
    """The store's schema and rows as SQL."""
    con = sqlite3.connect(db)
    try:
        return list(con.iterdump())
    finally:
        con.close()


def head() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


# --- several processes, one new store ---------------------------------------------

OPEN_TOGETHER = """
import sys, time
from pathlib import Path
import mlflow, mlflow.store.db.utils  # the slow imports, before the start line
from ddpm.config import MlflowConfig
from ddpm.tracking import Tracker, sqlite

name, folder, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
inside, make_ready = folder.parent / "inside", sqlite._make_ready

def watched(db):
    # Each process stays a second in the creation, and notes who else is in it meanwhile:
    # under the lock nobody, every time; without it the others, every time (they start
    # together), and MLflow's migrations race in all of them.
    me = inside / name
    me.touch()
    time.sleep(1.0)
    (folder.parent / f"overlap-{name}").write_text(" ".join(
        p.name for p in inside.iterdir() if p != me))
    me.unlink()
    make_ready(db)

sqlite._make_ready = watched
(folder / name).touch()
while len(list(folder.iterdir())) < count:  # all of them open the new store at once
    time.sleep(0.001)
with Tracker(MlflowConfig(experiment="cars")).start(run_name=name) as tracker:
    tracker.log_params({"train.seed": name})
    for step in range(20):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
"""


def test_processes_opening_a_new_store_at_once_all_log_their_runs(root: Path) -> None:
    """Without the creation lock MLflow migrates a new file in every process at once
    (two of three trials broke the store, see ddpm.tracking.sqlite)."""
    barrier = root / "barrier"
    barrier.mkdir()
    (root / "inside").mkdir()
    names = ["seed-1", "seed-2", "seed-3"]
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_TOGETHER, name, str(barrier),
                               str(len(names))], cwd=root, env=subprocess_env(root),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in names]
    errs = [proc.communicate(timeout=180)[1] for proc in procs]
    # One process at a time made the new store ready (the others waited for mlflow.db.lock).
    assert {name: (root / f"overlap-{name}").read_text() for name in names} == \
        {name: "" for name in names}
    assert [proc.returncode for proc in procs] == [0, 0, 0], errs
    assert not any("warning: tracking" in err for err in errs), errs

    db = root / "mlflow.db"
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("cars")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == names
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params == {"train.seed": run.info.run_name}
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 20
    assert not (root / tracking.SPOOL_DIR).exists()
    assert version(db) == head() and not any(t.startswith("_alembic_tmp_") for t in tables(db))
    assert (root / "mlflow.db.lock").exists()
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# --- stores left half-migrated ---------------------------------------------------

def old_store(db: Path, revision: str = OLD_REVISION, leftover: str | None = None) -> Path:
    """A store an older MLflow made (schema `revision`) holding one finished run with a
    param and a loss, and optionally an empty `_alembic_tmp_<leftover>`, as a migration
    that stopped after its first step leaves it."""
    import sqlalchemy
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config
    from mlflow.store.tracking.dbmodels.initial_models import Base

    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    Base.metadata.create_all(engine)
    config = _get_alembic_config(str(engine.url))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    engine.dispose()
    with sqlite3.connect(db) as con:
        con.execute("INSERT INTO experiments (experiment_id, name, artifact_location, "
                    "lifecycle_stage) VALUES (1, 'cars', ?, 'active')",
                    ((db.parent / "mlartifacts").as_uri(),))
        con.execute("INSERT INTO runs (run_uuid, name, status, start_time, end_time, "
                    "lifecycle_stage, artifact_uri, experiment_id, user_id, source_type, "
                    "source_name, entry_point_name, source_version) VALUES (?, 'old', "
                    "'FINISHED', 1, 2, 'active', '', 1, 'me', 'LOCAL', '', '', '')", (RUN_ID,))
        con.execute("INSERT INTO params VALUES ('train.lr', '0.0001', ?)", (RUN_ID,))
        for table in ("metrics", "latest_metrics"):
            columns = "key, value, timestamp, run_uuid, step, is_nan"
            con.execute(f"INSERT INTO {table} ({columns}) VALUES ('train/loss', 0.5, 1, ?, 3, 0)",
                        (RUN_ID,))
        if leftover:
            con.execute(f"CREATE TABLE _alembic_tmp_{leftover} AS SELECT * FROM {leftover} "
                        f"WHERE 0")
    return db


def log_a_run(name: str) -> tracking.Tracker:
    with tracking.Tracker(MlflowConfig(experiment="cars")).start(run_name=name) as tracker:
        tracker.log_params({"train.seed": 7})
        tracker.log_metrics({"train/loss": 0.25}, step=0)
        tracker.log_metrics({"train/loss": 0.125}, step=1)
    return tracker


def test_a_store_left_half_migrated_by_an_older_mlflow_is_repaired(
        root: Path, capfd: pytest.CaptureFixture) -> None:
    db = old_store(root / "mlflow.db", leftover="latest_metrics")
    tracker = log_a_run("after-repair")

    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "tracking:" in line]
    assert len(lines) == 1 and f"repaired {db}" in lines[0], err
    assert "SELECT" not in err and "CREATE" not in err and "Traceback" not in err
    (backup,) = root.glob("mlflow.db.*.bak")
    assert backup.name in lines[0]
    assert version(backup) == OLD_REVISION and "_alembic_tmp_latest_metrics" in tables(backup)
    assert version(db) == head() and "_alembic_tmp_latest_metrics" not in tables(db)

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    old = client.get_run(RUN_ID)  # the older MLflow's run, migrated with its numbers
    assert (old.info.run_name, old.info.status) == ("old", "FINISHED")
    assert old.data.params == {"train.lr": "0.0001"} and old.data.metrics == {"train/loss": 0.5}
    new = client.get_run(tracker.run_id)
    assert new.info.status == "FINISHED" and new.info.experiment_id == "1"
    assert [m.value for m in client.get_metric_history(tracker.run_id, "train/loss")] \
        == [0.25, 0.125]
    assert tracker.spool_path is None


def test_a_store_a_race_left_empty_is_made_anew(root: Path, capfd: pytest.CaptureFixture) -> None:
    # What three stages migrating one new file at once left (seen 2026-12-02): two
    # revisions behind, a leftover copy, and no run in it.
    db = root / "mlflow.db"
    old_store(db, "4465047574b1", leftover="tags")
    with sqlite3.connect(db) as con:
        for table in ("params", "metrics", "latest_metrics", "runs", "experiments"):
            con.execute(f"DELETE FROM {table}")
    tracker = log_a_run("fresh")
    err = capfd.readouterr().err
    assert err.count("warning: tracking:") == 1 and "held no runs: made it anew" in err, err
    assert not list(root.glob("*.bak"))
    run = mlflow.MlflowClient(f"sqlite:///{db}").get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"train/loss": 0.125}


def orphan_copy(db: Path) -> str:
    """Killed between alembic's DROP TABLE runs and the RENAME of its copy: the runs are
    only in `_alembic_tmp_runs`."""
    old_store(db, leftover="runs")
    with sqlite3.connect(db) as con:
        con.execute("PRAGMA foreign_keys = OFF")
        con.execute("INSERT INTO _alembic_tmp_runs SELECT * FROM runs")
        con.execute("DROP TABLE runs")
    return "_alembic_tmp_runs holds 1 rows that runs lacks"


def failing_migration(db: Path) -> str:
    """Half-migrated, and the recorded revision is behind what the tables hold: its next
    migration fails."""
    old_store(db, "89d4b8295536", leftover="tags")  # the next creates the registry's tables
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE registered_models (name VARCHAR(256) PRIMARY KEY)")
    return ("could not be repaired ((sqlite3.OperationalError) table registered_models "
            "already exists)")


def newer_schema(db: Path) -> str:
    old_store(db)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = 'f00dfeedbeef'")
    return "has schema f00dfeedbeef, which MLflow's migrations do not know"


@pytest.mark.parametrize("break_it", [orphan_copy, failing_migration, newer_schema])
def test_a_store_that_cannot_be_repaired_is_left_alone_with_one_line(
        root: Path, capfd: pytest.CaptureFixture, break_it) -> None:
    db = root / "mlflow.db"
    reason = break_it(db)
    before = dump(db)
    tracker = log_a_run("spooled")
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: tracking: cannot open a run"), err
    assert reason in err and str(db) in err
    assert "ddpm tracking replay" in err and "mlflow.db.broken" in err
    assert dump(db) == before and not list(root.glob("*.bak"))
    assert tracker.spool_path.exists()


def test_an_intact_store_of_an_older_mlflow_is_refused_naming_mlflow_db_upgrade(
        root: Path, capfd: pytest.CaptureFixture) -> None:
    """As MLflow does: someone's older `mlflow ui` may still use it, and could not after."""
    db = old_store(root / "mlflow.db")
    before = dump(db)
    tracker = log_a_run("spooled")
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "holds runs in an older MLflow's schema" in err, err
    assert f"mlflow db upgrade sqlite:///{db}" in err and ".backup mlflow.db.bak" in err
    assert dump(db) == before and not list(root.glob("*.bak"))
    assert tracker.spool_path.exists()


HOLD_OPEN = """
import sqlite3, sys, time
con = sqlite3.connect(sys.argv[1])
con.execute("SELECT count(*) FROM sqlite_master").fetchall()  # as an idle `mlflow ui` holds it
print("open", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("state", ["half-created", "half-migrated"])
def test_a_store_another_process_has_open_is_neither_made_anew_nor_repaired(
        root: Path, capfd: pytest.CaptureFixture, state: str) -> None:
    db = root / "mlflow.db"
    if state == "half-created":  # what a race on a new file left, no runs: made anew if free
        old_store(db, "4465047574b1", leftover="tags")
        with sqlite3.connect(db) as con:
            for table in ("params", "metrics", "latest_metrics", "runs", "experiments"):
                con.execute(f"DELETE FROM {table}")
    else:  # repaired if free; a failed repair would put its backup over the file
        old_store(db, leftover="latest_metrics")
    before = dump(db)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_OPEN, str(db)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        tracker = log_a_run("spooled")
    finally:
        holder.kill()
        holder.wait()
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and f"process {holder.pid} (python" in err, err
    assert "has it open (an `mlflow ui` or `mlflow server`?); it is unchanged" in err
    assert dump(db) == before and not list(root.glob("*.bak"))
    assert tracker.spool_path.exists()
    if state == "half-created":
        log_a_run("after")  # the holder gone, the store is made anew
        assert version(db) == head()


def test_the_private_mlflow_names_this_code_uses_are_still_there() -> None:
    """Fails loudly on an MLflow upgrade: what ddpm.tracking uses beyond MLflow's public API.
    Check each still does what the code expects, then move the pin."""
    import mlflow.store.db.utils as db_utils
    from mlflow.db import upgrade  # `mlflow db upgrade`, called in-process
    from mlflow.store.db.base_sql_model import Base
    from mlflow.types.schema import AnyType

    assert mlflow.__version__ == "3.17.2", "MLflow changed: check the names below, then pin it"
    assert callable(db_utils._get_alembic_config)  # sqlite.py: the head revision
    assert callable(upgrade.callback) and Base.metadata.tables and AnyType
    # models._fluent_store: set_tracking_uri(None) unsets the fluent store and its variable.
    env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        mlflow.set_tracking_uri("sqlite:///elsewhere.db")
        assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"
        mlflow.set_tracking_uri(None)
        assert "MLFLOW_TRACKING_URI" not in os.environ
        assert mlflow.get_tracking_uri() != "sqlite:///elsewhere.db"
    finally:
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def test_recovery_from_a_broken_store_by_the_documented_steps(root: Path) -> None:
    """The documented steps (docs/tracking.md): move the file aside, `ddpm tracking replay` (the command itself)."""
    db = root / "mlflow.db"
    orphan_copy(db)
    names = ["generate", "train"]
    for name in names:
        log_a_run(name)
    spools = tracking.spool_files()
    assert len(spools) == 2

    def replay() -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).parent / "ddpm"), "tracking", "replay"],
                              cwd=root, env=subprocess_env(root), capture_output=True,
                              text=True, timeout=120)

    broken = replay()
    assert broken.returncode == 1
    lines = broken.stderr.splitlines()
    assert len(lines) == 2, broken.stderr  # one per spool file, no SQL, no traceback
    for line, spool in zip(lines, spools):
        assert line.startswith(f"error: {spool}: TrackingError: {db} was left half-migrated")
    assert tracking.spool_files() == spools

    db.rename(root / "mlflow.db.broken")
    done = replay()
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("replayed into run") == 2
    assert tracking.spool_files() == []
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([client.get_experiment_by_name("cars").experiment_id])
    assert sorted(r.info.run_name for r in runs) == names
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params == {"train.seed": "7"}
        assert [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")] \
            == [0.25, 0.125]
    assert json.loads(spools[0].with_name(spools[0].name + ".replayed").read_text()
                      .splitlines()[0])["op"] == "run"


def test_a_failing_sql_statement_is_one_line_and_the_call_is_spooled(
        root: Path, capfd: pytest.CaptureFixture) -> None:
    """MLflow logs a failed sqlite session with its statement and a traceback."""
    with tracking.Tracker(MlflowConfig(experiment="cars")).start(run_name="x") as tracker:
        tracker.log_metrics({"train/loss": 1.0}, step=0)
        assert tracker.flush(timeout=30)
        with sqlite3.connect(root / "mlflow.db") as con:
            con.execute("ALTER TABLE latest_metrics RENAME TO gone")
        tracker.log_metrics({"train/loss": 0.5}, step=1)
    err = capfd.readouterr().err
    assert "no such table: latest_metrics" in err, err
    assert "[SQL:" not in err and "Traceback" not in err and "INSERT" not in err, err
    assert all(len(line) < 600 for line in err.splitlines())
    records = [json.loads(line) for line in tracker.spool_path.read_text().splitlines()]
    assert [r["op"] for r in records] == ["run", "metrics", "end"]


# --- queued DVC experiments -------------------------------------------------------

def queue_and_wait(root: Path, *experiments: list[str], jobs: int = 1) -> None:
    """`dvc exp run --queue` each experiment's arguments, `dvc queue start -j jobs`, wait."""
    for args in experiments:
        dvc("exp", "run", "--queue", *args, cwd=root)
    # One thread per job, as docs/experiments.md advises: jobs of as many threads as the
    # machine has cores oversubscribe it.
    dvc("queue", "start", "-j", str(jobs), cwd=root, threads=1 if jobs > 1 else None)
    deadline = time.time() + 600
    while time.time() < deadline:
        status = dvc("queue", "status", cwd=root).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    dvc("queue", "stop", cwd=root, check=False)
    assert status.count("Success") == len(experiments) and "Failed" not in status, status


def pipeline_runs(uri: str) -> tuple["mlflow.MlflowClient", dict[str, object]]:
    """The client, and the experiment's runs by DVC experiment name (None: the workspace)."""
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("ddpm-cars")
    runs = client.search_runs([experiment.experiment_id])
    by_name = {run.data.tags.get("dvc.exp_name"): run for run in runs}
    # One run per experiment: a stage that could not open its run makes a second one.
    assert len(by_name) == len(runs), [(r.data.tags.get("dvc.exp_name"), r.info.run_name,
                                        r.info.status) for r in runs]
    return client, by_name


def assert_complete(client: "mlflow.MlflowClient", run) -> None:
    """A whole pipeline's run: params, a loss curve, in-training FID, the final scores."""
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert {"train.seed", "train.epochs", "generate.steps", "evaluate.kid"} <= set(params)
    assert client.get_metric_history(run.info.run_id, "train/loss")
    assert client.get_metric_history(run.info.run_id, "train/fid")
    assert {"evaluate/fid", "evaluate/kid"} <= set(run.data.metrics)
    # Its model is logged in the same store, scored, and registered from its training run.
    trained_in = run.data.tags.get("ddpm.train_run_id", run.info.run_id)
    model = client.get_logged_model(run.data.tags["ddpm.model_id"])
    assert str(model.status) == "READY" and model.source_run_id == trained_in
    assert {"train/fid", "evaluate/fid"} <= {m.key for m in model.metrics}
    versions = client.search_model_versions(f"run_id = '{trained_in}'")
    assert [v.name for v in versions] == ["ddpm-stanford-cars"]


def git_commit(root: Path, message: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", message]):
        subprocess.run(cmd, cwd=root, check=True, env=env, capture_output=True)


# The end-to-end pipeline, smaller still: one epoch (one in-training FID), 8 samples. The
# DVC tests run it up to `evaluate`: every stage that logs what the issue asks for.
QUICK = {**TINY_PIPELINE,
         "train": {**TINY_PIPELINE["train"], "epochs": 1, "fid_samples": 4},
         "generate": {**TINY_PIPELINE["generate"], "num_samples": 8, "batch_size": 8,
                      "grid_size": 4},
         "evaluate": {**TINY_PIPELINE["evaluate"], "kid_subset_size": 4, "kid_subsets": 2,
                      "batch_size": 8}}


def test_queued_experiments_at_once_on_a_fresh_clone(tmp_path: Path) -> None:
    root = make_dvc_project(tmp_path / "fresh", QUICK)
    # The data, as a clone's `dvc pull` would bring it, so that the two trainings start
    # (and open the new store) together. No stage before train talks to MLflow. (Two, not
    # three: the race on the new store is test_processes_opening_a_new_store_at_once's,
    # made deterministic there; here the whole queue must land in one store.)
    dvc("repro", "reference", cwd=root)
    git_commit(root, "data")
    assert not (root / "mlflow.db").exists()
    seeds = (1, 2)
    queue_and_wait(root, *[["-n", f"seed-{s}", "-S", f"train.seed={s}", "evaluate"]
                           for s in seeds], jobs=2)

    client, by_name = pipeline_runs(f"sqlite:///{root / 'mlflow.db'}")
    assert set(by_name) == {f"seed-{s}" for s in seeds}
    for seed in seeds:
        run = by_name[f"seed-{seed}"]
        assert_complete(client, run)
        assert run.data.params["train.seed"] == str(seed)
        assert run.data.tags.get("dvc.baseline_rev")
    # Scored alike while they evaluated at once: the champion is the lower FID of the two.
    fids = {version.version: run.data.metrics["evaluate/fid"] for run in by_name.values()
            for version in client.search_model_versions(f"run_id = '{run.info.run_id}'")}
    assert len(fids) == 2
    assert str(client.get_registered_model("ddpm-stanford-cars").aliases["champion"]) == \
        str(min(fids, key=fids.get))
    assert not list((root / tracking.SPOOL_DIR).glob("*.jsonl"))
    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db"))  # none in the copies
    assert all(f"seed-{s}" in dvc("exp", "show", "--csv", cwd=root).stdout for s in seeds)


def test_a_shared_tracking_server_gets_the_pipeline_and_a_queued_experiment(
        tmp_path: Path) -> None:
    from test_tracking import MlflowServer, free_port

    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server", free_port())  # sqlite behind `mlflow server`
    server.start()
    try:
        pipeline = {**QUICK, "mlflow": {"tracking_uri": server.uri}}
        root = make_dvc_project(tmp_path / "team", pipeline)
        dvc("repro", "evaluate", cwd=root)
        git_commit(root, "results")  # the queued experiment starts from them
        queue_and_wait(root, ["-n", "shared", "-S", "generate.steps=3", "evaluate"])

        client, by_name = pipeline_runs(server.uri)
        assert set(by_name) == {None, "shared"}
        first, queued = by_name[None], by_name["shared"]
        assert_complete(client, first)
        assert_complete(client, queued)
        # generate.* changed: the queued experiment reused the model and got its own run.
        assert queued.data.tags["ddpm.train_run_id"] == first.info.run_id
        assert (first.data.params["generate.steps"], queued.data.params["generate.steps"]) \
            == ("5", "3")
        artifacts = {a.path for a in client.list_artifacts(first.info.run_id)}
        assert "figures" in artifacts
        # The queued experiment reused the model: one logged, one registered version.
        assert queued.data.tags["ddpm.model_id"] == first.data.tags["ddpm.model_id"]
        assert len(client.search_model_versions("name = 'ddpm-stanford-cars'")) == 1
        assert list((tmp_path / "server" / "server-artifacts").rglob("samples.png"))
        assert not (root / "mlflow.db").exists() and not (root / tracking.SPOOL_DIR).exists()
    finally:
        server.kill()

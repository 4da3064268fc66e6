"""The whole pipeline through `dvc repro` on tiny synthetic data, with MLflow tracking."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import dvc, make_dvc_project, tiny

# The in-training FID samples as the generate stage does (sampler, steps, eta, count, and
# generate.seed = train.seed), so its last score is the evaluate stage's. The model
# predicts v with min-SNR weighting: every stage reads its output through the model file.
TINY_PIPELINE = tiny(
    data={"source": "synthetic", "synthetic_count": 40},
    diffusion={"prediction": "v"},
    train={"epochs": 2, "batch_size": 8, "log_every": 2, "warmup_epochs": 1, "seed": 42,
           "fid_every": 1, "fid_samples": 24, "fid_sampler": "ddim", "fid_steps": 5,
           "fid_eta": 0.0, "loss_weighting": "min_snr"},
    generate={"num_samples": 24, "sampler": "ddim", "steps": 5, "eta": 0.0, "batch_size": 12,
              "grid_size": 16, "seed": 42},
    evaluate={"kid_subset_size": 10, "kid_subsets": 5, "batch_size": 24},
)


def runs(root):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ddpm-cars")
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def set_param(root, section, key, value):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    root = make_dvc_project(base / "p", TINY_PIPELINE)
    dvc("repro", cwd=root)
    # The first run's results, before later tests change params and rerun stages.
    (base / "first").mkdir()
    for rel in ("reports/eval.json", "reports/train_fid.csv"):
        shutil.copy(root / rel, base / "first" / Path(rel).name)
    return root


def first(project, name):
    return project.parent / "first" / name


def test_the_last_in_training_fid_is_the_evaluate_score(project):
    """The same sampler, steps, eta, count and seed: the curve's last point and the final
    score are one measurement (their batch sizes differ: 24 and 12)."""
    import csv

    rows = list(csv.DictReader(first(project, "train_fid.csv").open()))
    final = json.loads(first(project, "eval.json").read_text())
    assert int(rows[-1]["samples"]) == final["num_samples"] == 24
    assert (rows[-1]["sampler"], rows[-1]["steps"]) == ("ddim", "5")
    assert float(rows[-1]["fid"]) == pytest.approx(final["fid"], abs=1e-3)


def test_the_sweep_scores_each_point_plots_them_and_logs_them(project):
    import csv

    rows = list(csv.DictReader((project / "reports" / "sweep.csv").open()))
    assert [(r["curve"], int(r["evaluations"])) for r in rows] == [("ddim", 4), ("dpmpp_2m", 4)]
    assert all(np.isfinite(float(r["fid"])) and int(r["samples"]) == 8 for r in rows)
    plots = json.loads(dvc("plots", "show", "--json", cwd=project).stdout)
    (sweep_plot,) = plots["data"]["reports/sweep.csv"]
    assert sweep_plot["content"]["encoding"]["color"]["field"] == "curve"
    assert {d["curve"] for d in sweep_plot["content"]["data"]["values"]} == {"ddim", "dpmpp_2m"}
    client, (run,) = runs(project)
    for curve, row in zip(("ddim", "dpmpp_2m"), rows):
        (metric,) = client.get_metric_history(run.info.run_id, f"sweep/{curve}/fid")
        assert metric.step == 4 and metric.value == pytest.approx(float(row["fid"]), rel=1e-5)


def test_repro_produces_every_output(project):
    for rel in ("models/model.pt", "models/best.pt", "models/checkpoints/last.pt",
                "reports/sweep.csv",
                "reports/train.json", "reports/train_fid.csv",
                "reports/train_loss.csv", "reports/figures/samples.png", "reports/figures/forward.png",
                "reports/figures/reverse.png", "reports/figures/reverse.gif", "reports/eval.json",
                "data/reference/stats.npz", "data/generated/samples.npy"):
        assert (project / rel).exists(), rel
    result = json.loads((project / "reports" / "eval.json").read_text())
    assert np.isfinite(result["fid"]) and np.isfinite(result["kid"]) and result["num_samples"] == 24
    metrics = dvc("metrics", "show", cwd=project).stdout
    assert "fid" in metrics and "final_loss" in metrics
    import torch

    for rel in ("models/model.pt", "models/best.pt"):
        config = torch.load(project / rel, weights_only=True)["config"]
        assert config["diffusion"]["prediction"] == "v", rel
        assert config["train"]["loss_weighting"] == "min_snr", rel
    report = json.loads((project / "reports" / "train.json").read_text())
    assert len(report["final_x0_error_by_t_quartile"]) == 4
    assert all(np.isfinite(report["final_x0_error_by_t_quartile"]))
    plots = dvc("plots", "show", "--json", cwd=project).stdout
    assert "train_loss.csv" in plots and "train_fid.csv" in plots


def test_the_fid_curve_has_a_finite_row_per_epoch_in_the_csv_the_report_and_mlflow(project):
    import csv

    rows = list(csv.DictReader((project / "reports" / "train_fid.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]  # train.fid_every: 1
    assert all(np.isfinite(float(r["fid"])) and np.isfinite(float(r["kid"])) for r in rows)
    assert all(int(r["samples"]) == 24 for r in rows)
    assert float(rows[0]["seconds"]) < float(rows[1]["seconds"])
    report = json.loads((project / "reports" / "train.json").read_text())
    best = min(rows, key=lambda r: float(r["fid"]))
    assert report["best_epoch"] == int(best["epoch"])
    assert report["best_fid"] == pytest.approx(float(best["fid"]), rel=1e-5)
    client, (run,) = runs(project)
    fids = client.get_metric_history(run.info.run_id, "train/fid")
    assert sorted(m.step for m in fids) == [int(r["step"]) for r in rows]
    assert len(client.get_metric_history(run.info.run_id, "train/seconds")) == len(rows)
    assert run.data.metrics["train/best_fid"] == pytest.approx(report["best_fid"], rel=1e-5)
    import torch

    best_pt = torch.load(project / "models" / "best.pt", weights_only=True)
    assert best_pt["selected"]["epoch"] == report["best_epoch"]
    assert set(best_pt) >= {"config", "model", "ema", "epoch", "step"}  # model.pt's format


def test_the_demo_summary_gives_the_scores_the_fid_curve_and_the_runs_table(project, capsys):
    import csv

    from ddpm.tools.demo import summarize
    from ddpm.tracking import ui_link

    summarize(project)
    out = capsys.readouterr().out
    result = json.loads((project / "reports" / "eval.json").read_text())
    assert f"final FID {result['fid']:.1f}, KID {result['kid']:.4f} on 24 samples" in out
    rows = list(csv.DictReader((project / "reports" / "train_fid.csv").open()))
    curve = " -> ".join(f"{float(r['fid']):.0f} (epoch {r['epoch']})" for r in rows)
    assert f"in-training FID    {curve}; best" in out and "24 samples each" in out
    run = json.loads((project / "reports" / "mlflow_run.json").read_text())
    assert ui_link(run["experiment_id"]) in out and "workflowType=machine_learning" in out


def test_the_run_holds_params_metrics_images_and_tags(project):
    client, found = runs(project)
    assert len(found) == 1
    run = found[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["generate.steps"] == "5"
    assert run.data.params["evaluate.kid_subsets"] == "5"
    assert run.data.params["diffusion.prediction"] == "v"
    assert run.data.params["train.loss_weighting"] == "min_snr"
    assert run.data.params["train.min_snr_gamma"] == "5.0"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 5
    assert len(client.get_metric_history(run.info.run_id, "train/x0_error_t_q4")) == 2
    assert "evaluate/fid" in run.data.metrics and "evaluate/kid" in run.data.metrics
    assert run.data.tags["ddpm.data_source"] == "synthetic"
    assert len(run.data.tags["ddpm.dataset_hash"]) == 64
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "figures" in artifacts
    assert (project / "mlflow.db").exists() and not (project / "mlruns").exists()


# --- the model in MLflow -----------------------------------------------------------

REGISTERED = "ddpm-stanford-cars"


def test_the_train_run_registers_its_model_with_its_scores(project):
    client, found = runs(project)
    run = found[0]
    version = client.get_model_version(REGISTERED, "1")
    assert version.run_id == run.info.run_id
    manifest = json.loads((project / "data/processed/manifest.json").read_text())
    assert version.tags["ddpm.dataset_sha256"] == manifest["sha256"]
    assert version.tags["git.commit"] == run.data.tags["mlflow.source.git.commit"]
    model = client.get_logged_model(run.data.tags["ddpm.model_id"])
    assert (model.name, str(model.status), model.source_run_id) == \
        ("final", "READY", run.info.run_id)
    assert version.source == f"models:/{model.model_id}"
    linked = {m.key: m for m in model.metrics}
    report = json.loads((project / "reports/train.json").read_text())
    # The last in-training FID (at the final step) and the evaluate stage's scores.
    assert linked["train/fid"].value == pytest.approx(report["final_fid"])
    assert linked["train/fid"].step == report["steps"]
    evaluated = json.loads(first(project, "eval.json").read_text())
    assert linked["evaluate/fid"].value == pytest.approx(evaluated["fid"])
    assert linked["evaluate/fid"].dataset_name == "reference statistics"
    assert "evaluate/kid" in linked
    # models/best.pt is a second logged model when another epoch scored best.
    best_tag = run.data.tags.get("ddpm.best_model_id")
    assert (best_tag is not None) == (report["best_epoch"] != report["epochs"])
    assert len(client.search_registered_models()) == 1
    # The version says what made it and how it scored; the first one scored is the champion.
    assert f"Trained in run `{run.info.run_id}`" in version.description
    assert f"FID {evaluated['fid']:.4g}, KID {evaluated['kid']:.4g}" in version.description
    assert "on 24 samples, ddim, 5 steps, eta 0, reference" in version.description
    assert {alias: str(v) for alias, v in client.get_registered_model(REGISTERED).aliases
            .items()} == {"champion": "1"}


def test_the_run_lists_its_training_and_evaluation_data(project):
    _, found = runs(project)
    inputs = {i.dataset.name: i for i in found[0].inputs.dataset_inputs}
    manifest = json.loads((project / "data/processed/manifest.json").read_text())
    training = inputs["synthetic-cars"]
    assert {t.key: t.value for t in training.tags}["mlflow.data.context"] == "training"
    assert manifest["sha256"].startswith(training.dataset.digest)
    assert json.loads(training.dataset.source)["uri"] == "synthetic:seed=0,count=40"
    profile = json.loads(training.dataset.profile)
    assert (profile["sha256"], profile["count"], profile["image_size"]) == \
        (manifest["sha256"], 40, 16)
    reference = inputs["reference statistics"]
    assert {t.key: t.value for t in reference.tags}["mlflow.data.context"] == "evaluation"


def _predict_in_fresh_process(project, out, request):
    script = (f"import json, numpy, mlflow\n"
              f"model = mlflow.pyfunc.load_model('models:/{REGISTERED}/1')\n"
              f"numpy.save({str(out)!r}, model.predict(json.loads({json.dumps(request)!r})))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=project, capture_output=True,
                          text=True, timeout=300, env={
                              **os.environ, "MLFLOW_TRACKING_URI":
                              f"sqlite:///{project / 'mlflow.db'}"})
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(out)


def _ddpm_sample(project, out, *args):
    done = subprocess.run([sys.executable, "-m", "ddpm.tools.cli", "sample", "--model",
                           str(project / "models/model.pt"), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(out.glob("*.png"))])


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("dpmpp_2m_sde", 1.0)])
def test_the_registered_model_samples_what_ddpm_sample_does(project, tmp_path, sampler, eta):
    request = {"num_samples": 3, "seed": 5, "sampler": sampler, "steps": 4, "eta": eta}
    images = _predict_in_fresh_process(project, tmp_path / "predicted.npy", request)
    assert images.dtype == np.uint8 and images.shape == (3, 16, 16, 3)
    sampled = _ddpm_sample(project, tmp_path / "png", "-n", "3", "--seed", "5", "--sampler",
                           sampler, "--steps", "4", "--eta", str(eta))
    np.testing.assert_array_equal(images, sampled)


def test_the_model_serves_images_and_refuses_bad_requests_with_one_message(project, tmp_path):
    from test_tracking import free_port

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{REGISTERED}@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def post(body):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    try:
        began = time.monotonic()
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() - began < 180, "mlflow models serve did not start"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        status, reply = post({"inputs": {"num_samples": 2, "seed": 5, "sampler": "ddim",
                                         "steps": 4, "eta": 0.0}})
        assert status == 200
        images = np.asarray(reply["predictions"], dtype=np.uint8)
        sampled = _ddpm_sample(project, tmp_path / "png", "-n", "2", "--seed", "5",
                               "--sampler", "ddim", "--steps", "4")
        np.testing.assert_array_equal(images, sampled)
        # MLflow's server puts "Failed to predict data '<the request>'. \nError: " first.
        for body, says in [({"inputs": {"num_samples": -1}}, "num_samples: must be 1 to"),
                           ({"inputs": {"num_samples": 100000}}, "num_samples: must be 1 to"),
                           ({"inputs": {"sampler": "euler"}}, "unknown sampler 'euler'"),
                           ({"inputs": {"steps": 999}}, "at most the model's diffusion steps"),
                           ({"inputs": {"steps": 4.5}}, "steps: must be int, got 4.5"),
                           ({"inputs": {"seed": -1}}, "seed: must be 0 or more, got -1"),
                           ({"inputs": {"clip": "no"}}, "clip: must be bool, got 'no'"),
                           ({"inputs": {"sampler": "ddim", "eta": float("nan")}},
                            "eta: must be a finite number, got nan")]:
            status, reply = post(body)
            assert status == 400, (body, reply)
            line = reply["message"].split("\nError: ")[-1]
            assert says in line and "\n" not in line, reply
            assert "Traceback" not in json.dumps(reply) and "stack_trace" not in reply, reply
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_changing_generate_reruns_only_generate_and_evaluate_in_a_new_run(project):
    _, before = runs(project)
    first_fid = before[0].data.metrics["evaluate/fid"]
    set_param(project, "generate", "steps", 10)
    status = dvc("status", cwd=project).stdout
    assert "generate:" in status and "train:" not in status and "preprocess:" not in status
    out = dvc("repro", cwd=project).stdout
    assert "Running stage 'generate'" in out and "Running stage 'evaluate'" in out
    assert "Running stage 'train'" not in out and "Running stage 'reference'" not in out
    client, after = runs(project)
    assert len(after) == 2
    old, new = after
    assert old.data.metrics["evaluate/fid"] == first_fid and old.data.params["generate.steps"] == "5"
    assert new.data.params["generate.steps"] == "10"
    assert new.data.metrics["evaluate/fid"] != first_fid
    assert len(client.get_metric_history(new.info.run_id, "train/loss")) == \
        len(client.get_metric_history(old.info.run_id, "train/loss"))
    assert new.data.tags["ddpm.train_run_id"] == old.info.run_id
    # The registered version keeps both scores, each with its settings; 5 and 10 steps are
    # not compared with each other.
    described = client.get_model_version(REGISTERED, "1").description
    assert "on 24 samples, ddim, 5 steps" in described and "on 24 samples, ddim, 10 steps" \
        in described


def test_changing_evaluate_never_reruns_reference_and_does_not_fail(project):
    _, before = runs(project)
    set_param(project, "evaluate", "kid_subsets", 7)
    out = dvc("repro", cwd=project).stdout
    assert "Running stage 'evaluate'" in out and "Running stage 'reference'" not in out
    _, found = runs(project)
    assert len(found) == len(before) + 1  # a new run: the last one holds other kid_subsets
    assert found[-1].data.params["evaluate.kid_subsets"] == "7"


def test_changing_sweep_reruns_only_the_sweep(project):
    set_param(project, "sweep", "num_samples", 12)
    status = dvc("status", cwd=project).stdout
    assert "sweep:" in status and "train:" not in status and "generate:" not in status
    out = dvc("repro", cwd=project).stdout
    assert "Running stage 'sweep'" in out and "Running stage 'train'" not in out
    assert "Running stage 'generate'" not in out
    rows = (project / "reports" / "sweep.csv").read_text().splitlines()
    assert all(line.endswith(",12") for line in rows[1:])


def test_training_survives_an_unreachable_tracking_server(tmp_path):
    import socket

    from conftest import run_stage, write_params
    from ddpm.data.synthetic import write_synthetic_dataset
    from ddpm.config import PreprocessConfig
    from ddpm.data.preprocess import preprocess

    write_synthetic_dataset(tmp_path / "raw", 16, 0)
    preprocess(tmp_path / "raw", tmp_path / "processed", PreprocessConfig(image_size=16, workers=1))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    no_fid = {**TINY_PIPELINE, "train": {**TINY_PIPELINE["train"], "fid_every": 0}}
    params = write_params(tmp_path / "params.yaml", no_fid)
    done = run_stage("train", "--params", str(params), "--data", str(tmp_path / "processed"),
                     "--model", str(tmp_path / "model.pt"), "--checkpoints", str(tmp_path / "ckpt"),
                     "--reports", str(tmp_path / "reports"), "--strips", str(tmp_path / "strips"),
                     "--run-file", str(tmp_path / "run.json"), cwd=tmp_path,
                     env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "DVC_ROOT": str(tmp_path)})
    assert (tmp_path / "model.pt").exists()
    spooled = list((tmp_path / ".mlflow-spool").glob("*.jsonl"))
    assert len(spooled) == 1
    assert done.stderr.count("spool") >= 1
    # The model went to the spool with the rest, with one warning for all of it...
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning: tracking")]
    assert len(warnings) <= 2, warnings
    ops = [json.loads(line)["op"] for line in spooled[0].read_text().splitlines()]
    assert ops.count("model") == 1 and ops.count("dataset") == 1
    # ... and a replay logs and registers it, once however often it is replayed.
    import mlflow
    from ddpm.tracking import replay_spool

    # The spool as it is now, to replay it again later as if the first replay had been
    # killed just before it renamed the file (its kept files with it).
    pristine = tmp_path / "pristine"
    shutil.copytree(spooled[0].parent, pristine)
    copy = pristine / spooled[0].name
    copy.write_text(copy.read_text().replace(str(spooled[0].parent), str(pristine)))
    uri = f"sqlite:///{tmp_path / 'later.db'}"
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    run_id = replay_spool(spooled[0], tracking_uri=uri)
    # The replay's store does not leak into this process's later runs or subprocesses.
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before
    assert mlflow.get_tracking_uri() != uri
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    version = client.get_model_version("ddpm-stanford-cars", "1")
    assert version.run_id == run_id and version.source == f"models:/{run.data.tags['ddpm.model_id']}"
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["synthetic-cars"]

    def held():
        experiments = [run.info.experiment_id]
        return (len(client.search_runs(experiments)), len(client.search_logged_models(experiments)),
                len(client.search_model_versions("name = 'ddpm-stanford-cars'")),
                {key: len(client.get_metric_history(run_id, key)) for key in run.data.metrics},
                sorted(a.path for a in client.list_artifacts(run_id, "images")),
                len(client.get_run(run_id).inputs.dataset_inputs))

    once = held()
    assert once[:3] == (1, 1, 1) and once[3]["train/loss"] >= 2 and once[4]
    assert replay_spool(copy, tracking_uri=uri) == run_id  # a second replay adds nothing
    assert held() == once

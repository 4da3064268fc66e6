import dataclasses
import re

import pytest
import yaml

from conftest import REPO, run_stage, write_params
from ddpm.config import ConfigError, load_params, params_from_dict


def raw_params():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repository_params_load_and_match_the_seed():
    params = load_params(REPO / "params.yaml")
    assert params.diffusion.steps == 512 and params.diffusion.schedule == "linear"
    assert params.model.channels == (64, 128, 256, 512)
    assert params.model.attention == (False, False, True, True)
    assert params.train.batch_size == 64 and params.train.lr == pytest.approx(1e-4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.lr = 1.0


@pytest.mark.parametrize("section, key, value, fragments", [
    ("train", "learning_rate", 0.1, ["train.learning_rate", "unknown key", "lr"]),
    ("train", "epochs", "ten", ["train.epochs", "whole number"]),
    ("train", "epochs", -3, ["train.epochs", ">= 1"]),
    ("data", "source", "ftp", ["data.source", "kaggle", "archive", "synthetic"]),
    ("diffusion", "beta_end", 0.00001, ["diffusion.beta_end", "greater than beta_start"]),
    ("preprocess", "image_size", 60, ["preprocess.image_size", "multiple of 8"]),
    ("preprocess", "resize", "stretch", ["squash", "center_crop", "bbox_crop"]),
    ("model", "attention", [True], ["model.attention", "one entry per level"]),
    ("model", "channels", [64, 100, 256, 512], ["model.channels", "multiple"]),
    ("generate", "sampler", "euler", ["generate.sampler", "ddpm", "ddim"]),
    ("train", "flip", "yes", ["train.flip", "true or false"]),
    ("generate", "variance", "large", ["generate.variance", "posterior", "beta"]),
    ("model", "attention_norm", "no", ["model.attention_norm", "true or false"]),
    ("train", "cuda_graph", "yes", ["train.cuda_graph", "auto", "on", "off"]),
    ("mlflow", "registered_model", "cars/v1", ["mlflow.registered_model", "models:/",
                                               "or ''"]),
    ("mlflow", "log_model", "maybe", ["mlflow.log_model", "true or false"]),
])
def test_bad_values_name_the_key_and_what_is_allowed(section, key, value, fragments):
    raw = raw_params()
    raw[section][key] = value
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_registering_needs_the_model_logged():
    raw = raw_params()
    raw["mlflow"]["log_model"] = False
    with pytest.raises(ConfigError, match="registering needs mlflow.log_model: true"):
        params_from_dict(raw)
    raw["mlflow"]["registered_model"] = ""
    assert not params_from_dict(raw).mlflow.log_model


def test_unknown_section_and_archive_without_path():
    raw = raw_params()
    raw["trian"] = {"epochs": 1}
    with pytest.raises(ConfigError, match="trian.*known sections"):
        params_from_dict(raw)
    raw = raw_params()
    raw["data"]["source"] = "archive"
    with pytest.raises(ConfigError, match="data.archive"):
        params_from_dict(raw)


def test_numbers_written_like_1e_4_are_numbers():
    raw = raw_params()
    raw["train"]["lr"] = "2e-4"  # YAML 1.1 reads this as a string
    assert params_from_dict(raw).train.lr == pytest.approx(2e-4)


def test_a_stage_with_bad_params_exits_before_work(tmp_path):
    params = write_params(tmp_path / "params.yaml", {"train": {"epochs": 0}})
    done = run_stage("download", "--params", str(params), "--out", str(tmp_path / "raw"),
                     cwd=tmp_path, check=False)
    assert done.returncode != 0
    assert "train.epochs" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "raw").exists()


def test_the_beta_variance_is_for_the_ddpm_sampler_only():
    raw = raw_params()
    raw["generate"].update(sampler="ddim", variance="beta")
    with pytest.raises(ConfigError, match="generate.variance.*generate.eta"):
        params_from_dict(raw)


def test_a_whole_step_graph_refuses_compiles_that_make_their_own_graphs():
    raw = raw_params()
    raw["train"].update(cuda_graph="on", compile_mode="reduce-overhead")
    with pytest.raises(ConfigError, match="train.cuda_graph.*compile_mode"):
        params_from_dict(raw)


def test_the_samplers_params_accept_are_the_samplers_there_are():
    import typing

    from ddpm.config import Sampler
    from ddpm.model.samplers import SAMPLERS

    assert set(typing.get_args(Sampler)) == set(SAMPLERS)


@pytest.mark.parametrize("section, values, fragment", [
    ("generate", {"sampler": "dpmpp_2m", "eta": 1.0}, "generate.eta: sampler dpmpp_2m"),
    ("generate", {"sampler": "dpmpp_2m_sde", "eta": 0.0}, "needs eta > 0"),
    ("generate", {"sampler": "dpmpp_2m", "steps": 600}, "generate.steps: dpmpp_2m can take at "
                                                        "most diffusion.steps (512)"),
    ("train", {"fid_sampler": "ddim", "fid_steps": 0}, "train.fid_steps: must be >= 1"),
    ("train", {"fid_sampler": "dpmpp_2m", "fid_eta": 0.5}, "train.fid_eta: sampler dpmpp_2m"),
    ("generate", {"sampler": "ddim", "eta": float("nan")}, "generate.eta: must be a finite"),
    ("train", {"fid_sampler": "dpmpp_2m_sde", "fid_eta": float("inf")},
     "train.fid_eta: must be a finite number >= 0, got inf"),
    ("sweep", {"points": [{"sampler": "ddim", "steps": 513}]}, "sweep.points[0].steps: ddim can "
                                                               "take at most"),
    ("sweep", {"points": [{"sampler": "ddim", "steps": 10}, {"sampler": "ddim", "steps": 10,
                                                              "eta": 0.0}]}, "listed twice"),
    ("sweep", {"points": "ddim"}, "expected a list of mappings with keys sampler, steps, eta"),
    ("sweep", {"num_samples": 1}, "sweep.num_samples: must be >= 2"),
])
def test_sampler_settings_each_sampler_cannot_honour_are_refused(section, values, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        params_from_dict({section: values})

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ddpm.config import DiffusionConfig, ModelConfig
from ddpm.tools.demo import copy_pipeline

REPO = Path(__file__).resolve().parents[1]

# The tests' one tiny configuration: a U-Net that trains in seconds on a CPU, on 16x16
# images. Tests add the sections they need with `tiny(...)`.
TINY = {
    "model": {"channels": [32, 64], "attention": [False, True], "blocks_per_level": 1,
              "dropout": 0.0},
    "diffusion": {"steps": 20},
    "preprocess": {"image_size": 16},
    "sweep": {"num_samples": 8, "batch_size": 8,
              "points": [{"sampler": "ddim", "steps": 4, "eta": 0.0},
                         {"sampler": "dpmpp_2m", "steps": 4, "eta": 0.0}]},
}
TINY_MODEL = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in TINY["model"].items()})
TINY_DIFFUSION = DiffusionConfig(**TINY["diffusion"])


def tiny(**sections: dict) -> dict:
    """TINY with more sections, or more keys in its own: tiny(train={"epochs": 2})."""
    merged = {name: dict(values) for name, values in TINY.items()}
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    return merged


def as_sets(overrides: dict) -> list[str]:
    """The overrides as `--set section.key=value` arguments (YAML values)."""
    return [f"{section}.{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"
            .replace("\n...", "") for section, values in overrides.items()
            for key, value in values.items()]


def write_processed(out: Path, images: np.ndarray) -> Path:
    """A processed-data folder (images.npy + manifest.json) as the preprocess stage writes it."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "images.npy", images)
    (out / "manifest.json").write_text(json.dumps({"shape": list(images.shape), "sha256": "0" * 64}))
    return out


def write_params(path: Path, overrides: dict) -> Path:
    """The repository's params.yaml with `overrides` ({section: {key: value}}) applied, and
    in-training FID off unless they turn it on (it needs the reference stage's output)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["fid_every"] = 0
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_stage(name: str, *args: str, cwd: Path, check: bool = True, timeout: float = 300,
              env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(REPO / "stages" / f"{name}.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and done.returncode:
        raise AssertionError(f"stage {name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def make_dvc_project(dest: Path, overrides: dict) -> Path:
    """A scratch git + DVC repository holding the pipeline, with its own params.yaml."""
    copy_pipeline(REPO, dest)
    write_params(dest / "params.yaml", overrides)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                [sys.executable, "-m", "dvc", "config", "core.analytics", "false"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "pipeline"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env, capture_output=True)
    return dest


def dvc(*args: str, cwd: Path, check: bool = True, timeout: float = 600,
        threads: int | None = None) -> subprocess.CompletedProcess:
    """`dvc ARGS` in `cwd`; `threads` sets OMP_NUM_THREADS for what it starts (queue workers)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)
    if check and done.returncode:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


@pytest.fixture
def tiny_overrides():
    return {k: dict(v) for k, v in TINY.items()}


class Crash(Exception):
    """What `CrashAt` raises: a stand-in for a killed training run."""


class CrashAt:
    """A training callback that raises Crash at the end of `epoch` (after the callbacks
    before it, e.g. a checkpoint, have run)."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_log(self, row):
        pass

    def on_epoch_end(self, state, summary):
        if summary.epoch == self.epoch:
            raise Crash

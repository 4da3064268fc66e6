"""torchrun with 2 gloo processes computes what one process does on the same global batch."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from conftest import REPO, TINY, write_params, write_processed
from ddpm import checkpoint


def test_two_gloo_processes_match_one_process(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (32, 3, 16, 16), dtype=np.uint8)
    data = write_processed(tmp_path / "processed", images)
    overrides = {**TINY, "train": {"epochs": 2, "batch_size": 8, "device": "cpu", "compile": "off",
                                   "strip_every": 0, "log_every": 2, "warmup_epochs": 0,
                                   "lr": 1e-3},
                 "mlflow": {"enabled": False}}
    params = write_params(tmp_path / "params.yaml", overrides)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    outputs = {}
    for procs in (1, 2):
        work = tmp_path / f"np{procs}"
        done = subprocess.run(
            [torchrun, "--standalone", "--nproc_per_node", str(procs), str(REPO / "stages" / "train.py"),
             "--params", str(params), "--data", str(data), "--model", str(work / "model.pt"),
             "--checkpoints", str(work / "ckpt"), "--reports", str(work / "reports"),
             "--strips", str(work / "strips"), "--run-file", str(work / "run.json")],
            cwd=tmp_path, capture_output=True, text=True, timeout=300,
            env={"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"})
        assert done.returncode == 0, done.stdout + done.stderr
        outputs[procs] = checkpoint.load(work / "model.pt")
        assert outputs[procs]["step"] == 8
    one, two = outputs[1]["model"], outputs[2]["model"]
    # Adam turns float-rounding differences of near-zero gradients into
    # lr-sized steps, so compare the typical difference with the typical move.
    diff = torch.cat([(one[k] - two[k]).abs().flatten() for k in one])
    torch.manual_seed(42)  # train.seed: the initial weights
    from ddpm.config import ModelConfig
    from ddpm.unet import UNet
    init = UNet(ModelConfig(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in TINY["model"].items()})).state_dict()
    moved = torch.cat([(one[k] - init[k]).abs().flatten() for k in one])
    print(f"mean |1 proc - 2 procs| {diff.mean():.3g}, mean |trained - init| {moved.mean():.3g}")
    assert diff.mean() < 0.01 * moved.mean()
    assert diff.max() < 0.1 * moved.max()

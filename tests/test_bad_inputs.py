"""Bad input, as a user meets it: every stage script and `ddpm` subcommand given each bad
input below exits non-zero with one line on stderr that names the problem, and no
traceback. One table, one subprocess per row (run two at a time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, write_params, write_processed
from ddpm.data.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    images = np.random.default_rng(0).integers(0, 256, (8, 3, 16, 16), dtype=np.uint8)
    write_processed(root / "good", images)

    write_processed(root / "not-json", images)
    (root / "not-json" / "manifest.json").write_text("{ this is not json")
    write_processed(root / "no-shape", images)
    (root / "no-shape" / "manifest.json").write_text(json.dumps({"count": 8}))
    write_processed(root / "truncated", images)
    npy = root / "truncated" / "images.npy"
    npy.write_bytes(npy.read_bytes()[:200])
    write_processed(root / "mismatch", images)
    np.save(root / "mismatch" / "images.npy", images[:5])
    (root / "missing").mkdir()

    write_synthetic_dataset(root / "raw", 6, 0)  # a devkit whose annotations are corrupt
    for mat in (root / "raw").rglob("cars_*_annos.mat"):
        mat.write_bytes(mat.read_bytes()[:64])

    (root / "texts").mkdir()
    (root / "texts" / "notes.txt").write_text("no pictures here")
    (root / "one" / "sub").mkdir(parents=True)
    (root / "one" / "sub" / "only.png").write_bytes(b"one image is not a data set")

    torch.save({"epoch": 3, "weights": torch.zeros(2)}, root / "foreign.pt")
    (root / "garbage.pt").write_text("not a checkpoint")
    np.save(root / "samples.npy", images)
    base = {**TINY, "train": {"epochs": 1, "batch_size": 4, "device": "cpu", "compile": "off",
                              "strip_every": 0}, "mlflow": {"enabled": False}}
    for name, overrides in {
        "ok": base,
        "cuda-x": {**base, "train": {**base["train"], "device": "cuda:x"}},
        "cuda-7": {**base, "train": {**base["train"], "device": "cuda:7"}},
        "cuda-n": {**base, "train": {**base["train"], "device": "cuda:0", "nproc": 2}},
        "bbox": {**base, "preprocess": {**TINY["preprocess"], "resize": "bbox_crop"}},
        "kid1": {**base, "evaluate": {"kid_subset_size": 1}},
        # Your own images (data.source: folder): folders made below.
        "folder-missing": {**base, "data": {"source": "folder", "folder": str(root / "gone")}},
        "folder-texts": {**base, "data": {"source": "folder", "folder": str(root / "texts")}},
        "folder-one": {**base, "data": {"source": "folder", "folder": str(root / "one")}},
        "folder-relative": {**base, "data": {"source": "folder", "folder": "photos"}},
        "folder-kaggle": {**base, "data": {"source": "kaggle", "folder": str(root / "one")}},
        "folder-bbox": {**base, "data": {"source": "folder", "folder": str(root / "one")},
                        "preprocess": {**TINY["preprocess"], "resize": "bbox_crop"}},
    }.items():
        write_params(root / f"{name}.yaml", overrides)
    return root


def train(data: str, params: str = "ok") -> list[str]:
    return ["stages/train.py", "--params", f"{params}.yaml", "--data", data, "--model",
            "out/model.pt", "--checkpoints", "out/ckpt", "--reports", "out/reports",
            "--strips", "out/strips", "--run-file", "out/run.json", "--best", "out/best.pt"]


def reference(data: str) -> list[str]:
    return ["stages/reference.py", "--params", "ok.yaml", "--data", data, "--out", "out/s.npz"]


def generate(data: str, model: str = "foreign.pt") -> list[str]:
    return ["stages/generate.py", "--params", "ok.yaml", "--model", model, "--data", data,
            "--out", "out/generated", "--figures", "out/figures", "--train-run", "out/r.json",
            "--run-file", "out/g.json"]


def download(params: str) -> list[str]:
    return ["stages/download.py", "--params", f"{params}.yaml", "--out", "out/raw"]


def preprocess(params: str) -> list[str]:
    return ["stages/preprocess.py", "--params", f"{params}.yaml", "--out", "out/p"]


def ddpm(*args: str) -> list[str]:
    return ["-m", "ddpm.tools.cli", *args]


# (what is wrong, the command, a fragment of the one line it must print)
CASES = [
    ("no processed data", train("missing"), "run the preprocess stage first"),
    ("manifest not JSON", train("not-json"), "manifest.json is not valid JSON"),
    ("manifest of another kind", train("no-shape"), "is not a preprocess manifest"),
    ("truncated images.npy", train("truncated"), "images.npy cannot be read"),
    ("images.npy unlike its manifest", train("mismatch"), "does not match its manifest"),
    ("train.device cuda:x", train("good", "cuda-x"), "cuda:N (N a GPU index"),
    ("a GPU that is not there", train("good", "cuda-7"), "'cuda:7' but CUDA is not available"),
    ("one GPU named for two processes", train("good", "cuda-n"), "names one GPU, but train.nproc"),
    ("reference: no processed data", reference("missing"), "run the preprocess stage first"),
    ("reference: truncated images.npy", reference("truncated"), "images.npy cannot be read"),
    ("generate: manifest not JSON", generate("not-json"), "manifest.json is not valid JSON"),
    ("generate: a file that is not a checkpoint", generate("good", "garbage.pt"),
     "garbage.pt is not a readable checkpoint"),
    ("generate: a checkpoint that is not a model", generate("good"),
     "foreign.pt is not a model written by the train stage"),
    ("preprocess: corrupt devkit with bbox_crop",
     ["stages/preprocess.py", "--params", "bbox.yaml", "--raw", "raw", "--out", "out/p"],
     "is not a readable devkit annotation file"),
    ("download: data.folder that does not exist", download("folder-missing"), "gone, which "
     "does not exist"),
    ("preprocess: data.folder without images", preprocess("folder-texts"),
     "holds no images (looked for .jpg .jpeg .png"),
    ("download: data.folder with one image", download("folder-one"),
     "holds only one image (sub/only.png); the pipeline needs at least 2"),
    ("preprocess: data.folder with one image", preprocess("folder-one"), "holds only one image"),
    ("preprocess: data.folder relative", preprocess("folder-relative"),
     "data.folder: 'photos' is not an absolute path"),
    ("download: data.folder with source kaggle", download("folder-kaggle"),
     "but data.source is 'kaggle'"),
    ("preprocess: bbox_crop of a folder", preprocess("folder-bbox"),
     "'bbox_crop' crops to the Stanford Cars devkit's bounding boxes"),
    ("evaluate.kid_subset_size 1",
     ["stages/evaluate.py", "--params", "kid1.yaml", "--samples", "out", "--reference", "x.npz"],
     "evaluate.kid_subset_size: must be >= 2"),
    ("ddpm fid --batch-size 0", ddpm("fid", "samples.npy", "samples.npy", "--batch-size", "0"),
     "--batch-size must be at least 1, got 0"),
    ("ddpm fid --kid-subset-size 1",
     ddpm("fid", "samples.npy", "samples.npy", "--kid-subset-size", "1"),
     "--kid-subset-size must be at least 2, got 1"),
    ("ddpm fid --kid-subsets 0", ddpm("fid", "samples.npy", "samples.npy", "--kid-subsets", "0"),
     "--kid-subsets must be at least 1, got 0"),
    ("ddpm fid --kid-subsets x", ddpm("fid", "samples.npy", "samples.npy", "--kid-subsets", "x"),
     "invalid int value: 'x'"),
    ("ddpm sample --batch-size 0",
     ddpm("sample", "--model", "foreign.pt", "--out", "out/s", "--batch-size", "0"),
     "--batch-size: must be >= 1, got 0"),
    ("ddpm sample dpmpp_2m with noise",
     ddpm("sample", "--model", "foreign.pt", "--out", "out/s", "--sampler", "dpmpp_2m",
          "--eta", "1"), "--eta: sampler dpmpp_2m (DPM-Solver++(2M), the ODE) adds no noise"),
    ("ddpm sample of a missing model", ddpm("sample", "--model", "nowhere.pt", "--out", "out/s"),
     "nowhere.pt"),
    ("ddpm sample of a checkpoint that is not a model",
     ddpm("sample", "--model", "foreign.pt", "--out", "out/s"),
     "foreign.pt is not a model written by the train stage"),
]


def run(workdir: Path, args: list[str]) -> subprocess.CompletedProcess:
    script = [str(REPO / args[0])] if args[0].startswith("stages/") else args
    rest = args[1:] if args[0].startswith("stages/") else []
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *script, *rest], cwd=workdir, capture_output=True,
                          text=True, timeout=300, env=env)


def test_every_bad_input_is_one_line_without_a_traceback(workdir):
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = list(pool.map(lambda case: run(workdir, case[1]), CASES))
    problems = []
    for (what, args, fragment), result in zip(CASES, done):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        if (result.returncode == 0 or "Traceback" in result.stderr or len(lines) != 1
                or fragment not in lines[0] or "error: " not in lines[0]):
            problems.append(f"{what}: exit {result.returncode}, stderr:\n{result.stderr}")
    assert not problems, "\n\n".join(problems)


def test_gpu_indices_and_process_counts_are_checked_against_the_machine(monkeypatch):
    from ddpm.config import ConfigError
    from ddpm.device import check_processes, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"'cuda:2' but this machine has 2 GPUs \(cuda:0 to "
                                          r"cuda:1\)"):
        resolve_device("cuda:2")
    check_processes("cuda", 2)
    check_processes("cpu", 3)  # gloo processes on the CPU: as many as asked
    with pytest.raises(ConfigError, match="train.nproc is 3, but this machine has 2 GPUs"):
        check_processes("auto", 3)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB filesystem of its own (tmpfs), so that a write really runs out of space."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"mounting a 2 MiB tmpfs needs root: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_named_and_the_previous_checkpoint_kept(small_disk):
    """A checkpoint that does not fit: torch's own error on a really full disk becomes a line
    that says so; the previous file stays, and no temporary file is left."""
    from ddpm.evaluate import model_file
    from ddpm.train import checkpoint

    path = small_disk / "last.pt"
    checkpoint.save(path, {"epoch": 1, "w": torch.zeros(100_000)})  # 0.4 MB
    saver = checkpoint.BackgroundSaver()
    saver.save(path, {"epoch": 2, "w": torch.zeros(1_000_000)})  # 4 MB: more than is free
    with pytest.raises(checkpoint.CheckpointWriteError) as caught:
        saver.wait()
    message = str(caught.value)
    assert "\n" not in message
    assert f"writing {path} failed: the disk is full" in message, message
    assert "the previous file was left as it was" in message
    assert model_file.load(path)["epoch"] == 1
    assert [p.name for p in small_disk.iterdir()] == ["last.pt"]

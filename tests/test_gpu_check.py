"""scripts/gpu_check.py, the script a session lent a GPU runs, dry-run on the CPU so it
does not rot between GPU sessions (its CUDA figures are not checked here)."""

import json
import subprocess
import sys

from conftest import REPO, as_sets, tiny

TINY_SETS = as_sets(tiny(train={"batch_size": 8}, generate={"batch_size": 4}))


def test_gpu_check_runs_its_parts_on_a_cpu(tmp_path):
    cmd = [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--out", str(tmp_path),
           "--device", "cpu", "--only", "agree,variants,graph"]
    for item in TINY_SETS:
        cmd += ["--set", item]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {k: v["status"] for k, v in results["parts"].items()} == {"agree": "ok",
                                                                     "variants": "ok",
                                                                     "graph": "ok"}
    agree = results["agree"]
    assert agree["eager_tf32"] == 0  # no TF32 on a CPU: the reference itself
    assert 0 < agree["eager_bf16"] < 0.05 and 0 < agree["compiled_bf16"] < 0.05
    assert results["variants"]["fast path at batch 16"]["images_per_s"] > 0
    # On a CPU nothing is captured (train.cuda_graph: on needs CUDA), so "captured vs
    # ordinary" compares two runs of the same uncaptured step from the same seed: it checks
    # that the harness is deterministic, so that on a GPU any difference is the capture's.
    graph = results["graph"]
    assert graph["captured"]["captured"] is False and graph["ordinary"]["captured"] is False
    assert graph["captured"]["variant"] == graph["ordinary"]["variant"]
    assert graph["captured vs ordinary"]["max_rel"] == 0
    assert graph["resume_max_abs_diff"] == 0  # resuming mid-epoch is exact
    assert "summary: agree ok" in (tmp_path / "gpu_check.log").read_text()

"""`ddpm bench` on a tiny model: every figure is measured, finite and written.

A behaviour test of the benchmark's plumbing, not a timing test: nothing here
depends on how fast the machine is.
"""

import json
import math

import pytest
import torch

from ddpm.bench import Counts, run_bench
from ddpm.config import params_from_dict

TINY = {
    "model": {"channels": [32, 64], "attention": [False, True], "blocks_per_level": 1,
              "dropout": 0.0},
    "diffusion": {"steps": 20},
    "preprocess": {"image_size": 16},
    "train": {"batch_size": 4},
    "generate": {"batch_size": 2},
    "evaluate": {"batch_size": 2},
}
FEW = Counts(train_warmup=1, train_steps=2, sample_warmup=1, sample_steps=2,
             matmul_size=256, matmul_iters=2, inception_images=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning OpenMP threads
    can slow a step tenfold, and this test times nothing that threads would change."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def numbers(tree, path=""):
    """(dotted path, value) of every number in a nested dict, booleans left out."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from numbers(value, f"{path}.{key}" if path else key)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    lines = []
    result = run_bench(params_from_dict(TINY), torch.device("cpu"), quick=True, out_path=out,
                       print_fn=lines.append, counts=FEW)
    return result, out, lines


def test_every_figure_is_positive_and_finite(bench):
    result, _, _ = bench
    train, sampling = result["train"], result["sampling"]
    for name in ("eager_fp32", "fast"):
        for key in ("images_per_s", "tflops", "mfu", "step_s"):
            assert key in train[name], f"train.{name}.{key} missing"
    assert result["peak"]["tflops"] > 0
    assert train["projected"]["seconds"] > 0
    # DDPM takes all T = 20 steps; DDIM-50 is capped at T.
    assert sampling["ddpm"]["steps"] == 20 and sampling["ddim"]["steps"] == 20
    for figures in sampling.values():
        assert figures["images_per_s"] > 0 and figures["seconds_10k"] > 0
    assert result["memory_bytes"]["process_rss"] > 0
    if "unavailable" not in result["inception"]:
        assert result["inception"]["images_per_s"] > 0
    assert set(result["targets"]) == {"speedup", "mfu", "train_seconds", "ddpm_seconds_10k",
                                      "ddim_seconds_10k"}
    load = result["host"]["load_average_1min"]
    assert load is None or load >= 0  # the one figure that may be 0 (None off Linux)
    found = {k: v for k, v in numbers(result) if not k.startswith("host.load")}
    assert len(found) > 30
    for path, value in found.items():
        assert math.isfinite(value) and value > 0, f"{path} = {value}"


def test_ratio_is_fast_over_eager(bench):
    result = bench[0]
    fast, eager = result["train"]["fast"], result["train"]["eager_fp32"]
    assert result["train"]["speedup"] == pytest.approx(fast["images_per_s"] / eager["images_per_s"])
    flop = result["model"]["train_flop_per_image"]
    assert fast["tflops"] == pytest.approx(fast["images_per_s"] * flop / 1e12)
    assert fast["mfu"] == pytest.approx(fast["tflops"] / result["peak"]["tflops"])


def test_files_hold_the_figures_and_the_printout(bench):
    result, out, lines = bench
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    text = out.with_suffix(".txt").read_text()
    assert text.splitlines() == lines
    assert "eager fp32" in text and "DDPM-20" in text and "DDIM-20" in text
    assert "PASS" not in text and "MISS" not in text  # verdicts are for GPUs only
    assert "lowered" not in text  # batches 4 and 2 are within the CPU's caps


def test_compile_and_inception_failures_are_reported_not_raised(monkeypatch):
    import ddpm.bench
    import ddpm.fid

    def broken_compile(model, mode, device, compile_mode="default"):
        if mode == "off":
            return model

        def forward(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return forward

    def no_weights(device):
        raise ddpm.fid.FidWeightsError("the Inception weights are missing")

    monkeypatch.setattr(ddpm.bench, "maybe_compile", broken_compile)
    monkeypatch.setattr(ddpm.fid, "load_inception", no_weights)
    lines = []
    params = params_from_dict({**TINY, "train": {**TINY["train"], "compile": "on"}})
    result = run_bench(params, torch.device("cpu"), quick=True, out_path=None,
                       print_fn=lines.append, counts=FEW)
    text = "\n".join(lines)
    assert "compile: unavailable (RuntimeError: no C++ compiler found)" in text
    assert "eager" in result["train"]["fast"]["config"]
    assert result["train"]["fast"]["images_per_s"] > 0
    reason = "FidWeightsError: the Inception weights are missing"
    assert f"inception: unavailable ({reason})" in text
    assert result["inception"] == {"unavailable": reason}

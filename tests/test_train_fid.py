"""In-training FID on a tiny model: cadence, the CSV, best weights, resume, the real scorer."""

import csv

import numpy as np
import pytest
import torch

from conftest import TINY_DIFFUSION, TINY_MODEL, Crash, CrashAt

from ddpm.evaluate import model_file
from ddpm.train.callbacks import Checkpointer
from ddpm.config import TrainConfig
from ddpm.train.fid_curve import FidEvaluator, TrainFid, best_file, continue_best, summary_fields
from ddpm.train.loop import train

MODEL = TINY_MODEL
DIFFUSION = TINY_DIFFUSION
CPU = torch.device("cpu")


def images(n=8):
    return torch.randint(0, 256, (n, 3, 16, 16), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)


def cfg(**kw):
    return TrainConfig(**{**dict(epochs=5, batch_size=4, lr=1e-3, warmup_epochs=0, seed=3,
                                 device="cpu", log_every=1, strip_every=0, compile="off",
                                 precision="fp32"), **kw})


class Scripted:
    """A scorer that returns a hand-made FID sequence and remembers the EMA weights it saw."""

    def __init__(self, fids):
        self.fids, self.seen = list(fids), []

    def __call__(self, model):
        self.seen.append({k: v.clone() for k, v in model.state_dict().items()})
        fid = self.fids[len(self.seen) - 1]
        return {"fid": fid, "kid": fid / 1000, "count_a": 16}


def fid_callback(tmp_path, score, every, epochs, scored=None, saver=None):
    return TrainFid(score, every, epochs, tmp_path / "train_fid.csv", tmp_path, {"run": 1}, 16,
                    saver=saver, on_scored=(lambda row, best: scored.append((row, best)))
                    if scored is not None else None)


def best_files(folder):
    return sorted(p.name for p in folder.glob("best-epoch*.pt"))


@pytest.mark.parametrize("every, epochs, expected", [(2, 5, [2, 4, 5]), (1, 3, [1, 2, 3]),
                                                     (7, 3, [3]), (0, 3, [])])
def test_the_cadence_includes_the_last_epoch_and_0_is_off(tmp_path, every, epochs, expected):
    score = Scripted([50.0] * 5)
    state = train(images(), DIFFUSION, MODEL, cfg(epochs=epochs), device=CPU,
                  callbacks=(fid_callback(tmp_path, score, every, epochs),))
    assert [row["epoch"] for row in state.extra.get("fid", [])] == expected
    assert len(score.seen) == len(expected)
    assert bool(best_files(tmp_path)) == bool(expected)


def test_the_best_epoch_is_kept_with_its_weights_and_the_csv_holds_every_row(tmp_path):
    fids = [80.0, 61.5, 70.0, 61.5, 90.0]  # the best is epoch 2 (the first of two equals)
    score, scored = Scripted(fids), []
    state = train(images(), DIFFUSION, MODEL, cfg(), device=CPU,
                  callbacks=(fid_callback(tmp_path, score, 1, 5, scored),))
    assert best_files(tmp_path) == ["best-epoch0001.pt", "best-epoch0002.pt"]  # none pruned
    best = torch.load(best_file(tmp_path, 2), weights_only=True)
    assert best["selected"]["epoch"] == 2 and best["selected"]["fid"] == 61.5
    assert best["epoch"] == 2 and best["step"] == 4
    for key, value in best["ema"].items():
        assert torch.equal(value, score.seen[1][key]), key
    assert not all(torch.equal(best["ema"][k], v) for k, v in
                   state.ema.model.state_dict().items())  # not the last epoch's
    rows = list(csv.DictReader((tmp_path / "train_fid.csv").open()))
    assert list(rows[0]) == ["epoch", "step", "seconds", "fid", "kid", "samples", "sampler",
                             "steps", "eta"]
    assert [float(r["fid"]) for r in rows] == fids and [int(r["step"]) for r in rows] == \
        [2, 4, 6, 8, 10]
    seconds = [float(r["seconds"]) for r in rows]
    assert seconds == sorted(seconds) and seconds[0] > 0
    assert [b["epoch"] for _, b in scored] == [1, 2, 2, 2, 2]
    fields = summary_fields(state.extra)
    assert (fields["best_fid"], fields["best_epoch"], fields["final_fid"]) == (61.5, 2, 90.0)
    assert summary_fields({})["best_fid"] is None


def test_resume_keeps_the_history_and_the_best(tmp_path):
    fids = [80.0, 50.0, 70.0, 65.0]

    ckpt = tmp_path / "last.pt"
    first = Scripted(fids)
    with pytest.raises(Crash):
        train(images(), DIFFUSION, MODEL, cfg(epochs=4), device=CPU,
              callbacks=(fid_callback(tmp_path, first, 1, 4),
                         Checkpointer(ckpt, {}, every=1, epochs=4), CrashAt(2)))
    best_before = torch.load(best_file(tmp_path, 2), weights_only=True)
    rest = Scripted(fids[2:])
    state = train(images(), DIFFUSION, MODEL, cfg(epochs=4), device=CPU,
                  resume=model_file.load(ckpt), callbacks=(fid_callback(tmp_path, rest, 1, 4),))
    assert [r["epoch"] for r in state.extra["fid"]] == [1, 2, 3, 4]
    assert [r["fid"] for r in state.extra["fid"]] == fids
    assert len(rest.seen) == 2
    assert state.extra["fid_best"]["epoch"] == 2  # epoch 3's 70 and 4's 65 did not beat 50
    best = torch.load(best_file(tmp_path, 2), weights_only=True)
    assert all(torch.equal(best["ema"][k], best_before["ema"][k]) for k in best["ema"])
    rows = list(csv.DictReader((tmp_path / "train_fid.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]


def test_the_best_is_chosen_only_among_evaluations_with_the_same_settings():
    old = {"fid": 40.0, "epoch": 2, "sampler": "ddim", "steps": 50, "eta": 0.0, "samples": 100}
    extra = {"fid": [old], "fid_best": old}
    same = {"sampler": "ddim", "steps": 50, "eta": 0.0, "samples": 100}
    assert continue_best(extra, same) is None and extra["fid_best"] is old
    note = continue_best(extra, {**same, "samples": 1000})
    assert "samples 100 -> " in note and "samples 1000" in note
    assert extra["fid_best"] is None and extra["fid"] == [old]  # the row stays in the history


class ChannelStats(torch.nn.Module):
    """A cheap stand-in for the Inception network: 9 features per image."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return torch.cat([x.mean((2, 3)), x.std((2, 3)), x.amax((2, 3))], 1) * self.scale


def test_the_evaluator_samples_the_same_noise_every_time_and_scores_with_fid_scores():
    from ddpm.evaluate import fid
    from ddpm.model.diffusion import make_schedule
    from ddpm.train.fastpath import denoiser
    from ddpm.model.unet import UNet

    network = ChannelStats()
    real = np.random.default_rng(0).integers(0, 256, (30, 3, 16, 16), dtype=np.uint8)
    reference = fid.feature_stats(fid.extract_features(real, network))
    torch.manual_seed(0)
    model = UNet(MODEL).eval()
    wrapped = []

    def fast(m):
        wrapped.append(m)
        return denoiser(m, CPU, "fp32", "off", diffusion=DIFFUSION)

    evaluate = FidEvaluator(reference, 12, 4, make_schedule(DIFFUSION), 16, seed=5, device=CPU,
                            fast=fast, network=network, feature_batch=5)
    a, b = evaluate(model), evaluate(model)
    assert a == b and a["count_a"] == 12 and np.isfinite(a["fid"]) and a["kid"] is not None
    assert len(wrapped) == 1  # the model is wrapped once
    assert evaluate.settings == {"sampler": "ddim", "steps": 4, "eta": 0.0, "samples": 12}

    # The same numbers as sampling those images by hand and scoring them with fid.scores.
    from ddpm.config import GenerateConfig
    from ddpm.evaluate.generate import generate_samples

    by_hand = generate_samples(
        denoiser(model, CPU, "fp32", "off", diffusion=DIFFUSION), make_schedule(DIFFUSION),
        GenerateConfig(num_samples=12, sampler="ddim", steps=4, eta=0.0, batch_size=7, seed=5,
                       clip=True, variance="posterior"), 16, CPU)
    stats = fid.feature_stats(fid.extract_features(by_hand, network, batch_size=12))
    assert fid.scores(stats, reference, kid_subsets=100, kid_subset_size=12) == a
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    assert evaluate(model)["fid"] != a["fid"]  # the wrapper follows in-place updates

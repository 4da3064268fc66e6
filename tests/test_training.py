"""Training behaviour: it learns, it is reproducible, it resumes exactly, it stops on NaN."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, TINY, TINY_MODEL, Crash, CrashAt, run_stage, write_params, write_processed
from ddpm.evaluate import model_file
from ddpm.train import checkpoint
from ddpm.train.callbacks import Checkpointer
from ddpm.config import DiffusionConfig, TrainConfig
from ddpm.train.loop import NonFiniteLossError, dropout_seed, lr_at, train

MODEL = TINY_MODEL
DIFFUSION = DiffusionConfig(steps=40)


def images(n=8, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)


def cfg(**kw):
    base = dict(epochs=2, batch_size=4, lr=1e-3, warmup_epochs=0, seed=3, device="cpu",
                log_every=1, strip_every=0, compile="off", precision="fp32")
    return TrainConfig(**{**base, **kw})


def test_lr_warms_up_then_decays_to_the_floor():
    c = TrainConfig(epochs=10, warmup_epochs=2, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, 10, c) for s in range(100)]
    assert lrs[0] == pytest.approx(0.05) and lrs[19] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_a_tiny_model_overfits_one_batch():
    """Fixed x0, t and eps: the model + loss can drive the error far down."""
    from ddpm.model.diffusion import loss_per_image, make_schedule, q_sample
    from ddpm.model.pixels import to_model
    from ddpm.model.unet import UNet

    torch.manual_seed(0)
    model = UNet(MODEL)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = make_schedule(DIFFUSION)
    x0 = to_model(images(n=4))
    t = torch.tensor([3, 10, 20, 35])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    x_t = q_sample(schedule, x0, t, eps)
    losses = []
    for _ in range(150):
        loss = loss_per_image(model(x_t, t), eps).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]


def test_same_seed_same_weights_different_seed_different():
    data = images()
    runs = [train(data, DIFFUSION, MODEL, cfg(seed=s), device=torch.device("cpu")) for s in (3, 3, 4)]
    a, b, c = (r.ema.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import ddpm.train.step as step

    real = step.loss_per_image
    calls = {"n": 0}

    def poisoned(pred, eps):
        calls["n"] += 1
        loss = real(pred, eps)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(step, "loss_per_image", poisoned)
    path = tmp_path / "last.pt"
    saver = Checkpointer(path, {"run": 1}, every=1, epochs=5)
    with pytest.raises(NonFiniteLossError, match="last checkpoint"):
        train(images(), DIFFUSION, MODEL, cfg(epochs=5), device=torch.device("cpu"),
              callbacks=(saver,))
    saved = model_file.load(path)
    assert saved["epoch"] == 1 and saved["step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def processed(tmp_path, n=256, size=16):
    return write_processed(tmp_path / "processed", images(n=n, size=size).numpy())


def stage_args(workdir, data):
    return ["--data", str(data), "--model", str(workdir / "model.pt"),
            "--checkpoints", str(workdir / "ckpt"), "--reports", str(workdir / "reports"),
            "--strips", str(workdir / "strips")]


def test_resume_after_sigkill_ends_with_identical_weights(tmp_path):
    data = processed(tmp_path, n=96)  # 12 steps an epoch: a kill lands between checkpoints
    overrides = {**TINY, "train": {"epochs": 5, "batch_size": 8, "device": "cpu", "log_every": 8,
                                   "strip_every": 2, "warmup_epochs": 1, "compile": "off"}}
    params = write_params(tmp_path / "params.yaml", overrides)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_stage("train", "--params", str(params), *stage_args(straight, data), cwd=tmp_path)

    proc = subprocess.Popen([sys.executable, str(REPO / "stages" / "train.py"), "--params",
                             str(params), *stage_args(killed, data)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "ckpt" / "last.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted_at = model_file.load(ckpt)["epoch"]
    assert 1 <= interrupted_at < 5, "the run was not interrupted mid-training"
    assert not (killed / "model.pt").exists()
    # What a kill in the middle of a checkpoint's write leaves (SIGKILL skips the cleanup).
    half_written = ckpt.parent / ".last.pt.k1ll3d.tmp"
    half_written.write_bytes(b"\0" * 1000)

    done = run_stage("train", "--params", str(params), *stage_args(killed, data), cwd=tmp_path)
    assert f"resuming from {ckpt} at epoch {interrupted_at}" in done.stdout
    assert f"removed {half_written}" in done.stdout
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.pt"]
    a, b = model_file.load(straight / "model.pt"), model_file.load(killed / "model.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert (killed / "reports" / "train_loss.csv").read_text() != ""
    rows = (killed / "reports" / "train_loss.csv").read_text().splitlines()
    assert len(rows) == len((straight / "reports" / "train_loss.csv").read_text().splitlines())
    assert sorted(p.name for p in (killed / "strips").iterdir()) == \
        ["reverse_epoch0002.png", "reverse_epoch0004.png", "reverse_epoch0005.png"]


def test_a_checkpoint_from_other_settings_is_not_reused(tmp_path):
    data = processed(tmp_path, n=16)
    base = {**TINY, "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "compile": "off"}}
    run_stage("train", "--params", str(write_params(tmp_path / "a.yaml", base)),
              *stage_args(tmp_path / "w", data), cwd=tmp_path)
    changed = {**base, "model": {**TINY["model"], "dropout": 0.2}}
    done = run_stage("train", "--params", str(write_params(tmp_path / "b.yaml", changed)),
                     *stage_args(tmp_path / "w", data), cwd=tmp_path)
    assert "not resuming" in done.stdout and "model.dropout" in done.stdout
    report = json.loads((tmp_path / "w" / "reports" / "train.json").read_text())
    assert report["epochs"] == 1 and report["steps"] == 2


def slow_saves(monkeypatch, seconds=0.5):
    """Make checkpoint writes slow enough that the training thread runs on meanwhile."""
    real = checkpoint.save

    def save(path, payload):
        time.sleep(seconds)
        real(path, payload)

    monkeypatch.setattr(checkpoint, "save", save)


def test_a_background_checkpoint_holds_the_state_of_its_call(tmp_path, monkeypatch):
    slow_saves(monkeypatch)
    weights = torch.arange(6.0).view(2, 3)
    history = [{"loss": 1.0}]
    saver = checkpoint.BackgroundSaver()
    saver.save(tmp_path / "a.pt", {"w": weights, "history": history})
    weights += 100  # training goes on while the thread writes
    history.append({"loss": 0.5})
    saver.save(tmp_path / "b.pt", {"w": weights, "history": history})  # refills the buffers
    weights += 100
    saver.wait()
    a, b = model_file.load(tmp_path / "a.pt"), model_file.load(tmp_path / "b.pt")
    assert torch.equal(a["w"], torch.arange(6.0).view(2, 3)) and a["history"] == [{"loss": 1.0}]
    assert torch.equal(b["w"], torch.arange(6.0).view(2, 3) + 100) and len(b["history"]) == 2


def test_a_failed_background_write_is_raised_and_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    saver = checkpoint.BackgroundSaver()
    saver.save(path, {"epoch": 1})
    saver.wait()
    saver.save(path, {"epoch": 2, "bad": lambda: None})  # torch.save cannot pickle a lambda
    with pytest.raises(checkpoint.CheckpointWriteError, match="previous file was left"):
        saver.wait()
    assert model_file.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left
    saver.wait()  # the error was reported once


def test_train_waits_for_the_last_checkpoint_before_returning(tmp_path, monkeypatch):
    slow_saves(monkeypatch)
    path = tmp_path / "last.pt"
    state = train(images(), DIFFUSION, MODEL, cfg(epochs=2), device=torch.device("cpu"),
                  callbacks=(Checkpointer(path, {"run": 1}, every=1, epochs=2),))
    saved = model_file.load(path)  # no wait here: train() has closed the checkpointer
    assert saved["epoch"] == 2 and saved["step"] == state.step


def test_dropout_streams_differ_by_rank_and_epoch_and_repeat_exactly():
    seeds = {(rank, epoch): dropout_seed(42, rank, epoch) for rank in range(4) for epoch in range(3)}
    assert len(set(seeds.values())) == len(seeds)
    assert dropout_seed(42, 1, 2) == seeds[(1, 2)]
    assert all(0 <= s < 2**63 for s in seeds.values())  # torch.manual_seed takes it


def test_a_resumed_run_with_dropout_ends_with_identical_weights(tmp_path):
    dropped = dataclasses.replace(MODEL, dropout=0.3)
    cpu = torch.device("cpu")
    straight = train(images(), DIFFUSION, dropped, cfg(epochs=3), device=cpu)

    path = tmp_path / "last.pt"
    with pytest.raises(Crash):
        train(images(), DIFFUSION, dropped, cfg(epochs=3), device=cpu,
              callbacks=(Checkpointer(path, {}, every=1, epochs=3), CrashAt(1)))
    torch.manual_seed(12345)  # whatever the process drew meanwhile
    torch.rand(100)
    resumed = train(images(), DIFFUSION, dropped, cfg(epochs=3), device=cpu,
                    resume=model_file.load(path))
    assert model_file.load(path)["epoch"] == 1 and resumed.epoch == 3
    for a, b in ((straight.model, resumed.model), (straight.ema.model, resumed.ema.model)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                     b.state_dict().values()))


def test_only_a_files_own_stale_temporaries_are_removed(tmp_path):
    from ddpm import atomic

    keep = [tmp_path / n for n in ("last.pt", ".model.pt.x1.tmp", ".last.pt.tmpdir", "a.tmp")]
    stale = [tmp_path / n for n in (".last.pt.x1.tmp", ".last.pt.y2.tmp")]
    for path in keep + stale:
        path.write_text("x")
    assert atomic.remove_stale_temps(tmp_path / "last.pt") == stale
    assert sorted(tmp_path.iterdir()) == sorted(keep)
    assert atomic.remove_stale_temps(tmp_path / "missing" / "last.pt") == []


def test_a_failing_close_does_not_hide_the_error_that_stopped_training(monkeypatch):
    import ddpm.train.step as step

    real = step.loss_per_image
    monkeypatch.setattr(step, "loss_per_image", lambda pred, eps: real(pred, eps) * float("nan"))
    closed = []

    class BrokenClose:
        def on_log(self, row):
            pass

        def on_epoch_end(self, state, summary):
            pass

        def close(self):
            closed.append(self)
            raise checkpoint.CheckpointWriteError("disk full")

    callbacks = (BrokenClose(), BrokenClose())
    with pytest.warns(UserWarning, match="disk full"), pytest.raises(NonFiniteLossError):
        train(images(), DIFFUSION, MODEL, cfg(), device=torch.device("cpu"), callbacks=callbacks)
    assert closed == list(callbacks)  # every close ran
    monkeypatch.undo()
    closed.clear()
    # Nothing else failed: the first close error is raised, the second warned about.
    with pytest.warns(UserWarning, match="disk full"), \
            pytest.raises(checkpoint.CheckpointWriteError, match="disk full"):
        train(images(), DIFFUSION, MODEL, cfg(epochs=1), device=torch.device("cpu"),
              callbacks=callbacks)
    assert closed == list(callbacks)


def test_written_files_and_folders_get_the_usual_mode(tmp_path):
    from ddpm import atomic

    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "a.txt", "x")
        with atomic.atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
        checkpoint.save(tmp_path / "c.pt", {"a": 1})
        os.umask(0o077)
        atomic.write_text(tmp_path / "private.txt", "z")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.txt": 0o644, "d": 0o755, "c.pt": 0o644, "private.txt": 0o600}


def reference_training(data, diffusion_cfg, model_cfg, c):
    """The training step as it was written before `step.TrainStep` (2026-11-30): a Python
    float LR, EMA lerp with a float weight, the batch sliced on the host. Kept here only
    as the reference the capturable step is held to."""
    from ddpm.model.diffusion import loss_per_image, make_schedule, q_sample
    from ddpm.model.pixels import to_model
    from ddpm.model.unet import UNet

    torch.manual_seed(c.seed)
    model = UNet(model_cfg)
    ema = UNet(model_cfg)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    order_gen = torch.Generator().manual_seed(c.seed)
    noise_gen = torch.Generator().manual_seed(c.seed + 1)
    schedule = make_schedule(diffusion_cfg)
    n, batch = len(data), min(c.batch_size, len(data))
    epoch_steps, step, updates, sums = n // batch, 0, 0, []
    for epoch in range(c.epochs):
        torch.manual_seed(dropout_seed(c.seed, 0, epoch))
        order = torch.randperm(n, generator=order_gen)
        epoch_sum = torch.zeros(())
        for i in range(epoch_steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, epoch_steps, c)
            flip = torch.rand(batch, generator=noise_gen) < 0.5
            t = torch.randint(0, schedule.T, (batch,), generator=noise_gen)
            eps = torch.randn((batch, *data.shape[1:]), generator=noise_gen)
            x0 = to_model(data[order[i * batch:(i + 1) * batch]])
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
            loss = loss_per_image(model(q_sample(schedule, x0, t, eps), t), eps).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
            opt.step()
            decay = min(c.ema_decay, (1 + updates) / (10 + updates))
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
            updates += 1
            step += 1
            epoch_sum += loss.detach()
        sums.append(float(epoch_sum / epoch_steps))
    return model, ema, sums


def test_the_capturable_step_computes_the_previous_step_bit_for_bit():
    """On a CPU the step, with its device buffers (data order, cursor, LR and EMA weight
    as 0-d tensors, loss sums), gives the old step's weights, EMA and epoch losses exactly:
    the CPU's float64 LR tensor reaches Adam as the same number (CPU Adam reads it with
    .item(); a float32 one moved weights by up to 3e-4 in 4 steps, Adam amplifying the
    rounding), and the List overload of foreach lerp rounds as the float-weight one does.
    On CUDA (fused, capturable Adam, float32 LR) the rounding may differ: that is for a
    GPU run to bound (scripts/gpu_check.py, part graph)."""
    model_cfg = dataclasses.replace(MODEL, dropout=0.2)
    c = cfg(epochs=2, batch_size=4, warmup_epochs=1, grad_clip=1.0, ema_decay=0.99)
    data = images(n=10)  # 2 full batches per epoch, the last 2 images dropped
    model, ema, sums = reference_training(data, DIFFUSION, model_cfg, c)
    state = train(data, DIFFUSION, model_cfg, c, device=torch.device("cpu"))
    assert state.step == 4 and state.ema.updates == 4
    for ours, theirs in ((state.model, model), (state.ema.model, ema)):
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), name
    assert [e["loss"] for e in state.epochs_done] == sums

"""The train part: everything that turns data into weights.

    step.py        the one training step (draws, noising, loss, Adam, EMA), built to be
                   captured whole in a CUDA graph; the train stage and the bench run it
    loop.py        the training loop in phases; callbacks at their cadence
    callbacks.py   progress, loss CSV, strips, checkpoints, live metrics
    fid_curve.py   FID while training, and the best weights
    checkpoint.py  checkpoints as plain data, written in the background (read back by
                   `ddpm.evaluate.model_file`)
    fastpath.py    bf16, channels-last, torch.compile, and the sampling denoiser
    distributed.py several processes, one per GPU
    stage.py       the train stage: inputs, the resume rule, workers, outputs

May import: the top-level modules, `ddpm.data`, `ddpm.model`, `ddpm.evaluate`, and
`ddpm.tracking` (stage.py only: the loop and the callbacks take a tracker as an
object). This file imports nothing, so the generate stage, which samples with the
fast path, does not depend on the training loop.
"""

"""DDPM on Stanford Cars: the library behind the DVC stages and the `ddpm` command.

The folders are the pipeline's parts, each importing only the ones above it here:

    config, atomic, device, stageutil, lineage   shared by every part (params, writing
                                                 files, devices, stage plumbing, code lineage)
    data/       download, synthetic cars, decoding to 64x64 arrays, the processed set
    model/      the U-Net, the diffusion math, the samplers, uint8 <-> [-1, 1]
    evaluate/   FID/KID (`evaluate.fid`), sampling a model, figures
    tracking/   MLflow: the only part that imports it
    train/      the training step, the loop, callbacks, checkpoints, the train stage
    tools/      the `ddpm` command, the benchmark, the demo

The core runs wherever torch does: `ddpm.model` imports only torch and numpy,
`ddpm.data`'s decoding Pillow and numpy besides; MLflow, DVC and kaggle are
imported inside the few functions that need them.
"""

__version__ = "0.1.0"

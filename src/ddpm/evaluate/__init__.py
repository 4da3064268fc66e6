"""The evaluate part: samples from a trained model, and how good they are.

    fid/         FID and KID with the standard TF-Inception features (`evaluate.fid`:
                 features.py, statistics.py, folders.py); the reference and evaluate
                 stages, `ddpm fid` and the in-training FID all score through it
    generate.py  samples from a denoiser (each image its own seed) and the generate
                 stage's figures
    figures.py   PNG grids, strips and GIFs of uint8 images
    model_file.py a trained model's file read back (weights_only) and its U-Net rebuilt:
                 what generate, the sweep, `ddpm sample` and the MLflow model sample from

May import: the top-level modules, `ddpm.model`, `ddpm.data.formats`, torch, numpy,
scipy, Pillow. Never training or tracking. This file imports nothing, so the evaluate
stage depends on fid/ alone, not on the model.
"""

"""A trained model's file read back: models/model.pt, models/best.pt or a checkpoint, loaded
with `weights_only=True` (never running pickled code), and the U-Net rebuilt from it for
sampling. The train stage writes these files (`ddpm.train.checkpoint`); everything that
samples (generate, sweep, `ddpm sample`, the MLflow model) reads them here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import DiffusionConfig, ModelConfig
from ..model.unet import UNet


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be read. `reason` names the file and what is
    wrong; the message adds what to do."""

    def __init__(self, reason: str, hint: str):
        super().__init__(f"{reason}; {hint}")
        self.reason = reason


def load(path: str | Path, map_location: str | torch.device = "cpu",
         hint: str = "delete or move it, then rerun") -> dict[str, Any]:
    """A checkpoint's payload; CheckpointError (naming the file, with `hint`) if the file is
    truncated, not a checkpoint, or holds pickled objects that weights_only refuses."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - torch.load fails in many ways
        text = str(err)
        if "WeightsUnpickler error:" in text:  # not torch's advice to load it unsafely
            detail = "it holds data weights_only loading refuses: " + " ".join(
                text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
                .split())
        else:
            detail = f"{type(err).__name__}: " + " ".join(text.split())[:200]
        raise CheckpointError(f"{path} is not a readable checkpoint ({detail[:200]})",
                              hint) from None


def model_config(saved: dict[str, Any]) -> ModelConfig:
    """The ModelConfig a payload's `config["model"]` (or `run["model"]`) describes.

    Models saved before `model.attention_norm` existed all normalised their
    attention input: without the key, that is what is rebuilt, never the new default.
    """
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
    values.setdefault("attention_norm", True)
    return ModelConfig(**values)


def load_model(payload: dict[str, Any], weights: str = "ema",
               device: torch.device | str = "cpu",
               source: str | Path = "the checkpoint") -> tuple[UNet, DiffusionConfig, int]:
    """Rebuild the U-Net from a models/model.pt payload: (model, diffusion config, image size).
    A payload of another kind is a CheckpointError naming `source`."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    key = "ema" if weights == "ema" else "model"
    try:
        cfg = payload["config"]
        model = UNet(model_config(cfg["model"]))
        model.load_state_dict(payload[key])
        diffusion = DiffusionConfig(**cfg["diffusion"])
        size = int(cfg["image_size"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        detail = " ".join(str(err).split())[:160]
        raise CheckpointError(f"{source} is not a model written by the train stage (no "
                              f"usable 'config' and '{key}' weights: {type(err).__name__}: "
                              f"{detail})", "give models/model.pt or models/best.pt, or "
                              "rerun the train stage (dvc repro train)") from None
    model.to(device).eval().requires_grad_(False)
    return model, diffusion, size

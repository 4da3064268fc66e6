"""The model part: what a DDPM is, apart from how it is trained or scored.

    unet.py      the U-Net, `model(x_t, t) -> eps`; it knows nothing of diffusion
    diffusion.py the DDPM math as pure tensor functions (schedule, q(x_t|x0), posterior,
                 loss, one reverse step)
    samplers.py  reverse-diffusion samplers with one signature, by name (SAMPLERS)
    pixels.py    the one pair of conversions, uint8 images <-> the model's [-1, 1]

May import: torch, numpy and `ddpm.config` (its dataclasses; config reads YAML only
inside `load_params`). Nothing else of the package, no Pillow, no I/O: it runs
wherever torch does (tests/test_layout.py imports it with yaml, tqdm, mlflow, dvc and
kaggle unimportable).
"""

from .diffusion import Schedule, make_schedule
from .pixels import to_model, to_uint8
from .samplers import SAMPLERS, Denoiser, ImageNoise, get_sampler
from .unet import UNet, count_parameters, forward_flops

__all__ = ["SAMPLERS", "Denoiser", "ImageNoise", "Schedule", "UNet", "count_parameters",
           "forward_flops", "get_sampler", "make_schedule", "to_model", "to_uint8"]

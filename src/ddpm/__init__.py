"""DDPM on Stanford Cars: the library behind the DVC stages and the `ddpm` command.

Core modules import only torch, numpy and Pillow; MLflow, DVC and kaggle are
imported inside the few functions that need them.
"""

__version__ = "0.1.0"

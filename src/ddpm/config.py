"""Typed, frozen configuration: one dataclass per `params.yaml` section.

`load_params()` validates the whole file once (unknown keys, types, allowed
values, cross-section constraints) and raises `ConfigError` with the dotted
key and what would be accepted, so a stage stops before doing any work.
Each component is then handed only its own section.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional


class ConfigError(ValueError):
    """A params.yaml value is missing, unknown, of the wrong type or impossible."""


def _fail(key: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"params.yaml: {key}: {message}")


def _check_device(key: str, device: str) -> None:
    index = device.removeprefix("cuda:")
    if not (device in ("auto", "cpu", "cuda")
            or (device.startswith("cuda:") and index.isdigit() and index.isascii())):
        _fail(key, f"allowed: auto, cpu, cuda, cuda:N (N a GPU index: 0, 1, ...); "
              f"got {device!r}")


# The samplers of `ddpm.model.samplers.SAMPLERS` (tests/test_config.py holds the two equal).
Sampler = Literal["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde"]


def _check_sampling(key: str, sampler: str, steps: int, eta: float, names: tuple[str, str]) -> None:
    """What each sampler can honour: steps >= 1 (at most diffusion.steps, checked with the
    diffusion section), eta >= 0, and eta 0 for the deterministic dpmpp_2m, > 0 for its
    SDE. `names` are the keys of steps and eta in the section (for the messages)."""
    steps_key, eta_key = f"{key}.{names[0]}", f"{key}.{names[1]}"
    if steps < 1:
        _fail(steps_key, f"must be >= 1, got {steps}")
    if not 0 <= eta < float("inf"):  # NaN too
        _fail(eta_key, f"must be a finite number >= 0, got {eta}")
    if sampler == "dpmpp_2m" and eta != 0:
        _fail(eta_key, f"sampler dpmpp_2m (DPM-Solver++(2M), the ODE) adds no noise, so eta "
              f"must be 0, got {eta}; for noise use sampler dpmpp_2m_sde")
    if sampler == "dpmpp_2m_sde" and eta == 0:
        _fail(eta_key, "sampler dpmpp_2m_sde needs eta > 0 (1 = the reverse SDE); eta 0 is "
              "sampler dpmpp_2m")


def _check_steps_fit(key: str, sampler: str, steps: int, diffusion_steps: int) -> None:
    if sampler != "ddpm" and steps > diffusion_steps:
        _fail(key, f"{sampler} can take at most diffusion.steps ({diffusion_steps}) model "
              f"evaluations, got {steps}")


# The folder the preprocess stage reads when data.source is kaggle, archive or synthetic: the
# download stage's output (dvc.yaml's paths.raw). data.folder is never null: dvc.yaml names it
# as the preprocess stage's dependency, and DVC cannot parse a dependency on nothing.
DOWNLOADED = "data/raw"


@dataclass(frozen=True)
class DataConfig:
    source: Literal["kaggle", "archive", "synthetic", "folder"] = "kaggle"
    kaggle_dataset: str = "eduardo4jesus/stanford-cars-dataset"
    archive: Optional[str] = None  # path to a zip of images (source: archive)
    # The images the preprocess stage decodes: DOWNLOADED, or with source: folder the
    # absolute path of a folder of your own (DVC hashes it there).
    folder: str = DOWNLOADED
    synthetic_count: int = 2000
    seed: int = 0

    def check(self, key: str) -> None:
        if self.source == "archive" and not self.archive:
            _fail(f"{key}.archive", "data.source is 'archive' but no archive path is set; "
                  "set data.archive to the path of the downloaded zip")
        if self.source == "kaggle" and self.kaggle_dataset.count("/") != 1:
            _fail(f"{key}.kaggle_dataset", f"expected 'owner/dataset', got {self.kaggle_dataset!r}")
        if self.synthetic_count < 2:
            _fail(f"{key}.synthetic_count", f"must be >= 2 (one image per split), "
                  f"got {self.synthetic_count}")
        self._check_folder(f"{key}.folder")

    def _check_folder(self, key: str) -> None:
        downloaded = os.path.normpath(self.folder) == DOWNLOADED
        if self.source != "folder" and not downloaded:
            _fail(key, f"is {self.folder!r}, but data.source is {self.source!r}, whose images "
                  f"the download stage puts in {DOWNLOADED}: set data.source: folder to train "
                  f"on that folder, or data.folder back to {DOWNLOADED}")
        if self.source != "folder":
            return
        if downloaded:
            _fail(key, f"data.source is 'folder' but data.folder is {DOWNLOADED} (the download "
                  f"stage's output): set data.folder to the absolute path of your images' folder")
        if not os.path.isabs(self.folder):
            root = os.environ.get("DVC_ROOT") or os.getcwd()
            full = os.path.normpath(os.path.join(root, os.path.expanduser(self.folder)))
            _fail(key, f"{self.folder!r} is not an absolute path; write it in full (here "
                  f"{full!r}): DVC hashes the folder at the path written in params.yaml, expands "
                  f"no '~', and runs queued and --temp experiments in a copy of the repository, "
                  f"where a relative path leads elsewhere")


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 64
    resize: Literal["squash", "center_crop", "bbox_crop"] = "squash"
    bbox_margin: float = 0.1  # fraction of the box's size added on each side (bbox_crop)
    max_bad_fraction: float = 0.01  # more unreadable files than this fails the stage
    workers: int = 0  # decoding processes; 0 = all CPU cores

    def check(self, key: str) -> None:
        if not 8 <= self.image_size <= 1024:
            _fail(f"{key}.image_size", f"must be between 8 and 1024, got {self.image_size}")
        if self.bbox_margin < 0:
            _fail(f"{key}.bbox_margin", f"must be >= 0, got {self.bbox_margin}")
        if not 0 <= self.max_bad_fraction < 1:
            _fail(f"{key}.max_bad_fraction", f"must be in [0, 1), got {self.max_bad_fraction}")
        if self.workers < 0:
            _fail(f"{key}.workers", f"must be >= 0 (0 = all cores), got {self.workers}")


@dataclass(frozen=True)
class DiffusionConfig:
    steps: int = 512
    schedule: Literal["linear", "cosine"] = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # What the U-Net's output means: the noise eps (the seed's), v = alpha_t eps - sigma_t x0
    # (Salimans & Ho 2022) or the clean image x0. A model file without the key is an eps
    # model (`ddpm.model.diffusion` has the conversions).
    prediction: Literal["eps", "v", "x0"] = "eps"

    def check(self, key: str) -> None:
        if self.steps < 2:
            _fail(f"{key}.steps", f"must be >= 2, got {self.steps}")
        if not 0 < self.beta_start < 1:
            _fail(f"{key}.beta_start", f"must be in (0, 1), got {self.beta_start}")
        if not 0 < self.beta_end < 1:
            _fail(f"{key}.beta_end", f"must be in (0, 1), got {self.beta_end}")
        if self.beta_end <= self.beta_start:
            _fail(f"{key}.beta_end", f"must be greater than beta_start ({self.beta_start}), "
                  f"got {self.beta_end}")


@dataclass(frozen=True)
class ModelConfig:
    channels: tuple[int, ...] = (64, 128, 256, 512)
    attention: tuple[bool, ...] = (False, False, True, True)
    blocks_per_level: int = 2
    dropout: float = 0.1
    groups: int = 32  # GroupNorm groups; every width must be divisible by it
    # Attention on GroupNorm(x) (true) or on x itself (false: the seed module's function,
    # whose norm is created but never applied); see unet.AttentionBlock.
    attention_norm: bool = False

    def check(self, key: str) -> None:
        if not self.channels:
            _fail(f"{key}.channels", "needs at least one level")
        if len(self.attention) != len(self.channels):
            _fail(f"{key}.attention", f"needs one entry per level of model.channels "
                  f"({len(self.channels)}), got {len(self.attention)}")
        for width in self.channels:
            if width < 1 or width % self.groups:
                _fail(f"{key}.channels", f"every width must be a positive multiple of "
                      f"model.groups ({self.groups}), got {list(self.channels)}")
        if self.blocks_per_level < 1:
            _fail(f"{key}.blocks_per_level", f"must be >= 1, got {self.blocks_per_level}")
        if not 0 <= self.dropout < 1:
            _fail(f"{key}.dropout", f"must be in [0, 1), got {self.dropout}")
        if self.groups < 1:
            _fail(f"{key}.groups", f"must be >= 1, got {self.groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-4
    warmup_epochs: float = 10
    min_lr_ratio: float = 0.1
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1+n)/(10+n)) so short runs track the weights
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    checkpoint_every: int = 1  # epochs between resumable checkpoints
    strip_every: int = 1  # epochs between reverse-diffusion strips (0 = never)
    log_every: int = 50  # steps between loss readings (one host sync each)
    grad_clip: float = 0.0  # max global grad norm (0 = off)
    flip: bool = True  # random horizontal flips
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    compile: Literal["auto", "on", "off"] = "auto"  # auto = torch.compile on CUDA only
    # torch.compile's mode when compiling: reduce-overhead replays CUDA graphs.
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto = channels-last on CUDA only
    # Capture the whole training step in one CUDA graph. auto = off until a GPU run has
    # shown it equal to the uncaptured step, and faster (docs/speed.md).
    cuda_graph: Literal["auto", "on", "off"] = "auto"
    nproc: int = 1  # training processes (one per GPU)
    # In-training FID of the EMA model: every fid_every epochs and the last (0 = never),
    # on fid_samples samples of fid_sampler over fid_steps model evaluations with fid_eta,
    # against the reference stats. The defaults are the generate stage's (ddpm, all T
    # steps), so the curve and the final score are the same measurement.
    fid_every: int = 10
    fid_samples: int = 1000
    fid_sampler: Sampler = "ddpm"
    fid_steps: int = 512
    fid_eta: float = 0.0
    # The weight of each image's loss by its t: none (plain MSE, the seed's) or min_snr,
    # min(SNR_t, gamma) on the x0 error (Hang et al. 2023), whatever the prediction.
    loss_weighting: Literal["none", "min_snr"] = "none"
    min_snr_gamma: float = 5.0

    def check(self, key: str) -> None:
        if not self.min_snr_gamma > 0:  # NaN too
            _fail(f"{key}.min_snr_gamma", f"must be > 0 (5 is the paper's advice), got "
                  f"{self.min_snr_gamma}")
        for name in ("epochs", "batch_size", "checkpoint_every", "log_every", "nproc"):
            if getattr(self, name) < 1:
                _fail(f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            _fail(f"{key}.lr", f"must be > 0, got {self.lr}")
        if self.warmup_epochs < 0:
            _fail(f"{key}.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        if not 0 <= self.min_lr_ratio <= 1:
            _fail(f"{key}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.ema_decay < 1:
            _fail(f"{key}.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if self.strip_every < 0:
            _fail(f"{key}.strip_every", f"must be >= 0 (0 = never), got {self.strip_every}")
        if self.fid_every < 0:
            _fail(f"{key}.fid_every", f"must be >= 0 (0 = never), got {self.fid_every}")
        if self.fid_samples < 2:
            _fail(f"{key}.fid_samples", f"must be >= 2 (FID needs a covariance), "
                  f"got {self.fid_samples}")
        _check_sampling(key, self.fid_sampler, self.fid_steps, self.fid_eta,
                        ("fid_steps", "fid_eta"))
        if self.grad_clip < 0:
            _fail(f"{key}.grad_clip", f"must be >= 0 (0 = off), got {self.grad_clip}")
        if self.nproc > 1 and self.device.startswith("cuda:"):
            _fail(f"{key}.device", f"{self.device!r} names one GPU, but train.nproc is "
                  f"{self.nproc} (one process per GPU, GPUs 0 to {self.nproc - 1}); set "
                  f"train.device: cuda (or auto), or train.nproc: 1")
        if self.cuda_graph == "on" and self.compile_mode in ("reduce-overhead", "max-autotune"):
            _fail(f"{key}.cuda_graph", f"'on' captures the whole step in one CUDA graph, so "
                  f"torch.compile must not make graphs of its own: set train.compile_mode to "
                  f"default or max-autotune-no-cudagraphs (it is {self.compile_mode!r})")
        _check_device(f"{key}.device", self.device)


@dataclass(frozen=True)
class GenerateConfig:
    num_samples: int = 10000
    sampler: Sampler = "ddpm"
    steps: int = 512  # model evaluations; ddpm always takes all diffusion.steps
    # ddim: its noise (0 deterministic, 1 ancestral-like); dpmpp_2m: 0; dpmpp_2m_sde: > 0,
    # the Langevin part's scale (1 = the reverse SDE); ddpm: unused
    eta: float = 0.0
    batch_size: int = 500
    seed: int = 1234
    weights: Literal["ema", "raw"] = "ema"
    # Which trained weights: models/model.pt (the last epoch's) or models/best.pt (the
    # best in-training FID's).
    checkpoint: Literal["final", "best"] = "final"
    # DDPM's sigma_t^2: the posterior's beta_tilde_t, or beta_t (the seed module's); Ho et
    # al. found both equally good. DDIM takes its noise from eta instead.
    variance: Literal["posterior", "beta"] = "posterior"
    clip: bool = True  # clamp the predicted x0 to [-1, 1] (the seed module does not)
    grid_size: int = 64  # images in the sample grid
    device: str = "auto"

    def check(self, key: str) -> None:
        for name in ("num_samples", "batch_size", "grid_size"):
            if getattr(self, name) < 1:
                _fail(f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check_sampling(key, self.sampler, self.steps, self.eta, ("steps", "eta"))
        if self.variance != "posterior" and self.sampler != "ddpm":
            _fail(f"{key}.variance", f"{self.variance!r} is for sampler 'ddpm'; the "
                  f"{self.sampler} sampler's noise is set by generate.eta. Set "
                  f"generate.variance: posterior, or generate.sampler: ddpm")
        _check_device(f"{key}.device", self.device)


@dataclass(frozen=True)
class EvaluateConfig:
    kid: bool = True
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    batch_size: int = 100  # Inception batch
    device: str = "auto"

    def check(self, key: str) -> None:
        for name in ("kid_subsets", "batch_size"):
            if getattr(self, name) < 1:
                _fail(f"{key}.{name}", f"must be >= 1, got {getattr(self, name)}")
        if self.kid_subset_size < 2:
            _fail(f"{key}.kid_subset_size", f"must be >= 2 (KID's unbiased estimate needs two "
                  f"images per set), got {self.kid_subset_size}")
        _check_device(f"{key}.device", self.device)


def default_eta(sampler: str) -> float:
    """eta where none is given: 1 for dpmpp_2m_sde (the reverse SDE), else 0."""
    return 1.0 if sampler == "dpmpp_2m_sde" else 0.0


@dataclass(frozen=True)
class SweepPoint:
    """One sampler setting of the sweep: `steps` model evaluations (ddpm: all T)."""

    sampler: Sampler = "ddim"
    steps: int = 20
    eta: Optional[float] = None  # null: the sampler's default (`default_eta`)

    def check(self, key: str) -> None:
        _check_sampling(key, self.sampler, self.steps, self.noise, ("steps", "eta"))

    @property
    def noise(self) -> float:
        return default_eta(self.sampler) if self.eta is None else self.eta


@dataclass(frozen=True)
class SweepConfig:
    """FID and KID of the trained model at each `points` setting, on `num_samples` samples
    (image i from seed (seed, i), so every point samples from the same noise)."""

    num_samples: int = 1000
    points: tuple[SweepPoint, ...] = (
        SweepPoint("ddim", 10), SweepPoint("ddim", 20), SweepPoint("ddim", 50),
        SweepPoint("dpmpp_2m", 10), SweepPoint("dpmpp_2m", 20), SweepPoint("dpmpp_2m", 50))
    batch_size: int = 500
    seed: int = 1234
    clip: bool = True
    device: str = "auto"

    def check(self, key: str) -> None:
        if self.num_samples < 2:
            _fail(f"{key}.num_samples", f"must be >= 2 (FID needs a covariance), got "
                  f"{self.num_samples}")
        if self.batch_size < 1:
            _fail(f"{key}.batch_size", f"must be >= 1, got {self.batch_size}")
        seen = set()
        for i, point in enumerate(self.points):
            setting = (point.sampler, point.steps, point.noise)
            if setting in seen:
                _fail(f"{key}.points[{i}]", f"{point.sampler} at {point.steps} steps with eta "
                      f"{point.noise} is listed twice")
            seen.add(setting)
        _check_device(f"{key}.device", self.device)


@dataclass(frozen=True)
class MlflowConfig:
    experiment: str = "ddpm-cars"
    tracking_uri: Optional[str] = None  # null = sqlite:///mlflow.db at the repository root
    enabled: bool = True
    # The train stage logs its final (and best) EMA model as an MLflow LoggedModel that
    # samples cars, and registers the final one as a new version of this model ("" = none).
    log_model: bool = True
    registered_model: str = "ddpm-stanford-cars"

    def check(self, key: str) -> None:
        if not self.experiment:
            _fail(f"{key}.experiment", "must be a non-empty name")
        if self.registered_model and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._ -]*",
                                                      self.registered_model):
            _fail(f"{key}.registered_model", f"{self.registered_model!r}: use letters, digits, "
                  f"'.', '_', '-' and spaces (it is part of models:/<name>/<version>), or '' "
                  f"for no registration")
        if self.registered_model and not self.log_model:
            _fail(f"{key}.registered_model", "registering needs mlflow.log_model: true (or set "
                  "registered_model: '')")


@dataclass(frozen=True)
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def check(self) -> None:
        if self.data.source == "folder" and self.preprocess.resize == "bbox_crop":
            _fail("preprocess.resize", "'bbox_crop' crops to the Stanford Cars devkit's bounding "
                  "boxes, which a folder of your own images does not have: use 'squash' (the "
                  "whole picture, stretched to a square) or 'center_crop' (its middle square)")
        factor = self.model.downsample_factor
        if self.preprocess.image_size % factor:
            _fail("preprocess.image_size",
                  f"the U-Net halves the image {len(self.model.channels) - 1} times "
                  f"(model.channels has {len(self.model.channels)} levels), so it must be a "
                  f"multiple of {factor}; got {self.preprocess.image_size}")
        T = self.diffusion.steps
        _check_steps_fit("generate.steps", self.generate.sampler, self.generate.steps, T)
        _check_steps_fit("train.fid_steps", self.train.fid_sampler, self.train.fid_steps, T)
        for i, point in enumerate(self.sweep.points):
            _check_steps_fit(f"sweep.points[{i}].steps", point.sampler, point.steps, T)


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return "mappings with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it in the dataclass's form."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            _fail(key, f"{value!r} is not allowed; allowed: {', '.join(map(str, allowed))}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is tuple:
        (inner, _) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            _fail(key, f"expected a list of {_type_name(inner)}, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"expected a whole number, got {value!r}")
        return value
    if tp is float:
        # YAML reads "1e-4" (no dot) as a string; accept it as a number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _build(cls: type, raw: Any, key: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        _fail(key, f"expected a mapping of settings, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        _fail(f"{key}.{unknown[0]}", f"unknown key; known keys of '{key}': {', '.join(names)}")
    values = {name: _coerce(f"{key}.{name}", raw[name], hints[name]) for name in raw}
    section = cls(**values)
    section.check(key)
    return section


def params_from_dict(raw: Any) -> Params:
    """Validate a parsed params.yaml (all sections, then cross-section rules)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("params.yaml: expected a mapping of sections at the top level")
    hints = typing.get_type_hints(Params)
    names = [f.name for f in dataclasses.fields(Params)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        _fail(unknown[0], f"unknown section; known sections: {', '.join(names)}")
    params = Params(**{name: _build(hints[name], raw.get(name), name) for name in names})
    params.check()
    return params


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml; `overrides` maps dotted keys to values."""
    import yaml  # here, so that the model's configs import without PyYAML

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found; run from the repository root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    for dotted, value in (overrides or {}).items():
        apply_override(raw, dotted, value)
    return params_from_dict(raw)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set section.key=value` arguments as {dotted key: YAML value}."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.precision=bf16")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not YAML ({err})") from None
    return overrides


def apply_override(raw: dict, dotted: str, value: Any) -> None:
    """Set `section.key` in a raw params mapping (used by the demo and the CLI)."""
    section, _, key = dotted.partition(".")
    if not key:
        raise ConfigError(f"override {dotted!r}: expected 'section.key'")
    raw.setdefault(section, {})
    if raw[section] is None:
        raw[section] = {}
    raw[section][key] = value


def as_dict(section: Any) -> dict[str, Any]:
    """A section (or Params) as plain YAML-able data: tuples become lists."""
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(section))


def flatten(params: Params) -> dict[str, Any]:
    """`{"train.lr": 1e-4, ...}` for trackers and run comparisons."""
    flat = {}
    for name, section in as_dict(params).items():
        for key, value in section.items():
            flat[f"{name}.{key}"] = value
    return flat

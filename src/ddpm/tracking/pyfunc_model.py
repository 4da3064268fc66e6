"""The MLflow model that samples cars: what `mlflow.pyfunc.load_model` and `mlflow models serve`
run. Logged as a model from code (`tracking/models.py`): this file is copied into the model,
the `ddpm` package beside it as its code, the weights as the `checkpoint` artifact in the train
stage's format (loaded with weights_only) and the defaults as the `sampling` artifact.

    model = mlflow.pyfunc.load_model("models:/ddpm-stanford-cars@champion")  # or /<version>
    images = model.predict({"num_samples": 8, "seed": 0, "sampler": "ddim", "steps": 20})
    # uint8, 8 x S x S x 3; the same images as `ddpm sample -n 8 --seed 0 --sampler ddim --steps 20`

A request is one dict (or a one-row DataFrame, or a list of one dict; served, the JSON
`{"inputs": {...}}` or `{"dataframe_records": [{...}]}`) with any of the keys of
`models.REQUEST_TYPES` (num_samples, seed, sampler, steps, eta, clip); the ones
left out take the defaults the run logged. A bad request is an MlflowException of one line,
which the scoring server answers with HTTP 400: a value of the wrong type (a fractional
`steps`), a `seed` below 0, a NaN or infinite `eta`, a count outside 1..max_samples, an
unknown sampler, or more work than the model's bound: num_samples x model evaluations (ddpm:
all T) above `max_work` of the sampling defaults, which the train stage records with the model.

The signature (`models.signature`) names the request keys with type Any: MLflow casts a
served `inputs` value to a typed column before `predict` sees it (4.5 -> 4 for a long, "no"
-> True for a boolean), so a typed column would let those bad requests through; their types
are checked here. MLflow drops keys the signature does not name, with its warning "Found
extra inputs ... These inputs will be ignored".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel



class BadRequest(MlflowException):
    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def _scalar(key: str, value: Any) -> Any:
    """A plain Python value from what MLflow's input parsing makes of one (a 0-d or
    one-element numpy array, a list of one)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        if len(value) != 1:
            raise BadRequest(f"{key}: give one value, got {len(value)}")
        value = value[0]
    return value


def _request(model_input: Any) -> dict[str, Any]:
    from ddpm.tracking.models import REQUEST_TYPES

    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a DataFrame
        if len(model_input) == 0 and len(model_input.columns) == 0:
            return {}  # `{}`, as MLflow's schema enforcement hands it on: every default
        if len(model_input) != 1:
            raise BadRequest(f"one request per call, got {len(model_input)} rows")
        model_input = model_input.to_dict(orient="records")[0]
    if isinstance(model_input, list) and len(model_input) == 1:
        model_input = model_input[0]
    if model_input is None:
        model_input = {}
    if not isinstance(model_input, dict):
        raise BadRequest(f"the request must be a dict with any of {', '.join(REQUEST_TYPES)}; "
                         f"got {type(model_input).__name__}")
    unknown = sorted(set(model_input) - set(REQUEST_TYPES))
    if unknown:
        raise BadRequest(f"unknown request key(s) {', '.join(map(str, unknown))}; the keys are "
                         f"{', '.join(REQUEST_TYPES)}")
    request = {key: _scalar(key, value) for key, value in model_input.items()}
    return {key: value for key, value in request.items() if value is not None}


def _typed(request: dict[str, Any]) -> dict[str, Any]:
    from ddpm.tracking.models import REQUEST_TYPES

    out = {}
    for key, value in request.items():
        kind = REQUEST_TYPES[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            ok, value = True, int(value)
        if not ok:
            raise BadRequest(f"{key}: must be {kind.__name__}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise BadRequest(f"{key}: must be a finite number, got {value!r}")
        out[key] = value
    if out.get("seed", 0) < 0:
        raise BadRequest(f"seed: must be 0 or more, got {out['seed']}")
    return out


def _checked(asked: dict[str, Any], defaults: dict[str, Any], diffusion_steps: int) -> Any:
    """The GenerateConfig of a typed request with the model's sampling defaults; BadRequest
    (one line) for what the sampler cannot honour or work above the model's bound."""
    from ddpm.config import ConfigError
    from ddpm.evaluate.generate import request_config
    from ddpm.model.samplers import model_evaluations
    from ddpm.tracking.models import MAX_WORK, REQUEST_TYPES  # MAX_WORK: models logged before

    given = {key: defaults[key] for key in REQUEST_TYPES if key in defaults}
    if asked.get("sampler", given.get("sampler")) != given.get("sampler"):
        given.pop("eta", None)  # another sampler: its own default eta
    request = {**given, **asked}
    limit = int(defaults.get("max_samples", 256))
    if not 1 <= request["num_samples"] <= limit:
        raise BadRequest(f"num_samples: must be 1 to {limit} per request, got "
                         f"{request['num_samples']} (ask several times with other seeds)")
    try:
        cfg = request_config(diffusion_steps, batch_size=defaults.get("batch_size", 256),
                             **request)
    except ConfigError as err:
        raise BadRequest(str(err)) from None
    evaluations = model_evaluations(cfg.sampler, cfg.steps, diffusion_steps)
    bound = int(defaults.get("max_work", MAX_WORK))
    if cfg.num_samples * evaluations > bound:
        what = f"all {evaluations} steps of ddpm" if cfg.sampler == "ddpm" else \
            f"{evaluations} steps of {cfg.sampler}"
        raise BadRequest(
            f"work: {cfg.num_samples} samples x {what} = {cfg.num_samples * evaluations:,} "
            f"model evaluations, above this model's bound of {bound:,} per request (max_work "
            f"in its sampling defaults); ask for fewer samples or steps, or several times "
            f"with other seeds")
    return cfg


class CarSampler(PythonModel):
    """predict(request) -> uint8 images N x S x S x 3, sampled by `ddpm.evaluate.generate`."""

    # No type hint on load_context; predict's DataFrame is what MLflow hands on once the
    # signature's column schema is enforced, and a hint MLflow infers no schema from: the
    # logged signature stands, and MLflow's "Add type hints" warning does not come.
    def load_context(self, context):  # noqa: ANN001
        from ddpm.device import resolve_device
        from ddpm.model.diffusion import make_schedule
        from ddpm.model.samplers import eps_denoiser
        from ddpm.evaluate.model_file import load, load_model

        self.defaults = json.loads(Path(context.artifacts["sampling"]).read_text())
        self.device = resolve_device(self.defaults.get("device", "auto"))
        model, diffusion, self.size = load_model(load(context.artifacts["checkpoint"]), "ema",
                                                 self.device, "the model's checkpoint")
        self.diffusion_steps = diffusion.steps
        self.schedule = make_schedule(diffusion).to(self.device)
        # fp32 eager, as `ddpm sample` runs on a CPU (bit-identical there). On a GPU the
        # pipeline's bf16/compile fast path is not used here: it is unmeasured for serving.
        self.denoise = eps_denoiser(lambda x, t: model(x, t).float(), self.schedule,
                                    diffusion.prediction)

    def predict(self, context, model_input: pd.DataFrame, params=None):  # noqa: ANN001
        from ddpm.evaluate.generate import generate_samples

        cfg = _checked(_typed(_request(model_input)), self.defaults, self.diffusion_steps)
        samples = generate_samples(self.denoise, self.schedule, cfg, self.size, self.device)
        return samples.transpose(0, 2, 3, 1).copy()


mlflow.models.set_model(CarSampler())

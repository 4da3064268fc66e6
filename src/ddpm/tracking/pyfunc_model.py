"""The MLflow model that samples cars: what `mlflow.pyfunc.load_model` and `mlflow models serve`
run. Logged as a model from code (`tracking/models.py`): this file is copied into the model,
the `ddpm` package beside it as its code, the weights as the `checkpoint` artifact in the train
stage's format (loaded with weights_only) and the defaults as the `sampling` artifact.

    model = mlflow.pyfunc.load_model("models:/ddpm-stanford-cars/1")
    images = model.predict({"num_samples": 8, "seed": 0, "sampler": "ddim", "steps": 20})
    # uint8, 8 x S x S x 3; the same images as `ddpm sample -n 8 --seed 0 --sampler ddim --steps 20`

A request is one dict (or a one-row DataFrame, or a list of one dict; served, the JSON
`{"inputs": {...}}` or `{"dataframe_records": [{...}]}`) with any of REQUEST_KEYS; the ones
left out take the defaults the run logged. A bad request is an MlflowException of one line,
which the scoring server answers with HTTP 400.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

REQUEST_KEYS = ("num_samples", "seed", "sampler", "steps", "eta", "clip")


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
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a DataFrame
        if len(model_input) != 1:
            raise BadRequest(f"one request per call, got {len(model_input)} rows")
        model_input = model_input.to_dict(orient="records")[0]
    if isinstance(model_input, list) and len(model_input) == 1:
        model_input = model_input[0]
    if model_input is None:
        model_input = {}
    if not isinstance(model_input, dict):
        raise BadRequest(f"the request must be a dict with any of {', '.join(REQUEST_KEYS)}; "
                         f"got {type(model_input).__name__}")
    unknown = sorted(set(model_input) - set(REQUEST_KEYS))
    if unknown:
        raise BadRequest(f"unknown request key(s) {', '.join(map(str, unknown))}; the keys are "
                         f"{', '.join(REQUEST_KEYS)}")
    request = {key: _scalar(key, value) for key, value in model_input.items()}
    return {key: value for key, value in request.items() if value is not None}


def _typed(request: dict[str, Any]) -> dict[str, Any]:
    kinds = {"num_samples": int, "seed": int, "steps": int, "eta": float, "sampler": str,
             "clip": bool}
    out = {}
    for key, value in request.items():
        kind = kinds[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if kind is int and isinstance(value, float) and value.is_integer():
            ok, value = True, int(value)
        if not ok:
            raise BadRequest(f"{key}: must be {kind.__name__}, got {value!r}")
        out[key] = value
    return out


class CarSampler(PythonModel):
    """predict(request) -> uint8 images N x S x S x 3, sampled by `ddpm.evaluate.generate`."""

    # No type hints on these two: MLflow would read them as an input schema.
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

    def predict(self, context, model_input, params=None):  # noqa: ANN001
        from ddpm.config import ConfigError
        from ddpm.evaluate.generate import generate_samples, request_config

        asked = _typed(_request(model_input))
        defaults = {key: self.defaults[key] for key in REQUEST_KEYS if key in self.defaults}
        if asked.get("sampler", defaults.get("sampler")) != defaults.get("sampler"):
            defaults.pop("eta", None)  # another sampler: its own default eta
        request = {**defaults, **asked}
        limit = int(self.defaults.get("max_samples", 256))
        if not 1 <= request["num_samples"] <= limit:
            raise BadRequest(f"num_samples: must be 1 to {limit} per request, got "
                             f"{request['num_samples']} (ask several times with other seeds)")
        try:
            cfg = request_config(self.diffusion_steps, batch_size=self.defaults.get(
                "batch_size", 256), **request)
        except ConfigError as err:
            raise BadRequest(str(err)) from None
        samples = generate_samples(self.denoise, self.schedule, cfg, self.size, self.device)
        return samples.transpose(0, 2, 3, 1).copy()


mlflow.models.set_model(CarSampler())

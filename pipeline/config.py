"""params.yaml -> a typed, frozen config.

Every knob lives in params.yaml and nowhere else: the classes below declare types and
bounds but no defaults, so a key missing from params.yaml is an error, not a silent
fallback (the one exception: an optimizer's own knob, `momentum` or `rho`, is given only
for that optimizer). Unknown keys (typos), wrong types and impossible values raise ConfigError with
one message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError, redact_url
from pipeline.mnist import TRAIN_IMAGES

PARAMS_FILE = Path("params.yaml")

PositiveInt = Annotated[int, Field(gt=0)]
Rate = Annotated[float, Field(ge=0.0, lt=1.0)]
# A model's name is `${key}` in dvc.yaml's shell commands and a folder name under data/: nothing a shell reads.
MODEL_NAME_PATTERN = r"^[a-z0-9_]+$"
ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]


class Section(BaseModel):
    """Base of every params.yaml section: frozen, strict types, no unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def check_mirror(mirror: str) -> str:
    """Return `mirror` if it is an http(s):// or file:// URL or a local path, else raise ValueError
    (whose message shows the mirror without credentials: redact_url)."""
    if not mirror.strip():
        raise ValueError("a mirror is an http(s):// URL prefix or a local directory, not an empty string")
    if "://" in mirror:
        url, shown = urlparse(mirror), redact_url(mirror)
        if url.scheme not in ("http", "https", "file"):
            raise ValueError(f"'{shown}' has the scheme '{url.scheme}'; use http://, https://, file:// or a local path")
        if url.scheme != "file" and not url.hostname:
            raise ValueError(f"'{shown}' names no host; write it as https://host/path/")
        if url.scheme == "file" and url.netloc not in ("", "localhost"):
            raise ValueError(f"'{shown}' is not an absolute file:// URL; write file:///absolute/path or a plain path")
    return mirror


class FetchParams(Section):
    mirrors: list[str] = Field(min_length=1)
    timeout_s: float = Field(gt=0, le=600)
    retries: int = Field(ge=0, le=10)
    backoff_s: float = Field(ge=0, le=60)

    @field_validator("mirrors")
    @classmethod
    def _mirrors_are_urls_or_paths(cls, mirrors: list[str]) -> list[str]:
        return [check_mirror(m) for m in mirrors]


class DataParams(Section):
    limit: PositiveInt | None
    val_size: PositiveInt

    @field_validator("val_size")
    @classmethod
    def _validation_fits_in_training_set(cls, val_size: int, info: ValidationInfo) -> int:
        limit = info.data.get("limit")
        if val_size >= (limit or TRAIN_IMAGES):
            source = f"data.limit = {limit}" if limit else f"the {TRAIN_IMAGES} MNIST training images"
            raise ValueError(f"it leaves no training images: it must be smaller than {source}")
        return val_size


class TrainParams(Section):
    strategy: Literal["default", "mirrored"]
    deterministic: bool
    steps_per_execution: PositiveInt


class EvaluateParams(Section):
    batch_size: PositiveInt
    misclassified_grid: PositiveInt
    embedding_sample: PositiveInt


class ExportParams(Section):
    latency_repeats: PositiveInt


class ServingParams(Section):
    base: str = Field(min_length=1)  # folder holding <model>/<version>/ (relative to the project)
    keep: PositiveInt  # versions kept per model; older ones are deleted
    stage: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")  # the registry stage that serves (pipeline/promote.py)


class ModelParams(Section):
    """Hyper-parameters every model has; a model's own class adds its architecture knobs."""

    epochs: PositiveInt
    batch_size: PositiveInt
    optimizer: Literal["sgd", "momentum", "rmsprop", "adam"]
    learning_rate: float = Field(gt=0, le=10)
    momentum: Rate | None = None  # only for optimizer: momentum (SGD with momentum)
    rho: Rate | None = None  # only for optimizer: rmsprop (decay of its average of squared gradients)
    lr_schedule: Literal["constant", "exponential", "cosine"]
    lr_decay: float | None = Field(default=None, gt=0, le=1)  # only for lr_schedule: exponential (its per-epoch factor)
    init: Literal["normal", "glorot", "he"]
    l2: float = Field(ge=0, le=1)
    precision: Literal["auto", "float32", "bf16", "fp16"]  # training's arithmetic (pipeline/train/precision.py)
    shift: int = Field(default=0, ge=0, le=4)  # training images moved by up to this many pixels per axis, anew each epoch

    @model_validator(mode="after")
    def _optimizer_knobs(self) -> ModelParams:
        # Each optimizer's own knob is given exactly when that optimizer is chosen: no silent default.
        problems = []
        # The same for the learning-rate schedule's.
        for knob, owner, chosen, kind in (
            ("momentum", "momentum", self.optimizer, "optimizer"),
            ("rho", "rmsprop", self.optimizer, "optimizer"),
            ("lr_decay", "exponential", self.lr_schedule, "lr_schedule"),
        ):
            given = getattr(self, knob) is not None
            if chosen == owner and not given:
                problems.append(f"{kind} {owner} needs `{knob}`: add it to the block")
            if chosen != owner and given:
                problems.append(f"`{knob}` is a knob of {kind} {owner}, not {chosen}: remove it")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Params(Section):
    """The whole of params.yaml, each model's block typed by its registry class."""

    seed: int = Field(ge=0, lt=2**31)
    fetch: FetchParams
    data: DataParams
    train: TrainParams
    models: dict[ModelName, SerializeAsAny[ModelParams]]
    gates: dict[ModelName, float]
    evaluate: EvaluateParams
    export: ExportParams
    serving: ServingParams

    def model(self, name: str) -> ModelParams:
        """The typed params block of model `name`."""
        if name not in self.models:
            known = ", ".join(self.models) or "none (this stage was given no model types)"
            raise ConfigError(f"There is no model '{name}' in params.yaml; models: {known}.")
        return self.models[name]


def params_hash(block: BaseModel | dict[str, Any]) -> str:
    """A short, stable digest of a params block, recorded beside what it produced."""
    data = block.model_dump() if isinstance(block, BaseModel) else block
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load_params(path: Path | str = PARAMS_FILE, model_types: Mapping[str, type[ModelParams]] | None = None) -> Params:
    """Read and validate params.yaml once; raise ConfigError naming every bad key.

    `model_types` gives each model name its params class (the registry's `PARAM_TYPES`):
    every block under `models:` is validated against it and `Params.models` holds the typed
    blocks. A stage that uses no model (fetch, preprocess) leaves it out: the model names are
    then checked against `gates:` only and `Params.models` is empty, so no code can read a
    block that was not validated.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run the stage from the project root, where params.yaml is.") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}. Fix the line it points at.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of sections (seed, fetch, data, ...), not {type(raw).__name__}.")

    problems: list[str] = []
    typed, model_problems = _typed_models(raw, path, model_types)
    try:
        params = Params.model_validate({**raw, "models": typed} if isinstance(raw.get("models"), dict) else raw)
    except ValidationError as exc:
        problems += [_describe(err, Params, path) for err in exc.errors()]
        params = None
    problems += model_problems
    if problems:
        raise ConfigError(f"{path} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    assert params is not None
    return params


def _typed_models(
    raw: dict[str, Any], path: Path, model_types: Mapping[str, type[ModelParams]] | None
) -> tuple[dict[str, ModelParams], list[str]]:
    """Each models.<name> block validated against its params class; the gates checked against the models."""
    models = raw.get("models")
    if not isinstance(models, dict):
        return {}, []  # Params reports the missing or mistyped section
    if not models:
        return {}, ["models: give at least one model block (name: {knobs})."]
    typed: dict[str, ModelParams] = {}
    problems = []
    for name, block in models.items():
        if not is_model_name(name):
            problems.append(_bad_model_name("models", name))
            continue
        if model_types is None:
            if not isinstance(block, dict):
                problems.append(f"models.{name} must be a mapping of knobs, not {type(block).__name__}.")
            continue
        cls = model_types.get(name)
        if cls is None:
            hint = _did_you_mean(name, model_types)
            problems.append(
                f"models.{name} is not a known model.{hint} Known models: {', '.join(model_types)} "
                "(pipeline/models/registry.py); remove the block or add the model to the registry."
            )
            continue
        try:
            typed[name] = cls.model_validate(block)
        except ValidationError as exc:
            problems += [_describe(err, cls, path, prefix=("models", name)) for err in exc.errors()]
    return typed, problems + _check_gates(models, raw.get("gates"))


def is_model_name(name: Any) -> bool:
    """Whether `name` is a usable model name ([a-z0-9_]+)."""
    try:
        _MODEL_NAME.validate_python(name)
    except ValidationError:
        return False
    return True


_MODEL_NAME = TypeAdapter(ModelName, config=ConfigDict(strict=True))


def _bad_model_name(section: str, name: Any) -> str:
    """The problem of a key of `section` (models or gates) that is no allowed model name, with a name that is."""
    allowed = re.sub(r"[^a-z0-9_]", "_", str(name).lower()) or "model"
    return (
        f"{section}.{name!r} is not allowed: a model name is lowercase letters, digits and underscores only "
        f"([a-z0-9_]+), because dvc.yaml puts it into shell commands as ${{key}}; rename it, e.g. to '{allowed}', "
        "in models: and gates:."
    )


def _check_gates(models: dict[str, Any], gates: Any) -> list[str]:
    """Every model has a gate, every gate a model, and each gate is a test accuracy from 0 to 1."""
    problems = []
    if isinstance(gates, dict):
        for name in models:
            if name not in gates:
                problems.append(f"gates.{name} is missing: give model '{name}' a minimum test accuracy (0 to 1).")
        for name, gate in gates.items():
            if name not in models:
                problems.append(f"gates.{name} names no model in models:; remove it or add models.{name}.")
            elif not isinstance(gate, (int, float)) or isinstance(gate, bool) or not 0 <= gate <= 1:
                problems.append(f"gates.{name} = {gate!r} is not allowed: a gate is a test accuracy from 0 to 1.")
    return problems


def _describe(err: Mapping[str, Any], root: type[BaseModel], path: Path, prefix: tuple[str, ...] = ()) -> str:
    """One line for one pydantic error: the key, the bad value and what is allowed."""
    loc = tuple(str(p) for p in err["loc"])
    if loc[-1:] == ("[key]",) and err["type"] == "string_pattern_mismatch":
        return _bad_model_name(".".join(prefix + loc[:-2]), err["input"])
    key = ".".join(prefix + loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(root, loc[:-1])
        hint = _did_you_mean(loc[-1], allowed)
        return f"unknown key '{key}'.{hint} Allowed keys there: {', '.join(allowed)}."
    if err["type"] == "missing":
        return f"missing key '{key}': every knob is set in {path}; add it."
    message = err["msg"].removeprefix("Value error, ")
    if isinstance(err["input"], dict):  # a check across a whole block: its message names the keys
        return f"{key}: {message}."
    value = (
        [redact_url(v) if isinstance(v, str) else v for v in err["input"]]
        if isinstance(err["input"], list)
        else (redact_url(err["input"]) if isinstance(err["input"], str) else err["input"])
    )  # a mirror's credentials stay out
    return f"{key} = {value!r} is not allowed: {message}."


def _allowed_keys(root: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    cls: Any = root
    for part in loc:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
    return list(getattr(cls, "model_fields", {}))


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""

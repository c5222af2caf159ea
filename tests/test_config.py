"""pipeline.config.load_params on edited copies of the real params.yaml.

Model blocks are typed only when load_params is given the registry's PARAM_TYPES, as the
stages that use models do; without them only the model names are checked (against gates:).
"""

from __future__ import annotations

import copy
import os
import subprocess

import pytest
import yaml

from helpers import PARAMS_YAML, PYTHON, REPO, listing
from pipeline.config import Params, load_params
from pipeline.errors import ConfigError
from pipeline.models.registry import PARAM_TYPES


@pytest.fixture(scope="module")
def base() -> dict:
    return yaml.safe_load(PARAMS_YAML.read_text())


def write_params(folder, raw) -> os.PathLike:
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --- edits: each takes the parsed params.yaml and changes it in place ---------------


def set_(dotted: str, value):
    def edit(d):
        *parents, last = dotted.split(".")
        for key in parents:
            d = d[key]
        d[last] = value

    return edit


def delete(dotted: str):
    def edit(d):
        *parents, last = dotted.split(".")
        for key in parents:
            d = d[key]
        del d[last]

    return edit


def rename(dotted: str, new: str):
    def edit(d):
        *parents, last = dotted.split(".")
        for key in parents:
            d = d[key]
        d[new] = d.pop(last)

    return edit


def both(*edits):
    def edit(d):
        for e in edits:
            e(d)

    return edit


def add_model_like_cnn(name: str):
    def edit(d):
        d["models"][name] = copy.deepcopy(d["models"]["cnn"])
        d["gates"][name] = 0.5

    return edit


# (id, edit, substrings the ConfigError message must hold: the key, the bad value, what is allowed)
BAD_EDITS = [
    (
        "top-level typo",
        rename("seed", "sed"),
        ["unknown key 'sed'", "Did you mean 'seed'?", "Allowed keys there: seed, fetch, data", "missing key 'seed'"],
    ),
    (
        "nested typo",
        rename("models.cnn.epochs", "epoch"),
        ["unknown key 'models.cnn.epoch'", "Did you mean 'epochs'?", "Allowed keys there:", "missing key 'models.cnn.epochs'"],
    ),
    ("section typo", rename("fetch.timeout_s", "timeout"), ["unknown key 'fetch.timeout'", "Did you mean 'timeout_s'?"]),
    ("epochs 0", set_("models.cnn.epochs", 0), ["models.cnn.epochs = 0", "greater than 0"]),
    ("epochs -3", set_("models.cnn.epochs", -3), ["models.cnn.epochs = -3", "greater than 0"]),
    ("epochs ten", set_("models.cnn.epochs", "ten"), ["models.cnn.epochs = 'ten'", "valid integer"]),
    ("learning_rate negative", set_("models.mlp.learning_rate", -0.1), ["models.mlp.learning_rate = -0.1", "greater than 0"]),
    (
        "learning_rate as string",
        set_("models.cnn.learning_rate", "0.001"),
        ["models.cnn.learning_rate = '0.001'", "valid number"],
    ),
    ("batch_size 2.5", set_("models.logreg.batch_size", 2.5), ["models.logreg.batch_size = 2.5", "valid integer"]),
    (
        "val_size > limit",
        both(set_("data.limit", 1000), set_("data.val_size", 2000)),
        ["val_size = 2000", "smaller than data.limit = 1000"],
    ),
    ("val_size 60000", set_("data.val_size", 60000), ["val_size = 60000", "smaller than the 60000 MNIST training images"]),
    ("val_size 0", set_("data.val_size", 0), ["data.val_size = 0", "greater than 0"]),
    ("limit 0", set_("data.limit", 0), ["data.limit = 0", "greater than 0"]),
    (
        "unknown model",
        add_model_like_cnn("resnet"),
        ["models.resnet is not a known model", "Known models: linear, logreg, mlp, deep_mlp, cnn", "pipeline/models/registry.py"],
    ),
    ("no models", both(set_("models", {}), set_("gates", {})), ["models: give at least one model block"]),
    (
        "model name typo",
        rename("models.cnn", "cnnn"),
        ["models.cnnn is not a known model", "Did you mean 'cnn'?", "gates.cnn names no model"],
    ),
    ("gate above 1", set_("gates.cnn", 1.5), ["gates.cnn = 1.5", "from 0 to 1"]),
    ("gate negative", set_("gates.linear", -0.2), ["gates.linear = -0.2", "from 0 to 1"]),
    ("gate of no model", set_("gates.vgg", 0.9), ["gates.vgg names no model", "add models.vgg"]),
    ("missing gate", delete("gates.mlp"), ["gates.mlp is missing", "0 to 1"]),
    (
        "mirror ftp",
        set_("fetch.mirrors", ["ftp://x"]),
        ["fetch.mirrors", "'ftp://x'", "scheme 'ftp'", "use http://, https://, file://"],
    ),
    ("mirror empty string", set_("fetch.mirrors", [""]), ["fetch.mirrors = ['']", "not an empty string"]),
    ("mirror without host", set_("fetch.mirrors", ["https://"]), ["fetch.mirrors", "names no host"]),
    ("mirrors empty list", set_("fetch.mirrors", []), ["fetch.mirrors = []", "at least 1 item"]),
    ("timeout 0", set_("fetch.timeout_s", 0), ["fetch.timeout_s = 0", "greater than 0"]),
    ("retries 11", set_("fetch.retries", 11), ["fetch.retries = 11", "less than or equal to 10"]),
    (
        "optimizer adamw",
        set_("models.cnn.optimizer", "adamw"),
        ["models.cnn.optimizer = 'adamw'", "'sgd', 'momentum', 'rmsprop' or 'adam'"],
    ),
    ("dropout 1.5", set_("models.cnn.dense_drop", 1.5), ["models.cnn.dense_drop = 1.5", "less than 1"]),
    (
        "dropout negative",
        set_("models.deep_mlp.input_drop", -0.1),
        ["models.deep_mlp.input_drop = -0.1", "greater than or equal to 0"],
    ),
    ("init xavier", set_("models.cnn.init", "xavier"), ["models.cnn.init = 'xavier'", "'normal', 'glorot' or 'he'"]),
    ("activation", set_("models.mlp.activation", "gelu"), ["models.mlp.activation = 'gelu'", "'sigmoid', 'tanh' or 'relu'"]),
    ("hidden_units empty", set_("models.deep_mlp.hidden_units", []), ["models.deep_mlp.hidden_units = []", "at least 1 item"]),
    ("missing epochs", delete("models.cnn.epochs"), ["missing key 'models.cnn.epochs'", "add it"]),
    ("missing section", delete("evaluate"), ["missing key 'evaluate'"]),
    ("strategy tpu", set_("train.strategy", "tpu"), ["train.strategy = 'tpu'", "'default' or 'mirrored'"]),
    ("deterministic yes", set_("train.deterministic", "yes"), ["train.deterministic = 'yes'", "valid boolean"]),
    ("seed negative", set_("seed", -1), ["seed = -1", "greater than or equal to 0"]),
    ("seed bool", set_("seed", True), ["seed = True", "valid integer"]),
    # each optimizer's own knob: `momentum` only with optimizer momentum, `rho` only with rmsprop
    (
        "momentum with rmsprop",
        set_("models.cnn.momentum", 0.9),
        ["models.cnn: `momentum` is a knob of optimizer momentum, not rmsprop: remove it"],
    ),
    (
        "momentum with adam",
        set_("models.mlp.momentum", 0.0),
        ["models.mlp: `momentum` is a knob of optimizer momentum, not adam: remove it"],
    ),
    (
        "rho with adam",
        set_("models.logreg.rho", 0.9),
        ["models.logreg: `rho` is a knob of optimizer rmsprop, not adam: remove it"],
    ),
    ("rmsprop without rho", delete("models.cnn.rho"), ["models.cnn: optimizer rmsprop needs `rho`: add it"]),
    (
        "momentum without momentum",
        set_("models.mlp.optimizer", "momentum"),
        ["models.mlp: optimizer momentum needs `momentum`: add it"],
    ),
    (
        "rmsprop's rho renamed momentum",
        rename("models.cnn.rho", "momentum"),
        ["models.cnn: `momentum` is a knob of optimizer momentum, not rmsprop"],
    ),
    # the schedule's: `lr_decay` only with lr_schedule exponential
    (
        "lr_decay with cosine",
        both(set_("models.cnn.lr_schedule", "cosine"), set_("models.cnn.lr_decay", 0.8)),
        ["models.cnn: `lr_decay` is a knob of lr_schedule exponential, not cosine: remove it"],
    ),
    (
        "exponential without lr_decay",
        both(set_("models.cnn.lr_schedule", "exponential"), set_("models.cnn.lr_decay", None)),
        ["models.cnn: lr_schedule exponential needs `lr_decay`: add it"],
    ),
    ("rho 1", set_("models.cnn.rho", 1.0), ["models.cnn.rho = 1.0", "less than 1"]),
    (
        "momentum negative",
        both(set_("models.mlp.optimizer", "momentum"), set_("models.mlp.momentum", -0.5)),
        ["models.mlp.momentum = -0.5", "greater than or equal to 0"],
    ),
]


def test_the_real_params_yaml_loads():
    params = load_params(PARAMS_YAML, PARAM_TYPES)
    assert isinstance(params, Params)
    assert params.data.val_size == 5000 and params.data.limit is None
    assert set(params.gates) == set(params.models) == set(PARAM_TYPES)
    for name in params.models:
        assert type(params.model(name)) is PARAM_TYPES[name]
        assert params.model(name) is params.models[name]
        assert params.model(name).epochs > 0


def test_each_optimizer_has_only_its_own_knob_in_the_real_params_yaml():
    params = load_params(PARAMS_YAML, PARAM_TYPES)
    cnn = params.model("cnn")
    assert cnn.optimizer == "rmsprop" and cnn.rho == 0.9 and cnn.momentum is None
    for name, p in params.models.items():
        assert (p.momentum is not None) == (p.optimizer == "momentum"), name
        assert (p.rho is not None) == (p.optimizer == "rmsprop"), name


def test_sgd_with_momentum_takes_the_momentum_knob(tmp_path, base):
    raw = copy.deepcopy(base)
    set_("models.mlp.optimizer", "momentum")(raw)
    set_("models.mlp.momentum", 0.9)(raw)
    mlp = load_params(write_params(tmp_path, raw), PARAM_TYPES).model("mlp")
    assert mlp.optimizer == "momentum" and mlp.momentum == 0.9 and mlp.rho is None


def test_without_model_types_the_model_blocks_are_not_typed_and_not_readable(tmp_path, base):
    """A stage that uses no model (fetch, preprocess) gets no model blocks at all."""
    params = load_params(PARAMS_YAML)
    assert params.models == {}
    assert set(params.gates) == set(base["models"])
    with pytest.raises(ConfigError, match=r"no model 'cnn'.*none \(this stage was given no model types\)"):
        params.model("cnn")
    # a bad knob inside a block is then not this stage's business; with the types it is an error
    raw = copy.deepcopy(base)
    set_("models.cnn.epochs", 0)(raw)
    path = write_params(tmp_path, raw)
    assert load_params(path).models == {}
    with pytest.raises(ConfigError, match=r"models.cnn.epochs = 0"):
        load_params(path, PARAM_TYPES)


@pytest.mark.parametrize(
    "edit, expected",
    [
        pytest.param(delete("gates.mlp"), "gates.mlp is missing", id="missing gate"),
        pytest.param(set_("gates.vgg", 0.9), "gates.vgg names no model", id="gate of no model"),
        pytest.param(set_("models.cnn", 3), "models.cnn must be a mapping of knobs, not int", id="block not a mapping"),
        pytest.param(both(set_("models", {}), set_("gates", {})), "give at least one model block", id="no models"),
    ],
)
def test_without_model_types_the_model_names_are_still_checked(tmp_path, base, edit, expected):
    raw = copy.deepcopy(base)
    edit(raw)
    with pytest.raises(ConfigError) as err:
        load_params(write_params(tmp_path, raw))
    assert expected in str(err.value)


@pytest.mark.parametrize("name", ["cnn; touch pwned", "$(id)", "CNN", "my-cnn", "cnn v2", "../cnn"])
@pytest.mark.parametrize("model_types", [PARAM_TYPES, None], ids=["typed", "untyped"])
def test_a_model_name_outside_a_z_0_9_and_underscore_is_refused_naming_the_key(tmp_path, base, name, model_types):
    """dvc.yaml puts each model's name into its stages' shell commands (${key}): only [a-z0-9_]+ gets there.
    Checked with and without the model types, as every stage loads params.yaml one way or the other."""
    raw = copy.deepcopy(base)
    both(rename("models.cnn", name), rename("gates.cnn", name))(raw)
    with pytest.raises(ConfigError) as err:
        load_params(write_params(tmp_path, raw), model_types)
    message = str(err.value)
    assert (
        f"models.{name!r} is not allowed: a model name is lowercase letters, digits and underscores only ([a-z0-9_]+)" in message
    )
    assert f"gates.{name!r} is not allowed" in message
    assert "shell commands" in message and "is not a known model" not in message, message


def test_an_unedited_dump_loads(tmp_path, base):
    loaded = load_params(write_params(tmp_path, copy.deepcopy(base)), PARAM_TYPES)
    assert loaded == load_params(PARAMS_YAML, PARAM_TYPES)
    assert loaded.models["cnn"] == load_params(PARAMS_YAML, PARAM_TYPES).models["cnn"]


@pytest.mark.parametrize("edit, expected", [pytest.param(e, x, id=i) for i, e, x in BAD_EDITS])
def test_bad_edit_is_a_config_error_naming_key_value_and_allowed(tmp_path, base, edit, expected):
    raw = copy.deepcopy(base)
    edit(raw)
    path = write_params(tmp_path, raw)
    with pytest.raises(ConfigError) as err:
        load_params(path, PARAM_TYPES)
    message = str(err.value)
    assert message.startswith(f"{path} has ")
    for part in expected:
        assert part in message, f"{part!r} is not in:\n{message}"
    assert "Traceback" not in message


def test_several_problems_are_reported_together(tmp_path, base):
    raw = copy.deepcopy(base)
    set_("models.cnn.epochs", 0)(raw)
    set_("train.strategy", "tpu")(raw)
    set_("gates.mlp", 2)(raw)
    with pytest.raises(ConfigError) as err:
        load_params(write_params(tmp_path, raw), PARAM_TYPES)
    message = str(err.value)
    assert "has 3 problem(s)" in message
    for part in ("models.cnn.epochs = 0", "train.strategy = 'tpu'", "gates.mlp = 2"):
        assert part in message


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_YAML.read_text().replace("seed: 1337", "seed: [1337", 1))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(path) in str(err.value) and "not valid YAML" in str(err.value)
    assert "Traceback" not in str(err.value)


def test_yaml_that_is_not_a_mapping_is_a_config_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- seed\n- fetch\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_params(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "params.yaml")
    assert f"{tmp_path / 'params.yaml'} not found" in str(err.value)
    assert "project root" in str(err.value)


def test_params_are_frozen():
    params = load_params(PARAMS_YAML, PARAM_TYPES)
    with pytest.raises(Exception):  # noqa: B017 - any refusal of the assignment will do
        params.seed = 1  # type: ignore[misc]  # frozen: assigning is the test
    with pytest.raises(Exception):  # noqa: B017 - any refusal of the assignment will do
        params.model("cnn").epochs = 1  # type: ignore[misc]  # frozen: assigning is the test


def test_unknown_model_name_at_lookup_is_a_config_error():
    with pytest.raises(ConfigError, match=r"no model 'resnet'.*models: linear"):
        load_params(PARAMS_YAML, PARAM_TYPES).model("resnet")


STAGE_RUNS = [
    # preprocess reads no model block (it loads params.yaml without model types): give it a bad data knob
    pytest.param(
        "preprocess",
        set_("data.val_size", "ten"),
        "data.val_size = 'ten'",
        ["--raw", "data/raw", "--out", "data/prepared", "--report", "data/data_report.json", "--tensorboard", "data/tb"],
        id="preprocess",
    ),
    # train types every model block: a bad knob of another model than the one trained stops it too
    pytest.param(
        "train",
        set_("models.cnn.epochs", "ten"),
        "models.cnn.epochs = 'ten'",
        [
            "linear",
            "--data",
            "data/prepared",
            "--out",
            "data/models/linear",
            "--live",
            "data/live/linear",
            "--resume",
            "data/resume/linear",
            "--tensorboard",
            "data/tb",
        ],
        id="train",
    ),
]


@pytest.mark.parametrize("stage, edit, expected, args", STAGE_RUNS)
def test_stage_with_bad_params_exits_1_without_traceback_and_touches_nothing(tmp_path, base, stage, edit, expected, args):
    """A stage, run as DVC runs it, stops on a bad params.yaml before any work."""
    raw = copy.deepcopy(base)
    edit(raw)
    write_params(tmp_path, raw)
    data = tmp_path / "data"
    (data / "raw").mkdir(parents=True)
    marker = data / "raw" / "marker.bin"
    marker.write_bytes(b"untouched")
    before = listing(data)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect_home")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = subprocess.run(
        [str(PYTHON), str(REPO / "stages" / f"{stage}.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert expected in result.stderr
    assert f"error in stage {stage}" in result.stderr
    assert "Traceback" not in result.stderr
    assert listing(data) == before
    assert marker.read_bytes() == b"untouched"

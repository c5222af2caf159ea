"""pipeline.models: every registry model (pipeline.models.registry) with its params.yaml block builds,
has the architecture params.yaml describes (counted here independently), trains, and honours init, l2 and dropout."""

from __future__ import annotations

import math
from itertools import pairwise

import keras
import numpy as np
import pytest

from helpers import params_with, raw_params
from pipeline.models import registry
from pipeline.models.lenet import connection_map
from pipeline.models.registry import PARAM_TYPES, REGISTRY
from pipeline.train.loop import compile_model

MODELS = list(REGISTRY)
PIXELS = 28 * 28


def dense_count(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def expected_parameters(name: str, block: dict) -> int:
    """The parameter count of model `name` from its params.yaml block, counted by hand."""
    if name in ("linear", "logreg"):
        return dense_count(PIXELS, 10)
    if name == "mlp":
        return dense_count(PIXELS, block["hidden_units"]) + dense_count(block["hidden_units"], 10)
    if name == "deep_mlp":
        sizes = [PIXELS, *block["hidden_units"], 10]
        return sum(dense_count(a, b) for a, b in pairwise(sizes))
    if name == "cnn":
        k, side, channels, total = block["kernel_size"], 28, 1, 0
        for filters in block["filters"]:
            total += k * k * channels * filters + filters  # 'same' padding keeps the side...
            side, channels = math.ceil(side / 2), filters  # ...and a 2x2 'same' max pool halves it, rounding up
        return total + dense_count(side * side * channels, block["dense_units"]) + dense_count(block["dense_units"], 10)
    if name.startswith("pattern"):
        side, channels, total = 28, 1, 0
        for b in block["blocks"]:
            for _ in range(block["n"]):  # conv F, S, zero padding P: W2 = (W1 - F + 2P)/S + 1
                total += b["f"] * b["f"] * channels * b["filters"] + b["filters"]
                side, channels = (side - b["f"] + 2 * b["p"]) // b["s"] + 1, b["filters"]
            if b["pool_f"] is not None:
                side = (side - b["pool_f"]) // b["pool_s"] + 1
        sizes = [side * side * channels, *block["fc_units"], 10]
        return total + sum(dense_count(a, c) for a, c in pairwise(sizes))
    if name == "lenet":
        c1, c3 = block["c1_maps"], block["c3_maps"]
        links = int(connection_map(c1, c3, *block["c3_inputs"], block["connection_seed"]).sum())
        total = 5 * 5 * 1 * c1 + c1  # C1: 5x5 'same' conv, 28 -> 28
        total += 2 * c1  # S2: a coefficient and a bias per map, 28 -> 14
        total += 5 * 5 * links + c3  # C3: 5x5 'valid' conv over the connected map pairs only, 14 -> 10
        total += 2 * c3  # S4: 10 -> 5
        sizes = [5 * 5 * c3, block["c5_units"], block["f6_units"], 10]
        return total + sum(dense_count(a, c) for a, c in pairwise(sizes))
    raise AssertionError(f"no hand count for model '{name}': add one to tests/test_models.py")


def kernel_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Every layer with a weight kernel (dense, conv, LeNet's sparse conv)."""
    return [layer for layer in model.layers if getattr(layer, "kernel", None) is not None]


def pixels(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, 28, 28)).astype(np.float32)


@pytest.fixture(scope="module")
def params():
    return params_with()


def test_hand_counts_of_the_seed_architectures():
    """The hand count itself, on the course's architectures."""
    assert expected_parameters("logreg", {}) == 7850
    assert expected_parameters("linear", {}) == 7850
    assert expected_parameters("mlp", {"hidden_units": 625}) == 784 * 625 + 625 + 625 * 10 + 10 == 496_885
    assert expected_parameters("deep_mlp", {"hidden_units": [625, 625]}) == 490_625 + 391_250 + 6_260
    # conv 3x3: 1->32, 32->64, 64->128; 28 -> 14 -> 7 -> 4; flatten 4*4*128 = 2048; 2048 -> 625 -> 10
    cnn = {"filters": [32, 64, 128], "kernel_size": 3, "dense_units": 625}
    assert expected_parameters("cnn", cnn) == 320 + 18_496 + 73_856 + (2048 * 625 + 625) + 6_260 == 1_379_557
    # the course notes' pattern example INPUT -> [CONV -> RELU -> POOL]*2 -> FC -> RELU -> FC, 5x5 convs padded by 2
    small = {
        "n": 1,
        "blocks": [
            {"filters": 32, "f": 5, "s": 1, "p": 2, "pool_f": 2, "pool_s": 2},  # 28 -> 28 -> 14
            {"filters": 64, "f": 5, "s": 1, "p": 2, "pool_f": 2, "pool_s": 2},  # 14 -> 14 -> 7
        ],
        "fc_units": [256],
    }
    assert expected_parameters("pattern_small", small) == 832 + 51_264 + (7 * 7 * 64 * 256 + 256) + 2_570 == 857_738
    # LeNet-5's sizes, with 54 connected C1 -> C3 map pairs
    lenet = {"c1_maps": 6, "c3_maps": 16, "c3_inputs": [3, 4], "c5_units": 120, "f6_units": 84, "connection_seed": 1337}
    links = int(connection_map(6, 16, 3, 4, 1337).sum())
    assert expected_parameters("lenet", lenet) == 156 + 12 + (25 * links + 16) + 32 + 48_120 + 10_164 + 850


def test_lenet_connection_map_is_a_seeded_strict_subset_per_map():
    mask = connection_map(6, 16, 3, 4, seed=1337)
    assert mask.shape == (6, 16) and mask.dtype == bool
    assert set(mask.sum(axis=0)) <= {3, 4}  # every C3 map sees 3 or 4 of the 6 C1 maps
    assert np.array_equal(mask, connection_map(6, 16, 3, 4, seed=1337))
    assert not np.array_equal(mask, connection_map(6, 16, 3, 4, seed=1338))


def test_every_registry_model_has_a_params_block():
    assert set(raw_params()["models"]) == set(REGISTRY)


def test_params_blocks_are_typed_by_the_registry(params):
    assert set(PARAM_TYPES) == set(REGISTRY)
    for name, spec in REGISTRY.items():
        assert PARAM_TYPES[name] is spec.params
        assert type(params.model(name)) is spec.params


def test_every_registry_params_class_has_a_builder():
    assert set(registry.BUILDERS) == {spec.params for spec in REGISTRY.values()}


@pytest.mark.parametrize("name", MODELS)
def test_model_builds_with_params_yaml_and_maps_raw_pixels_to_10_logits(name, params):
    model = registry.build(name, params.model(name))
    out = np.asarray(model(pixels(5), training=False))
    assert out.shape == (5, 10)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert model.inputs[0].shape == (None, 28, 28)
    rescale = model.get_layer("rescale")  # the model rescales raw 0..255 pixels itself
    assert isinstance(rescale, keras.layers.Rescaling) and rescale.scale == pytest.approx(1 / 255)


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_matches_the_architecture_in_params_yaml(name, params):
    model = registry.build(name, params.model(name))
    expected = expected_parameters(name, raw_params()["models"][name])
    assert model.count_params() == expected
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == expected


def test_cnn_feature_map_sides_follow_same_padding_and_pooling(params):
    model = registry.build("cnn", params.model("cnn"))
    filters = raw_params()["models"]["cnn"]["filters"]
    sides = [model.get_layer(f"pool{i}").output.shape[1] for i in range(1, len(filters) + 1)]
    assert sides[:3] == [14, 7, 4]
    assert model.get_layer("dense").kernel.shape[0] == sides[-1] ** 2 * filters[-1]


@pytest.mark.parametrize("name", MODELS)
def test_one_training_step_changes_every_weight(name, params):
    keras.utils.set_random_seed(3)
    model = compile_model(name, params.model(name), steps_per_epoch=1)
    before = [w.copy() for w in model.get_weights()]
    x, y = pixels(16, seed=1), np.arange(16) % 10
    loss = model.train_on_batch(x, y, return_dict=True)["loss"]
    after = model.get_weights()
    assert np.isfinite(loss)
    assert len(after) == len(before) > 0
    for i, (b, a) in enumerate(zip(before, after)):
        assert np.isfinite(a).all()
        assert not np.array_equal(a, b), f"{name}: weight {model.weights[i].path} did not change"


INITIALIZERS = {
    "normal": keras.initializers.RandomNormal,
    "glorot": keras.initializers.GlorotUniform,
    "he": keras.initializers.HeNormal,
}


@pytest.mark.parametrize("init", list(INITIALIZERS))
@pytest.mark.parametrize("name", MODELS)
def test_init_chooses_the_keras_initializer(name, init):
    model = registry.build(name, params_with(name, init=init).model(name))
    layers = kernel_layers(model)
    assert layers, f"{name} has no layer with a kernel"
    for layer in layers:
        initializer = getattr(layer, "kernel_initializer", None)
        assert type(initializer) is INITIALIZERS[init], (layer.name, initializer)
        if init == "normal":
            assert layer.kernel_initializer.stddev == 0.01  # the course's N(0, 0.01)


@pytest.mark.parametrize(
    "init, check",
    [
        ("normal", lambda w, fan_in, fan_out: abs(w.std() - 0.01) < 0.001),
        ("he", lambda w, fan_in, fan_out: abs(w.std() - math.sqrt(2 / fan_in)) < 0.1 * math.sqrt(2 / fan_in)),
        (
            "glorot",
            lambda w, fan_in, fan_out: (
                0.95 * math.sqrt(6 / (fan_in + fan_out)) < abs(w).max() <= math.sqrt(6 / (fan_in + fan_out))
            ),
        ),
    ],
)
def test_initial_weights_have_the_initializers_scale(init, check):
    model = registry.build("mlp", params_with("mlp", init=init).model("mlp"))
    kernel = np.asarray(model.get_layer("hidden").kernel)
    fan_in, fan_out = kernel.shape
    assert check(kernel, fan_in, fan_out), (init, kernel.std(), abs(kernel).max())


@pytest.mark.parametrize("name", MODELS)
def test_l2_adds_a_regularization_loss_per_kernel(name):
    plain = registry.build(name, params_with(name, l2=0.0).model(name))
    assert plain.losses == []
    model = registry.build(name, params_with(name, l2=0.01).model(name))
    layers = kernel_layers(model)
    assert len(model.losses) == len(layers) > 0
    expected = sum(0.01 * float(np.sum(np.square(np.asarray(layer.kernel)))) for layer in layers)
    assert float(sum(np.asarray(loss) for loss in model.losses)) == pytest.approx(expected, rel=1e-5)
    assert expected > 0


@pytest.mark.parametrize(
    ("name", "first_key", "second_key"), [("deep_mlp", "input_drop", "hidden_drop"), ("cnn", "conv_drop", "dense_drop")]
)
def test_dropout_layers_carry_the_drop_rates(name: str, first_key: str, second_key: str):
    block = raw_params()["models"][name]
    for first, second in ((block[first_key], block[second_key]), (0.15, 0.35)):
        p = params_with(name, **{first_key: first, second_key: second}).model(name)
        model = registry.build(name, p)
        rates = [layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
        names = [layer.name for layer in model.layers]
        if name == "deep_mlp":
            assert rates == [first] + [second] * len(p.hidden_units)
            assert model.get_layer("input_dropout").rate == first
            # the input dropout comes before the first hidden layer, each hidden dropout after its layer
            assert names.index("input_dropout") < names.index("hidden1") < names.index("dropout1")
        else:
            assert rates == [first] * len(p.filters) + [second]
            assert model.get_layer("dense_dropout").rate == second
            assert names.index("conv_dropout1") < names.index("conv2") and names[-2] == "dense_dropout"


@pytest.mark.parametrize("name", [n for n in ("pattern_small", "pattern_deep") if n in REGISTRY])
def test_pattern_dropout_layers_carry_the_drop_rate(name):
    for dropout in (raw_params()["models"][name]["dropout"], 0.15):
        p = params_with(name, dropout=dropout).model(name)
        model = registry.build(name, p)
        drops = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
        assert [layer.rate for layer in drops] == [dropout] * (len(p.fc_units) + 1)  # before each FC layer
        names = [layer.name for layer in model.layers]
        assert names.index("out_dropout") == names.index("logits") - 1


@pytest.mark.parametrize("name", [n for n in ("linear", "logreg", "mlp", "lenet") if n in REGISTRY])
def test_models_without_dropout_have_no_dropout_layer(name, params):
    model = registry.build(name, params.model(name))
    assert not [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]

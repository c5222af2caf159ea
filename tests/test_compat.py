"""What the project relies on where a library has no public API (pipeline/train/loop.py keras_seeds_from,
pipeline/warm.py run_atexit_handlers), and the public replacement of Keras's private layer walk."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from helpers import load_test_params
from pipeline.models import registry
from pipeline.train.callbacks import all_layers, seeded_layers
from pipeline.train.loop import keras_seeds_from


def initial_weights() -> np.ndarray:
    return np.asarray(keras.initializers.GlorotUniform()((4, 3)))


def test_keras_draws_its_default_seeds_from_the_source_keras_seeds_from_sets() -> None:
    keras.utils.set_random_seed(7)
    undisturbed = initial_weights()
    with keras_seeds_from(7):
        random.random()  # another thread's draw from the global generator, as Prefect's client makes
        assert np.array_equal(initial_weights(), undisturbed)
    with keras_seeds_from(8):
        assert not np.array_equal(initial_weights(), undisturbed)


@pytest.mark.parametrize("name", sorted(registry.REGISTRY))
def test_the_public_layer_walk_finds_the_random_layers_keras_tracks(name: str) -> None:
    """EpochSeeds reseeds the layers seeded_layers finds: the same ones, in the same order, as Keras's own walk."""
    params = load_test_params()
    model = registry.build(name, params.model(name))
    private = [layer.name for layer in model._flatten_layers(include_self=False) if hasattr(layer, "seed_generator")]
    assert [layer.name for layer in seeded_layers(model)] == private
    assert {layer.name for layer in all_layers(model)} >= {layer.name for layer in model.layers}


def test_some_models_have_random_layers_to_reseed() -> None:
    params = load_test_params()
    assert seeded_layers(registry.build("deep_mlp", params.model("deep_mlp")))  # its dropout


def test_run_atexit_handlers_runs_them_once_as_exit_would() -> None:
    code = textwrap.dedent("""
        import atexit
        from pipeline.warm import run_atexit_handlers
        atexit.register(print, "first")
        atexit.register(print, "second")
        run_atexit_handlers()
        print("after")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["second", "first", "after"]  # last registered first, and not again at exit

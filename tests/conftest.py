"""Shared test helpers: seeded data and a small `run_layer_test`."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from keras_antman import _keras  # noqa: E402
from keras_antman._keras import keras  # noqa: E402

# The suite runs under Keras 3 and, with TF_USE_LEGACY_KERAS=1, tf_keras.
LEGACY = _keras.LEGACY


def keras3_only(reason):
    """Skip under tf_keras; ``reason`` says what tf_keras lacks."""
    return pytest.mark.skipif(LEGACY, reason=f"tf_keras: {reason}")


def tf_keras_only(reason):
    """Run only under tf_keras; ``reason`` says what Keras 3 lacks."""
    return pytest.mark.skipif(
        not LEGACY, reason=f"tf_keras only (TF_USE_LEGACY_KERAS=1): {reason}")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def randomize_weights(layer, seed=0, scale=0.5):
    """Give every weight of ``layer`` seeded random values.

    Constant initialisers make every unit equal and would hide a wrong
    shuffle or gate order, so tests use random weights throughout.
    """
    r = np.random.default_rng(seed)
    layer.set_weights(
        [r.normal(scale=scale, size=w.shape).astype("float32")
         for w in layer.get_weights()]
    )


def assert_all_close(actual, expected, **tol):
    """Every tensor of two (nested) outputs close, and as many of each:
    `zip` alone would hide a missing state."""
    actual = [np.asarray(t) for t in keras.tree.flatten(actual)]
    expected = [np.asarray(t) for t in keras.tree.flatten(expected)]
    assert len(actual) == len(expected), (len(actual), len(expected))
    for a, b in zip(actual, expected):
        np.testing.assert_allclose(a, b, **tol)


def run_layer_test(layer_fn, input_shape, expected_output_shape,
                   expected_trainable_weights, tmp_path):
    """Shapes, weight count, ``.keras`` round trip and one training step."""
    x = np.random.default_rng(0).normal(size=input_shape).astype("float32")
    inputs = keras.Input(input_shape[1:])
    layer = layer_fn()
    outputs = layer(inputs)
    model = keras.Model(inputs, outputs)
    assert tuple(model.output_shape[1:]) == tuple(expected_output_shape[1:])
    assert len(layer.trainable_weights) == expected_trainable_weights
    randomize_weights(model)
    y = model.predict(x, verbose=0)
    assert y.shape == tuple(expected_output_shape)

    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_array_equal(restored.predict(x, verbose=0), y)

    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = [w.copy() for w in model.get_weights()]
    model.fit(x, np.ones_like(y), epochs=1, verbose=0)
    changed = [not np.array_equal(a, b)
               for a, b in zip(before, model.get_weights())]
    assert all(changed), "a weight did not receive a gradient update"
    return model

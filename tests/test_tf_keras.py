"""The two Keras flavours: which one an import picks (in fresh processes),
and what only tf_keras has: SavedModel and H5 through ``model.save``, and
tfmot's pruning of the structured layers."""

import ast
import os
import subprocess
import sys

import numpy as np
import pytest

import keras_antman as am
from keras_antman import _keras
from keras_antman._keras import keras

from conftest import LEGACY
from conftest import randomize_weights

tf_keras_only = pytest.mark.skipif(
    not LEGACY, reason="tf_keras only (run with TF_USE_LEGACY_KERAS=1)")


def _exported(module):
    """A flavour module's ``__all__``, read without importing it."""
    path = os.path.join(os.path.dirname(am.__file__), module + ".py")
    with open(path) as f:
        tree = ast.parse(f.read())
    return next(ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.Assign)
                and node.targets[0].id == "__all__")


def test_both_flavours_give_the_seam_the_same_names():
    names = _exported("_keras3")
    assert sorted(names) == sorted(_exported("_tf_keras"))
    for name in names:
        assert hasattr(_keras, name), name


def _fresh(code, legacy):
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if legacy:
        env["TF_USE_LEGACY_KERAS"] = "1"
    return subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=300, env=env)


def test_keras3_import_never_imports_tfmot_nor_changes_the_flavour():
    proc = _fresh(
        "import os, sys\n"
        "import keras_antman as am\n"
        "import keras\n"
        "assert am._keras.FLAVOUR == 'keras3'\n"
        "assert 'TF_USE_LEGACY_KERAS' not in os.environ\n"
        "assert 'tensorflow_model_optimization' not in sys.modules\n"
        "assert 'tf_keras' not in sys.modules\n"
        "assert issubclass(am.StructuredLSTM, keras.layers.Layer)\n"
        "print('ok')\n", legacy=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


def test_legacy_import_binds_tf_keras_without_tfmot():
    proc = _fresh(
        "import os, sys\n"
        "import keras_antman as am\n"
        "import tf_keras\n"
        "assert am._keras.FLAVOUR == 'tf_keras'\n"
        "assert os.environ['TF_USE_LEGACY_KERAS'] == '1'\n"
        "assert 'tensorflow_model_optimization' not in sys.modules\n"
        "assert issubclass(am.StructuredLSTM, tf_keras.layers.Layer)\n"
        "print('ok')\n", legacy=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


def test_legacy_without_tf_keras_says_how_to_fix():
    proc = _fresh("import sys; sys.modules['tf_keras'] = None\n"
                  "import keras_antman\n", legacy=True)
    assert proc.returncode != 0
    assert "tf_keras, which is not installed" in proc.stderr
    assert "unset TF_USE_LEGACY_KERAS" in proc.stderr


def _model(rng):
    inp = keras.Input((6, 8))
    h = am.StructuredLSTM(16, input_scheme=am.LGPShuffle(4),
                          recurrent_scheme=am.LowRankLGP(2, 4, 2),
                          return_sequences=True)(inp)
    h = am.StructuredGRU(8, input_scheme=am.LGPDense(2),
                         recurrent_scheme=am.LowRank(4))(h)
    model = keras.Model(inp, keras.layers.Dense(3)(h))
    randomize_weights(model, seed=5)
    return model


@tf_keras_only
@pytest.mark.parametrize("fmt", ["savedmodel", "h5"])
def test_tf_keras_save_and_load_round_trip(fmt, tmp_path, rng):
    model = _model(rng)
    x = rng.normal(size=(4, 6, 8)).astype("float32")
    path = str(tmp_path / ("model" if fmt == "savedmodel" else "model.h5"))
    model.save(path, save_format="tf" if fmt == "savedmodel" else "h5")
    restored = keras.models.load_model(path)
    assert [type(layer) for layer in restored.layers] == [
        type(layer) for layer in model.layers]
    lstm = restored.layers[1]
    assert lstm.input_scheme.describe() == "LGPShuffle(groups=4)"
    np.testing.assert_allclose(restored.predict(x, verbose=0),
                               model.predict(x, verbose=0), rtol=1e-6,
                               atol=1e-6)


@tf_keras_only
def test_tfmot_prunes_the_structured_weights(rng):
    tfmot = pytest.importorskip("tensorflow_model_optimization")
    sparsity = tfmot.sparsity.keras
    model = _model(rng)
    schedule = sparsity.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=6,
                                        frequency=1)
    pruned = sparsity.prune_low_magnitude(model, pruning_schedule=schedule)
    pruned.compile(keras.optimizers.Adam(1e-3), "mse")
    x = rng.normal(size=(64, 6, 8)).astype("float32")
    y = rng.normal(size=(64, 3)).astype("float32")
    pruned.fit(x, y, batch_size=8, epochs=1, verbose=0,
               callbacks=[sparsity.UpdatePruningStep()])
    stripped = sparsity.strip_pruning(pruned)
    assert [type(layer) for layer in stripped.layers] == [
        type(layer) for layer in model.layers]
    for layer in stripped.layers[1:3]:
        prunable = layer.get_prunable_weights()
        # Every structured weight, not the bias.
        assert len(prunable) == sum(
            len(m.trainable_weights) for m in layer.products().values())
        assert all(w is not layer.bias for w in prunable)
        for w in prunable:
            zeros = np.mean(w.numpy() == 0.0)
            # The schedule reached 75% at step 6 of 8; tfmot rounds the
            # number of weights it keeps.
            assert abs(zeros - 0.75) <= 1.0 / w.shape.num_elements() + 1e-6, (
                w.name, zeros)
        assert np.count_nonzero(layer.bias.numpy()) > 0
    # The stripped model still runs, on the compiled op where it applies.
    assert np.all(np.isfinite(stripped.predict(x[:2], verbose=0)))

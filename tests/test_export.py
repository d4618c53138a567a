"""Layers on the compiled op, and SavedModel export with either kernel,
loaded in a fresh Python process; the portable one converted to TFLite."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import keras_antman as am
from keras_antman import ops
from keras_antman._keras import keras

from conftest import assert_all_close
from conftest import randomize_weights

SCHEMES = [am.Dense(), am.LowRank(2), am.LGPShuffle(4), am.LGPDense(4),
           am.LowRankLGP(2, 2, 2)]
LAYERS = [
    (am.StructuredLSTM, {}),
    (am.StructuredGRU, dict(reset_after=True)),
    (am.StructuredGRU, dict(reset_after=False)),
]


def _pair(cls, kwargs, x):
    portable = cls(**kwargs, kernel="portable")
    portable(x)
    randomize_weights(portable, seed=3)
    compiled = cls.from_config({**portable.get_config(), "kernel": "compiled"})
    compiled(x)
    compiled.set_weights(portable.get_weights())
    return portable, compiled


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
@pytest.mark.parametrize("cls,extra", LAYERS,
                         ids=["lstm", "gru_reset_after", "gru_reset_before"])
@pytest.mark.parametrize("go_backwards", [False, True])
def test_compiled_layer_equals_portable(scheme, cls, extra, go_backwards,
                                        rng):
    x = rng.normal(size=(3, 7, 16)).astype("float32")
    portable, compiled = _pair(cls, dict(
        units=16, input_scheme=scheme, recurrent_scheme=scheme,
        return_sequences=True, return_state=True, go_backwards=go_backwards,
        **extra), x)
    assert_all_close(compiled(x), portable(x), rtol=1e-5, atol=1e-5)


def test_auto_uses_portable_path_for_masks_and_training(rng):
    x = rng.normal(size=(2, 5, 8)).astype("float32")
    layer = am.StructuredLSTM(8, input_scheme=am.LGPShuffle(2))
    layer(x)
    assert layer.compiled_blockers() == []
    assert layer.compiled_blockers(mask=np.ones((2, 5), bool)) == [
        "a mask was given (the op has no masking)"]
    relu = am.StructuredLSTM(8, activation="relu", kernel="compiled")
    with pytest.raises(ValueError, match="kernel='compiled' cannot run this "
                       "layer: activation is not tanh"):
        relu(x)


def _model(rng):
    inp = keras.Input((6, 16))
    h = am.StructuredLSTM(16, input_scheme=am.LGPShuffle(4),
                          recurrent_scheme=am.LowRankLGP(2, 2, 2),
                          return_sequences=True)(inp)
    h = keras.layers.Bidirectional(am.StructuredGRU(
        8, recurrent_scheme=am.LGPDense(2)))(h)
    model = keras.Model(inp, keras.layers.Dense(3)(h))
    randomize_weights(model, seed=5)
    return model


_LOADER = """
import json, sys
import numpy as np
{imports}
import tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
x = np.load(sys.argv[2])
print(json.dumps(m.serve(x).numpy().tolist()))
"""


def _load_in_fresh_process(path, x, tmp_path, imports=""):
    np.save(tmp_path / "x.npy", x)
    code = _LOADER.format(imports=imports)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, "-c", code, str(path), str(tmp_path / "x.npy")],
        capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("kernel", ["portable", "compiled"])
def test_saved_model_in_fresh_process(kernel, tmp_path, rng):
    model = _model(rng)
    x = rng.normal(size=(2, 6, 16)).astype("float32")
    path = am.export(model, tmp_path / "sm", kernel=kernel)
    imports = ("import keras_antman; keras_antman.ops.load()"
               if kernel == "compiled" else "")
    proc = _load_in_fresh_process(path, x, tmp_path, imports)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(got, model(x), rtol=1e-5, atol=1e-5)
    ops.load()  # this process reads the compiled graph too
    graph_ops = set()
    for f in tf.saved_model.load(str(path)).serve.concrete_functions:
        graph = f.graph.as_graph_def()
        for fn in [graph, *graph.library.function]:
            nodes = fn.node if fn is graph else fn.node_def
            graph_ops.update(node.op for node in nodes)
    ours = {op for op in graph_ops if "KerasAntman" in op}
    if kernel == "compiled":
        assert ours == {"KerasAntman>StructuredLstm",
                        "KerasAntman>StructuredGru"}
    else:
        assert ours == set()
        assert "MatMul" in graph_ops or "BatchMatMulV2" in graph_ops


def test_compiled_saved_model_needs_the_op(tmp_path, rng):
    model = _model(rng)
    path = am.export(model, tmp_path / "sm", kernel="compiled")
    x = np.zeros((1, 6, 16), "float32")
    for imports in ("", "import keras_antman"):  # import alone loads nothing
        proc = _load_in_fresh_process(path, x, tmp_path, imports)
        assert proc.returncode != 0
        assert "KerasAntman" in proc.stderr
        assert "not registered" in proc.stderr


def test_import_loads_no_library_and_changes_nothing():
    code = (
        "import os, sys; before = dict(os.environ)\n"
        "import keras_antman\n"
        "from keras_antman import ops\n"
        "assert ops._state['module'] is None, 'library loaded at import'\n"
        "assert dict(os.environ) == before, 'environment changed'\n"
        "assert 'tensorflow_model_optimization' not in sys.modules\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


def test_portable_converts_to_tflite(tmp_path, rng):
    model = _model(rng)
    path = am.export(model, tmp_path / "sm", kernel="portable", batch_size=1)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(path))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    interpreter = tf.lite.Interpreter(model_content=converter.convert())
    runner = interpreter.get_signature_runner()
    x = rng.normal(size=(1, 6, 16)).astype("float32")
    name = list(runner.get_input_details())[0]
    (out,) = runner(**{name: x}).values()
    np.testing.assert_allclose(out, model(x), rtol=1e-4, atol=1e-5)


def test_export_is_atomic_and_checks_arguments(tmp_path, rng):
    model = _model(rng)
    with pytest.raises(ValueError, match="`kernel` must be one of"):
        am.export(model, tmp_path / "a", kernel="fast")
    with pytest.raises(ValueError, match="`batch_size` must be None or"):
        am.export(model, tmp_path / "a", batch_size=0)
    assert os.listdir(tmp_path) == []  # nothing half-written
    target = tmp_path / "b"
    am.export(model, target)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        am.export(model, target)
    am.export(model, target, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["b"]

    class Boom(keras.layers.Layer):
        armed = False

        def call(self, x):
            if Boom.armed:
                raise RuntimeError("boom")
            return x

    inp = keras.Input((6, 16))
    broken = keras.Model(inp, Boom()(inp))
    Boom.armed = True
    with pytest.raises(RuntimeError, match="boom"):
        am.export(broken, tmp_path / "c")
    assert sorted(os.listdir(tmp_path)) == ["b"]


def test_export_removes_staging_folders_of_dead_exports(tmp_path, rng):
    model = _model(rng)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".sm.export-{dead}-abc"  # a killed export's folder
    (stale / "saved_model").mkdir(parents=True)
    live = tmp_path / f".sm.export-{os.getpid()}-xyz"  # still running
    live.mkdir()
    other = tmp_path / ".unrelated"
    other.mkdir()
    am.export(model, tmp_path / "sm")
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["sm", live.name, other.name])


def test_compiled_export_without_the_op_says_how_to_fix(tmp_path, rng,
                                                        monkeypatch):
    monkeypatch.setitem(ops._state, "module", None)
    monkeypatch.setitem(ops._state, "error", "library missing (test)")
    with pytest.raises(ops.CompiledOpsUnavailableError, match="missing"):
        am.export(_model(rng), tmp_path / "x", kernel="compiled")
    assert not (tmp_path / "x").exists()


_KILLED_EXPORT = """
import sys
from keras_antman._keras import keras
import keras_antman as am
inp = keras.Input((6, 16))
h = am.StructuredLSTM(16, input_scheme=am.LGPShuffle(4))(inp)
model = keras.Model(inp, keras.layers.Dense(3)(h))
print("ready", flush=True)
while True:  # export until killed
    am.export(model, sys.argv[1], kernel="portable", overwrite=True)
"""


def test_export_killed_at_random_moments(tmp_path, rng):
    import random
    import time

    target = tmp_path / "sm"
    delays = random.Random(0)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_EXPORT,
                                 str(target)], stdout=subprocess.PIPE,
                                text=True, env=env)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delays.uniform(0.5, 4.0))
        proc.kill()
        proc.wait()
        # Absent, or a complete SavedModel that loads.
        if target.exists():
            assert callable(tf.saved_model.load(str(target)).serve)
    # The next export removes what the killed ones left beside the target.
    am.export(_model(rng), target, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["sm"]

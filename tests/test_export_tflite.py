"""`export_tflite`: float32, dynamic-range int8 and full-integer int8
TFLite files of a structured (LGP-Shuffle) and a stock LSTM model, run by
the TFLite interpreter against the Keras model; what the files store
(`tflite_summary`); the argument checks."""

import os
import warnings

import numpy as np
import pytest
import tensorflow as tf

import keras_antman as am
from keras_antman import ops
from keras_antman._keras import keras

from conftest import randomize_weights

T, D, UNITS, OUT, BATCH = 6, 32, 128, 8, 2
KINDS = ["lgp", "stock"]
FUSED = "UNIDIRECTIONAL_SEQUENCE_LSTM"  # TFLite's fused LSTM op


def _model(kind, kernel="auto"):
    inp = keras.Input((T, D))
    if kind == "lgp":
        lstm = am.StructuredLSTM(UNITS, input_scheme=am.LGPShuffle(4),
                                 recurrent_scheme=am.LGPShuffle(4),
                                 return_sequences=True, kernel=kernel)
    else:
        lstm = keras.layers.LSTM(UNITS, return_sequences=True)
    model = keras.Model(inp, keras.layers.Dense(OUT)(lstm(inp)))
    randomize_weights(model, seed=7, scale=0.3)
    return model


def _run(path, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite -> ai_edge_litert notice
        interpreter = tf.lite.Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner()
    (name,) = runner.get_input_details()
    (out,) = runner(**{name: x}).values()
    return out


def _kernel_elements(layer):
    """Elements of the weight matrices (not biases) of ``layer``."""
    return sum(int(np.prod(w.shape)) for w in layer.weights
               if len(w.shape) >= 2)


def _assert_integer_only(summary):
    """Only QUANTIZE ops read float32 activations: a float model input's,
    and those after the first step's gate SPLIT, whose forget-gate output
    is unused (the initial cell state is zero), so the quantizer leaves
    that one SPLIT in float between a DEQUANTIZE and QUANTIZEs."""
    floats = summary["float_ops"]
    assert set(floats) <= {"QUANTIZE", "SPLIT"}, summary
    assert floats.get("SPLIT", 0) <= 1, summary


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``{kind: (model, x, {quantize: path})}``, converted once."""
    rng = np.random.default_rng(0)
    calibration = rng.normal(size=(64, T, D)).astype("float32")
    out = {}
    for kind in KINDS:
        model = _model(kind)
        d = tmp_path_factory.mktemp(kind)
        paths = {
            q: am.export_tflite(
                model, d / f"{q}.tflite", quantize=q, batch_size=BATCH,
                representative_data=calibration if q == "int8" else None)
            for q in (None, "dynamic", "int8")}
        x = rng.normal(size=(BATCH, T, D)).astype("float32")
        out[kind] = (model, x, paths)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_float32_equals_keras(files, kind):
    model, x, paths = files[kind]
    np.testing.assert_allclose(_run(paths[None], x), model(x), rtol=1e-5,
                               atol=1e-5)
    summary = am.tflite_summary(paths[None])
    assert set(summary["weights"]) <= {"FLOAT32", "INT32"}


# Tolerances on max |quantized - float32| / max |float32| over the output.
# An int8 step is 1/127 of a tensor's largest magnitude. "dynamic" rounds
# the weights and, per product, its input row: half a step each, summed
# randomly over 16-64 terms and carried through 6 recurrent steps
# (measured 0.4-0.8%). "int8" also rounds every activation, the gates and
# the cell state included, to 256 levels of its calibrated range (measured
# 3-6%). A wrong scale, zero point or gate order is off by ~100%.
QUANT_RTOL = {"dynamic": 0.03, "int8": 0.15}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("quantize", ["dynamic", "int8"])
def test_quantized_close_to_float32(files, kind, quantize):
    model, x, paths = files[kind]
    want = _run(paths[None], x)
    got = _run(paths[quantize], x)
    err = np.max(np.abs(got - want))
    assert 0 < err <= QUANT_RTOL[quantize] * np.max(np.abs(want)), err


@pytest.mark.parametrize("kind", KINDS)
def test_dynamic_stores_int8_weights_and_computes_in_float(files, kind):
    model, _, paths = files[kind]
    summary = am.tflite_summary(paths["dynamic"])
    weights = summary["weights"]
    # Every weight matrix is int8 (all have >= 1024 elements, the
    # converter's threshold), and each int8 byte replaced four float32 ones.
    assert weights["INT8"] == _kernel_elements(model)
    fp32 = am.tflite_summary(paths[None])["weights"]
    assert fp32["FLOAT32"] - weights["FLOAT32"] == 4 * weights["INT8"]
    # the products are hybrid (int8 weights, float32 activations)
    products = {"FULLY_CONNECTED", "BATCH_MATMUL"}
    assert products & set(summary["float_ops"]), summary
    # The loop is kept (tf_keras's stock LSTM converts to TFLite's fused
    # LSTM op instead of a loop).
    assert summary["ops"].get("WHILE", 0) == 1 or \
        summary["ops"].get(FUSED, 0) == 1, summary
    assert os.path.getsize(paths["dynamic"]) < os.path.getsize(paths[None])


@pytest.mark.parametrize("kind", KINDS)
def test_int8_has_int8_weights_and_activations(files, kind):
    model, _, paths = files[kind]
    path = paths["int8"]
    summary = am.tflite_summary(path)
    weights = summary["weights"]
    assert set(weights) == {"INT8", "INT32"}, summary
    assert weights["INT8"] >= _kernel_elements(model)
    _assert_integer_only(summary)
    # the loop is unrolled (TFLite's calibrator cannot run a WHILE loop)
    assert "WHILE" not in summary["ops"]
    if FUSED in summary["ops"]:  # tf_keras's stock LSTM, int8 kernel
        assert summary["ops"][FUSED] == 1
    else:
        # 3 sigmoid gates per step; the first step's forget gate multiplies
        # the zero initial state and is folded away.
        assert summary["ops"]["LOGISTIC"] == 3 * T - 1
    # A quarter of the float weights' bytes (+ int32 biases); the file,
    # whose unrolled graph is larger, still smaller than the float32 one.
    fp32 = paths[None]
    assert sum(weights.values()) < 0.35 * sum(
        am.tflite_summary(fp32)["weights"].values())
    assert os.path.getsize(path) < os.path.getsize(fp32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=str(path))
    types = {t["dtype"] for t in interpreter.get_tensor_details()
             if t["quantization"][0] != 0}
    assert np.int8 in types, types


@pytest.mark.parametrize("kind", KINDS)
def test_steps_unrolls_float32(tmp_path, files, kind):
    model, x, _ = files[kind]
    path = am.export_tflite(model, tmp_path / "u.tflite", batch_size=BATCH,
                            steps=T)
    np.testing.assert_allclose(_run(path, x), model(x), rtol=1e-5,
                               atol=1e-5)
    assert "WHILE" not in am.tflite_summary(path)["ops"]
    assert all(not layer.unroll for layer in model.layers
               if isinstance(layer, keras.layers.RNN))  # restored


def test_int8_language_model_keeps_int32_token_ids(tmp_path, rng):
    inp = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(50, D)(inp)
    h = am.StructuredLSTM(UNITS, input_scheme=am.LGPShuffle(4),
                          recurrent_scheme=am.LGPShuffle(4),
                          return_sequences=True)(h)
    model = keras.Model(inp, keras.layers.Dense(50)(h))
    randomize_weights(model, seed=3, scale=0.3)
    tokens = rng.integers(0, 50, size=(40, T)).astype("int32")
    fp32 = am.export_tflite(model, tmp_path / "f.tflite")
    int8 = am.export_tflite(model, tmp_path / "q.tflite", quantize="int8",
                            representative_data=tokens)
    x = tokens[:1]
    want = _run(fp32, x)
    np.testing.assert_allclose(want, model(x), rtol=1e-5, atol=1e-5)
    err = np.max(np.abs(_run(int8, x) - want))
    assert 0 < err <= QUANT_RTOL["int8"] * np.max(np.abs(want)), err
    _assert_integer_only(am.tflite_summary(int8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=int8)
    (detail,) = interpreter.get_input_details()
    assert detail["dtype"] == np.int32
    assert tuple(detail["shape"]) == (1, T)  # unrolled over the data's T


@pytest.mark.skipif(not ops.is_available(), reason="the op is not built")
def test_compiled_kernel_model_converts_through_stock_ops(tmp_path, rng):
    model = _model("lgp", kernel="compiled")
    x = rng.normal(size=(1, T, D)).astype("float32")
    path = am.export_tflite(model, tmp_path / "m.tflite", quantize="dynamic")
    assert model.layers[1].kernel == "compiled"  # its setting is kept
    want = model(x)
    err = np.max(np.abs(_run(path, x) - want))
    assert err <= QUANT_RTOL["dynamic"] * np.max(np.abs(want))


def test_arguments_are_checked_and_nothing_is_half_written(tmp_path, rng):
    model = _model("lgp")
    data = rng.normal(size=(8, T, D)).astype("float32")
    target = tmp_path / "m.tflite"
    cases = [
        (dict(quantize="float16"), "`quantize` must be one of"),
        (dict(quantize="int8"), "needs no data"),
        (dict(quantize="dynamic", representative_data=data),
         "only used with quantize='int8'"),
        (dict(quantize="int8", representative_data=data[:, :, :3]),
         rf"inputs of shape \(8, 6, 3\); model .* takes \(N, 6, {D}\)"),
        (dict(quantize="int8", representative_data=data.astype("int32")),
         "holds int32 inputs; model .* takes float32"),
        (dict(quantize="int8", representative_data=data[:1],
              batch_size=2), "no batch of batch_size=2 samples"),
        (dict(batch_size=None), "`batch_size` must be a positive integer"),
        (dict(quantize="int8", representative_data=data, steps=5),
         r"lengths \[6\], but the model is unrolled over steps=5"),
        (dict(steps=0), "`steps` must be a positive integer or None"),
        (dict(steps=5), r"`steps=5` fixes axis 1 of the inputs, but model "
         rf".* takes \(None, 6, {D}\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            am.export_tflite(model, target, **kwargs)
    assert os.listdir(tmp_path) == []
    am.export_tflite(model, target)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        am.export_tflite(model, target)
    before = target.read_bytes()
    am.export_tflite(model, target, quantize="dynamic", overwrite=True)
    assert target.read_bytes() != before
    assert os.listdir(tmp_path) == ["m.tflite"]


def test_conversion_failure_names_it_and_writes_nothing(tmp_path):
    # A string op has no TFLite builtin: conversion must fail, not fall
    # back to SELECT_TF_OPS.
    class Hash(keras.layers.Layer):
        def call(self, x):
            s = tf.strings.as_string(x)
            return tf.cast(tf.strings.to_hash_bucket_fast(s, 7), "float32")

    inp = keras.Input((4,))
    model = keras.Model(inp, Hash()(inp))
    target = tmp_path / "m.tflite"
    with pytest.raises(RuntimeError, match="TFLite could not convert model "
                       f"'{model.name}' with built-in ops"):
        am.export_tflite(model, target)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("shuffle", [False, True])
def test_per_group_lowering_equals_the_block_diagonal_product(shuffle, rng):
    from keras_antman import schemes

    g, a, b = 4, 3, 5
    blocks = rng.normal(size=(g, a, b)).astype("float32")
    x = rng.normal(size=(2, 7, g * a)).astype("float32")
    dense = np.zeros((g * a, g * b), "float32")
    for i in range(g):
        dense[i * a:(i + 1) * a, i * b:(i + 1) * b] = blocks[i]
    want = x @ dense
    if shuffle:  # group i's j-th output at j * g + i
        want = want.reshape(2, 7, g, b).transpose(0, 1, 3, 2).reshape(
            2, 7, g * b)
    batched = schemes.block_diag_matmul(x, blocks, shuffle=shuffle)
    with schemes.per_group_products():
        per_group = schemes.block_diag_matmul(x, blocks, shuffle=shuffle)
    np.testing.assert_allclose(batched, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(per_group, want, rtol=1e-5, atol=1e-5)

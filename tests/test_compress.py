"""`compress` on every kind of model tfmot's prune tests cover."""

import numpy as np
import pytest

import keras_antman as am
from keras_antman._keras import keras

from conftest import assert_all_close
from conftest import randomize_weights

TOL = dict(rtol=1e-5, atol=1e-5)
LGP = dict(input_scheme=am.LGPShuffle(2), recurrent_scheme=am.LGPShuffle(4))


def _x(rng, shape=(2, 5, 8)):
    return rng.normal(size=shape).astype("float32")


def sequential():
    return keras.Sequential([
        keras.Input((5, 8)),
        keras.layers.LSTM(8, return_sequences=True, name="lstm_a"),
        keras.layers.LSTM(8, name="lstm_b"),
        keras.layers.Dense(3, name="head"),
    ])


def functional():
    inp = keras.Input((5, 8))
    h = keras.layers.Bidirectional(
        keras.layers.LSTM(8, return_sequences=True), name="bi")(inp)
    h = keras.layers.GRU(8, return_sequences=True, return_state=True,
                         name="gru")(h)
    out = keras.layers.Dense(3, name="head")(h[0])
    return keras.Model(inp, [out, h[1]])


def stacked_cells():
    return keras.Sequential([
        keras.Input((5, 8)),
        keras.layers.RNN(keras.layers.StackedRNNCells(
            [keras.layers.LSTMCell(8), keras.layers.GRUCell(8)]),
            name="stack"),
    ])


def nested():
    inner = keras.Sequential(
        [keras.Input((5, 8)), keras.layers.LSTM(8, return_sequences=True,
                                                name="inner_lstm")],
        name="inner")
    inp = keras.Input((5, 8))
    out = keras.layers.LSTM(4, name="outer_lstm")(inner(inp))
    return keras.Model(inp, out)


def shared_layer():
    lstm = keras.layers.LSTM(8, name="shared")
    a, b = keras.Input((5, 8)), keras.Input((5, 8))
    return keras.Model([a, b], keras.layers.Add()([lstm(a), lstm(b)]))


MODELS = [sequential, functional, stacked_cells, nested, shared_layer]


def _inputs(model, rng):
    xs = [_x(rng) for _ in model.inputs]
    return xs if len(xs) > 1 else xs[0]


@pytest.mark.parametrize("make", MODELS, ids=lambda f: f.__name__)
def test_dense_schemes_reproduce_the_model(make, rng):
    model = make()
    randomize_weights(model, seed=1)
    x = _inputs(model, rng)
    out = am.compress(model)
    assert_all_close(out(x), model(x), **TOL)


@pytest.mark.parametrize("make", MODELS, ids=lambda f: f.__name__)
def test_structured_weights_come_from_the_dense_ones(make, rng):
    model = make()
    randomize_weights(model, seed=1)
    before = [w.copy() for w in model.get_weights()]
    out = am.compress(model, **LGP)
    # The original is untouched.
    assert_all_close(model.get_weights(), before, rtol=0, atol=0)
    # Every structured product is the scheme's projection of the trained
    # dense matrix; every other weight is copied.
    old_layers = {x.name: x for x in _leaves(model)}
    n_structured = 0
    for layer in _leaves(out):
        old = old_layers[layer.name]
        pairs = _cell_pairs(old, layer)
        if not pairs:
            assert_all_close(layer.get_weights(), old.get_weights(),
                             rtol=0, atol=0)
        for o, n in pairs:
            n_structured += 1
            kernel, rec = o.kernel.numpy(), o.recurrent_kernel.numpy()
            expect_in = am.LGPShuffle(2).from_dense(kernel).to_dense()
            np.testing.assert_allclose(n.input_matrix.to_dense(), expect_in)
            if isinstance(n.recurrent_matrix.scheme, am.LGPShuffle):
                expect = am.LGPShuffle(4).from_dense(rec).to_dense()
                np.testing.assert_allclose(n.stock_weights()[1], expect)
            np.testing.assert_array_equal(n.bias.numpy(), o.bias.numpy())
    assert n_structured > 0
    out(_inputs(model, rng))


def _leaves(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaves(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            yield layer


def _cell_pairs(old, new):
    if isinstance(new, keras.layers.Bidirectional):
        return (_cell_pairs(old.forward_layer, new.forward_layer)
                + _cell_pairs(old.backward_layer, new.backward_layer))
    if isinstance(new, keras.layers.RNN):
        cells = lambda x: (x.cell.cells if isinstance(  # noqa: E731
            x.cell, keras.layers.StackedRNNCells) else [x.cell])
        return list(zip(cells(old), cells(new)))
    return []


def test_compress_replaces_every_recurrent_layer():
    out = am.compress(functional(), **LGP)
    assert isinstance(out.get_layer("bi").forward_layer, am.StructuredLSTM)
    assert isinstance(out.get_layer("bi").backward_layer, am.StructuredLSTM)
    assert out.get_layer("bi").backward_layer.go_backwards
    assert isinstance(out.get_layer("gru"), am.StructuredGRU)
    assert out.get_layer("gru").return_state
    cells = am.compress(stacked_cells(), **LGP).get_layer("stack").cell.cells
    assert [type(c) for c in cells] == [am.StructuredLSTMCell,
                                        am.StructuredGRUCell]
    inner = am.compress(nested(), **LGP).get_layer("inner")
    assert isinstance(inner.get_layer("inner_lstm"), am.StructuredLSTM)


def test_shared_layer_stays_shared(rng):
    out = am.compress(shared_layer(), **LGP)
    structured = [x for x in out.layers if isinstance(x, am.StructuredLSTM)]
    assert len(structured) == 1


def test_model_loaded_from_keras_file(tmp_path, rng):
    model = sequential()
    randomize_weights(model, seed=4)
    model.save(tmp_path / "teacher.keras")
    loaded = keras.models.load_model(tmp_path / "teacher.keras")
    x = _x(rng)
    np.testing.assert_allclose(model(x), am.compress(loaded)(x), **TOL)
    student = am.compress(loaded, **LGP)
    student.save(tmp_path / "student.keras")
    again = keras.models.load_model(tmp_path / "student.keras")
    np.testing.assert_array_equal(student(x), again(x))


def test_per_layer_dict_and_callable(rng):
    model = sequential()
    out = am.compress(model, layers={
        "lstm_a": (am.LGPShuffle(2), am.LGPShuffle(8)),
        "lstm_b": {"recurrent_scheme": am.LowRank(2)},
    })
    a, b = out.get_layer("lstm_a"), out.get_layer("lstm_b")
    assert a.recurrent_matrix.scheme.groups == 8
    assert isinstance(b.input_matrix.scheme, am.Dense)
    assert isinstance(b.recurrent_matrix.scheme, am.LowRank)

    seen = []

    def policy(layer):
        seen.append(layer.name)
        return None if layer.name == "lstm_a" else (am.LGPShuffle(4),) * 2

    out = am.compress(model, layers=policy)
    assert seen == ["lstm_a", "lstm_b"]
    assert isinstance(out.get_layer("lstm_a"), keras.layers.LSTM)
    assert isinstance(out.get_layer("lstm_b"), am.StructuredLSTM)


def test_bidirectional_by_inner_name():
    model = functional()
    inner = model.get_layer("bi").forward_layer.name
    out = am.compress(model, layers={inner: (am.LGPShuffle(2),) * 2})
    assert isinstance(out.get_layer("bi").forward_layer, am.StructuredLSTM)
    assert isinstance(out.get_layer("gru"), keras.layers.GRU)


def test_single_layer(rng):
    x = _x(rng)
    lstm = keras.layers.LSTM(8, return_sequences=True, name="solo")
    lstm(x)
    randomize_weights(lstm, seed=2)
    out = am.compress(lstm)
    assert isinstance(out, am.StructuredLSTM) and out.name == "solo"
    np.testing.assert_allclose(lstm(x), out(x), **TOL)


def _lstm_head(kind):
    if kind == "sequential":
        return keras.Sequential([
            keras.Input((5, 4)), keras.layers.LSTM(8, name="lstm"),
            keras.layers.Dense(2, name="head")])
    inputs = keras.Input((5, 4))
    hidden = keras.layers.LSTM(8, name="lstm")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))


@pytest.mark.parametrize("kind", ["sequential", "functional"])
def test_frozen_model_gives_trainable_student_and_layer_flags_stay(kind):
    model = _lstm_head(kind)
    model.get_layer("head").trainable = False  # a deliberate per-layer flag
    student = am.compress(model, **LGP)
    assert student.get_layer("lstm").trainable
    assert not student.get_layer("head").trainable
    model.get_layer("head").trainable = True
    # The Distiller freezes its teacher; a later student of that teacher
    # (the next row of a comparison run in the same process) must train
    # every weight, as the first one did.
    first = am.compress(model, **LGP)
    am.Distiller(student=first, teacher=model)
    assert not model.trainable
    student = am.compress(model, **LGP)
    assert student.trainable
    assert all(layer.trainable for layer in student.layers)
    assert len(student.trainable_weights) == len(student.weights) > 0
    assert len(student.trainable_weights) == len(first.trainable_weights)


def test_recompress_a_compressed_model(rng):
    model = sequential()
    randomize_weights(model, seed=3)
    once = am.compress(model, **LGP)
    twice = am.compress(once)  # Dense schemes: materialise
    x = _x(rng)
    np.testing.assert_allclose(once(x), twice(x), **TOL)
    assert isinstance(twice.get_layer("lstm_a").input_matrix.scheme, am.Dense)


def test_errors():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.lstm = keras.layers.LSTM(4)

        def call(self, x):
            return self.lstm(x)

    with pytest.raises(ValueError, match="Received an object of type 'Sub'"):
        am.compress(Sub())
    unbuilt = keras.Sequential([keras.layers.LSTM(4)])
    with pytest.raises(ValueError, match="is not built"):
        am.compress(unbuilt)
    with pytest.raises(ValueError, match=r"`layers` names \['nope'\].*"
                       r"\['lstm_a', 'lstm_b'\]"):
        am.compress(sequential(), layers={"nope": None})
    with pytest.raises(ValueError, match="`layers` must be None, a dict"):
        am.compress(sequential(), layers=["lstm_a"])
    with pytest.raises(ValueError, match="unknown keys"):
        am.compress(sequential(), layers={"lstm_a": {"groups": 2}})
    with pytest.raises(ValueError, match=r"`lstm_a: recurrent product`: "
                       r"LGPShuffle\(groups=3\)"):
        am.compress(sequential(), recurrent_scheme=am.LGPShuffle(3))

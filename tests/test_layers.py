"""StructuredLSTM / StructuredGRU: equal to the stock layers with Dense
schemes, equal to a NumPy reference with structured schemes, every Keras
RNN option, serialization and training. Every test runs twice, as
tensorflow-addons runs its op tests: inference on the compiled op and on
stock TF ops (``KERAS_ANTMAN_PORTABLE=1``)."""

import numpy as np
import pytest
import tensorflow as tf

import keras_antman as am
from keras_antman import ops
from keras_antman import schemes
from keras_antman._keras import keras

import reference
from conftest import assert_all_close
from conftest import keras3_only
from conftest import randomize_weights
from conftest import run_layer_test

TOL = dict(rtol=1e-5, atol=1e-5)
SCHEMES = [
    am.Dense(), am.LowRank(2), am.LGPShuffle(4), am.LGPDense(4),
    am.LowRankLGP(2, 4, 2), am.LowRank(rank=3),
]


@pytest.fixture(autouse=True, params=["compiled", "portable"])
def inference_path(request, monkeypatch):
    """Runs the test with inference on the compiled op, then on TF ops."""
    if request.param == "portable":
        monkeypatch.setenv("KERAS_ANTMAN_PORTABLE", "1")
        assert not ops.is_available()
    else:
        assert ops.is_available(), "the compiled op library is not built"
    return request.param


def _x(rng, shape=(3, 6, 8)):
    return rng.normal(size=shape).astype("float32")


def _stock_and_structured(stock_cls, ours_cls, x, **kwargs):
    stock = stock_cls(**kwargs)
    stock(x)
    randomize_weights(stock, seed=7)
    ours = ours_cls(**kwargs)
    ours(x)
    ours.set_stock_weights(*stock.get_weights())
    return stock, ours


LSTM_OPTIONS = [
    dict(units=8),
    dict(units=8, return_sequences=True),
    dict(units=8, return_sequences=True, return_state=True),
    dict(units=8, go_backwards=True, return_sequences=True),
    dict(units=8, unroll=True, return_state=True),
    dict(units=8, use_bias=False),
    dict(units=8, activation="relu", recurrent_activation="hard_sigmoid"),
]


@pytest.mark.parametrize("kwargs", LSTM_OPTIONS)
def test_dense_lstm_equals_keras_lstm(kwargs, rng):
    x = _x(rng)
    stock, ours = _stock_and_structured(
        keras.layers.LSTM, am.StructuredLSTM, x, **kwargs)
    assert_all_close(ours(x), stock(x), **TOL)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("extra", [{}, dict(go_backwards=True),
                                   dict(return_state=True)])
def test_dense_gru_equals_keras_gru(reset_after, extra, rng):
    x = _x(rng)
    stock, ours = _stock_and_structured(
        keras.layers.GRU, am.StructuredGRU, x, units=8,
        return_sequences=True, reset_after=reset_after, **extra)
    assert_all_close(ours(x), stock(x), **TOL)


def test_masking_and_initial_state_match_keras(rng):
    x = _x(rng)
    mask = np.ones((3, 6), bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    # Tensors: tf_keras's stock LSTM rejects NumPy initial states.
    h0 = tf.constant(rng.normal(size=(3, 8)).astype("float32"))
    c0 = tf.constant(rng.normal(size=(3, 8)).astype("float32"))
    stock, ours = _stock_and_structured(
        keras.layers.LSTM, am.StructuredLSTM, x, units=8,
        return_sequences=True, return_state=True)
    a = stock(x, mask=mask, initial_state=[h0, c0])
    b = ours(x, mask=mask, initial_state=[h0, c0])
    assert_all_close(b, a, **TOL)
    # Masked steps carry the state: row 2's final state is its step-0 state.
    np.testing.assert_allclose(b[1][2], b[0][2, 0], **TOL)


def test_embedding_mask_propagates(rng):
    tokens = np.array([[3, 4, 5, 0, 0], [1, 2, 0, 0, 0]])

    def model(rnn):
        inp = keras.Input((5,), dtype="int32")
        h = keras.layers.Embedding(10, 8, mask_zero=True)(inp)
        return keras.Model(inp, rnn(h))

    stock = model(keras.layers.LSTM(8))
    ours = am.compress(stock)
    randomize_weights(stock, seed=3)
    ours = am.compress(stock)
    np.testing.assert_allclose(stock(tokens), ours(tokens), **TOL)
    # Padding beyond the mask changes nothing.
    padded = tokens.copy()
    padded[0, 3:] = 0
    np.testing.assert_allclose(ours(tokens), ours(padded), **TOL)


def test_stateful_matches_keras(rng):
    x = _x(rng, (2, 4, 8))
    stock, ours = _stock_and_structured(
        keras.layers.LSTM, am.StructuredLSTM, x, units=8, stateful=True)
    stock.reset_states()
    ours.reset_states()
    for _ in range(3):  # state carries across calls
        np.testing.assert_allclose(stock(x), ours(x), **TOL)
    a1 = ours(x)
    ours.reset_states()
    stock.reset_states()
    np.testing.assert_allclose(stock(x), ours(x), **TOL)
    assert not np.allclose(a1, ours(x))


@keras3_only("its stock layers draw dropout masks from TF's global "
             "stateful random ops, so one seed does not give two layers "
             "the same mask")
def test_input_dropout_matches_keras_with_the_same_seed(rng):
    x = _x(rng)
    stock, ours = _stock_and_structured(
        keras.layers.LSTM, am.StructuredLSTM, x, units=8, dropout=0.3,
        seed=11)
    b = ours(x, training=True)
    np.testing.assert_allclose(stock(x, training=True), b, **TOL)
    assert not np.allclose(b, ours(x, training=False))


def test_recurrent_dropout_applies_in_training_only(rng):
    x = _x(rng)
    layer = am.StructuredLSTM(8, recurrent_dropout=0.5, seed=3,
                              recurrent_scheme=am.LGPShuffle(2))
    layer(x)
    randomize_weights(layer, seed=1)
    np.testing.assert_array_equal(layer(x), layer(x))
    assert not np.allclose(layer(x, training=True), layer(x))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_structured_lstm_equals_numpy_reference(scheme, rng):
    x = _x(rng)
    layer = am.StructuredLSTM(8, input_scheme=scheme, recurrent_scheme=scheme,
                              return_sequences=True, go_backwards=True)
    layer(x)
    randomize_weights(layer, seed=5)
    kernel = reference.dense(layer.input_matrix)
    rec = reference.dense(layer.recurrent_matrix)
    expected, _, _ = reference.lstm(x, kernel, rec, layer.bias.numpy(),
                                    go_backwards=True)
    np.testing.assert_allclose(layer(x), expected, **TOL)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("scheme", SCHEMES[1:], ids=lambda s: s.describe())
def test_structured_gru_equals_numpy_reference(scheme, reset_after, rng):
    x = _x(rng)
    layer = am.StructuredGRU(8, input_scheme=scheme, recurrent_scheme=scheme,
                             return_sequences=True, reset_after=reset_after)
    layer(x)
    randomize_weights(layer, seed=5)
    kernel = reference.dense(layer.input_matrix)
    rec = reference.dense(layer.recurrent_matrix)
    if not reset_after:
        rec = np.concatenate([rec, reference.dense(layer.candidate_matrix)], 1)
    expected, _ = reference.gru(x, kernel, rec, layer.bias.numpy(),
                                reset_after=reset_after)
    np.testing.assert_allclose(layer(x), expected, **TOL)


@pytest.mark.parametrize("unit_forget_bias", [True, False])
@pytest.mark.parametrize("bias_initializer", ["zeros", "ones"])
def test_unit_forget_bias_matches_keras(unit_forget_bias, bias_initializer,
                                        rng):
    x = _x(rng)
    kwargs = dict(units=8, unit_forget_bias=unit_forget_bias,
                  bias_initializer=bias_initializer)
    stock = keras.layers.LSTM(**kwargs)
    ours = am.StructuredLSTM(recurrent_scheme=am.LGPShuffle(2), **kwargs)
    stock(x)
    ours(x)
    base = 0.0 if bias_initializer == "zeros" else 1.0
    forget = 1.0 if unit_forget_bias else base
    expected = np.array([base] * 8 + [forget] * 8 + [base] * 16, "float32")
    np.testing.assert_array_equal(stock.cell.bias.numpy(), expected)
    np.testing.assert_array_equal(ours.bias.numpy(), expected)


class _ChainedBlocks(am.Scheme):
    """Test-only scheme the package does not know: an n -> n block-diagonal
    product with ``groups_in`` blocks, then an n -> m one with
    ``groups_out`` blocks and the shuffle. It reaches the compiled op
    through its own lowering alone."""

    def __init__(self, groups_in, groups_out):
        super().__init__(groups_in=groups_in, groups_out=groups_out)

    def check(self, n, m):
        if n % self.groups_in or n % self.groups_out or m % self.groups_out:
            self._fail(n, m, "groups dividing the dims", "divisors")

    def cost(self, n, m):
        c = n * n // self.groups_in + n * m // self.groups_out
        return c, c

    def weight_shapes(self, n, m):
        gi, go = self.groups_in, self.groups_out
        return {"first": (gi, n // gi, n // gi),
                "second": (go, n // go, m // go)}

    def product(self, x, w):
        y = schemes.block_diag_matmul(x, w["first"])
        return schemes.block_diag_matmul(y, w["second"], shuffle=True)

    def dense_from_arrays(self, arrays):
        return self.reference_dense(arrays)

    @classmethod
    def reference_dense(cls, arrays):
        second = reference.block_diag(arrays["second"])
        shuffled = reference.shuffled(second, arrays["second"].shape[0])
        return reference.block_diag(arrays["first"]) @ shuffled

    def kernel_stages(self, w):
        return [ops.Stage(w["first"], False), ops.Stage(w["second"], True)]


@pytest.mark.parametrize("threads", [1, 2])
def test_a_new_scheme_reaches_the_op_by_its_lowering(threads, rng,
                                                     inference_path):
    x = _x(rng, (2, 5, 16))
    layer = am.StructuredLSTM(
        16, input_scheme=_ChainedBlocks(2, 4),
        recurrent_scheme=_ChainedBlocks(4, 2), return_sequences=True,
        kernel="compiled" if inference_path == "compiled" else "portable")
    layer(x)
    randomize_weights(layer, seed=2)
    kernel = _ChainedBlocks.reference_dense(layer.input_matrix.weight_arrays())
    rec = _ChainedBlocks.reference_dense(
        layer.recurrent_matrix.weight_arrays())
    expected, _, _ = reference.lstm(x, kernel, rec, layer.bias.numpy())
    if inference_path == "compiled":
        assert layer.compiled_blockers() == []
        ops.set_num_threads(threads)
        ops._set_min_parallel_work(per_step=0)
    try:
        np.testing.assert_allclose(layer(x), expected, **TOL)
    finally:
        if inference_path == "compiled":
            ops.set_num_threads(1)
            ops._set_min_parallel_work(per_step=16 * 1024)


def test_a_scheme_without_lowering_runs_on_tf_ops_or_says_why(rng):
    class Unlowered(am.LGPShuffle):
        def kernel_stages(self, w):
            return am.Scheme.kernel_stages(self, w)

    x = _x(rng)
    auto = am.StructuredLSTM(8, recurrent_scheme=Unlowered(2))
    auto(x)
    assert auto.compiled_blockers() == [
        "the recurrent product: Unlowered(groups=2) has no lowering to the "
        "compiled op"]
    plain = am.StructuredLSTM(8, recurrent_scheme=am.LGPShuffle(2))
    plain(x)
    plain.set_weights(auto.get_weights())
    np.testing.assert_allclose(auto(x), plain(x), **TOL)
    with pytest.raises(ValueError, match="has no lowering to the compiled"):
        am.StructuredLSTM(8, recurrent_scheme=Unlowered(2),
                          kernel="compiled")(x)


def test_gru_reset_after_false_splits_the_recurrent_product():
    layer = am.StructuredGRU(8, reset_after=False,
                             recurrent_scheme=am.LGPShuffle(2))
    layer.build((None, 5, 4))
    products = layer.products()
    assert sorted(products) == ["candidate", "input", "recurrent"]
    assert (products["recurrent"].input_dim,
            products["recurrent"].output_dim) == (8, 16)
    assert (products["candidate"].input_dim,
            products["candidate"].output_dim) == (8, 8)


def test_cell_in_keras_rnn_equals_layer(rng):
    x = _x(rng)
    layer = am.StructuredLSTM(8, input_scheme=am.LGPShuffle(2),
                              recurrent_scheme=am.LowRankLGP(2, 2, 2),
                              return_sequences=True)
    layer(x)
    randomize_weights(layer, seed=2)
    cell = am.StructuredLSTMCell(8, input_scheme=am.LGPShuffle(2),
                                 recurrent_scheme=am.LowRankLGP(2, 2, 2))
    rnn = keras.layers.RNN(cell, return_sequences=True)
    rnn(x)
    cell.set_stock_weights(*layer.stock_weights())
    np.testing.assert_allclose(rnn(x), layer(x), **TOL)


@pytest.mark.parametrize("layer_cls,weights", [
    (am.StructuredLSTM, 5), (am.StructuredGRU, 5)])
def test_run_layer_test(layer_cls, weights, tmp_path):
    run_layer_test(
        lambda: layer_cls(8, input_scheme=am.LGPShuffle(2),
                          recurrent_scheme=am.LowRankLGP(2, 2, 2),
                          return_sequences=True),
        input_shape=(4, 5, 6), expected_output_shape=(4, 5, 8),
        expected_trainable_weights=weights, tmp_path=tmp_path)


@pytest.mark.parametrize("layer", [
    lambda **kw: am.StructuredLSTM(8, input_scheme=am.LGPShuffle(2),
                                   recurrent_scheme=am.LowRankLGP(2, 4, 2),
                                   **kw),
    lambda **kw: am.StructuredGRU(6, input_scheme=am.LGPShuffle(2),
                                  recurrent_scheme=am.LGPShuffle(3),
                                  reset_after=False, **kw),
], ids=["lstm", "gru_candidate"])
def test_a_layer_built_frozen_has_no_trainable_weights(layer, rng):
    """A frozen layer (a frozen model's layer rebuilt from its config)
    builds its structured products frozen too, and unfreezing it makes
    every weight trainable, as for a stock Keras layer."""
    x = rng.normal(size=(2, 3, 4)).astype("float32")
    frozen = layer(trainable=False)
    frozen(x)
    assert frozen.trainable_weights == []
    assert len(frozen.non_trainable_weights) == len(frozen.weights)
    model = keras.Sequential([keras.Input((3, 4)), frozen])
    assert model.trainable_weights == []
    frozen.trainable = True
    live = layer()
    live(x)
    assert len(frozen.trainable_weights) == len(live.trainable_weights)
    assert len(frozen.trainable_weights) == len(frozen.weights) > 3


def test_config_round_trip():
    layer = am.StructuredLSTM(
        12, input_scheme=am.LowRankLGP(2, 3, 2),
        recurrent_scheme=am.LGPDense(3), return_state=True, dropout=0.1,
        kernel="portable", name="my_lstm")
    again = am.StructuredLSTM.from_config(layer.get_config())
    assert again.get_config() == layer.get_config()
    assert again.input_scheme.describe() == layer.input_scheme.describe()
    assert again.kernel == "portable" and again.dropout == 0.1


def test_bidirectional_structured_round_trip(tmp_path, rng):
    x = _x(rng)
    inp = keras.Input((6, 8))
    out = keras.layers.Bidirectional(am.StructuredGRU(
        8, input_scheme=am.LGPShuffle(4), return_sequences=True))(inp)
    model = keras.Model(inp, out)
    randomize_weights(model)
    model.save(tmp_path / "bi.keras")
    restored = keras.models.load_model(tmp_path / "bi.keras")
    np.testing.assert_array_equal(restored(x), model(x))


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="`kernel` must be one of"):
        am.StructuredLSTM(4, kernel="fast")
    with pytest.raises(ValueError, match="`units` must be a positive"):
        am.StructuredLSTM(0)
    with pytest.raises(ValueError, match=r"`dropout` must be in \[0, 1\)"):
        am.StructuredGRU(4, dropout=1.5)
    with pytest.raises(ValueError, match="Expected a keras_antman scheme"):
        am.StructuredLSTM(4, input_scheme="lgp")


def test_invalid_scheme_names_the_layer_and_product(rng):
    layer = am.StructuredLSTM(200, recurrent_scheme=am.LGPShuffle(7),
                              name="lstm_1")
    with pytest.raises(
        ValueError,
        match=r"`lstm_1: recurrent product`: LGPShuffle\(groups=7\) cannot "
              r"compress a 200 -> 800 product.*groups in \[1, 2, 4, 5, 8,",
    ):
        layer.build((None, 3, 16))

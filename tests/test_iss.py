"""Tests for ISS: tracing, group Lasso, masks, shrink, prune_to."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import keras_antman as am
from keras_antman import iss
from keras_antman._keras import keras
from keras_antman._keras import ops

from conftest import LEGACY
from conftest import randomize_weights

V, T, B = 11, 4, 3  # vocabulary, timesteps, batch


def ids(seed=0, n=B):
    return np.random.default_rng(seed).integers(0, V, (n, T))


def stacked_lstm():
    inp = keras.Input((T,), dtype="int32")
    x = keras.layers.Embedding(V, 5)(inp)
    x = keras.layers.LSTM(6, return_sequences=True, name="l1")(x)
    x = keras.layers.Dropout(0.2)(x)
    x = keras.layers.LSTM(5, return_sequences=True, name="l2")(x)
    return keras.Model(inp, keras.layers.Dense(V, name="head")(x))


def sequential_gru(reset_after=True):
    return keras.Sequential([
        keras.Input((T,), dtype="int32"),
        keras.layers.Embedding(V, 5),
        keras.layers.GRU(6, return_sequences=True, reset_after=reset_after,
                         name="g1"),
        keras.layers.Activation("tanh"),
        keras.layers.GRU(5, reset_after=reset_after, name="g2"),
        keras.layers.Dense(V, name="head"),
    ])


def bidirectional():
    inp = keras.Input((T,), dtype="int32")
    x = keras.layers.Embedding(V, 5)(inp)
    x = keras.layers.Bidirectional(
        keras.layers.LSTM(6, return_sequences=True), name="bi")(x)
    x = keras.layers.LSTM(5, return_sequences=True, name="l2")(x)
    x = keras.layers.TimeDistributed(keras.layers.Dense(V), name="head")(x)
    return keras.Model(inp, x)


def concatenated():
    """Two LSTMs side by side, and a Bidirectional with merge_mode=None."""
    inp = keras.Input((T,), dtype="int32")
    x = keras.layers.Embedding(V, 5)(inp)
    a = keras.layers.LSTM(4, return_sequences=True, name="a")(x)
    f, b = keras.layers.Bidirectional(
        keras.layers.LSTM(3, return_sequences=True), merge_mode=None,
        name="bn")(x)
    x = keras.layers.Concatenate(name="cat")([a, x, f, b])
    return keras.Model(inp, keras.layers.Dense(V, name="head")(x))


def structured():
    inp = keras.Input((T,), dtype="int32")
    x = keras.layers.Embedding(V, 5)(inp)
    x = am.StructuredLSTM(6, return_sequences=True, name="s1")(x)
    x = am.StructuredGRU(5, reset_after=False, name="s2")(x)
    return keras.Model(inp, keras.layers.Dense(V, name="head")(x))


def encoder_decoder():
    """An encoder's h / c states feed the decoder's initial_state."""
    src = keras.Input((T,), dtype="int32")
    tgt = keras.Input((T,), dtype="int32")
    e = keras.layers.Embedding(V, 5)(src)
    _, h, c = keras.layers.LSTM(6, return_state=True, name="enc")(e)
    d = keras.layers.Embedding(V, 4)(tgt)
    d = keras.layers.LSTM(6, return_sequences=True, name="dec")(
        d, initial_state=[h, c])
    return keras.Model([src, tgt], keras.layers.Dense(V, name="head")(d))


def inputs_for(model):
    if len(model.inputs) == 2:
        return [ids(0), ids(1)]
    return ids(0)


def rnn_units(model):
    out = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.Bidirectional):
            out[layer.name] = (layer.forward_layer.units,
                               layer.backward_layer.units)
        elif isinstance(layer, keras.layers.RNN):
            out[layer.name] = layer.units
    return out


def is_keras_antman(layer):
    return type(layer).__module__.startswith("keras_antman")


# (builder, {layer key: units to zero}, expected units after shrink)
CASES = {
    "stacked_lstm": (stacked_lstm, {"l1": [0, 4], "l2": [2]},
                     {"l1": 4, "l2": 4}),
    "gru": (sequential_gru, {"g1": [1], "g2": [0, 3, 4]},
            {"g1": 5, "g2": 2}),
    "gru_reset_before": (lambda: sequential_gru(False), {"g1": [5]},
                         {"g1": 5, "g2": 5}),
    "bidirectional": (bidirectional,
                      {"bi/forward": [0, 1], "bi/backward": [5], "l2": [3]},
                      {"bi": (5, 5), "l2": 4}),
    "concatenate": (concatenated,
                    {"a": [0, 3], "bn/forward": [1], "bn/backward": [0, 2]},
                    {"a": 2, "bn": (2, 2)}),
    "structured": (structured, {"s1": [2, 3], "s2": [1]},
                   {"s1": 4, "s2": 4}),
    "return_state": (encoder_decoder, {"enc": [1, 2]},
                     {"enc": 4, "dec": 4}),
}


def zero_by_key(gl, plan):
    rnns = {r.key: r for r in gl.trace.rnns}
    gl.zero({id(rnns[k].space): idx for k, idx in plan.items()})


@pytest.mark.parametrize("case", sorted(CASES))
def test_shrink_hand_zeroed_components(case):
    build, plan, expected = CASES[case]
    model = build()
    randomize_weights(model, seed=3)
    gl = iss.GroupLasso(model, strength=0.0)
    zero_by_key(gl, plan)
    x = inputs_for(model)
    before = [w.copy() for w in model.get_weights()]
    small = iss.shrink(model)
    assert rnn_units(small) == expected
    assert not any(is_keras_antman(layer) for layer in small.layers)
    np.testing.assert_allclose(
        small.predict(x, verbose=0), model.predict(x, verbose=0),
        atol=1e-5, rtol=0,
    )
    for a, b in zip(before, model.get_weights()):  # input untouched
        np.testing.assert_array_equal(a, b)
    gl.detach()


def test_shrink_removes_units_with_zero_outgoing_weights_only():
    model = stacked_lstm()
    randomize_weights(model, seed=4)
    l1, l2 = model.get_layer("l1"), model.get_layer("l2")
    # Unit 3 of l1: recurrent row and l2's input row zero; its incoming
    # columns and bias stay non-zero, yet it cannot affect the output.
    for var in (l1.cell.recurrent_kernel, l2.cell.kernel):
        w = ops.convert_to_numpy(var).copy()
        w[3] = 0.0
        var.assign(w)
    # Unit 1 of l2: only its incoming columns are zero: it must stay.
    w = ops.convert_to_numpy(l2.cell.kernel).copy()
    w[:, [1, 6, 11, 16]] = 0.0
    l2.cell.kernel.assign(w)
    small = iss.shrink(model)
    assert rnn_units(small) == {"l1": 5, "l2": 5}
    x = ids(2)
    np.testing.assert_allclose(small.predict(x, verbose=0),
                               model.predict(x, verbose=0), atol=1e-5)


def test_shrink_nothing_to_remove_is_equivalent():
    model = structured()
    randomize_weights(model, seed=5)
    small = iss.shrink(model)
    assert rnn_units(small) == rnn_units(model)
    assert isinstance(small.get_layer("s1"), keras.layers.LSTM)
    x = ids(3)
    np.testing.assert_allclose(small.predict(x, verbose=0),
                               model.predict(x, verbose=0), atol=1e-5)
    assert small.get_layer("s2").reset_after is False
    assert small.get_layer("s1").return_sequences is True


def test_report_shows_smaller_lstm():
    model = stacked_lstm()
    gl = iss.GroupLasso(model)
    zero_by_key(gl, {"l1": [0, 1, 2], "l2": [0]})
    small = iss.shrink(model)
    rep = am.report(model, small)
    rows = {(r.layer, r.part): r for r in rep.rows}
    # l1: 5 inputs -> 4 x 3 units; recurrent 3 -> 12.
    assert rows[("l1", "input")].macs_after == 5 * 12
    assert rows[("l1", "recurrent")].macs_after == 3 * 12
    assert rows[("l2", "input")].macs_after == 3 * 16
    assert rep.recurrent_total.macs_after == gl.macs()
    assert rep.recurrent_total.macs_before == 5 * 24 + 6 * 24 + 6 * 20 + 25 * 4


# Regulariser --------------------------------------------------------------

def np_group_lasso(model, lam):
    """Independent reference: component masks built weight by weight."""
    l1, l2 = model.get_layer("l1"), model.get_layer("l2")
    head = model.get_layer("head")
    w = {
        "k1": ops.convert_to_numpy(l1.cell.kernel),
        "u1": ops.convert_to_numpy(l1.cell.recurrent_kernel),
        "k2": ops.convert_to_numpy(l2.cell.kernel),
        "u2": ops.convert_to_numpy(l2.cell.recurrent_kernel),
        "hd": ops.convert_to_numpy(head.kernel),
    }
    comps = []
    for h, kin, u, consumer in ((6, "k1", "u1", "k2"), (5, "k2", "u2", "hd")):
        for k in range(h):
            m = {name: np.zeros(a.shape, bool) for name, a in w.items()}
            for g in range(4):
                m[kin][:, g * h + k] = True
                m[u][:, g * h + k] = True
            m[u][k, :] = True
            m[consumer][k, :] = True
            comps.append(m)
    value = 0.0
    grads = {name: np.zeros_like(a, dtype="float64") for name, a in w.items()}
    for m in comps:
        norm = np.sqrt(sum((w[n][m[n]].astype("float64") ** 2).sum()
                           for n in w))
        value += lam * norm
        for n in w:
            grads[n][m[n]] += lam * w[n][m[n]] / norm
    variables = {"k1": l1.cell.kernel, "u1": l1.cell.recurrent_kernel,
                 "k2": l2.cell.kernel, "u2": l2.cell.recurrent_kernel,
                 "hd": head.kernel}
    return value, grads, variables


def test_penalty_value_and_gradient_match_numpy():
    import tensorflow as tf

    model = stacked_lstm()
    randomize_weights(model, seed=6)
    gl = iss.GroupLasso(model, strength=0.37)
    value, grads, variables = np_group_lasso(model, 0.37)
    np.testing.assert_allclose(float(gl.penalty()), value, rtol=1e-5)
    with tf.GradientTape() as tape:
        loss = ops.sum(ops.stack(model.losses))  # what fit adds
    np.testing.assert_allclose(float(loss), value, rtol=1e-5)
    # Keras 3's variables wrap the tf.Variable the tape watches.
    got = tape.gradient(loss, [v if LEGACY else v.value
                               for v in variables.values()])
    for name, g in zip(variables, got):
        np.testing.assert_allclose(g, grads[name], rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    gl.detach()
    assert model.losses == []


def test_penalty_is_zero_for_zeroed_components_with_finite_gradient():
    import tensorflow as tf

    model = stacked_lstm()
    gl = iss.GroupLasso(model, strength=1.0)
    zero_by_key(gl, {"l1": [0], "l2": [1]})
    norms = gl.component_norms()
    assert norms["l1"][0] == 0.0 and norms["l2"][1] == 0.0
    assert (norms["l1"][1:] > 0).all()
    with tf.GradientTape() as tape:
        loss = gl.penalty()
    grads = tape.gradient(loss, [v if LEGACY else v.value
                                 for v in gl.trace.variables.values()])
    assert all(np.isfinite(ops.convert_to_numpy(g)).all() for g in grads)


def test_zeroed_components_stay_zero_through_fit_and_are_logged():
    model = stacked_lstm()
    gl = iss.GroupLasso(model, strength=1e-3)
    zero_by_key(gl, {"l1": [2], "l2": [0, 4]})
    model.compile(keras.optimizers.Adam(0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = ids(7, n=12)
    y = np.roll(x, 1, axis=1)
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0,
                        callbacks=[iss.ISSPruning(gl, threshold=0.0)])
    l1, l2 = model.get_layer("l1"), model.get_layer("l2")
    u1 = ops.convert_to_numpy(l1.cell.recurrent_kernel)
    k2 = ops.convert_to_numpy(l2.cell.kernel)
    head = ops.convert_to_numpy(model.get_layer("head").kernel)
    assert (u1[2] == 0).all() and (u1[:, 2::6] == 0).all()
    assert (k2[2] == 0).all()
    assert (k2[:, [0, 5, 10, 15, 4, 9, 14, 19]] == 0).all()
    assert (head[[0, 4]] == 0).all() and (head[1] != 0).any()
    assert history.history["iss/l1"] == [5, 5]
    assert history.history["iss/l2"] == [3, 3]
    # Live weights did train.
    assert (u1[0][np.arange(24) % 6 != 2] != 0).all()


def test_pruning_callback_zeroes_components_below_threshold():
    model = stacked_lstm()
    gl = iss.GroupLasso(model, strength=0.0)
    norms = gl.component_norms()
    threshold = float(np.sort(norms["l1"])[2]) + 1e-6  # the 3 smallest
    gl.zero_below(threshold)
    assert gl.live_units()["l1"] == 3
    assert (gl.component_norms()["l1"][np.argsort(norms["l1"])[:3]] == 0).all()


# Errors -------------------------------------------------------------------

def _functional(build_tail):
    inp = keras.Input((T,), dtype="int32")
    x = keras.layers.Embedding(V, 5)(inp)
    return keras.Model(inp, build_tail(x))


UNTRACEABLE = {
    "attention": (
        lambda x: keras.layers.Dense(V)(keras.layers.Attention()([
            keras.layers.LSTM(5, return_sequences=True, name="l")(x), x])),
        r"`attention\w*` \(Attention\).*mix units",
    ),
    "lambda": (
        lambda x: keras.layers.Dense(V)(keras.layers.Lambda(
            lambda t: t[..., ::-1], name="flip")(keras.layers.LSTM(4)(x))),
        r"`flip` \(Lambda\).*cannot be inspected",
    ),
    "flatten": (
        lambda x: keras.layers.Dense(V)(keras.layers.Flatten(name="flat")(
            keras.layers.LSTM(4, return_sequences=True)(x))),
        r"`flat` \(Flatten\).*off the last axis",
    ),
    "layer_norm": (
        lambda x: keras.layers.Dense(V)(keras.layers.LayerNormalization(
            name="ln")(keras.layers.LSTM(4)(x))),
        r"`ln` \(LayerNormalization\).*mixes them",
    ),
    "merge_sum": (
        lambda x: keras.layers.Dense(V)(keras.layers.Bidirectional(
            keras.layers.LSTM(4), merge_mode="sum", name="bs")(x)),
        r"`bs` \(Bidirectional\).*merge_mode='sum'",
    ),
    "softmax": (
        lambda x: keras.layers.Dense(V)(keras.layers.Activation(
            "softmax", name="sm")(keras.layers.LSTM(4)(x))),
        r"`sm` \(Activation\)",
    ),
    "model_output": (
        lambda x: keras.layers.LSTM(4, name="last")(x),
        r"cannot prune \['last'\].*reach a model output",
    ),
}


@pytest.mark.parametrize("case", sorted(UNTRACEABLE))
def test_untraceable_arrangements_raise(case):
    tail, match = UNTRACEABLE[case]
    model = _functional(tail)
    with pytest.raises(ValueError, match=match):
        iss.GroupLasso(model)
    with pytest.raises(ValueError, match=match):
        iss.shrink(model)


def test_shared_consumer_raises():
    shared = keras.layers.Dense(V, name="shared_head")

    def tail(x):
        a = keras.layers.LSTM(4, return_sequences=True)(x)
        b = keras.layers.LSTM(4, return_sequences=True)(x)
        return keras.layers.Add()([shared(a), shared(b)])

    with pytest.raises(ValueError, match=r"`shared_head` \(Dense\).*shared"):
        iss.GroupLasso(_functional(tail))


def test_raw_tensor_op_raises():
    model = _functional(lambda x: keras.layers.Dense(V)(
        ops.flip(keras.layers.LSTM(4, name="l")(x), axis=-1)))
    # Keras 3 records ops.flip as a Flip operation, tf_keras as TFOpLambda.
    with pytest.raises(ValueError, match=r"\(Flip\).*operation on tensors"
                       if not LEGACY else r"\(TFOpLambda\).*may mix units"):
        iss.GroupLasso(model)


def test_nested_model_with_recurrent_layers_raises():
    inner = keras.Sequential([keras.Input((T, 5)),
                              keras.layers.LSTM(4, name="inner_lstm")],
                             name="inner")
    model = _functional(lambda x: keras.layers.Dense(V)(inner(x)))
    with pytest.raises(ValueError, match=r"nested model `inner`.*flatten"):
        iss.GroupLasso(model)


def test_structured_non_dense_scheme_raises():
    model = _functional(lambda x: keras.layers.Dense(V)(am.StructuredLSTM(
        4, input_scheme=am.LGPShuffle(4), name="lgp")(
            keras.layers.Dense(8)(x))))
    with pytest.raises(ValueError,
                       match=r"`lgp`.*ISS needs Dense schemes.*LGPShuffle"):
        iss.GroupLasso(model)


def test_unknown_layer_names_raise():
    with pytest.raises(ValueError, match=r"`layers` names \['nope'\]"):
        iss.GroupLasso(stacked_lstm(), layers=["nope"])


def test_layers_restricts_pruning_and_keeps_consumers_sliced():
    model = stacked_lstm()
    gl = iss.GroupLasso(model, layers=["l1"])
    assert set(gl.live_units()) == {"l1"}
    zero_by_key(gl, {"l1": [0, 1]})
    small = iss.shrink(model, layers=["l1"])
    assert rnn_units(small) == {"l1": 4, "l2": 5}
    x = ids(4)
    np.testing.assert_allclose(small.predict(x, verbose=0),
                               model.predict(x, verbose=0), atol=1e-5)


# Save / load, prune_to, Distiller -------------------------------------------

def test_shrunk_model_loads_without_keras_antman(tmp_path):
    model = structured()
    randomize_weights(model, seed=8)
    gl = iss.GroupLasso(model)
    zero_by_key(gl, {"s1": [0], "s2": [1, 2]})
    small = iss.shrink(model)
    path = tmp_path / "small.keras"
    small.save(path)
    x = ids(9)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", small.predict(x, verbose=0))
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        if {LEGACY!r}:
            import tf_keras as keras
        else:
            import keras
        m = keras.models.load_model({str(path)!r})
        y = m.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0)
        np.testing.assert_allclose(
            y, np.load({str(tmp_path / 'y.npy')!r}), atol=1e-6)
        assert m.get_layer("s1").units == 5, m.get_layer("s1").units
        assert not any(k.startswith("keras_antman") for k in sys.modules)
        print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    out = subprocess.run([sys.executable, "-c", script], env=env,
                         capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("OK")


def lm_data(n=32, seed=10):
    x = np.random.default_rng(seed).integers(0, V, (n, T))
    return x, np.roll(x, -1, axis=1)


def test_prune_to_reaches_the_requested_reduction():
    keras.utils.set_random_seed(0)
    model = stacked_lstm()
    model.compile(keras.optimizers.Adam(0.02),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = lm_data()
    small, history = iss.prune_to(model, x, y, reduction=3.0,
                                  strength=1e-3, batch_size=8, epochs=2,
                                  verbose=0)
    rep = am.report(model, small)
    assert rep.recurrent_total.mac_reduction >= 3.0
    assert history.history["iss/macs"][-1] <= (
        rep.recurrent_total.macs_before / 3.0)
    assert model.losses == []  # detached
    np.testing.assert_allclose(small.predict(x, verbose=0),
                               model.predict(x, verbose=0), atol=1e-5)


def test_iss_inside_distiller_fit():
    keras.utils.set_random_seed(1)
    teacher = stacked_lstm()
    student = stacked_lstm()
    gl = iss.GroupLasso(student, strength=0.5)
    d = am.Distiller(student=student, teacher=teacher)
    d.compile(keras.optimizers.Adam(0.02), c_target=1.0, c_mse=0.1,
              c_kl=1.0)
    x, y = lm_data(12)
    # The Distiller adds the student's losses: the penalty is in its loss.
    with_penalty = float(d.compute_loss(x, y, training=False))
    gl.strength.assign(0.0)
    without = float(d.compute_loss(x, y, training=False))
    gl.strength.assign(0.5)
    np.testing.assert_allclose(with_penalty - without,
                               float(gl.penalty()), rtol=1e-5)
    zero_by_key(gl, {"l1": [1], "l2": [3]})
    history = d.fit(x, y, batch_size=4, epochs=1, verbose=0,
                    callbacks=[iss.ISSPruning(gl, threshold=0.0)])
    assert history.history["iss/l1"] == [5]
    k2 = ops.convert_to_numpy(student.get_layer("l2").cell.kernel)
    assert (k2[1] == 0).all() and (k2[:, 3::5] == 0).all()
    small = iss.shrink(student)
    assert rnn_units(small) == {"l1": 5, "l2": 4}
    np.testing.assert_allclose(small.predict(x, verbose=0),
                               student.predict(x, verbose=0), atol=1e-5)

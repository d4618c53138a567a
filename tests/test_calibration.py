"""Data-aware initialisation: `compress(..., calibration_data=...)`.

References are independent of the recorder: the rows each product sees
come from a NumPy LSTM/GRU run step by step on the teacher's weights.
"""

import numpy as np
import pytest
import tensorflow as tf

import keras_antman as am
from keras_antman import calibration
from keras_antman._keras import keras

from conftest import randomize_weights

H = 8  # hidden units of the test layers


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def np_lstm(x, kernel, recurrent, bias, h0=None, c0=None):
    """Outputs [B, T, h] of an LSTM (gates i, f, c, o) over x [B, T, n]."""
    b, t, _ = x.shape
    h_units = recurrent.shape[0]
    h = np.zeros((b, h_units)) if h0 is None else h0
    c = np.zeros((b, h_units)) if c0 is None else c0
    out = []
    for s in range(t):
        z = x[:, s] @ kernel + h @ recurrent + bias
        i, f, g, o = np.split(z, 4, axis=-1)
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        out.append(h)
    return np.stack(out, 1)


def np_gru_reset_before(x, kernel, recurrent, bias):
    """Outputs and candidate rows ``r * h_{t-1}`` of a GRU with
    ``reset_after=False`` (gates z, r, h)."""
    b, t, _ = x.shape
    u = recurrent.shape[0]
    h = np.zeros((b, u))
    out, cand = [], []
    for s in range(t):
        xz, xr, xh = np.split(x[:, s] @ kernel + bias, 3, axis=-1)
        z = _sigmoid(xz + h @ recurrent[:, :u])
        r = _sigmoid(xr + h @ recurrent[:, u: 2 * u])
        cand.append(r * h)
        hh = np.tanh(xh + (r * h) @ recurrent[:, 2 * u:])
        h = z * h + (1 - z) * hh
        out.append(h)
    return np.stack(out, 1), np.stack(cand, 1)


def h_prev(out, h0=None):
    """``h_{t-1}`` rows: the initial state, then the outputs shifted."""
    first = np.zeros_like(out[:, :1]) if h0 is None else h0[:, None]
    return np.concatenate([first, out[:, :-1]], 1)


def gram(rows):
    rows = np.asarray(rows, "float64").reshape(-1, rows.shape[-1])
    return rows.T @ rows


def weights(layer):
    return [np.asarray(w, "float64") for w in layer.get_weights()]


def rel_err(x, w, w_hat):
    return np.linalg.norm(x @ (w - w_hat)) / np.linalg.norm(x @ w)


def lstm_model(n=8, t=6, **kwargs):
    model = keras.Sequential([
        keras.Input((t, n)),
        keras.layers.LSTM(H, name="lstm", **kwargs),
    ])
    randomize_weights(model, seed=3)
    return model


def teacher_rows(model, x):
    """Independent rows of a one-LSTM model: ``{product: [rows, n]}``."""
    k, r, b = weights(model.get_layer("lstm"))
    out = np_lstm(x.astype("float64"), k, r, b)
    n = x.shape[-1]
    return {"input": x.reshape(-1, n),
            "recurrent": h_prev(out).reshape(-1, H)}, (k, r)


# -- exact recovery ----------------------------------------------------------


def _random_arrays(scheme, n, m, rng):
    return {k: rng.normal(scale=0.5, size=s)
            for k, s in scheme.weight_shapes(n, m).items()}


@pytest.mark.parametrize("scheme", [am.LGPShuffle(2),
                                    am.LowRank(rank_reduction=2)],
                         ids=["lgp_shuffle", "low_rank"])
def test_recovers_a_structured_teacher(scheme, rng):
    # Inputs in a 5-D subspace of R^8; the teacher's input kernel is a
    # structured W* plus E with X E = 0, so only the data say that W* is
    # right. The recurrent kernel is exactly structured.
    n, d, t = 8, 5, 6
    basis = rng.normal(size=(d, n))
    x = (rng.normal(size=(96, t, d)) @ basis).astype("float32")
    w_in = scheme.dense_from_arrays(_random_arrays(scheme, n, 4 * H, rng))
    w_rec = scheme.dense_from_arrays(_random_arrays(scheme, H, 4 * H, rng))
    off = np.eye(n) - np.linalg.pinv(basis) @ basis  # projector on S-perp
    w_noisy = w_in + off @ rng.normal(scale=2.0, size=w_in.shape)
    teacher = lstm_model(return_sequences=True)
    bias = teacher.get_layer("lstm").get_weights()[2]
    teacher.get_layer("lstm").set_weights(
        [w_noisy.astype("float32"), w_rec.astype("float32"), bias])

    student = am.compress(teacher, scheme, scheme, calibration_data=x)
    plain = am.compress(teacher, scheme, scheme)
    x_new = (rng.normal(size=(16, t, d)) @ basis).astype("float32")
    y = teacher.predict(x_new, verbose=0)
    layer = student.get_layer("lstm")
    rows = x_new.reshape(-1, n).astype("float64")
    assert rel_err(rows, w_noisy, layer.input_matrix.to_dense()) < 1e-4
    np.testing.assert_allclose(layer.recurrent_matrix.to_dense(), w_rec,
                               atol=1e-4)
    np.testing.assert_allclose(student.predict(x_new, verbose=0), y,
                               atol=1e-4)
    # from_dense keeps the support of W* + E: far off on these inputs.
    assert rel_err(rows, w_noisy,
                   plain.get_layer("lstm").input_matrix.to_dense()) > 0.1
    errors = student.calibration_errors
    assert errors[("lstm", "input")].fitted < 1e-4
    assert errors[("lstm", "input")].from_dense > 0.1


# -- never worse ------------------------------------------------------------

SCHEMES = {
    "dense": am.Dense(),
    "low_rank": am.LowRank(rank_reduction=2),
    "lgp_shuffle": am.LGPShuffle(2),
    "lgp_dense": am.LGPDense(2),
    "low_rank_lgp": am.LowRankLGP(2, 2, 2),
    "kronecker": am.Kronecker(),
    "hmd": am.HMD(2),
    "doped": am.Doped(am.Kronecker(), sparsity=0.9),
}
# Schemes whose `arrays_from_data` is the `from_dense` default.
DEFAULT_FIT = ("dense", "kronecker", "doped")


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_never_worse_than_from_dense(name, rng):
    scheme = SCHEMES[name]
    teacher = lstm_model()
    # Correlated inputs, far from isotropic.
    mixing = rng.normal(size=(8, 8)) * 0.6 ** np.arange(8)[:, None]
    x = (rng.normal(size=(64, 6, 8)) @ mixing).astype("float32")
    student = am.compress(teacher, scheme, scheme, calibration_data=x)
    plain = am.compress(teacher, scheme, scheme)
    rows, dense = teacher_rows(teacher, x)
    errors = student.calibration_errors
    assert set(errors) == {("lstm", "input"), ("lstm", "recurrent")}
    for product, w in zip(("input", "recurrent"), dense):
        got = getattr(student.get_layer("lstm"), f"{product}_matrix")
        ref = getattr(plain.get_layer("lstm"), f"{product}_matrix")
        e_student = rel_err(rows[product], w, got.to_dense())
        e_plain = rel_err(rows[product], w, ref.to_dense())
        assert e_student <= e_plain + 1e-6, (product, e_student, e_plain)
        e = errors[("lstm", product)]
        np.testing.assert_allclose(e.from_dense, e_plain, rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_allclose(e.kept, e_student, rtol=1e-4, atol=1e-6)
        if name in DEFAULT_FIT:
            np.testing.assert_array_equal(got.to_dense(), ref.to_dense())
        else:  # the fit helps on these rows
            assert e_student < 0.95 * e_plain, (product, e_student, e_plain)


def test_the_fit_is_kept_only_when_better(monkeypatch, rng):
    # A fit that returns something worse must be ignored.
    scheme = am.LGPShuffle(2)
    monkeypatch.setattr(
        type(scheme), "arrays_from_data",
        lambda self, w, xtx, xty, ridge: {
            k: v + 1.0 for k, v in self.arrays_from_dense(w).items()})
    teacher = lstm_model()
    x = rng.normal(size=(8, 6, 8)).astype("float32")
    student = am.compress(teacher, scheme, scheme, calibration_data=x)
    plain = am.compress(teacher, scheme, scheme)
    for product in ("input", "recurrent"):
        e = student.calibration_errors[("lstm", product)]
        assert e.fitted > e.from_dense == e.kept
    for a, b in zip(student.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


# -- what is recorded -------------------------------------------------------


def _moments(model, layer_names, x, steps=None):
    layers = [model.get_layer(n) for n in layer_names]
    return calibration.record(model, layers, x, steps)


def test_bidirectional_and_stacked_layers_record_their_rows(rng):
    inp = keras.Input((5, 6))
    seq = keras.layers.Bidirectional(
        keras.layers.LSTM(H, return_sequences=True), name="bi")(inp)
    last = keras.layers.LSTM(H, name="top")(seq)  # not returning sequences
    model = keras.Model(inp, keras.layers.Dense(2)(last))
    randomize_weights(model, seed=5)
    x = rng.normal(size=(32, 5, 6)).astype("float32")
    rec = _moments(model, ["bi", "top"], x)

    bi = model.get_layer("bi")
    xf = x.astype("float64")
    fwd = np_lstm(xf, *weights(bi.forward_layer))
    bwd = np_lstm(xf[:, ::-1], *weights(bi.backward_layer))  # process order
    top_in = np.concatenate([fwd, bwd[:, ::-1]], -1)
    top = np_lstm(top_in, *weights(model.get_layer("top")))
    expected = [
        (bi.forward_layer.cell, "input", gram(xf)),
        (bi.forward_layer.cell, "recurrent", gram(h_prev(fwd))),
        (bi.backward_layer.cell, "input", gram(xf)),
        (bi.backward_layer.cell, "recurrent", gram(h_prev(bwd))),
        (model.get_layer("top").cell, "input", gram(top_in)),
        (model.get_layer("top").cell, "recurrent", gram(h_prev(top))),
    ]
    for cell, product, ref in expected:
        got = rec.moments_of(cell, product)
        assert got.rows == 32 * 5
        np.testing.assert_allclose(got.xtx, ref, rtol=1e-4, atol=1e-4)
    # The two directions' states differ, so a swap would be caught.
    assert not np.allclose(gram(h_prev(fwd)), gram(h_prev(bwd)), atol=1e-2)


def test_stacked_cells_and_gru_candidate_rows(rng):
    model = keras.Sequential([
        keras.Input((5, 6)),
        keras.layers.RNN(keras.layers.StackedRNNCells([
            keras.layers.LSTMCell(H),
            keras.layers.GRUCell(H, reset_after=False)]), name="stack"),
    ])
    randomize_weights(model, seed=6)
    x = rng.normal(size=(16, 5, 6)).astype("float64")
    lstm_cell, gru_cell = model.get_layer("stack").cell.cells
    rec = _moments(model, ["stack"], x.astype("float32"))
    out0 = np_lstm(x, *weights(lstm_cell))
    out1, cand = np_gru_reset_before(out0, *weights(gru_cell))
    for cell, product, ref in [
        (lstm_cell, "input", gram(x)),
        (lstm_cell, "recurrent", gram(h_prev(out0))),
        (gru_cell, "input", gram(out0)),
        (gru_cell, "recurrent", gram(h_prev(out1))),
        (gru_cell, "candidate", gram(cand)),
    ]:
        np.testing.assert_allclose(rec.moments_of(cell, product).xtx, ref,
                                   rtol=1e-4, atol=1e-4)

    student = am.compress(model, am.LGPShuffle(2), am.LGPShuffle(2),
                          calibration_data=x.astype("float32"))
    parts = {(r.layer, r.part) for r in am.report(model, student).rows}
    assert set(student.calibration_errors) == {
        ("stack", f"cell_{i}/{p}") for i, p in
        [(0, "input"), (0, "recurrent"), (1, "input"), (1, "recurrent"),
         (1, "candidate")]}
    assert set(student.calibration_errors) <= parts


def test_masked_steps_are_excluded(rng):
    tokens = rng.integers(1, 20, size=(12, 7))
    tokens[0, 4:] = 0        # post-padding
    tokens[1, :3] = 0        # pre-padding
    tokens[2, [1, 4]] = 0    # holes: the state carries over them
    model = keras.Sequential([
        keras.Input((7,), dtype="int32"),
        keras.layers.Embedding(20, 6, mask_zero=True, name="emb"),
        keras.layers.Bidirectional(keras.layers.LSTM(H), name="bi"),
    ])
    randomize_weights(model, seed=7)
    rec = _moments(model, ["bi"], tokens)
    table = weights(model.get_layer("emb"))[0]
    bi = model.get_layer("bi")
    for sub, order in ((bi.forward_layer, 1), (bi.backward_layer, -1)):
        xs, hs = [], []
        for seq in tokens:  # each sequence without its masked steps
            kept = table[seq[seq != 0]][None, ::order]
            xs.append(kept[0])
            hs.append(h_prev(np_lstm(kept, *weights(sub)))[0])
        moments = rec.moments_of(sub.cell, "input")
        assert moments.rows == int((tokens != 0).sum())
        np.testing.assert_allclose(moments.xtx, gram(np.concatenate(xs)),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            rec.moments_of(sub.cell, "recurrent").xtx,
            gram(np.concatenate(hs)), rtol=1e-4, atol=1e-5)


def test_stateful_runs_carry_the_state_and_restore_it(rng):
    model = keras.Sequential([
        keras.Input((4, 6), batch_size=3),
        keras.layers.LSTM(H, stateful=True, name="lstm"),
    ])
    randomize_weights(model, seed=8)
    x = rng.normal(size=(3, 12, 6)).astype("float32")
    model.predict(x[:, :4], verbose=0)  # some state before compressing
    before = [np.array(v) for v in model.get_layer("lstm").states]
    batches = tf.data.Dataset.from_tensor_slices(
        [x[:, 4:8], x[:, 8:12]])
    rec = _moments(model, ["lstm"], batches)
    # One long run from the state the model held.
    k, r, b = weights(model.get_layer("lstm"))
    out = np_lstm(x[:, 4:].astype("float64"), k, r, b, *before)
    cell = model.get_layer("lstm").cell
    np.testing.assert_allclose(rec.moments_of(cell, "recurrent").xtx,
                               gram(h_prev(out, before[0])), rtol=1e-4,
                               atol=1e-5)
    for v, w in zip(model.get_layer("lstm").states, before):
        np.testing.assert_array_equal(np.array(v), w)


def test_data_forms_and_steps(rng):
    model = lstm_model()
    x = rng.normal(size=(40, 6, 8)).astype("float32")
    cell = model.get_layer("lstm").cell
    # An array: batches of 32, all of them.
    assert _moments(model, ["lstm"], x).moments_of(
        cell, "input").rows == 40 * 6
    ds = tf.data.Dataset.from_tensor_slices(
        (x, np.zeros((40, H), "float32"))).batch(10)
    rec = _moments(model, ["lstm"], ds, steps=3)  # (x, y) batches, 3 of 4
    assert rec.moments_of(cell, "input").rows == 30 * 6
    np.testing.assert_allclose(rec.moments_of(cell, "input").xtx,
                               gram(x[:30]), rtol=1e-5, atol=1e-5)


def test_statistics_stay_bounded_in_memory(rng):
    model = lstm_model(n=6, t=5)
    ds = tf.data.Dataset.from_tensor_slices(
        rng.normal(size=(200, 5, 6)).astype("float32")).batch(4)
    cell = model.get_layer("lstm").cell
    sizes = {}
    for steps in (2, 50):
        rec = _moments(model, ["lstm"], ds, steps=steps)
        found = []

        def walk(obj, depth=0):
            if isinstance(obj, np.ndarray):
                found.append(obj.shape)
            elif depth < 8 and isinstance(obj, (list, tuple, set, dict)):
                for v in (obj.values() if isinstance(obj, dict) else obj):
                    walk(v, depth + 1)
            elif depth < 8 and hasattr(obj, "__dict__") and not isinstance(
                    obj, keras.layers.Layer):
                walk(vars(obj), depth + 1)

        walk(rec)
        assert rec.moments_of(cell, "input").rows == steps * 4 * 5
        sizes[steps] = sorted(found)
    # Only the [n, n] sums, however many rows went through.
    assert sizes[2] == sizes[50] == [(6, 6), (H, H)]


# -- robustness, reporting, errors ------------------------------------------


def test_rank_deficient_calibration_stays_finite(rng):
    basis = rng.normal(size=(2, 8))
    x = (rng.normal(size=(16, 6, 2)) @ basis).astype("float32")
    teacher = lstm_model()
    for scheme in (am.LowRank(rank_reduction=2), am.LGPShuffle(4),
                   am.LGPDense(2), am.LowRankLGP(2, 2, 2), am.HMD(2)):
        student = am.compress(teacher, scheme, scheme, calibration_data=x)
        for w in student.get_weights():
            assert np.all(np.isfinite(w))
        e = student.calibration_errors[("lstm", "input")]
        assert np.isfinite(e.kept) and e.kept <= e.from_dense
    zeros = np.zeros((4, 6, 8), "float32")  # no signal at all
    student = am.compress(teacher, am.LowRank(rank_reduction=2),
                          am.LowRank(rank_reduction=2),
                          calibration_data=zeros)
    assert all(np.all(np.isfinite(w)) for w in student.get_weights())
    assert student.calibration_errors[("lstm", "input")].kept == 0.0


def test_without_calibration_nothing_changes(rng):
    teacher = lstm_model()
    student = am.compress(teacher, am.LowRank(rank_reduction=2), None)
    assert not hasattr(student, "calibration_errors")
    expected = am.LowRank(rank_reduction=2).from_dense(
        teacher.get_layer("lstm").get_weights()[0]).to_dense()
    np.testing.assert_array_equal(
        student.get_layer("lstm").input_matrix.to_dense(), expected)


def test_single_layer_and_report(rng):
    layer = keras.layers.LSTM(H, name="solo")
    layer.build((None, 6, 8))
    randomize_weights(layer, seed=9)
    x = rng.normal(size=(8, 6, 8)).astype("float32")
    new = am.compress(layer, am.LGPShuffle(2), am.LGPShuffle(2),
                      calibration_data=x)
    e = new.calibration_errors[("solo", "input")]
    assert e.fitted < e.from_dense
    table = str(am.report(layer, new, errors=new.calibration_errors))
    line = next(s for s in table.splitlines() if "input" in s)
    assert f"{e.from_dense:.3f}" in line and f"{e.kept:.3f}" in line
    assert "output error" in table
    text = str(new.calibration_errors).splitlines()
    assert text[0].split() == ["layer", "product", "from_dense", "fitted",
                               "kept"]
    assert text[1].split() == ["solo", "input", f"{e.from_dense:.4f}",
                               f"{e.fitted:.4f}", "fitted"]


def test_calibrated_student_saves_and_loads(tmp_path, rng):
    teacher = lstm_model(return_sequences=True)
    x = rng.normal(size=(8, 6, 8)).astype("float32")
    student = am.compress(teacher, am.LowRank(rank_reduction=2),
                          am.LGPDense(2), calibration_data=x)
    student.save(tmp_path / "s.keras")
    restored = keras.models.load_model(tmp_path / "s.keras")
    np.testing.assert_array_equal(restored.predict(x, verbose=0),
                                  student.predict(x, verbose=0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(calibration_steps=0), "`calibration_steps` must be None or a "
     "positive integer"),
    (dict(calibration_ridge=-1.0), "`calibration_ridge` must be a number"),
    (dict(calibration_data=3), "`calibration_data` must be a "
     "tf.data.Dataset"),
])
def test_bad_calibration_arguments(kwargs, match):
    kwargs.setdefault("calibration_data", np.zeros((2, 6, 8), "float32"))
    with pytest.raises(ValueError, match=match):
        am.compress(lstm_model(), am.LGPShuffle(2), None, **kwargs)


def test_nested_and_shared_layers(rng):
    inner = keras.Sequential(
        [keras.Input((5, 8)),
         keras.layers.LSTM(H, return_sequences=True, name="inner_lstm")],
        name="inner")
    shared = keras.layers.LSTM(H, name="shared")
    a, b = keras.Input((5, 8)), keras.Input((5, 8))
    out = keras.layers.Concatenate()([shared(inner(a)), shared(b)])
    model = keras.Model([a, b], out)
    randomize_weights(model, seed=10)
    xa, xb = (rng.normal(size=(6, 5, 8)).astype("float32") for _ in "ab")
    student = am.compress(model, am.LGPShuffle(2), am.LGPShuffle(2),
                          calibration_data=[xa, xb])
    parts = {(r.layer, r.part) for r in am.report(model, student).rows}
    assert set(student.calibration_errors) == {
        ("inner/inner_lstm", "input"), ("inner/inner_lstm", "recurrent"),
        ("shared", "input"), ("shared", "recurrent")}
    assert set(student.calibration_errors) <= parts
    # The shared layer's rows: both of its calls.
    rec = calibration.record(model, [shared], [xa, xb])
    inner_out = np_lstm(xa.astype("float64"),
                        *weights(inner.get_layer("inner_lstm")))
    moments = rec.moments_of(shared.cell, "input")
    assert moments.rows == 2 * 6 * 5
    np.testing.assert_allclose(
        moments.xtx, gram(inner_out) + gram(xb), rtol=1e-4, atol=1e-4)


def test_initial_state_from_another_layer(rng):
    # Encoder-decoder: the decoder's first h_{t-1} is the encoder's state.
    a, b = keras.Input((5, 6)), keras.Input((4, 6))
    _, h, c = keras.layers.LSTM(H, return_state=True, name="enc")(a)
    out = keras.layers.LSTM(H, return_sequences=True, name="dec")(
        b, initial_state=[h, c])
    model = keras.Model([a, b], out)
    randomize_weights(model, seed=11)
    xa, xb = (rng.normal(size=(6, t, 6)) for t in (5, 4))
    rec = calibration.record(model, [model.get_layer("dec")],
                             [xa.astype("float32"), xb.astype("float32")])
    enc_w = weights(model.get_layer("enc"))
    enc = np_lstm(xa, *enc_w)
    # The encoder's final cell state, from one more NumPy pass.
    k, r, bias = enc_w
    hs, cs = np.zeros((6, H)), np.zeros((6, H))
    for s in range(5):
        i, f, g, o = np.split(xa[:, s] @ k + hs @ r + bias, 4, axis=-1)
        cs = _sigmoid(f) * cs + _sigmoid(i) * np.tanh(g)
        hs = _sigmoid(o) * np.tanh(cs)
    np.testing.assert_allclose(hs, enc[:, -1], atol=1e-12)
    dec = np_lstm(xb, *weights(model.get_layer("dec")), hs, cs)
    np.testing.assert_allclose(
        rec.moments_of(model.get_layer("dec").cell, "recurrent").xtx,
        gram(h_prev(dec, hs)), rtol=1e-4, atol=1e-4)

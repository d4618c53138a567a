"""Doping (issue 16): the Kronecker and HMD schemes, `Doped` (a structured
matrix plus a sparse one), the cubic annealing schedule, co-matrix dropout,
and all of them inside the layers, `compress`, `.keras` files, `report`,
the portable SavedModel and TFLite. Dense references are written out here
with NumPy (``np.kron``...), not taken from the package."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import keras_antman as am
from keras_antman import doping
from keras_antman import schemes
from keras_antman._keras import keras

import reference
from conftest import randomize_weights


def built(scheme, n, m, seed=0):
    """A `StructuredMatrix` of ``scheme`` with seeded random weights (a
    doped one's mask stays as built)."""
    s = scheme.bind(m)
    s.build((None, n))
    r = np.random.default_rng(seed)
    for name, w in s.scheme_weights().items():
        if name != "mask":
            w.assign(r.normal(size=w.shape).astype("float32"))
    return s


def kron_dense(arrays):
    """W = sum_t kron(a_t, b_t), written out with NumPy."""
    return sum(np.kron(a, b) for a, b in
               zip(arrays["a"].astype("float64"), arrays["b"]))


def hmd_dense(arrays):
    return np.vstack([arrays["dense"], arrays["u"] @ arrays["v"]])


def sparse_part(arrays):
    s = arrays["sparse"] * arrays["mask"]
    return s


# -- Kronecker ---------------------------------------------------------------

# (scheme, n, m, A shape, B shape, B multiplied first)
KRON = [
    (am.Kronecker(), 24, 40, (4, 5), (6, 8), True),
    (am.Kronecker(a_shape=(6, 2)), 24, 40, (6, 2), (4, 20), False),
    (am.Kronecker(b_shape=(2, 20), terms=2), 24, 40, (12, 2), (2, 20), False),
    (am.Kronecker(a_shape=(3, 5), b_shape=(8, 8)), 24, 40, (3, 5), (8, 8),
     True),
]


@pytest.mark.parametrize("scheme,n,m,a_shape,b_shape,b_first", KRON,
                         ids=lambda v: str(v))
def test_kronecker_forward_equals_np_kron(scheme, n, m, a_shape, b_shape,
                                          b_first, rng):
    s = built(scheme, n, m)
    arrays = s.weight_arrays()
    assert arrays["a"].shape[1:] == a_shape
    assert arrays["b"].shape[1:] == b_shape
    assert am.Kronecker._b_first(*a_shape, *b_shape) is b_first
    w = kron_dense(arrays)
    # A indexes the outer blocks: W[i1 n2 + i2, j1 m2 + j2] = A B.
    a, b = arrays["a"][0], arrays["b"][0]
    if scheme.terms == 1:
        assert np.isclose(w[1 * b_shape[0] + 1, 1 * b_shape[1] + 0],
                          a[1, 1] * b[1, 0])
    x = rng.normal(size=(2, 3, n)).astype("float32")
    np.testing.assert_allclose(s(x), x @ w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s.to_dense(), w, rtol=1e-5, atol=1e-5)


def test_kronecker_cost_by_hand():
    # 24 -> 40 near-square: A [4, 5], B [6, 8]. B first: n1 n2 m2 + n1 m2 m1
    # = 4*6*8 + 4*8*5 = 352; A first: 5*6*(4 + 8) = 360.
    assert am.Kronecker().cost(24, 40) == (4 * 5 + 6 * 8, 352)
    # A [6, 2], B [4, 20]: B first 6*20*(4+2) = 720, A first 2*4*(6+20)
    # = 208.
    assert am.Kronecker(a_shape=(6, 2)).cost(24, 40) == (12 + 80, 208)
    assert am.Kronecker(a_shape=(6, 2), terms=3).cost(24, 40) == (276, 624)
    # An LSTM's 200 -> 800: 10 x 20 and 25 x 32.
    assert am.Kronecker().factors(200, 800) == ((10, 25), (20, 32))
    assert am.Kronecker().cost(200, 800) == (250 + 640, 10 * 32 * (20 + 25))
    assert am.Kronecker().factors(13, 7) == ((1, 1), (13, 7))


def test_kronecker_from_dense_recovers_an_exact_product(rng):
    a = rng.normal(size=(4, 5))
    b = rng.normal(size=(6, 8))
    s = am.Kronecker().from_dense(np.kron(a, b))
    np.testing.assert_allclose(s.to_dense(), np.kron(a, b), atol=1e-4)
    # Two terms: rank 2 of the Van Loan-Pitsianis rearrangement.
    w2 = np.kron(a, b) + np.kron(rng.normal(size=(4, 5)),
                                 rng.normal(size=(6, 8)))
    s2 = am.Kronecker(terms=2).from_dense(w2)
    np.testing.assert_allclose(kron_dense(s2.weight_arrays()), w2, atol=1e-4)
    # Nearest in Frobenius norm: no better than the exact product's
    # neighbour, and better than the first term alone.
    one = am.Kronecker().from_dense(w2).to_dense()
    assert np.linalg.norm(one - w2) < np.linalg.norm(np.kron(a, b) - w2)


@pytest.mark.parametrize("make,n,m,pattern", [
    (lambda: am.Kronecker(a_shape=(5, 4)), 24, 40,
     r"Kronecker\(a_shape=\(5, 4\)\) cannot compress a 24 -> 40 product.*"
     r"n1 n2 = n = 24.*n1 in \[1, 2, 3, 4, 6, 8, 12, 24\] and m1 in "
     r"\[1, 2, 4, 5, 8, 10, 20, 40\]"),
    (lambda: am.Kronecker(a_shape=(4, 5), b_shape=(6, 4)), 24, 40,
     r"m1 m2 = m = 40"),
    (lambda: am.Kronecker(b_shape=(7, 8)), 24, 40, r"b_shape = \(n / n1"),
    (lambda: am.Kronecker(terms=21), 24, 40,
     r"terms <= min\(n1 m1, n2 m2\) = 20.*terms in 1\.\.20"),
])
def test_kronecker_invalid_factors(make, n, m, pattern):
    with pytest.raises(ValueError, match=pattern):
        make().bind(m).build((None, n))
    s = make().bind(m, context="lstm: input product")
    with pytest.raises(ValueError, match="`lstm: input product`: "):
        s.build((None, n))


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(a_shape=(0, 2)), "`a_shape` must be None or a pair of positive"),
    (dict(b_shape=4), "`b_shape` must be None or a pair"),
    (dict(a_shape=(2, 2, 2)), "`a_shape` must be None or a pair"),
    (dict(terms=0), "`terms` must be a positive integer"),
])
def test_kronecker_invalid_hyperparameters(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        am.Kronecker(**kwargs)


# -- HMD -----------------------------------------------------------------


def test_hmd_forward_cost_and_from_dense(rng):
    scheme = am.HMD(3, dense_rows=0.25)
    s = built(scheme, 24, 40)
    arrays = s.weight_arrays()
    assert arrays["dense"].shape == (6, 40)
    w = hmd_dense(arrays)
    x = rng.normal(size=(5, 24)).astype("float32")
    np.testing.assert_allclose(s(x), x @ w, rtol=1e-4, atol=1e-4)
    # n_d m + (n - n_d) k + k m = 6*40 + 18*3 + 3*40
    assert scheme.cost(24, 40) == (414, 414)
    assert s.params() == sum(v.size for v in arrays.values())
    # round(0.3 * 25) = round(7.5): halves up.
    assert am.HMD(2, 0.3).split(25) == 8
    target = rng.normal(size=(24, 40))
    d = scheme.from_dense(target).weight_arrays()
    np.testing.assert_array_equal(d["dense"], target[:6].astype("float32"))
    u, sv, vt = np.linalg.svd(target[6:], full_matrices=False)
    np.testing.assert_allclose(d["u"] @ d["v"], (u[:, :3] * sv[:3]) @ vt[:3],
                               atol=1e-4)


@pytest.mark.parametrize("make,n,pattern", [
    (lambda: am.HMD(2, 0.01), 10,
     r"between 1 and n - 1 = 9 dense rows \(dense_rows = 0.01 gives 0\).*"
     r"dense_rows in \[0.05, 0.95\)"),
    (lambda: am.HMD(6, 0.5), 10,
     r"rank <= min\(n - n_d, m\) = 5 \(n_d = 5 dense rows\).*rank in 1\.\.5"),
])
def test_hmd_invalid_dims(make, n, pattern):
    with pytest.raises(ValueError, match=pattern):
        make().bind(40).build((None, n))


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(rank=0), "HMD: `rank` must be a positive integer"),
    (dict(rank=2, dense_rows=1.0), r"`dense_rows` must be a fraction in"),
    (dict(rank=2, dense_rows=0), r"`dense_rows` must be a fraction in"),
])
def test_hmd_invalid_hyperparameters(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        am.HMD(**kwargs)


# -- Doped ------------------------------------------------------------------

DOPED_BASES = [
    ("kronecker", am.Kronecker, kron_dense),
    ("hmd", lambda: am.HMD(4, 0.5), hmd_dense),
    ("lmf", lambda: am.LowRank(rank=3), lambda a: a["u"] @ a["v"]),
]


@pytest.mark.parametrize("name,make_base,base_dense", DOPED_BASES,
                         ids=[b[0] for b in DOPED_BASES])
def test_doped_forward_equals_base_plus_sparse(name, make_base, base_dense,
                                               rng):
    scheme = am.Doped(make_base(), sparsity=0.9, seed=3)
    s = built(scheme, 24, 40)
    arrays = s.weight_arrays()
    assert int(arrays["mask"].sum()) == 24 * 40 - 864  # round(0.9 * 960)
    base = {k[5:]: v for k, v in arrays.items() if k.startswith("base_")}
    w = base_dense(base) + arrays["sparse"] * arrays["mask"]
    x = rng.normal(size=(2, 3, 24)).astype("float32")
    np.testing.assert_allclose(s(x), x @ w, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s.to_dense(), w, rtol=1e-5, atol=1e-5)
    bp, bm = make_base().cost(24, 40)
    assert scheme.cost(24, 40) == (bp + 96 + 96 + 40 + 1, bm + 96)
    assert [p[0] for p in s.cost_parts()] == ["base", "sparse",
                                             "sparse_index"]
    assert sum(p[2] for p in s.cost_parts()) == s.params()


def test_doped_from_dense_prunes_the_residual_by_magnitude(rng):
    a, b = rng.normal(size=(4, 5)), rng.normal(size=(6, 8))
    w = np.kron(a, b) + rng.normal(size=(24, 40)) * 0.1
    exact = am.Doped(am.Kronecker(), sparsity=0.0).from_dense(w)
    np.testing.assert_allclose(exact.to_dense(), w, atol=1e-4)
    s = am.Doped(am.Kronecker(), sparsity=0.95).from_dense(w)
    arrays = s.weight_arrays()
    base = kron_dense({"a": arrays["base_a"], "b": arrays["base_b"]})
    residual = w - base
    keep = 960 - 912  # round(0.95 * 960) zeros
    assert int(arrays["mask"].sum()) == keep
    assert np.count_nonzero(arrays["sparse"]) == keep
    kept = arrays["mask"] > 0
    np.testing.assert_allclose(arrays["sparse"][kept], residual[kept],
                               atol=1e-5)
    assert np.abs(residual[kept]).min() >= np.abs(residual[~kept]).max()
    assert np.linalg.norm(s.to_dense() - w) < np.linalg.norm(base - w)


@pytest.mark.parametrize("make,pattern", [
    (lambda: am.Doped(am.Kronecker(), sparsity=1.5),
     r"Doped: `sparsity` must be a number in \[0, 1\]"),
    (lambda: am.Doped(am.Kronecker(), target_sparsity=-0.1),
     r"`target_sparsity` must be a number in \[0, 1\]"),
    (lambda: am.Doped(am.Kronecker(), cmr_rate=1.0),
     r"`cmr_rate` must be a number in \[0, 1\)"),
    (lambda: am.Doped(am.Doped(am.Kronecker())),
     "`base` must be a structured scheme, not another Doped"),
    (lambda: am.Doped("svd"), "Doped: `base` must be a scheme"),
    (lambda: doping.DopingSchedule(10, 10), "`end_step` must be greater"),
    (lambda: doping.DopingSchedule(-1, 10), "`start_step` must be a non-neg"),
    (lambda: doping.DopingSchedule(0, 10, frequency=0),
     "`frequency` must be a positive integer"),
    (lambda: doping.DopingSchedule(0, 10, target_sparsity=2),
     r"`target_sparsity` must be a number in \[0, 1\]"),
])
def test_doping_invalid_arguments(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def _lowered_dense(elements):
    """The dense matrix of a lowering, from its stages and sparse term."""
    from keras_antman import ops

    w, sparse = None, 0.0
    for e in elements:
        if isinstance(e, ops.SparseTerm):
            row_ptr, col, val = (np.asarray(a) for a in e)
            st = np.zeros((len(row_ptr) - 1, w.shape[0]))
            for j in range(len(row_ptr) - 1):
                st[j, col[row_ptr[j]:row_ptr[j + 1]]] = val[
                    row_ptr[j]:row_ptr[j + 1]]
            sparse = st.T
            continue
        blocks = np.asarray(e.blocks, "float64")
        d = reference.block_diag(blocks)
        if e.shuffle:
            d = reference.shuffled(d, blocks.shape[0])
        w = d if w is None else w @ d
    return w + sparse


@pytest.mark.parametrize("scheme", [
    am.HMD(2), am.Doped(am.HMD(3), sparsity=0.9),
    am.Doped(am.Kronecker(), sparsity=0.5), am.Doped(am.HMD(2), 1.0),
], ids=lambda s: s.describe())
def test_hmd_and_doped_lower_to_the_op_exactly(scheme):
    s = built(scheme, 8, 12, seed=4)
    if isinstance(scheme, am.Doped):
        doping.prune(s, scheme.sparsity)
    np.testing.assert_allclose(_lowered_dense(s.kernel_stages()),
                               _dense_of(s), rtol=1e-5, atol=1e-5)


def test_spec_grammar_and_serialization():
    assert schemes.from_spec("kronecker") == am.Kronecker()
    assert schemes.from_spec("kronecker:a_shape=4x8") == am.Kronecker(
        a_shape=(4, 8))
    assert schemes.from_spec("hmd:8,dense_rows=0.25") == am.HMD(8, 0.25)
    with pytest.raises(ValueError, match="integers, decimals or shapes"):
        schemes.from_spec("kronecker:a_shape=4y8")
    assert "doped" not in schemes.registry()
    d = am.Doped(am.Kronecker(b_shape=(2, 4)), 0.5, 0.9, 0.25, seed=7)
    again = schemes.get(keras.saving.serialize_keras_object(d))
    assert again == d and hash(again) == hash(d)
    assert again.base == am.Kronecker(b_shape=(2, 4))


# -- annealing ---------------------------------------------------------------


def test_cubic_schedule_hand_values():
    f = doping.cubic_sparsity
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3
    assert f(0, 0, 100, 0.0, 0.9) == 0.0
    assert f(50, 0, 100, 0.0, 0.9) == pytest.approx(0.9 - 0.9 * 0.125)
    assert f(25, 0, 100, 0.0, 0.9) == pytest.approx(0.5203125)
    assert f(40, 20, 120, 0.5, 0.99) == pytest.approx(
        0.99 - 0.49 * 0.8 ** 3)
    assert f(5, 20, 120, 0.5, 0.99) == 0.5  # before the start
    assert f(500, 20, 120, 0.5, 0.99) == 0.99  # after the end
    cb = doping.DopingSchedule(2, 10, frequency=3)
    assert [t for t in range(14) if cb.is_pruning_step(t)] == [
        2, 5, 8, 10, 11, 12, 13]


def _doped_lm(rng, scheme_in, scheme_rec, cls=am.StructuredLSTM, **kw):
    inp = keras.Input((6, 8))
    h = cls(12, input_scheme=scheme_in, recurrent_scheme=scheme_rec,
            return_sequences=True, name="rnn", **kw)(inp)
    model = keras.Model(inp, keras.layers.Dense(3, name="out")(h))
    randomize_weights(model, seed=1, scale=0.3)
    for m in doping.doped_matrices(model):
        m.mask.assign(np.ones(m.mask.shape, "float32"))
        m.scheme.set_sparsity(0.0)
    return model


def _data(rng, n=16):
    x = rng.normal(size=(n, 6, 8)).astype("float32")
    y = rng.normal(size=(n, 6, 3)).astype("float32")
    return x, y


def _zeros(matrix):
    return int(np.sum(matrix.mask.numpy() == 0))


def test_annealing_reaches_target_exactly_and_pruned_stay_zero(rng):
    d = am.Doped(am.Kronecker(), target_sparsity=0.9)
    model = _doped_lm(rng, d, am.Doped(am.HMD(2), target_sparsity=0.95))
    mats = doping.doped_matrices(model)
    assert [m.name for m in mats] == ["input_matrix", "recurrent_matrix"]
    x, y = _data(rng)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    cb = doping.DopingSchedule(2, 10, frequency=3)
    # Steps 0..5: pruned at 2 (s_i = 0) and at 5, to the ramp's value.
    model.fit(x, y, batch_size=4, epochs=1, callbacks=[cb], verbose=0)
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[cb], verbose=0)
    s5 = doping.cubic_sparsity(5, 2, 10, 0.0, 0.9)
    assert _zeros(mats[0]) == round(s5 * 8 * 48)
    assert mats[0].scheme.sparsity == s5
    hist = model.fit(x, y, batch_size=4, epochs=2, callbacks=[cb], verbose=0)
    assert _zeros(mats[0]) == round(0.9 * 8 * 48) == 346
    assert _zeros(mats[1]) == round(0.95 * 12 * 48) == 547
    assert mats[0].scheme.sparsity == 0.9
    assert hist.history["doping_sparsity"][-1] == pytest.approx(
        (346 + 547) / (8 * 48 + 12 * 48))
    masks = [m.mask.numpy().copy() for m in mats]
    for m, mask in zip(mats, masks):
        assert np.all(m.sparse.numpy()[mask == 0] == 0)
    # Further training, with and without the callback (Adam's momentum
    # would move the raw variable): the product never uses pruned entries.
    model.fit(x, y, batch_size=4, epochs=1, callbacks=[cb], verbose=0)
    for m, mask in zip(mats, masks):
        np.testing.assert_array_equal(m.mask.numpy(), mask)
        assert np.all(m.sparse.numpy()[mask == 0] == 0)
    before = [m.to_dense() for m in mats]
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    for m, mask, w in zip(mats, masks, before):
        np.testing.assert_array_equal(m.mask.numpy(), mask)
        arrays = m.weight_arrays()
        assert np.all(sparse_part(arrays)[mask == 0] == 0)
        assert not np.array_equal(m.to_dense(), w)  # it did train


def test_schedule_needs_doped_matrices_and_skips_a_frozen_teacher(rng):
    x, y = _data(rng)
    plain = _doped_lm(rng, am.Kronecker(), am.Dense())
    plain.compile("sgd", "mse")
    with pytest.raises(ValueError, match="has no trainable matrix with a "
                       "Doped scheme"):
        plain.fit(x, y, callbacks=[doping.DopingSchedule(0, 4)], verbose=0)
    teacher = _doped_lm(rng, am.Doped(am.Kronecker()), am.Dense())
    student = _doped_lm(rng, am.Doped(am.Kronecker()), am.Dense())
    distiller = am.Distiller(student=student, teacher=teacher)
    assert doping.doped_matrices(distiller) == doping.doped_matrices(student)
    distiller.compile("adam", loss="mse")
    cb = doping.DopingSchedule(0, 3, target_sparsity=0.75, frequency=1)
    distiller.fit(x, y, batch_size=4, epochs=1, callbacks=[cb], verbose=0)
    (m,) = doping.doped_matrices(student)
    assert _zeros(m) == 0.75 * 8 * 48
    (t,) = [layer for layer in teacher.get_layer("rnn")._flatten_layers()
            if isinstance(layer, am.StructuredMatrix)
            and isinstance(layer.scheme, am.Doped)]
    assert _zeros(t) == 0


# -- co-matrix dropout ---------------------------------------------------


def test_cmr_is_active_in_training_only(rng):
    def matrix(seed):
        s = built(am.Doped(am.Kronecker(), cmr_rate=0.5, seed=seed), 24, 40)
        s.set_weights(built(am.Doped(am.Kronecker()), 24, 40).get_weights())
        return s

    s1, s2 = matrix(1), matrix(2)
    x = rng.normal(size=(5, 24)).astype("float32")
    w = s1.to_dense()
    for s in (s1, s2):
        np.testing.assert_array_equal(s(x), s(x, training=False))
        np.testing.assert_allclose(s(x), x @ w, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(s1(x), s2(x))
    t1, t2 = s1(x, training=True), s2(x, training=True)
    assert not np.allclose(t1, t2)
    assert not np.allclose(t1, s1(x, training=True))  # a new draw per call
    # Only S's contribution is dropped (inverted dropout, rate 0.5): each
    # output is the base's plus 0 or 2 times the sparse part.
    arrays = s1.weight_arrays()
    base = x @ kron_dense({"a": arrays["base_a"], "b": arrays["base_b"]})
    sparse = x @ sparse_part(arrays)
    ratio = (np.asarray(t1) - base) / sparse
    assert np.allclose(ratio[np.abs(sparse) > 1e-2].round(3) % 2, 0)
    # In a layer: training differs, inference is deterministic.
    model = _doped_lm(rng, am.Doped(am.Kronecker(), cmr_rate=0.5, seed=1),
                      am.Doped(am.HMD(2), cmr_rate=0.5))
    xs, ys = _data(rng)
    np.testing.assert_array_equal(model(xs), model(xs))
    assert not np.allclose(model(xs, training=True), model(xs))
    # Dropout draws inside the compiled time loop of `fit`.
    model.compile("adam", "mse")
    loss = model.fit(xs, ys, batch_size=8, epochs=2, verbose=0).history
    assert np.all(np.isfinite(loss["loss"]))


# -- in the layers, compress, files, report, export ---------------------


LAYER_SCHEMES = [
    ("kronecker", am.Kronecker(), am.Kronecker(terms=2)),
    ("hmd", am.HMD(3, 0.5), am.HMD(2, 0.25)),
    ("doped", am.Doped(am.Kronecker(), sparsity=0.8),
     am.Doped(am.HMD(2), sparsity=0.9)),
]
LAYERS = [
    (am.StructuredLSTM, {}, reference.lstm),
    (am.StructuredGRU, dict(reset_after=True), reference.gru),
    (am.StructuredGRU, dict(reset_after=False), reference.gru),
]


def _dense_of(matrix):
    a = {k: v.astype("float64") for k, v in matrix.weight_arrays().items()}
    scheme = matrix.scheme
    if isinstance(scheme, am.Doped):
        base = {k[5:]: v for k, v in a.items() if k.startswith("base_")}
        d = kron_dense(base) if "a" in base else hmd_dense(base)
        return d + sparse_part(a)
    return kron_dense(a) if "a" in a else hmd_dense(a)


@pytest.mark.parametrize("name,s_in,s_rec", LAYER_SCHEMES,
                         ids=[s[0] for s in LAYER_SCHEMES])
@pytest.mark.parametrize("cls,kwargs,ref", LAYERS,
                         ids=["lstm", "gru_reset_after", "gru_reset_before"])
def test_in_structured_layers_against_numpy(name, s_in, s_rec, cls, kwargs,
                                            ref, rng):
    layer = cls(8, input_scheme=s_in, recurrent_scheme=s_rec,
                return_sequences=True, kernel="portable", **kwargs)
    x = rng.normal(size=(2, 5, 12)).astype("float32")
    layer(x)
    randomize_weights(layer, seed=4, scale=0.4)
    for m in doping.doped_matrices(layer):
        doping.prune(m, m.scheme.sparsity)
    mats = layer.cell.products()
    rec = _dense_of(mats["recurrent"])
    if "candidate" in mats:
        rec = np.concatenate([rec, _dense_of(mats["candidate"])], axis=1)
    extra = {} if cls is am.StructuredLSTM else dict(
        reset_after=kwargs["reset_after"])
    expected = ref(x.astype("float64"), _dense_of(mats["input"]), rec,
                   layer.cell.bias.numpy(), **extra)[0]
    np.testing.assert_allclose(layer(x), expected, rtol=1e-4, atol=1e-4)


def _teacher(rng):
    inp = keras.Input((6, 12))
    h = keras.layers.LSTM(16, return_sequences=True, name="lstm")(inp)
    h = keras.layers.GRU(8, reset_after=False, return_sequences=True,
                         name="gru")(h)
    model = keras.Model(inp, keras.layers.Dense(3, name="out")(h))
    randomize_weights(model, seed=2, scale=0.3)
    return model


def _student(teacher):
    return am.compress(teacher, layers={
        "lstm": (am.Doped(am.Kronecker(), sparsity=0.9, cmr_rate=0.2),
                 am.Doped(am.HMD(4), sparsity=0.95)),
        "gru": (am.Kronecker(), am.HMD(2, 0.5)),
    })


_LOADER = """
import json, sys
import numpy as np
import tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
print(json.dumps(m.serve(np.load(sys.argv[2])).numpy().tolist()))
"""


def test_compress_keras_file_report_export_and_tflite(tmp_path, rng):
    teacher = _teacher(rng)
    student = _student(teacher)
    x = rng.normal(size=(1, 6, 12)).astype("float32")
    y_student = np.asarray(student(x))
    # compress initialised S from the residual: doped beats its base.
    kernel = teacher.get_layer("lstm").cell.kernel.numpy()
    doped = student.get_layer("lstm").input_matrix.to_dense()
    base = am.Kronecker().from_dense(kernel).to_dense()
    assert np.linalg.norm(doped - kernel) < np.linalg.norm(base - kernel)

    student.save(tmp_path / "s.keras")
    restored = keras.models.load_model(tmp_path / "s.keras")
    np.testing.assert_array_equal(restored(x), y_student)
    lstm = restored.get_layer("lstm")
    assert lstm.input_scheme == am.Doped(am.Kronecker(), 0.9, cmr_rate=0.2)
    assert _zeros(lstm.input_matrix) == round(0.9 * 12 * 64)

    rows = {r.part: r for r in am.report(teacher, student).rows
            if r.layer == "lstm"}
    nnz = 12 * 64 - round(0.9 * 12 * 64)
    assert rows["input/sparse"].params_after == nnz
    assert rows["input/sparse"].macs_after == nnz
    assert rows["input/sparse_index"].params_after == nnz + 64 + 1
    k = am.Kronecker().cost(12, 64)
    assert (rows["input/base"].params_after,
            rows["input/base"].macs_after) == k
    assert rows["input"].macs_after == k[1] + nnz
    assert rows["input/base"].detail and not rows["input"].detail
    parts = [r.part for r in am.report(teacher, student).rows
             if r.layer == "lstm"]
    assert parts[:4] == ["input", "input/base", "input/sparse",
                         "input/sparse_index"]
    text = str(am.report(teacher, student))
    assert "input/base" in text and "S values (77 non-zeros" in text
    rep = am.report(teacher, student)
    assert rep.total.params_after == sum(
        r.params_after for r in rep.rows if not r.detail)

    path = am.export(student, tmp_path / "sm", kernel="portable",
                     batch_size=1)
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run(
        [sys.executable, "-c", _LOADER, str(path), str(tmp_path / "x.npy")],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(got, y_student, rtol=1e-5, atol=1e-5)

    converter = tf.lite.TFLiteConverter.from_saved_model(str(path))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    flatbuffer = converter.convert()
    interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    runner = interpreter.get_signature_runner()
    name = list(runner.get_input_details())[0]
    (out,) = runner(**{name: x}).values()
    np.testing.assert_allclose(out, y_student, rtol=1e-4, atol=1e-5)
    # S went in sparse: its non-zeros and indices, no dense [12, 64] or
    # [16, 64] matrix (nor its transpose) in any subgraph (the recurrent
    # product is in the WHILE body).
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        tf.lite.experimental.Analyzer.analyze(model_content=flatbuffer)
    tensors = set(re.findall(r"shape:\[([\d, ]*)\], type:(\w+)",
                             text.getvalue()))
    for dense in ["12, 64", "64, 12", "16, 64", "64, 16"]:
        assert not any(shape == dense for shape, _ in tensors), dense
    for count in [nnz, 16 * 64 - round(0.95 * 16 * 64)]:
        assert (f"{count}, 1", "FLOAT32") in tensors  # values
        assert (str(count), "INT32") in tensors  # indices
    ops = set(re.findall(r"Op#\d+ (\w+)", text.getvalue()))
    assert {"GATHER", "UNSORTED_SEGMENT_SUM", "WHILE"} <= ops


@pytest.mark.parametrize("terms", [1, 2])
def test_kronecker_runs_on_the_compiled_op(terms, rng):
    from keras_antman import ops

    if not ops.is_available():
        pytest.fail("the compiled op library is not built")
    scheme = am.Kronecker(terms=terms)
    x = rng.normal(size=(3, 6, 8)).astype("float32")
    # units 8: m = 32 = 4 x 8, and m2 = 8 divides the units.
    layer = am.StructuredLSTM(8, input_scheme=scheme,
                              recurrent_scheme=scheme, return_sequences=True,
                              kernel="compiled")
    layer(x)
    r = np.random.default_rng(terms)
    for v in layer.weights:
        v.assign(r.normal(scale=0.5, size=v.shape).astype("float32"))
    assert layer.compiled_blockers() == []
    kernel = sum(np.kron(a, b) for a, b in zip(
        layer.input_matrix.a.numpy(), layer.input_matrix.b.numpy()))
    rec = sum(np.kron(a, b) for a, b in zip(
        layer.recurrent_matrix.a.numpy(), layer.recurrent_matrix.b.numpy()))
    expected, _, _ = reference.lstm(x, kernel, rec, layer.bias.numpy())
    for threads in (1, 2):
        ops.set_num_threads(threads)
        ops._set_min_parallel_work(per_step=0)
        try:
            np.testing.assert_allclose(layer(x), expected, rtol=1e-5,
                                       atol=1e-5)
        finally:
            ops.set_num_threads(1)
            ops._set_min_parallel_work(per_step=16 * 1024)


def test_kronecker_whose_groups_miss_the_units_runs_on_tf_ops(rng):
    # units 12: m = 48 = 6 x 8, and m2 = 8 does not divide 12.
    x = rng.normal(size=(2, 4, 12)).astype("float32")
    auto = am.StructuredLSTM(12, recurrent_scheme=am.Kronecker())
    auto(x)
    assert auto.compiled_blockers() == [
        "the recurrent product's last stage shuffles 8 groups, which do not "
        "divide units = 12"]
    portable = am.StructuredLSTM(12, recurrent_scheme=am.Kronecker(),
                                 kernel="portable")
    portable(x)
    portable.set_weights(auto.get_weights())
    np.testing.assert_allclose(auto(x), portable(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="do not divide units = 12"):
        am.StructuredLSTM(12, recurrent_scheme=am.Kronecker(),
                          kernel="compiled")(x)

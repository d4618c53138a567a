"""Tests of the compiled ops (keras_antman/ops.py, custom_ops/).

Every result is compared with an independent float64 NumPy reference: each
scheme's arrays are turned into the dense matrix they stand for, and a
plain LSTM / GRU runs over those. Weights are seeded random, so a wrong
shuffle or gate order cannot hide behind equal units.

The op tests are skipped when the library is not built (the package then
runs on stock TF ops); the BUILD-file test always runs.
"""

import ast
import importlib.util
import itertools
import os

import numpy as np
import pytest
import tensorflow as tf

from keras_antman import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_op = pytest.mark.skipif(
    not ops.is_available(), reason="compiled op library not built"
)

KINDS = ("dense", "low_rank", "lgp_shuffle", "lgp_dense", "low_rank_lgp")


def isas():
    if not ops.is_available():
        return ["none"]
    best = ops.instruction_set()
    return ["generic", "avx2", "avx512"][
        : ["generic", "avx2", "avx512"].index(best) + 1
    ]


@pytest.fixture(autouse=True)
def _restore_settings():
    yield
    if ops.is_available():
        ops.set_instruction_set(None)
        ops._set_min_parallel_work(128 * 1024, 512 * 1024)  # the defaults
        ops.set_num_threads(1)


# -- NumPy reference -------------------------------------------------------


def block_diag(blocks):
    g, a, b = blocks.shape
    w = np.zeros((g * a, g * b))
    for i in range(g):
        w[i * a : (i + 1) * a, i * b : (i + 1) * b] = blocks[i]
    return w


def shuffle_columns(w, g):
    """y[j * g + i] = v[i, j]: column j * g + i of the result is i * b + j."""
    m = w.shape[1]
    b = m // g
    perm = np.arange(m).reshape(g, b).T.reshape(m)
    return w[:, perm]


def dense_of(kind, arrays):
    a = [np.asarray(x, dtype=np.float64) for x in arrays]
    if kind == "dense":
        return a[0]
    if kind == "low_rank":
        return a[0] @ a[1]
    if kind == "lgp_shuffle":
        return shuffle_columns(block_diag(a[0]), a[0].shape[0])
    if kind == "lgp_dense":
        mix, blocks = a
        d = block_diag(blocks)
        return mix @ d if d.shape[0] < d.shape[1] else d @ mix
    if kind == "low_rank_lgp":
        return block_diag(a[0]) @ a[1] @ block_diag(a[2])
    raise ValueError(kind)


def make_scheme(kind, n, m, rng, g=4, r=2, g_in=2, g_out=2):
    """Random arrays of a scheme for an n -> m product, in op order."""

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-2])).astype("f")

    if kind == "dense":
        return [w(n, m)]
    if kind == "low_rank":
        k = n // r
        return [w(n, k), w(k, m)]
    if kind == "lgp_shuffle":
        return [w(g, n // g, m // g)]
    if kind == "lgp_dense":
        c = min(n, m)
        return [w(c, c), w(g, n // g, m // g)]
    if kind == "low_rank_lgp":
        k = n // r
        return [
            w(g_in, n // g_in, k // g_in),
            w(k, k),
            w(g_out, k // g_out, m // g_out),
        ]
    raise ValueError(kind)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def steps_order(t, go_backwards):
    return range(t - 1, -1, -1) if go_backwards else range(t)


def ref_lstm(x, h, c, bias, k_in, k_rec, go_backwards):
    x = x.astype(np.float64)
    h, c = h.astype(np.float64), c.astype(np.float64)
    u = h.shape[1]
    outs = []
    for t in steps_order(x.shape[1], go_backwards):
        z = x[:, t] @ k_in + h @ k_rec + bias
        i, f = sigmoid(z[:, :u]), sigmoid(z[:, u : 2 * u])
        g, o = np.tanh(z[:, 2 * u : 3 * u]), sigmoid(z[:, 3 * u :])
        c = f * c + i * g
        h = o * np.tanh(c)
        outs.append(h)
    seq = np.stack(outs, 1) if outs else np.zeros((x.shape[0], 0, u))
    return seq, h, c


def ref_gru(x, h, bias, k_in, k_rec, go_backwards, reset_after, k_cand=None):
    """k_rec: [u, 3u] (reset_after) or product A [u, 2u]; k_cand: B [u, u]."""
    x, h = x.astype(np.float64), h.astype(np.float64)
    bias = np.asarray(bias, np.float64)
    u = h.shape[1]
    b_in = bias[0] if reset_after else bias
    outs = []
    for t in steps_order(x.shape[1], go_backwards):
        xz = x[:, t] @ k_in + b_in
        if reset_after:
            rh = h @ k_rec + bias[1]
            z = sigmoid(xz[:, :u] + rh[:, :u])
            r = sigmoid(xz[:, u : 2 * u] + rh[:, u : 2 * u])
            hh = np.tanh(xz[:, 2 * u :] + r * rh[:, 2 * u :])
        else:
            a = h @ k_rec
            z = sigmoid(xz[:, :u] + a[:, :u])
            r = sigmoid(xz[:, u : 2 * u] + a[:, u:])
            hh = np.tanh(xz[:, 2 * u :] + (r * h) @ k_cand)
        h = z * h + (1 - z) * hh
        outs.append(h)
    seq = np.stack(outs, 1) if outs else np.zeros((x.shape[0], 0, u))
    return seq, h


# -- a case: one cell with its inputs and the reference ---------------------


def lstm_case(
    in_kind,
    rec_kind,
    seed,
    batch=3,
    steps=7,
    features=12,
    units=20,
    in_params=None,
    rec_params=None,
):
    rng = np.random.default_rng(seed)
    m = 4 * units
    case = dict(
        x=rng.standard_normal((batch, steps, features)).astype("f"),
        initial_h=(0.5 * rng.standard_normal((batch, units))).astype("f"),
        initial_c=(0.5 * rng.standard_normal((batch, units))).astype("f"),
        bias=(0.3 * rng.standard_normal(m)).astype("f"),
        input_scheme=in_kind,
        input_weights=make_scheme(
            in_kind, features, m, rng, **(in_params or {})
        ),
        recurrent_scheme=rec_kind,
        recurrent_weights=make_scheme(
            rec_kind, units, m, rng, **(rec_params or {})
        ),
    )
    return case


def check_lstm(case, go_backwards, return_sequences, num_threads=1):
    out, h, c = ops.structured_lstm(
        **case,
        go_backwards=go_backwards,
        return_sequences=return_sequences,
        num_threads=num_threads,
    )
    seq, h_ref, c_ref = ref_lstm(
        case["x"],
        case["initial_h"],
        case["initial_c"],
        case["bias"],
        dense_of(case["input_scheme"], case["input_weights"]),
        dense_of(case["recurrent_scheme"], case["recurrent_weights"]),
        go_backwards,
    )
    tol = dict(rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(out, seq if return_sequences else h_ref, **tol)
    np.testing.assert_allclose(h, h_ref, **tol)
    np.testing.assert_allclose(c, c_ref, **tol)
    return out.numpy(), h.numpy(), c.numpy()


def gru_case(
    in_kind,
    rec_kind,
    seed,
    reset_after,
    batch=3,
    steps=7,
    features=12,
    units=20,
):
    rng = np.random.default_rng(seed)
    m = 3 * units
    bias_shape = (2, m) if reset_after else (m,)
    if reset_after:
        rec = make_scheme(rec_kind, units, m, rng)
    else:
        rec = make_scheme(rec_kind, units, 2 * units, rng) + make_scheme(
            rec_kind, units, units, rng
        )
    return dict(
        x=rng.standard_normal((batch, steps, features)).astype("f"),
        initial_h=(0.5 * rng.standard_normal((batch, units))).astype("f"),
        bias=(0.3 * rng.standard_normal(bias_shape)).astype("f"),
        input_scheme=in_kind,
        input_weights=make_scheme(in_kind, features, m, rng),
        recurrent_scheme=rec_kind,
        recurrent_weights=rec,
        reset_after=reset_after,
    )


def check_gru(case, go_backwards, return_sequences, num_threads=1):
    out, h = ops.structured_gru(
        **case,
        go_backwards=go_backwards,
        return_sequences=return_sequences,
        num_threads=num_threads,
    )
    kind = case["recurrent_scheme"]
    rec = case["recurrent_weights"]
    if case["reset_after"]:
        k_rec, k_cand = dense_of(kind, rec), None
    else:
        half = len(rec) // 2
        k_rec, k_cand = dense_of(kind, rec[:half]), dense_of(kind, rec[half:])
    seq, h_ref = ref_gru(
        case["x"],
        case["initial_h"],
        case["bias"],
        dense_of(case["input_scheme"], case["input_weights"]),
        k_rec,
        go_backwards,
        case["reset_after"],
        k_cand,
    )
    tol = dict(rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(out, seq if return_sequences else h_ref, **tol)
    np.testing.assert_allclose(h, h_ref, **tol)
    return out.numpy(), h.numpy()


# -- results ----------------------------------------------------------------

PAIRS = list(itertools.product(KINDS, KINDS))


@needs_op
@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("in_kind,rec_kind", PAIRS)
def test_lstm_every_scheme_pair(in_kind, rec_kind, isa):
    ops.set_instruction_set(isa)
    ops._set_min_parallel_work(0, 0)  # run the 2-thread path on tiny shapes
    seed = KINDS.index(in_kind) * 5 + KINDS.index(rec_kind)
    case = lstm_case(in_kind, rec_kind, seed)
    for go_backwards, return_sequences in [
        (False, True),
        (True, False),
        (seed % 2 == 0, seed % 3 == 0),
    ]:
        one = check_lstm(case, go_backwards, return_sequences, num_threads=1)
        two = check_lstm(case, go_backwards, return_sequences, num_threads=2)
        for a, b in zip(one, two):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@needs_op
@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("in_kind,rec_kind", PAIRS)
def test_gru_every_scheme_pair(in_kind, rec_kind, reset_after, isa):
    ops.set_instruction_set(isa)
    ops._set_min_parallel_work(0, 0)
    seed = 100 + KINDS.index(in_kind) * 5 + KINDS.index(rec_kind)
    case = gru_case(in_kind, rec_kind, seed, reset_after)
    for go_backwards, return_sequences in [
        (False, True),
        (True, False),
        (seed % 2 == 0, True),
    ]:
        one = check_gru(case, go_backwards, return_sequences, num_threads=1)
        two = check_gru(case, go_backwards, return_sequences, num_threads=2)
        for a, b in zip(one, two):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@needs_op
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_streamed_gate_columns(batch, reset_after):
    """Batch 1-2 against a large dense recurrent block: every gate's
    columns in one pass over W (380 units: 380 x 3 x 380 with reset_after,
    380 x 2 x 380 for z, r without), with a column tail."""
    ops._set_min_parallel_work(0, 0)
    case = gru_case("dense", "dense", 31, reset_after, batch=batch, steps=3,
                    units=380)
    check_gru(case, True, True, num_threads=1)
    check_gru(case, False, True, num_threads=2)


@needs_op
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "name,kw",
    [
        # Input shuffle with g not dividing the units (g | 4 * units).
        (
            "shuffle_g_not_dividing_units",
            dict(
                in_kind="lgp_shuffle",
                rec_kind="lgp_shuffle",
                features=16,
                units=20,
                in_params=dict(g=8),
                rec_params=dict(g=5),
            ),
        ),
        # n >= m on the input product: LGP-Dense mixes after the blocks.
        (
            "lgp_dense_mix_after",
            dict(
                in_kind="lgp_dense",
                rec_kind="lgp_dense",
                features=96,
                units=6,
                in_params=dict(g=2),
                rec_params=dict(g=2),
            ),
        ),
        # Several unit chunks per thread, vector tails, batch tail of 1.
        (
            "dense_wide",
            dict(
                in_kind="dense",
                rec_kind="dense",
                units=150,
                features=33,
                batch=5,
                steps=4,
            ),
        ),
        (
            "shuffle_wide",
            dict(
                in_kind="lgp_shuffle",
                rec_kind="lgp_shuffle",
                units=200,
                features=40,
                batch=2,
                steps=5,
                in_params=dict(g=10),
                rec_params=dict(g=10),
            ),
        ),
        (
            "low_rank_lgp_10_2",
            dict(
                in_kind="low_rank_lgp",
                rec_kind="low_rank_lgp",
                units=100,
                features=100,
                batch=1,
                steps=6,
                in_params=dict(g_in=10, g_out=10, r=2),
                rec_params=dict(g_in=10, g_out=10, r=2),
            ),
        ),
        (
            "single_unit_groups",
            dict(
                in_kind="lgp_shuffle",
                rec_kind="lgp_shuffle",
                units=8,
                features=8,
                in_params=dict(g=8),
                rec_params=dict(g=8),
            ),
        ),
        (
            "long_sequence_batch_one",
            dict(
                in_kind="lgp_shuffle",
                rec_kind="low_rank",
                batch=1,
                steps=130,
                units=24,
                features=24,
                in_params=dict(g=3),
            ),
        ),
        # Batch 1, 2 steps: the input product (128 -> 2048, 2 rows) takes
        # the streaming GEMV for large W.
        (
            "stream_gemv_input_product",
            dict(
                in_kind="dense",
                rec_kind="lgp_shuffle",
                batch=1,
                steps=2,
                units=512,
                features=128,
                rec_params=dict(g=8),
            ),
        ),
        # 90 rows (a 64-row chunk and a 26-row tail) against a 300 -> 400
        # input product: column blocks of 208 and 192 copied into the
        # contiguous pack buffer.
        (
            "packed_input_blocks",
            dict(
                in_kind="dense",
                rec_kind="lgp_shuffle",
                batch=3,
                steps=30,
                units=100,
                features=300,
                rec_params=dict(g=4),
            ),
        ),
        # LGP-Shuffle with the same g on both products: the input
        # product's columns reach the gate slots as 16 runs of 11 (moved a
        # vector at a time, with a tail); short runs take the
        # column-by-column gather (the cases above).
        (
            "gather_runs",
            dict(
                in_kind="lgp_shuffle",
                rec_kind="lgp_shuffle",
                batch=2,
                steps=9,
                units=44,
                features=44,
                in_params=dict(g=4),
                rec_params=dict(g=4),
            ),
        ),
        # A recurrent W of 1025 x 4100 (>= 2^22 entries): batch 1 streams
        # whole rows, with a column tail.
        (
            "stream_gemv_whole_rows",
            dict(
                in_kind="dense",
                rec_kind="dense",
                batch=1,
                steps=2,
                units=1025,
                features=8,
            ),
        ),
    ],
)
def test_lstm_shapes(name, kw, threads):
    ops._set_min_parallel_work(0, 0)
    kw = dict(kw)
    case = lstm_case(kw.pop("in_kind"), kw.pop("rec_kind"), seed=7, **kw)
    check_lstm(
        case, go_backwards=True, return_sequences=True, num_threads=threads
    )
    check_lstm(
        case, go_backwards=False, return_sequences=False, num_threads=threads
    )


@needs_op
def test_lstm_matches_keras_layer():
    import keras

    rng = np.random.default_rng(3)
    b, t, n, u = 2, 5, 6, 8
    x = rng.standard_normal((b, t, n)).astype("f")
    layer = keras.layers.LSTM(
        u, return_sequences=True, return_state=True, go_backwards=True
    )
    layer.build((b, t, n))
    weights = [
        rng.standard_normal(w.shape).astype("f") * 0.3
        for w in layer.get_weights()
    ]
    layer.set_weights(weights)
    want = layer(x)
    kernel, rec, bias = weights
    zeros = np.zeros((b, u), "f")
    got = ops.structured_lstm(
        x,
        zeros,
        zeros,
        bias,
        "Dense",
        [kernel],
        "Dense",
        {"kernel": rec},
        go_backwards=True,
        return_sequences=True,
    )
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@needs_op
@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_matches_keras_layer(reset_after):
    import keras

    rng = np.random.default_rng(4)
    b, t, n, u = 2, 5, 6, 8
    x = rng.standard_normal((b, t, n)).astype("f")
    layer = keras.layers.GRU(
        u, return_sequences=True, return_state=True, reset_after=reset_after
    )
    layer.build((b, t, n))
    weights = [
        rng.standard_normal(w.shape).astype("f") * 0.3
        for w in layer.get_weights()
    ]
    layer.set_weights(weights)
    want = layer(x)
    kernel, rec, bias = weights
    rec_w = [rec] if reset_after else ([rec[:, : 2 * u]], [rec[:, 2 * u :]])
    got = ops.structured_gru(
        x,
        np.zeros((b, u), "f"),
        bias,
        "dense",
        [kernel],
        "dense",
        rec_w,
        reset_after=reset_after,
        return_sequences=True,
    )
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@needs_op
@pytest.mark.parametrize("return_sequences", [True, False])
def test_empty_batch_and_no_steps(return_sequences):
    case = lstm_case("lgp_shuffle", "dense", seed=1, batch=0)
    out, h, c = ops.structured_lstm(**case, return_sequences=return_sequences)
    assert out.shape == ((0, 7, 20) if return_sequences else (0, 20))
    assert h.shape == c.shape == (0, 20)
    case = lstm_case("dense", "lgp_shuffle", seed=1, steps=0)
    out, h, c = ops.structured_lstm(**case, return_sequences=return_sequences)
    assert out.shape == ((3, 0, 20) if return_sequences else (3, 20))
    np.testing.assert_array_equal(h, case["initial_h"])
    np.testing.assert_array_equal(c, case["initial_c"])
    if not return_sequences:
        np.testing.assert_array_equal(out, case["initial_h"])
    case = gru_case("dense", "dense", seed=1, reset_after=True, steps=0)
    out, h = ops.structured_gru(**case, return_sequences=return_sequences)
    np.testing.assert_array_equal(h, case["initial_h"])


@needs_op
def test_in_tf_function_and_threads_setting():
    case = lstm_case("lgp_shuffle", "lgp_shuffle", seed=5)
    fn = tf.function(
        lambda x: ops.structured_lstm(
            x,
            *[
                case[k]
                for k in (
                    "initial_h",
                    "initial_c",
                    "bias",
                    "input_scheme",
                    "input_weights",
                    "recurrent_scheme",
                    "recurrent_weights",
                )
            ],
            return_sequences=True,
        )
    )
    out = fn(tf.constant(case["x"]))
    assert out[0].shape == (3, 7, 20)
    ops.set_num_threads(2)
    assert ops.get_num_threads() == 2
    np.testing.assert_allclose(
        fn(tf.constant(case["x"]))[0], out[0], rtol=1e-6, atol=1e-7
    )
    with pytest.raises(ValueError, match="must be >= 1"):
        ops.set_num_threads(0)


@needs_op
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_block_diag_matmul(shuffle, threads):
    rng = np.random.default_rng(11)
    for lead, g, a, b in [
        ((3,), 4, 5, 7),
        ((2, 70), 4, 64, 16),
        ((1,), 10, 160, 160),
        # One or two rows against a >= 2^18 block: the streaming GEMV,
        # with a column tail (520, 516 not multiples of the vector width).
        ((1,), 1, 512, 520),
        ((2,), 2, 512, 516),
    ]:
        x = rng.standard_normal(lead + (g * a,)).astype("f")
        blocks = rng.standard_normal((g, a, b)).astype("f")
        w = block_diag(blocks)
        if shuffle:
            w = shuffle_columns(w, g)
        ops._set_min_parallel_work(-1, 0)
        y = ops.block_diag_matmul(
            x, blocks, shuffle=shuffle, num_threads=threads
        )
        np.testing.assert_allclose(
            y, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4
        )


# -- bad inputs: InvalidArgument naming the argument ------------------------


def lstm_raw(**over):
    """Calls the raw op (no Python-side checks) with overrides."""
    case = lstm_case("lgp_shuffle", "low_rank", seed=2)
    args = dict(
        x=case["x"],
        initial_h=case["initial_h"],
        initial_c=case["initial_c"],
        bias=case["bias"],
        input_weights=case["input_weights"],
        recurrent_weights=case["recurrent_weights"],
        input_scheme="lgp_shuffle",
        recurrent_scheme="low_rank",
    )
    args.update(over)
    return ops.load().keras_antman_structured_lstm(**args)


def f(*shape):
    return np.zeros(shape, "f")


BAD_LSTM = [
    (dict(x=f(3, 12)), r"x must be a rank-3 tensor .* received shape \[3,12\]"),
    (
        dict(x=f(3, 7, 0), input_weights=[f(4, 0, 20)]),
        "x must have at least one feature",
    ),
    (
        dict(initial_h=f(2, 20)),
        r"initial_h must have shape \[batch, units\] with batch = 3",
    ),
    (dict(initial_h=f(3, 20, 1)), r"initial_h must have shape"),
    (
        dict(initial_c=f(3, 21)),
        r"initial_c must have the shape of initial_h, \[3,20\]; "
        r"received \[3,21\]",
    ),
    (
        dict(bias=f(79)),
        r"bias must have shape \[4 \* units\] = \[80\]; "
        r"received \[79\]",
    ),
    (dict(bias=f(2, 80)), r"bias must have shape \[4 \* units\]"),
    # Groups that do not divide the dims.
    (
        dict(input_weights=[f(5, 2, 16)]),
        r"input_weights\[0\] \('blocks' of lgp_shuffle\) must have shape "
        r"\[g, n/g, m/g\] with n = 12, m = 80 .*received \[5,2,16\]",
    ),
    (dict(input_weights=[f(4, 3, 21)]), r"with n = 12, m = 80"),
    (
        dict(input_weights=[f(12, 80)]),
        r"input_weights\[0\] \('blocks' of lgp_shuffle\) must have shape",
    ),
    (
        dict(recurrent_weights=[f(20, 10), f(11, 80)]),
        r"recurrent_weights\[1\] \('v' of low_rank\) must have shape "
        r"\[10, 80\] with k = u.shape\[1\].*received \[11,80\]",
    ),
    (
        dict(recurrent_weights=[f(19, 10), f(10, 80)]),
        r"recurrent_weights\[0\] \('u' of low_rank\) must have shape "
        r"\[n, k\] = \[20, k\]",
    ),
    (
        dict(input_scheme="dense", input_weights=[f(12, 81)]),
        r"input_weights\[0\] \('kernel' of dense\) must have shape \[12, 80\] "
        r"\(input product, 12 -> 80\); received \[12,81\]",
    ),
    (
        dict(input_scheme="lgp_dense", input_weights=[f(80, 80), f(4, 3, 20)]),
        r"input_weights\[0\] \('mix' of lgp_dense\) must have shape \[12, 12\] "
        r"\(mix first",
    ),
    (
        dict(
            recurrent_scheme="low_rank_lgp",
            recurrent_weights=[f(2, 10, 5), f(10, 9), f(2, 5, 40)],
        ),
        r"recurrent_weights\[1\] \('mix' of low_rank_lgp\) must be a square",
    ),
    (
        dict(
            recurrent_scheme="low_rank_lgp",
            recurrent_weights=[f(3, 10, 5), f(10, 10), f(2, 5, 40)],
        ),
        r"recurrent_weights\[0\] \('in_blocks' of low_rank_lgp\)",
    ),
    (
        dict(
            recurrent_scheme="low_rank_lgp",
            recurrent_weights=[f(2, 10, 5), f(10, 10), f(3, 5, 40)],
        ),
        r"recurrent_weights\[2\] \('out_blocks' of low_rank_lgp\)",
    ),
    # Wrong number of arrays.
    (
        dict(input_weights=[f(4, 3, 20), f(4, 3, 20)]),
        r"input_weights must hold 1 arrays for input_scheme='lgp_shuffle'; "
        r"received 2",
    ),
    (
        dict(recurrent_weights=[f(20, 10)]),
        r"recurrent_weights must hold 2 arrays for recurrent_scheme='low_rank'",
    ),
    (dict(input_weights=[]), "num_input_weights.* must be at least minimum 1"),
    # Attributes.
    (dict(num_threads=-1), r"num_threads must be >= 0 .*received -1"),
    (dict(input_scheme="lgp"), "not in the list of allowed values"),
    # dtypes.
    (
        dict(x=tf.zeros((3, 7, 12), tf.float64)),
        "expected to be a float tensor but is a double tensor",
    ),
    (
        dict(bias=tf.zeros((80,), tf.int32)),
        "expected to be a float tensor but is a int32 tensor",
    ),
]


@needs_op
@pytest.mark.parametrize("over,match", BAD_LSTM)
def test_lstm_bad_input(over, match):
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        lstm_raw(**over)


def gru_raw(reset_after, **over):
    case = gru_case("dense", "dense", seed=3, reset_after=reset_after)
    args = dict(
        x=case["x"],
        initial_h=case["initial_h"],
        bias=case["bias"],
        input_weights=case["input_weights"],
        recurrent_weights=case["recurrent_weights"],
        input_scheme="dense",
        recurrent_scheme="dense",
        reset_after=reset_after,
    )
    args.update(over)
    return ops.load().keras_antman_structured_gru(**args)


BAD_GRU = [
    (
        True,
        dict(bias=f(60)),
        r"bias must have shape \[2, 3 \* units\] = "
        r"\[2, 60\] with reset_after; received \[60\]",
    ),
    (
        False,
        dict(bias=f(2, 60)),
        r"bias must have shape \[3 \* units\] = "
        r"\[60\] without reset_after",
    ),
    (
        False,
        dict(recurrent_weights=[f(20, 40)]),
        r"recurrent_weights must hold 2 arrays for recurrent_scheme='dense' "
        r"\(products A then B, reset_after=False\); received 1",
    ),
    (
        False,
        dict(recurrent_weights=[f(20, 40), f(20, 40)]),
        r"recurrent_weights\[1\] \('kernel' of dense\) must have shape "
        r"\[20, 20\] \(recurrent product B, 20 -> 20\)",
    ),
    (
        True,
        dict(recurrent_weights=[f(20, 80)]),
        r"must have shape \[20, 60\] \(recurrent product, 20 -> 60\)",
    ),
    (True, dict(num_threads=-3), "num_threads must be >= 0"),
    (True, dict(initial_h=f(3, 20, 2)), "initial_h must have shape"),
]


@needs_op
@pytest.mark.parametrize("reset_after,over,match", BAD_GRU)
def test_gru_bad_input(reset_after, over, match):
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        gru_raw(reset_after, **over)


BAD_BLOCK_DIAG = [
    (
        f(2, 12),
        f(4, 4, 5),
        r"blocks must have shape \[g, n/g, m/g\] with "
        r"n = x.shape\[-1\] = 12 and g dividing n; "
        r"received \[4,4,5\]",
    ),
    (f(2, 12), f(12, 5), r"blocks must have shape \[g, n/g, m/g\] with g >= 1"),
    (f(2, 0), f(0, 3, 5), r"with g >= 1; received \[0,3,5\]"),
    (np.zeros((), "f"), f(1, 1, 1), r"x must have rank >= 1"),
    (tf.zeros((2, 12), tf.float64), f(4, 3, 5), "expected to be a float"),
]


@needs_op
@pytest.mark.parametrize("x,blocks,match", BAD_BLOCK_DIAG)
def test_block_diag_bad_input(x, blocks, match):
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        ops.block_diag_matmul(x, blocks)
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_threads"):
        ops.block_diag_matmul(f(2, 4), f(2, 2, 3), num_threads=-1)


@needs_op
def test_graph_mode_shape_errors():
    case = lstm_case("dense", "dense", seed=1)

    @tf.function
    def run(x):
        return ops.structured_lstm(
            x,
            *[
                case[k]
                for k in (
                    "initial_h",
                    "initial_c",
                    "bias",
                    "input_scheme",
                    "input_weights",
                    "recurrent_scheme",
                    "recurrent_weights",
                )
            ],
        )

    with pytest.raises(ValueError, match="x: Shape must be rank 3"):
        run.get_concrete_function(tf.TensorSpec([3, 12]))
    # The batch comes from initial_h when x leaves it open.
    spec = run.get_concrete_function(tf.TensorSpec([None, None, 12]))
    assert spec.structured_outputs[0].shape.as_list() == [3, 20]


def test_wrapper_rejects_unknown_scheme():
    if not ops.is_available():
        pytest.skip("compiled op library not built")
    case = lstm_case("dense", "dense", seed=1)
    case["input_scheme"] = "kronecker"
    with pytest.raises(ValueError, match="`input_scheme` must be one of"):
        ops.structured_lstm(**case)


@needs_op
def test_threads_used_follows_the_per_step_threshold():
    ops.set_num_threads(2)
    assert ops.threads_used(128 * 1024 - 1) == 1  # the default threshold
    assert ops.threads_used(128 * 1024) == 2
    assert ops.threads_used(10**6, num_threads=3) == 3
    ops._set_min_parallel_work(per_step=1000)
    assert ops.threads_used(999) == 1 and ops.threads_used(1000) == 2


def test_set_num_threads_validates():
    with pytest.raises(ValueError, match="positive integer"):
        ops.set_num_threads(1.5)
    with pytest.raises(ValueError, match="must be >= 1"):
        ops.set_num_threads(-2)


# -- the build description ---------------------------------------------------


def load_setup():
    spec = importlib.util.spec_from_file_location(
        "keras_antman_setup", os.path.join(ROOT, "setup.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() only runs as __main__
    return module


def parse_bazel(path):
    """The keyword arguments of each rule call in a BUILD file, by name."""
    rules = {}
    tree = ast.parse(open(path).read(), path)
    for node in tree.body:
        if not (
            isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
        ):
            continue
        call = node.value
        kwargs = {}
        for kw in call.keywords:
            try:
                kwargs[kw.arg] = ast.literal_eval(kw.value)
            except ValueError:
                kwargs[kw.arg] = None  # glob(...), select(...)
        if "name" in kwargs:
            rules[kwargs["name"]] = (call.func.id, kwargs)
    return rules


def test_bazel_build_matches_setup():
    setup = load_setup()
    rules = parse_bazel(os.path.join(ROOT, "BUILD"))
    kind, lib = rules["keras_antman/" + setup.LIBRARY + ".so"]
    assert kind == "cc_binary"
    assert lib["linkshared"] in (1, True)
    for path in lib["srcs"]:
        assert os.path.exists(os.path.join(ROOT, path)), path
    assert sorted(s for s in lib["srcs"] if s.endswith(".cc")) == sorted(
        setup.SOURCES
    )
    assert sorted(s for s in lib["srcs"] if s.endswith(".h")) == sorted(
        setup.HEADERS
    )
    assert lib["copts"] == setup.COPTS
    assert lib["linkopts"] == setup.LINKOPTS
    # Bazel gets TF's own defines from the local TF config; BUILD names
    # them too, and they must be those of the installed TensorFlow.
    tf_defines = [
        flag[2:]
        for flag in tf.sysconfig.get_compile_flags()
        if flag.startswith("-D")
    ]
    assert sorted(lib["defines"]) == sorted(setup.DEFINES + tf_defines)
    for path in setup.SOURCES + setup.HEADERS:
        assert os.path.exists(os.path.join(ROOT, path)), path

"""Tests of the compiled ops (keras_antman/ops.py, custom_ops/).

Every result is compared with an independent float64 NumPy reference: each
chain of stages is multiplied out stage by stage (block-diagonal matrix,
then the column permutation of the shuffle) into the dense matrix it stands
for, and a plain LSTM / GRU runs over those. Weights are seeded random, so
a wrong shuffle or gate order cannot hide behind equal units.

The op tests are skipped when the library is not built (the package then
runs on stock TF ops); the checks done in Python, the environment switch
and the BUILD-file test always run.
"""

import ast
import importlib.util
import itertools
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf

from keras_antman import ops
from keras_antman.ops import Stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_op = pytest.mark.skipif(
    not ops.is_available(), reason="compiled op library not built"
)

# Chain structures, named after what they are. The first five are what the
# built-in schemes lower to; the last two no built-in scheme produces.
KINDS = (
    "dense",
    "low_rank",
    "blocks_shuffle",
    "mix_blocks",
    "blocks_mix_blocks",
    "blocks4_blocks2_shuffle",
    "four_stages",
    "shuffle_between",
)


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
        ops._set_min_parallel_work(16 * 1024, 512 * 1024)  # the defaults
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


def chain_matrix(stages):
    """The dense matrix of a chain, multiplied out stage by stage."""
    w = None
    for blocks, shuffle in stages:
        blocks = np.asarray(blocks, dtype=np.float64)
        d = block_diag(blocks)
        if shuffle:
            d = shuffle_columns(d, blocks.shape[0])
        w = d if w is None else w @ d
    return w


def make_chain(kind, n, m, rng, g=4, r=2, g_in=2, g_out=2, k=16):
    """Random stages of one chain structure for an n -> m product."""

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-2])).astype("f")

    if kind == "dense":
        return [Stage(w(1, n, m), False)]
    if kind == "low_rank":
        rank = n // r
        return [Stage(w(1, n, rank), False), Stage(w(1, rank, m), False)]
    if kind == "blocks_shuffle":
        return [Stage(w(g, n // g, m // g), True)]
    if kind == "mix_blocks":
        # A square mix on the smaller side: first when n < m, else after.
        c = min(n, m)
        mix, blocks = w(1, c, c), w(g, n // g, m // g)
        if n < m:
            return [Stage(mix, False), Stage(blocks, False)]
        return [Stage(blocks, False), Stage(mix, False)]
    if kind == "blocks_mix_blocks":
        rank = n // r
        return [
            Stage(w(g_in, n // g_in, rank // g_in), False),
            Stage(w(1, rank, rank), False),
            Stage(w(g_out, rank // g_out, m // g_out), False),
        ]
    if kind == "blocks4_blocks2_shuffle":
        return [
            Stage(w(4, n // 4, k // 4), False),
            Stage(w(2, k // 2, m // 2), True),
        ]
    if kind == "shuffle_between":
        # A shuffle after an intermediate stage too (Kronecker lowers so).
        return [
            Stage(w(4, n // 4, 4), True),
            Stage(w(2, 8, m // 2), True),
        ]
    if kind == "four_stages":
        return [
            Stage(w(2, n // 2, 4), False),
            Stage(w(1, 8, 12), False),
            Stage(w(4, 3, 4), False),
            Stage(w(2, 8, m // 2), True),
        ]
    raise ValueError(kind)


def test_chain_matrix_reference():
    """The reference itself, on a case small enough to write out."""
    blocks = np.arange(8, dtype="f").reshape(2, 2, 2)  # [[0,1],[2,3]], ...
    x = np.array([[1.0, 10.0, 100.0, 1000.0]])
    # Block product: [1, 10] @ [[0, 1], [2, 3]] = [20, 31] and
    # [100, 1000] @ [[4, 5], [6, 7]] = [6400, 7500]; the shuffle puts
    # output j of group i at j * 2 + i.
    np.testing.assert_array_equal(
        x @ chain_matrix([Stage(blocks, False)]), [[20, 31, 6400, 7500]]
    )
    np.testing.assert_array_equal(
        x @ chain_matrix([Stage(blocks, True)]), [[20, 6400, 31, 7500]]
    )
    mix = np.eye(4)[None, :, ::-1]  # reverses the columns
    np.testing.assert_array_equal(
        x @ chain_matrix([Stage(blocks, False), Stage(mix, False)]),
        [[7500, 6400, 31, 20]],
    )


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
    return dict(
        x=rng.standard_normal((batch, steps, features)).astype("f"),
        initial_h=(0.5 * rng.standard_normal((batch, units))).astype("f"),
        initial_c=(0.5 * rng.standard_normal((batch, units))).astype("f"),
        bias=(0.3 * rng.standard_normal(m)).astype("f"),
        input_stages=make_chain(
            in_kind, features, m, rng, **(in_params or {})
        ),
        recurrent_stages=make_chain(
            rec_kind, units, m, rng, **(rec_params or {})
        ),
    )


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
        chain_matrix(case["input_stages"]),
        chain_matrix(case["recurrent_stages"]),
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
        rec, cand = make_chain(rec_kind, units, m, rng), None
    else:
        rec = make_chain(rec_kind, units, 2 * units, rng)
        cand = make_chain(rec_kind, units, units, rng)
    return dict(
        x=rng.standard_normal((batch, steps, features)).astype("f"),
        initial_h=(0.5 * rng.standard_normal((batch, units))).astype("f"),
        bias=(0.3 * rng.standard_normal(bias_shape)).astype("f"),
        input_stages=make_chain(in_kind, features, m, rng),
        recurrent_stages=rec,
        candidate_stages=cand,
        reset_after=reset_after,
    )


def check_gru(case, go_backwards, return_sequences, num_threads=1):
    out, h = ops.structured_gru(
        **case,
        go_backwards=go_backwards,
        return_sequences=return_sequences,
        num_threads=num_threads,
    )
    cand = case["candidate_stages"]
    seq, h_ref = ref_gru(
        case["x"],
        case["initial_h"],
        case["bias"],
        chain_matrix(case["input_stages"]),
        chain_matrix(case["recurrent_stages"]),
        go_backwards,
        case["reset_after"],
        None if cand is None else chain_matrix(cand),
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
def test_lstm_every_chain_pair(in_kind, rec_kind, isa):
    ops.set_instruction_set(isa)
    ops._set_min_parallel_work(0, 0)  # run the 2-thread path on tiny shapes
    seed = KINDS.index(in_kind) * len(KINDS) + KINDS.index(rec_kind)
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
def test_gru_every_chain_pair(in_kind, rec_kind, reset_after, isa):
    ops.set_instruction_set(isa)
    ops._set_min_parallel_work(0, 0)
    seed = 100 + KINDS.index(in_kind) * len(KINDS) + KINDS.index(rec_kind)
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
@pytest.mark.parametrize("threads", [1, 2])
def test_lstm_chain_no_scheme_produces(threads):
    """Blocks g=4 without shuffle, then blocks g=2 with the shuffle, on
    both products: the group-owned last stage behind an intermediate stage
    (the recurrent shuffle's g = 2 divides units; each group owns 20 units)
    and an input shuffle reached through a column gather."""
    ops._set_min_parallel_work(0, 0)
    rng = np.random.default_rng(21)
    b, t, n, u = 2, 6, 24, 40
    case = dict(
        x=rng.standard_normal((b, t, n)).astype("f"),
        initial_h=(0.5 * rng.standard_normal((b, u))).astype("f"),
        initial_c=(0.5 * rng.standard_normal((b, u))).astype("f"),
        bias=(0.3 * rng.standard_normal(4 * u)).astype("f"),
        input_stages=[
            Stage(rng.standard_normal((4, 6, 8)).astype("f") / 3, False),
            Stage(rng.standard_normal((2, 16, 80)).astype("f") / 4, True),
        ],
        recurrent_stages=[
            Stage(rng.standard_normal((4, 10, 8)).astype("f") / 3, False),
            Stage(rng.standard_normal((2, 16, 80)).astype("f") / 4, True),
        ],
    )
    check_lstm(case, False, True, num_threads=threads)
    check_lstm(case, True, False, num_threads=threads)


@needs_op
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [2, 5])
def test_input_windows_of_long_sequences(batch, threads):
    """At batch > 1 the input product runs in windows of steps just before
    them (rnn_engine_impl.h, WindowSteps: here 32 steps, 75 steps make
    windows of 32, 32 and 11), with one and several input stages and a
    shuffle, forwards and backwards, LSTM and GRU, against NumPy."""
    for seed, in_kind in enumerate(
        ("blocks_shuffle", "blocks_mix_blocks", "shuffle_between")
    ):
        case = lstm_case(in_kind, "blocks_shuffle", seed, batch=batch,
                         steps=75)
        check_lstm(case, seed % 2 == 0, True, num_threads=threads)
        check_lstm(case, seed % 2 == 1, False, num_threads=threads)
        for reset_after in (True, False):
            case = gru_case(in_kind, "blocks_shuffle", seed, reset_after,
                            batch=batch, steps=75)
            check_gru(case, seed % 2 == 1, True, num_threads=threads)


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
                in_kind="blocks_shuffle",
                rec_kind="blocks_shuffle",
                features=16,
                units=20,
                in_params=dict(g=8),
                rec_params=dict(g=5),
            ),
        ),
        # n >= m on the input product: the mix comes after the blocks.
        (
            "mix_after_blocks",
            dict(
                in_kind="mix_blocks",
                rec_kind="mix_blocks",
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
                in_kind="blocks_shuffle",
                rec_kind="blocks_shuffle",
                units=200,
                features=40,
                batch=2,
                steps=5,
                in_params=dict(g=10),
                rec_params=dict(g=10),
            ),
        ),
        (
            "blocks_mix_blocks_10_2",
            dict(
                in_kind="blocks_mix_blocks",
                rec_kind="blocks_mix_blocks",
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
                in_kind="blocks_shuffle",
                rec_kind="blocks_shuffle",
                units=8,
                features=8,
                in_params=dict(g=8),
                rec_params=dict(g=8),
            ),
        ),
        (
            "long_sequence_batch_one",
            dict(
                in_kind="blocks_shuffle",
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
                rec_kind="blocks_shuffle",
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
                rec_kind="blocks_shuffle",
                batch=3,
                steps=30,
                units=100,
                features=300,
                rec_params=dict(g=4),
            ),
        ),
        # Blocks + shuffle with the same g on both products: the input
        # product's columns reach the gate slots as 16 runs of 11 (moved a
        # vector at a time, with a tail); short runs take the
        # column-by-column gather (the cases above).
        (
            "gather_runs",
            dict(
                in_kind="blocks_shuffle",
                rec_kind="blocks_shuffle",
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
    from keras_antman._keras import keras

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
        [Stage(kernel[None], False)],
        [(rec[None], False)],  # a plain pair works too
        go_backwards=True,
        return_sequences=True,
    )
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@needs_op
@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_matches_keras_layer(reset_after):
    from keras_antman._keras import keras

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
    if reset_after:
        rec_stages, cand_stages = [Stage(rec[None])], None
    else:
        rec_stages = [Stage(rec[None, :, : 2 * u])]
        cand_stages = [Stage(rec[None, :, 2 * u :])]
    got = ops.structured_gru(
        x,
        np.zeros((b, u), "f"),
        bias,
        [Stage(kernel[None])],
        rec_stages,
        cand_stages,
        reset_after=reset_after,
        return_sequences=True,
    )
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@needs_op
@pytest.mark.parametrize("return_sequences", [True, False])
def test_empty_batch_and_no_steps(return_sequences):
    case = lstm_case("blocks_shuffle", "dense", seed=1, batch=0)
    out, h, c = ops.structured_lstm(**case, return_sequences=return_sequences)
    assert out.shape == ((0, 7, 20) if return_sequences else (0, 20))
    assert h.shape == c.shape == (0, 20)
    case = lstm_case("dense", "blocks_shuffle", seed=1, steps=0)
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
    case = lstm_case("blocks_shuffle", "blocks4_blocks2_shuffle", seed=5)
    rest = {k: v for k, v in case.items() if k != "x"}
    fn = tf.function(
        lambda x: ops.structured_lstm(x, **rest, return_sequences=True)
    )
    out = fn(tf.constant(case["x"]))
    assert out[0].shape == (3, 7, 20)
    want = check_lstm(case, go_backwards=False, return_sequences=True)
    np.testing.assert_allclose(out[0], want[0], rtol=1e-6, atol=1e-7)
    ops.set_num_threads(2)
    assert ops.get_num_threads() == 2
    np.testing.assert_allclose(
        fn(tf.constant(case["x"]))[0], out[0], rtol=1e-6, atol=1e-7
    )
    for bad in (0, 2**16 + 1, 2**32, 2**32 + 2):  # ctypes would wrap these
        with pytest.raises(ValueError, match=r"must be in \[1, 65536\]"):
            ops.set_num_threads(bad)
    assert ops.get_num_threads() == 2
    for bad in (2.0, True, "2"):
        with pytest.raises(ValueError, match="must be a positive integer"):
            ops.set_num_threads(bad)


@needs_op
@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_in_tf_function(reset_after):
    """Graph mode, including the empty candidate list with reset_after."""
    case = gru_case("blocks_shuffle", "four_stages", 12, reset_after)
    rest = {k: v for k, v in case.items() if k != "x"}
    fn = tf.function(
        lambda x: ops.structured_gru(x, **rest, return_sequences=True)
    )
    got = fn(tf.constant(case["x"]))
    want = check_gru(case, go_backwards=False, return_sequences=True)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-7)


@needs_op
def test_recurrent_blocks_not_dividing_units_without_shuffle():
    """g = 8 does not divide 20 units: fine without a shuffle (the last
    stage is split by unit columns), an error with one (below)."""
    ops._set_min_parallel_work(0, 0)
    case = lstm_case("dense", "dense", seed=8)
    rng = np.random.default_rng(8)
    case["recurrent_stages"] = [
        Stage(rng.standard_normal((1, 20, 16)).astype("f") / 4, False),
        Stage(rng.standard_normal((8, 2, 10)).astype("f"), False),
    ]
    check_lstm(case, False, True, num_threads=1)
    check_lstm(case, True, True, num_threads=2)


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


# The raw ops' sparse-term inputs, empty: no term (lists of 0 tensors).
NO_SPARSE = {f"{p}_sparse_{part}": [] for p in ("input", "recurrent")
             for part in ("row_ptr", "col_idx", "values")}


def lstm_raw(**over):
    """Calls the raw op (no Python-side checks) with overrides."""
    case = lstm_case("blocks_shuffle", "low_rank", seed=2)
    args = dict(
        x=case["x"],
        initial_h=case["initial_h"],
        initial_c=case["initial_c"],
        bias=case["bias"],
        input_stages=[s.blocks for s in case["input_stages"]],
        recurrent_stages=[s.blocks for s in case["recurrent_stages"]],
        input_shuffle=[True],
        recurrent_shuffle=[False, False],
        **NO_SPARSE,
    )
    args.update(over)
    return ops.load().keras_antman_structured_lstm(**args)


def f(*shape):
    return np.zeros(shape, "f")


BAD_LSTM = [
    (dict(x=f(3, 12)), r"x must be a rank-3 tensor .* received shape \[3,12\]"),
    (
        dict(x=f(3, 7, 0), input_stages=[f(4, 0, 20)]),
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
    # Stage ranks.
    (
        dict(input_stages=[f(12, 80)]),
        r"input_stages\[0\] must be a rank-3 array \[g, a, b\] \(a dense "
        r"matrix is \[1, n, m\]\); received shape \[12,80\]",
    ),
    (
        dict(recurrent_stages=[f(1, 20, 10), f(1, 1, 10, 80)]),
        r"recurrent_stages\[1\] must be a rank-3 array",
    ),
    # Chain dims.
    (
        dict(input_stages=[f(5, 2, 16)]),
        r"input_stages\[0\] must have shape \[g, a, b\] with g \* a = 12 "
        r"\(the input size of the input product, features -> 4 \* units\); "
        r"received \[5,2,16\]",
    ),
    (
        dict(input_stages=[f(4, 3, 21)]),
        r"input_stages\[0\] must have shape \[g, a, b\] with g \* b = 80 "
        r"\(the output size of the input product, features -> 4 \* units\); "
        r"received \[4,3,21\]",
    ),
    (
        dict(recurrent_stages=[f(1, 20, 64), f(2, 16, 8)]),
        r"recurrent_stages\[1\] must have shape \[g, a, b\] with g \* a = 64 "
        r"\(the output of recurrent_stages\[0\]\); received \[2,16,8\]",
    ),
    (
        dict(recurrent_stages=[f(1, 20, 10), f(1, 10, 60)]),
        r"recurrent_stages\[1\] must have shape \[g, a, b\] with g \* b = 80 "
        r"\(the output size of the recurrent product, units -> 4 \* units\)",
    ),
    (
        dict(recurrent_stages=[f(0, 20, 10), f(1, 10, 80)]),
        r"recurrent_stages\[0\] must have shape \[g, a, b\] with g, a, b >= 1; "
        r"received \[0,20,10\]",
    ),
    (
        dict(recurrent_stages=[f(1, 20, 0), f(1, 0, 80)]),
        r"recurrent_stages\[0\] must have shape \[g, a, b\] with g, a, b >= 1",
    ),
    # Shuffle flags.
    (
        dict(
            recurrent_stages=[f(1, 20, 16), f(8, 2, 10)],
            recurrent_shuffle=[False, True],
        ),
        r"recurrent_stages\[1\] ends the chain with a shuffle "
        r"\(recurrent_shuffle\[1\] = true\), so its groups g = 8 must divide "
        r"units = 20: each group then owns every gate of units / g units; "
        r"received \[8,2,10\]",
    ),
    (
        dict(recurrent_shuffle=[False]),
        r"recurrent_shuffle must hold one flag per stage of recurrent_stages "
        r"\(2\); received 1 flags \[false\]",
    ),
    (
        dict(input_shuffle=[True, True]),
        r"input_shuffle must hold one flag per stage of input_stages \(1\); "
        r"received 2 flags",
    ),
    # Number of stages.
    (
        dict(
            recurrent_stages=[f(1, 20, 20)] * 4 + [f(1, 20, 80)],
            recurrent_shuffle=[False] * 5,
        ),
        r"recurrent_stages must hold 1 to 4 stages \(kMaxStages\) for the "
        r"recurrent product, units -> 4 \* units; received 5",
    ),
    (
        dict(input_stages=[], input_shuffle=[]),
        "num_input_stages.* must be at least minimum 1",
    ),
    # Attributes.
    (dict(num_threads=-1), r"num_threads must be >= 0 .*received -1"),
    # dtypes.
    (
        dict(x=tf.zeros((3, 7, 12), tf.float64)),
        "expected to be a float tensor but is a double tensor",
    ),
    (
        dict(bias=tf.zeros((80,), tf.int32)),
        "expected to be a float tensor but is a int32 tensor",
    ),
    (
        dict(input_stages=[tf.zeros((4, 3, 20), tf.float64)]),
        "expected to be a float tensor but is a double tensor",
    ),
]


@needs_op
@pytest.mark.parametrize("over,match", BAD_LSTM)
def test_lstm_bad_input(over, match):
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        lstm_raw(**over)


@needs_op
def test_lstm_raw_base_case_runs():
    """The base of the bad-input cases is itself valid, so each case fails
    for its own override only."""
    out, h, c = lstm_raw()
    assert h.shape == c.shape == (3, 20)


def gru_raw(reset_after, **over):
    case = gru_case("dense", "dense", seed=3, reset_after=reset_after)
    cand = case["candidate_stages"] or []
    args = dict(
        x=case["x"],
        initial_h=case["initial_h"],
        bias=case["bias"],
        input_stages=[s.blocks for s in case["input_stages"]],
        recurrent_stages=[s.blocks for s in case["recurrent_stages"]],
        candidate_stages=[s.blocks for s in cand],
        input_shuffle=[False],
        recurrent_shuffle=[False],
        candidate_shuffle=[False] * len(cand),
        reset_after=reset_after,
        **NO_SPARSE,
        candidate_sparse_row_ptr=[],
        candidate_sparse_col_idx=[],
        candidate_sparse_values=[],
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
        True,
        dict(candidate_stages=[f(1, 20, 20)], candidate_shuffle=[False]),
        r"candidate_stages must be empty with reset_after=True \(then "
        r"recurrent_stages produce all three gates, units -> 3 \* units\); "
        r"received 1 stages",
    ),
    (
        True,
        dict(candidate_shuffle=[True]),
        r"candidate_shuffle must be empty when candidate_stages is; "
        r"received \[true\]",
    ),
    (
        False,
        dict(candidate_stages=[], candidate_shuffle=[]),
        r"candidate_stages must hold the candidate product B \(units -> "
        r"units, applied to r \* h\) with reset_after=False.*received none",
    ),
    (
        False,
        dict(candidate_shuffle=[False, False]),
        r"candidate_shuffle must hold one flag per stage of candidate_stages "
        r"\(1\); received 2 flags",
    ),
    (
        False,
        dict(recurrent_stages=[f(1, 20, 60)]),
        r"recurrent_stages\[0\] must have shape \[g, a, b\] with g \* b = 40 "
        r"\(the output size of the recurrent product A, units -> 2 \* units "
        r"\(gates z and r\)\); received \[1,20,60\]",
    ),
    (
        False,
        dict(candidate_stages=[f(1, 20, 40)]),
        r"candidate_stages\[0\] must have shape \[g, a, b\] with g \* b = 20 "
        r"\(the output size of the candidate product B, units -> units "
        r"\(applied to r \* h\)\); received \[1,20,40\]",
    ),
    (
        True,
        dict(recurrent_stages=[f(1, 20, 80)]),
        r"with g \* b = 60 \(the output size of the recurrent product, "
        r"units -> 3 \* units\)",
    ),
    (True, dict(num_threads=-3), "num_threads must be >= 0"),
    (True, dict(initial_h=f(3, 20, 2)), "initial_h must have shape"),
]


@needs_op
@pytest.mark.parametrize("reset_after,over,match", BAD_GRU)
def test_gru_bad_input(reset_after, over, match):
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        gru_raw(reset_after, **over)


@needs_op
@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_raw_base_case_runs(reset_after):
    out, h = gru_raw(reset_after)
    assert h.shape == (3, 20)


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
        ops.load().keras_antman_block_diag_mat_mul(
            x=f(2, 4), blocks=f(2, 2, 3), num_threads=-1
        )


@needs_op
def test_graph_mode_shape_errors():
    """The shape functions reject what graph construction can know."""
    case = lstm_case("dense", "dense", seed=1)
    rest = {k: v for k, v in case.items() if k != "x"}

    @tf.function
    def run(x):
        return ops.structured_lstm(x, **rest)

    with pytest.raises(ValueError, match="x: Shape must be rank 3"):
        run.get_concrete_function(tf.TensorSpec([3, 12]))
    # The batch comes from initial_h when x leaves it open.
    spec = run.get_concrete_function(tf.TensorSpec([None, None, 12]))
    assert spec.structured_outputs[0].shape.as_list() == [3, 20]

    def raw(stages_spec, **over):
        """Traces lstm_raw with the recurrent stages as graph inputs."""

        @tf.function
        def trace(*stages):
            return lstm_raw(recurrent_stages=list(stages), **over)

        return trace.get_concrete_function(*stages_spec)

    spec = [tf.TensorSpec([1, 20, 64]), tf.TensorSpec([2, 16, 8])]
    with pytest.raises(
        ValueError,
        match=r"recurrent_stages\[1\] must have shape \[g, a, b\] with "
        r"g \* a = 64 \(the output of recurrent_stages\[0\]\); "
        r"received \[2,16,8\]",
    ):
        raw(spec)
    with pytest.raises(ValueError, match=r"recurrent_stages\[1\] must be a "):
        raw([tf.TensorSpec([1, 20, 10]), tf.TensorSpec([10, 80])])
    with pytest.raises(ValueError, match=r"recurrent_shuffle must hold one "
                       r"flag per stage"):
        raw(
            [tf.TensorSpec([1, 20, 10]), tf.TensorSpec([1, 10, 80])],
            recurrent_shuffle=[True, False, False],
        )
    # Unknown dims are left to run time.
    raw([tf.TensorSpec([None, 20, None]), tf.TensorSpec([None, None, 80])])
    raw([tf.TensorSpec(None), tf.TensorSpec([1, 10, 80])])


# -- checks in Python, before the op -----------------------------------------


def lstm_args(**over):
    case = lstm_case("dense", "low_rank", seed=6)
    case.update(over)
    return case


BAD_PY = [
    (
        dict(input_stages=None),
        TypeError,
        r"`input_stages` must be a list of keras_antman.ops.Stage\(blocks, "
        r"shuffle\) \(or \(blocks, shuffle\) pairs\), one per stage of the "
        r"chain. Received: None of type NoneType",
    ),
    (
        dict(recurrent_stages=f(1, 20, 80)),
        TypeError,
        r"`recurrent_stages` must be a list .* Received: a ndarray of shape "
        r"\(1, 20, 80\)",
    ),
    (
        dict(input_stages=Stage(f(1, 12, 80), False)),
        TypeError,
        r"received a single Stage. Wrap it in a list: input_stages=\[stage\]",
    ),
    (
        dict(input_stages=[f(1, 12, 80)]),
        TypeError,
        r"input_stages\[0\] is a ndarray of shape \(1, 12, 80\)",
    ),
    (
        dict(input_stages=[(f(1, 12, 80), 1)]),
        TypeError,
        r"The shuffle flag of `input_stages\[0\]` must be a bool. "
        r"Received: 1 of type int",
    ),
    (dict(input_stages="dense"), TypeError, "`input_stages` must be a list"),
    (dict(input_stages=[]), ValueError, "received an empty list"),
    (
        dict(num_threads=1.5),
        TypeError,
        r"`num_threads` must be None or an integer >= 0 .* Received: "
        r"num_threads=1.5 of type float",
    ),
    (dict(num_threads=True), TypeError, "of type bool"),
    (
        dict(num_threads=-1),
        ValueError,
        r"`num_threads` must be None or an integer in \[0, 65536\] .*"
        r"Received: num_threads=-1",
    ),
    (
        dict(num_threads=2**63),
        ValueError,
        r"integer in \[0, 65536\] .*Received: num_threads=9223372036854775808",
    ),
]


@pytest.mark.parametrize("over,error,match", BAD_PY)
def test_wrapper_checks_in_python(over, error, match, monkeypatch):
    # Raised before the library is needed: works without it.
    monkeypatch.setattr(ops, "load", lambda: pytest.fail("load() called"))
    with pytest.raises(error, match=match):
        ops.structured_lstm(**lstm_args(**over))


def test_gru_wrapper_checks_candidate_stages(monkeypatch):
    monkeypatch.setattr(ops, "load", lambda: pytest.fail("load() called"))
    case = gru_case("dense", "dense", seed=9, reset_after=True)
    case["candidate_stages"] = [Stage(f(1, 20, 20))]
    with pytest.raises(
        ValueError,
        match=r"`candidate_stages` must be None or empty with "
        r"reset_after=True",
    ):
        ops.structured_gru(**case)
    case = gru_case("dense", "dense", seed=9, reset_after=False)
    case["candidate_stages"] = None
    with pytest.raises(
        ValueError,
        match=r"`candidate_stages` is required with reset_after=False",
    ):
        ops.structured_gru(**case)
    case["candidate_stages"] = [f(1, 20, 20)]
    with pytest.raises(TypeError, match=r"candidate_stages\[0\] is a"):
        ops.structured_gru(**case)
    with pytest.raises(TypeError, match="`num_threads` must be None"):
        ops.block_diag_matmul(f(2, 4), f(2, 2, 3), num_threads=2.0)


@needs_op
def test_wrapper_accepts_numpy_flags_and_ints():
    stages = lstm_case("blocks_shuffle", "dense", seed=6)["input_stages"]
    case = lstm_args(
        input_stages=[(s.blocks, np.bool_(s.shuffle)) for s in stages]
    )
    check_lstm(case, False, True, num_threads=np.int64(2))
    check_lstm(case, False, True, num_threads=None)


# -- the environment switch ---------------------------------------------------


def _fresh_state():
    return {"module": None, "cdll": None, "error": None, "warned": False}


def test_portable_env_turns_the_compiled_ops_off(monkeypatch, tmp_path):
    # A library that exists but does not fit: without the switch,
    # is_available warns once.
    stale = tmp_path / "_antman_ops.so"
    stale.write_bytes(b"")

    def check_build():
        raise ops.CompiledOpsUnavailableError("built for another TF")

    monkeypatch.setattr(ops, "library_path", lambda: str(stale))
    monkeypatch.setattr(ops, "_check_build", check_build)

    monkeypatch.setattr(ops, "_state", _fresh_state())
    monkeypatch.delenv("KERAS_ANTMAN_PORTABLE", raising=False)
    with pytest.warns(RuntimeWarning, match="built for another TF"):
        assert ops.is_available() is False

    for value in ("1", "true", "ON"):
        monkeypatch.setattr(ops, "_state", _fresh_state())
        monkeypatch.setenv("KERAS_ANTMAN_PORTABLE", value)
        assert ops.portable_forced()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning would fail here
            assert ops.is_available() is False
        assert not ops._state["warned"]
        with pytest.raises(
            ops.CompiledOpsUnavailableError,
            match=f"disabled by KERAS_ANTMAN_PORTABLE={value} in the "
            "environment",
        ):
            ops.load()
        with pytest.raises(ops.CompiledOpsUnavailableError, match="disabled"):
            ops.instruction_set()
        # The cached load error stays that of the library, not the switch.
        assert ops._state["error"] is None

    monkeypatch.setenv("KERAS_ANTMAN_PORTABLE", "0")
    assert not ops.portable_forced()
    monkeypatch.setattr(ops, "_state", _fresh_state())
    with pytest.raises(ops.CompiledOpsUnavailableError, match="another TF"):
        ops.load()


@needs_op
def test_portable_env_applies_after_loading(monkeypatch):
    """Read on every load: a loaded library is refused too, and unsetting
    the switch brings it back."""
    assert ops.is_available()
    monkeypatch.setenv("KERAS_ANTMAN_PORTABLE", "1")
    assert ops.is_available() is False
    with pytest.raises(ops.CompiledOpsUnavailableError, match="disabled"):
        ops.structured_lstm(**lstm_args())
    monkeypatch.delenv("KERAS_ANTMAN_PORTABLE")
    assert ops.is_available()
    check_lstm(lstm_args(), False, True)


@needs_op
def test_threads_used_follows_the_per_step_threshold():
    ops.set_num_threads(2)
    cores = os.cpu_count()
    assert ops.threads_used(16 * 1024 - 1) == 1  # the default threshold
    # A size class not measured yet: the count asked (capped at the cores).
    assert ops.threads_used(3 * 2**40) == min(2, cores)
    assert ops.threads_used(3 * 2**40, num_threads=3) == min(3, cores)
    assert ops.threads_used(3 * 2**40, num_threads=1000) == cores
    ops._set_min_parallel_work(per_step=1000)
    assert ops.threads_used(999) == 1 and ops.threads_used(1000) == 2


@needs_op
@pytest.mark.skipif(os.cpu_count() < 2, reason="needs 2 cores")
def test_threads_by_measurement_keep_results():
    """A measured class runs 4 calls on one thread, 4 on two, then keeps
    one count; each exact step size is its own class. Every call matches
    the reference."""
    ops.set_num_threads(2)
    case = lstm_case("blocks_shuffle", "blocks_shuffle", 7, batch=2,
                     features=64, units=128)
    step_macs = 2 * 128 * 4 * 128 // 4  # g = 4 blocks of 32 x 128
    assert ops.threads_used(step_macs) == 2  # not measured yet
    first = check_lstm(case, False, True, num_threads=None)
    for _ in range(9):
        again = check_lstm(case, False, True, num_threads=None)
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)
    assert ops.threads_used(step_macs) in (1, 2)
    # The neighbouring size is another class, still unmeasured.
    assert ops.threads_used(step_macs + 1) == 2


# -- the thread choice, replayed with injected timings (no clock) ---------

ONE_NS = 19_000  # ns per step on one thread (d = 800, LGP-Shuffle g = 10)


def replay(many, one=ONE_NS, calls=400, asked=2, **at):
    """The counts a fresh class runs `calls` calls on, one thread taking
    `one` ns per step and `asked` threads `many`; `at` overrides single
    calls: one_<i> / many_<i> = ns."""
    ns_one, ns_many = [one] * calls, [many] * calls
    for key, ns in at.items():
        arm, i = key.split("_")
        (ns_one if arm == "one" else ns_many)[int(i)] = ns
    return ops._replay_thread_choice(ns_one, ns_many, asked)


@needs_op
def test_thread_choice_keeps_two_threads_that_pay():
    # The first call of each count pays for cold caches and a sleeping
    # team: not counted, so two threads win on their later calls.
    threads = replay(9_000, one_0=60_000, many_4=80_000)
    assert threads[:8] == [1] * 4 + [2] * 4
    # Measured again after 25 calls, then after 50, 100, 200, ...
    assert threads[8:33] == [2] * 25
    assert threads[33:41] == [1] * 4 + [2] * 4
    assert threads[41:91] == [2] * 50
    assert threads[91:95] == [1] * 4
    assert threads.count(1) == 4 * 4  # measurements at 0, 33, 91, 199
    assert replay(9_000, asked=3)[4:12] == [3] * 8


@needs_op
def test_thread_choice_keeps_one_thread_unless_clearly_faster():
    # Two threads 10% slower, or only 3% faster (within the 5% margin):
    # one thread, apart from the measurements' 4 calls on two.
    for many in (1.1 * ONE_NS, 0.97 * ONE_NS):
        threads = replay(many, calls=2000)
        starts = [0, 33, 91, 199, 407, 815, 1223, 1631]  # at most 400
        for i, t in enumerate(threads):
            in_probe = any(s + 4 <= i < s + 8 for s in starts)
            assert t == (2 if in_probe else 1), (many, i)


@needs_op
def test_thread_choice_median_ignores_one_slow_call():
    # One slow call among the three counted on two threads: the median.
    assert replay(9_000, many_5=10**6)[8:33] == [2] * 25
    # Two of three slow: that measurement keeps one thread.
    assert replay(9_000, many_5=10**6, many_6=10**6)[8:33] == [1] * 25


@needs_op
def test_thread_choice_recovers_from_a_loaded_measurement():
    """The d = 800 defect: a measurement during a moment of load chose one
    thread; it is measured again after 25 calls, not 200."""
    loaded = {f"many_{i}": 40_000 for i in range(4, 8)}
    threads = replay(9_000, **loaded)
    assert threads[8:33] == [1] * 25
    assert threads[33:41] == [1] * 4 + [2] * 4
    assert threads[41:66] == [2] * 25


@needs_op
def test_thread_choice_single_slow_call_is_not_load():
    base = replay(9_000)
    assert replay(9_000, many_20=10**6, many_50=10**6) == base
    # Two slow calls in a row, then a normal one: still no new measurement.
    assert replay(9_000, many_20=10**6, many_21=10**6) == base


@needs_op
def test_thread_choice_measures_again_when_two_threads_stay_slow():
    # From call 100 other work holds a core: two threads take 3x one
    # thread's time. After 3 such calls the class measures again and
    # keeps one thread.
    ns_one, ns_many = [ONE_NS] * 300, [9_000] * 100 + [3 * ONE_NS] * 200
    threads = ops._replay_thread_choice(ns_one, ns_many)
    assert threads[95:103] == [2] * 8  # measured at 91..98
    assert threads[103:111] == [1] * 4 + [2] * 4
    assert threads[111:136] == [1] * 25


@needs_op
def test_replay_thread_choice_checks_lengths():
    with pytest.raises(ValueError, match="same length; received 2 and 1"):
        ops._replay_thread_choice([1, 2], [1])


def test_set_num_threads_validates():
    with pytest.raises(ValueError, match="positive integer"):
        ops.set_num_threads(1.5)
    with pytest.raises(ValueError, match=r"must be in \[1, 65536\]"):
        ops.set_num_threads(-2)


_MANY_THREADS = """
import numpy as np
from keras_antman import ops
ops._set_min_parallel_work(0, 0)
x = np.ones((1, 8), "float32")
blocks = np.ones((2, 4, 1000000), "float32")  # 1 row: a small scratch
y = ops.block_diag_matmul(x, blocks, shuffle=True, num_threads=1000)
assert y.shape == (1, 2000000)
h = np.zeros((1, 8), "float32")
ops.structured_lstm(np.ones((1, 3, 8), "float32"), h, h,
                    np.zeros(32, "float32"),
                    [ops.Stage(np.ones((1, 8, 32), "float32"))],
                    [ops.Stage(np.ones((1, 8, 32), "float32"))],
                    num_threads=1000)
threads = [line for line in open("/proc/self/status")
           if line.startswith("Threads:")]
print(int(threads[0].split()[1]))
"""


@needs_op
def test_huge_thread_counts_are_capped_at_the_cores():
    proc = subprocess.run([sys.executable, "-c", _MANY_THREADS],
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    # TensorFlow's own pools plus at most one OpenMP team of `cores`.
    assert int(proc.stdout.split()[-1]) < 200


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


# -- concurrency --------------------------------------------------------------


@needs_op
@pytest.mark.parametrize("callers,num_threads", [(8, 1), (2, 2)])
def test_concurrent_calls_equal_serial_calls_bit_for_bit(callers,
                                                         num_threads):
    import concurrent.futures

    ops._set_min_parallel_work(0, 0)  # the OpenMP team runs at tiny sizes
    cases = [
        lstm_case("blocks_shuffle", "blocks4_blocks2_shuffle", seed=s,
                  batch=2, steps=30, units=40)
        for s in range(callers)
    ]

    def run(case):
        out, h, c = ops.structured_lstm(
            **case, return_sequences=True, num_threads=num_threads)
        return out.numpy(), h.numpy(), c.numpy()

    serial = [run(case) for case in cases]
    with concurrent.futures.ThreadPoolExecutor(callers) as pool:
        for _ in range(3):
            together = list(pool.map(run, cases))
            for got, want in zip(together, serial, strict=True):
                for a, b in zip(got, want, strict=True):
                    np.testing.assert_array_equal(a, b)
    # The cases differ, so a mixed-up buffer would show.
    assert not np.array_equal(serial[0][0], serial[1][0])

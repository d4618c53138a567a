"""The op's cache of slot layouts (antman_kernels.cc, LayoutCache).

A kernel (one per set of op attributes) keeps the slot layout of the
shapes it has run: which input-product column each slot gathers and which
unit each state slot holds. It is keyed by shapes and group counts only;
the bias is put in slot order every call. These tests alternate shapes,
batch sizes (1 takes the task-major layout), step counts, group counts,
biases and thread counts on one kernel and compare every result with the
NumPy reference; the build counter shows that a repeated shape skips the
build and a new one does not.
"""

import numpy as np
import pytest

from keras_antman import ops
from keras_antman.ops import Stage

import reference

pytestmark = pytest.mark.skipif(
    not ops.is_available(), reason="compiled op library not built"
)

TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(autouse=True)
def _restore_settings():
    yield
    if ops.is_available():
        ops._set_min_parallel_work(16 * 1024, 512 * 1024)  # the defaults
        ops.set_num_threads(1)


def builds():
    ops.load()
    return ops._state["cdll"].keras_antman_layout_builds()


def lgp(rng, g, n, m):
    """A shuffled block-diagonal stage and its dense matrix."""
    b = (rng.standard_normal((g, n // g, m // g)) / np.sqrt(n // g))
    b = b.astype("f")
    return Stage(b, True), reference.shuffled(reference.block_diag(b), g)


def lstm_call(seed, batch, steps, features, units, g):
    """The op's (out, h, c) with 0 threads (the process-wide setting) and
    the reference's, random initial states and bias."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, steps, features)).astype("f")
    h0, c0 = (0.5 * rng.standard_normal((2, batch, units))).astype("f")
    bias = (0.3 * rng.standard_normal(4 * units)).astype("f")
    s_in, k_in = lgp(rng, g, features, 4 * units)
    s_rec, k_rec = lgp(rng, g, units, 4 * units)
    got = ops.structured_lstm(x, h0, c0, bias, [s_in], [s_rec],
                              return_sequences=True, num_threads=0)
    seq, h, c = reference.lstm(x.astype(np.float64), k_in, k_rec, bias,
                               h0=h0, c0=c0)
    return [g.numpy() for g in got], (seq, h, c)


# (batch, steps, features, units, g): batch 1 and not, two unit counts and
# two group counts at 64 units, so five layouts.
SHAPES = [(1, 5, 48, 64, 4), (3, 4, 48, 64, 4), (1, 2, 24, 32, 4),
          (2, 6, 24, 32, 4), (1, 3, 48, 64, 2)]


def test_lstm_alternating_shapes_and_threads():
    ops._set_min_parallel_work(0, 0)  # 2 threads run even on small shapes
    before = None
    for rnd in range(3):
        if rnd == 1:
            before = builds()
        for i, shape in enumerate(SHAPES):
            ops.set_num_threads(1 + (i + rnd) % 2)
            # A new bias, states and weights every call (the seed).
            got, want = lstm_call(10 * rnd + i, *shape)
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, **TOL)
    # Rounds 2 and 3 found every layout that round 1 built.
    assert builds() == before


def test_lstm_new_shape_builds_once():
    shape = (1, 3, 36, 72, 6)  # used by no other test
    before = builds()
    for seed in range(3):
        got, want = lstm_call(seed, *shape)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, **TOL)
    assert builds() == before + 1


@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_alternating_shapes_and_biases(reset_after):
    """The GRU's layouts: with reset_after the recurrent bias is in slot
    order too; without, the candidate product's groups set its gate."""
    g = 4
    calls = []
    for rnd in range(2):
        for i, (batch, steps, features, units) in enumerate(
                [(1, 4, 24, 32), (2, 3, 24, 32), (1, 5, 48, 64)]):
            rng = np.random.default_rng(100 * rnd + i)
            x = rng.standard_normal((batch, steps, features)).astype("f")
            bias_shape = (2, 3 * units) if reset_after else (3 * units,)
            bias = (0.3 * rng.standard_normal(bias_shape)).astype("f")
            s_in, k_in = lgp(rng, g, features, 3 * units)
            if reset_after:
                s_rec, k_rec = lgp(rng, g, units, 3 * units)
                cand = None
            else:
                s_rec, k_zr = lgp(rng, g, units, 2 * units)
                s_cand, k_h = lgp(rng, g, units, units)
                cand, k_rec = [s_cand], np.concatenate([k_zr, k_h], 1)
            h0 = np.zeros((batch, units), "f")
            out, h = ops.structured_gru(
                x, h0, bias, [s_in], [s_rec], cand, reset_after=reset_after,
                return_sequences=True, num_threads=1)
            seq, h_ref = reference.gru(x.astype(np.float64), k_in, k_rec,
                                       bias, reset_after=reset_after)
            np.testing.assert_allclose(out, seq, **TOL)
            np.testing.assert_allclose(h, h_ref, **TOL)
            calls.append(builds())
    assert calls[3:] == [calls[2]] * 3  # round 2 built nothing

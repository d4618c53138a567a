"""The op's cache of packed weights (antman_kernels.cc, PackedWeights).

The engine reads the blocks of a one-stage block-diagonal input product
and of the batch-1 LSTM group step from packed copies that the op keeps
across calls. A copy may be reused only for the very same weights: these
tests change the weights every way a caller can (new tensors, a variable
assigned in place, a NumPy array written in place, another instruction
set) and compare each result with the NumPy reference; the pack counter
shows when the cache was hit.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_antman import ops
from keras_antman.ops import Stage

import reference

pytestmark = pytest.mark.skipif(
    not ops.is_available(), reason="compiled op library not built"
)

G, UNITS, FEATURES, STEPS = 4, 64, 48, 6
TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture(autouse=True)
def _restore_isa():
    yield
    if ops.is_available():
        ops.set_instruction_set(None)


def packs():
    ops.load()
    return ops._state["cdll"].keras_antman_weight_packs()


def blocks(rng, a, b):
    return (rng.standard_normal((G, a, b)) / np.sqrt(a)).astype("f")


def weights(seed):
    """x, input blocks, recurrent blocks and bias of an LGP-Shuffle LSTM."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, STEPS, FEATURES)).astype("f")
    k_in = blocks(rng, FEATURES // G, 4 * UNITS // G)
    k_rec = blocks(rng, UNITS // G, 4 * UNITS // G)
    bias = (0.3 * rng.standard_normal(4 * UNITS)).astype("f")
    return x, k_in, k_rec, bias


def expected(x, k_in, k_rec, bias):
    dense = [reference.shuffled(reference.block_diag(np.asarray(k)), G)
             for k in (k_in, k_rec)]
    return reference.lstm(x.astype(np.float64), *dense, bias)[1]


def final_h(x, k_in, k_rec, bias, threads=1):
    zeros = np.zeros((1, UNITS), "f")
    return ops.structured_lstm(x, zeros, zeros, bias, [Stage(k_in, True)],
                               [Stage(k_rec, True)],
                               num_threads=threads)[1].numpy()


def owned(array):
    """A tensor in memory TensorFlow allocated (an op's output)."""
    return tf.constant(array) + 0.0


def test_same_tensors_reuse_the_packing_new_ones_do_not():
    x, k_in, k_rec, bias = weights(0)
    t_in, t_rec = owned(k_in), owned(k_rec)
    before = packs()
    for _ in range(3):
        np.testing.assert_allclose(final_h(x, t_in, t_rec, bias),
                                   expected(x, k_in, k_rec, bias), **TOL)
    first = packs() - before  # once: the input, and wide recurrent blocks
    assert first >= 1
    _, k_in2, k_rec2, _ = weights(1)
    np.testing.assert_allclose(
        final_h(x, owned(k_in2), owned(k_rec2), bias),
        expected(x, k_in2, k_rec2, bias), **TOL)
    assert packs() - before == 2 * first


def test_variable_assigned_in_place():
    x, k_in, k_rec, bias = weights(2)
    v_in, v_rec = tf.Variable(k_in), tf.Variable(k_rec)
    np.testing.assert_allclose(final_h(x, v_in, v_rec, bias),
                               expected(x, k_in, k_rec, bias), **TOL)
    _, k_in2, k_rec2, _ = weights(3)
    v_rec.assign(k_rec2)
    np.testing.assert_allclose(final_h(x, v_in, v_rec, bias),
                               expected(x, k_in, k_rec2, bias), **TOL)
    v_in.assign_add(k_in2)
    np.testing.assert_allclose(final_h(x, v_in, v_rec, bias),
                               expected(x, k_in + k_in2, k_rec2, bias), **TOL)


def test_numpy_arrays_written_in_place():
    x, k_in, k_rec, bias = weights(4)
    np.testing.assert_allclose(final_h(x, k_in, k_rec, bias),
                               expected(x, k_in, k_rec, bias), **TOL)
    _, k_in2, k_rec2, _ = weights(5)
    k_in[...] = k_in2
    k_rec[...] = k_rec2
    np.testing.assert_allclose(final_h(x, k_in, k_rec, bias),
                               expected(x, k_in2, k_rec2, bias), **TOL)


@pytest.mark.parametrize("threads", [1, 2])
def test_every_instruction_set_on_the_same_tensors(threads):
    """Each instruction set packs its own panel widths: alternating sets on
    the same tensors must not read another set's packing."""
    x, k_in, k_rec, bias = weights(6)
    t_in, t_rec = owned(k_in), owned(k_rec)
    want = expected(x, k_in, k_rec, bias)
    for isa in ops.supported_instruction_sets() * 2:
        ops.set_instruction_set(isa)
        np.testing.assert_allclose(final_h(x, t_in, t_rec, bias, threads),
                                   want, **TOL)


@pytest.mark.parametrize("batch", [1, 3])
def test_packed_input_chain_of_three_stages(batch):
    """A LowRank-LGP-like input chain (blocks, a dense matrix, blocks) has
    every stage packed; each instruction set and thread count against the
    reference. The first call packs the 3 stages (each thread count is an
    op attribute, so a kernel and cache of its own), and at batch 1 the
    recurrent stage v where its 256 columns span several batch-1 panels
    (generic and AVX2: 64 and 32 vectors, 12 a panel; AVX-512: 16 of 24,
    one panel, read in place); the second call packs nothing."""
    rng = np.random.default_rng(7 + batch)
    chain = [blocks(rng, FEATURES // G, 16), weights_dense(rng, 64, 64),
             blocks(rng, 16, 4 * UNITS // G)]
    dense_in = (reference.block_diag(chain[0]) @ chain[1][0]
                @ reference.block_diag(chain[2]))
    u, v = weights_dense(rng, UNITS, 16), weights_dense(rng, 16, 4 * UNITS)
    x = rng.standard_normal((batch, STEPS, FEATURES)).astype("f")
    bias = (0.3 * rng.standard_normal(4 * UNITS)).astype("f")
    want = reference.lstm(x.astype(np.float64), dense_in,
                          u[0].astype(np.float64) @ v[0], bias)[1]
    in_stages = [Stage(owned(k), False) for k in chain]
    rec_stages = [Stage(owned(u), False), Stage(owned(v), False)]
    zeros = np.zeros((batch, UNITS), "f")
    for isa in ops.supported_instruction_sets():
        ops.set_instruction_set(isa)
        rec_packs = int(batch == 1 and isa != "avx512")
        for threads in (1, 2):
            made = []
            for _ in range(2):
                before = packs()
                h = ops.structured_lstm(x, zeros, zeros, bias, in_stages,
                                        rec_stages, num_threads=threads)[1]
                made.append(packs() - before)
                np.testing.assert_allclose(h, want, **TOL)
            assert made == [3 + rec_packs, 0]


@pytest.fixture
def every_call_on_the_threads_asked():
    """Calls run on the threads asked, not on a measured choice (the
    2-thread team at these small sizes)."""
    ops.load()
    saved = ops._state["cdll"].keras_antman_min_parallel_macs_per_step()
    ops._set_min_parallel_work(per_step=0)
    yield
    ops._set_min_parallel_work(per_step=saved)


@pytest.mark.parametrize("batch", [1, 3, 8, 32])
@pytest.mark.usefixtures("every_call_on_the_threads_asked")
def test_packed_recurrent_chain(batch):
    """A LowRank-LGP-like recurrent chain (blocks, a dense matrix, blocks,
    no shuffle): at batch 1 its dense mix and its last blocks, 400 columns
    each (several batch-1 panels on every instruction set), are read from
    packed copies, the last stage by gates of 200 units whose columns
    start and end inside panels and mid-vector. Every instruction set, 1
    and 2 threads, the whole sequence against the NumPy reference; the
    pack counter shows the two recurrent stages packed at batch 1 only."""
    rng = np.random.default_rng(20 + batch)
    units = 200
    rec = [blocks_of(rng, 4, units // 4, 32), weights_dense(rng, 128, 400),
           blocks_of(rng, 2, 200, 2 * units)]
    dense_rec = (reference.block_diag(rec[0]) @ rec[1][0]
                 @ reference.block_diag(rec[2]))
    k_in = weights_dense(rng, FEATURES, 4 * units)
    x = rng.standard_normal((batch, STEPS, FEATURES)).astype("f")
    bias = (0.3 * rng.standard_normal(4 * units)).astype("f")
    want = reference.lstm(x.astype(np.float64), k_in[0].astype(np.float64),
                          dense_rec, bias)[0]
    in_stages = [Stage(owned(k_in), False)]
    rec_stages = [Stage(owned(k), False) for k in rec]
    zeros = np.zeros((batch, units), "f")
    for isa in ops.supported_instruction_sets():
        ops.set_instruction_set(isa)
        for threads in (1, 2):
            made = []
            for _ in range(2):
                before = packs()
                seq = ops.structured_lstm(x, zeros, zeros, bias, in_stages,
                                          rec_stages, return_sequences=True,
                                          num_threads=threads)[0]
                made.append(packs() - before)
                np.testing.assert_allclose(seq, want, **TOL)
            assert made == [1 + 2 * (batch == 1), 0]


def blocks_of(rng, g, a, b):
    return (rng.standard_normal((g, a, b)) / np.sqrt(a)).astype("f")


def weights_dense(rng, n, m):
    return (rng.standard_normal((1, n, m)) / np.sqrt(n)).astype("f")


@pytest.mark.parametrize("reset_after", [True, False])
def test_packed_gru_group_product(reset_after):
    """A batch-1 GRU with shuffled blocks (its recurrent blocks read from
    a packed copy where a block row is wider than one panel: 1024 units)
    on every instruction set, against the reference; the candidate
    product of reset_after=False is read in place."""
    rng = np.random.default_rng(11)
    units = 1024
    x = rng.standard_normal((1, STEPS, FEATURES)).astype("f")
    k_in = blocks(rng, FEATURES // G, 3 * units // G)
    rec_gates = 3 if reset_after else 2
    k_rec = blocks(rng, units // G, rec_gates * units // G)
    dense = [reference.shuffled(reference.block_diag(k), G)
             for k in (k_in, k_rec)]
    cand = None
    if reset_after:
        bias = (0.3 * rng.standard_normal((2, 3 * units))).astype("f")
    else:
        k_cand = blocks(rng, units // G, units // G)
        dense[1] = np.concatenate(
            [dense[1], reference.shuffled(reference.block_diag(k_cand), G)],
            axis=1)
        cand = [Stage(owned(k_cand), True)]
        bias = (0.3 * rng.standard_normal(3 * units)).astype("f")
    want = reference.gru(x.astype(np.float64), *dense, bias,
                         reset_after=reset_after)[0]
    in_stages, rec_stages = [Stage(owned(k_in), True)], [Stage(owned(k_rec),
                                                               True)]
    for isa in ops.supported_instruction_sets():
        ops.set_instruction_set(isa)
        made = []
        for _ in range(2):
            before = packs()
            seq = ops.structured_gru(x, np.zeros((1, units), "f"), bias,
                                     in_stages, rec_stages, cand,
                                     reset_after=reset_after,
                                     return_sequences=True, num_threads=1)[0]
            made.append(packs() - before)
            np.testing.assert_allclose(seq, want, **TOL)
        assert made == [2, 0]  # input and recurrent blocks, once


@pytest.mark.parametrize("batch,steps", [(1, 300), (4, 80)])
def test_packed_input_product_over_many_rows(batch, steps):
    """More rows than one pass over the packed panels takes (256): the
    batch-1 group split and the row split, 1 and 2 threads."""
    rng = np.random.default_rng(batch)
    k_in = blocks(rng, FEATURES // G, 4 * UNITS // G)
    k_rec = blocks(rng, UNITS // G, 4 * UNITS // G)
    x = rng.standard_normal((batch, steps, FEATURES)).astype("f")
    bias = (0.3 * rng.standard_normal(4 * UNITS)).astype("f")
    dense = [reference.shuffled(reference.block_diag(k), G)
             for k in (k_in, k_rec)]
    want = reference.lstm(x.astype(np.float64), *dense, bias)[0]
    zeros = np.zeros((batch, UNITS), "f")
    for threads in (1, 2):
        seq = ops.structured_lstm(x, zeros, zeros, bias,
                                  [Stage(owned(k_in), True)],
                                  [Stage(owned(k_rec), True)],
                                  return_sequences=True,
                                  num_threads=threads)[0]
        np.testing.assert_allclose(seq, want, **TOL)


@pytest.mark.parametrize("batch,steps", [(1, 100), (1, 300), (4, 80)])
@pytest.mark.usefixtures("every_call_on_the_threads_asked")
def test_input_chain_over_many_rows(batch, steps):
    """A 3-stage input chain (blocks, a dense matrix, blocks) over more
    rows than one pass of its stages takes (64, kRowChunk) and than 256: 1
    and 2 threads, every instruction set, the whole sequence against the
    reference."""
    rng = np.random.default_rng(30 + steps)
    chain = [blocks(rng, FEATURES // G, 16), weights_dense(rng, 64, 80),
             blocks_of(rng, 4, 20, 4 * UNITS // G)]
    dense_in = (reference.block_diag(chain[0]) @ chain[1][0]
                @ reference.block_diag(chain[2]))
    k_rec = blocks(rng, UNITS // G, 4 * UNITS // G)
    x = rng.standard_normal((batch, steps, FEATURES)).astype("f")
    bias = (0.3 * rng.standard_normal(4 * UNITS)).astype("f")
    want = reference.lstm(
        x.astype(np.float64), dense_in,
        reference.shuffled(reference.block_diag(k_rec), G), bias)[0]
    zeros = np.zeros((batch, UNITS), "f")
    for isa in ops.supported_instruction_sets():
        ops.set_instruction_set(isa)
        for threads in (1, 2):
            seq = ops.structured_lstm(
                x, zeros, zeros, bias, [Stage(owned(k), False) for k in chain],
                [Stage(owned(k_rec), True)], return_sequences=True,
                num_threads=threads)[0]
            np.testing.assert_allclose(seq, want, **TOL)

"""Every kernel variant the CPU has, against the NumPy reference.

For each instruction set this CPU supports (``generic``, ``avx2``,
``avx512``), batches 1, 3, 8 and 32 and 1 and 2 threads, the LSTM and both
GRU forms run on chains that take the engine's distinct paths: g blocks
with the shuffle (each group owns its units' gates), a dense matrix large
enough to be streamed row by row at small batches, and a low-rank pair
(an intermediate stage). The reference is tests/reference.py over the dense
matrices the chains multiply out to. Also: ``KERAS_ANTMAN_ISA`` picks the
variant, and a value the CPU cannot run is a clear error.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from keras_antman import ops
from keras_antman.ops import Stage

import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    not ops.is_available(), reason="compiled op library not built"
)


def isas():
    return ops.supported_instruction_sets() if ops.is_available() else []


@pytest.fixture(autouse=True)
def _settings():
    if ops.is_available():  # run the 2-thread team at these small sizes
        ops.load()
        saved = ops._state["cdll"].keras_antman_min_parallel_macs_per_step()
        ops._set_min_parallel_work(per_step=0)
    yield
    if ops.is_available():
        ops.set_instruction_set(None)
        ops.set_num_threads(1)
        ops._set_min_parallel_work(per_step=saved)


def weights(rng, *shape):
    return (rng.standard_normal(shape) / np.sqrt(shape[-2])).astype("f")


def chain(kind, n, m, rng):
    """Stages of an n -> m product and the dense matrix they stand for."""
    if kind == "shuffle":  # g = 4 blocks, shuffled: group-owned tasks
        g = 4
        blocks = weights(rng, g, n // g, m // g)
        return ([Stage(blocks, True)],
                reference.shuffled(reference.block_diag(blocks), g))
    if kind == "dense":
        k = weights(rng, 1, n, m)
        return [Stage(k, False)], k[0].astype(np.float64)
    if kind == "low_rank":
        u, v = weights(rng, 1, n, n // 4), weights(rng, 1, n // 4, m)
        return ([Stage(u, False), Stage(v, False)],
                u[0].astype(np.float64) @ v[0])
    raise ValueError(kind)


# units per chain kind: 256 x 1024 dense is 2^18 multiply-adds per step,
# the size from which one or two rows stream W row by row.
UNITS = {"shuffle": 64, "dense": 256, "low_rank": 64}
STEPS = 5


def run_both_thread_counts(call):
    """The op's results at 1 and 2 threads."""
    return [call(threads) for threads in (1, 2)]


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("batch", [1, 3, 8, 32])
@pytest.mark.parametrize("kind", ["shuffle", "dense", "low_rank"])
def test_lstm_every_isa(isa, batch, kind):
    ops.set_instruction_set(isa)
    assert ops.isa() == isa
    rng = np.random.default_rng(batch)
    units = UNITS[kind]
    features = 48
    x = rng.standard_normal((batch, STEPS, features)).astype("f")
    in_stages, k_in = chain("shuffle", features, 4 * units, rng)
    rec_stages, k_rec = chain(kind, units, 4 * units, rng)
    bias = (0.3 * rng.standard_normal(4 * units)).astype("f")
    zeros = np.zeros((batch, units), "f")
    seq_ref, h_ref, c_ref = reference.lstm(x.astype(np.float64), k_in, k_rec,
                                           bias)
    for seq, h, c in run_both_thread_counts(
        lambda t: ops.structured_lstm(x, zeros, zeros, bias, in_stages,
                                      rec_stages, return_sequences=True,
                                      num_threads=t)
    ):
        tol = dict(rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(seq, seq_ref, **tol)
        np.testing.assert_allclose(h, h_ref, **tol)
        np.testing.assert_allclose(c, c_ref, **tol)


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("g,units", [(2, 200), (10, 200), (4, 96)])
@pytest.mark.parametrize("go_backwards", [False, True])
def test_lstm_batch1_group_step(isa, g, units, go_backwards):
    """Batch 1 with one shuffled block stage (LGP-Shuffle) runs the step of
    the limit kernel: each group's product starts from its input projection
    and the group before's gate math runs inside it. Here units / g is no
    multiple of the vector width, g = 2 blocks are wider than the
    registers hold (several column chunks), odd steps walk backwards, and
    the initial states are not zero."""
    ops.set_instruction_set(isa)
    rng = np.random.default_rng(g + units)
    features = 40
    x = rng.standard_normal((1, 7, features)).astype("f")
    in_stages, k_in = chain("shuffle", features, 4 * units, rng)
    blocks = weights(rng, g, units // g, 4 * units // g)
    rec_stages = [Stage(blocks, True)]
    k_rec = reference.shuffled(reference.block_diag(blocks), g)
    bias = (0.3 * rng.standard_normal(4 * units)).astype("f")
    scale = np.array([0.5, 2.0])[:, None, None]
    h0, c0 = (rng.standard_normal((2, 1, units)) * scale).astype("f")
    seq_ref, h_ref, c_ref = reference.lstm(
        x.astype(np.float64), k_in, k_rec, bias, go_backwards, h0, c0)
    for seq, h, c in run_both_thread_counts(
        lambda t: ops.structured_lstm(x, h0, c0, bias, in_stages, rec_stages,
                                      go_backwards=go_backwards,
                                      return_sequences=True, num_threads=t)
    ):
        tol = dict(rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(seq, seq_ref, **tol)
        np.testing.assert_allclose(h, h_ref, **tol)
        np.testing.assert_allclose(c, c_ref, **tol)


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("batch", [1, 3, 8, 32])
@pytest.mark.parametrize("kind", ["shuffle", "dense"])
@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_every_isa(isa, batch, kind, reset_after):
    ops.set_instruction_set(isa)
    rng = np.random.default_rng(batch + 100)
    units = UNITS[kind]
    features = 48
    x = rng.standard_normal((batch, STEPS, features)).astype("f")
    in_stages, k_in = chain("shuffle", features, 3 * units, rng)
    if reset_after:
        rec_stages, k_rec = chain(kind, units, 3 * units, rng)
        cand_stages = None
        bias = (0.3 * rng.standard_normal((2, 3 * units))).astype("f")
    else:
        rec_stages, k_a = chain(kind, units, 2 * units, rng)
        cand_stages, k_b = chain(kind, units, units, rng)
        k_rec = np.concatenate([k_a, k_b], axis=1)
        bias = (0.3 * rng.standard_normal(3 * units)).astype("f")
    zeros = np.zeros((batch, units), "f")
    seq_ref, h_ref = reference.gru(x.astype(np.float64), k_in, k_rec, bias,
                                   reset_after=reset_after)
    for seq, h in run_both_thread_counts(
        lambda t: ops.structured_gru(x, zeros, bias, in_stages, rec_stages,
                                     cand_stages, reset_after=reset_after,
                                     return_sequences=True, num_threads=t)
    ):
        tol = dict(rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(seq, seq_ref, **tol)
        np.testing.assert_allclose(h, h_ref, **tol)


@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("g,units", [(2, 64), (4, 64), (10, 160)])
@pytest.mark.parametrize("go_backwards", [False, True])
def test_gru_batch1_slot_layout(isa, g, units, go_backwards):
    """Batch 1 with one shuffled block stage of whole vectors (reset_after)
    keeps h in the slot layout between the steps (each thread writes only
    its groups' units): the initial state goes in and the final state and
    the output rows come back to the natural order. The initial state is
    not zero."""
    ops.set_instruction_set(isa)
    rng = np.random.default_rng(g + units + 1)
    features = 40
    x = rng.standard_normal((1, 7, features)).astype("f")
    in_stages, k_in = chain("shuffle", features, 3 * units, rng)
    blocks = weights(rng, g, units // g, 3 * units // g)
    k_rec = reference.shuffled(reference.block_diag(blocks), g)
    bias = (0.3 * rng.standard_normal((2, 3 * units))).astype("f")
    h0 = rng.standard_normal((1, units)).astype("f")
    seq_ref, h_ref = reference.gru(x.astype(np.float64), k_in, k_rec, bias,
                                   go_backwards=go_backwards, h0=h0)
    for seq, h in run_both_thread_counts(
        lambda t: ops.structured_gru(x, h0, bias, in_stages,
                                     [Stage(blocks, True)], None,
                                     reset_after=True,
                                     go_backwards=go_backwards,
                                     return_sequences=True, num_threads=t)
    ):
        tol = dict(rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(seq, seq_ref, **tol)
        np.testing.assert_allclose(h, h_ref, **tol)


# Widths that are no multiple of any vector width (4, 8, 16 floats): GRU
# blocks of 39 columns (3 gates x 13 units, g = 10), LSTM blocks of 52
# (4 x 13; a multiple of 4, so the generic engine runs its group step)
# and a low-rank chain whose mix is 50 wide. At batch 1 a row's partial
# last vector runs in the pass of its other columns (KernRowMasked), and
# the gate math of groups of 13 units runs over all of a thread's groups
# at once in whole vectors (GroupRows).
@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(
    "cell", ["gru", "gru_reset_before", "lstm_shuffle", "lstm_low_rank"])
def test_partial_vector_widths(isa, batch, cell):
    ops.set_instruction_set(isa)
    rng = np.random.default_rng(batch + 7)
    units, g, features = 130, 10, 40
    x = rng.standard_normal((batch, STEPS, features)).astype("f")
    zeros = np.zeros((batch, units), "f")
    tol = dict(rtol=1e-4, atol=2e-5)
    if cell.startswith("lstm"):
        in_stages, k_in = chain("shuffle", features, 4 * units, rng)
        if cell == "lstm_low_rank":
            u, v = weights(rng, 1, units, 50), weights(rng, 1, 50, 4 * units)
            rec_stages = [Stage(u, False), Stage(v, False)]
            k_rec = u[0].astype(np.float64) @ v[0]
        else:
            blocks = weights(rng, g, units // g, 4 * units // g)
            rec_stages = [Stage(blocks, True)]
            k_rec = reference.shuffled(reference.block_diag(blocks), g)
        bias = (0.3 * rng.standard_normal(4 * units)).astype("f")
        seq_ref = reference.lstm(x.astype(np.float64), k_in, k_rec, bias)[0]
        for seq, _, _ in run_both_thread_counts(
            lambda t: ops.structured_lstm(
                x, zeros, zeros, bias, in_stages, rec_stages,
                return_sequences=True, num_threads=t)
        ):
            np.testing.assert_allclose(seq, seq_ref, **tol)
        return
    reset_after = cell == "gru"
    in_blocks = weights(rng, g, features // g, 3 * units // g)
    k_in = reference.shuffled(reference.block_diag(in_blocks), g)
    rec_gates = 3 if reset_after else 2
    rec_blocks = weights(rng, g, units // g, rec_gates * units // g)
    k_rec = reference.shuffled(reference.block_diag(rec_blocks), g)
    cand_stages = None
    if reset_after:
        bias = (0.3 * rng.standard_normal((2, 3 * units))).astype("f")
    else:
        cand_blocks = weights(rng, g, units // g, units // g)
        cand_stages = [Stage(cand_blocks, True)]
        k_rec = np.concatenate(
            [k_rec, reference.shuffled(reference.block_diag(cand_blocks), g)],
            axis=1)
        bias = (0.3 * rng.standard_normal(3 * units)).astype("f")
    seq_ref = reference.gru(x.astype(np.float64), k_in, k_rec, bias,
                            reset_after=reset_after)[0]
    for seq, _ in run_both_thread_counts(
        lambda t: ops.structured_gru(
            x, zeros, bias, [Stage(in_blocks, True)],
            [Stage(rec_blocks, True)], cand_stages, reset_after=reset_after,
            return_sequences=True, num_threads=t)
    ):
        np.testing.assert_allclose(seq, seq_ref, **tol)


def isa_in_subprocess(value):
    env = dict(os.environ, KERAS_ANTMAN_ISA=value, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    code = ("from keras_antman import ops\n"
            "try:\n"
            "    print(ops.isa())\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def test_isa_env_picks_each_supported_variant():
    for name in isas():
        assert isa_in_subprocess(name) == name
    assert isa_in_subprocess(" AVX2 ".replace("AVX2", isas()[-1].upper())) \
        == isas()[-1]


def test_isa_env_rejects_unknown_and_unsupported():
    supported = ", ".join(map(repr, isas()))
    out = isa_in_subprocess("sse9")
    assert out.startswith("ValueError: KERAS_ANTMAN_ISA='sse9'")
    assert "names no instruction set" in out and supported in out
    if "avx512" not in isas():
        out = isa_in_subprocess("avx512")
        assert "does not support 'avx512'" in out and supported in out


def test_set_instruction_set_errors():
    with pytest.raises(ValueError, match="names no instruction set.*"
                       "this CPU supports 'generic'"):
        ops.set_instruction_set("neon")
    assert ops.isa() == isas()[-1]

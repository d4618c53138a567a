"""The raw ops survive hostile input: a seeded subset of `fuzz_ops`.

Every batch runs in a subprocess, so a crash (an abort in a TensorFlow
CHECK, a segfault) fails the test instead of the test run.
"""

import fuzz_ops
import pytest

from keras_antman import ops

needs_op = pytest.mark.skipif(
    not ops.is_available(), reason="the compiled op library is not built")


@needs_op
@pytest.mark.parametrize("seed", [101, 202])
def test_mutated_calls_never_crash_and_name_the_argument(seed):
    counts = fuzz_ops.run_in_subprocess(seed, 500)
    assert not counts["crashed"], counts.get("stderr")
    assert counts["unexpected"] == []
    assert counts["calls"] == 500
    # The mutations reach both outcomes: runs and named rejections.
    assert counts["ok"] > 50 and counts["rejected"] > 200


@needs_op
def test_the_reported_check_failures_are_rejections():
    import tensorflow as tf

    lib = ops.load()
    for x, blocks in [((4, 0), (2**31, 0, 2**31)),
                      ((1, 0), (2**32 + 1, 0, 2**32 - 1))]:
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match="blocks must have shape|more than 2"):
            lib.keras_antman_block_diag_mat_mul(
                x=tf.zeros(x), blocks=tf.zeros(blocks))

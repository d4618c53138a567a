"""A fuzzer for the raw registered ops, bypassing every Python check.

Each call mutates a valid LSTM, GRU or block-diagonal call: ranks, every
dimension (0, 1, mismatched, values whose products overflow int64), group
counts that do not divide, T = 0, an empty batch, wrong dtypes, NaN/Inf,
input and recurrent arrays of different shapes, stage lists of the wrong
length, ``num_threads`` 0 / -1 / huge, and sparse terms (CSR row pointers
that do not start at 0, decrease, overrun or miss nnz; column indices
negative or past the input; lengths and ranks that disagree; more than one
term, or a candidate term with ``reset_after``). Tensors with a huge
dimension always have another dimension 0, so nothing large is ever
allocated by the fuzzer itself.

A call may succeed or be rejected. A rejection must be a
``tf.errors.InvalidArgumentError`` whose message names an argument (or
TensorFlow's own input dtype check), a ``TypeError`` / ``ValueError`` from
TensorFlow's generated wrapper (attr types, before the kernel runs), or,
for a legal but huge output, TensorFlow's ``ResourceExhaustedError``.
Anything else, or a crash of the process, is a failure.
`tests/test_fuzz_ops.py` runs a seeded subset in subprocesses; the full
run:

    python tests/fuzz_ops.py --calls 10000 --batch 1000

prints the counts (calls, successes, rejections, crashes) per batch and in
total, and exits non-zero on any crash or unexpected error.
"""

import argparse
import json
import os
import re
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

HUGE = [2**31, 2**32 + 1, 2**32 - 1, 2**62, 2**63 - 1]
SMALL = [0, 1, 2, 3, 4, 5, 7, 8, 16]
# A rejection names the argument it is about.
_NAMED = re.compile(
    r"\b(x|initial_h|initial_c|bias|input_stages|recurrent_stages|"
    r"candidate_stages|input_shuffle|recurrent_shuffle|candidate_shuffle|"
    r"num_threads|blocks|output|y|"
    r"(num_)?(input|recurrent|candidate)_sparse(_row_ptr|_col_idx|"
    r"_values)?)\b")
_DTYPE = re.compile(r"expected to be a float tensor")


def _dim(rng):
    return int(rng.choice(SMALL)) if rng.random() < 0.8 else int(
        rng.choice(HUGE))


def _array(rng, shape, dtype="float32"):
    import numpy as np
    import tensorflow as tf

    shape = [int(d) for d in shape]
    if any(d > 2**20 for d in shape) and 0 not in shape:
        shape[int(rng.integers(len(shape)))] = 0  # never allocate big
    n = 1
    for d in shape:
        n *= d
    if n > 2**16 and shape:
        shape[0] = 0
    if n == 0 or 0 in shape:  # NumPy refuses some empty shapes TF accepts
        nonzero = 1
        for i, d in enumerate(shape):
            if d and nonzero * d >= 2**63:  # no TF tensor has this shape
                shape[i] = 1
            nonzero *= shape[i] or 1
        return tf.zeros(shape, dtype=dtype)
    a = np.zeros(shape, dtype=dtype)
    if a.size and dtype == "float32":
        a[...] = rng.normal(size=a.shape)
        if rng.random() < 0.1:
            a.flat[int(rng.integers(a.size))] = rng.choice(
                [np.nan, np.inf, -np.inf])
    return a


def _mutate_shape(rng, shape):
    shape = list(shape)
    roll = rng.random()
    if roll < 0.15 and shape:
        shape.pop(int(rng.integers(len(shape))))  # lower rank
    elif roll < 0.25:
        shape.insert(int(rng.integers(len(shape) + 1)), _dim(rng))
    elif shape:
        shape[int(rng.integers(len(shape)))] = _dim(rng)
    return shape


def _stage_list(rng, n, m, max_stages=5):
    """A chain n -> m, often valid, sometimes broken."""
    count = int(rng.integers(1, max_stages + 1)) if rng.random() < 0.3 else 1
    shapes, width = [], n
    for i in range(count):
        out = m if i == count - 1 else int(rng.choice([n, m, 8, 4]))
        g = int(rng.choice([1, 2, 4]))
        shapes.append([g, max(width // g, 0), max(out // g, 0)])
        width = out
    flags = [False] * count
    if rng.random() < 0.5:
        flags[-1] = True
    if rng.random() < 0.3:  # mutate one stage or the flags
        k = int(rng.integers(count))
        shapes[k] = _mutate_shape(rng, shapes[k])
    if rng.random() < 0.1:
        flags.append(True)
    if rng.random() < 0.05:
        flags[0] = True
    return shapes, flags


def _sparse(rng, n, m):
    """The three sparse-term lists of a product n -> m: usually none, else
    one valid CSR of S^T, sometimes broken."""
    import numpy as np

    if rng.random() < 0.6:
        return [[], [], []]
    nnz = int(rng.integers(0, n * m + 1))
    rows = np.sort(rng.integers(0, m, size=nnz))
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=m))])
    row_ptr = row_ptr.astype("int32")
    col = rng.integers(0, n, size=nnz).astype("int32")
    values = rng.normal(size=nnz).astype("float32")
    roll = rng.random()
    if roll < 0.05 and m > 0:
        row_ptr[int(rng.integers(1, m + 1))] = int(rng.choice(
            [-1, 2**31 - 1, nnz + 1]))
    elif roll < 0.1:
        row_ptr[0] = int(rng.choice([1, -1]))
    elif roll < 0.15 and nnz:
        col[int(rng.integers(nnz))] = int(rng.choice([-1, n, 2**31 - 1]))
    elif roll < 0.2:
        row_ptr = row_ptr[:-1] if rng.random() < 0.5 else np.append(
            row_ptr, nnz).astype("int32")
    elif roll < 0.25:
        values = values[:-1] if nnz else np.zeros(1, "float32")
    elif roll < 0.28:
        col = col.reshape(1, -1)
    elif roll < 0.3:
        return [[row_ptr] * 2, [col] * 2, [values] * 2]  # two terms
    elif roll < 0.32:
        return [[row_ptr], [col], [_array(rng, [0, 2**31])]]
    return [[row_ptr], [col], [values]]


def _call(lib, rng):
    """One mutated call of a raw op."""
    import tensorflow as tf

    kind = rng.choice(["lstm", "gru", "block_diag"])
    threads = int(rng.choice([0, 1, 2, -1, 2**31, 2**40]))
    if kind == "block_diag":
        g = int(rng.choice([1, 2, 3, 4]))
        x_shape = [int(rng.choice([1, 3, 64, 65])), g * 4]
        b_shape = [g, 4, int(rng.choice([1, 5, 8]))]
        if rng.random() < 0.6:
            x_shape = _mutate_shape(rng, x_shape)
        if rng.random() < 0.6:
            b_shape = _mutate_shape(rng, b_shape)
        if rng.random() < 0.05:  # the reported CHECK failures
            x_shape, b_shape = [4, 0], [2**31, 0, 2**31]
        dtype = "float64" if rng.random() < 0.05 else "float32"
        return lib.keras_antman_block_diag_mat_mul(
            x=_array(rng, x_shape, dtype), blocks=_array(rng, b_shape),
            shuffle=bool(rng.random() < 0.5), num_threads=threads)
    lstm = kind == "lstm"
    gates = 4 if lstm else 3
    reset_after = bool(rng.random() < 0.5)
    batch, steps = int(rng.choice([0, 1, 2, 3])), int(rng.choice([0, 1, 4]))
    features, units = int(rng.choice([4, 8])), int(rng.choice([4, 8]))
    shapes = {
        "x": [batch, steps, features],
        "initial_h": [batch, units],
        "initial_c": [batch, units],
        "bias": [2, gates * units] if not lstm and reset_after
        else [gates * units],
    }
    for key in shapes:
        if rng.random() < 0.15:
            shapes[key] = _mutate_shape(rng, shapes[key])
    in_shapes, in_flags = _stage_list(rng, features, gates * units)
    rec_width = (4 if lstm else 3 if reset_after else 2) * units
    rec_shapes, rec_flags = _stage_list(rng, units, rec_width)
    args = dict(
        x=_array(rng, shapes["x"]),
        initial_h=_array(rng, shapes["initial_h"]),
        bias=_array(rng, shapes["bias"]),
        input_stages=[_array(rng, s) for s in in_shapes],
        recurrent_stages=[_array(rng, s) for s in rec_shapes],
        input_shuffle=in_flags, recurrent_shuffle=rec_flags,
        go_backwards=bool(rng.random() < 0.5),
        return_sequences=bool(rng.random() < 0.5), num_threads=threads)
    for product, (n, m) in [("input", (features, gates * units)),
                            ("recurrent", (units, rec_width))]:
        for part, arrays in zip(("row_ptr", "col_idx", "values"),
                                _sparse(rng, n, m)):
            args[f"{product}_sparse_{part}"] = arrays
    if rng.random() < 0.03:
        args["x"] = tf.cast(args["x"], tf.float64)
    if lstm:
        return lib.keras_antman_structured_lstm(
            initial_c=_array(rng, shapes["initial_c"]), **args)
    cand_shapes, cand_flags = _stage_list(rng, units, units)
    if reset_after and rng.random() < 0.8:
        cand_shapes, cand_flags = [], []
    if not reset_after and rng.random() < 0.05:
        cand_shapes, cand_flags = [], []
    cand_sparse = _sparse(rng, units, units)
    if reset_after and rng.random() < 0.8:
        cand_sparse = [[], [], []]
    return lib.keras_antman_structured_gru(
        candidate_sparse_row_ptr=cand_sparse[0],
        candidate_sparse_col_idx=cand_sparse[1],
        candidate_sparse_values=cand_sparse[2],
        candidate_stages=[_array(rng, s) for s in cand_shapes],
        candidate_shuffle=cand_flags, reset_after=reset_after, **args)


def run_batch(seed, calls):
    """Runs ``calls`` mutated calls in this process; returns the counts."""
    import numpy as np
    import tensorflow as tf

    from keras_antman import ops

    lib = ops.load()
    ops._set_min_parallel_work(0, 0)  # reach the threaded paths too
    rng = np.random.default_rng(seed)
    counts = {"calls": 0, "ok": 0, "rejected": 0, "dtype_rejected": 0,
              "out_of_memory": 0, "wrapper_errors": 0, "unexpected": []}
    for _ in range(calls):
        counts["calls"] += 1
        try:
            _call(lib, rng)
            counts["ok"] += 1
        except tf.errors.InvalidArgumentError as e:
            if _NAMED.search(e.message):
                counts["rejected"] += 1
            elif _DTYPE.search(e.message):  # TF's own input type check
                counts["dtype_rejected"] += 1
            else:
                counts["unexpected"].append(f"unnamed: {e.message[:200]}")
        except tf.errors.ResourceExhaustedError:
            # A legal but huge output (e.g. x [2^31, 0] @ blocks [1, 0, 32]
            # is 2^31 x 32 zeros): TF's allocator says no, cleanly.
            counts["out_of_memory"] += 1
        except (TypeError, ValueError) as e:
            counts["wrapper_errors"] += 1  # TF's wrapper: dtype / attr type
            del e
        except Exception as e:  # noqa: BLE001 - counted as a failure
            counts["unexpected"].append(f"{type(e).__name__}: {e}"[:300])
    return counts


def run_in_subprocess(seed, calls, timeout=600):
    """`run_batch` in a fresh process, so that a crash is caught."""
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--batch-only",
         "--seed", str(seed), "--calls", str(calls)],
        capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    if proc.returncode != 0:
        return {"calls": calls, "crashed": True, "returncode": proc.returncode,
                "stderr": proc.stderr[-3000:]}
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    counts["crashed"] = False
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-only", action="store_true",
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch_only:
        print(json.dumps(run_batch(args.seed, args.calls)))
        return 0
    total = {"calls": 0, "ok": 0, "rejected": 0, "dtype_rejected": 0,
             "out_of_memory": 0, "wrapper_errors": 0, "unexpected": 0,
             "crashes": 0}
    for i, start in enumerate(range(0, args.calls, args.batch)):
        n = min(args.batch, args.calls - start)
        c = run_in_subprocess(args.seed + i, n)
        total["calls"] += n
        if c["crashed"]:
            total["crashes"] += 1
            print(f"batch {i}: CRASH rc={c['returncode']}\n{c['stderr']}")
            continue
        for k in ("ok", "rejected", "dtype_rejected", "out_of_memory",
                  "wrapper_errors"):
            total[k] += c[k]
        total["unexpected"] += len(c["unexpected"])
        print(f"batch {i}: {n} calls, {c['ok']} ran, {c['rejected']} "
              f"rejected naming an argument, {c['dtype_rejected']} wrong "
              f"dtype, {c['out_of_memory']} out of memory, "
              f"{c['wrapper_errors']} wrapper errors, "
              f"{len(c['unexpected'])} unexpected", flush=True)
        for u in c["unexpected"][:5]:
            print("  ", u)
    print(json.dumps(total))
    return 1 if total["crashes"] or total["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())

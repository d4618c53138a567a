"""Doping on the compiled op: doped Kronecker LSTMs vs Dense and LGP-Shuffle.

Batch 1, 100 timesteps, input = hidden = d (800), float32 inference, one
LSTM layer with the same scheme on both products. Rows: the op with
`Dense` schemes, LGP-Shuffle at about the doped KP's multiply-adds, plain
Kronecker, and Kronecker doped to about 10x and 25x LSTM compression (the
sparse matrix's non-zeros and CSR indices counted as `Doped.cost` counts
them: values + column indices + row pointers). Each is timed as the op
called directly with its lowered stages (`kernel_stages`, the doped ones
with their `SparseTerm`) as constant tensors, at 1 and 2 threads, and the
doped and plain Kronecker also on the portable path (stock TF ops, the
Keras layer in a ``tf.function``): as trained (``S * mask`` a dense masked
matmul) and as exported (``S`` as constant CSR arrays, Gather and
UnsortedSegmentSum). The doped layers are also called eagerly as Keras
layers on the compiled op (in process, not exported: the op's inputs then
come from the variables each call, the CSR through
`keras_antman.ops.masked_sparse_term`). One more doped row keeps ``S`` at
the paper's 1% density (whatever compression that gives). "Kronecker,
per-group GEMVs" is plain Kronecker with one element of its last tiled
copy changed by one ulp, so that the op does not see equal blocks and runs
them one GEMV per group, as it did before it ran equal blocks as one GEMM:
the before/after of that change, in the same process.

All rows are timed in one process, in interleaved rounds (every config
once per round, the order rotating), so a change of machine load hits
every row alike. In a round a config runs once untimed, then ``--calls``
timed calls back to back (a served model runs call after call, with its
weights in cache; the first call after another config's starts cold);
each time is the median over all rounds' timed calls. Ratios are of
times from this one run. Wall-clock times, and for one thread also the
process CPU time of the call (less sensitive to other processes taking
the cores; not to their use of the shared caches).

Usage:
    python bench/doping_speed.py [--d 800] [--rounds 15]

Writes bench/results/doping_speed.md and doping_speed.json.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

import keras_antman as am  # noqa: E402
from keras_antman import doping  # noqa: E402
from keras_antman import ops  # noqa: E402
from keras_antman.export import serving_constants  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speedup import machine  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = 100


def kron(d):
    """Kronecker factors whose last shuffle (m2 = 40 groups) divides the
    units, as the op's recurrent product needs; B [40, 40]."""
    del d
    return am.Kronecker(b_shape=(40, 40))


def doped_sparsity(d, base, compression):
    """The sparsity of S giving ``compression`` over the dense LSTM's two
    d x 4d kernels, with S's values, column indices and row pointers
    counted (`Doped.cost`)."""
    n, m = d, 4 * d
    per_product = 2 * n * m / compression / 2
    nnz = (per_product - base.params(n, m) - (m + 1)) / 2
    if nnz < 0:
        raise SystemExit(f"{base.describe()} alone exceeds {compression}x")
    return 1.0 - round(nnz) / (n * m)


def lgp_groups(d, macs):
    """LGP-Shuffle's g (dividing d and 4 d) whose MACs are nearest."""
    choices = [g for g in range(2, d + 1) if d % g == 0]
    return min(choices, key=lambda g: abs(d * 4 * d / g - macs))


def layer(d, scheme, kernel, seed=0):
    lay = am.StructuredLSTM(d, input_scheme=scheme, recurrent_scheme=scheme,
                            kernel=kernel)
    lay.build((1, STEPS, d))
    rng = np.random.default_rng(seed)
    for w in lay.weights:
        if not w.path.endswith("mask"):
            w.assign(rng.normal(scale=0.05, size=w.shape).astype("float32"))
    for matrix in doping.doped_matrices(lay):
        doping.prune(matrix, matrix.scheme.sparsity)
    return lay


def const(stages, unshare=False):
    """The lowering as constant tensors; ``unshare``: one element of the
    last copy of each tiled stage moved by one ulp."""
    out = []
    for s in stages:
        if isinstance(s, ops.SparseTerm):
            out.append(ops.SparseTerm(*(tf.constant(a) for a in s)))
        else:
            blocks = np.array(keras.ops.convert_to_numpy(s.blocks))
            if unshare and blocks.shape[0] > 1:
                blocks[-1, 0, 0] = np.nextafter(blocks[-1, 0, 0], 1.0)
            out.append(ops.Stage(tf.constant(blocks), s.shuffle))
    return out


def op_call(lay, x, threads, unshare=False):
    cell = lay.cell
    zeros = tf.zeros((1, cell.units))
    args = (x, zeros, zeros, tf.constant(cell.bias),
            const(cell.input_matrix.kernel_stages(), unshare),
            const(cell.recurrent_matrix.kernel_stages(), unshare))
    return lambda: ops.structured_lstm(*args, num_threads=threads)


def portable_call(lay, x, served):
    if served:
        with serving_constants(lay):
            fn = tf.function(lambda v: lay(v)).get_concrete_function(x)
    else:
        fn = tf.function(lambda v: lay(v)).get_concrete_function(x)
    return lambda: fn(x)


def configs(d):
    n, m = d, 4 * d
    rows = [("op Dense", am.Dense(), None)]
    base = kron(d)
    doped = {}
    for c in (10, 25):
        s = am.Doped(base, sparsity=doped_sparsity(d, base, c))
        doped[c] = s
        g = lgp_groups(d, s.macs(n, m))
        rows.append((f"op LGP-Shuffle g={g} (MACs of doped KP {c}x)",
                     am.LGPShuffle(g), None))
    rows.append(("op Kronecker", base, None))
    rows.append(("op Kronecker, per-group GEMVs (before)", base, "unshare"))
    for c, s in doped.items():
        rows.append((f"op doped KP ~{c}x", s, None))
    rows.append(("op doped KP, S 1% dense", am.Doped(base, sparsity=0.99),
                 None))
    return rows, base, doped


def run(d, rounds, per_round):
    rng = np.random.default_rng(d)
    x = tf.constant(rng.normal(size=(1, STEPS, d)).astype("float32"))
    rows, base, doped = configs(d)
    calls, info = {}, {}
    dense_params = 8 * d * d
    for name, scheme, how in rows:
        lay = layer(d, scheme, "compiled")
        mats = lay.products().values()
        info[name] = {
            "scheme": scheme.describe(),
            "params": sum(mm.params() for mm in mats),
            "macs_per_step": sum(mm.macs() for mm in mats),
            "compression": dense_params / sum(mm.params() for mm in mats),
        }
        if isinstance(scheme, am.Doped):
            info[name]["nnz_per_product"] = scheme.nnz(d, 4 * d)
            info[name]["density"] = scheme.nnz(d, 4 * d) / (4 * d * d)
        unshare = how == "unshare"
        calls[name + " | 1 thread"] = op_call(lay, x, 1, unshare)
        calls[name + " | 2 threads"] = op_call(lay, x, 2, unshare)
    for name, scheme in [("Kronecker", base)] + [
            (f"doped KP ~{c}x", s) for c, s in doped.items()]:
        lay = layer(d, scheme, "portable")
        calls[f"portable {name} | layer"] = portable_call(lay, x, False)
        calls[f"portable {name} | exported form"] = portable_call(
            lay, x, True)
    for c, s in doped.items():
        lay = layer(d, s, "compiled")
        calls[f"layer doped KP ~{c}x | in process"] = (
            lambda lay=lay: lay(x))
    # Check the op against the portable path before timing anything.
    for c, s in doped.items():
        a, b = layer(d, s, "compiled"), layer(d, s, "portable")
        b.set_weights(a.get_weights())
        np.testing.assert_allclose(a(x), b(x), rtol=2e-4, atol=2e-5)
    times = {k: [] for k in calls}
    cpu = {k: [] for k in calls}
    keys = list(calls)
    for fn in calls.values():  # warm up
        fn()
        fn()
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            calls[k]()
            for _ in range(per_round):
                t0, c0 = time.perf_counter(), time.process_time()
                calls[k]()
                times[k].append(1e3 * (time.perf_counter() - t0))
                cpu[k].append(1e3 * (time.process_time() - c0))
    med = {k: float(np.median(v)) for k, v in times.items()}
    med.update({k + " | cpu": float(np.median(v)) for k, v in cpu.items()})
    return med, info, rows


def table(d, med, info, rows):
    dense1 = med["op Dense | 1 thread"]
    dense_cpu = med["op Dense | 1 thread | cpu"]
    head = ["row", "scheme", "compression", "MACs/step", "1 thread (ms)",
            "vs op Dense", "1 thread, CPU time (ms)", "vs op Dense (CPU)",
            "2 threads (ms)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, _, _ in rows:
        i = info[name]
        t1, t2 = med[name + " | 1 thread"], med[name + " | 2 threads"]
        extra = (f", S {100 * i['density']:.2f}% dense"
                 if "density" in i else "")
        c1 = med[name + " | 1 thread | cpu"]
        lines.append(
            f"| {name} | {i['scheme']}{extra} | {i['compression']:.1f}x | "
            f"{i['macs_per_step']:,} | {t1:.2f} | {dense1 / t1:.1f}x | "
            f"{c1:.2f} | {dense_cpu / c1:.1f}x | {t2:.2f} |")
    port = ["| portable path (stock TF ops, tf.function) | as trained: "
            "dense masked S (ms) | exported form: CSR Gather + "
            "SegmentSum (ms) |", "| --- | --- | --- |"]
    for name in ["Kronecker", "doped KP ~10x", "doped KP ~25x"]:
        port.append(f"| {name} | {med[f'portable {name} | layer']:.2f} | "
                    f"{med[f'portable {name} | exported form']:.2f} |")
    layers = ["| Keras layer on the compiled op, called eagerly in process | "
              "1 thread (ms) | CPU time (ms) |", "| --- | --- | --- |"]
    for c in (10, 25):
        k = f"layer doped KP ~{c}x | in process"
        layers.append(f"| doped KP ~{c}x | {med[k]:.2f} | "
                      f"{med[k + ' | cpu']:.2f} |")
    return "\n\n".join("\n".join(t) for t in (lines, port, layers))


def targets(med, rows):
    out = []
    dense = med["op Dense | 1 thread"]
    lgp = {c: next(n for n, _, _ in rows if n.startswith("op LGP")
                   and f"{c}x" in n) for c in (10, 25)}
    dense_cpu = med["op Dense | 1 thread | cpu"]
    for c in (10, 25):
        t = med[f"op doped KP ~{c}x | 1 thread"]
        t_lgp = med[lgp[c] + " | 1 thread"]
        c1 = med[f"op doped KP ~{c}x | 1 thread | cpu"]
        c_lgp = med[lgp[c] + " | 1 thread | cpu"]
        out.append(f"doped KP ~{c}x, 1 thread: {dense / t:.1f}x faster than "
                   f"op Dense (CPU time: {dense_cpu / c1:.1f}x; target at "
                   f"10x: >= 5x); {t / t_lgp:.2f}x the time of {lgp[c]} "
                   f"(CPU time: {c1 / c_lgp:.2f}x; target: <= 1.5x)")
    before = med["op Kronecker, per-group GEMVs (before) | 1 thread"]
    after = med["op Kronecker | 1 thread"]
    out.append(f"Kronecker, 1 thread: {before:.2f} ms with one GEMV per "
               f"group, {after:.2f} ms with equal blocks as one GEMM "
               f"({before / after:.2f}x)")
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=3,
                        help="timed calls per config and round")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    if not ops.is_available():
        raise SystemExit("The compiled op is not built: " + ops.HOW_TO_BUILD)
    ops.set_num_threads(1)
    med, info, rows = run(args.d, args.rounds, args.calls)
    lines = targets(med, rows)
    text = (
        "# Doping on the compiled op\n\n"
        f"Machine: {machine()}.\n"
        f"Batch 1, {STEPS} timesteps, input = hidden = d = {args.d}, "
        "float32, inference; one LSTM layer, the same scheme on both "
        "products. The op is called directly with its lowered stages as "
        "constant tensors (1 or 2 OpenMP threads); the portable rows are "
        "the Keras layer in a tf.function (TF intra/inter-op threads 1). "
        f"{args.rounds} interleaved rounds in one process, each running "
        f"every config once untimed then {args.calls} timed calls; the "
        "median of the timed calls. The machine was shared with other "
        "work (load average at the start: "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): all rows "
        "alike on one thread, but the 2-thread OpenMP team waits at a "
        "barrier every step, so a core taken by another process stalls "
        "it (see bench/results/speedup.md for 2-thread runs on a quiet "
        "machine). "
        "Compression: the dense LSTM's 8 d^2 kernel weights over the "
        "scheme's params, S's values and CSR indices included.\n\n"
        f"Command: `python bench/doping_speed.py --d {args.d} --rounds "
        f"{args.rounds} --calls {args.calls}`\n\n"
        + table(args.d, med, info, rows) + "\n\n"
        + "\n".join(f"- {t}" for t in lines) + "\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "doping_speed.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "doping_speed.json"), "w") as f:
        json.dump({"machine": machine(), "d": args.d, "steps": STEPS,
                   "rounds": args.rounds, "calls_per_round": args.calls,
                   "load_average": os.getloadavg(), "median_ms": med,
                   "rows": info},
                  f, indent=1)
    print(text)


if __name__ == "__main__":
    main()

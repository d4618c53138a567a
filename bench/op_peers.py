"""The compiled op against its peers, in one process with interleaved rounds.

For each d (input = hidden = d, T = 100 steps, float32 inference) and
batch size, every variant below is timed round-robin in the same process,
so background load falls on all of them alike; each figure is the median
over all rounds (ms per call; "per sequence" divides by the batch).

- the op (``keras_antman.ops.structured_lstm`` / ``structured_gru`` called
  with tensors) at 1 and 2 threads, for LGP-Shuffle g=2 and g=10,
  LowRank-LGP g=10 r=2 and a GRU with LGP-Shuffle g=10;
- TFLite (XNNPACK, ``TFLITE_BUILTINS`` only) running the package's own
  portable export of the same model (``keras_antman.export(...,
  kernel="portable", batch_size=1)``), 1 and 2 threads (batch 1);
- ONNX Runtime's dense ``LSTM`` op (one node, 1 thread), the fastest dense
  peer, at every batch;
- the NumPy fused dense LSTM and the op with Dense schemes (batch 1);
- the hand-tuned limit kernel of ``../shared/limit`` (its
  ``liblimit_native.so``, built by ``sh ../shared/limit/build.sh``), LGP
  g=2 and g=10 at 1 and 2 threads, batch 1, loaded into this process and
  timed in the same rounds (its ``lstm_verify`` checks it first).

The batch table also gives each variant's rate of product arithmetic
(GFLOP/s: 2 FLOP per multiply-add of the input and recurrent products,
T steps, per second of the call; gate math not counted) against this
core's peak FMA rate, measured by the limit library's register-only FMA
chains in the same process. A dense peer near that peak bounds what any
kernel doing 1/k of its arithmetic can gain over it: at most k times its
rate ratio.

Usage:
    python bench/op_peers.py [--dims 400 800 1600] [--batches 1 8 32]
        [--rounds 10] [--out bench/results/op_peers]

Writes OUT.md and OUT.json.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

from _numpy_lstm import numpy_lstm  # noqa: E402  (bench/, beside this script)

import keras_antman as am  # noqa: E402
from keras_antman import ops  # noqa: E402
from keras_antman.hardware import cpu_model  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LIMIT_DIR = os.path.join(HERE, "..", "..", "shared", "limit")
T = 100
ROWS = [  # name, layer class, scheme
    ("LSTM LGP-Shuffle g=2", am.StructuredLSTM, lambda: am.LGPShuffle(2)),
    ("LSTM LGP-Shuffle g=10", am.StructuredLSTM, lambda: am.LGPShuffle(10)),
    ("LSTM LowRank-LGP g=10 r=2", am.StructuredLSTM,
     lambda: am.LowRankLGP(10, 10, 2)),
    ("GRU LGP-Shuffle g=10", am.StructuredGRU, lambda: am.LGPShuffle(10)),
]


def uptime():
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


# -- peers -------------------------------------------------------------------


def load_limit(build_dir):
    """The limit kernel's library, building it if needed; (lib, note)."""
    path = os.path.join(build_dir, "liblimit_native.so")
    if not os.path.exists(path):
        env = dict(os.environ, LIMIT_BUILD=build_dir)
        try:
            subprocess.run(["sh", os.path.join(LIMIT_DIR, "build.sh")],
                           env=env, check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as e:
            err = getattr(e, "stderr", b"") or b""
            return None, ("../shared/limit/build.sh failed (it needs g++ "
                          "and libopenblas-dev): "
                          + err.decode(errors="replace")[-300:])
    lib = ctypes.CDLL(path)
    lib.lstm_build_info.restype = ctypes.c_char_p
    lib.lstm_create.restype = ctypes.c_void_p
    lib.lstm_create.argtypes = [ctypes.c_int] * 5 + [ctypes.c_uint]
    for f in ("lstm_run", "lstm_verify"):
        getattr(lib, f).restype = ctypes.c_double
        getattr(lib, f).argtypes = [ctypes.c_void_p]
    return lib, lib.lstm_build_info().decode()


def limit_fn(lib, d, g, threads):
    m = lib.lstm_create(1, d, g, T, threads, 3)
    if not m:
        return None
    err = lib.lstm_verify(m)
    if not err < 1e-4:
        raise SystemExit(f"limit kernel d={d} g={g}: max|h-ref| = {err}")
    return lambda: lib.lstm_run(m)


def ort_lstm(d, batch):
    """ONNX Runtime's dense LSTM node, 1 thread, final h only."""
    import onnxruntime as ort
    from onnx import TensorProto
    from onnx import helper
    from onnx import numpy_helper

    rng = np.random.default_rng(d)
    a = 1.0 / np.sqrt(d)
    arrays = {k: rng.uniform(-a, a, s).astype(np.float32) for k, s in
              (("W", (1, 4 * d, d)), ("R", (1, 4 * d, d)),
               ("B", (1, 8 * d)))}
    node = helper.make_node("LSTM", ["X", "W", "R", "B"], ["", "Y_h"],
                            hidden_size=d)
    graph = helper.make_graph(
        [node], "lstm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT,
                                       [T, batch, d])],
        [helper.make_tensor_value_info("Y_h", TensorProto.FLOAT,
                                       [1, batch, d])],
        initializer=[numpy_helper.from_array(v, k)
                     for k, v in arrays.items()])
    model = helper.make_model(graph,
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    feed = {"X": rng.uniform(-1, 1, (T, batch, d)).astype(np.float32)}
    return lambda: sess.run(["Y_h"], feed), ort.__version__


# -- the op and TFLite on one model -----------------------------------------


def model_for(layer_cls, scheme, d, batch, seed):
    inp = keras.Input((T, d), batch_size=batch)
    layer = layer_cls(d, input_scheme=scheme, recurrent_scheme=scheme)
    model = keras.Model(inp, layer(inp))
    rng = np.random.default_rng(seed)
    for w in model.weights:
        w.assign(rng.normal(scale=0.05, size=w.shape).astype("float32"))
    return model, layer


def op_fn(layer, x, threads):
    """The compiled op called with the layer's lowered stages as tensors."""
    cell = layer.cell
    stages = {k: [ops.Stage(tf.constant(s.blocks), s.shuffle)
                  for s in m.kernel_stages()]
              for k, m in cell.products().items()}
    xt = tf.constant(x)
    z = tf.zeros((x.shape[0], cell.units))
    bias = tf.constant(cell.bias)
    if isinstance(layer, am.StructuredGRU):
        return lambda: ops.structured_gru(
            xt, z, bias, stages["input"], stages["recurrent"],
            stages.get("candidate"), reset_after=cell.reset_after,
            num_threads=threads)
    return lambda: ops.structured_lstm(
        xt, z, z, bias, stages["input"], stages["recurrent"],
        num_threads=threads)


def tflite_fns(model, x):
    """TFLite (XNNPACK, builtins only) on our portable export, 1 and 2
    threads; checked against the Keras model first."""
    with tempfile.TemporaryDirectory() as tmp:
        path = am.export(model, os.path.join(tmp, "sm"), kernel="portable",
                         batch_size=x.shape[0])
        conv = tf.lite.TFLiteConverter.from_saved_model(path)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        flat = conv.convert()
    expected = model(x).numpy()
    fns = {}
    for threads in (1, 2):
        interp = tf.lite.Interpreter(model_content=flat,
                                     num_threads=threads)
        runner = interp.get_signature_runner()
        name = list(runner.get_input_details())[0]
        got = list(runner(**{name: x}).values())[0]
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
        fns[threads] = (lambda r=runner, n=name: r(**{n: x}))
    return fns


# -- timing -------------------------------------------------------------------


def interleaved(fns, rounds, budget_s):
    """Median ms of each fn over `rounds` round-robin rounds; each round
    runs a fn as often as its share of `budget_s` allows (at least once)."""
    reps = {}
    for k, f in fns.items():
        f()
        t0 = time.perf_counter()
        f()
        one = time.perf_counter() - t0
        reps[k] = max(1, min(20, int(budget_s / len(fns) / rounds / one)))
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            for _ in range(reps[k]):
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def bench_d(d, batches, rounds, budget_s, limit):
    rng = np.random.default_rng(d)
    out = {}
    for batch in batches:
        x = rng.normal(size=(batch, T, d)).astype("float32")
        fns, flop = {}, {"dense": 2 * T * 8 * d * d}
        for i, (name, cls, scheme) in enumerate(ROWS):
            model, layer = model_for(cls, scheme(), d, batch, seed=i)
            flop[name] = 2 * T * sum(
                m.macs() for m in layer.cell.products().values())
            for t in (1, 2):
                fns[(name, f"op {t}T")] = op_fn(layer, x, t)
            if batch == 1:
                for t, f in tflite_fns(model, x).items():
                    fns[(name, f"TFLite {t}T")] = f
        fns[("dense", "ONNX Runtime")], ort_version = ort_lstm(d, batch)
        if batch == 1:
            model, layer = model_for(am.StructuredLSTM, am.Dense(), d, 1, 9)
            fns[("dense", "op Dense")] = op_fn(layer, x, 1)
            k, r, b = (np.asarray(v) for v in layer.cell.stock_weights())
            fns[("dense", "NumPy")] = lambda: numpy_lstm(x, k, r, b)
            for g, name in ((2, ROWS[0][0]), (10, ROWS[1][0])):
                for t in (1, 2) if limit is not None else ():
                    f = limit_fn(limit, d, g, t)
                    if f is not None:
                        fns[(name, f"limit {t}T")] = f
        load_before = uptime()
        med = interleaved(fns, rounds, budget_s)
        out[batch] = {"load_before": load_before, "load_after": uptime(),
                      "onnxruntime": ort_version,
                      "flop_per_sequence": flop,
                      "ms": {f"{a} | {b}": v for (a, b), v in med.items()}}
        print(f"d={d} batch={batch} done ({uptime()})", flush=True)
    return out


# -- report -------------------------------------------------------------------


def _md(head, body):
    lines = ["| " + " | ".join(head) + " |",
             "|" + " --- |" + " ---: |" * (len(head) - 1)]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])


def _get(ms, row, col):
    return ms.get(f"{row} | {col}")


def _f(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


def _ratio(a, b):
    return "–" if a is None or b is None else f"{a / b:.2f}x"


def _gflops(flop, ms):
    """GFLOP/s of ``flop`` FLOP in ``ms`` milliseconds."""
    return None if flop is None or not ms else flop / ms / 1e6


def _pct(rate, peak):
    if rate is None or not peak:
        return "–"
    return f"{rate:.0f} ({rate / peak:.0%})"


def report(results, args, limit_note):
    lines = [
        "# The compiled op against its peers, one process",
        "",
        f"Command: `python bench/op_peers.py --dims "
        f"{' '.join(map(str, args.dims))} --batches "
        f"{' '.join(map(str, args.batches))} --rounds {args.rounds} "
        f"--out {args.out}`",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores; op ISA "
        f"{ops.isa()}; TF {tf.__version__}, NumPy {np.__version__}; limit "
        f"kernel: {limit_note}.",
        "Peak FMA rate of one core (the limit library's register-only "
        "FMA chains, this process): "
        + (f"{results['peak_gflops']:.1f} GFLOP/s." if results.get(
            "peak_gflops") else "not measured (no limit library)."),
        f"Load: {results['load_start']} at the start, "
        f"{results['load_end']} at the end (other work shares this VM; "
        "the rounds are interleaved so it falls on every column alike).",
        "",
        f"T = {T}, input = hidden = d, float32 inference. Median ms per "
        "call over interleaved rounds; 1T / 2T = threads. Ratios are of "
        "times from the same rounds.",
        "",
        "## Batch 1: the op, TFLite on our portable export, the limit "
        "kernel",
        "",
    ]
    body = []
    for d, per_batch in results["dims"].items():
        ms = per_batch.get("1", per_batch.get(1, {})).get("ms", {})
        for name, _, _ in ROWS:
            o1, o2 = _get(ms, name, "op 1T"), _get(ms, name, "op 2T")
            t1, t2 = _get(ms, name, "TFLite 1T"), _get(ms, name, "TFLite 2T")
            l1, l2 = _get(ms, name, "limit 1T"), _get(ms, name, "limit 2T")
            body.append([str(d), name, _f(o1), _f(o2), _f(t1), _f(t2),
                         _f(l1), _f(l2), _ratio(t1, o1), _ratio(t2, o2),
                         _ratio(o1, l1), _ratio(o2, l2), _ratio(o1, o2),
                         _ratio(l1, l2)])
    lines.append(_md(
        ["d", "cell", "op 1T", "op 2T", "TFLite 1T", "TFLite 2T",
         "limit 1T", "limit 2T", "TFLite/op 1T", "TFLite/op 2T",
         "op/limit 1T", "op/limit 2T", "op 1T/2T", "limit 1T/2T"], body))
    lines += ["", "## Dense peers, batch 1 (ms)", ""]
    body = []
    for d, per_batch in results["dims"].items():
        ms = per_batch.get("1", per_batch.get(1, {})).get("ms", {})
        g10 = _get(ms, ROWS[1][0], "op 1T")
        cells = [_get(ms, "dense", c) for c in
                 ("NumPy", "op Dense", "ONNX Runtime")]
        body.append([str(d)] + [_f(c) for c in cells]
                    + [_f(g10), _ratio(cells[2], g10)])
    lines.append(_md(["d", "NumPy fused", "op Dense", "ONNX Runtime LSTM",
                      "op LGP-Shuffle g=10 1T", "ORT / op g=10"], body))
    lines += ["", "## Batches: per sequence (ms), against ONNX Runtime's "
              "dense LSTM at the same batch", ""]
    body = []
    peak = results.get("peak_gflops")
    for d, per_batch in results["dims"].items():
        base = per_batch.get("1", per_batch.get(1, {})).get("ms", {})
        for batch, res in per_batch.items():
            b = int(batch)
            ms, flop = res["ms"], res.get("flop_per_sequence", {})
            ort = _get(ms, "dense", "ONNX Runtime")
            ort_rate = _gflops(flop.get("dense"), ort / b)
            for name, _, _ in ROWS:
                o1, o2 = _get(ms, name, "op 1T"), _get(ms, name, "op 2T")
                one = _get(base, name, "op 1T")
                body.append([str(d), str(b), name, _f(o1 / b), _f(o2 / b),
                             _f(ort / b), _ratio(ort, o1), _ratio(ort, o2),
                             _ratio(one, o1 / b) if one else "–",
                             _pct(_gflops(flop.get(name), o1 / b), peak),
                             _pct(ort_rate, peak)])
    lines.append(_md(
        ["d", "batch", "cell", "op 1T", "op 2T", "ORT dense 1T",
         "ORT/op 1T", "ORT/op 2T", "op 1T: batch-1 time / this",
         "op 1T GFLOP/s (of peak)", "ORT GFLOP/s (of peak)"], body))
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+",
                        default=[400, 800, 1600])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of timing per (d, batch)")
    parser.add_argument("--limit-build", default=os.environ.get(
        "LIMIT_BUILD", os.path.expanduser("~/.cache/antman-limit")))
    parser.add_argument("--out", default=os.path.join(
        "bench", "results", "op_peers"))
    args = parser.parse_args()
    if not ops.is_available():
        raise SystemExit("The compiled op is not built: " + ops.HOW_TO_BUILD)
    limit, limit_note = load_limit(args.limit_build)
    print(f"limit kernel: {limit_note}", flush=True)
    results = {"argv": sys.argv, "cpu": cpu_model(), "isa": ops.isa(),
               "cores": os.cpu_count(), "limit": limit_note,
               "load_start": uptime(), "dims": {}}
    if limit is not None:
        limit.lstm_peak_gflops.restype = ctypes.c_double
        limit.lstm_peak_gflops.argtypes = [ctypes.c_int]
        results["peak_gflops"] = max(limit.lstm_peak_gflops(3)
                                     for _ in range(3))
    for d in args.dims:
        results["dims"][d] = bench_d(d, args.batches, args.rounds,
                                     args.budget, limit)
    results["load_end"] = uptime()
    text = report(results, args, limit_note)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()

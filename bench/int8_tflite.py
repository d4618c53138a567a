"""int8 on top of AntMan: the PTB teacher and its LGP-Shuffle g=10 student
as float32 (WHILE loops, and unrolled), dynamic-range int8 and full-integer
int8 TFLite files.

Each model of ``--run-dir`` (``examples/ptb_word_lm.py``'s run: the dense
2 x LSTM(200) teacher and the 10x LGP-Shuffle student) is converted by
`keras_antman.export_tflite` at batch 1 (the full-integer file calibrated
on ``--calib-windows`` 35-token windows of the training split), and each
file is measured in this one process:

- size on disk, and its constant bytes by type (`tflite_summary`);
- PTB test perplexity from the TFLite interpreter, every 35-token window
  from a zero state as the example evaluates (its windows: batch 20,
  ``datasets.bptt_dataset``; here one window per call), beside the Keras
  model's perplexity on the same windows;
- latency: batch 1, one 35-token window, 1 interpreter thread; every file
  is timed round-robin in the same rounds (median over all calls), as CPU
  time of the calling thread and as wall time.

Usage:
    python bench/int8_tflite.py [--run-dir /work/main/runs/ptb_iss]
        [--data ../shared/data/ptb] [--test-batches 0] [--calib-windows 200]
        [--rounds 20] [--out bench/results/int8_tflite]

Writes OUT.md and OUT.json; the .tflite files go to ``--work``.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_antman import benchmark  # noqa: E402

benchmark.configure_threads(1)

import keras_antman as am  # noqa: E402
from keras_antman import datasets  # noqa: E402
from keras_antman._keras import keras  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = (("teacher", "teacher.keras"),
          ("LGP-Shuffle g=10", "student_LGP_Shuffle_g_10.keras"))
# (quantize, label, steps): "int8" always unrolls the loops over the 35
# steps of its calibration windows, so fp32 unrolled separates the unrolling
# from the quantization.
QUANTIZE = ((None, "fp32", None), (None, "fp32 unrolled", 35),
            ("dynamic", "dynamic int8", None), ("int8", "full int8", None))
BATCH, STEPS = 20, 35  # the example's evaluation windows


def load_average():
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def windows(ids, batches=0):
    """``(x, y)``: the example's test windows, one per row, (N, 35)."""
    pairs = list(datasets.bptt_dataset(ids, BATCH, STEPS).as_numpy_iterator())
    if batches:
        pairs = pairs[:batches]
    return (np.concatenate([x for x, _ in pairs]),
            np.concatenate([y for _, y in pairs]))


def cross_entropy(logits, y):
    """Mean token cross-entropy (nats) of float logits (..., V)."""
    z = logits.astype("float64")
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -float(np.take_along_axis(logp, y[..., None], -1).mean())


def keras_perplexity(model, x, y):
    """The example's evaluation: batches of 20 windows, zero state each."""
    fn = tf.function(lambda v: model(v, training=False))
    losses = [cross_entropy(fn(x[i:i + BATCH]).numpy(), y[i:i + BATCH])
              for i in range(0, len(x), BATCH)]
    return math.exp(float(np.mean(losses)))


def interpreter(path):
    with warnings.catch_warnings(), benchmark.quiet_stderr():
        warnings.simplefilter("ignore")  # the ai_edge_litert notice
        interp = tf.lite.Interpreter(model_path=path, num_threads=1)
    (detail,) = interp.get_input_details()
    interp.resize_tensor_input(detail["index"], (1, STEPS), strict=True)
    interp.allocate_tensors()
    return interp


def tflite_perplexity(path, x, y):
    interp = interpreter(path)
    inp = interp.get_input_details()[0]["index"]
    out = interp.get_output_details()[0]["index"]
    losses = []
    for i in range(len(x)):
        interp.set_tensor(inp, x[i:i + 1])
        interp.invoke()
        losses.append(cross_entropy(interp.get_tensor(out), y[i:i + 1]))
    return math.exp(float(np.mean(losses)))


def interleaved(fns, rounds, reps):
    """``{fn: (wall ms, CPU ms)}``: medians over ``rounds`` round-robin
    rounds of ``reps`` calls each. CPU time is this thread's (a 1-thread
    interpreter runs on the caller's thread), which other processes on a
    loaded machine barely change; wall time includes their share."""
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(rounds):
        for k, f in fns.items():
            for _ in range(reps):
                t0, c0 = time.perf_counter(), time.thread_time()
                f()
                cpu[k].append(time.thread_time() - c0)
                wall[k].append(time.perf_counter() - t0)
    return {k: (1e3 * float(np.median(wall[k])),
                1e3 * float(np.median(cpu[k]))) for k in fns}


def measure(args):
    ptb = datasets.load_ptb(args.data)
    x, y = windows(ptb.test, args.test_batches)
    calib = windows(ptb.train)[0][:args.calib_windows]
    os.makedirs(args.work, exist_ok=True)
    rows, fns = [], {}
    for name, file in MODELS:
        model = keras.models.load_model(os.path.join(args.run_dir, file),
                                        compile=False)
        t0 = time.perf_counter()
        keras_ppl = keras_perplexity(model, x, y)
        print(f"{name}: Keras test perplexity {keras_ppl:.2f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        for quantize, label, steps in QUANTIZE:
            path = os.path.join(
                args.work, f"{os.path.splitext(file)[0]}_"
                f"{label.replace(' ', '_')}.tflite")
            t0 = time.perf_counter()
            am.export_tflite(
                model, path, quantize=quantize, steps=steps, overwrite=True,
                representative_data=calib if quantize == "int8" else None)
            convert_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ppl = tflite_perplexity(path, x, y)
            eval_s = time.perf_counter() - t0
            summary = am.tflite_summary(path)
            rows.append(dict(
                model=name, quantize=label, file=os.path.basename(path),
                bytes=os.path.getsize(path), weights=summary["weights"],
                ops=summary["ops"], float_ops=summary["float_ops"],
                tflite_ppl=ppl,
                keras_ppl=keras_ppl, convert_s=convert_s, eval_s=eval_s))
            print(f"  {label}: {os.path.getsize(path) / 1e6:.2f} MB, "
                  f"perplexity {ppl:.2f} (convert {convert_s:.0f} s, "
                  f"evaluate {eval_s:.0f} s)", flush=True)
            fns[(name, label)] = benchmark._tflite_fn(path, x[:1], 1)
    load_before = load_average()
    ms = interleaved(fns, args.rounds, args.reps)
    for row in rows:
        row["wall_ms"], row["ms"] = ms[(row["model"], row["quantize"])]
    return dict(rows=rows, rounds=args.rounds, reps=args.reps,
                test_batches=args.test_batches, run_dir=args.run_dir,
                windows=int(len(x)), tokens=int(x.size),
                calib_windows=int(len(calib)), load_timing_start=load_before,
                load_timing_end=load_average())


def report(res):
    """OUT.md from the measurements (everything from ``res``)."""
    args = argparse.Namespace(**{k: res[k] for k in (
        "rounds", "reps", "test_batches", "run_dir")})
    rows = res["rows"]
    base = {r["model"]: r for r in rows if r["quantize"] == "fp32"}
    teacher = {r["quantize"]: r for r in rows if r["model"] == "teacher"}
    scope = ("the whole test split" if not args.test_batches else
             f"the first {args.test_batches} of the example's 117 test "
             "batches")
    lines = [
        "# int8 on top of AntMan: PTB teacher and LGP-Shuffle g=10 student "
        "as TFLite",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Machine: {res['machine']}; TFLite interpreter (XNNPACK for float "
        "ops), 1 thread, TensorFlow pools 1 thread. Load average "
        f"{res['load_start']} at the start, {res['load_timing_start']} "
        f"before timing, {res['load_timing_end']} after (other work "
        "shares this 2-core VM; the rounds are interleaved so it falls "
        "on every row alike).",
        "",
        f"Models: `{args.run_dir}` (`examples/ptb_word_lm.py`: Embedding "
        "200 -> 2 x LSTM(200) -> Dense(10000); the student has "
        "LGPShuffle(10) on both products of both LSTMs, 10x fewer LSTM "
        "MACs, the embedding and softmax unchanged). Files from "
        "`keras_antman.export_tflite(model, path, quantize=..., "
        "batch_size=1)`: fp32 = `quantize=None` (recurrent loops as TFLite "
        "`WHILE` loops, any length), fp32 unrolled = `steps=35` (one set "
        "of ops per step), dynamic int8 = `\"dynamic\"` (int8 weights, "
        "float activations, `WHILE` loops), full int8 = `\"int8\"` "
        f"calibrated on {res['calib_windows']} 35-token windows of the "
        "training split (unrolled over 35 steps; LGP blocks as one "
        "FULLY_CONNECTED per group). Built-in ops only.",
        "",
        f"Perplexity: {scope} ({res['windows']} windows of 35 tokens, "
        f"{res['tokens']:,} tokens), every window from a zero state as "
        "the example evaluates, one window per interpreter call; the "
        "Keras column is the `.keras` model on the same windows. "
        f"Latency: batch 1, one 35-token window, median of "
        f"{args.rounds} interleaved rounds x {args.reps} calls per file: "
        "CPU time of the calling thread (the 1-thread interpreter runs "
        "there; little changed by the other jobs), and wall time (their "
        "share included). Ratios use CPU time.",
        "",
        "| model | TFLite | size (MB) | size / teacher fp32 | test "
        "perplexity (TFLite) | Keras perplexity | CPU ms | wall ms | "
        "CPU / own fp32 | CPU / teacher same mode | ops on float "
        "activations / all ops |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
        "---: | --- |",
    ]
    for r in rows:
        floats = (f"{sum(r['float_ops'].values())} / "
                  f"{sum(r['ops'].values())}")
        lines.append(
            f"| {r['model']} | {r['quantize']} | {r['bytes'] / 1e6:.2f} | "
            f"{r['bytes'] / teacher['fp32']['bytes']:.3f} | "
            f"{r['tflite_ppl']:.2f} | {r['keras_ppl']:.2f} | "
            f"{r['ms']:.3f} | {r['wall_ms']:.3f} | "
            f"{r['ms'] / base[r['model']]['ms']:.2f}x | "
            f"{r['ms'] / teacher[r['quantize']]['ms']:.2f}x | {floats} |")
    lines += ["", "Constant bytes by type, and the ops reading float32 "
              "activations (all ops, with the unrolled loop bodies and the "
              "WHILE bodies counted once):", ""]
    for r in rows:
        floats = ", ".join(f"{k} {v}" for k, v in
                           sorted(r["float_ops"].items())) or "none"
        lines.append(f"- {r['model']}, {r['quantize']}: " + ", ".join(
            f"{k} {v / 1e6:.3f} MB" for k, v in sorted(r["weights"].items()))
            + f"; float ops: {floats}")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", default="/work/main/runs/ptb_iss")
    parser.add_argument("--data", default=os.path.join(
        HERE, "..", "..", "shared", "data", "ptb"))
    parser.add_argument("--test-batches", type=int, default=0,
                        help="first N of the example's test batches (0: all)")
    parser.add_argument("--calib-windows", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--work", default=os.path.join(
        HERE, "..", "runs", "int8_tflite"))
    parser.add_argument("--out", default=os.path.join(
        HERE, "results", "int8_tflite"))
    parser.add_argument("--from-json", action="store_true",
                        help="rewrite OUT.md from OUT.json, measure nothing")
    args = parser.parse_args()
    if args.from_json:
        with open(args.out + ".json") as f:
            res = json.load(f)
    else:
        start = load_average()
        res = measure(args)
        res.update(
            command=" ".join(["python bench/int8_tflite.py", *sys.argv[1:]]),
            machine=benchmark.machine() + " (XNNPACK and TFLite pick their "
                    "kernels for this CPU at run time)",
            load_start=start)
    text = report(res)
    benchmark.write_atomic(args.out + ".json", json.dumps(res, indent=1))
    benchmark.write_atomic(args.out + ".md", text)
    print(text)


if __name__ == "__main__":
    main()

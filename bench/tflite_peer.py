"""TFLite (XNNPACK, built-in ops only) on our portable export against the
compiled op, LGP-Shuffle g=10, batch 1, T = 100, input = hidden = d.

The peer column of `bench/speedup.py` that issue 18 asks for, measured in
one process with the op called directly; 1 and 2 threads; median of
interleaved rounds. Run it in the same sitting as `bench/speedup.py` and
`../shared/limit/bench.py` so the columns compare.

Usage:
    python bench/tflite_peer.py [--dims 400 800 1600] [--repeats 30]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_antman as am  # noqa: E402
from keras_antman import ops  # noqa: E402
from keras_antman.hardware import cpu_model  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[400, 800, 1600])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores, op ISA "
          f"{ops.instruction_set()}; TF {tf.__version__}. Batch 1, T = 100, "
          f"LGP-Shuffle g=10 on both products, median of {args.repeats} "
          "interleaved rounds (ms).\n")
    print("| d | op 1T | TFLite 1T | op 2T | TFLite 2T | TFLite/op 1T | "
          "TFLite/op 2T |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for d in args.dims:
        rng = np.random.default_rng(d)
        x = rng.normal(size=(1, 100, d)).astype("float32")
        inp = keras.Input((100, d), batch_size=1)
        layer = am.StructuredLSTM(d, input_scheme=am.LGPShuffle(10),
                                  recurrent_scheme=am.LGPShuffle(10))
        model = keras.Model(inp, layer(inp))
        for w in model.weights:
            w.assign(rng.normal(scale=0.05, size=w.shape).astype("float32"))
        cell = layer.cell
        stages = {k: [ops.Stage(tf.constant(s.blocks), s.shuffle)
                      for s in m.kernel_stages()]
                  for k, m in cell.products().items()}
        xt, z = tf.constant(x), tf.zeros((1, d))
        bias = tf.constant(cell.bias)
        with tempfile.TemporaryDirectory() as tmp:
            path = am.export(model, os.path.join(tmp, "sm"),
                             kernel="portable", batch_size=1)
            conv = tf.lite.TFLiteConverter.from_saved_model(path)
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            flat = conv.convert()
        fns = {}
        for t in (1, 2):
            interp = tf.lite.Interpreter(model_content=flat, num_threads=t)
            runner = interp.get_signature_runner()
            name = list(runner.get_input_details())[0]
            fns[f"tflite{t}"] = (lambda r=runner, n=name: r(**{n: x}))
            fns[f"op{t}"] = (lambda t=t: ops.structured_lstm(
                xt, z, z, bias, stages["input"], stages["recurrent"],
                num_threads=t))
        times = {k: [] for k in fns}
        for f in fns.values():
            f()
        for _ in range(args.repeats):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(1e3 * (time.perf_counter() - t0))
        m = {k: float(np.median(v)) for k, v in times.items()}
        print(f"| {d} | {m['op1']:.3f} | {m['tflite1']:.3f} | {m['op2']:.3f} "
              f"| {m['tflite2']:.3f} | {m['tflite1'] / m['op1']:.2f}x | "
              f"{m['tflite2'] / m['op2']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

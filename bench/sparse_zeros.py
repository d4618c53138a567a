"""Do zeros from grow-and-prune make an LSTM faster here? Measured.

One LSTM(512) layer on 512 features, batch 1, 100 timesteps, one thread,
seeded random weights; the same layer with 80% of each kernel pruned by
magnitude (`keras_antman.grow_prune.KernelMasks.prune_to(0.8)`). Each is
timed as the stock Keras layer and as its `compress`ed Dense-scheme twin
on the compiled op, all four interleaved (`keras_antman.hardware.measure`).

Usage:
    python bench/sparse_zeros.py [--repeats 31]

Writes bench/results/sparse_zeros.md.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402

import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_antman as am  # noqa: E402
from keras_antman import grow_prune as gp  # noqa: E402
from keras_antman import hardware as hw  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def make(d):
    inp = keras.Input((100, d))
    model = keras.Model(inp, keras.layers.LSTM(d)(inp))
    r = np.random.default_rng(0)
    model.set_weights([r.normal(scale=0.05, size=w.shape).astype("float32")
                       for w in model.get_weights()])
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    am.ops.set_num_threads(1)
    load_start = os.getloadavg()
    dense, sparse = make(args.d), make(args.d)
    gp.KernelMasks(sparse).prune_to(0.8)
    x = np.random.default_rng(1).normal(
        size=(1, 100, args.d)).astype("float32")
    models = {"Keras LSTM, dense": dense, "Keras LSTM, 80% zeros": sparse}
    if am.ops.is_available():
        models["op (Dense schemes), dense"] = am.compress(dense)
        models["op (Dense schemes), 80% zeros"] = am.compress(sparse)
    times = hw.measure(models, x, repeats=args.repeats)
    load_end = os.getloadavg()
    lines = [
        "# Zeros from magnitude pruning do not make the LSTM faster here",
        "",
        f"LSTM({args.d}) on {args.d} features, batch 1, 100 timesteps, "
        "float32, one thread; 80% of each kernel pruned by magnitude "
        "(`KernelMasks.prune_to(0.8)`). Median and IQR of "
        f"{args.repeats} interleaved calls in a `tf.function` "
        "(`keras_antman.hardware.measure`). Machine: "
        f"{hw.cpu_model()}. Load average (1, 5, 15 min) "
        f"{', '.join(f'{v:.2f}' for v in load_start)} at the start, "
        f"{', '.join(f'{v:.2f}' for v in load_end)} at the end: another "
        "training ran on this 2-core machine, so the times are "
        "provisional; the comparison is within one interleaved run.",
        "",
        "| model | median (ms) | IQR (ms) |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| {k} | {t.median_ms:.2f} | {t.spread_ms:.2f} |"
              for k, t in times.items()]
    text = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sparse_zeros.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()

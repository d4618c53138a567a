"""Cost of the ISS group Lasso in a training step (Zaremba medium LM).

Embedding(V, d) -> LSTM(d) -> LSTM(d) -> Dense(V), d = 650, V = 10000,
batch 20, 35 timesteps, SGD, as Zaremba et al.'s medium model (without
dropout). Two copies of the model are compiled, one with
``keras_antman.iss.GroupLasso`` attached (penalty plus masking
constraints; one unit space per LSTM, 1300 components), and
``train_on_batch`` is timed on both, interleaved (A B, then B A, ...) so that
machine noise hits both equally; the table gives the medians and their
ratio, measured in one run.

    python bench/iss_step_cost.py [--repeats 8] [--out bench/results/...]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_antman import iss  # noqa: E402
from keras_antman.hardware import cpu_model  # noqa: E402


def build(d, vocab, steps):
    inp = keras.Input((steps,), dtype="int32")
    x = keras.layers.Embedding(vocab, d)(inp)
    x = keras.layers.LSTM(d, return_sequences=True)(x)
    x = keras.layers.LSTM(d, return_sequences=True)(x)
    model = keras.Model(inp, keras.layers.Dense(vocab)(x))
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=650)
    p.add_argument("--vocab", type=int, default=10000)
    p.add_argument("--batch", type=int, default=20)
    p.add_argument("--steps", type=int, default=35)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args()

    keras.utils.set_random_seed(0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    plain = build(a.d, a.vocab, a.steps)
    regularised = build(a.d, a.vocab, a.steps)
    regularised.set_weights(plain.get_weights())
    gl = iss.GroupLasso(regularised, strength=1e-4)
    for m in (plain, regularised):
        m.compile(keras.optimizers.SGD(1.0), loss)
    rng = np.random.default_rng(0)
    x = rng.integers(0, a.vocab, (a.batch, a.steps)).astype("int32")
    y = rng.integers(0, a.vocab, (a.batch, a.steps)).astype("int32")

    times = {"plain": [], "iss": []}
    pairs = (("plain", plain), ("iss", regularised))
    for i in range(a.warmup + a.repeats):
        for name, m in pairs if i % 2 == 0 else pairs[::-1]:
            t0 = time.perf_counter()
            m.train_on_batch(x, y)
            dt = time.perf_counter() - t0
            if i >= a.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["iss"] / med["plain"]
    # Each timed round runs both models back to back: the median of the
    # per-round ratios is robust to load that drifts between rounds.
    paired = statistics.median(
        i / p for i, p in zip(times["iss"], times["plain"]))
    comps = sum(s.units for s in gl.trace.spaces)
    penalised = sum(int(np.prod(v.shape))
                    for v in gl.trace.variables.values())
    threads = (tf.config.threading.get_intra_op_parallelism_threads()
               or os.cpu_count())
    lines = [
        "# ISS group Lasso: training-step cost",
        "",
        f"Model: Embedding({a.vocab}, {a.d}) -> LSTM({a.d}) -> LSTM({a.d}) "
        f"-> Dense({a.vocab}); batch {a.batch}, {a.steps} timesteps, SGD; "
        f"`train_on_batch`, {a.warmup} warm-up + {a.repeats} timed steps "
        "each, interleaved, median.",
        f"Regulariser: `iss.GroupLasso` over {comps} components "
        f"({penalised:,} weights in {len(gl.trace.variables)} kernels), "
        "with its masking constraints.",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPUs, TF intra-op "
        f"threads {threads} (TF default: all cores); TensorFlow "
        f"{tf.__version__}, Keras {keras.__version__}.",
        "",
        "| step | median (ms) | min (ms) | max (ms) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, label in (("plain", "without regulariser"),
                        ("iss", "with ISS group Lasso")):
        v = times[name]
        lines.append(f"| {label} | {1e3 * med[name]:.1f} | "
                     f"{1e3 * min(v):.1f} | {1e3 * max(v):.1f} |")
    lines += ["", f"**Ratio (with / without): {ratio:.3f}x** of the "
              f"medians; median of the per-round ratios {paired:.3f}x "
              "(target <= 1.3x)."]
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

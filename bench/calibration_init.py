"""Data-aware initialisation vs `from_dense` on a small trained char LSTM.

Trains a 2-layer character LSTM on the first characters of PTB (briefly,
on CPU), then compresses it with each scheme twice: `from_dense` only and
with ``calibration_data`` (the first training batches). Prints each
product's relative output error on the calibration rows and the
held-out cross-entropy (nats/char) before any fine-tuning.

Usage: python bench/calibration_init.py [PTB_DIR] [--units 128]
       [--steps 400]
Not a test: an accuracy measurement, written to stdout.
"""

import argparse
import os
import platform

import keras
import numpy as np
import tensorflow as tf

import keras_antman as am


def char_data(ptb_dir, chars):
    text = open(os.path.join(ptb_dir, "ptb.train.txt")).read()[:chars]
    vocab = sorted(set(text))
    ids = np.array([vocab.index(c) for c in text], "int32")
    return ids, len(vocab)


def windows(ids, seq, batch, start, count):
    x, y = [], []
    for i in range(count * batch):
        j = start + i * seq
        x.append(ids[j: j + seq])
        y.append(ids[j + 1: j + seq + 1])
    x, y = np.stack(x), np.stack(y)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("ptb_dir", nargs="?", default="../shared/data/ptb")
    p.add_argument("--units", type=int, default=128)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seq", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--calibration-steps", type=int, default=20)
    args = p.parse_args()
    keras.utils.set_random_seed(0)
    ids, vocab = char_data(args.ptb_dir, 2_000_000)
    per = args.seq * args.batch
    train = windows(ids, args.seq, args.batch, 0, args.steps)
    held = windows(ids, args.seq, args.batch, args.steps * per + 1, 10)
    teacher = keras.Sequential([
        keras.Input((args.seq,), dtype="int32"),
        keras.layers.Embedding(vocab, 32),
        keras.layers.LSTM(args.units, return_sequences=True, name="lstm_1"),
        keras.layers.LSTM(args.units, return_sequences=True, name="lstm_2"),
        keras.layers.Dense(vocab),
    ])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    teacher.compile(keras.optimizers.Adam(3e-3), loss)
    teacher.fit(train, epochs=1, verbose=0)
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"TF {tf.__version__}, Keras {keras.__version__}; char LSTM "
          f"2x{args.units}, seq {args.seq}, batch {args.batch}, "
          f"{args.steps} training steps; calibration "
          f"{args.calibration_steps} batches")
    base = teacher.evaluate(held, verbose=0)
    print(f"teacher held-out loss {base:.3f} nats/char")
    schemes = {
        "LGPShuffle(4)": am.LGPShuffle(4),
        "LowRank(rank_reduction=4)": am.LowRank(rank_reduction=4),
        "LGPDense(4)": am.LGPDense(4),
        "LowRankLGP(4,4,2)": am.LowRankLGP(4, 4, 2),
    }
    for name, scheme in schemes.items():
        # The embedding (32) is too narrow for some input schemes: keep the
        # input products of lstm_1 dense, compress everything else.
        policy = {"lstm_1": (None, scheme), "lstm_2": (scheme, scheme)}
        plain = am.compress(teacher, layers=policy)
        fitted = am.compress(teacher, layers=policy, calibration_data=train,
                             calibration_steps=args.calibration_steps)
        losses = []
        for student in (plain, fitted):
            student.compile(loss=loss)
            losses.append(student.evaluate(held, verbose=0))
        print(f"\n{name}: held-out loss from_dense {losses[0]:.3f}, "
              f"data-aware {losses[1]:.3f} (teacher {base:.3f})")
        print(fitted.calibration_errors)


if __name__ == "__main__":
    main()

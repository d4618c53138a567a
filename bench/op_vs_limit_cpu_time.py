"""The op against the limit kernel by the calling thread's CPU time.

On a shared machine wall-clock medians carry whatever else runs; the CPU
time of the calling thread leaves out the time it is descheduled. The op
(1 thread, LGP-Shuffle g=10 on both products) and the limit kernel of
``../shared/limit`` (``liblimit_native.so``, built by its ``build.sh``)
run in the same thread, interleaved; each figure is the minimum over
``--rounds`` x 3 calls (ms). One thread only: an OpenMP team's other
threads are not in the calling thread's CPU time.

Usage:
    python bench/op_vs_limit_cpu_time.py [--dims 400 800 1600]
        [--batches 1] [--rounds 15]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_antman import ops  # noqa: E402
from keras_antman.hardware import cpu_model  # noqa: E402
from keras_antman.ops import Stage  # noqa: E402

T = 100
G = 10


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+",
                        default=[400, 800, 1600])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--limit-build", default=os.environ.get(
        "LIMIT_BUILD", os.path.expanduser("~/.cache/antman-limit")))
    args = parser.parse_args()
    lib = ctypes.CDLL(os.path.join(args.limit_build, "liblimit_native.so"))
    lib.lstm_create.restype = ctypes.c_void_p
    lib.lstm_create.argtypes = [ctypes.c_int] * 5 + [ctypes.c_uint]
    lib.lstm_run.restype = ctypes.c_double
    lib.lstm_run.argtypes = [ctypes.c_void_p]
    print(f"{cpu_model()}, {os.cpu_count()} cores, op ISA "
          f"{ops.instruction_set()}, 1 thread, T = {T}, "
          f"LGP-Shuffle g={G}; load average "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| d | batch | op ms (per sequence) | limit ms | op / limit |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for d in args.dims:
        for batch in args.batches:
            rng = np.random.default_rng(0)

            def w(*shape):
                return tf.constant((rng.standard_normal(shape)
                                    / np.sqrt(shape[-2])).astype("f"))

            x = tf.constant(rng.standard_normal((batch, T, d)).astype("f"))
            z = tf.zeros((batch, d))
            bias = tf.zeros(4 * d)
            ins = [Stage(w(G, d // G, 4 * d // G), True)]
            rec = [Stage(w(G, d // G, 4 * d // G), True)]
            fns = {"op": lambda: ops.structured_lstm(
                x, z, z, bias, ins, rec, num_threads=1)}
            if batch == 1:
                model = lib.lstm_create(1, d, G, T, 1, 3)
                fns["limit"] = lambda m=model: lib.lstm_run(m)
            times = {k: [] for k in fns}
            for f in fns.values():
                f()
            for _ in range(args.rounds):
                for k, f in fns.items():
                    for _ in range(3):
                        t0 = time.thread_time()
                        f()
                        times[k].append(1e3 * (time.thread_time() - t0))
            best = {k: min(v) for k, v in times.items()}
            lim = best.get("limit")
            print(f"| {d} | {batch} | {best['op']:.3f} "
                  f"({best['op'] / batch:.3f}) | "
                  + (f"{lim:.3f} | {best['op'] / lim:.2f}x |" if lim else
                     "– | – |"), flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""The op against the limit kernel (and TFLite) by the calling thread's CPU
time.

On a shared machine wall-clock medians carry whatever else runs; the CPU
time of the calling thread leaves out the time it is descheduled. The op
(1 thread) runs the models of ``bench/op_peers.py`` (same layers, same
lowering, called the same way); the limit kernel of ``../shared/limit``
(``liblimit_native.so``, built by its ``build.sh``, LGP-Shuffle g=10 rows
at batch 1) and, with ``--tflite``, TFLite (XNNPACK, 1 thread, in the
calling thread) on the package's portable export run in the same thread,
interleaved; each figure is the minimum over ``--rounds`` x 3 calls (ms).
One thread only: an OpenMP team's other threads are not in the calling
thread's CPU time.

Cells: ``lgp`` LSTM LGP-Shuffle g=10, ``lowrank`` LSTM LowRank-LGP g=10
r=2, ``gru`` GRU LGP-Shuffle g=10.

Usage:
    python bench/op_vs_limit_cpu_time.py [--dims 400 800 1600]
        [--batches 1] [--rounds 15] [--cells lgp lowrank gru] [--tflite]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from op_peers import T  # noqa: E402
from op_peers import model_for  # noqa: E402
from op_peers import op_fn  # noqa: E402
from op_peers import tflite_fns  # noqa: E402

import keras_antman as am  # noqa: E402
from keras_antman import ops  # noqa: E402
from keras_antman.hardware import cpu_model  # noqa: E402

G = 10
CELLS = {  # name, layer class, scheme
    "lgp": ("LSTM LGP-Shuffle g=10", am.StructuredLSTM,
            lambda: am.LGPShuffle(G)),
    "lowrank": ("LSTM LowRank-LGP g=10 r=2", am.StructuredLSTM,
                lambda: am.LowRankLGP(G, G, 2)),
    "gru": ("GRU LGP-Shuffle g=10", am.StructuredGRU,
            lambda: am.LGPShuffle(G)),
}


def limit_lib(build):
    lib = ctypes.CDLL(os.path.join(build, "liblimit_native.so"))
    lib.lstm_create.restype = ctypes.c_void_p
    lib.lstm_create.argtypes = [ctypes.c_int] * 5 + [ctypes.c_uint]
    lib.lstm_run.restype = ctypes.c_double
    lib.lstm_run.argtypes = [ctypes.c_void_p]
    return lib


def min_ms(fns, rounds):
    """Minimum thread CPU time (ms) of each fn, interleaved rounds."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            for _ in range(3):
                t0 = time.thread_time()
                f()
                times[k].append(1e3 * (time.thread_time() - t0))
    return {k: min(v) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+",
                        default=[400, 800, 1600])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--cells", nargs="+", choices=sorted(CELLS),
                        default=["lgp"])
    parser.add_argument("--tflite", action="store_true",
                        help="add TFLite on the portable export (batch 1)")
    parser.add_argument("--limit-build", default=os.environ.get(
        "LIMIT_BUILD", os.path.expanduser("~/.cache/antman-limit")))
    args = parser.parse_args()
    lib = limit_lib(args.limit_build)
    print(f"{cpu_model()}, {os.cpu_count()} cores, op ISA "
          f"{ops.instruction_set()}, 1 thread, T = {T}; load average "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| cell | d | batch | op ms (per sequence) | limit ms | op / limit "
          "| TFLite ms | TFLite / op |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for d in args.dims:
        for batch in args.batches:
            x = np.random.default_rng(d).normal(
                size=(batch, T, d)).astype("float32")
            for i, cell in enumerate(args.cells):
                name, cls, scheme = CELLS[cell]
                model, layer = model_for(cls, scheme(), d, batch, seed=i)
                fns = {"op": op_fn(layer, x, 1)}
                if batch == 1 and cell == "lgp":
                    model_ptr = lib.lstm_create(1, d, G, T, 1, 3)
                    fns["limit"] = lambda m=model_ptr: lib.lstm_run(m)
                if batch == 1 and args.tflite:
                    fns["tflite"] = tflite_fns(model, x)[1]
                best = min_ms(fns, args.rounds)
                op, lim, tfl = (best.get(k) for k in ("op", "limit",
                                                      "tflite"))
                print(f"| {name} | {d} | {batch} | {op:.3f} "
                      f"({op / batch:.3f}) | "
                      + (f"{lim:.3f} | {op / lim:.2f}x | " if lim else
                         "– | – | ")
                      + (f"{tfl:.3f} | {tfl / op:.2f}x |" if tfl else
                         "– | – |"), flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""Where a 2-thread call's time goes at batch 1 (LSTM LGP-Shuffle), by wall
time: the op on 1 and 2 threads at T = 1 and T = 100, interleaved in one
process, and the limit kernel of ``../shared/limit`` on 1 and 2 threads.

An OpenMP team's time is not in the calling thread's CPU time, so this
measures wall time: the minimum and the 10th percentile of many short
calls. It means something only on a quiet machine (nothing else on the
cores): under load a 2-thread team waits for a core at every step.

Derived per call: the team's start (2T - 1T at T = 1), and per step the
2-thread step against half the 1-thread step ((T=100 - T=1) / 99).

Usage:
    python bench/two_thread_step.py [--dims 400] [--calls 600]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from op_peers import model_for  # noqa: E402
from op_peers import op_fn  # noqa: E402
from op_vs_limit_cpu_time import limit_lib  # noqa: E402

import keras_antman as am  # noqa: E402
from keras_antman import ops  # noqa: E402
from keras_antman.hardware import cpu_model  # noqa: E402

G = 10


def wall_ms(fns, calls):
    """Min and 10th percentile wall time (ms) of each fn, interleaved."""
    times = {k: [] for k in fns}
    for f in fns.values():
        for _ in range(10):
            f()
    for _ in range(calls // 4):
        for k, f in fns.items():
            for _ in range(4):
                t0 = time.perf_counter_ns()
                f()
                times[k].append((time.perf_counter_ns() - t0) / 1e6)
    return {k: (min(v), float(np.percentile(v, 10))) for k, v in
            times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[400])
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--limit-build", default=os.environ.get(
        "LIMIT_BUILD", os.path.expanduser("~/.cache/antman-limit")))
    args = parser.parse_args()
    ops._set_min_parallel_work(0, 0)  # 2 threads as asked, no measuring
    try:
        lib = limit_lib(args.limit_build)
    except OSError:
        lib = None
    print(f"{cpu_model()}, {os.cpu_count()} cores, op ISA "
          f"{ops.instruction_set()}; load average "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| d | what | 1T min (p10) ms | 2T min (p10) ms | 1T / 2T |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for d in args.dims:
        model, layer = model_for(am.StructuredLSTM, am.LGPShuffle(G), d, 1,
                                 seed=0)
        fns = {}
        for steps in (1, 100):
            x = np.random.default_rng(d).normal(
                size=(1, steps, d)).astype("float32")
            for threads in (1, 2):
                fns[(f"op T={steps}", threads)] = op_fn(layer, x, threads)
        if lib is not None:
            for threads in (1, 2):
                m = lib.lstm_create(1, d, G, 100, threads, 3)
                fns[("limit T=100", threads)] = lambda m=m: lib.lstm_run(m)
        best = wall_ms(fns, args.calls)
        for what in dict.fromkeys(k for k, _ in fns):
            (a, a10), (b, b10) = best[(what, 1)], best[(what, 2)]
            print(f"| {d} | {what} | {a:.4f} ({a10:.4f}) | {b:.4f} "
                  f"({b10:.4f}) | {a / b:.2f}x |")
        step1 = (best[("op T=100", 1)][0] - best[("op T=1", 1)][0]) / 99
        step2 = (best[("op T=100", 2)][0] - best[("op T=1", 2)][0]) / 99
        start = best[("op T=1", 2)][0] - best[("op T=1", 1)][0]
        print(f"\nd = {d}, from the minima: team start {1e3 * start:.1f} us; "
              f"step 1T {1e3 * step1:.2f} us, 2T {1e3 * step2:.2f} us "
              f"(half of 1T: {5e2 * step1:.2f} us; the rest, barrier and "
              f"imbalance: {1e3 * (step2 - step1 / 2):.2f} us)\n")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

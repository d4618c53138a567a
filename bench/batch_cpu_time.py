"""Two builds of the op at batch > 1 by the calling thread's CPU time.

Each build (a folder holding a ``keras_antman`` package with its compiled
op) runs in its own process, the builds alternating ``--pairs`` times (two
op libraries cannot share a process); each process times ``--calls`` calls
per case of the ``bench/op_peers.py`` models (1 thread, T = 100) with
``time.thread_time``. The table has, per case and build, the minimum over
all its calls (ms per call and per sequence), the median of the processes'
medians, the structured product's rate at the minimum (2 x T x the cell's
multiply-adds per sequence) and its share of ``--peak`` GFLOP/s (117: one
Zen 4 core's FMA peak, measured by bench/op_peers.py in a quiet run).

Cells: ``lgp`` LSTM LGP-Shuffle g=10, ``lowrank`` LSTM LowRank-LGP g=10
r=2, ``gru`` GRU LGP-Shuffle g=10.

Usage:
    python bench/batch_cpu_time.py --builds BEFORE AFTER [--dims 400 800]
        [--batches 1 8 32] [--cells lgp] [--pairs 3] [--calls 20]
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def measure(args):
    """This process's build: {case: [ms per call]} as JSON on stdout."""
    sys.path.insert(0, HERE)
    from op_peers import T  # noqa: PLC0415
    from op_peers import model_for  # noqa: PLC0415
    from op_peers import op_fn  # noqa: PLC0415
    from op_vs_limit_cpu_time import CELLS  # noqa: PLC0415

    out = {}
    for cell in args.cells:
        _, cls, scheme = CELLS[cell]
        for d in args.dims:
            for batch in args.batches:
                model, layer = model_for(cls, scheme(), d, batch, seed=0)
                x = np.random.default_rng(d).normal(
                    size=(batch, T, d)).astype("float32")
                f = op_fn(layer, x, 1)
                f()
                times = []
                for _ in range(args.calls):
                    t0 = time.thread_time()
                    f()
                    times.append(1e3 * (time.thread_time() - t0))
                flop = 2 * T * sum(
                    m.macs() for m in layer.cell.products().values())
                out[f"{cell} {d} {batch}"] = {"ms": times, "flop": flop}
    print(json.dumps(out))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--builds", nargs=2, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--dims", type=int, nargs="+", default=[400, 800])
    parser.add_argument("--batches", type=int, nargs="+",
                        default=[1, 8, 32])
    parser.add_argument("--cells", nargs="+", default=["lgp"])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--peak", type=float, default=117.0)
    parser.add_argument("--measure", action="store_true",
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return
    if not args.builds:
        parser.error("--builds BEFORE AFTER is required")
    child = [sys.executable, os.path.abspath(__file__), "--measure",
             "--dims", *map(str, args.dims),
             "--batches", *map(str, args.batches),
             "--cells", *args.cells, "--calls", str(args.calls)]
    runs = {b: [] for b in args.builds}
    load = [os.getloadavg()[0]]
    for _ in range(args.pairs):
        for build in args.builds:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(build))
            res = subprocess.run(child, env=env, capture_output=True,
                                 text=True, check=True)
            runs[build].append(json.loads(res.stdout.splitlines()[-1]))
            load.append(os.getloadavg()[0])
    before, after = args.builds
    print(f"1 thread, thread CPU time; {args.pairs} alternating pairs of "
          f"processes x {args.calls} calls; load average (1 min) "
          f"{min(load):.2f}-{max(load):.2f}; % of {args.peak:g} GFLOP/s\n")
    print("| cell | d | batch | before min ms (per seq) | after min ms "
          "(per seq) | before / after | median ms before, after | "
          "GFLOP/s before, after (% of peak) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for case in runs[before][0]:
        cell, d, batch = case.split()
        b = int(batch)
        mins, meds = [], []
        for build in args.builds:
            ms = [t for r in runs[build] for t in r[case]["ms"]]
            mins.append(min(ms))
            meds.append(float(np.median(
                [np.median(r[case]["ms"]) for r in runs[build]])))
        flop = runs[before][0][case]["flop"] * b
        rates = [flop / m / 1e6 for m in mins]
        print(f"| {cell} | {d} | {b} | {mins[0]:.3f} ({mins[0] / b:.3f}) | "
              f"{mins[1]:.3f} ({mins[1] / b:.3f}) | "
              f"{mins[0] / mins[1]:.2f}x | {meds[0]:.3f}, {meds[1]:.3f} | "
              + ", ".join(f"{r:.0f} ({r / args.peak:.0%})" for r in rates)
              + " |")


if __name__ == "__main__":
    main()

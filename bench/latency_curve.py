"""Latency against LSTM size on this machine: the hysteresis curve.

Yin et al. (arXiv 1901.10997) observe that LSTM latency is not monotonic
in size on real hardware. This script measures it here with
`keras_antman.hardware.profile`: batch 1, 100 timesteps, input = hidden,
float32 inference, one thread, hidden sizes from 64 to 1024 with fine
steps (1, 8 and 16) around 256 and 512 and at the sizes where the fused
recurrent weights of a Dense, g=4 and g=8 LSTM cross this machine's L2
and L3 caches; paths: stock ``keras.layers.LSTM`` and the compiled op
with Dense, LGP-Shuffle g=4 and g=8 schemes, each called as a layer in a
``tf.function``. The sweep runs in 3 passes (8 calls per configuration
each, alternating direction) so that bursts of load from other processes
spread over all sizes. Valleys are named with a 5% tolerance and beyond
the spreads (a configuration is a valley when some smaller one of the
same path and scheme is more than 5% slower, and their interquartile
bands, centred on the medians, do not overlap).

Usage:
    python bench/latency_curve.py [--repeats 24] [--passes 3]

Writes bench/results/latency_curve.{json,md,png}. Rows are also kept in
the profile cache (~/.cache/keras_antman), so an interrupted run resumes.
"""

import os

# One thread for OpenBLAS and TensorFlow; set before numpy / TF load.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

import keras_antman as am  # noqa: E402
from keras_antman import hardware as hw  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TOLERANCE = 0.05
VALLEYS = dict(tolerance=TOLERANCE, beyond_spread=True)


def _load():
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _confirm(p, found, repeats):
    """Each valley and the smaller configuration it beats by the most,
    timed again together (interleaved, ``repeats`` calls each)."""
    if not found:
        return []
    pairs = [(v.row, max(v.beats, key=lambda b: b.median_ms))
             for v in found]
    unique = list({r.config: r for pair in pairs for r in pair}.values())
    again = {r.config: r for r in p.remeasure(unique, repeats=repeats)}
    lines = [
        f"Each valley and the smaller size it beats by the most, timed "
        f"again together: {repeats} interleaved calls each, right after "
        "the sweep.",
        "",
        "| valley | beats | sweep (ms) | again (ms) | confirmed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for v, b in pairs:
        va, ba = again[v.config], again[b.config]
        ok = ba.median_ms > (1 + TOLERANCE) * va.median_ms
        lines.append(
            f"| {v.path} {v.scheme} {v.hidden} | {b.hidden} | "
            f"{v.median_ms:.3f} vs {b.median_ms:.3f} | "
            f"{va.median_ms:.3f} (IQR {va.spread_ms:.3f}) vs "
            f"{ba.median_ms:.3f} (IQR {ba.spread_ms:.3f}) | "
            f"{'yes' if ok else 'no'} |")
    return lines


def _choices(p):
    """What `choose` picks on the op path at a few budgets: the stock
    Keras latencies of 256 and 512 units."""
    lines = []
    keras_rows = {r.hidden: r for r in p.rows if r.path == "keras"}
    for h in (256, 512):
        if h not in keras_rows:
            continue
        budget = keras_rows[h].median_ms
        try:
            c = hw.choose(p, budget_ms=budget, paths=("op",),
                          tolerance=TOLERANCE)
        except ValueError as e:
            lines.append(f"- budget {budget:.3f} ms: {e}")
            continue
        lines.append(
            f"- budget {budget:.3f} ms (stock Keras LSTM({h})): most "
            f"parameters on the op: {c.scheme} hidden {c.hidden}, "
            f"{c.params:,} parameters, {c.median_ms:.3f} ms")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--around", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--low", type=int, default=64)
    parser.add_argument("--high", type=int, default=1024)
    parser.add_argument("--coarse", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=24)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--confirm-repeats", type=int, default=61)
    parser.add_argument("--cache", default=None,
                        help="profile cache directory (default: "
                        "~/.cache/keras_antman)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"),
                        help="folder for NAME.{md,json,png}")
    parser.add_argument("--name", default="latency_curve",
                        help="base name of the written files")
    parser.add_argument("--paths", nargs="+", default=["keras", "op"],
                        choices=hw.PATHS,
                        help="paths to time (tflite: a conversion per "
                        "configuration, a few seconds each)")
    args = parser.parse_args()
    if not am.ops.is_available():
        raise SystemExit("The compiled op is not built: "
                         + am.ops.HOW_TO_BUILD)
    load_start = _load()
    t0 = time.time()
    sizes = hw.propose_sizes(around=args.around, low=args.low,
                             high=args.high, coarse=args.coarse,
                             groups=(1, 4, 8))
    p = hw.profile(sizes, batch_size=1, steps=100, threads=1,
                   schemes=[am.Dense(), am.LGPShuffle(4), am.LGPShuffle(8)],
                   paths=args.paths, repeats=args.repeats,
                   passes=args.passes, cache=args.cache)
    found = p.valleys(**VALLEYS)
    confirmation = _confirm(p, found, args.confirm_repeats)
    minutes = (time.time() - t0) / 60
    load_end = _load()
    command = "python bench/latency_curve.py " + " ".join(sys.argv[1:])
    p.meta.update({
        "command": command.strip(),
        "load_average_1_5_15_at_start": load_start,
        "load_average_1_5_15_at_end": load_end,
        "minutes": round(minutes, 1),
        "measured_now": p.measured,
    })
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, args.name)
    p.to_json(base + ".json")
    p.plot(base + ".png", **VALLEYS)
    caches = ", ".join(f"{k} {v // 1024} KiB"
                       for k, v in p.meta.get("caches", {}).items())
    # The sweep itself keeps one of the two cores busy (load ~1); above
    # 1.5 something else ran beside it and the valleys are suspect.
    busy = max(float(load_start.split(',')[0]),
               float(load_end.split(',')[0])) > 1.5
    loads = (f"load average 1, 5, 15 min: {load_start} at the start, "
             f"{load_end} at the end")
    header = [
        "# LSTM latency against size on this machine"
        + (" (provisional)" if busy else ""),
        "",
        (f"**Provisional:** something else ran beside the sweep on this "
         f"2-core machine ({loads}). Rerun on an idle machine before "
         "drawing conclusions." if busy else
         f"Measured on an otherwise idle 2-core machine ({loads}; the "
         "sweep itself accounts for about 1)."),
        "",
        f"Command: `{command.strip()}` ({minutes:.1f} min; "
        f"{p.measured} configurations measured now, the rest from the "
        "profile cache). Caches (sysfs, CPU 0): " + caches + ".",
        "",
        "Batch 1, 100 timesteps, input = hidden, float32 inference, one "
        "layer called in a `tf.function` on a constant input (TF dispatch "
        "included). One thread: TF intra/inter-op 1, the op's OpenMP team "
        f"1. Median of {args.repeats} calls in {args.passes} passes over "
        "the sweep (alternating direction), each pass with 2 warm-up calls "
        "and configurations of neighbouring sizes interleaved round-robin "
        "in chunks of 12; IQR = interquartile range. Paths: `keras` = stock "
        "`keras.layers.LSTM`; `op` = `StructuredLSTM(kernel=\"compiled\")` "
        "with the scheme on both products; `portable` = the same on stock "
        "TF ops; `tflite` = the TFLite interpreter (XNNPACK, 1 thread) on "
        "that layer's portable export, built-in ops only.",
        "",
        "## Valleys",
        "",
        f"A configuration that some smaller configuration of the same path "
        f"and scheme is more than {TOLERANCE:.0%} slower than, with the "
        "interquartile bands apart (`keras_antman.hardware.valleys(rows, "
        "tolerance=0.05, beyond_spread=True)`):",
        "",
    ]
    header += [f"- {v.describe()}" for v in found] or ["- none"]
    header += [""] + confirmation
    header += ["", "## What `choose` picks", ""] + _choices(p)
    header += ["", "## All rows", ""]
    text = "\n".join(header) + "\n" + p.to_markdown(**VALLEYS)
    with open(base + ".md", "w") as f:
        f.write(text)
    print("\n".join(header[:12]))
    print(f"{len(found)} valleys; wrote {base}.{{json,md,png}}")


if __name__ == "__main__":
    main()

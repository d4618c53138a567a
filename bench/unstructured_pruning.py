"""Unstructured pruning against AntMan at the same theoretical reduction,
measured (issue 20 item 4; the AntMan paper's Table 7: unstructured
pruning at 10x theoretical runs under 4x faster).

Times the LSTM stack (two LSTM(200) on a 200-wide input; batch 1, 35
steps, 1 thread; embedding and output layer left out) of:

- the PTB teacher and the tfmot rows of an ``examples/ptb_word_lm.py
  --students tfmot`` run (stripped stock LSTMs with zeros), each on two
  paths of the compiled op: *op dense*, `Dense` schemes (the zeros kept
  and multiplied), and *op CSR*, only the kernels' non-zeros as the op's
  CSR sparse term (`Doped(LowRank(rank=1))` with a zero base, as in
  bench/gp_sparse_path.py; the base adds 1,000 MACs per product);
- AntMan LGP-Shuffle at the same theoretical reductions (the trained
  students found in the runs; one missing is timed on the teacher's
  weights, which does not change its speed, and has no perplexity).

Every path is an ``export(kernel="compiled")`` SavedModel loaded in this
process, checked against the model's Keras stack on the same input, then
timed interleaved (a random order per round), by wall clock and by
process CPU time (`round_robin`). Writes
bench/results/unstructured_pruning.{md,json}; ``--store`` also puts the
times in the run's results.json, for ``ptb_word_lm.py --stages report``.

    python bench/unstructured_pruning.py --run-dir runs/ptb_tfmot \\
        --teacher-run /work/main/runs/ptb_iss --store
"""
import argparse
import importlib.util
import json
import os
import shlex
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

import keras_antman as am  # noqa: E402
from keras_antman import hardware as hw  # noqa: E402
from keras_antman import ops  # noqa: E402
from keras_antman._keras import keras  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS, WIDTH = 35, 200
KERAS_MAJOR = int(keras.__version__.split(".")[0])


def _example():
    path = os.path.join(HERE, "..", "examples", "ptb_word_lm.py")
    spec = importlib.util.spec_from_file_location("ptb_word_lm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lstm_stack(model):
    """The model's LSTM layers (stock or structured) on [1, 35, 200]."""
    layers = [layer for layer in model.layers
              if isinstance(layer, (keras.layers.LSTM, am.StructuredLSTM))]
    return keras.Sequential([keras.Input((STEPS, WIDTH), batch_size=1)]
                            + layers)


def csr_stack(stack):
    """``stack`` (stock LSTMs) with every kernel as the op's CSR term: a
    `Doped` matrix whose rank-1 base is zero and whose ``S`` is the
    kernel itself, zeros left out."""
    doped = am.Doped(am.LowRank(rank=1), sparsity=0.5)
    out = am.compress(stack, input_scheme=doped, recurrent_scheme=doped)
    for stock, layer in zip(stack.layers, out.layers):
        for w, matrix in ((stock.cell.kernel, layer.input_matrix),
                          (stock.cell.recurrent_kernel,
                           layer.recurrent_matrix)):
            w = np.asarray(w)
            arrays = matrix.weight_arrays()
            matrix.set_weight_arrays({
                "base_u": np.zeros_like(arrays["base_u"]),
                "base_v": np.zeros_like(arrays["base_v"]),
                "sparse": w, "mask": (w != 0).astype("float32")})
    return out


def exported(model, x, reference):
    """The compiled export of ``model``, loaded, as a no-argument call;
    its output must match ``reference`` (the Keras stack's)."""
    path = am.export(model, os.path.join(tempfile.mkdtemp(), "m"),
                     kernel="compiled", batch_size=1)
    fn = tf.saved_model.load(path).signatures["serving_default"]
    got = next(iter(fn(x).values())).numpy()
    err = float(np.max(np.abs(got - reference)))
    if err > 1e-4:
        raise AssertionError(f"{model.name}: export differs from Keras by "
                             f"{err:.2e}")
    return lambda: fn(x)


def _lgp_row(run_dirs, g):
    """``(run dir, .keras file, test ppl)`` of the first trained
    LGP-Shuffle g student (teacher init, this name untagged) in
    ``run_dirs``, or None."""
    for d in run_dirs:
        path = os.path.join(d, f"student_LGP_Shuffle_g_{g}.keras")
        results = os.path.join(d, "results.json")
        if not (os.path.exists(path) and os.path.exists(results)):
            continue
        with open(results) as f:
            row = json.load(f).get("students", {}).get(f"LGP-Shuffle g={g}")
        if row:
            return d, path, row["test_ppl"]
    return None


def cpu():
    """The CPU's name, family and model (AMD family 25 = 19h; models
    10h-1Fh, 60h-7Fh and A0h-AFh are Zen 4)."""
    info = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    family, model = int(info.get("cpu family", 0)), int(info.get("model", 0))
    zen4 = family == 25 and (0x10 <= model < 0x20 or 0x60 <= model < 0x80
                             or 0xA0 <= model < 0xB0)
    return (f"{hw.cpu_model()} (family {family}, model {model}"
            + (": Zen 4" if zen4 else "") + ")")


def round_robin(fns, repeats, warmup=5, seed=0):
    """Wall-clock and process CPU latencies (ms) of callables, each called
    once per round, in a fresh random order every round: a fixed order
    would always run a callable after the same one, whose weights it
    finds in the caches instead of its own (a 20% bias measured here
    between two equal dense stacks). On a shared VM the wall clock counts
    the time this process waits for a core; the process's CPU time does
    not (TF and the op run on one thread here)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    wall, cpu_ms = ([[] for _ in fns] for _ in range(2))
    rng = np.random.default_rng(seed)
    for _ in range(repeats):
        for i in rng.permutation(len(fns)):
            t0, c0 = time.perf_counter(), time.process_time()
            fns[i]()
            cpu_ms[i].append(1e3 * (time.process_time() - c0))
            wall[i].append(1e3 * (time.perf_counter() - t0))
    return wall, cpu_ms


def stats(ms, cpu_ms):
    p10, q25, q50, q75 = np.percentile(ms, [10, 25, 50, 75])
    c25, c50, c75 = np.percentile(cpu_ms, [25, 50, 75])
    return dict(median_ms=float(q50), iqr_ms=float(q75 - q25),
                p10_ms=float(p10), cpu_median_ms=float(c50),
                cpu_iqr_ms=float(c75 - c25), repeats=len(ms))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True,
                   help="a ptb_word_lm.py run with --students tfmot rows")
    p.add_argument("--teacher-run", required=True,
                   help="the run holding teacher.keras and the AntMan "
                        "students (the tfmot run's --reuse)")
    p.add_argument("--groups", default="2,10",
                   help="LGP-Shuffle groups to time beside the pruning")
    p.add_argument("--lgp-runs", default="",
                   help="more run dirs (comma-separated) to look in for "
                        "trained LGP-Shuffle students, before --teacher-run")
    p.add_argument("--repeats", type=int, default=1001)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--store", action="store_true",
                   help="also write the times into RUN_DIR/results.json")
    args = p.parse_args(argv)
    ptb = _example()
    ops.set_num_threads(1)
    with open(os.path.join(args.run_dir, "results.json")) as f:
        res = json.load(f)
    teacher_model = ptb.load_lm(os.path.join(args.teacher_run,
                                             "teacher.keras"), "teacher")
    # name -> (model, theoretical reduction, test ppl, where from)
    rows = {"Teacher": (teacher_model, 1.0, res["teacher"]["test_ppl"],
                        args.teacher_run)}
    for name, r in res["students"].items():
        if "target_sparsity" in r and not name.endswith("steps]"):
            path = os.path.join(args.run_dir,
                                f"student_{ptb._slug(name)}.keras")
            rows[name] = (ptb.load_lm(path, "pruned"), r["mac_reduction"],
                          r["test_ppl"], args.run_dir)
    lgp_runs = [args.run_dir, *filter(None, args.lgp_runs.split(",")),
                args.teacher_run]
    for g in (int(x) for x in args.groups.split(",")):
        found = _lgp_row(lgp_runs, g)
        if found and ptb._keras_major(found[1]) != KERAS_MAJOR:
            # A structured model loads only in the flavour that wrote it;
            # its speed does not depend on its values, so time the teacher
            # compressed to the same scheme and keep the trained file's ppl.
            d, _, ppl = found
            scheme = am.LGPShuffle(g)
            rows[f"LGP-Shuffle g={g} (timed on the teacher compressed)"] = (
                am.compress(teacher_model, input_scheme=scheme,
                            recurrent_scheme=scheme), float(g), ppl, d)
        elif found:
            d, path, ppl = found
            rows[f"LGP-Shuffle g={g}"] = (keras.models.load_model(path),
                                          float(g), ppl, d)
        else:
            scheme = am.LGPShuffle(g)
            rows[f"LGP-Shuffle g={g} (untrained: timing only)"] = (
                am.compress(teacher_model, input_scheme=scheme,
                            recurrent_scheme=scheme), float(g), None, None)
    x = tf.constant(np.random.default_rng(0).normal(
        size=(1, STEPS, WIDTH)).astype("float32"))
    fns, keys, zeros = [], [], {}
    for name, (model, *_) in rows.items():
        stack = lstm_stack(model)
        reference = stack(x, training=False).numpy()
        if isinstance(stack.layers[0], am.StructuredLSTM):
            paths = {"op (structured)": stack}
        else:
            paths = {"op dense": am.compress(stack),
                     "op CSR": csr_stack(stack)}
            kernels = [np.asarray(w) for layer in stack.layers
                       for w in (layer.cell.kernel,
                                 layer.cell.recurrent_kernel)]
            zeros[name] = [float(np.mean(w == 0)) for w in kernels]
            recorded = res["students"].get(name, {}).get("kernel_sparsity")
            if recorded:  # the file holds what the run measured
                np.testing.assert_allclose(zeros[name],
                                           list(recorded.values()))
        for path, m in paths.items():
            fns.append(exported(m, x, reference))
            keys.append((name, path))
    load_start = [round(v, 2) for v in os.getloadavg()]
    samples, cpu_samples = round_robin(fns, args.repeats)
    load_end = [round(v, 2) for v in os.getloadavg()]
    out = {}
    for (name, path), ms, cpu_ms in zip(keys, samples, cpu_samples):
        _, theoretical, ppl, source = rows[name]
        row = out.setdefault(name, dict(theoretical=theoretical,
                                        test_ppl=ppl, source=source,
                                        paths={}))
        row["paths"][path] = stats(ms, cpu_ms)
    for row in out.values():
        row["best"] = min(row["paths"],
                          key=lambda k: row["paths"][k]["cpu_median_ms"])
    cores = sorted(os.sched_getaffinity(0))
    pinned = (f"taskset -c {','.join(map(str, cores))} "
              if len(cores) < os.cpu_count() else "")
    command = pinned + "python bench/unstructured_pruning.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    latency = dict(
        rows=out, baseline=["Teacher", "op dense"], batch=1, steps=STEPS,
        threads=1, repeats=args.repeats, command=command,
        machine=f"{cpu()}, {os.cpu_count()} cores, op ISA {ops.isa()}",
        load_start=load_start, load_end=load_end,
        kernel_zeros=zeros,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    write(latency, args.out)
    if args.store:
        path = os.path.join(args.run_dir, "results.json")
        with open(path) as f:
            fresh = json.load(f)
        fresh["latency"] = latency
        with open(path + ".tmp", "w") as f:
            json.dump(fresh, f, indent=1)
        os.replace(path + ".tmp", path)
    return latency


def write(latency, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    base = latency["rows"]["Teacher"]["paths"]["op dense"]
    lines = [
        "# Unstructured pruning vs AntMan: measured against theoretical "
        "speed-up\n",
        f"Command: `{latency['command']}` ({latency['date']}).\n",
        f"Machine: {latency['machine']}; {latency['threads']} thread (TF "
        "and the op); load average (1, 5, 15 min) "
        f"{latency['load_start']} at the start, {latency['load_end']} at "
        "the end.\n",
        f"Each row's LSTM stack (2 x LSTM(200), input 200; embedding and "
        f"output layer left out), batch {latency['batch']}, "
        f"{latency['steps']} steps, exported with `export(kernel="
        "\"compiled\")` and loaded in one process; every export is checked "
        "against the Keras stack's output (max |diff| <= 1e-4), then "
        f"{latency['repeats']} rounds of one call per path in a random "
        "order, timed by wall "
        "clock and by the process's CPU time (which leaves out the time "
        "the process waits for a core on a loaded machine). *op dense*: the "
        "kernels with their zeros (`Dense` schemes); *op CSR*: only the "
        "non-zeros, as the op's CSR sparse term (a `Doped` matrix with a "
        "zero rank-1 base, +1,000 MACs per product). Speed-up: the dense "
        "teacher's op dense time over the row's, by wall-clock median, by "
        "wall-clock 10th percentile (the least disturbed calls) and by CPU "
        "time median; theoretical: the teacher's LSTM multiply-adds over the "
        "row's (non-zeros for the pruned rows); best path: by CPU time.\n",
        "| row | theoretical | test ppl | path | wall median ms (IQR) | "
        "wall p10 ms | CPU median ms (IQR) | speed-up, wall median | "
        "speed-up, wall p10 | speed-up, CPU | CPU speed-up / theoretical |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |"]
    summary = []
    for name, r in latency["rows"].items():
        ppl = r["test_ppl"]
        for path, t in r["paths"].items():
            wall = base["median_ms"] / t["median_ms"]
            p10 = base["p10_ms"] / t["p10_ms"]
            cpu_speed = base["cpu_median_ms"] / t["cpu_median_ms"]
            best = " (best)" if len(r["paths"]) > 1 and path == r["best"] \
                else ""
            lines.append(
                f"| {name} | {r['theoretical']:.2f}x | "
                + (f"{ppl:.2f}" if ppl else "-") + f" | {path}{best} | "
                f"{t['median_ms']:.3f} ({t['iqr_ms']:.3f}) | "
                f"{t['p10_ms']:.3f} | {t['cpu_median_ms']:.3f} "
                f"({t['cpu_iqr_ms']:.3f}) | {wall:.2f}x | {p10:.2f}x | "
                f"{cpu_speed:.2f}x "
                f"| {cpu_speed / r['theoretical']:.2f} |")
        if name != "Teacher":
            t = r["paths"][r["best"]]
            summary.append(
                f"- {name}: {r['theoretical']:.2f}x theoretical, "
                f"{base['cpu_median_ms'] / t['cpu_median_ms']:.2f}x by CPU "
                f"time ({base['median_ms'] / t['median_ms']:.2f}x by wall "
                f"median, {base['p10_ms'] / t['p10_ms']:.2f}x by wall p10) "
                f"on its best path ({r['best']}).")
    lines += ["", "Best path per row:", "", *summary]
    stem = os.path.join(out_dir, "unstructured_pruning")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(latency, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Inference time of the PTB example's ISS students against AntMan's.

For each run of ``examples/ptb_word_lm.py`` given (by default the two of
``examples/results/ptb_iss*.md``: 2 x LSTM(200) on a 200-wide embedding,
and 2 x LSTM(100) on an 800-wide one), every model is timed at batch 1,
``--steps`` timesteps (35, the LM's window), one thread (TensorFlow intra /
inter-op and our op), float32:

* the teacher and each ISS student (a smaller stock-LSTM model after
  `iss.shrink`) as stock ``keras.layers.LSTM`` layers, and as `compress`ed
  with `Dense` schemes on our compiled op (``kernel="compiled"``);
* each AntMan student (LGP-Shuffle, LowRank-LGP) on the compiled op.

Two times per variant: the two LSTM layers alone (the part the MAC
reduction counts; input: the embedded sequence) and the whole LM (token
ids -> logits, including the 10,000-word output layer: its input is the
last LSTM's output, so ISS, which removes units of that LSTM, shrinks it
too, while AntMan's students keep it whole). Each is a ``tf.function``
called with tensors; all variants are timed interleaved, round after
round (the order rotating each round), and the table gives each one's
median over the rounds. The models are the ones the run saved
(``RUN_DIR/teacher.keras``, ``student_<name>.keras``) when present, else
models of the same shapes (from the run's results JSON) with random
weights; the source column says which. ISS rows at a non-default lambda
("... lambda=...") are left out: their shapes are like the others'.

Usage:
    python bench/iss_inference.py [--rounds 30] [--steps 35]
        [--run RUN_DIR RESULTS_JSON ...] [--out bench/results/iss_inference.md]
"""

import os

# One thread for OpenBLAS and TensorFlow; set before numpy / TF load.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

import keras  # noqa: E402

import keras_antman as am  # noqa: E402
from keras_antman import ops  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUNS = [
    ("runs/ptb_iss", "examples/results/ptb_iss_results.json"),
    ("runs/ptb_iss_800", "examples/results/ptb_iss_800_results.json"),
]


def example():
    path = os.path.join(ROOT, "examples", "ptb_word_lm.py")
    spec = importlib.util.spec_from_file_location("ptb_word_lm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu():
    name, flags = platform.processor() or "unknown", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown":
                    name = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = line
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else (
        "AVX2, no AVX-512" if "avx2" in flags else "no AVX2")
    return name, isa


def stock_lm(vocab, embed, units):
    """Embedding -> LSTM(units[0]) -> LSTM(units[1]) -> Dense, the shape of
    a shrunk ISS student (random weights)."""
    inputs = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(vocab, embed, name="embedding")(inputs)
    for i, u in enumerate(units):
        h = keras.layers.LSTM(u, return_sequences=True, name=f"lstm_{i}")(h)
    return keras.Model(inputs, keras.layers.Dense(vocab, name="logits")(h))


def scheme_of(text):
    """A scheme from its ``describe()`` text, e.g. 'LGPShuffle(groups=10)'."""
    names = {n: getattr(am, n) for n in
             ("Dense", "LowRank", "LGPShuffle", "LGPDense", "LowRankLGP")}
    return eval(text, {"__builtins__": {}}, names)  # noqa: S307


def on_op(model):
    """``model`` with every LSTM as a StructuredLSTM on the compiled op
    (stock LSTMs become Dense schemes)."""
    if any(isinstance(layer, keras.layers.LSTM) for layer in model.layers):
        model = am.compress(model, input_scheme=am.Dense(),
                            recurrent_scheme=am.Dense())
    for layer in model.layers:
        if isinstance(layer, am.StructuredLSTM):
            layer.kernel = "compiled"
    return model


def models(ex, run_dir, results_path):
    """``[(name, kind, model, source)]``: teacher, ISS and AntMan students
    of one run (kind: "stock" or "antman")."""
    with open(results_path) as f:
        res = json.load(f)
    a = res["config"]["args"]
    vocab, hidden = res["config"]["vocab"], a["hidden"]
    embed = a.get("embed") or hidden
    out = []
    path = os.path.join(run_dir, "teacher.keras")
    if os.path.exists(path):
        teacher, source = keras.models.load_model(path), "trained (run)"
    else:
        keras.utils.set_random_seed(0)
        teacher = ex.language_model(vocab, hidden, embed, "teacher")
        source = "random weights"
    out.append(("Teacher", "stock", teacher, source))
    for name, r in res.get("students", {}).items():
        if name.endswith("steps]") or "lambda=" in name:
            continue  # earlier runs; ISS at other lambdas (same shapes)
        iss = "units" in r
        if not (iss or name.startswith(("LGP-Shuffle", "LowRank-LGP"))):
            continue
        path = os.path.join(run_dir, f"student_{ex._slug(name)}.keras")
        if os.path.exists(path):
            model, source = keras.models.load_model(path), "trained (run)"
        elif iss:
            model = stock_lm(vocab, embed, r["units"])
            source = "random weights"
        else:
            model = am.compress(teacher, input_scheme=scheme_of(r["scheme"]),
                                recurrent_scheme=scheme_of(r["scheme"]))
            source = "random weights" if "random" in out[0][3] else (
                "teacher's weights (from_dense), untrained")
        out.append((name, "stock" if iss else "antman", model, source))
    return teacher, out, res


def variants(name, kind, model):
    """``[(label, model)]``: how one model is run."""
    if kind == "stock":
        return [(f"{name} | stock Keras LSTM", model),
                (f"{name} | op, Dense schemes", on_op(model))]
    return [(f"{name} | op", on_op(model))]


def lstm_stack(model):
    layers = [model.get_layer("lstm_0"), model.get_layer("lstm_1")]

    @tf.function
    def fn(x):
        return layers[1](layers[0](x))

    return fn


def lm(model):
    @tf.function
    def fn(tokens):
        return model(tokens)

    return fn


def bench(entries, rounds):
    """Interleaved timing: each round calls every entry once (order rotated
    every round); returns ``{label: median ms}``."""
    for _, fn, arg in entries:  # trace and warm up
        fn(arg)
        fn(arg)
    times = {label: [] for label, _, _ in entries}
    for i in range(rounds):
        k = i % len(entries)
        for label, fn, arg in entries[k:] + entries[:k]:
            t0 = time.perf_counter()
            fn(arg)
            times[label].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", nargs=2, action="append",
                   metavar=("RUN_DIR", "RESULTS_JSON"),
                   help="a run of examples/ptb_word_lm.py and its results "
                        "JSON (repeatable; default: the two ISS runs)")
    p.add_argument("--steps", type=int, default=35)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", default=os.path.join(
        HERE, "results", "iss_inference.md"))
    a = p.parse_args()
    ops.set_num_threads(1)
    ex = example()
    runs = a.run or [(os.path.join(ROOT, d), os.path.join(ROOT, j))
                     for d, j in RUNS]
    name, isa = cpu()
    lines = [
        "# ISS vs AntMan students: inference time (PTB example models)\n",
        f"Batch 1, {a.steps} timesteps, float32, 1 thread (TensorFlow "
        "intra / inter-op 1, `ops.set_num_threads(1)`), each time the "
        f"median of {a.rounds} interleaved rounds (every variant once per "
        "round, order rotated). 'LSTMs' times the two LSTM layers on the "
        "embedded sequence (the part the MAC reduction counts); 'LM' the "
        "whole model, token ids to logits, with its vocabulary-wide Dense "
        "head, whose input ISS narrows (the last LSTM's live units) and "
        "AntMan does not. Speedups are the teacher's stock-LSTM time over the "
        "row's, same process. `op` is our compiled op (`kernel=\"compiled\""
        f"`, ISA `{ops.instruction_set()}`); stock ISS models run on it "
        "after `compress` with `Dense` schemes.\n",
        f"Machine: {name}, {os.cpu_count()} cores ({isa}); Keras "
        f"{keras.__version__}, TensorFlow {tf.__version__}. A shared VM: "
        "other jobs may have run at the same time; the interleaving spreads "
        "their effect over all rows.\n",
        "Command: `python bench/iss_inference.py "
        f"--steps {a.steps} --rounds {a.rounds}`\n"]
    summary = {}
    for run_dir, results_path in runs:
        if not os.path.exists(results_path):
            print(f"skipping {run_dir}: no {results_path}")
            continue
        teacher, ms, res = models(ex, run_dir, results_path)
        args = res["config"]["args"]
        embed = args.get("embed") or args["hidden"]
        rng = np.random.default_rng(0)
        x = tf.constant(rng.normal(scale=0.1, size=(1, a.steps, embed))
                        .astype("float32"))
        tokens = tf.constant(rng.integers(0, res["config"]["vocab"],
                                          (1, a.steps)).astype("int32"))
        entries, info = [], {}
        for mname, kind, model, source in ms:
            cost = am.report(teacher, model).recurrent_total
            r = res["students"].get(mname, res.get("teacher"))
            for label, m in variants(mname, kind, model):
                entries.append(("LSTMs " + label, lstm_stack(m), x))
                entries.append(("LM " + label, lm(m), tokens))
                info[label] = (cost, source, r)
        print(f"timing {len(entries)} entries from {run_dir} ...",
              flush=True)
        t = bench(entries, a.rounds)
        base_l = t["LSTMs Teacher | stock Keras LSTM"]
        base_m = t["LM Teacher | stock Keras LSTM"]
        lines += [
            f"## 2 x LSTM({args['hidden']}) on a {embed}-wide embedding "
            f"(`{os.path.relpath(run_dir, ROOT)}`)\n",
            "| model | runs as | LSTM units | LSTM MAC reduction | test ppl "
            "| steps | weights | LSTMs (ms) | speedup | LM (ms) | speedup |",
            "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | "
            "---: | ---: |"]
        for label, (cost, source, r) in info.items():
            mname, how = label.split(" | ")
            units = ", ".join(map(str, r.get("units", [args["hidden"]] * 2)))
            tl, tm = t["LSTMs " + label], t["LM " + label]
            lines.append(
                f"| {mname} | {how} | {units} | {cost.mac_reduction:.2f}x | "
                f"{r['test_ppl']:.1f} | {r['steps']} | {source} | {tl:.3f} | "
                f"{base_l / tl:.2f}x | {tm:.3f} | {base_m / tm:.2f}x |")
            summary[f"{run_dir} {label}"] = {"lstms_ms": tl, "lm_ms": tm}
        lines.append("")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()

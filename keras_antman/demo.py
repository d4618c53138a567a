"""``keras-antman demo``: the whole pipeline on one small language model.

1. Train a teacher: Embedding -> LSTM(256) -> Dense(vocab) on an embedded
   synthetic corpus (offline; `synthetic_corpus`) or on Penn Treebank
   (``--ptb DIR``).
2. `compress` its LSTM with AntMan schemes (LGP-Shuffle g=8 on both
   products by default: 8x fewer LSTM multiply-adds) and print the report.
3. `calibrate_coefficients` (the paper's method), then distil the student
   from the teacher with `Distiller`.
4. `export` the student as compiled and portable SavedModels, and convert
   the portable one (batch 1) to TFLite with built-in ops only.
5. Time teacher and student on this machine at batch 1 over one sequence
   of the task's length, on one thread: stock Keras (portable TF ops for
   the student), the compiled op (the teacher through the op with `Dense`
   schemes) and TFLite; median of repeats, in a child process so that
   TensorFlow runs on the requested threads.
6. Write ``summary.md``, ``summary.json`` and ``summary.png`` (perplexity
   against latency) with the models and exports into the output folder.
   The folder is assembled next to its destination and renamed into place
   at the end, so a failed run leaves nothing half-written.
"""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

STAGES = 6
# Chosen so that on 2 shared cores the whole run takes about 2 minutes,
# the teacher stops just before it overfits the 1,024 contexts, and the
# distilled student lands within 10% of its perplexity.
DEFAULTS = dict(vocab=32, tokens=120_000, hidden=256, embed=64, layers=1,
                epochs=4, distill_epochs=6, calibrate_steps=40, batch_size=32,
                num_steps=35, lr=5e-3, threads=1, repeats=50)
# --tiny: a smoke test in seconds; options given explicitly still win.
TINY = dict(hidden=16, embed=8, tokens=6000, epochs=1, distill_epochs=1,
            calibrate_steps=2, batch_size=8, num_steps=10, repeats=3)


def synthetic_corpus(vocab=32, tokens=120_000, seed=0):
    """Token ids from a sparse random second-order Markov chain.

    Each pair of previous tokens allows four next tokens (Dirichlet(0.5)
    probabilities), so an LSTM that remembers the last two tokens reaches
    the chain's entropy: a small, offline stand-in for a language-modelling
    corpus whose best perplexity is known (`markov_perplexity`).

    Args:
        vocab: vocabulary size.
        tokens: tokens in the training split; the validation and test
            splits get a tenth of that each.
        seed: random seed.

    Returns:
        ``(train, valid, test)`` int32 arrays.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab, size=(vocab, vocab, 4))
    probs = rng.dirichlet(np.ones(4) * 0.5, size=(vocab, vocab))
    cum = np.cumsum(probs, axis=-1)
    total = tokens + 2 * (tokens // 10)
    out = np.empty(total, dtype=np.int32)
    out[:2] = rng.integers(0, vocab, 2)
    u = rng.random(total)
    for t in range(2, total):
        a, b = out[t - 2], out[t - 1]
        k = min(int(np.searchsorted(cum[a, b], u[t])), 3)
        out[t] = successors[a, b, k]
    n_eval = tokens // 10
    return out[:tokens], out[tokens:tokens + n_eval], out[tokens + n_eval:]


def language_model(vocab, hidden, embed, layers=1, name="teacher"):
    """Embedding -> ``layers`` x LSTM(hidden) -> Dense(vocab) logits."""
    from keras_antman._keras import keras

    inputs = keras.Input((None,), dtype="int32", name="tokens")
    h = keras.layers.Embedding(vocab, embed, name="embedding")(inputs)
    for i in range(layers):
        h = keras.layers.LSTM(hidden, return_sequences=True,
                              name=f"lstm_{i}")(h)
    logits = keras.layers.Dense(vocab, name="logits")(h)
    return keras.Model(inputs, logits, name=name)


def _optimizer(lr):
    from keras_antman._keras import keras

    return keras.optimizers.Adam(lr, clipnorm=5.0)


def _compile(model, lr):
    import keras_antman as am
    from keras_antman._keras import keras

    model.compile(
        optimizer=_optimizer(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[am.Perplexity()],
    )


def _perplexity(model, data):
    result = model.evaluate(data, verbose=0, return_dict=True)
    return math.exp(result["loss"])


class _Stages:
    def __init__(self):
        self.times = {}
        self.n = 0
        self.t0 = None

    def start(self, key, text):
        self.end()
        self.n += 1
        self.name = key
        self.t0 = time.time()
        print(f"\n[{self.n}/{STAGES}] {text}", flush=True)

    def end(self):
        if self.t0 is not None:
            took = time.time() - self.t0
            self.times[self.name] = took
            print(f"      done in {took:.0f} s", flush=True)
            self.t0 = None


def run(args):
    """Runs the demo described in the module docstring.

    Returns:
        The summary as a dict (also written to ``summary.json``).
    """
    if args.tiny:
        for key, value in TINY.items():
            if getattr(args, key) == DEFAULTS[key]:
                setattr(args, key, value)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and (
            not os.path.isdir(out) or os.listdir(out)
            and not os.path.isfile(os.path.join(out, "summary.json"))):
        # The run replaces its output folder as a whole: never one that
        # holds anything but an earlier demo run (say, `--out .`).
        raise ValueError(
            f"--out {args.out}: {out} exists and is not the folder of an "
            "earlier demo run (no summary.json); choose a new folder"
        )
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-",
                               dir=parent)
    try:
        summary = _pipeline(args, staging)
        if os.path.exists(out):
            old = os.path.join(staging, ".old")
            os.rename(out, old)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(os.path.join(out, ".old"), ignore_errors=True)
    print(f"\nSummary: {os.path.join(out, 'summary.md')}")
    if os.path.exists(os.path.join(out, "summary.png")):
        print(f"Plot:    {os.path.join(out, 'summary.png')}")
    print(f"Models and exports: {out}/")
    return summary


def _pipeline(args, work):
    import keras_antman as am
    from keras_antman import benchmark
    from keras_antman import datasets
    from keras_antman import schemes
    from keras_antman._keras import keras

    t_start = time.time()
    load_start = os.getloadavg()[0]
    input_scheme = schemes.from_spec(args.input_scheme)
    recurrent_scheme = schemes.from_spec(args.recurrent_scheme)
    keras.utils.set_random_seed(args.seed)
    if args.ptb:
        ptb = datasets.load_ptb(args.ptb)
        train, valid, test = ptb.train, ptb.valid, ptb.test
        vocab = len(ptb.vocabulary)
        source = f"Penn Treebank ({ptb.directory})"
        if args.max_tokens:
            train = train[: args.max_tokens]
    else:
        vocab = args.vocab
        train, valid, test = synthetic_corpus(vocab, args.tokens, args.seed)
        source = ("embedded synthetic corpus (second-order Markov chain, "
                  f"vocabulary {vocab})")

    def batches(ids):
        return datasets.bptt_dataset(ids, args.batch_size, args.num_steps)

    train_ds, valid_ds, test_ds = batches(train), batches(valid), batches(test)
    print(f"Data: {source}; {len(train):,} training tokens, batches of "
          f"{args.batch_size} x {args.num_steps}.")
    stages = _Stages()
    fit_verbose = args.verbose

    stages.start("teacher",
                 f"Training the teacher: Embedding({vocab}, {args.embed}) -> "
                 f"{args.layers} x LSTM({args.hidden}) -> Dense({vocab}), "
                 f"{args.epochs} epoch(s).")
    teacher = language_model(vocab, args.hidden, args.embed, args.layers)
    _compile(teacher, args.lr)
    teacher.fit(train_ds, validation_data=valid_ds, epochs=args.epochs,
                shuffle=False, verbose=fit_verbose)
    ppl_teacher = _perplexity(teacher, test_ds)
    print(f"      teacher test perplexity {ppl_teacher:.3f}")

    stages.start("compress",
                 f"Compressing: input {input_scheme.describe()}, recurrent "
                 f"{recurrent_scheme.describe()}.")
    student = am.compress(teacher, input_scheme=input_scheme,
                          recurrent_scheme=recurrent_scheme)
    rep = am.report(teacher, student, print_fn=print)
    _compile(student, args.lr)
    ppl_init = _perplexity(student, test_ds)
    print(f"      compressed (teacher's weights, before distillation) test "
          f"perplexity {ppl_init:.3f}")

    stages.start("calibrate + distill",
                 f"Calibrating the distillation coefficients "
                 f"({args.calibrate_steps} steps per term), then distilling "
                 f"{args.distill_epochs} epoch(s).")
    coeffs = am.calibrate_coefficients(
        student, teacher, train_ds.repeat(), validation_data=valid_ds,
        steps=args.calibrate_steps, optimizer=lambda: _optimizer(args.lr),
        reinitialize=True)
    kwargs = coeffs.compile_kwargs()
    print("      coefficients: " + ", ".join(
        f"{k} = {v:g}" for k, v in kwargs.items()))
    distiller = am.Distiller(student=student, teacher=teacher)
    distiller.compile(optimizer=_optimizer(args.lr), metrics=[am.Perplexity()],
                      **kwargs)
    distiller.fit(train_ds, validation_data=valid_ds,
                  epochs=args.distill_epochs, shuffle=False,
                  verbose=fit_verbose)
    student = distiller.student
    _compile(student, args.lr)
    ppl_student = _perplexity(student, test_ds)
    print(f"      student test perplexity {ppl_student:.3f} "
          f"({ppl_student / ppl_teacher - 1:+.1%} vs the teacher)")

    stages.start("export",
                 "Exporting: compiled and portable SavedModels, TFLite "
                 "(batch 1, built-in ops) from the portable one.")
    teacher.save(os.path.join(work, "teacher.keras"))
    student.save(os.path.join(work, "student.keras"))
    exports = os.path.join(work, "export")
    blockers = benchmark.compiled_blockers(student)
    if blockers:  # e.g. Kronecker: no stage of the op for it
        print(f"      no compiled export: {'; '.join(blockers)}")
    else:
        am.export(student, os.path.join(exports, "student_compiled"),
                  kernel="compiled")
    am.export(student, os.path.join(exports, "student_portable"),
              kernel="portable", batch_size=1)
    tflite = {}
    for name, model in (("student", student), ("teacher", teacher)):
        tflite[name] = am.export_tflite(
            model, os.path.join(exports, f"{name}.tflite"), batch_size=1)
        print(f"      {os.path.basename(tflite[name])}: "
              f"{os.path.getsize(tflite[name]) / 1e6:.2f} MB")

    stages.start("latency",
                 f"Timing inference: batch 1, {args.num_steps} steps, "
                 f"{args.threads} thread(s), median of {args.repeats} runs.")
    timing = _measure(args, work, tflite)
    print(f"      machine: {timing['machine']}")

    stages.start("summary",
                 "Writing the summary.")
    stages.end()
    summary = dict(
        source=source, vocab=vocab, machine=timing["machine"],
        threads=args.threads, batch=1, steps=args.num_steps,
        repeats=args.repeats,
        teacher=dict(ppl=ppl_teacher, params=teacher.count_params(),
                     macs=rep.total.macs_before,
                     lstm_macs=rep.recurrent_total.macs_before,
                     latency=timing["results"]["teacher"],
                     description=f"{args.layers} x LSTM({args.hidden})"),
        student=dict(ppl=ppl_student, ppl_before_distillation=ppl_init,
                     params=student.count_params(), macs=rep.total.macs_after,
                     lstm_macs=rep.recurrent_total.macs_after,
                     latency=timing["results"]["student"],
                     description=f"input {input_scheme.describe()}, "
                                 f"recurrent {recurrent_scheme.describe()}"),
        coefficients=kwargs, stage_seconds=stages.times,
        load_average=[load_start, os.getloadavg()[0]],
        args={k: v for k, v in vars(args).items() if k != "func"},
    )
    summary["wall_seconds"] = time.time() - t_start
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    markdown = summary_markdown(summary)
    with open(os.path.join(work, "summary.md"), "w") as f:
        f.write(markdown)
    _plot(summary, os.path.join(work, "summary.png"))
    print()
    print(markdown)
    return summary


def _measure(args, work, tflite):
    import keras_antman

    job = dict(threads=args.threads, batch=1, steps=args.num_steps,
               repeats=args.repeats, out=os.path.join(work, "latency.json"),
               models=[
                   dict(name=name, model=os.path.join(work, f"{name}.keras"),
                        tflite=tflite[name], paths=paths)
                   for name, paths in (
                       ("teacher", ("keras", "compiled", "tflite")),
                       ("student", ("portable", "compiled", "tflite")))
               ])
    job_path = os.path.join(work, "latency_job.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    root = os.path.dirname(os.path.dirname(keras_antman.__file__))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(
                   filter(None, [root, os.environ.get("PYTHONPATH")])))
    sys.stdout.flush()
    proc = subprocess.run(
        [sys.executable, "-m", "keras_antman.benchmark", job_path], env=env)
    os.remove(job_path)
    if proc.returncode != 0:
        raise RuntimeError(
            f"the latency measurement (python -m keras_antman.benchmark) "
            f"failed with exit code {proc.returncode}; see its output above"
        )
    with open(job["out"]) as f:
        result = json.load(f)
    os.remove(job["out"])
    return result


def _ms(latency, path):
    return f"{latency[path]:.2f}" if path in latency else "-"


def _speedup(t, s, tp, sp):
    if tp in t and sp in s:
        return f"**{t[tp] / s[sp]:.2f}x**"
    return "-"


def summary_markdown(s):
    """The demo's summary table and notes as Markdown."""
    t, st = s["teacher"], s["student"]
    tl, sl = t["latency"], st["latency"]
    head = ("model", "test perplexity", "params", "MACs / token",
            "LSTM MACs / token", "Keras, TF ops (ms)", "compiled op (ms)",
            "TFLite (ms)")
    rows = [
        (f"teacher: {t['description']}", f"{t['ppl']:.3f}",
         f"{t['params']:,}", f"{t['macs']:,}", f"{t['lstm_macs']:,}",
         _ms(tl, "keras"), _ms(tl, "compiled"), _ms(tl, "tflite")),
        ("student, compressed only (teacher's weights)",
         f"{st['ppl_before_distillation']:.3f}", f"{st['params']:,}",
         f"{st['macs']:,}", f"{st['lstm_macs']:,}", "", "", ""),
        (f"student, distilled: {st['description']}", f"{st['ppl']:.3f}",
         f"{st['params']:,}", f"{st['macs']:,}", f"{st['lstm_macs']:,}",
         _ms(sl, "portable"), _ms(sl, "compiled"), _ms(sl, "tflite")),
        ("teacher / student",
         f"student {st['ppl'] / t['ppl'] - 1:+.1%}",
         f"{t['params'] / st['params']:.2f}x",
         f"{t['macs'] / st['macs']:.2f}x",
         f"{t['lstm_macs'] / st['lstm_macs']:.2f}x",
         _speedup(tl, sl, "keras", "portable"),
         _speedup(tl, sl, "compiled", "compiled"),
         _speedup(tl, sl, "tflite", "tflite")),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    best_t = min(tl.values())
    best_s = min(sl.values())
    end_to_end = ""
    if "keras" in tl and "compiled" in sl:
        end_to_end = (f" The student on the compiled op is "
                      f"**{tl['keras'] / sl['compiled']:.2f}x** faster than "
                      f"the teacher in stock Keras.")
    wall = s.get("wall_seconds", 0)
    load = s.get("load_average", [math.nan, math.nan])
    return "\n".join([
        "# keras-antman demo",
        "",
        f"Data: {s['source']}. Latency: batch {s['batch']}, "
        f"{s['steps']} timesteps (one sequence of the task), "
        f"{s['threads']} thread(s), median of {s['repeats']} runs after "
        f"warm-up, on {s['machine']}.",
        "",
        *lines,
        "",
        f"MACs are the multiply-adds of the matrix products per token "
        f"(the paper's Table 1 convention; the embedding lookup has none). "
        f"The teacher's \"compiled op\" column runs its LSTM through our op "
        f"with `Dense` schemes (same weights, same outputs), and the "
        f"student's \"Keras, TF ops\" column runs its structured layers on "
        f"stock TensorFlow ops (`kernel=\"portable\"`).{end_to_end} Fastest "
        f"path against fastest path: {best_t / best_s:.2f}x.",
        "",
        "Distillation coefficients (calibrated): " + ", ".join(
            f"{k} = {v:g}" for k, v in s["coefficients"].items()) + ".",
        "",
        f"Wall time {wall:.0f} s (" + ", ".join(
            f"{k} {v:.0f} s" for k, v in s["stage_seconds"].items()
            if k != "summary") +
        f"); load average {load[0]:.1f} at the start, {load[1]:.1f} at the "
        f"end.",
        "",
    ])


def _plot(s, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("      matplotlib is not installed: no summary.png "
              "(pip install matplotlib)")
        return
    from keras_antman import benchmark

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    markers = {"keras": "o", "portable": "o", "compiled": "s", "tflite": "^"}
    for who, color in (("teacher", "tab:blue"), ("student", "tab:orange")):
        entry = s[who]
        for p, ms in entry["latency"].items():
            title = "Keras, TF ops" if p in ("keras", "portable") else \
                benchmark.PATH_TITLES[p]
            ax.scatter(ms, entry["ppl"], color=color, marker=markers[p], s=60,
                       label=f"{who}: {title}")
    budget = 1.1 * s["teacher"]["ppl"]
    ax.axhline(budget, color="gray", linestyle="--", linewidth=1)
    ax.annotate("teacher + 10%", (1, budget), xycoords=("axes fraction",
                "data"), ha="right", va="bottom", fontsize=8, color="gray")
    top = max(budget, s["student"]["ppl"])
    ax.set_ylim(0.97 * s["teacher"]["ppl"], top + 0.05 * (top - 0.97 *
                                                            s["teacher"]["ppl"]))
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(
        subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(
        matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(f"latency (ms), batch 1, {s['steps']} steps, "
                  f"{s['threads']} thread(s)")
    ax.set_ylabel("test perplexity")
    ax.set_title("keras-antman demo: accuracy against latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def add_arguments(parser):
    """The demo's options on an argparse (sub)parser."""
    parser.add_argument("--out", "-o", metavar="DIR", default="antman_demo",
                        help="output folder ")
    parser.add_argument("--ptb", metavar="DIR",
                        help="run on Penn Treebank: a directory with "
                             "ptb.{train,valid,test}.txt (default: the "
                             "embedded synthetic corpus)")
    parser.add_argument("--max-tokens", type=int, default=0,
                        help="use only this many PTB training tokens (0: all)")
    parser.add_argument("--vocab", type=int, default=DEFAULTS["vocab"],
                        help="synthetic corpus vocabulary")
    parser.add_argument("--tokens", type=int, default=DEFAULTS["tokens"],
                        help="synthetic training tokens")
    parser.add_argument("--hidden", type=int, default=DEFAULTS["hidden"],
                        help="LSTM units")
    parser.add_argument("--embed", type=int, default=DEFAULTS["embed"],
                        help="embedding size")
    parser.add_argument("--layers", type=int, default=DEFAULTS["layers"],
                        help="LSTM layers ")
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"],
                        help="teacher epochs ")
    parser.add_argument("--distill-epochs", type=int,
                        default=DEFAULTS["distill_epochs"],
                        help="distillation epochs")
    parser.add_argument("--calibrate-steps", type=int,
                        default=DEFAULTS["calibrate_steps"],
                        help="training steps per loss term when calibrating "
                             "the coefficients ")
    parser.add_argument("--batch-size", type=int,
                        default=DEFAULTS["batch_size"],
                        help="training sequences per batch")
    parser.add_argument("--num-steps", type=int,
                        default=DEFAULTS["num_steps"],
                        help="sequence length for training and timing")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"],
                        help="Adam learning rate, teacher and student")
    parser.add_argument("--input-scheme", default="lgp_shuffle:8",
                        metavar="SPEC", help="scheme of the input products "
                        "(default: %(default)s; grammar below)")
    parser.add_argument("--recurrent-scheme", default="lgp_shuffle:8",
                        metavar="SPEC", help="scheme of the recurrent "
                        "products")
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"],
                        help="threads for the latency measurement")
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"],
                        help="timed runs per path ")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the corpus and the weights")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny sizes and a few steps (a smoke test, "
                             "seconds; the numbers mean nothing)")
    parser.add_argument("--verbose", type=int, default=2, choices=(0, 1, 2),
                        help="Keras fit verbosity (1: progress bar, 2: one "
                             "line per epoch; default: %(default)s)")

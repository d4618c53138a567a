"""The ``keras-antman`` command (also ``python -m keras_antman``).

Subcommands: ``demo`` (the whole pipeline on a small language model,
`keras_antman.demo`), and for your own models ``compress``, ``report``,
``distill``, ``export`` and ``bench``. Every user error (a missing file, a
model without recurrent layers, a bad scheme spec, a group count that does
not divide a product) is one line on stderr and exit code 2;
``KERAS_ANTMAN_DEBUG=1`` shows the traceback instead.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import warnings

SCHEME_GRAMMAR = """\
scheme specs (keras_antman.schemes.from_spec): NAME[:ARGS], ARGS separated
by commas, positional or key=value; integers, decimals or shapes (4x8);
underscores in NAME optional:
  dense                      the original dense product
  low_rank:R | low_rank:rank=K   truncated SVD, rank n/R or K
  lgp_shuffle:G              G block-diagonal groups + shuffle (G x fewer)
  lgp_dense:G                G groups + a dense mixing matrix
  low_rank_lgp:G_IN,G_OUT,R  groups around a rank-n/R factorisation
  kronecker | kronecker:a_shape=4x8   Kronecker product (Doping base)
  hmd:K,dense_rows=0.5       dense rows + rank-K rest
G must divide both dims of a product (for an LSTM: input n_x -> 4h,
recurrent h -> 4h); an impossible G fails with the valid choices."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and appends each option's default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or not action.option_strings
                or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


class UsageError(Exception):
    """A user error: printed as one line, exit code 2."""


def parse_scheme(text):
    """A `Scheme` from ``name[:args]`` (`keras_antman.schemes.from_spec`).

    Raises:
        ValueError: an unknown name or malformed arguments.
    """
    from keras_antman import schemes

    return schemes.from_spec(text)


def _existing(path, what="file"):
    if not os.path.exists(path):
        raise UsageError(f"{what} {path} does not exist")
    return path


def load_model(path):
    """A `.keras` model (uncompiled); one-line errors for bad files."""
    import keras_antman  # noqa: F401 - registers the structured layers
    from keras_antman._keras import keras

    _existing(path, "model file")
    try:
        return keras.models.load_model(path, compile=False)
    except (ValueError, OSError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UsageError(f"cannot load {path} as a Keras model: "
                         f"{type(e).__name__}: {first}") from None


def _require_recurrent(model, path):
    from keras_antman.compress import _recurrent_names

    names = _recurrent_names(model) if hasattr(
        model, "layers") else []
    if not names:
        raise UsageError(
            f"{path}: model '{model.name}' has no LSTM/GRU layers to compress"
        )
    return names


def _save_model(model, path):
    """Saves ``model`` to ``path`` (``.keras``) through a temporary file."""
    path = os.path.abspath(path)
    if not path.endswith(".keras"):
        raise UsageError(f"output {path} must end in .keras")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".keras",
                               prefix=f".{os.path.basename(path)}.")
    os.close(fd)
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _policy(path):
    _existing(path, "policy file")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a JSON object {{layer name: "
                         "[input spec, recurrent spec] or null}")
    policy = {}
    for name, spec in raw.items():
        if spec is None:
            policy[name] = None
        elif (isinstance(spec, list) and len(spec) == 2
              and all(isinstance(s, str) for s in spec)):
            policy[name] = tuple(parse_scheme(s) for s in spec)
        else:
            raise UsageError(
                f"{path}: layer {name!r} maps to {spec!r}; expected "
                "[input spec, recurrent spec] or null")
    return policy


def cmd_compress(args):
    import keras_antman as am

    input_scheme = parse_scheme(args.input_scheme)
    recurrent_scheme = parse_scheme(args.recurrent_scheme)
    layers = _policy(args.layers) if args.layers else None
    out = args.output or os.path.splitext(args.model)[0] + "_antman.keras"
    if os.path.exists(out) and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    model = load_model(args.model)
    _require_recurrent(model, args.model)
    calibration = None
    if args.calibration_data:
        calibration = _calibration_batches(args)
    print(f"Compressing {args.model}: input {input_scheme.describe()}, "
          f"recurrent {recurrent_scheme.describe()}"
          + (f", per-layer policy {args.layers}" if layers else "")
          + (f", fitted to {args.calibration_data}" if calibration else "")
          + ".")
    student = am.compress(model, input_scheme=input_scheme,
                          recurrent_scheme=recurrent_scheme, layers=layers,
                          calibration_data=calibration,
                          calibration_steps=args.calibration_steps)
    errors = getattr(student, "calibration_errors", None)
    am.report(model, student, print_fn=print, errors=errors)
    print(f"Saved {_save_model(student, out)}")


def _calibration_batches(args, batch_size=None):
    """The token-id windows of ``--calibration-data`` (.npz or text, with
    ``--vocabulary`` for text), batched as the model reads them
    (``batch_size``: default ``--batch-size``)."""
    from keras_antman import datasets
    from keras_antman.datasets import text

    vocabulary, level = None, args.level
    if args.vocabulary:
        _existing(args.vocabulary, "vocabulary file")
        vocabulary, saved_level = text.load_vocabulary(args.vocabulary)
        level = saved_level or level
    elif not str(args.calibration_data).endswith(".npz"):
        raise UsageError("--calibration-data as text needs the teacher's "
                         "--vocabulary (or give an .npz of token ids)")
    try:
        ids, _, _ = text.load_token_ids(args.calibration_data, level,
                                        vocabulary)
        data = datasets.bptt_dataset(ids, batch_size or args.batch_size,
                                     args.num_steps)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    return data.map(lambda x, y: x)


def _json_number(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def cmd_report(args):
    import keras_antman as am

    before = load_model(args.model)
    after = load_model(args.compressed) if args.compressed else None
    rep = am.report(before, after)
    if args.json:
        rows = [{k: _json_number(v) for k, v in d.items()}
                for d in rep.to_dicts()]
        print(json.dumps(rows, indent=1))
    else:
        print(rep)


def _coefficients(text):
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise UsageError(f"--coefficients takes three numbers C_TARGET,C_MSE,"
                         f"C_KL such as 1,30,1000; received {text!r}")
    return dict(zip(("c_target", "c_mse", "c_kl"), values))


def _distill_data(args, teacher):
    from keras_antman.datasets import text

    vocabulary = None
    if args.vocabulary:
        vocabulary, _ = text.load_vocabulary(
            _existing(args.vocabulary, "vocabulary file"))
    train, valid, vocabulary = text.load_token_ids(
        _existing(args.data, "data file"), args.level, vocabulary,
        args.valid and _existing(args.valid, "validation file"))
    classes = teacher.output_shape[-1]
    if vocabulary is not None:
        if len(vocabulary) != classes:
            raise UsageError(
                f"{args.data} has a {args.level}-level vocabulary of "
                f"{len(vocabulary):,} tokens but the teacher predicts "
                f"{classes:,} classes; pass the teacher's vocabulary with "
                "--vocabulary or use --level "
                + ("char" if args.level == "word" else "word"))
    for name, ids in (("training", train), ("validation", valid)):
        if ids is not None and len(ids) and (ids.min() < 0
                                             or ids.max() >= classes):
            raise UsageError(
                f"{name} token ids span [{ids.min()}, {ids.max()}] but the "
                f"teacher predicts {classes:,} classes")
    if valid is None:  # hold out the last tenth
        cut = len(train) - len(train) // 10
        train, valid = train[:cut], train[cut:]
    return train, valid, vocabulary


def cmd_distill(args):
    import keras_antman as am
    from keras_antman import datasets
    from keras_antman._keras import keras
    from keras_antman.datasets import text

    coefficients = _coefficients(args.coefficients) \
        if args.coefficients else None
    teacher = load_model(args.teacher)
    student = load_model(args.student)
    train, valid, vocabulary = _distill_data(args, teacher)
    try:
        train_ds = datasets.bptt_dataset(train, args.batch_size,
                                         args.num_steps)
        valid_ds = datasets.bptt_dataset(valid, args.batch_size,
                                         args.num_steps)
    except ValueError as e:
        raise UsageError(f"{e} (try a smaller --batch-size or --num-steps)") \
            from None
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if vocabulary is not None:
        text.save_vocabulary(os.path.join(out, "vocabulary.json"), vocabulary,
                             args.level)
    print(f"Data: {len(train):,} training and {len(valid):,} validation "
          f"tokens, batches of {args.batch_size} x {args.num_steps}.")
    backup = os.path.join(out, "backup")
    calib_path = os.path.join(out, "coefficients.json")
    if not args.resume:
        shutil.rmtree(backup, ignore_errors=True)
    elif coefficients is None and os.path.exists(calib_path):
        with open(calib_path) as f:
            coefficients = json.load(f)
        print(f"Resuming with the coefficients of {calib_path}.")

    def optimizer():
        return keras.optimizers.Adam(args.lr, clipnorm=5.0)

    if coefficients is None:
        print(f"Calibrating the coefficients: three runs of "
              f"{args.calibrate_steps} steps (the paper's method).")
        found = am.calibrate_coefficients(
            student, teacher, train_ds.repeat(), validation_data=valid_ds,
            steps=args.calibrate_steps, optimizer=optimizer,
            reinitialize=True, verbose=args.verbose)
        coefficients = found.compile_kwargs()
        with open(calib_path, "w") as f:
            json.dump(coefficients, f)
    print("Coefficients: " + ", ".join(f"{k} = {v:g}"
                                       for k, v in coefficients.items()))
    distiller = am.Distiller(student=student, teacher=teacher)
    distiller.compile(optimizer=optimizer(), metrics=[am.Perplexity()],
                      **coefficients)
    train_data = train_ds.repeat() if args.steps else train_ds
    history = distiller.fit(
        train_data, validation_data=valid_ds, epochs=args.epochs,
        steps_per_epoch=args.steps or None, verbose=args.verbose,
        callbacks=[keras.callbacks.BackupAndRestore(backup)])
    # Finished: Keras 3 deletes the backup, tf_keras leaves the folder.
    shutil.rmtree(backup, ignore_errors=True)
    path = _save_model(distiller.student, os.path.join(out, "student.keras"))
    hist = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    with open(os.path.join(out, "history.json"), "w") as f:
        json.dump(dict(coefficients=coefficients, history=hist), f, indent=1)
    last = {k: v[-1] for k, v in hist.items() if v}
    if "val_perplexity" in last:
        print(f"Validation perplexity {last['val_perplexity']:.3f}.")
    print(f"Saved {path} and {os.path.join(out, 'history.json')}")


def cmd_export(args):
    import keras_antman as am

    if args.tflite and not args.tflite.endswith(".tflite"):
        raise UsageError(f"--tflite {args.tflite} must end in .tflite")
    if args.quantize and not args.tflite:
        raise UsageError("--quantize applies to the TFLite file: add "
                         "--tflite FILE")
    if (args.quantize == "int8") != bool(args.calibration_data):
        raise UsageError(
            "--quantize int8 calibrates on --calibration-data (and only it "
            "does); --quantize dynamic needs no data")
    calibration = None
    if args.calibration_data:
        # Windows of --num-steps tokens; the TFLite file takes that length.
        calibration = _calibration_batches(args, batch_size=20).take(
            args.calibration_steps)
    model = load_model(args.model)
    print(f"Exporting {args.model} ({args.kernel}) to {args.directory}")
    path = am.export(model, args.directory, kernel=args.kernel,
                     batch_size=args.batch_size, overwrite=args.overwrite)
    print(f"Saved {path}")
    if args.tflite:
        print(f"Converting a portable export (batch {args.batch_size or 1}"
              + (f", {args.quantize} int8" if args.quantize else "")
              + ") to TFLite with built-in ops")
        am.export_tflite(model, args.tflite, quantize=args.quantize,
                         representative_data=calibration,
                         batch_size=args.batch_size or 1, overwrite=True)
        print(f"Saved {os.path.abspath(args.tflite)}")


def cmd_bench(args):
    from keras_antman import benchmark

    fixed = benchmark.configure_threads(args.threads)
    model = load_model(args.model)
    if args.tflite:
        _existing(args.tflite, "TFLite file")
    paths = args.paths.split(",") if args.paths else None
    print(f"Timing {args.model}: batch {args.batch}, {args.steps} steps, "
          f"{args.threads} thread(s), median of {args.repeats} runs.")
    if not fixed:
        print("  (TensorFlow was already running: its thread pools keep "
              "their size; the op and TFLite use --threads)")
    result = benchmark.time_model(
        model, batch=args.batch, steps=args.steps, threads=args.threads,
        repeats=args.repeats, paths=paths, tflite=args.tflite)
    print(f"Machine: {benchmark.machine()}")
    print(benchmark.format_table({model.name: result}))
    if args.json:
        print(json.dumps(result))
    return result


def cmd_demo(args):
    from keras_antman import demo

    parse_scheme(args.input_scheme)
    parse_scheme(args.recurrent_scheme)
    return demo.run(args)


def _add_text_data_args(parser):
    """How text calibration data becomes windows of token ids (``compress``
    and ``export --quantize int8`` read it alike)."""
    parser.add_argument("--vocabulary", metavar="VOCAB.json",
                        help="vocabulary of text calibration data")
    parser.add_argument("--level", choices=("word", "char"), default="word",
                        help="tokens of text calibration data")
    parser.add_argument("--num-steps", type=int, default=35,
                        help="calibration window length")


def build_parser():
    from keras_antman import demo

    parser = argparse.ArgumentParser(
        prog="keras-antman",
        description="Structured (AntMan) compression of Keras LSTM/GRU "
                    "models: compress, report, distill, export, bench.",
        epilog=SCHEME_GRAMMAR,
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="COMMAND")

    def command(name, func, help, description=None):
        p = sub.add_parser(name, help=help, description=description or help,
                           epilog=SCHEME_GRAMMAR,
                           formatter_class=_Formatter)
        p.set_defaults(func=func)
        return p

    d = command("demo", cmd_demo,
                "the whole pipeline on a small LSTM language model",
                demo.__doc__)
    demo.add_arguments(d)

    c = command("compress", cmd_compress,
                "replace the LSTM/GRU layers of a .keras model by "
                "structured ones and print the report")
    c.add_argument("model", metavar="MODEL.keras")
    c.add_argument("-o", "--output", metavar="OUT.keras",
                   help="output file (default: MODEL_antman.keras)")
    c.add_argument("--input-scheme", default="lgp_shuffle:8", metavar="SPEC",
                   help="scheme of the input products")
    c.add_argument("--recurrent-scheme", default="lgp_shuffle:8",
                   metavar="SPEC", help="scheme of the recurrent products")
    c.add_argument("--layers", metavar="POLICY.json",
                   help='compress only these layers: {"lstm_1": '
                        '["lgp_shuffle:10", "low_rank:2"], "lstm_2": null}; '
                        "null keeps a layer as it is")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file")
    c.add_argument("--calibration-data", metavar="DATA",
                   help="fit each product to the inputs it sees on this "
                        "data (.npz of token ids, or text with "
                        "--vocabulary) instead of copying the nearest "
                        "structured matrix; prints each product's output "
                        "error before and after")
    c.add_argument("--calibration-steps", type=int, default=20,
                   help="batches of calibration data to run")
    _add_text_data_args(c)
    c.add_argument("--batch-size", type=int, default=20,
                   help="calibration batch size")

    r = command("report", cmd_report,
                "parameters and multiply-adds per layer, before and after")
    r.add_argument("model", metavar="A.keras")
    r.add_argument("compressed", metavar="B.keras", nargs="?",
                   help="the compressed model (default: report A alone)")
    r.add_argument("--json", action="store_true", help="print JSON rows")

    s = command("distill", cmd_distill,
                "distil a compressed student from its teacher (coefficients "
                "calibrated by the paper's method unless given)")
    s.add_argument("--teacher", required=True, metavar="T.keras",
                   help="the trained model")
    s.add_argument("--student", required=True, metavar="S.keras",
                   help="its compressed version (keras-antman compress)")
    s.add_argument("--data", required=True, metavar="FILE",
                   help="a UTF-8 text file, or an .npz of token ids (keys "
                        "train and optionally valid)")
    s.add_argument("--valid", metavar="FILE",
                   help="validation file (default: the last 10%% of --data)")
    s.add_argument("--level", choices=("word", "char"), default="word",
                   help="text tokens: words (<eos> per line) or characters")
    s.add_argument("--vocabulary", metavar="VOCAB.json",
                   help="the teacher's vocabulary (default: built from "
                        "--data by count; saved as OUT/vocabulary.json)")
    s.add_argument("-o", "--out", default="antman_distill", metavar="DIR",
                   help="output folder: student.keras, history.json, "
                        "vocabulary.json, backup/ ")
    s.add_argument("--coefficients", metavar="C_TARGET,C_MSE,C_KL",
                   help="skip calibration, e.g. 1,30,1000")
    s.add_argument("--calibrate-steps", type=int, default=50,
                   help="training steps per loss term when calibrating")
    s.add_argument("--epochs", type=int, default=1, help="epochs")
    s.add_argument("--steps", type=int, default=0,
                   help="steps per epoch (default: the whole data)")
    s.add_argument("--batch-size", type=int, default=20,
                   help="sequences per batch")
    s.add_argument("--num-steps", type=int, default=35,
                   help="BPTT sequence length ")
    s.add_argument("--lr", type=float, default=1e-3,
                   help="Adam learning rate (gradient norm clipped at 5)")
    s.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUT/backup")
    s.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2),
                   help="Keras progress: 0 none, 1 bar, 2 a line per epoch")

    e = command("export", cmd_export,
                "write a SavedModel for serving, and optionally TFLite")
    e.add_argument("model", metavar="MODEL.keras")
    e.add_argument("directory", metavar="DIR")
    e.add_argument("--kernel", choices=("compiled", "portable"),
                   default="portable",
                   help="compiled: our CPU op (load it with "
                        "keras_antman.ops.load() before the SavedModel); "
                        "portable: stock TF ops (default)")
    e.add_argument("--tflite", metavar="FILE",
                   help="also write a TFLite model (built-in ops) here")
    e.add_argument("--batch-size", type=int,
                   help="fix the batch size (TFLite: default 1)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace an existing DIR")
    e.add_argument("--quantize", choices=("dynamic", "int8"),
                   help="TFLite: dynamic-range int8 (weights) or full int8 "
                        "(weights and activations; needs "
                        "--calibration-data, and fixes the length to "
                        "--num-steps)")
    e.add_argument("--calibration-data", metavar="DATA",
                   help="--quantize int8: token ids to calibrate on (.npz, "
                        "or text with --vocabulary)")
    e.add_argument("--calibration-steps", type=int, default=10,
                   help="batches of 20 calibration windows to use")
    _add_text_data_args(e)

    b = command("bench", cmd_bench,
                "time a model on this machine through each path it runs: "
                "stock Keras (stock models), compiled op, portable TF ops, "
                "TFLite")
    b.add_argument("model", metavar="MODEL.keras")
    b.add_argument("--batch", type=int, default=1, help="batch size")
    b.add_argument("--steps", type=int, default=35,
                   help="sequence length ")
    b.add_argument("--threads", type=int, default=1,
                   help="threads of TensorFlow, the op and TFLite")
    b.add_argument("--repeats", type=int, default=50,
                   help="timed calls per path (the median is reported)")
    b.add_argument("--paths", metavar="P1,P2",
                   help="subset of keras,compiled,portable,tflite")
    b.add_argument("--tflite", metavar="FILE",
                   help="time this .tflite file (default: convert the model)")
    b.add_argument("--json", action="store_true",
                   help="also print the times as JSON")
    return parser


def _one_line(error):
    text = " ".join(str(error).split())
    if isinstance(error, (FileNotFoundError, FileExistsError)) and \
            error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    return text or type(error).__name__


def _probe_devices_quietly():
    """TF's CUDA probe logs an error line from C++ on a machine without a
    GPU, whatever ``TF_CPP_MIN_LOG_LEVEL`` says; it would sit next to our
    one-line errors. Probing once with stderr closed avoids it."""
    import tensorflow as tf

    from keras_antman.benchmark import quiet_stderr

    with quiet_stderr():
        tf.config.list_physical_devices()  # the probe, not the runtime


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message="`shuffle=True` was passed")
    try:
        _probe_devices_quietly()
        args.func(args)
    except (UsageError, ValueError, OSError, RuntimeError) as e:
        if os.environ.get("KERAS_ANTMAN_DEBUG"):
            raise
        print(f"keras-antman {args.command}: error: {_one_line(e)}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("keras-antman: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Inference latency of a model on this machine, through each path it runs.

What `keras-antman bench` and the demo's latency stage measure: one model,
a fixed input (batch, sequence length), timed through

- ``keras``: the stock Keras layers in a ``tf.function`` (stock models only);
- ``compiled``: the structured layers on the compiled CPU op (a stock
  model's LSTM/GRU layers are first converted to structured layers with
  `Dense` schemes, the same weights and outputs: the op's dense baseline);
- ``portable``: the structured layers on stock TF ops (structured models);
- ``tflite``: the TFLite interpreter on a conversion of the portable
  export (`keras_antman.export_tflite`: built-in ops only, fixed batch).

Each time is the median of ``repeats`` calls after warm-up calls, in
milliseconds, as ``bench/speedup.py`` times (``time.perf_counter``).
Threads are fixed for TensorFlow, the op and TFLite alike, and TensorFlow's
can only be set before it runs anything: `configure_threads` first thing in
a fresh process (the demo measures in a child process for that reason).
"""

import contextlib
import os
import shutil
import sys
import tempfile
import time

import numpy as np

PATHS = ("keras", "compiled", "portable", "tflite")
PATH_TITLES = {
    "keras": "stock Keras",
    "compiled": "compiled op",
    "portable": "portable (TF ops)",
    "tflite": "TFLite",
}


@contextlib.contextmanager
def quiet_stderr(keep_on_error=False):
    """Sends file descriptor 2 to a temporary file for the block.

    TensorFlow's C++ code (its import, the TFLite converter) logs there
    whatever ``TF_CPP_MIN_LOG_LEVEL`` says; ``TF_CPP_MIN_LOG_LEVEL=0``
    keeps it. With ``keep_on_error``, a failing block replays the log.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") == "0":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    log = tempfile.TemporaryFile()
    try:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
    except BaseException:
        if keep_on_error:
            log.seek(0)
            sys.stderr.write(log.read().decode(errors="replace")[-4000:])
        raise
    finally:
        os.close(saved)
        log.close()


def configure_threads(threads):
    """Use ``threads`` threads in TensorFlow's pools and the compiled op.

    Call before TensorFlow executes anything: TF refuses later changes, and
    then only the op's and TFLite's threads follow (returns ``False``).
    """
    import tensorflow as tf

    from keras_antman import ops

    ops.set_num_threads(threads)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        return tf.config.threading.get_intra_op_parallelism_threads() == \
            threads
    return True


def machine():
    """One line: CPU model, cores, the op's ISA, TF version."""
    import tensorflow as tf

    from keras_antman import ops
    from keras_antman.hardware import cpu_model

    cpu = cpu_model()
    try:
        isa = ops.instruction_set() if ops.is_available() else "op missing"
    except Exception as e:  # noqa: BLE001 - a description, never fatal
        isa = f"op unavailable ({type(e).__name__})"
    return (f"{cpu}, {os.cpu_count()} logical cores, op ISA {isa}, "
            f"TensorFlow {tf.__version__}")


def median_ms(fn, repeats, warmup=3, progress=None):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if progress is not None:
            progress.update(1)
    return 1e3 * float(np.median(times))


def sample_input(model, batch, steps, seed=0):
    """A seeded input for ``model``: token ids below the first Embedding's
    vocabulary for an integer input, normal floats otherwise."""
    from keras_antman._keras import keras

    spec = model.inputs[0]
    shape = list(spec.shape)
    shape[0] = batch
    if len(shape) > 1 and shape[1] is None:
        shape[1] = steps
    if any(d is None for d in shape):
        raise ValueError(
            f"Model '{model.name}' has input shape {tuple(spec.shape)}: only "
            "the batch and time dimensions may be unknown."
        )
    rng = np.random.default_rng(seed)
    dtype = getattr(spec.dtype, "name", spec.dtype)  # tf_keras: a tf.DType
    if "int" in str(dtype):
        vocab = next((layer.input_dim for layer in _walk(model)
                      if isinstance(layer, keras.layers.Embedding)), 2)
        return rng.integers(0, vocab, size=shape).astype(str(dtype))
    return rng.normal(size=shape).astype(str(dtype))


def _walk(layer):
    from keras_antman import _keras

    yield layer
    for sub in _keras.sublayers(layer):
        yield from _walk(sub)


def is_structured(model):
    from keras_antman.export import _structured_layers

    return bool(_structured_layers(model))


def has_recurrent(model):
    from keras_antman._keras import keras

    return any(isinstance(layer, keras.layers.RNN) for layer in _walk(model))


def compiled_blockers(model):
    """Why the compiled op cannot run ``model``'s structured layers, e.g.
    a Kronecker product, which it has no stage for (empty if it can)."""
    from keras_antman.export import _structured_layers

    return [f"{layer.name}: {reason}"
            for layer in _structured_layers(model)
            for reason in layer.compiled_blockers(None)]


def available_paths(model):
    """The paths of `PATHS` that ``model`` can be timed through."""
    from keras_antman import ops

    structured = is_structured(model)
    paths = ["portable"] if structured else ["keras"]
    runs_on_op = not compiled_blockers(model) if structured else \
        has_recurrent(model)
    if runs_on_op and ops.is_available():
        paths.insert(0 if structured else 1, "compiled")
    return paths + ["tflite"]


def _keras_fn(model, x, kernel):
    import tensorflow as tf

    from keras_antman.export import kernel_mode

    x = tf.constant(x)
    fn = tf.function(lambda v: model(v, training=False))
    if kernel is None:
        fn(x)
    else:
        with kernel_mode(model, kernel):
            fn(x)  # traced with this kernel
    return lambda: fn(x)


def write_atomic(path, data):
    """Writes bytes or text to ``path`` through a temporary file."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path),
                               prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _tflite_fn(path, x, threads):
    import warnings

    import tensorflow as tf

    with warnings.catch_warnings(), quiet_stderr():
        # tf.lite.Interpreter warns that it moves to ai_edge_litert; it is
        # what TF 2.21 ships, and XNNPACK logs its delegate from C++.
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=path,
                                          num_threads=threads)
        (detail,) = interpreter.get_input_details()
        want = tuple(int(d) for d in detail["shape_signature"])
        if len(want) != x.ndim or any(
                w not in (-1, d) for w, d in zip(want, x.shape)):
            raise ValueError(
                f"TFLite model {path} takes input shape {want} (-1: any), "
                f"not {x.shape}; convert it with that batch size."
            )
        interpreter.resize_tensor_input(detail["index"], x.shape,
                                        strict=True)
        interpreter.allocate_tensors()
    index = detail["index"]

    def run():
        interpreter.set_tensor(index, x)
        interpreter.invoke()

    return run


def time_model(model, batch=1, steps=35, threads=1, repeats=50,
               paths=None, tflite=None, progress=True, seed=0, label=None):
    """Median latency (ms) of ``model`` through each path.

    Args:
        model: a built Keras model (stock or compressed).
        batch: batch size of the input.
        steps: sequence length (when the model's time axis is unknown).
        threads: TFLite interpreter threads (TensorFlow's and the op's come
            from `configure_threads`).
        repeats: timed calls per path; the median is reported.
        paths: a subset of `available_paths(model)` (default: all of
            them; the compiled op only for a model it can run).
        tflite: an existing ``.tflite`` file to time for the ``tflite``
            path (default: convert the model into a temporary file).
        progress: show a tqdm progress bar.
        seed: seed of the input.
        label: name on the progress bar (default: the model's).

    Returns:
        ``{path: milliseconds}`` in the order of the paths.
    """
    import tqdm

    from keras_antman.compress import compress
    from keras_antman.export import export_tflite

    possible = available_paths(model)
    paths = possible if paths is None else list(paths)
    for p in paths:
        if p not in possible:
            blockers = compiled_blockers(model) if p == "compiled" else []
            raise ValueError(
                f"Model '{model.name}' cannot be timed through {p!r}"
                + (f" ({'; '.join(blockers)})" if blockers else "")
                + f"; it runs through {possible}."
            )
    x = sample_input(model, batch, steps, seed)
    results = {}
    bar = tqdm.tqdm(total=len(paths) * repeats, unit="call",
                    disable=not progress, leave=False)
    tmp = None
    try:
        for p in paths:
            bar.set_description(f"{label or model.name}: {PATH_TITLES[p]}")
            if p == "keras":
                fn = _keras_fn(model, x, None)
            elif p == "compiled":
                target = model if is_structured(model) else \
                    compress(model)
                fn = _keras_fn(target, x, "compiled")
            elif p == "portable":
                fn = _keras_fn(model, x, "portable")
            else:
                path = tflite
                if path is None:
                    tmp = tempfile.mkdtemp(prefix=".bench-")
                    path = export_tflite(model,
                                         os.path.join(tmp, "m.tflite"),
                                         batch_size=batch)
                fn = _tflite_fn(path, x, threads)
            results[p] = median_ms(fn, repeats, progress=bar)
    finally:
        bar.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return results


def format_table(rows, title="model"):
    """Markdown table: ``rows`` is ``{name: {path: ms}}``."""
    paths = [p for p in PATHS if any(p in r for r in rows.values())]
    head = [title] + [f"{PATH_TITLES[p]} (ms)" for p in paths]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in rows.items():
        cells = [f"{r[p]:.3f}" if p in r else "-" for p in paths]
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def _main(argv=None):
    """Child-process entry of the demo: time models listed in a JSON job.

    ``python -m keras_antman.benchmark JOB.json``; the job is
    ``{"threads", "batch", "steps", "repeats", "out", "models":
    [{"name", "model", "tflite", "paths"}]}`` and ``out`` receives
    ``{"machine", "results": {name: {path: ms}}}``.
    """
    import json

    with open((argv or sys.argv[1:])[0]) as f:
        job = json.load(f)
    import tensorflow as tf

    with quiet_stderr():
        tf.config.list_physical_devices()  # CUDA probe noise, see cli.py
    configure_threads(job["threads"])
    import keras_antman  # noqa: F401 - registers the layers for loading
    from keras_antman._keras import keras

    out = {"machine": machine(), "results": {}}
    for entry in job["models"]:
        model = keras.models.load_model(entry["model"], compile=False)
        possible = available_paths(model)  # no op for Kronecker, say
        out["results"][entry["name"]] = time_model(
            model, batch=job["batch"], steps=job["steps"],
            threads=job["threads"], repeats=job["repeats"],
            paths=[p for p in entry["paths"] if p in possible],
            tflite=entry.get("tflite"),
            label=entry["name"])
        print(f"  {entry['name']}: " + ", ".join(
            f"{PATH_TITLES[p]} {ms:.2f} ms"
            for p, ms in out["results"][entry["name"]].items()), flush=True)
    write_atomic(job["out"], json.dumps(out, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _main()

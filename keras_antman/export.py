"""`export`: write a model as a TensorFlow SavedModel for serving, and
`export_tflite`: as a TFLite flatbuffer, in float32 or quantized to int8.

Two flavours. ``kernel="compiled"`` traces the structured layers with the
compiled CPU op (fast; the loading process calls ``keras_antman.ops.load()``
first, which registers the op). ``kernel="portable"`` traces them with stock
TF ops only, so the SavedModel loads in any TensorFlow process (TF Serving)
and converts to TFLite. Either way, a scheme may write some weights as
constants of the graph instead (`Scheme.serving_arrays`): a `Doped`
matrix's sparse part is exported as CSR arrays (values, indices) and a
Gather / UnsortedSegmentSum product, not as a dense masked matrix. The
directory is written next to its destination and
renamed into place, so a failure never leaves a half-written SavedModel.

`export_tflite` converts the portable SavedModel with TFLite's built-in
ops only (never ``SELECT_TF_OPS``): float32, dynamic-range int8 (int8
weights, float activations; no data needed) or full integer (int8 weights
and activations, calibrated on a representative dataset). The file is
written through a temporary file and renamed into place.
"""

import contextlib
import os
import shutil
import tempfile

from keras_antman import _keras
from keras_antman import layers as layers_lib
from keras_antman import schemes as schemes_lib

EXPORT_KERNELS = ("compiled", "portable")


@contextlib.contextmanager
def serving_constants(model):
    """Trace every `StructuredMatrix` of ``model`` with its scheme's
    serving constants (`Scheme.serving_arrays`: e.g. a doped matrix's
    sparse part as constant CSR arrays instead of a dense masked weight).
    """
    found = [m for m in _layers_of(model, schemes_lib.StructuredMatrix)
             if m.built]
    with contextlib.ExitStack() as stack:
        for matrix in found:
            stack.enter_context(matrix.serving_constants())
        yield found


def _layers_of(model, cls):
    """Every layer of ``model`` (itself and nested ones, depth first) that
    is an instance of ``cls``."""
    found = []

    def walk(layer):
        if isinstance(layer, cls):
            found.append(layer)
        for sub in _keras.sublayers(layer):
            walk(sub)

    walk(model)
    return found


def _structured_layers(model):
    return _layers_of(model, layers_lib._StructuredRNN)


@contextlib.contextmanager
def _attribute_set(layers, name, value):
    """Temporarily set attribute ``name`` of every layer to ``value``."""
    saved = [getattr(layer, name) for layer in layers]
    try:
        for layer in layers:
            setattr(layer, name, value)
        yield layers
    finally:
        for layer, old in zip(layers, saved):
            setattr(layer, name, old)


@contextlib.contextmanager
def kernel_mode(model, kernel):
    """Temporarily run every structured layer of ``model`` with ``kernel``.

    Args:
        model: a Keras model or layer.
        kernel: ``"auto"``, ``"compiled"`` or ``"portable"``.

    Yields:
        The list of structured layers that were switched.
    """
    if kernel not in layers_lib.KERNEL_CHOICES:
        raise ValueError(
            f"`kernel` must be one of {layers_lib.KERNEL_CHOICES}. "
            f"Received: kernel={kernel!r}"
        )
    with _attribute_set(_structured_layers(model), "kernel", kernel) as found:
        yield found


def export(model, path, kernel="portable", batch_size=None, overwrite=False,
           verbose=False):
    """Write ``model`` as a SavedModel whose ``serve`` endpoint runs inference.

    Args:
        model: a built Keras model (compressed or not).
        path: destination directory; it must not exist unless
            ``overwrite=True``.
        kernel: ``"compiled"``: the structured recurrent layers run the
            compiled, OpenMP-parallel CPU op (the serving process calls
            ``keras_antman.ops.load()`` before loading the SavedModel,
            which registers the op). ``"portable"``: stock TF ops only;
            loads anywhere TensorFlow does and converts to TFLite.
        batch_size: fix the batch dimension of the serving signature
            (``None``: any batch). TFLite conversion of the portable
            flavour needs a fixed batch size (its tensor lists need static
            element shapes).
        overwrite: replace an existing directory at ``path``.
        verbose: print Keras's export summary.

    Returns:
        The path written (a string).

    Raises:
        ValueError: for an unknown ``kernel`` or an unbuilt model.
        FileExistsError: if ``path`` exists and ``overwrite`` is false.
        RuntimeError: for ``kernel="compiled"`` when the compiled op cannot
            be loaded (the message says how to build it).
    """
    if kernel not in EXPORT_KERNELS:
        raise ValueError(
            f"`kernel` must be one of {EXPORT_KERNELS}. Received: "
            f"kernel={kernel!r}"
        )
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built: call it on data first."
        )
    if kernel == "compiled":
        from keras_antman import ops

        ops.load()  # raises with instructions when the op is missing
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{path} exists; pass overwrite=True to replace it."
        )
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(path)}.export-"
    _remove_stale(parent, prefix)
    tmp = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    try:
        staged = os.path.join(tmp, "saved_model")
        with kernel_mode(model, kernel), serving_constants(model):
            _keras.export_saved_model(
                model, staged, _signature(model, batch_size), verbose)
        if os.path.exists(path):
            old = os.path.join(tmp, "old")
            os.rename(path, old)
        os.rename(staged, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _remove_stale(parent, prefix):
    """Removes staging folders of exports whose process died mid-write.

    A staging folder is named ``<prefix><pid>-<random>``; one whose process
    no longer runs can never be completed or cleaned by its owner.
    """
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _signature(model, batch_size):
    import tensorflow as tf

    if batch_size is None:
        return None
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be None or a positive integer. Received: "
            f"batch_size={batch_size!r}"
        )
    return [
        tf.TensorSpec((batch_size, *x.shape[1:]), x.dtype, name=x.name)
        for x in model.inputs
    ]


QUANTIZE_MODES = (None, "dynamic", "int8")


def export_tflite(model, path, quantize=None, representative_data=None,
                  batch_size=1, steps=None, overwrite=False):
    """Write ``model`` as a TFLite flatbuffer, built-in ops only.

    The structured layers are traced on stock TF ops (as
    ``export(kernel="portable")``; a layer set to ``kernel="compiled"`` keeps
    its setting) and the graph is converted by ``tf.lite.TFLiteConverter``
    with ``TFLITE_BUILTINS`` alone (``TFLITE_BUILTINS_INT8`` for
    ``"int8"``), never ``SELECT_TF_OPS``: the file runs on any TFLite
    interpreter.

    Args:
        model: a built Keras model (compressed or not).
        path: destination file; it must not exist unless ``overwrite``.
        quantize: ``None``: float32. ``"dynamic"``: dynamic-range
            quantization (``tf.lite.Optimize.DEFAULT``, no data): weights
            of 1024 elements or more stored as int8, the matrix products
            run in int8 on activations quantized on the fly, everything
            else in float32. ``"int8"``: full-integer quantization: every
            weight and activation int8 (int32 biases), ranges calibrated on
            ``representative_data``; the model's inputs and outputs keep
            their dtypes (a float input is quantized inside the model,
            integer token ids stay int32, outputs are dequantized).
        representative_data: ``quantize="int8"`` only: model inputs to
            calibrate on, as an array of ``N`` samples, or an iterable
            (e.g. a ``tf.data.Dataset``) of such arrays or of ``(x, y)``
            pairs, whose ``x`` is used; fed ``batch_size`` rows at a time
            (a remainder is dropped). A few hundred samples like the
            serving data suffice.
        batch_size: the fixed batch size of the TFLite model (a positive
            integer; the portable graph's tensor lists need static shapes).
        steps: fix the time dimension (axis 1 of the input) to this many
            steps and unroll the recurrent layers' loops, one set of ops
            per step instead of a ``WHILE`` loop. ``None``: any length,
            loops stay ``WHILE`` loops, except for ``"int8"``, which
            always unrolls (TFLite's calibrator crashes the process on a
            recurrent ``WHILE`` loop, tensorflow/tensorflow#75140) and
            defaults to the model's fixed time length or else the
            representative sequences' length.
        overwrite: replace an existing file at ``path``.

    Returns:
        The path written (a string).

    Raises:
        ValueError: for an unknown ``quantize``, ``representative_data``
            missing for ``"int8"`` or given without it, calibration inputs
            of the wrong shape, dtype or length, a bad ``batch_size`` or
            ``steps``, or an unbuilt model.
        FileExistsError: if ``path`` exists and ``overwrite`` is false.
        RuntimeError: if TFLite cannot convert the model with built-in
            ops (the message names what failed).
    """
    if quantize not in QUANTIZE_MODES:
        raise ValueError(
            f"`quantize` must be one of {QUANTIZE_MODES}. Received: "
            f"quantize={quantize!r}"
        )
    if quantize == "int8" and representative_data is None:
        raise ValueError(
            "quantize='int8' calibrates activation ranges on "
            "`representative_data` (a few hundred model inputs); pass it, "
            "or use quantize='dynamic', which needs no data."
        )
    if quantize != "int8" and representative_data is not None:
        raise ValueError(
            "`representative_data` is only used with quantize='int8'. "
            f"Received: quantize={quantize!r}"
        )
    for name, value in (("batch_size", batch_size), ("steps", steps)):
        if value is None and name == "steps":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or \
                value < 1:
            raise ValueError(
                f"`{name}` must be a positive integer"
                + (" or None" if name == "steps" else
                   " (TFLite needs a fixed batch size)")
                + f". Received: {name}={value!r}"
            )
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built: call it on data first."
        )
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{path} exists; pass overwrite=True to replace it."
        )
    batches = None
    if quantize == "int8":
        batches = _calibration_batches(model, representative_data,
                                       batch_size)
        steps = _int8_steps(model, batches, steps)
    signature = _tflite_signature(model, batch_size, steps)
    from keras_antman.benchmark import write_atomic

    tmp = tempfile.mkdtemp(prefix=".export_tflite-")
    try:
        saved = os.path.join(tmp, "saved_model")
        with contextlib.ExitStack() as stack:
            stack.enter_context(kernel_mode(model, "portable"))
            stack.enter_context(serving_constants(model))
            stack.enter_context(_unrolled(model, steps is not None))
            if quantize == "int8":
                stack.enter_context(schemes_lib.per_group_products())
            _save_serving_function(model, saved, signature)
        flatbuffer = _convert(saved, model.name, quantize, batches)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_atomic(path, flatbuffer)
    return path


def _save_serving_function(model, path, signature):
    """A SavedModel of ``model``'s inference at the fixed shapes of
    ``signature``, holding its variables but not the Keras model (which
    Keras 3 would also trace at its own, possibly variable, shapes: an
    unrolled loop needs the time length)."""
    import tensorflow as tf

    spec = signature if len(signature) > 1 else signature[0]

    @tf.function(input_signature=[spec])
    def serve(inputs):
        return model(inputs, training=False)

    module = tf.Module()
    # Keras 3 variables wrap a tf.Variable in `.value`; tf_keras's are one.
    module.held = [v if isinstance(v, tf.Variable) else v.value
                   for v in model.variables]
    tf.saved_model.save(module, path, signatures=serve.get_concrete_function())


def _tflite_signature(model, batch_size, steps):
    """Input specs with the batch, and the time axis if ``steps``, fixed."""
    import tensorflow as tf

    specs = []
    for x in model.inputs:
        shape = [batch_size, *x.shape[1:]]
        if steps is not None:
            if len(shape) < 2 or shape[1] not in (None, steps):
                raise ValueError(
                    f"`steps={steps}` fixes axis 1 of the inputs, but model "
                    f"'{model.name}' takes {tuple(x.shape)}."
                )
            shape[1] = steps
        specs.append(tf.TensorSpec(shape, x.dtype, name=x.name))
    return specs


def _int8_steps(model, batches, steps):
    """The unrolled length for ``"int8"``: ``steps``, else the model's
    fixed time length, else the calibration sequences' (one length)."""
    fixed = model.inputs[0].shape[1] if len(model.inputs[0].shape) > 1 \
        else None
    lengths = sorted({b.shape[1] for b in batches if b.ndim > 1})
    if steps is None:
        steps = fixed if fixed is not None else (
            lengths[0] if len(lengths) == 1 else None)
    if steps is None:
        raise ValueError(
            f"`representative_data` holds sequences of lengths {lengths}; "
            "quantize='int8' unrolls the recurrent loops over one length: "
            "pass `steps`, and calibration sequences of that length."
        )
    if lengths and lengths != [steps]:
        raise ValueError(
            f"`representative_data` holds sequences of lengths {lengths}, "
            f"but the model is unrolled over steps={steps}; give "
            "calibration sequences of that length."
        )
    return steps


@contextlib.contextmanager
def _unrolled(model, unroll):
    """Temporarily set ``unroll`` on every recurrent layer of ``model``."""
    found = _layers_of(model, _keras.keras.layers.RNN) if unroll else []
    with _attribute_set(found, "unroll", True):
        yield found


def _calibration_batches(model, data, batch_size):
    """``representative_data`` as a list of input arrays of ``batch_size``
    rows, checked against the model's input."""
    import numpy as np

    if len(model.inputs) != 1:
        raise ValueError(
            f"quantize='int8' calibrates models with one input; model "
            f"'{model.name}' has {len(model.inputs)}. Use "
            "quantize='dynamic', which needs no data."
        )
    spec = model.inputs[0]
    want = tuple(spec.shape)[1:]
    dtype = np.dtype(getattr(spec.dtype, "name", spec.dtype))
    if hasattr(data, "shape"):  # one array (or tensor) of samples
        data = [data]
    batches = []
    for item in data:
        if isinstance(item, (tuple, list)):
            item = item[0]  # (x, y) pairs
        x = np.asarray(item)
        got = x.shape[1:]
        if len(got) != len(want) or any(
                w is not None and w != g for w, g in zip(want, got)):
            raise ValueError(
                f"`representative_data` holds inputs of shape {x.shape}; "
                f"model '{model.name}' takes (N, "
                f"{', '.join(str(w) for w in want)}) (None: any size)."
            )
        if (np.issubdtype(x.dtype, np.integer)
                != np.issubdtype(dtype, np.integer)):
            raise ValueError(
                f"`representative_data` holds {x.dtype} inputs; model "
                f"'{model.name}' takes {dtype}."
            )
        for start in range(0, len(x) - batch_size + 1, batch_size):
            batches.append(x[start:start + batch_size].astype(dtype))
    if not batches:
        raise ValueError(
            f"`representative_data` holds no batch of batch_size="
            f"{batch_size} samples; give at least {batch_size} (a few "
            "hundred is typical)."
        )
    return batches


def _convert(saved, name, quantize, batches):
    """The TFLite flatbuffer of the SavedModel at ``saved``."""
    import tensorflow as tf

    from keras_antman.benchmark import quiet_stderr

    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantize is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "int8":
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.representative_dataset = lambda: ([b] for b in batches)
    try:
        with quiet_stderr(keep_on_error=True):
            return converter.convert()
    except Exception as e:  # noqa: BLE001 - converter errors vary by phase
        detail = " ".join(str(e).split())[:1500]
        hint = (" Full-integer quantization needs an int8 kernel for every "
                "op; quantize='dynamic' (int8 weights, float activations) "
                "needs none." if quantize == "int8" else "")
        raise RuntimeError(
            f"TFLite could not convert model '{name}' with built-in ops "
            f"(quantize={quantize!r}): {type(e).__name__}: {detail}.{hint}"
        ) from e


def tflite_summary(tflite):
    """What a TFLite model stores, and which ops compute on floats.

    Reads the flatbuffer itself (every subgraph, so the bodies of the
    recurrent layers' ``WHILE`` loops count too).

    Args:
        tflite: a ``.tflite`` path or the flatbuffer's bytes.

    Returns:
        A dict: ``"weights"``: ``{tensor type: bytes}`` of the constant
        tensors (``"INT8"``, ``"FLOAT32"``, ...); ``"ops"``: ``{op:
        count}``; ``"float_ops"``: ``{op: count}`` of the ops that read a
        float32 activation (a non-constant tensor): in a float model every
        op; after ``quantize="dynamic"`` the hybrid products (int8 weights,
        float activations) and the gate arithmetic; after ``"int8"`` the
        ``QUANTIZE`` of a float model input and any op the quantizer left
        in float between a ``DEQUANTIZE`` and a ``QUANTIZE``.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    if not isinstance(tflite, (bytes, bytearray)):
        with open(tflite, "rb") as f:
            tflite = f.read()
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(tflite))
    type_names = {v: k for k, v in vars(schema.TensorType).items()
                  if not k.startswith("_")}
    float32 = schema.TensorType.FLOAT32
    weights, ops, float_ops = {}, {}, {}
    for graph in model.subgraphs:
        constant = set()
        for i, tensor in enumerate(graph.tensors):
            data = model.buffers[tensor.buffer].data
            if data is not None and len(data):
                constant.add(i)
                name = type_names[tensor.type]
                weights[name] = weights.get(name, 0) + len(data)
        for op in graph.operators:
            name = flatbuffer_utils.opcode_to_name(model, op.opcodeIndex)
            ops[name] = ops.get(name, 0) + 1
            if any(i >= 0 and i not in constant
                   and graph.tensors[i].type == float32 for i in op.inputs):
                float_ops[name] = float_ops.get(name, 0) + 1
    return {"weights": weights, "ops": ops, "float_ops": float_ops}

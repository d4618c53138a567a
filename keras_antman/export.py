"""`export`: write a model as a TensorFlow SavedModel for serving.

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
    found = []

    def walk(layer):
        if isinstance(layer, schemes_lib.StructuredMatrix) and layer.built:
            found.append(layer)
        for sub in _keras.sublayers(layer):
            walk(sub)

    walk(model)
    with contextlib.ExitStack() as stack:
        for matrix in found:
            stack.enter_context(matrix.serving_constants())
        yield found


def _structured_layers(model):
    found = []

    def walk(layer):
        if isinstance(layer, layers_lib._StructuredRNN):
            found.append(layer)
        for sub in _keras.sublayers(layer):
            walk(sub)

    walk(model)
    return found


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
    found = _structured_layers(model)
    saved = [layer.kernel for layer in found]
    try:
        for layer in found:
            layer.kernel = kernel
        yield found
    finally:
        for layer, mode in zip(found, saved):
            layer.kernel = mode


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

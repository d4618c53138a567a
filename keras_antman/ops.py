"""The compiled CPU inference ops: lazy loader and thin wrappers.

The library ``_antman_ops.so`` is built by ``pip install --no-build-isolation
.`` (see ``setup.py``) against the installed TensorFlow and holds three ops:

- ``KerasAntman>StructuredLstm`` and ``KerasAntman>StructuredGru``: a whole
  sequence of LSTM or GRU inference (float32, CPU) whose input and recurrent
  products are AntMan schemes. The input product runs for all steps at once;
  each step then runs the structured recurrent product, the mixing and the
  gate math, fused per group of units (paper section 3.6).
- ``KerasAntman>BlockDiagMatMul``: ``x @ blockdiag(blocks)``, optionally
  shuffle-mixed.

Nothing happens when this module is imported: the library is loaded on the
first call that needs it, after checking that it was built for the
installed TensorFlow. Only sigmoid/tanh activations, no masks and no
gradients: callers (the layers' ``kernel="auto"``) use stock TF ops for
anything else, and for training.

Scheme arrays are passed in the order of each scheme's ``weight_shapes``
(row-vector convention ``y = x @ W``, ``x`` [..., n], ``y`` [..., m]):

=================  ===========================================================
scheme             arrays
=================  ===========================================================
``dense``          ``kernel`` [n, m]
``low_rank``       ``u`` [n, k], ``v`` [k, m]
``lgp_shuffle``    ``blocks`` [g, n/g, m/g], then the shuffle
``lgp_dense``      ``mix`` [min(n, m)]^2, ``blocks`` [g, n/g, m/g]; the mix
                   comes first when n < m, after otherwise
``low_rank_lgp``   ``in_blocks`` [g_in, n/g_in, k/g_in], ``mix`` [k, k],
                   ``out_blocks`` [g_out, k/g_out, m/g_out]
=================  ===========================================================

Threads: one OpenMP team per op call, one thread by default. Set the
process-wide count with `set_num_threads` (or ``KERAS_ANTMAN_NUM_THREADS``
in the environment of a serving process), or per call with ``num_threads``.
Problems too small to gain from threads run on one thread whatever is asked.
"""

import collections
import ctypes
import json
import os
import threading
import warnings

import tensorflow as tf

LIBRARY_NAME = "_antman_ops.so"

_SCHEMES = {
    "dense": ("kernel",),
    "low_rank": ("u", "v"),
    "lgp_shuffle": ("blocks",),
    "lgp_dense": ("mix", "blocks"),
    "low_rank_lgp": ("in_blocks", "mix", "out_blocks"),
}
_CLASS_NAMES = {
    "Dense": "dense",
    "LowRank": "low_rank",
    "LGPShuffle": "lgp_shuffle",
    "LGPDense": "lgp_dense",
    "LowRankLGP": "low_rank_lgp",
}

# Scheme classes the compiled op runs (the layers use stock TF for others).
SUPPORTED_SCHEMES = tuple(_CLASS_NAMES)

_HOW_TO_FIX = (
    "Build it against the TensorFlow you run (installed: {tf}) with a C++17 "
    "compiler, from the keras-antman source tree: `pip install "
    "--no-build-isolation -e .` (or `python setup.py build_ext --inplace`). "
    "Or use kernel='portable', which needs no compiled code."
)


HOW_TO_BUILD = (
    "To build it: `pip install --no-build-isolation -e .` in the "
    "keras-antman source tree (a C++17 compiler and the installed "
    "TensorFlow are needed)."
)


class CompiledOpsUnavailableError(RuntimeError):
    """The compiled op library is missing or does not fit this TensorFlow."""


_lock = threading.Lock()
_state = {"module": None, "cdll": None, "error": None, "warned": False}
_pending_threads = None


def library_path():
    """Path where the compiled library is expected (it may not exist)."""
    return os.path.join(
        os.path.dirname(os.path.abspath(__file__)), LIBRARY_NAME
    )


def _build_info_path():
    return os.path.splitext(library_path())[0] + ".json"


def _check_build():
    """Raises CompiledOpsUnavailableError unless the library fits this TF."""
    fix = _HOW_TO_FIX.format(tf=tf.__version__)
    path = library_path()
    if not os.path.exists(path):
        raise CompiledOpsUnavailableError(
            f"The keras-antman compiled op library was not found at {path}. "
            + fix
        )
    try:
        with open(_build_info_path()) as f:
            built_for = json.load(f)["tf_version"]
    except (OSError, ValueError, KeyError):
        raise CompiledOpsUnavailableError(
            f"{path} has no readable build record ({_build_info_path()}), "
            "so it cannot be checked against the installed TensorFlow "
            f"{tf.__version__}. " + fix
        ) from None
    if built_for != tf.__version__:
        # The C++ ABI of TF ops is only stable within one TF release.
        raise CompiledOpsUnavailableError(
            f"{path} was built for TensorFlow {built_for}, but TensorFlow "
            f"{tf.__version__} is installed; a custom op library only loads "
            "into the TensorFlow it was built against. " + fix
        )


def load():
    """Loads the compiled op library (once) and returns its op module.

    Returns:
        The module returned by ``tf.load_op_library``.

    Raises:
        CompiledOpsUnavailableError: the library is missing, was built for
            another TensorFlow version, or failed to load. The message says
            how to build it.
    """
    with _lock:
        if _state["module"] is not None:
            return _state["module"]
        if _state["error"] is not None:
            raise CompiledOpsUnavailableError(_state["error"])
        try:
            _check_build()
            try:
                module = tf.load_op_library(library_path())
                cdll = ctypes.CDLL(library_path())
            except (tf.errors.NotFoundError, OSError) as e:
                raise CompiledOpsUnavailableError(
                    f"Loading {library_path()} failed: {e}. "
                    + _HOW_TO_FIX.format(tf=tf.__version__)
                ) from None
        except CompiledOpsUnavailableError as e:
            _state["error"] = str(e)
            raise
        cdll.keras_antman_get_isa.restype = ctypes.c_char_p
        cdll.keras_antman_best_isa.restype = ctypes.c_char_p
        cdll.keras_antman_min_parallel_macs_per_step.restype = (
            ctypes.c_longlong)
        if _pending_threads is not None:
            cdll.keras_antman_set_num_threads(_pending_threads)
        _state["module"], _state["cdll"] = module, cdll
        return module


def is_available():
    """Whether the compiled ops can be used; loads them on first call.

    A library that exists but cannot be used (built for another TensorFlow,
    or failing to load) is reported once with a `RuntimeWarning`; a missing
    library is silent (stock TF ops are the normal fallback).

    Returns:
        True if `load` succeeds.
    """
    if portable_forced():
        return False
    try:
        load()
        return True
    except CompiledOpsUnavailableError as e:
        if os.path.exists(library_path()) and not _state["warned"]:
            _state["warned"] = True
            warnings.warn(
                f"keras-antman falls back to stock TF ops: {e}",
                RuntimeWarning,
                stacklevel=2,
            )
        return False


def set_num_threads(num_threads):
    """Sets the process-wide number of OpenMP threads of the compiled ops.

    Takes effect for every later call with ``num_threads=None`` (or 0),
    including ops inside already traced functions and SavedModels. Does not
    load the library.

    Args:
        num_threads: positive integer.

    Raises:
        ValueError: ``num_threads`` is not a positive integer.
    """
    global _pending_threads
    if isinstance(num_threads, bool) or not isinstance(num_threads, int):
        raise ValueError(
            f"`num_threads` must be a positive integer. Received: "
            f"num_threads={num_threads!r}"
        )
    if num_threads < 1:
        raise ValueError(
            f"`num_threads` must be >= 1. Received: num_threads={num_threads}"
        )
    with _lock:
        _pending_threads = num_threads
        if _state["cdll"] is not None:
            _state["cdll"].keras_antman_set_num_threads(num_threads)


def get_num_threads():
    """The process-wide number of threads of the compiled ops.

    Returns:
        The value last given to `set_num_threads`, else
        ``KERAS_ANTMAN_NUM_THREADS`` from the environment, else 1.
    """
    with _lock:
        if _state["cdll"] is not None:
            return int(_state["cdll"].keras_antman_get_num_threads())
        if _pending_threads is not None:
            return _pending_threads
    try:
        return max(1, int(os.environ.get("KERAS_ANTMAN_NUM_THREADS", "1")))
    except ValueError:
        return 1


def instruction_set():
    """The instruction set the compiled kernels run with.

    Returns:
        ``"avx512"``, ``"avx2"`` or ``"generic"``: the best this CPU has,
        unless lowered by ``KERAS_ANTMAN_ISA`` or `set_instruction_set`.

    Raises:
        CompiledOpsUnavailableError: see `load`.
    """
    load()
    return _state["cdll"].keras_antman_get_isa().decode()


def set_instruction_set(name=None):
    """Selects the kernels' instruction set (for tests and benchmarks).

    Args:
        name: ``"generic"``, ``"avx2"``, ``"avx512"``, or None for the best
            this CPU has.

    Raises:
        ValueError: unknown name, or one this CPU does not support.
        CompiledOpsUnavailableError: see `load`.
    """
    load()
    cdll = _state["cdll"]
    if name is None:
        name = cdll.keras_antman_best_isa().decode()
    rc = cdll.keras_antman_set_isa(str(name).encode())
    if rc == -1:
        raise ValueError(
            "`name` must be one of 'generic', 'avx2', 'avx512' or None. "
            f"Received: name={name!r}"
        )
    if rc == -2:
        raise ValueError(
            f"This CPU does not support instruction set {name!r}; the best "
            f"it has is {cdll.keras_antman_best_isa().decode()!r}."
        )


def threads_used(step_macs, num_threads=None):
    """The OpenMP threads a `structured_lstm` / `structured_gru` call uses.

    A sequence whose recurrent products cost fewer than 131072 (128K)
    multiply-adds per step, summed over the batch, runs on one thread
    whatever is asked: the per-step barrier would cost more than the
    threads save (measured on a 2-core EPYC).

    Args:
        step_macs: batch size x multiply-adds of the recurrent product(s)
            of one step (``report`` or ``Scheme.macs()`` gives the latter).
        num_threads: the call's ``num_threads``; None: `get_num_threads`.

    Raises:
        CompiledOpsUnavailableError: see `load`.
    """
    load()
    threshold = _state["cdll"].keras_antman_min_parallel_macs_per_step()
    if step_macs < threshold:
        return 1
    return num_threads or get_num_threads()


def _set_min_parallel_work(per_step=-1, block_diag=-1):
    """Work (multiply-adds) below which the ops use one thread.

    For tests (0 forces the parallel paths on tiny shapes) and for
    measuring the thresholds; -1 keeps a value.
    """
    load()
    _state["cdll"].keras_antman_set_min_parallel_work(
        ctypes.c_longlong(per_step), ctypes.c_longlong(block_diag)
    )


def _scheme(kind, weights, argname):
    """Canonical kind and the arrays in op order."""
    key = _CLASS_NAMES.get(kind, kind)
    if key not in _SCHEMES:
        raise ValueError(
            f"`{argname}` must be one of {sorted(_SCHEMES)} (or the class "
            f"names {sorted(_CLASS_NAMES)}). Received: {argname}={kind!r}"
        )
    if isinstance(weights, dict):
        names = _SCHEMES[key]
        missing = [n for n in names if n not in weights]
        if missing:
            raise ValueError(
                f"The weights of scheme {key!r} must have the keys "
                f"{list(names)}; missing {missing}."
            )
        weights = [weights[n] for n in names]
    return key, list(weights)


def structured_lstm(
    x,
    initial_h,
    initial_c,
    bias,
    input_scheme,
    input_weights,
    recurrent_scheme,
    recurrent_weights,
    go_backwards=False,
    return_sequences=False,
    num_threads=None,
):
    """Runs a whole LSTM sequence (inference) on the compiled op.

    ``z_t = x_t @ K_in + h_{t-1} @ K_rec + bias``, gates ``i, f, c, o`` as
    in ``keras.layers.LSTM`` (sigmoid / tanh), with ``K_in`` and ``K_rec``
    given as AntMan schemes.

    Args:
        x: float32 tensor [batch, timesteps, features].
        initial_h: float32 [batch, units].
        initial_c: float32 [batch, units].
        bias: float32 [4 * units].
        input_scheme: scheme kind of the input product (features ->
            4 * units): ``"dense"``, ``"low_rank"``, ``"lgp_shuffle"``,
            ``"lgp_dense"``, ``"low_rank_lgp"`` or the class name.
        input_weights: its arrays, a list in the order of the module
            docstring or a dict keyed by the scheme's weight names.
        recurrent_scheme: scheme kind of the recurrent product (units ->
            4 * units).
        recurrent_weights: its arrays.
        go_backwards: process the steps from last to first; the returned
            sequence is then in processing order (reversed), as in Keras.
        return_sequences: return every step's output, not only the last.
        num_threads: OpenMP threads for this call; None uses
            `get_num_threads`.

    Returns:
        ``(output, final_h, final_c)``: output is [batch, timesteps, units]
        with ``return_sequences``, else [batch, units].

    Raises:
        tf.errors.InvalidArgumentError: a shape, scheme array or attribute
            is wrong (the message names it and the expected shape).
        ValueError: unknown scheme kind.
        CompiledOpsUnavailableError: see `load`.
    """
    lib = load()
    in_kind, in_w = _scheme(input_scheme, input_weights, "input_scheme")
    rec_kind, rec_w = _scheme(
        recurrent_scheme, recurrent_weights, "recurrent_scheme"
    )
    return tuple(
        lib.keras_antman_structured_lstm(
            x=x,
            initial_h=initial_h,
            initial_c=initial_c,
            bias=bias,
            input_weights=in_w,
            recurrent_weights=rec_w,
            input_scheme=in_kind,
            recurrent_scheme=rec_kind,
            go_backwards=bool(go_backwards),
            return_sequences=bool(return_sequences),
            num_threads=0 if num_threads is None else num_threads,
        )
    )


def structured_gru(
    x,
    initial_h,
    bias,
    input_scheme,
    input_weights,
    recurrent_scheme,
    recurrent_weights,
    reset_after=True,
    go_backwards=False,
    return_sequences=False,
    num_threads=None,
):
    """Runs a whole GRU sequence (inference) on the compiled op.

    Gates ``z, r, h`` as in ``keras.layers.GRU`` (sigmoid / tanh).

    Args:
        x: float32 tensor [batch, timesteps, features].
        initial_h: float32 [batch, units].
        bias: float32 [2, 3 * units] with ``reset_after``, else
            [3 * units].
        input_scheme: scheme kind of the input product (features ->
            3 * units), as in `structured_lstm`.
        input_weights: its arrays (list or dict).
        recurrent_scheme: scheme kind of the recurrent product(s).
        recurrent_weights: with ``reset_after``, the arrays of the product
            units -> 3 * units. Without it, those of product A (units ->
            2 * units, gates z and r) followed by those of product B (units
            -> units, applied to ``r * h``); or a pair ``(A, B)`` of lists
            or dicts.
        reset_after: Keras' ``reset_after``.
        go_backwards: as in `structured_lstm`.
        return_sequences: as in `structured_lstm`.
        num_threads: as in `structured_lstm`.

    Returns:
        ``(output, final_h)``.

    Raises:
        tf.errors.InvalidArgumentError: a shape, scheme array or attribute
            is wrong.
        ValueError: unknown scheme kind.
        CompiledOpsUnavailableError: see `load`.
    """
    lib = load()
    in_kind, in_w = _scheme(input_scheme, input_weights, "input_scheme")
    if (
        not reset_after
        and isinstance(recurrent_weights, (list, tuple))
        and len(recurrent_weights) == 2
        and all(isinstance(w, (list, tuple, dict)) for w in recurrent_weights)
    ):
        rec_kind, a = _scheme(
            recurrent_scheme, recurrent_weights[0], "recurrent_scheme"
        )
        _, b = _scheme(
            recurrent_scheme, recurrent_weights[1], "recurrent_scheme"
        )
        rec_w = a + b
    else:
        rec_kind, rec_w = _scheme(
            recurrent_scheme, recurrent_weights, "recurrent_scheme"
        )
    return tuple(
        lib.keras_antman_structured_gru(
            x=x,
            initial_h=initial_h,
            bias=bias,
            input_weights=in_w,
            recurrent_weights=rec_w,
            input_scheme=in_kind,
            recurrent_scheme=rec_kind,
            reset_after=bool(reset_after),
            go_backwards=bool(go_backwards),
            return_sequences=bool(return_sequences),
            num_threads=0 if num_threads is None else num_threads,
        )
    )


def block_diag_matmul(x, blocks, shuffle=False, num_threads=None):
    """``x @ blockdiag(blocks)`` on the compiled op.

    Args:
        x: float32 tensor [..., g * a].
        blocks: float32 [g, a, b].
        shuffle: apply the shuffle mix: output ``j`` of group ``i`` goes to
            position ``j * g + i``.
        num_threads: as in `structured_lstm`.

    Returns:
        float32 tensor [..., g * b].

    Raises:
        tf.errors.InvalidArgumentError: shapes do not fit.
        CompiledOpsUnavailableError: see `load`.
    """
    lib = load()
    return lib.keras_antman_block_diag_mat_mul(
        x=x,
        blocks=blocks,
        shuffle=bool(shuffle),
        num_threads=0 if num_threads is None else num_threads,
    )


Stage = collections.namedtuple("Stage", ["blocks", "shuffle"])


def portable_forced():
    """Whether ``KERAS_ANTMAN_PORTABLE=1`` forces stock TF ops everywhere."""
    return os.environ.get("KERAS_ANTMAN_PORTABLE", "") not in ("", "0")

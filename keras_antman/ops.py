"""The compiled CPU inference ops: lazy loader and thin wrappers.

The library ``_antman_ops.so`` is built by ``pip install --no-build-isolation
.`` (see ``setup.py``) against the installed TensorFlow and holds three ops:

- ``KerasAntman>StructuredLstm`` and ``KerasAntman>StructuredGru``: a whole
  sequence of LSTM or GRU inference (float32, CPU) whose input and recurrent
  products are chains of block-diagonal stages. The input product runs for
  all steps at once; each step then runs the structured recurrent product,
  the mixing and the gate math, fused per group of units (paper section
  3.6).
- ``KerasAntman>BlockDiagMatMul``: ``x @ blockdiag(blocks)``, optionally
  shuffle-mixed.

Nothing happens when this module is imported: the library is loaded on the
first call that needs it, after checking that it was built for the
installed TensorFlow. Only sigmoid/tanh activations, no masks and no
gradients: callers (the layers' ``kernel="auto"``) use stock TF ops for
anything else, and for training.

The ops know stages, not schemes. Each product (row-vector convention
``y = x @ W``, ``x`` [..., n], ``y`` [..., m]) is a list of `Stage`, which a
scheme's lowering produces: ``W = blockdiag(S_0) @ ... @ blockdiag(S_k)``,
each ``S_i`` a float32 [g, a, b] array (a dense [n, m] matrix is
[1, n, m]), the last optionally followed by the shuffle mix. A chain holds 1
to 4 stages; stage i's output ``g * b`` is stage i + 1's input ``g * a``;
any stage may shuffle.

=====================  ======================================================
argument               product
=====================  ======================================================
``input_stages``       features -> 4 * units (LSTM) or 3 * units (GRU)
``recurrent_stages``   units -> 4 * units (LSTM); units -> 3 * units (GRU,
                       ``reset_after=True``); units -> 2 * units, gates z
                       and r (GRU, ``reset_after=False``). A shuffling last
                       stage needs g dividing units.
``candidate_stages``   GRU with ``reset_after=False`` only: units -> units,
                       applied to ``r * h``; a shuffling last stage needs g
                       dividing units.
=====================  ======================================================

For example, a dense kernel ``k`` is ``[Stage(k[None], False)]``, a
factorization ``u @ v`` is ``[Stage(u[None], False), Stage(v[None],
False)]``, and g blocks on the diagonal followed by the shuffle are
``[Stage(blocks, True)]``. A stage whose g blocks are all equal (a tiled
Kronecker factor) runs as one GEMM with the groups as rows instead of g
small ones; the op compares the blocks on every call.

A product may also add one sparse matrix: a `SparseTerm` in the list
(after the stages) makes it ``x @ W = chain(x) + x @ S``, with ``S``
[n, m] given as CSR of ``S^T`` (one CSR row per output column, so each
output is one sparse dot product over ``x`` and threads split the outputs
without sharing). `sparse_term` builds it from a dense matrix. In the input
product of all steps the op transposes a chunk of rows of ``x`` and runs
each non-zero as a vector multiply-add over the rows; for the recurrent
steps it re-packs ``S`` once per call (outputs sorted by their number of
non-zeros, 16 per slice, one per vector lane) and each step runs a slice
entry as one gather of ``h`` and one multiply-add, the slices split
between threads. The op checks every row pointer and column index on
every call (O(m + nnz)). A scheme with
unstructured non-zeros (``Doped``, later grow-and-prune) lowers to its
base's stages plus this term.

Threads: one OpenMP team per op call, one thread by default. Set the
process-wide count with `set_num_threads` (or ``KERAS_ANTMAN_NUM_THREADS``
in the environment of a serving process), or per call with ``num_threads``.
Problems too small to gain from threads run on one thread whatever is asked.

``KERAS_ANTMAN_PORTABLE=1`` (or ``true``, ``yes``, ``on``) in the
environment turns the compiled ops off for the whole process, like
tensorflow-addons' ``TF_ADDONS_PY_OPS``: `load` raises
`CompiledOpsUnavailableError` and `is_available` returns False without a
warning, so ``kernel="auto"`` layers run on stock TF ops. It is read on
every `load` call; `portable_forced` tells whether it is set.

Instruction set: the kernels are compiled for ``generic`` (SSE2), ``avx2``
(AVX2 + FMA) and ``avx512`` (F, VL, BW, DQ), and run the best this CPU has.
``KERAS_ANTMAN_ISA=generic|avx2|avx512`` in the environment, read when the
library loads, or `set_instruction_set` picks another one (for tests and
benchmarks); `isa` names the one in use, `supported_instruction_sets` the
ones this CPU can run.
"""

import collections
import collections.abc
import ctypes
import json
import numbers
import os
import threading
import warnings

import numpy as np
import tensorflow as tf

LIBRARY_NAME = "_antman_ops.so"

Stage = collections.namedtuple(
    "Stage", ["blocks", "shuffle"], defaults=(False,)
)
Stage.__doc__ = """\
One block-diagonal stage of a product, as the compiled ops take it.

A scheme's lowering returns a list of stages; the product is the chain
``x @ blockdiag(stages[0].blocks) @ blockdiag(stages[1].blocks) ...``.

Attributes:
    blocks: float32 [g, a, b] tensor or array: g blocks of a x b on the
        diagonal, mapping g * a inputs to g * b outputs. A dense [n, m]
        matrix is [1, n, m].
    shuffle: bool, default False. Apply the shuffle mix after this stage:
        output j of group i goes to position j * g + i. A recurrent
        product's last stage may shuffle only if g divides the units.
"""
Stage.blocks.__doc__ = "float32 [g, a, b]; a dense [n, m] matrix is [1, n, m]."
Stage.shuffle.__doc__ = "bool: shuffle-mix the output of this stage."

SparseTerm = collections.namedtuple(
    "SparseTerm", ["row_ptr", "col_idx", "values"])
SparseTerm.__doc__ = """\
A sparse matrix ``S`` [n, m] added to a product: ``y = chain(x) + x @ S``.

Given as CSR of ``S^T`` (rows are the outputs): output ``j`` is
``sum(values[k] * x[..., col_idx[k]] for k in range(row_ptr[j],
row_ptr[j + 1]))``. The op checks every entry: ``row_ptr`` starts at 0,
never decreases and ends at ``nnz``; every ``col_idx`` is in [0, n).
`sparse_term` builds one from a dense matrix. At most one per product,
after its stages.

Attributes:
    row_ptr: int32 [m + 1].
    col_idx: int32 [nnz], input indices, ascending within a row (not
        required).
    values: float32 [nnz].
"""
SparseTerm.row_ptr.__doc__ = "int32 [m + 1]: where each output's entries start."
SparseTerm.col_idx.__doc__ = "int32 [nnz]: the input index of each entry."
SparseTerm.values.__doc__ = "float32 [nnz]: the entries."


def sparse_term(matrix):
    """The `SparseTerm` of the non-zeros of a dense ``[n, m]`` matrix.

    Works on NumPy arrays (the result holds NumPy arrays, e.g. constants of
    an exported graph) and on tensors or variables (TF ops, so it runs
    inside a traced function with the matrix's current value).

    Args:
        matrix: float32 ``[n, m]``; its zeros are left out.

    Returns:
        `SparseTerm` (CSR of ``matrix.T``).
    """
    if isinstance(matrix, np.ndarray):
        t = np.asarray(matrix, "float32").T
        rows, cols = np.nonzero(t)  # row-major: sorted by output
        counts = np.bincount(rows, minlength=t.shape[0])
        row_ptr = np.concatenate([[0], np.cumsum(counts)]).astype("int32")
        return SparseTerm(row_ptr, cols.astype("int32"), t[rows, cols])
    t = tf.transpose(tf.convert_to_tensor(matrix, tf.float32))
    where = tf.where(tf.not_equal(t, 0.0))  # row-major: sorted by output
    rows = tf.cast(where[:, 0], tf.int32)
    counts = tf.math.bincount(rows, minlength=tf.shape(t)[0],
                              maxlength=tf.shape(t)[0], dtype=tf.int32)
    row_ptr = tf.concat([[0], tf.cumsum(counts)], 0)
    return SparseTerm(row_ptr, tf.cast(where[:, 1], tf.int32),
                      tf.gather_nd(t, where))


class _MaskPattern:
    """Where a 0/1 mask ``[n, m]`` is 1, in the CSR order of ``S^T``, as
    eager tensors (made once: converting the arrays each call would cost
    as much as finding them)."""

    def __init__(self, mask):
        rows, cols = np.nonzero(mask.T)  # sorted by output, then input
        counts = np.bincount(rows, minlength=mask.shape[1])
        self.row_ptr = tf.constant(
            np.concatenate([[0], np.cumsum(counts)]).astype("int32"))
        self.col_idx = tf.constant(cols.astype("int32"))
        # Positions in the row-major [n, m] matrix, ascending (a gather in
        # CSR order would jump m floats per entry: 3x slower at d = 800),
        # and where each CSR entry is among them.
        flat = cols.astype("int64") * mask.shape[1] + rows
        order = np.argsort(flat)
        self.flat = tf.constant(flat[order])
        self.csr_order = tf.constant(np.argsort(order).astype("int32"))
        self.nnz = int(rows.size)


def masked_sparse_term(values, mask, cache):
    """`sparse_term` of ``values * mask`` for a 0/1 ``mask`` that rarely
    changes (a `keras_antman.Doped` matrix between pruning steps).

    The mask's pattern (row pointers, column indices, positions) is kept in
    ``cache`` and reused while the mask still has it: each call checks that
    the mask has exactly that many non-zeros, all of them 1 at the cached
    positions (a pass over the mask, no transpose or Where), then gathers
    the values there; entries of ``values`` that are 0 at a kept position
    stay in the CSR as explicit zeros. Otherwise (the mask changed) the
    pattern is found again: at once when executing eagerly, through
    `sparse_term` in a traced function (`tf.cond`), which retraces to cache
    the new one. A mask with values other than 0 and 1 always takes
    `sparse_term`.

    Args:
        values: float32 ``[n, m]`` (a variable or tensor).
        mask: float32 ``[n, m]`` variable, 0/1.
        cache: a dict kept by the caller for this pair of variables.

    Returns:
        `SparseTerm` (CSR of ``(values * mask).T``).
    """
    mask_t = tf.convert_to_tensor(mask, tf.float32)
    pattern = cache.get("pattern")
    eager = tf.executing_eagerly()
    if pattern is None or (eager and not _has_pattern(mask_t, pattern)):
        with tf.init_scope():
            now = tf.convert_to_tensor(mask, tf.float32).numpy()
            if np.all((now == 0.0) | (now == 1.0)):
                pattern = cache["pattern"] = _MaskPattern(now)
            else:
                cache.pop("pattern", None)
                pattern = None
        if pattern is None:
            return sparse_term(tf.convert_to_tensor(values) * mask_t)

    def cached():
        flat = tf.reshape(tf.convert_to_tensor(values, tf.float32), [-1])
        return SparseTerm(pattern.row_ptr, pattern.col_idx, tf.gather(
            tf.gather(flat, pattern.flat), pattern.csr_order))

    if eager:
        return cached()
    return SparseTerm(*tf.cond(
        _has_pattern(mask_t, pattern), lambda: tuple(cached()),
        lambda: tuple(sparse_term(
            tf.convert_to_tensor(values) * mask_t))))


def _has_pattern(mask, pattern):
    """Whether ``mask`` is 1 exactly at ``pattern``'s positions (and 0
    elsewhere): as many non-zeros, all of them 1 there."""
    # (count_nonzero's int64 reduction takes twice as long)
    count = tf.reduce_sum(tf.cast(tf.not_equal(mask, 0.0), tf.int32))
    at = tf.gather(tf.reshape(mask, [-1]), pattern.flat)
    return tf.logical_and(tf.equal(count, pattern.nnz),
                          tf.reduce_all(tf.equal(at, 1.0)))


def lowered_stages(elements):
    """The `Stage` elements of a lowering (a list that may end with a
    `SparseTerm`), in order."""
    return [e for e in elements if not isinstance(e, SparseTerm)]

_PORTABLE_ENV = "KERAS_ANTMAN_PORTABLE"
_ISA_ENV = "KERAS_ANTMAN_ISA"
# os.environ's own store (encoded keys), where CPython has one: a plain
# dict lookup per op call instead of Mapping.__contains__, which raises
# and catches a KeyError for an unset variable (3-5 us of a call).
_ENV_STORE = getattr(os.environ, "_data", None)
_ENV_KEYS = (
    tuple(os.environ.encodekey(k) for k in (_PORTABLE_ENV, _ISA_ENV))
    if _ENV_STORE is not None and hasattr(os.environ, "encodekey")
    else None
)
INSTRUCTION_SETS = ("generic", "avx2", "avx512")
_TRUE_VALUES = ("1", "true", "yes", "on")

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
_state = {
    "module": None,
    "cdll": None,
    "error": None,
    "warned": False,
    "isa_env": None,  # the KERAS_ANTMAN_ISA value applied at load
}
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


def portable_forced():
    """Whether ``KERAS_ANTMAN_PORTABLE`` turns the compiled ops off.

    Read from the environment on every call; values ``1``, ``true``,
    ``yes`` and ``on`` (any case) turn them off. Does not load the library.

    Returns:
        True if `load` would refuse to load the library for this reason.
    """
    value = os.environ.get(_PORTABLE_ENV, "")
    return value.strip().lower() in _TRUE_VALUES


def load():
    """Loads the compiled op library (once) and returns its op module.

    Returns:
        The module returned by ``tf.load_op_library``.

    Raises:
        CompiledOpsUnavailableError: the library is missing, was built for
            another TensorFlow version, or failed to load (the message says
            how to build it), or ``KERAS_ANTMAN_PORTABLE=1`` is set.
    """
    if portable_forced():
        raise CompiledOpsUnavailableError(
            "The keras-antman compiled ops are disabled by "
            f"{_PORTABLE_ENV}={os.environ[_PORTABLE_ENV]} in the "
            "environment; stock TF ops run instead. Unset it (or set it to "
            "0) to use them."
        )
    with _lock:
        if _state["module"] is not None:
            _apply_isa_env()
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
        cdll.keras_antman_sparse_packs.restype = ctypes.c_longlong
        cdll.keras_antman_weight_packs.restype = ctypes.c_longlong
        cdll.keras_antman_layout_builds.restype = ctypes.c_longlong
        if _pending_threads is not None:
            cdll.keras_antman_set_num_threads(_pending_threads)
        _state["module"], _state["cdll"] = module, cdll
        _apply_isa_env()
        return module


def _op_module():
    """`load` for the op calls: the loaded module at once when neither
    ``KERAS_ANTMAN_PORTABLE`` nor ``KERAS_ANTMAN_ISA`` is set (what `load`
    would return then, without its environment reads and lock: a few
    microseconds of every call), else `load` itself."""
    module = _state["module"]
    if _ENV_KEYS is not None:
        env_set = _ENV_KEYS[0] in _ENV_STORE or _ENV_KEYS[1] in _ENV_STORE
    else:
        env_set = _PORTABLE_ENV in os.environ or _ISA_ENV in os.environ
    if module is None or env_set:
        return load()
    return module


def _apply_isa_env():
    """Applies ``KERAS_ANTMAN_ISA`` once per value (the lock is held).

    Raises:
        ValueError: the value is not an instruction set this CPU supports;
            raised by every `load` until the variable is fixed.
    """
    value = os.environ.get(_ISA_ENV, "").strip().lower()
    if not value or value == _state["isa_env"]:
        return
    source = f"{_ISA_ENV}={os.environ[_ISA_ENV]!r} in the environment"
    _select_isa(value, source)
    _state["isa_env"] = value


def _select_isa(name, source):
    cdll = _state["cdll"]
    rc = cdll.keras_antman_set_isa(str(name).encode())
    supported = _supported(cdll)
    if rc == -1:
        raise ValueError(
            f"{source} names no instruction set: use one of "
            f"{', '.join(map(repr, INSTRUCTION_SETS))} (this CPU supports "
            f"{', '.join(map(repr, supported))})."
        )
    if rc == -2:
        raise ValueError(
            f"{source}: this CPU does not support {name!r}; it supports "
            f"{', '.join(map(repr, supported))}."
        )


def _supported(cdll):
    best = cdll.keras_antman_best_isa().decode()
    return INSTRUCTION_SETS[: INSTRUCTION_SETS.index(best) + 1]


def is_available():
    """Whether the compiled ops can be used; loads them on first call.

    A library that exists but cannot be used (built for another TensorFlow,
    or failing to load) is reported once with a `RuntimeWarning`; a missing
    library is silent (stock TF ops are the normal fallback), and so is
    ``KERAS_ANTMAN_PORTABLE=1``.

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
    load the library. A call never runs more threads than the machine has
    cores (``os.cpu_count()``), whatever is set.

    Args:
        num_threads: positive integer, at most 65536.

    Raises:
        ValueError: ``num_threads`` is not an integer in [1, 65536].
    """
    global _pending_threads
    if isinstance(num_threads, bool) or not isinstance(
        num_threads, numbers.Integral
    ):
        raise ValueError(
            f"`num_threads` must be a positive integer. Received: "
            f"num_threads={num_threads!r}"
        )
    if not 1 <= num_threads <= _MAX_THREADS:
        raise ValueError(
            f"`num_threads` must be in [1, {_MAX_THREADS}] (calls use at "
            f"most the {os.cpu_count()} cores of this machine). Received: "
            f"num_threads={num_threads}"
        )
    num_threads = int(num_threads)
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
        unless ``KERAS_ANTMAN_ISA`` or `set_instruction_set` chose another.

    Raises:
        CompiledOpsUnavailableError: see `load`.
        ValueError: ``KERAS_ANTMAN_ISA`` names no supported instruction set.
    """
    load()
    return _state["cdll"].keras_antman_get_isa().decode()


isa = instruction_set


def supported_instruction_sets():
    """The instruction sets this CPU can run, from ``"generic"`` up.

    Raises:
        CompiledOpsUnavailableError: see `load`.
    """
    load()
    return _supported(_state["cdll"])


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
    if name is None:
        name = _state["cdll"].keras_antman_best_isa().decode()
    _select_isa(name, f"set_instruction_set({name!r})")


def threads_used(step_macs, num_threads=None):
    """The OpenMP threads a `structured_lstm` / `structured_gru` call uses.

    A sequence whose recurrent products cost fewer than 16384 (16K)
    multiply-adds per step, summed over the batch, runs on one thread
    whatever is asked: the per-step barrier would cost more than the
    threads save. Above that the op measures, separately for each
    ``step_macs`` and thread count asked: 4 calls on one thread, then 4 on
    the count asked, the first of each 4 not counted (it pays for caches
    and a team the other count left cold), and later calls keep the count
    asked only if its median step time over the other 3 is at least 5%
    below one thread's. The measurement runs again after 25 calls, then
    after twice as many each time it confirms the choice (at most 400),
    and at once when 3 calls in a row on more threads run a step 25%
    slower than one thread's median (a second thread loses when other
    work holds the cores). This returns the choice as it stands (the count
    asked until the first measurement has decided) without counting as a
    call.

    Args:
        step_macs: batch size x multiply-adds of the recurrent product(s)
            of one step (``report`` or ``Scheme.macs()`` gives the latter).
        num_threads: the call's ``num_threads``; None: `get_num_threads`.

    Raises:
        CompiledOpsUnavailableError: see `load`.
    """
    load()
    return int(_state["cdll"].keras_antman_rnn_threads(
        ctypes.c_longlong(int(step_macs)), int(num_threads or 0)))


def _replay_thread_choice(ns_one, ns_many, asked=2):
    """The thread counts a fresh measured class would run calls on.

    Call ``i`` takes ``ns_one[i]`` ns per step on one thread and
    ``ns_many[i]`` on ``asked`` threads; the choice (the op's own C++
    code, with injected timings instead of a clock) sees only the time of
    the count it ran. For tests.
    """
    load()
    if len(ns_one) != len(ns_many):
        raise ValueError(
            f"ns_one and ns_many must have the same length; received "
            f"{len(ns_one)} and {len(ns_many)}"
        )
    n = len(ns_one)
    one = (ctypes.c_longlong * n)(*map(int, ns_one))
    many = (ctypes.c_longlong * n)(*map(int, ns_many))
    out = (ctypes.c_int * n)()
    _state["cdll"].keras_antman_replay_thread_choice(
        int(asked), one, many, n, out)
    return list(out)


_MAX_THREADS = 1 << 16


def _set_min_parallel_work(per_step=-1, block_diag=-1):
    """Work (multiply-adds) below which the ops use one thread.

    For tests (0 forces the parallel paths on tiny shapes) and for
    measuring the thresholds; -1 keeps a value.
    """
    load()
    _state["cdll"].keras_antman_set_min_parallel_work(
        ctypes.c_longlong(per_step), ctypes.c_longlong(block_diag)
    )


def _sparse_packs():
    """How many times the op has packed a recurrent sparse term into its
    sliced form in this process (calls with unchanged CSR arrays reuse the
    last packing). For tests."""
    load()
    return int(_state["cdll"].keras_antman_sparse_packs())


_SPARSE_FORMS = {"auto": 0, "gathered": 1, "windowed": 2}


def _set_sparse_form(form="auto"):
    """The sliced form the AVX-512 kernels give a recurrent sparse term:
    ``"auto"`` (by estimated cost), ``"gathered"`` or ``"windowed"``. For
    tests (each form on any matrix); the other instruction sets gather
    unless ``"windowed"`` is forced (then they run it with a plain
    loop)."""
    if form not in _SPARSE_FORMS:
        raise ValueError(f"form must be one of {sorted(_SPARSE_FORMS)}; "
                         f"received {form!r}")
    load()
    _state["cdll"].keras_antman_set_sparse_form(_SPARSE_FORMS[form])


def _num_threads_attr(num_threads):
    """The op's ``num_threads`` attr: None -> 0 (the process-wide setting)."""
    if num_threads is None:
        return 0
    if type(num_threads) is int and 0 <= num_threads <= _MAX_THREADS:
        return num_threads
    if isinstance(num_threads, bool) or not isinstance(
        num_threads, numbers.Integral
    ):
        raise TypeError(
            "`num_threads` must be None or an integer >= 0 (0 or None: the "
            "process-wide setting, see `set_num_threads`). Received: "
            f"num_threads={num_threads!r} of type "
            f"{type(num_threads).__name__}"
        )
    if not 0 <= num_threads <= _MAX_THREADS:
        raise ValueError(
            f"`num_threads` must be None or an integer in [0, "
            f"{_MAX_THREADS}] (a call uses at most the machine's cores). "
            f"Received: num_threads={num_threads}"
        )
    return int(num_threads)


def _describe(value):
    """A short description of a value for error messages."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    return f"{value!r:.80} of type {type(value).__name__}"


def _stages(stages, argname):
    """Checks a chain given in Python; returns (blocks list, shuffle list,
    sparse inputs).

    The chain may end with one `SparseTerm`; the sparse inputs are then
    ``[[row_ptr], [col_idx], [values]]``, else three empty lists. Shapes
    and contents are left to the op, which checks them (the arrays may be
    symbolic tensors here).
    """
    # The common call, a list of Stage with bool flags and no sparse term,
    # without the checks' isinstance calls (the op path of every layer).
    if type(stages) is list and stages and all(
        type(s) is Stage and type(s[1]) is bool for s in stages
    ):
        return [s[0] for s in stages], [s[1] for s in stages], _NO_SPARSE
    expected = (
        f"`{argname}` must be a list of keras_antman.ops.Stage(blocks, "
        "shuffle) (or (blocks, shuffle) pairs), one per stage of the chain"
    )
    if isinstance(stages, Stage):
        raise TypeError(
            f"{expected}; received a single Stage. Wrap it in a list: "
            f"{argname}=[stage]."
        )
    if not isinstance(stages, collections.abc.Sequence) or isinstance(
        stages, (str, bytes)
    ):
        raise TypeError(f"{expected}. Received: {_describe(stages)}")
    if not stages:
        raise ValueError(f"{expected}; received an empty list.")
    sparse = [[], [], []]
    if isinstance(stages[-1], SparseTerm):
        sparse = [[stages[-1].row_ptr], [stages[-1].col_idx],
                  [stages[-1].values]]
        stages = stages[:-1]
    if not stages:
        raise ValueError(
            f"{expected}; received no stage (a SparseTerm alone is not a "
            f"product: give the stages first, e.g. a [1, n, m] zero matrix)."
        )
    blocks, shuffle = [], []
    for i, stage in enumerate(stages):
        if isinstance(stage, SparseTerm):
            raise TypeError(
                f"{expected}; {argname}[{i}] is a SparseTerm, which may only "
                f"come last (one per product)."
            )
        if isinstance(stage, (str, bytes)) or not (
            isinstance(stage, collections.abc.Sequence) and len(stage) == 2
        ):
            raise TypeError(
                f"{expected}; {argname}[{i}] is {_describe(stage)}"
            )
        array, flag = stage
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(
                f"The shuffle flag of `{argname}[{i}]` must be a bool. "
                f"Received: {_describe(flag)}"
            )
        blocks.append(array)
        shuffle.append(bool(flag))
    return blocks, shuffle, sparse


# The sparse inputs of a product without a sparse term (never modified).
_NO_SPARSE = ([], [], [])


def _sparse_args(product, sparse):
    """The op's three sparse-term inputs of ``product``."""
    return {f"{product}_sparse_{part}": arrays for part, arrays in
            zip(("row_ptr", "col_idx", "values"), sparse)}


def structured_lstm(
    x,
    initial_h,
    initial_c,
    bias,
    input_stages,
    recurrent_stages,
    go_backwards=False,
    return_sequences=False,
    num_threads=None,
):
    """Runs a whole LSTM sequence (inference) on the compiled op.

    ``z_t = x_t @ K_in + h_{t-1} @ K_rec + bias``, gates ``i, f, c, o`` as
    in ``keras.layers.LSTM`` (sigmoid / tanh), with ``K_in`` and ``K_rec``
    given as chains of `Stage` (see the module docstring).

    Args:
        x: float32 tensor [batch, timesteps, features].
        initial_h: float32 [batch, units].
        initial_c: float32 [batch, units].
        bias: float32 [4 * units].
        input_stages: list of `Stage` (or ``(blocks, shuffle)`` pairs), the
            input product (features -> 4 * units), optionally ending with
            a `SparseTerm` added to it.
        recurrent_stages: list of `Stage` (and an optional `SparseTerm`),
            the recurrent product (units -> 4 * units).
        go_backwards: process the steps from last to first; the returned
            sequence is then in processing order (reversed), as in Keras.
        return_sequences: return every step's output, not only the last.
        num_threads: OpenMP threads for this call, an int >= 0; None (or 0)
            uses `get_num_threads`.

    Returns:
        ``(output, final_h, final_c)``: output is [batch, timesteps, units]
        with ``return_sequences``, else [batch, units].

    Raises:
        tf.errors.InvalidArgumentError: a shape or a chain is wrong (the
            message names the argument, the stage and the expected shape).
        TypeError, ValueError: a chain is not a list of stages, or
            ``num_threads`` is not None or an int >= 0.
        CompiledOpsUnavailableError: see `load`.

    Example:

    >>> k_in = np.ones((3, 8), "float32")  # features 3, units 2
    >>> k_rec = np.ones((2, 8), "float32")
    >>> out, h, c = structured_lstm(
    ...     np.ones((1, 4, 3), "float32"), np.zeros((1, 2), "float32"),
    ...     np.zeros((1, 2), "float32"), np.zeros((8,), "float32"),
    ...     [Stage(k_in[None])], [Stage(k_rec[None])])
    """
    in_blocks, in_shuffle, in_sparse = _stages(input_stages, "input_stages")
    rec_blocks, rec_shuffle, rec_sparse = _stages(
        recurrent_stages, "recurrent_stages")
    num_threads = _num_threads_attr(num_threads)
    lib = _op_module()
    return tuple(
        lib.keras_antman_structured_lstm(
            **_sparse_args("input", in_sparse),
            **_sparse_args("recurrent", rec_sparse),
            x=x,
            initial_h=initial_h,
            initial_c=initial_c,
            bias=bias,
            input_stages=in_blocks,
            recurrent_stages=rec_blocks,
            input_shuffle=in_shuffle,
            recurrent_shuffle=rec_shuffle,
            go_backwards=bool(go_backwards),
            return_sequences=bool(return_sequences),
            num_threads=num_threads,
        )
    )


def structured_gru(
    x,
    initial_h,
    bias,
    input_stages,
    recurrent_stages,
    candidate_stages=None,
    reset_after=True,
    go_backwards=False,
    return_sequences=False,
    num_threads=None,
):
    """Runs a whole GRU sequence (inference) on the compiled op.

    Gates ``z, r, h`` as in ``keras.layers.GRU`` (sigmoid / tanh). With
    ``reset_after=True`` one recurrent product makes all three gates and
    the reset gate multiplies its h part (bias included). With
    ``reset_after=False`` the recurrent product is split: product A makes
    z and r from h, product B (the candidate) the h gate from ``r * h``.

    Args:
        x: float32 tensor [batch, timesteps, features].
        initial_h: float32 [batch, units].
        bias: float32 [2, 3 * units] (input and recurrent bias) with
            ``reset_after``, else [3 * units].
        input_stages: list of `Stage`, the input product (features ->
            3 * units).
        recurrent_stages: list of `Stage`: with ``reset_after``, units ->
            3 * units; without, product A, units -> 2 * units.
        candidate_stages: list of `Stage`, product B (units -> units):
            required without ``reset_after``, None or empty with it.
        reset_after: Keras' ``reset_after``.
        go_backwards: as in `structured_lstm`.
        return_sequences: as in `structured_lstm`.
        num_threads: as in `structured_lstm`.

    Returns:
        ``(output, final_h)``.

    Raises:
        tf.errors.InvalidArgumentError: a shape or a chain is wrong.
        TypeError, ValueError: a chain is not a list of stages, candidate
            stages do not fit ``reset_after``, or ``num_threads`` is not
            None or an int >= 0.
        CompiledOpsUnavailableError: see `load`.
    """
    in_blocks, in_shuffle, in_sparse = _stages(input_stages, "input_stages")
    rec_blocks, rec_shuffle, rec_sparse = _stages(
        recurrent_stages, "recurrent_stages")
    cand_sparse = [[], [], []]
    if reset_after:
        if candidate_stages is not None and (
            not isinstance(candidate_stages, collections.abc.Sequence)
            or len(candidate_stages) > 0
        ):
            raise ValueError(
                "`candidate_stages` must be None or empty with "
                "reset_after=True: recurrent_stages then make all three "
                "gates (units -> 3 * units). Received: "
                f"{_describe(candidate_stages)}"
            )
        cand_blocks, cand_shuffle = [], []
    else:
        if candidate_stages is None:
            raise ValueError(
                "`candidate_stages` is required with reset_after=False: "
                "recurrent_stages are then product A (units -> 2 * units, "
                "gates z and r) and candidate_stages product B (units -> "
                "units, applied to r * h)."
            )
        cand_blocks, cand_shuffle, cand_sparse = _stages(
            candidate_stages, "candidate_stages"
        )
    num_threads = _num_threads_attr(num_threads)
    lib = _op_module()
    return tuple(
        lib.keras_antman_structured_gru(
            **_sparse_args("input", in_sparse),
            **_sparse_args("recurrent", rec_sparse),
            **_sparse_args("candidate", cand_sparse),
            x=x,
            initial_h=initial_h,
            bias=bias,
            input_stages=in_blocks,
            recurrent_stages=rec_blocks,
            candidate_stages=cand_blocks,
            input_shuffle=in_shuffle,
            recurrent_shuffle=rec_shuffle,
            candidate_shuffle=cand_shuffle,
            reset_after=bool(reset_after),
            go_backwards=bool(go_backwards),
            return_sequences=bool(return_sequences),
            num_threads=num_threads,
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
        TypeError, ValueError: ``num_threads`` is not None or an int >= 0.
        CompiledOpsUnavailableError: see `load`.
    """
    num_threads = _num_threads_attr(num_threads)
    lib = _op_module()
    return lib.keras_antman_block_diag_mat_mul(
        x=x,
        blocks=blocks,
        shuffle=bool(shuffle),
        num_threads=num_threads,
    )

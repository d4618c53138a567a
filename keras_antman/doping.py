"""Doping: a structured matrix plus an extremely sparse one (MLSys 2021).

Thakker et al., *Doping: A technique for Extreme Compression of LSTM Models
using Sparse Structured Additive Matrices*: ``W = base + S`` where the base
is a structured matrix (Kronecker product, LMF = `LowRank`, `HMD`) and
``S`` has a tiny fraction of non-zeros, each free to leave the structure.
``S`` starts dense (the residual of the trained ``W``) and its sparsity is
annealed slowly (`DopingSchedule`, Zhu and Gupta's cubic ramp). The
structured part tends to lean on ``S`` while ``S`` is still dense
(co-matrix adaptation, CMA); co-matrix dropout regularisation (CMR) drops
entries of ``S``'s contribution in training so it cannot.

`Doped` is an ordinary `keras_antman.Scheme`: it plugs into
`StructuredLSTM` / `StructuredGRU`, `compress`, `report` and `export` like
any other, and the layers never learn which scheme they hold.
"""

import math

import numpy as np

from keras_antman import _keras
from keras_antman import ops as compiled_ops
from keras_antman import schemes as schemes_lib
from keras_antman._keras import keras
from keras_antman._keras import ops

_PACKAGE = "keras_antman"
_BASE = "base_"


def _fraction(name, value, upper_open=False):
    ok = (not isinstance(value, bool)
          and isinstance(value, (int, float, np.number))
          and 0.0 <= float(value) and (
              float(value) < 1.0 if upper_open else float(value) <= 1.0))
    if not ok:
        interval = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(
            f"Doped: `{name}` must be a number in {interval}. Received: "
            f"{name}={value!r}"
        )
    return float(value)


def nonzeros(sparsity, n, m):
    """Entries an ``[n, m]`` matrix keeps at ``sparsity``: ``n m`` minus
    ``round(sparsity n m)`` (to nearest, halves to even)."""
    return n * m - int(round(sparsity * n * m))


def magnitude_mask(scores, keep):
    """0/1 mask of the ``keep`` largest ``scores`` (exactly ``keep`` ones).

    Ties at the threshold are broken arbitrarily, so the count is exact.
    """
    scores = np.asarray(scores)
    flat = scores.reshape(-1)
    mask = np.zeros(flat.shape, "float32")
    if keep >= flat.size:
        mask[:] = 1.0
    elif keep > 0:
        mask[np.argpartition(-flat, keep - 1)[:keep]] = 1.0
    return mask.reshape(scores.shape)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Doped(schemes_lib.Scheme):
    """A structured matrix plus a sparse one: ``y = base(x) + x (S * mask)``.

    ``S`` is a dense ``[n, m]`` variable (``sparse``) and ``mask`` a
    non-trainable 0/1 variable of the same shape. The forward pass, the
    dense matrix, the report and the export all use ``S * mask``, so a
    pruned entry is exactly zero whatever the optimizer does (its gradient
    is zero too); `DopingSchedule` also zeroes the variable ``S`` there.
    The weights are the base's, prefixed ``base_`` (``base_a``,
    ``base_b`` for a `Kronecker` base), then ``sparse`` and ``mask``.

    ``sparsity`` is the fraction of zeros ``S`` has *now*: `from_dense`
    and a fresh build prune to it, and `DopingSchedule` raises it toward
    ``target_sparsity`` and records it here, so a saved model and its
    `report` carry the current value. ``S`` keeps exactly
    ``nnz = n m - round(sparsity n m)`` entries.

    Cost of one ``n -> m`` product:
    - MACs: ``base MACs + nnz``;
    - params: ``base params + nnz`` values ``+ nnz + m + 1`` indices: ``S``
      stored as CSR of the paper's ``S^T`` (one row per output: ``nnz``
      column indices and ``m + 1`` row pointers, int32), which is the form
      the export uses. `cost_parts` reports base, values and indices
      separately (`report` shows them as sub-rows).

    Training runs ``x (S * mask)`` as a dense masked matmul (and, with
    ``cmr_rate > 0``, drops entries of that product with inverted
    dropout: CMR); inference is deterministic. `export` writes ``S`` as
    constant sparse arrays (see `serving_arrays`). On the compiled op
    (`kernel_stages`) a doped matrix is its base's stages plus a
    `keras_antman.ops.SparseTerm`: the CSR of ``S^T`` above, an
    ``nnz``-multiply-add sparse product beside the structured one (the
    base must lower too: `Kronecker`, `LowRank`, `HMD`...). Outside
    `export` the mask's CSR pattern is cached and checked against the
    mask on every call (a pass over the dense ``[n, m]`` mask), the values
    gathered from ``S`` (`keras_antman.ops.masked_sparse_term`); the
    exported graph holds the CSR arrays as constants. `from_spec` has no
    name for this scheme: its argument is another scheme, which the spec
    grammar cannot nest.

    Args:
        base: the structured `Scheme` (not itself `Doped`); e.g.
            ``Kronecker()``, ``LowRank(rank=16)``, ``HMD(8)``.
        sparsity: the current fraction of zeros of ``S``, in [0, 1].
        target_sparsity: where `DopingSchedule` anneals to, in [0, 1]
            (the paper: 0.99 and above).
        cmr_rate: co-matrix dropout rate on ``x (S * mask)``, in [0, 1).
        seed: seed of the CMR dropout and of a fresh build's mask.

    Example:

    >>> doped = am.Doped(am.Kronecker(), target_sparsity=0.99, cmr_rate=0.5)
    >>> student = am.compress(teacher, input_scheme=doped,
    ...                       recurrent_scheme=doped)
    >>> student.fit(x, y, callbacks=[am.DopingSchedule(0, 2000)])
    """

    def __init__(self, base, sparsity=0.0, target_sparsity=0.99,
                 cmr_rate=0.0, seed=None):
        try:
            base = schemes_lib.get(base)
        except ValueError as e:
            raise ValueError(f"Doped: `base` must be a scheme. {e}") from None
        if isinstance(base, Doped):
            raise ValueError(
                f"Doped: `base` must be a structured scheme, not another "
                f"Doped one (received {base.describe()}); one sparse matrix "
                f"carries all the doping."
            )
        super().__init__(
            base=base,
            sparsity=_fraction("sparsity", sparsity),
            target_sparsity=_fraction("target_sparsity", target_sparsity),
            cmr_rate=_fraction("cmr_rate", cmr_rate, upper_open=True),
            seed=seed,
        )
        # The CSR pattern of each mask variable lowered to the compiled op,
        # by id (`kernel_stages`; not configuration).
        self._patterns = {}

    # -- configuration ---------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config["base"] = keras.saving.serialize_keras_object(self.base)
        return config

    def __hash__(self):
        return hash((type(self), self.describe()))

    def set_sparsity(self, sparsity):
        """Record the current sparsity of ``S`` (what `DopingSchedule`
        does after pruning); `cost` and `from_dense` follow it."""
        self.sparsity = _fraction("sparsity", sparsity)
        self._hyperparameters["sparsity"] = self.sparsity

    def nnz(self, n, m):
        """Non-zeros ``S`` keeps in an ``n -> m`` product."""
        return nonzeros(self.sparsity, n, m)

    def check(self, n, m):
        self.base.check(n, m)

    # -- cost ---------------------------------------------------------------

    def cost_parts(self, n, m):
        z = self.nnz(n, m)
        density = 100.0 * z / (n * m)
        return [
            ("base", self.base.describe(), *self.base.cost(n, m)),
            ("sparse", f"S values ({z:,} non-zeros, {density:.3g}%)", z, z),
            ("sparse_index", "S indices (CSR of S^T)", z + m + 1, 0),
        ]

    def cost(self, n, m):
        parts = self.cost_parts(n, m)
        return sum(p[2] for p in parts), sum(p[3] for p in parts)

    # -- weights and products ----------------------------------------------

    def weight_shapes(self, n, m):
        base = {_BASE + k: s for k, s in self.base.weight_shapes(n, m).items()}
        return {**base, "sparse": (n, m), "mask": (n, m)}

    def weight_options(self, n, m):
        keep = self.nnz(n, m)
        seed = self.seed

        def mask_init(shape, dtype=None):
            # A fresh build (no `from_dense`) has S = 0: any `keep`
            # positions give the declared cost; seeded, so reproducible.
            scores = np.random.default_rng(seed).random(shape)
            return ops.convert_to_tensor(magnitude_mask(scores, keep), dtype)

        base = {_BASE + k: v
                for k, v in self.base.weight_options(n, m).items()}
        return {
            **base,
            "sparse": {"initializer": "zeros"},
            "mask": {"initializer": mask_init, "trainable": False,
                     "regularizer": None, "constraint": None},
        }

    def _base_weights(self, w):
        return {k[len(_BASE):]: v for k, v in w.items() if k.startswith(_BASE)}

    def _sparse_product(self, x, w):
        return ops.matmul(x, w["sparse"] * w["mask"])

    def product(self, x, w):
        return (self.base.product(x, self._base_weights(w))
                + self._sparse_product(x, w))

    @property
    def random_in_training(self):
        return self.cmr_rate > 0.0

    def training_product(self, x, w, seed_generator):
        # CMR: inverted dropout on S's contribution only, so the base is
        # trained not to depend on any particular entry of S.
        sparse = keras.random.dropout(
            self._sparse_product(x, w), self.cmr_rate, seed=seed_generator)
        return self.base.training_product(
            x, self._base_weights(w), seed_generator) + sparse

    def serving_arrays(self, arrays):
        """``S * mask`` as CSR of ``S^T``, for the exported graph.

        Returns:
            ``{"values", "inputs", "outputs", "shape"}``: the non-zeros
            ordered by output (CSR row of ``S^T``) then input, their input
            indices (the CSR column indices), their output indices (the CSR
            row pointers expanded to one per entry, which is what
            ``UnsortedSegmentSum`` takes; TFLite has no CSR product),
            ``"row_ptr"`` (the CSR row pointers, int32 [m + 1], for the
            compiled op's `keras_antman.ops.SparseTerm`) and ``(n, m)``.
        """
        s = (arrays["sparse"] * arrays["mask"]).astype("float32")
        term = compiled_ops.sparse_term(s)
        outputs = np.repeat(np.arange(s.shape[1], dtype="int32"),
                            np.diff(term.row_ptr))
        return {
            "values": term.values,
            "inputs": term.col_idx,
            "outputs": outputs,
            "row_ptr": term.row_ptr,
            "shape": s.shape,
        }

    def serving_product(self, x, w, constants):
        # y[:, j] = sum_k values[k] x[:, inputs[k]] over outputs[k] == j:
        # Gather, Mul and UnsortedSegmentSum, all TFLite builtins.
        y = self.base.serving_product(x, self._base_weights(w), None)
        n, m = constants["shape"]
        if constants["values"].size == 0:
            return y
        lead = ops.shape(x)[:-1]
        xt = ops.transpose(ops.reshape(x, (-1, n)))
        picked = ops.take(xt, constants["inputs"], axis=0)
        picked = picked * ops.expand_dims(constants["values"], 1)
        ys = ops.segment_sum(picked, constants["outputs"], num_segments=m)
        return y + ops.reshape(ops.transpose(ys), (*lead, m))

    def kernel_stages(self, w):
        # The CSR pattern is cached per mask variable (verified on every
        # call, found again when pruning changes it): the values are a
        # gather, not a pass of Where over the dense [n, m] matrix.
        cache = self._patterns.setdefault(id(w["mask"]), {})
        return [*self.base.kernel_stages(self._base_weights(w)),
                compiled_ops.masked_sparse_term(w["sparse"], w["mask"],
                                                cache)]

    def serving_kernel_stages(self, w, constants):
        return [*self.base.kernel_stages(self._base_weights(w)),
                compiled_ops.SparseTerm(constants["row_ptr"],
                                        constants["inputs"],
                                        constants["values"])]

    def dense_from_arrays(self, arrays):
        base = self.base.dense_from_arrays(self._base_weights(arrays))
        return base + arrays["sparse"] * arrays["mask"]

    def arrays_from_dense(self, w):
        base = {k: np.asarray(v, "float32")
                for k, v in self.base.arrays_from_dense(w).items()}
        residual = (w.astype("float64")
                    - self.base.dense_from_arrays(base).astype("float64"))
        n, m = w.shape
        mask = magnitude_mask(np.abs(residual), self.nnz(n, m))
        return {
            **{_BASE + k: v for k, v in base.items()},
            "sparse": (residual * mask).astype("float32"),
            "mask": mask,
        }


def doped_matrices(model):
    """Every trainable `StructuredMatrix` of ``model`` holding a `Doped`
    scheme, found by walking the layers (cells, wrappers, nested models;
    a frozen teacher's are left out)."""
    found = []

    def walk(layer):
        if (isinstance(layer, schemes_lib.StructuredMatrix)
                and isinstance(layer.scheme, Doped) and layer.trainable):
            found.append(layer)
        for sub in _keras.sublayers(layer):
            walk(sub)

    walk(model)
    return found


def prune(matrix, sparsity):
    """Prune a doped matrix's ``S`` by magnitude to exactly ``sparsity``.

    Keeps the ``nnz`` largest ``|S|`` among the entries the mask still
    keeps (pruned entries never come back while enough are kept), sets
    the mask and zeroes ``S`` elsewhere.

    Args:
        matrix: a built `StructuredMatrix` with a `Doped` scheme.
        sparsity: the fraction of zeros, in [0, 1].

    Returns:
        The number of non-zeros kept.
    """
    sparsity = _fraction("sparsity", sparsity)
    s = ops.convert_to_numpy(matrix.sparse)
    mask = ops.convert_to_numpy(matrix.mask)
    keep = nonzeros(sparsity, *s.shape)
    new = magnitude_mask(np.where(mask > 0, np.abs(s), -1.0), keep)
    matrix.mask.assign(new)
    matrix.sparse.assign(s * new)
    return keep


def cubic_sparsity(step, start_step, end_step, initial_sparsity,
                   target_sparsity):
    """Zhu and Gupta's gradual pruning ramp (tfmot's ``PolynomialDecay``,
    ``power=3``).

    ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3`` with ``t0`` =
    ``start_step`` and ``n dt = end_step - start_step``; ``s_i`` before
    ``start_step``, ``s_f`` from ``end_step`` on.

    Returns:
        The sparsity at ``step`` (a float).
    """
    progress = min(1.0, max(0.0, (step - start_step)
                            / float(end_step - start_step)))
    return target_sparsity + (initial_sparsity - target_sparsity) * (
        1.0 - progress) ** 3


def _step_arg(name, value):
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
            or value < 0):
        raise ValueError(
            f"DopingSchedule: `{name}` must be a non-negative integer (an "
            f"optimizer step). Received: {name}={value!r}"
        )
    return int(value)


class DopingSchedule(keras.callbacks.Callback):
    """Anneals the sparsity of every doped matrix during `fit`.

    At training steps ``start_step``, ``start_step + frequency``, ... and
    at every step from ``end_step`` on (so the target is reached even when
    ``frequency`` does not divide the ramp), each trainable `Doped` matrix
    of the model (`doped_matrices`; a `Distiller`'s student, not its
    frozen teacher) is pruned by magnitude (`prune`) to the cubic ramp
    `cubic_sparsity` from its initial sparsity to the target, and the
    scheme records the new sparsity (`Doped.set_sparsity`). Steps are the
    optimizer's iterations, so a second `fit` continues the ramp. After
    every batch ``S`` is zeroed where the mask is 0 (momentum or weight
    decay would otherwise move the unused entries of the variable). The
    overall sparsity of the doped matrices is logged as
    ``doping_sparsity`` at the end of every epoch (in the history).

    Args:
        start_step: first pruning step.
        end_step: step at which the target is reached (``> start_step``).
        target_sparsity: final sparsity of every matrix; ``None``: each
            scheme's ``target_sparsity``.
        initial_sparsity: ``s_i`` of the ramp; ``None``: each matrix's
            sparsity when this callback first starts training (pass it
            explicitly to resume a ramp with a new callback).
        frequency: steps between pruning steps (``dt``; default 100).

    Raises:
        ValueError: for bad steps or sparsities, or (when training starts)
            a model without a trainable doped matrix.
    """

    def __init__(self, start_step, end_step, target_sparsity=None,
                 initial_sparsity=None, frequency=100):
        super().__init__()
        self.start_step = _step_arg("start_step", start_step)
        self.end_step = _step_arg("end_step", end_step)
        if self.end_step <= self.start_step:
            raise ValueError(
                f"DopingSchedule: `end_step` must be greater than "
                f"`start_step`. Received: start_step={start_step}, "
                f"end_step={end_step}"
            )
        if (isinstance(frequency, bool)
                or not isinstance(frequency, (int, np.integer))
                or frequency < 1):
            raise ValueError(
                f"DopingSchedule: `frequency` must be a positive integer. "
                f"Received: frequency={frequency!r}"
            )
        self.frequency = int(frequency)
        self.target_sparsity = (
            None if target_sparsity is None
            else _fraction("target_sparsity", target_sparsity))
        self.initial_sparsity = (
            None if initial_sparsity is None
            else _fraction("initial_sparsity", initial_sparsity))
        self._initial = {}
        self._last = {}
        self._matrices = []
        self._step = 0

    def sparsity_at(self, step, matrix):
        """The ramp's sparsity for ``matrix`` at ``step``."""
        scheme = matrix.scheme
        target = (scheme.target_sparsity if self.target_sparsity is None
                  else self.target_sparsity)
        return cubic_sparsity(step, self.start_step, self.end_step,
                              self._initial[id(matrix)], target)

    def is_pruning_step(self, step):
        return step >= self.start_step and (
            (step - self.start_step) % self.frequency == 0
            or step >= self.end_step)

    def on_train_begin(self, logs=None):
        self._matrices = doped_matrices(self.model)
        if not self._matrices:
            raise ValueError(
                f"DopingSchedule: model '{self.model.name}' has no trainable "
                f"matrix with a Doped scheme; compress it with e.g. "
                f"input_scheme=am.Doped(am.Kronecker())."
            )
        for matrix in self._matrices:
            self._initial.setdefault(
                id(matrix),
                matrix.scheme.sparsity if self.initial_sparsity is None
                else self.initial_sparsity)
        self._step = int(ops.convert_to_numpy(self.model.optimizer.iterations))

    def on_train_batch_begin(self, batch, logs=None):
        if not self.is_pruning_step(self._step):
            return
        for matrix in self._matrices:
            sparsity = self.sparsity_at(self._step, matrix)
            if self._last.get(id(matrix)) != sparsity:
                prune(matrix, sparsity)
                matrix.scheme.set_sparsity(sparsity)
                self._last[id(matrix)] = sparsity

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        for matrix in self._matrices:
            matrix.sparse.assign(matrix.sparse * matrix.mask)

    def current_sparsity(self):
        """Fraction of zeros of the masks of all doped matrices."""
        zeros = size = 0
        for matrix in self._matrices:
            mask = ops.convert_to_numpy(matrix.mask)
            zeros += int(mask.size - np.count_nonzero(mask))
            size += mask.size
        return zeros / size if size else math.nan

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["doping_sparsity"] = self.current_sparsity()

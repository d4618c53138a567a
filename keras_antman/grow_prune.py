"""Grow-and-prune training of LSTM kernels (Yin et al., after Dai et al.).

Hardware-guided symbiotic training (arXiv 1901.10997) picks the layer
dimensions from measured latency (`keras_antman.hardware`) and trains the
chosen network sparse with grow and prune: *gradient-based growth*
activates the dormant connections whose loss gradient is largest, and
*magnitude-based pruning* removes the smallest weights. Here:

* `KernelMasks` puts a 0/1 mask on every input and recurrent kernel of
  the model's LSTM / GRU layers (stock ones, and structured ones whose
  product has a `Dense` scheme). The mask is applied as the variable's
  constraint, which the Keras optimizer applies after every update, so
  masked weights stay exactly zero (with momentum or Adam too), in
  ``model.fit`` and in a `Distiller`'s fit alike.
* `Grow` (callback): every ``frequency`` batches, the ``fraction`` of each
  kernel's entries that are dormant and have the largest gradient
  magnitude become active. Grown weights start at zero (the value a masked
  weight already has), so the next optimizer step moves them along their
  gradient.
* `Prune` (callback): every ``frequency`` batches, each kernel is pruned
  to the sparsity of a cubic ramp (``power=3``, as tfmot's
  ``PolynomialDecay``) by removing its smallest-magnitude active weights.

Both log ``sparsity/<layer>`` (the zero fraction of the layer's masked
kernels) at every epoch end.

Design choices (simplest readings of the paper):

* Masks are per single weight, not per block of a structured scheme. The
  compiled op has no sparse kernel, so unstructured zeros do not make
  inference faster by themselves (`keras_antman.hardware.fastest_path`
  measures it rather than assuming it); the speed comes from the
  dimensions chosen on the latency curve, the sparsity from fewer
  weights to store. Block masks aligned with a scheme's blocks would be
  equivalent to choosing that scheme, which `compress` already does.
* Growth needs gradients of the loss at the dormant weights. A Keras
  callback never sees the training batch, so `Grow` computes them on a
  batch it is given (``data``: an ``(x, y)`` tuple, or a dataset / iterator
  it draws one batch from per growth event), with the fitted model's own
  ``compute_loss`` (so a `Distiller`'s total loss) and ``training=True``
  (dropout on; structured layers need the TF-ops path for gradients).
* Counts are per kernel: each kernel grows or keeps exactly its share,
  so a small recurrent kernel is not starved by a large input kernel.
"""

import numpy as np
import tensorflow as tf

from keras_antman import _keras
from keras_antman import schemes as schemes_lib
from keras_antman._keras import keras
from keras_antman._keras import ops
from keras_antman.layers import StructuredGRUCell
from keras_antman.layers import StructuredLSTMCell

_STOCK_CELLS = (keras.layers.LSTMCell, keras.layers.GRUCell)
_STRUCTURED_CELLS = (StructuredLSTMCell, StructuredGRUCell)


def find_kernels(model, layers=None):
    """The maskable kernels of a model: ``[(layer name, kind, variable)]``.

    ``kind`` is ``"input"`` or ``"recurrent"`` (``"candidate"`` for a
    structured GRU with ``reset_after=False``). Layers are found by walking
    Keras's tracked sub-layers (models, wrappers such as
    ``Bidirectional``, ``RNN`` of stacked cells, cells); the layer name is
    that of the nearest enclosing recurrent layer. Structured products
    whose scheme is not `Dense` are skipped (their weights are already
    structured).

    Args:
        model: a model or layer.
        layers: names of the recurrent layers to take; ``None``: all.

    Raises:
        ValueError: names in ``layers`` that match no recurrent layer.
    """
    found, seen, owners = [], set(), set()

    def add(owner, kind, var):
        if id(var) not in seen:
            seen.add(id(var))
            found.append((owner, kind, var))

    def walk(layer, owner):
        if isinstance(layer, keras.layers.RNN):
            owner = layer.name
            owners.add(owner)
        if isinstance(layer, _STOCK_CELLS) and layer.built:
            add(owner, "input", layer.kernel)
            add(owner, "recurrent", layer.recurrent_kernel)
            return
        if isinstance(layer, _STRUCTURED_CELLS) and layer.built:
            for kind, matrix in layer.products().items():
                if isinstance(matrix.scheme, schemes_lib.Dense):
                    add(owner, kind, matrix.kernel)
            return
        for sub in _keras.sublayers(layer):
            walk(sub, owner)

    walk(model, getattr(model, "name", None))
    if layers is not None:
        unknown = sorted(set(layers) - owners)
        if unknown:
            raise ValueError(
                f"`layers` names {unknown}, which are not recurrent layers of "
                f"'{model.name}'. Its recurrent layers are {sorted(owners)}.")
        found = [f for f in found if f[0] in layers]
    return found


class KernelMasks:
    """0/1 masks on the input and recurrent kernels of a model's LSTMs.

    Each masked variable gets a constraint (its own, if any, then the
    mask) that the optimizer applies after every update, so masked weights
    stay exactly zero through ``fit``. Attach before the first ``fit``
    (it resets ``model.train_function``; a `Distiller` wrapping the model
    must be compiled after it); `detach` restores the constraints.

    Args:
        model: the model whose kernels are masked (the student, for a
            `Distiller`).
        layers: names of the recurrent layers to mask; ``None``: all.
        initial_density: fraction of each kernel's entries active at the
            start (1: dense; below 1: a random sparse seed, exactly
            ``round(density * size)`` active entries per kernel, the rest
            zeroed now).
        seed: of the random seed mask.

    Raises:
        ValueError: the model has no maskable kernel, or a bad density.

    Example:

    >>> masks = am.grow_prune.KernelMasks(model, initial_density=0.5)
    >>> model.compile("adam", "sparse_categorical_crossentropy")
    >>> model.fit(ds, epochs=4, callbacks=[
    ...     am.grow_prune.Grow(masks, (x0, y0), fraction=0.1,
    ...                        end_step=200, frequency=50),
    ...     am.grow_prune.Prune(masks, 0.8, begin_step=300, end_step=900)])
    """

    def __init__(self, model, layers=None, initial_density=1.0, seed=0):
        if not 0.0 <= float(initial_density) <= 1.0:
            raise ValueError(
                "`initial_density` must be in [0, 1]. Received: "
                f"initial_density={initial_density!r}")
        self.model = model
        self.kernels = find_kernels(model, layers)
        if not self.kernels:
            raise ValueError(
                f"Model '{model.name}' has no kernel to mask: no built "
                "LSTM/GRU layer (stock, or structured with Dense schemes).")
        rng = np.random.default_rng(seed)
        self.masks = []
        self._saved = []
        for i, (owner, kind, var) in enumerate(self.kernels):
            size = int(np.prod(var.shape))
            m = np.zeros(size, "float32")
            m[rng.permutation(size)[:round(initial_density * size)]] = 1.0
            mask = keras.Variable(m.reshape(var.shape), trainable=False,
                                  dtype="float32", name=f"gp_mask_{i}")
            self.masks.append(mask)
            self._saved.append((var, var.constraint))
            _keras.set_variable_constraint(var, _Mask(mask, var.constraint))
        self.apply()
        model.train_function = None

    @property
    def names(self):
        """``"<layer>/<kind>"`` of each masked kernel, in order."""
        return [f"{o}/{k}" for o, k, _ in self.kernels]

    def apply(self):
        """Multiply every kernel by its mask now."""
        for (_, _, var), mask in zip(self.kernels, self.masks):
            var.assign(var * ops.cast(mask, var.dtype))

    def mask_arrays(self):
        """The masks as numpy arrays, in `names` order."""
        return [ops.convert_to_numpy(m) for m in self.masks]

    def set_masks(self, arrays):
        """Assign new masks (0/1 arrays in `names` order) and apply them."""
        for mask, a in zip(self.masks, arrays):
            mask.assign(np.asarray(a, "float32"))
        self.apply()

    def sparsity(self):
        """``{"<layer>/<kind>": zero fraction of the mask}``."""
        return {n: float(1.0 - a.mean())
                for n, a in zip(self.names, self.mask_arrays())}

    def layer_sparsity(self):
        """``{layer: zero fraction over the layer's masked kernels}``."""
        zeros, sizes = {}, {}
        for (owner, _, _), a in zip(self.kernels, self.mask_arrays()):
            zeros[owner] = zeros.get(owner, 0) + int((a == 0).sum())
            sizes[owner] = sizes.get(owner, 0) + a.size
        return {o: zeros[o] / sizes[o] for o in zeros}

    def logs(self):
        """``{"sparsity/<layer>": zero fraction}`` for Keras logs."""
        return {f"sparsity/{k}": v for k, v in self.layer_sparsity().items()}

    def grow(self, gradients, fraction):
        """Activate, in each kernel, the dormant entries with the largest
        ``|gradient|``: ``round(fraction * size)`` of them (all dormant ones
        if fewer). Grown weights are zero until the next update.

        Args:
            gradients: arrays in `names` order (None: skip that kernel).
            fraction: of each kernel's size.

        Returns:
            The number of entries grown per kernel.
        """
        new, counts = [], []
        for a, g in zip(self.mask_arrays(), gradients):
            if g is None:
                new.append(a)
                counts.append(0)
                continue
            flat = a.reshape(-1).copy()
            dormant = np.flatnonzero(flat == 0)
            k = min(round(fraction * flat.size), dormant.size)
            if k > 0:
                mag = np.abs(np.asarray(g).reshape(-1)[dormant])
                flat[dormant[np.argsort(-mag, kind="stable")[:k]]] = 1.0
            new.append(flat.reshape(a.shape))
            counts.append(k)
        self.set_masks(new)
        return counts

    def prune_to(self, sparsity):
        """Prune each kernel to ``sparsity`` (zero fraction of its mask) by
        removing its smallest-magnitude active weights: afterwards exactly
        ``round(sparsity * size)`` entries are masked, or more if more
        already were (pruning never regrows).

        Returns:
            The number of entries pruned per kernel.
        """
        new, counts = [], []
        for (_, _, var), a in zip(self.kernels, self.mask_arrays()):
            flat = a.reshape(-1).copy()
            target = round(float(sparsity) * flat.size)
            k = max(target - int((flat == 0).sum()), 0)
            if k > 0:
                active = np.flatnonzero(flat)
                w = np.abs(ops.convert_to_numpy(var).reshape(-1)[active])
                flat[active[np.argsort(w, kind="stable")[:k]]] = 0.0
            new.append(flat.reshape(a.shape))
            counts.append(k)
        self.set_masks(new)
        return counts

    def detach(self):
        """Remove the masks from the variables' constraints (the weights
        keep their zeros)."""
        for var, old in self._saved:
            _keras.set_variable_constraint(var, old)
        self._saved = []
        self.model.train_function = None


class _Mask:
    """A variable's constraint: its own (if any), then the mask."""

    def __init__(self, mask, previous):
        self.mask = mask
        self.previous = previous

    def __call__(self, w):
        if self.previous is not None:
            w = self.previous(w)
        return w * ops.cast(self.mask, w.dtype)


def polynomial_sparsity(step, initial_sparsity, final_sparsity, begin_step,
                        end_step, power=3):
    """tfmot's ``PolynomialDecay`` schedule (default cubic), without tfmot:
    ``s_f + (s_i - s_f) (1 - p)^power`` with ``p`` the progress from
    ``begin_step`` to ``end_step``, clipped to [0, 1]."""
    span = max(end_step - begin_step, 1)
    p = min(max((step - begin_step) / span, 0.0), 1.0)
    return final_sparsity + (initial_sparsity - final_sparsity) * (
        1.0 - p) ** power


class _Scheduled(keras.callbacks.Callback):
    """Counts training batches over every ``fit`` it is given to and fires
    ``event`` at ``begin_step, begin_step + frequency, ...`` up to
    ``end_step`` (batch ends, after the optimizer step)."""

    def __init__(self, masks, begin_step, end_step, frequency):
        super().__init__()
        if int(frequency) < 1:
            raise ValueError(
                f"`frequency` must be >= 1. Received: frequency={frequency}")
        if end_step is not None and end_step < begin_step:
            raise ValueError(
                f"`end_step` ({end_step}) must be >= `begin_step` "
                f"({begin_step}).")
        self.masks = masks
        self.begin_step = int(begin_step)
        self.end_step = None if end_step is None else int(end_step)
        self.frequency = int(frequency)
        self.step = 0

    def on_train_batch_end(self, batch, logs=None):
        s = self.step
        self.step += 1
        if s < self.begin_step or (
                self.end_step is not None and s > self.end_step):
            return
        if (s - self.begin_step) % self.frequency == 0 or s == self.end_step:
            self.event(s)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self.masks.logs())


class Grow(_Scheduled):
    """Gradient-based growth of dormant connections during ``fit``.

    At each event each kernel activates ``round(fraction * size)`` of its
    dormant (masked) entries, those with the largest ``|dL/dw|``
    (`KernelMasks.grow`). The loss is the fitted model's ``compute_loss``
    (a `Distiller`'s total loss too) on one batch of ``data`` with
    ``training=True``.

    Args:
        masks: the `KernelMasks`.
        data: ``(x, y)`` (or ``(x, y, sample_weight)``), or a dataset /
            iterable of such batches: one batch is drawn per event, cycling.
        fraction: of each kernel's size grown per event.
        begin_step, end_step, frequency: events at batches ``begin_step +
            k * frequency`` (and ``end_step``); batches count from the
            first ``fit`` the callback is given to.

    Attributes:
        grown: per event, the counts grown per kernel.
    """

    def __init__(self, masks, data, fraction=0.1, begin_step=0,
                 end_step=None, frequency=100):
        super().__init__(masks, begin_step, end_step, frequency)
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(
                f"`fraction` must be in [0, 1]. Received: fraction={fraction}")
        self.data = data
        self.fraction = float(fraction)
        self._iter = None
        self.grown = []

    def _batch(self):
        if isinstance(self.data, tuple):
            return self.data
        if self._iter is None:
            self._iter = iter(self.data)
        try:
            return next(self._iter)
        except StopIteration:
            self._iter = iter(self.data)
            return next(self._iter)

    def gradients(self, model=None):
        """``|dL/dw|``-ready gradients (numpy, in `KernelMasks.names` order)
        of the loss on the next batch of ``data``."""
        model = model or self.model
        batch = self._batch()
        x, y = batch[0], batch[1] if len(batch) > 1 else None
        sw = batch[2] if len(batch) > 2 else None
        variables = [v for _, _, v in self.masks.kernels]
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = _keras.compute_loss(model, x, y, y_pred, sw)
        grads = tape.gradient(loss, variables)
        return [None if g is None else ops.convert_to_numpy(g)
                for g in grads]

    def event(self, step):
        self.grown.append(self.masks.grow(self.gradients(), self.fraction))


class Prune(_Scheduled):
    """Magnitude-based pruning to a target sparsity on a cubic ramp.

    At each event every kernel is pruned to ``polynomial_sparsity(step,
    initial_sparsity, target_sparsity, begin_step, end_step, power)`` by
    removing its smallest-magnitude active weights (`KernelMasks.prune_to`);
    from ``end_step`` on the kernels hold ``target_sparsity``.

    Args:
        masks: the `KernelMasks`.
        target_sparsity: final zero fraction of every kernel, in [0, 1).
        begin_step, end_step, frequency: the ramp and its events.
        initial_sparsity: the ramp's start.
        power: of the ramp (3, as tfmot's usual ``PolynomialDecay``).

    Attributes:
        pruned: per event, the counts pruned per kernel.
    """

    def __init__(self, masks, target_sparsity, begin_step=0, end_step=1000,
                 frequency=100, initial_sparsity=0.0, power=3):
        super().__init__(masks, begin_step, end_step, frequency)
        for name, v in (("target_sparsity", target_sparsity),
                        ("initial_sparsity", initial_sparsity)):
            if not 0.0 <= float(v) < 1.0:
                raise ValueError(
                    f"`{name}` must be in [0, 1). Received: {name}={v}")
        self.target_sparsity = float(target_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.power = power
        self.pruned = []

    def sparsity_at(self, step):
        """The ramp's sparsity at batch ``step``."""
        return polynomial_sparsity(step, self.initial_sparsity,
                                   self.target_sparsity, self.begin_step,
                                   self.end_step, self.power)

    def event(self, step):
        self.pruned.append(self.masks.prune_to(self.sparsity_at(step)))

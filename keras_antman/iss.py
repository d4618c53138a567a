"""ISS: learn intrinsic sparse structures in LSTMs, then remove them.

Wen et al., *Learning Intrinsic Sparse Structures within Long Short-Term
Memory* (ICLR 2018). Component ``k`` of a recurrent layer is every weight
that reads or writes its hidden unit ``k`` (its gate columns in the input
and recurrent kernels, its recurrent row, its rows in the layers that
consume the layer's output; see `keras_antman._iss_trace`). Removing one
shrinks every basic structure of the LSTM (input updates, gates, cell and
hidden states, outputs) by one, so the result is a smaller, regular LSTM.

The workflow:

1. `GroupLasso(model, strength)` adds ``strength * sum_k ||component_k||_2``
   to ``model.losses`` (so to ``fit``'s loss, and to a `Distiller`'s,
   which adds its student's ``losses``) and keeps removed components at
   zero after every optimizer step.
2. `ISSPruning` (threshold on the component norms) or `ISSSchedule` (ramp
   to a target reduction of the recurrent multiply-adds) zero components
   during ``fit`` and log the live units per layer (``logs["iss/<layer>"]``).
3. `shrink(model)` returns a smaller model of stock Keras layers.

`prune_to(model, x, reduction=10, ...)` runs the three steps.

How ``strength`` (lambda) scales: the reference implementation (Wen et
al.'s TensorFlow code, built on Zaremba et al.'s PTB model) minimises
``sum_t mean_b CE(b, t) + lambda_ref * R``: the cross-entropy is summed over
the ``T`` timesteps of a BPTT window and averaged over the batch. Keras
averages over both (``loss_keras = sum_t mean_b CE / T``), and

    sum_t mean_b CE + lambda_ref R = T * (loss_keras + (lambda_ref / T) R),

so a reference ``lambda_ref`` is ``strength = lambda_ref / T`` here, with
the same minimiser. With SGD the updates match when the learning rate is
also ``T * lr_ref``; with Adam (invariant to the loss scale) dividing lambda
by ``T`` is all it takes. In a `Distiller` the penalty is added to the
weighted total ``C_target * CE + C_mse * MSE + C_kl * KL``, so it is
relative to ``C_target`` there (``lambda_ref * C_target / T``).
"""

import math

import numpy as np

from keras_antman import _iss_trace
from keras_antman import _keras
from keras_antman._keras import keras
from keras_antman._keras import ops
from keras_antman.layers import StructuredGRUCell
from keras_antman.layers import StructuredLSTMCell
from keras_antman.report import report


class GroupLasso:
    """Group Lasso over the ISS components of a model's recurrent layers.

    Attaches to ``model`` without changing its layers or its config: the
    penalty becomes the regularizer of one of the traced variables (its own
    regularizer, if any, is kept and added), so Keras puts it in
    ``model.losses``, which ``Model.compute_loss`` and `Distiller` add to
    the loss inside the gradient tape. A regularizer is the only public hook
    that Keras 3 evaluates in the tape on every step: ``add_loss`` takes a
    tensor computed in ``call`` and no longer accepts a callable, and a
    per-variable regularizer cannot compute a norm over weights that live
    in several variables (the next layer's rows). Likewise each traced
    variable gets a masking constraint (composed with its own), which the
    optimizer applies after every update, so removed components stay
    exactly zero (also with momentum or Adam, and with
    ``steps_per_execution > 1``). `detach` restores both.

    The penalty is ``strength * sum_k sqrt(s_k)`` with ``s_k`` the sum of
    squares of component ``k``'s weights, each weight counted once (a
    recurrent kernel's entry ``(k, g h + k)`` is in both unit ``k``'s row
    and its columns). Biases are not penalised. The norms are a few fused
    reductions per variable (square, sum over rows / columns, reshape to
    ``[blocks, h]``), no Python loop over components; the gradient at a
    zero component is 0.

    Create it before ``compile`` (compiling builds the train function that
    reads the losses and constraints); it resets ``model.train_function``
    so that a compiled ``model`` picks it up, but a wrapper (a `Distiller`)
    must be compiled after it.

    Args:
        model: a built Sequential or Functional model with LSTM / GRU /
            ``Bidirectional`` layers (stock, or structured with `Dense`
            schemes).
        strength: lambda (see the module docstring for its scale);
            settable later through ``group_lasso.strength.assign(x)``.
        layers: names of the recurrent layers to prune; ``None`` for all.

    Raises:
        ValueError: if an arrangement cannot be traced (the message names
            the layer), a structured layer has non-Dense schemes, or the
            model has no recurrent layer to prune.

    Example:

    >>> gl = am.iss.GroupLasso(model, strength=1e-4)
    >>> model.compile("adam", "sparse_categorical_crossentropy")
    >>> model.fit(ds, callbacks=[am.iss.ISSPruning(gl, threshold=1e-3)])
    >>> small = am.iss.shrink(model)
    """

    def __init__(self, model, strength=1e-4, layers=None):
        self.model = model
        self.trace = _iss_trace.trace(model, layers)
        if not self.trace.spaces:
            raise ValueError(
                f"Model '{model.name}' has no recurrent layer that ISS can "
                "prune (LSTM, GRU, Bidirectional, or StructuredLSTM / "
                "StructuredGRU with Dense schemes)."
            )
        self.strength = keras.Variable(
            float(strength), trainable=False, dtype="float32",
            name="iss_strength",
        )
        self.masks = {
            id(s): keras.Variable(
                np.ones(s.units, "float32"), trainable=False,
                name=f"iss_mask_{i}",
            )
            for i, s in enumerate(self.trace.spaces)
        }
        self._spaces = {id(s): s for s in self.trace.spaces}
        self._saved = []
        anchor = next(
            (v for v in self.trace.variables.values() if v.trainable), None
        )
        if anchor is None:
            raise ValueError(
                "GroupLasso: every traced weight is frozen (trainable=False); "
                "there is nothing to regularise."
            )
        previous = _keras.variable_regularizer(anchor)
        self._saved.append((anchor, "regularizer", previous))
        _keras.set_variable_regularizer(model, anchor,
                                        _Penalty(self, previous))
        for vid, var in self.trace.variables.items():
            self._saved.append((var, "constraint", var.constraint))
            _keras.set_variable_constraint(
                var, _Mask(self, vid, var.constraint))
        model.train_function = None

    # -- norms -----------------------------------------------------------

    def squared_norms(self):
        """``{id(space): [units] tensor}``: each component's sum of squares."""
        tr = self.trace
        squares = {vid: ops.square(v) for vid, v in tr.variables.items()}
        acc = {sid: [] for sid in self._spaces}
        for vid, parts in tr.rows.items():
            rowsum = ops.sum(squares[vid], axis=1)
            for off, space in parts:
                acc[id(space)].append(rowsum[off:off + space.units])
        for vid, parts in tr.cols.items():
            colsum = ops.sum(squares[vid], axis=0)
            for space, blocks in parts:
                acc[id(space)].append(
                    ops.sum(ops.reshape(colsum, (blocks, space.units)), 0)
                )
        for r in tr.rnns:
            if r.space is None:
                continue
            h = r.space.units
            for var, blocks in r.recurrent:
                # Entry (k, g h + k) is both in row k and in column k.
                sq3 = ops.reshape(squares[id(var)], (h, blocks, h))
                diag = ops.diagonal(sq3, axis1=0, axis2=2)
                acc[id(r.space)].append(-ops.sum(diag, axis=0))
        return {sid: ops.maximum(_add(parts), 0.0)
                for sid, parts in acc.items()}

    def penalty(self):
        """``strength * sum_k ||component_k||_2`` (a scalar tensor)."""
        total = 0.0
        for s in self.squared_norms().values():
            positive = s > 0.0
            safe = ops.where(positive, s, 1.0)
            total = total + ops.sum(ops.where(positive, ops.sqrt(safe), 0.0))
        return ops.cast(self.strength, "float32") * total

    def component_norms(self):
        """``{layer key: numpy [units]}``: the L2 norm of every component.

        Keys are layer names (``"<bidirectional>/forward"`` for a
        direction); tied layers (states feeding ``initial_state``) share
        one array.
        """
        sq = {k: ops.convert_to_numpy(v)
              for k, v in self.squared_norms().items()}
        return {r.key: np.sqrt(sq[id(r.space)]) for r in self._pruned()}

    def live_units(self):
        """``{layer key: number of components not zeroed}``."""
        masks = {k: ops.convert_to_numpy(m) for k, m in self.masks.items()}
        return {r.key: int(masks[id(r.space)].sum()) for r in self._pruned()}

    def _pruned(self):
        return [r for r in self.trace.rnns if r.space is not None]

    # -- masks -----------------------------------------------------------

    def zero(self, dead):
        """Zero components for good: ``dead`` maps ``id(space)`` to indices.

        The masks keep them at zero in later steps.
        """
        changed = False
        for sid, idx in dead.items():
            idx = np.asarray(idx, dtype=int)
            if idx.size == 0:
                continue
            m = ops.convert_to_numpy(self.masks[sid]).copy()
            m[idx] = 0.0
            self.masks[sid].assign(m)
            changed = True
        if changed:
            self.apply_masks()

    def apply_masks(self):
        """Multiply every traced variable by its masks now."""
        for vid, var in self.trace.variables.items():
            var.assign(self._masked(vid, var))

    def _masked(self, vid, w):
        n, m = w.shape
        parts = sorted(self.trace.rows.get(vid, []), key=lambda p: p[0])
        if parts:
            pieces, pos = [], 0
            for off, space in parts:
                if off > pos:
                    pieces.append(ops.ones((off - pos,), "float32"))
                pieces.append(ops.convert_to_tensor(self.masks[id(space)]))
                pos = off + space.units
            if pos < n:
                pieces.append(ops.ones((n - pos,), "float32"))
            w = w * ops.cast(ops.expand_dims(
                ops.concatenate(pieces, 0), 1), w.dtype)
        for space, blocks in self.trace.cols.get(vid, []):
            cm = ops.tile(ops.convert_to_tensor(self.masks[id(space)]),
                          (blocks,))
            w = w * ops.cast(ops.expand_dims(cm, 0), w.dtype)
        return w

    def zero_below(self, threshold):
        """Zero every live component whose L2 norm is below ``threshold``."""
        sq = {k: ops.convert_to_numpy(v)
              for k, v in self.squared_norms().items()}
        dead = {}
        for sid, s in sq.items():
            live = ops.convert_to_numpy(self.masks[sid]) > 0
            dead[sid] = np.flatnonzero(live & (np.sqrt(s) < threshold))
        self.zero(dead)

    # -- cost --------------------------------------------------------------

    def macs(self, counts=None):
        """Recurrent-layer multiply-adds per step, as `report` counts them.

        Args:
            counts: ``{id(space): live units}``; default the current masks.
        """
        if counts is None:
            counts = {k: int(ops.convert_to_numpy(m).sum())
                      for k, m in self.masks.items()}
        if not hasattr(self, "_macs_const"):
            full = {id(s): s.units for s in self.trace.spaces}
            self._macs_const = (
                report(self.model).recurrent_total.macs_before
                - self._traced_macs(full)
            )
        return self._macs_const + self._traced_macs(counts)

    def _traced_macs(self, counts):
        counts = dict(counts)
        for f, b in _bidirectional_pairs(self.trace):
            counts[id(f)] = counts[id(b)] = max(counts[id(f)], counts[id(b)])
        total = 0
        for r in self.trace.rnns:
            n = sum(w if s is None else counts[id(s)] for s, w in r.inputs)
            h = r.units if r.space is None else counts[id(r.space)]
            total += r.gates * h * n
            if r.space is not None:
                total += r.gates * h * h
        return total

    def prune_to_macs(self, target):
        """Zero the weakest live components until ``macs() <= target``.

        Components are ranked by their RMS (norm over the square root of
        their size), so that layers of different widths compare fairly;
        every layer keeps at least one unit.

        Returns:
            The multiply-adds reached.
        """
        counts = {k: int(ops.convert_to_numpy(m).sum())
                  for k, m in self.masks.items()}
        if self.macs(counts) <= target:
            return self.macs(counts)
        sq = {k: ops.convert_to_numpy(v)
              for k, v in self.squared_norms().items()}
        sizes = self._component_sizes()
        cands = []
        for sid, s in sq.items():
            live = ops.convert_to_numpy(self.masks[sid]) > 0
            for k in np.flatnonzero(live):
                cands.append((math.sqrt(s[k] / sizes[sid]), sid, int(k)))
        cands.sort()
        dead = {sid: [] for sid in sq}
        for _, sid, k in cands:
            if self.macs(counts) <= target:
                break
            if counts[sid] <= 1:
                continue
            counts[sid] -= 1
            dead[sid].append(k)
        self.zero(dead)
        return self.macs(counts)

    def _component_sizes(self):
        sizes = {sid: 0 for sid in self._spaces}
        for vid, parts in self.trace.rows.items():
            m = self.trace.variables[vid].shape[1]
            for _, space in parts:
                sizes[id(space)] += m
        for vid, parts in self.trace.cols.items():
            n = self.trace.variables[vid].shape[0]
            for space, blocks in parts:
                sizes[id(space)] += n * blocks
        return {k: max(v, 1) for k, v in sizes.items()}

    def detach(self):
        """Remove the penalty and the masks from the model's variables."""
        for var, attr, old in reversed(self._saved):
            if attr == "regularizer":
                _keras.set_variable_regularizer(self.model, var, old)
            else:
                _keras.set_variable_constraint(var, old)
        self._saved = []
        self.model.train_function = None

    def logs(self):
        """``{"iss/<layer>": live units}`` for Keras logs."""
        return {f"iss/{k}": v for k, v in self.live_units().items()}


def _bidirectional_pairs(tr):
    """``[(forward space, backward space)]`` of pruned Bidirectionals."""
    by_owner = {}
    for r in tr.rnns:
        if r.space is not None and r.owner is not r.layer:
            by_owner.setdefault(id(r.owner), []).append(r.space)
    return [tuple(v) for v in by_owner.values() if len(v) == 2]


def _add(parts):
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


class _Penalty:
    """The regularizer attached to the anchor variable."""

    def __init__(self, group_lasso, previous):
        self.group_lasso = group_lasso
        self.previous = previous

    def __call__(self, x):
        value = self.group_lasso.penalty()
        if self.previous is not None:
            value = value + self.previous(x)
        return value


class _Mask:
    """A variable's constraint: its own (if any), then the ISS masks."""

    def __init__(self, group_lasso, vid, previous):
        self.group_lasso = group_lasso
        self.vid = vid
        self.previous = previous

    def __call__(self, w):
        if self.previous is not None:
            w = self.previous(w)
        return self.group_lasso._masked(self.vid, w)


class ISSPruning(keras.callbacks.Callback):
    """Zero components whose norm falls below a threshold; log live units.

    After every ``every`` training batches (and at each epoch end) every
    live component with L2 norm below ``threshold`` is zeroed for good.
    At each epoch end ``logs["iss/<layer>"]`` gets the live units of each
    pruned layer, so they appear in the ``History``.

    Args:
        group_lasso: the `GroupLasso` attached to the trained model.
        threshold: L2-norm threshold on a whole component.
        every: check every this many batches. The norms are computed
            eagerly (tens of ms for a 2 x LSTM(650) LM with a 10k head), so
            check every few batches on large models.
    """

    def __init__(self, group_lasso, threshold=1e-4, every=10):
        super().__init__()
        self.group_lasso = group_lasso
        self.threshold = float(threshold)
        self.every = int(every)
        self._batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self._batches += 1
        if self._batches % self.every == 0:
            self.group_lasso.zero_below(self.threshold)

    def on_epoch_end(self, epoch, logs=None):
        self.group_lasso.zero_below(self.threshold)
        if logs is not None:
            logs.update(self.group_lasso.logs())


class ISSSchedule(keras.callbacks.Callback):
    """Reach a target reduction of the recurrent multiply-adds during fit.

    What drives it, per training batch ``s`` (counted from the start of the
    first ``fit`` it is given to):

    * warm-up, ``s < warmup_steps``: lambda ramps linearly from 0 to
      ``strength``, so the group Lasso starts shrinking components without
      a jolt to the loss;
    * ramp, ``warmup_steps <= s < warmup_steps + ramp_steps``: lambda stays
      at ``strength``, and every ``every`` batches the MAC budget moves
      linearly from the model's MACs ``M0`` to ``M0 / target_reduction``;
      the live components with the smallest RMS norm are zeroed (for good)
      until the recurrent MACs (`GroupLasso.macs`, the same count as
      ``report(...).recurrent_total``) are within the budget;
    * fine-tuning, after that: lambda is ``finetune_strength`` (0: plain
      training of the remaining units, as in Wen et al.).

    The budget counts every recurrent layer's input and recurrent products
    (``gates * h * (n + h)``), so removing units of one layer also shrinks
    the input product of the layer it feeds. At each epoch end
    ``logs["iss/<layer>"]`` gets the live units and ``logs["iss/macs"]``
    the recurrent MACs.

    Args:
        group_lasso: the `GroupLasso` attached to the trained model.
        target_reduction: ``M0 / M_final``, e.g. 10.
        warmup_steps, ramp_steps: lengths of the two phases, in batches.
        strength: lambda after warm-up (default: the group Lasso's value).
        finetune_strength: lambda after the ramp.
        every: re-rank and prune every this many batches of the ramp.
    """

    def __init__(self, group_lasso, target_reduction, warmup_steps,
                 ramp_steps, strength=None, finetune_strength=0.0, every=1):
        super().__init__()
        if not target_reduction >= 1.0:
            raise ValueError(
                "ISSSchedule: `target_reduction` must be >= 1. Received: "
                f"target_reduction={target_reduction!r}"
            )
        self.group_lasso = group_lasso
        self.target_reduction = float(target_reduction)
        self.warmup_steps = int(warmup_steps)
        self.ramp_steps = max(int(ramp_steps), 1)
        self.strength = float(
            ops.convert_to_numpy(group_lasso.strength)
            if strength is None else strength
        )
        self.finetune_strength = float(finetune_strength)
        self.every = max(int(every), 1)
        self.start_macs = group_lasso.macs()
        self.target_macs = self.start_macs / self.target_reduction
        self.step = 0

    def on_train_batch_begin(self, batch, logs=None):
        s = self.step
        if s < self.warmup_steps:
            lam = self.strength * (s + 1) / self.warmup_steps
        elif s < self.warmup_steps + self.ramp_steps:
            lam = self.strength
        else:
            lam = self.finetune_strength
        self.group_lasso.strength.assign(lam)

    def on_train_batch_end(self, batch, logs=None):
        s = self.step - self.warmup_steps
        self.step += 1
        if s < 0 or s >= self.ramp_steps:
            return
        if (s + 1) % self.every and s + 1 != self.ramp_steps:
            return
        frac = (s + 1) / self.ramp_steps
        budget = self.start_macs - frac * (self.start_macs - self.target_macs)
        self.group_lasso.prune_to_macs(budget)

    @property
    def reached(self):
        """Whether the recurrent MACs are at the target."""
        return self.group_lasso.macs() <= self.target_macs

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self.group_lasso.logs())
            logs["iss/macs"] = self.group_lasso.macs()


def prune_to(model, x=None, y=None, *, reduction=10.0, strength=1e-3,
             epochs=1, steps_per_epoch=None, batch_size=None, trainer=None,
             warmup=0.25, ramp=0.5, every=1, layers=None, callbacks=None,
             **fit_kwargs):
    """Train ``model`` with ISS until its LSTMs are ``reduction`` x cheaper.

    Attaches a `GroupLasso`, runs ``trainer.fit`` with an `ISSSchedule`
    (``warmup`` of the steps lambda warm-up, ``ramp`` of them pruning down
    to the target, the rest fine-tuning with lambda = 0), makes sure the
    target is met (prunes the weakest components if training ended early),
    detaches, and returns `shrink` of the trained model.

    Args:
        model: the model to prune (it is trained in place, then left with
            zeroed components and no penalty attached).
        x, y: training data, as for ``fit``.
        reduction: target ``report(...).recurrent_total.mac_reduction``.
        strength: lambda after warm-up.
        epochs, steps_per_epoch, batch_size: as for ``fit``; the schedule
            needs the number of steps, which comes from ``steps_per_epoch``
            or from the data (arrays: ``ceil(len / batch_size)``; a
            ``tf.data`` dataset of known cardinality).
        trainer: the compiled model whose ``fit`` trains ``model``: default
            ``model`` itself; a `Distiller` whose student is ``model`` for
            ISS with a teacher. Compile it before calling ``prune_to``;
            ``prune_to`` resets its train function so that it picks up the
            penalty.
        warmup, ramp: fractions of the total steps.
        every: prune every this many batches during the ramp.
        layers: names of the recurrent layers to prune (default all).
        callbacks: more callbacks for ``fit``.
        **fit_kwargs: passed to ``fit``.

    Returns:
        ``(shrunk_model, history)``.
    """
    trainer = model if trainer is None else trainer
    steps = _steps(x, steps_per_epoch, batch_size) * int(epochs)
    gl = GroupLasso(model, strength=0.0, layers=layers)
    trainer.train_function = None
    try:
        schedule = ISSSchedule(
            gl, reduction, warmup_steps=int(warmup * steps),
            ramp_steps=max(int(ramp * steps), 1), strength=strength,
            every=every,
        )
        history = trainer.fit(
            x, y, epochs=epochs, steps_per_epoch=steps_per_epoch,
            batch_size=batch_size,
            callbacks=[schedule] + list(callbacks or []), **fit_kwargs,
        )
        gl.prune_to_macs(schedule.target_macs)
    finally:
        gl.detach()
        trainer.train_function = None
    return shrink(model, layers=layers), history


def _steps(x, steps_per_epoch, batch_size):
    if steps_per_epoch is not None:
        return int(steps_per_epoch)
    if isinstance(x, (np.ndarray, list, tuple, dict)) or hasattr(x, "shape"):
        first = x
        while isinstance(first, (list, tuple, dict)):
            first = (list(first.values()) if isinstance(first, dict)
                     else first)[0]
        return math.ceil(len(first) / (batch_size or 32))
    cardinality = getattr(x, "cardinality", None)
    if cardinality is not None:
        n = int(cardinality())
        if n > 0:
            return n
    try:
        return len(x)
    except TypeError:
        raise ValueError(
            "prune_to: cannot tell how many steps an epoch has; pass "
            "`steps_per_epoch`."
        ) from None


# -- shrink ----------------------------------------------------------------


def shrink(model, layers=None):
    """Remove every unit with all-zero outgoing weights; smaller stock model.

    A unit whose outgoing weights are all zero (its row in the recurrent
    kernel(s) and in every consumer's kernel) cannot affect the output,
    whatever its bias and incoming weights, so it is removed with its whole
    component (which covers every all-zero ISS component). A layer keeps
    at least one unit. Recurrent layers become stock ``keras.layers.LSTM`` /
    ``GRU`` (a `StructuredLSTM` / `StructuredGRU` with Dense schemes too)
    with fewer units and the same other config; consumer layers (next
    recurrent layer, Dense heads) are sliced to match; every other layer is
    copied. The input model is not changed. Nothing to remove gives an
    equivalent model.

    Args:
        model: a built Sequential or Functional model (as `GroupLasso`).
        layers: names of the recurrent layers to shrink; ``None`` for all.

    Returns:
        A new model of stock Keras layers (it loads without
        ``keras_antman`` when the input model's other layers are stock).

    Raises:
        ValueError: as `GroupLasso`.
    """
    tr = _iss_trace.trace(model, layers)
    arrays = {vid: ops.convert_to_numpy(v)
              for vid, v in tr.variables.items()}
    removed = {}
    for space in tr.spaces:
        out = np.zeros(space.units)
        for vid, parts in tr.rows.items():
            for off, sp in parts:
                if sp is space:
                    w = arrays[vid][off:off + space.units]
                    out += np.square(w.astype("float64")).sum(axis=1)
        dead = np.flatnonzero(out == 0.0)
        if dead.size == space.units:
            dead = dead[1:]
        removed[id(space)] = dead
    # Keras's Bidirectional assumes equal widths in both directions: keep
    # as many units in each (the extra ones have no effect).
    for f, b in _bidirectional_pairs(tr):
        keep = max(f.units - len(removed[id(f)]), b.units - len(removed[id(b)]))
        for sp in (f, b):
            removed[id(sp)] = removed[id(sp)][: sp.units - keep]

    def row_keep(vid, n):
        keep = np.ones(n, bool)
        for off, sp in tr.rows.get(vid, []):
            keep[off + removed[id(sp)]] = False
        return keep

    def col_keep(space, blocks):
        keep = np.ones(blocks * space.units, bool)
        for g in range(blocks):
            keep[g * space.units + removed[id(space)]] = False
        return keep

    def sliced(var):
        vid = id(var)
        w = arrays[vid] if vid in arrays else ops.convert_to_numpy(var)
        if vid in tr.variables:
            w = w[row_keep(vid, w.shape[0])]
            for sp, blocks in tr.cols.get(vid, []):
                w = w[:, col_keep(sp, blocks)]
        return w

    by_owner = {}
    for r in tr.rnns:
        by_owner.setdefault(id(r.owner), []).append(r)

    def rnn_arrays(r):
        kernel = sliced(r.kernel)
        rec = np.concatenate([sliced(v) for v, _ in r.recurrent], axis=1)
        out = [kernel, rec]
        if r.bias is not None:
            b = ops.convert_to_numpy(r.bias)
            if r.space is not None:
                b = b[..., col_keep(r.space, r.gates)]
            out.append(b)
        return out

    def units(r):
        if r.space is None:
            return r.units
        return r.units - len(removed[id(r.space)])

    pairs = []

    def clone_function(layer):
        rs = by_owner.get(id(layer))
        if rs is None:
            new = layer.__class__.from_config(
                _unbuilt(layer.get_config()))
        elif isinstance(layer, keras.layers.Bidirectional):
            new = keras.layers.Bidirectional(
                _stock_rnn(rs[0], units(rs[0])),
                backward_layer=_stock_rnn(rs[1], units(rs[1])),
                merge_mode=layer.merge_mode,
                name=layer.name,
            )
        else:
            new = _stock_rnn(rs[0], units(rs[0]))
        pairs.append((layer, new))
        return new

    new_model = keras.models.clone_model(model, clone_function=clone_function)
    if not new_model.built:
        new_model.build(model.inputs[0].shape if model.inputs else None)
    for old, new in pairs:
        rs = by_owner.get(id(old))
        if rs is not None:
            new.set_weights([a for r in rs for a in rnn_arrays(r)])
        elif old.weights:
            new.set_weights([sliced(v) for v in old.weights])
    return new_model


def _unbuilt(config):
    """A config without the build shapes of nested layers (a wrapper such
    as ``TimeDistributed`` would otherwise rebuild its layer for the old
    input width)."""
    if isinstance(config, dict):
        return {k: _unbuilt(v) for k, v in config.items()
                if k != "build_config"}
    if isinstance(config, list):
        return [_unbuilt(v) for v in config]
    return config


def _stock_rnn(r, units):
    """A stock LSTM / GRU with ``r.layer``'s config and ``units`` units."""
    layer = r.layer
    config = layer.get_config()
    if isinstance(layer.cell, (StructuredLSTMCell, StructuredGRUCell)):
        for key in ("input_scheme", "recurrent_scheme", "kernel"):
            config.pop(key, None)
        cls = keras.layers.LSTM if r.gates == 4 else keras.layers.GRU
    else:
        cls = type(layer)
    config["units"] = int(units)
    return cls.from_config(config)

"""Data-aware initialisation: fit each product to the rows it really sees.

`compress` with ``calibration_data`` uses this module. `Scheme.from_dense`
approximates a trained ``W`` in the Frobenius norm, which treats every
input direction alike; a layer's real inputs are far from isotropic, so a
fit of ``X W`` on the rows ``X`` that the product multiplies in the trained
model (Nagel et al.'s AdaRound objective, the activation-aware SVD of
ASVD/SVD-LLM) is much closer at the same cost.

How the rows are recorded. The *original* model is cloned with its own
layers (`keras.models.clone_model` with a ``clone_function`` that returns
each layer itself), except that every recurrent layer being compressed is
wrapped in a `_Probe`. The clone is called eagerly on the calibration
batches; each probe receives its layer's call exactly as the layer does
(sequences, mask, initial state, from the previous layers of the original)
and

- re-runs each cell of the layer with Keras's own time loop
  (`_keras.rnn`, ``return_all_outputs=True``) from the same initial state
  (the given ``initial_state``, else a stateful layer's current states,
  else zeros) in processing order (reversed for ``go_backwards``), which
  yields the full output sequence even for a layer that does not return
  sequences; the cells of a ``StackedRNNCells`` run one after the other,
  each on the previous cell's outputs;
- forms the rows of each product: the step inputs ``x_t`` (input
  product), the state ``h_{t-1}`` before each step (recurrent product:
  the initial state, then the output of the last unmasked step), and for
  a GRU with ``reset_after=False`` ``r_t * h_{t-1}`` (candidate product;
  ``r_t`` recomputed in NumPy from the dense weights);
- drops the rows of masked timesteps and adds ``X^T X`` of the rest to
  the product's running sum (float64), then returns the wrapped layer's
  own output, so every later layer sees what it sees in the original.

The time loops (the re-run cells and the wrapped layer itself) run as
``tf.function``s, as `predict` would run them; only the rows and their
sums are NumPy.

Only ``X^T X`` [n, n] and a row count are kept per product, whatever the
number of batches: ``X^T Y = X^T X W`` and ``||Y||^2 = tr(W^T X^T X W)``
follow from it (``Y = X W``), and a batch's rows are dropped once added.
Stateful layers get their states back after the run, so the original
model is left as it was.
"""

import collections.abc
import contextlib
import typing

import numpy as np
import tensorflow as tf

from keras_antman import _keras
from keras_antman._keras import keras
from keras_antman._keras import ops
from keras_antman._keras import tree
from keras_antman.layers import StructuredGRUCell

DEFAULT_RIDGE = 1e-6
# Batch size used when the calibration data is an array.
ARRAY_BATCH_SIZE = 32


class CalibrationError(typing.NamedTuple):
    """Relative output errors of one product on the calibration rows.

    ``||X W - X W_hat|| / ||X W||`` for the `Scheme.from_dense` weights
    and for the `Scheme.arrays_from_data` ones; the product keeps the
    smaller (`kept`).
    """

    from_dense: float
    fitted: float

    @property
    def kept(self):
        """The error of the weights the product holds."""
        return min(self.from_dense, self.fitted)


class CalibrationErrors(collections.abc.Mapping):
    """``{(layer, product): CalibrationError}``, read-only; ``str()`` is a
    table.

    A `Mapping` rather than a dict, so that Keras does not track it when it
    is set as the ``calibration_errors`` attribute of a model.
    """

    def __init__(self, errors):
        self._errors = dict(errors)

    def __getitem__(self, key):
        return self._errors[key]

    def __iter__(self):
        return iter(self._errors)

    def __len__(self):
        return len(self._errors)

    def __repr__(self):
        return f"CalibrationErrors({self._errors!r})"

    def __str__(self):
        head = ("layer", "product", "from_dense", "fitted", "kept")
        rows = [(layer, part, f"{e.from_dense:.4f}", f"{e.fitted:.4f}",
                 "fitted" if e.fitted < e.from_dense else "from_dense")
                for (layer, part), e in self._errors.items()]
        widths = [max(len(head[i]), *(len(r[i]) for r in rows))
                  if rows else len(head[i]) for i in range(len(head))]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(r, widths))
            for r in [head, *rows])


class Moments:
    """The running statistics of one product's rows: ``X^T X`` and a count.

    Args:
        n: the row width (the product's input dimension).
    """

    def __init__(self, n):
        self.xtx = np.zeros((n, n), "float64")
        self.rows = 0

    def add(self, rows):
        """Adds the rows ``[r, n]`` of one batch (then forgotten)."""
        rows = np.asarray(rows, "float64").reshape(-1, self.xtx.shape[0])
        self.xtx += rows.T @ rows
        self.rows += rows.shape[0]


def output_error(xtx, w, w_hat):
    """``||X (W - W_hat)|| / ||X W||`` from ``X^T X`` alone.

    That is ``sqrt((tr(W^T C W) - 2 tr(W_hat^T C W) + tr(W_hat^T C
    W_hat)) / ||Y||^2)`` with ``C = X^T X``, written as the quadratic form
    of the difference so that it cannot go negative by rounding. ``0`` when
    both outputs vanish.
    """
    w = np.asarray(w, "float64")
    diff = w - np.asarray(w_hat, "float64")
    num = max(float(np.sum(diff * (xtx @ diff))), 0.0)
    den = max(float(np.sum(w * (xtx @ w))), 0.0)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return float(np.sqrt(num / den))


def cells_of(layer):
    """The cells of a recurrent layer (stacked cells in order)."""
    cell = layer.cell
    if isinstance(cell, keras.layers.StackedRNNCells):
        return list(cell.cells)
    return [cell]


def product_weights(cell):
    """``{product: dense W}`` of a stock or structured LSTM/GRU cell, named
    as `StructuredLSTMCell.products` names them."""
    if hasattr(cell, "stock_weights"):
        kernel, recurrent, _ = cell.stock_weights()
    else:
        kernel = ops.convert_to_numpy(cell.kernel)
        recurrent = ops.convert_to_numpy(cell.recurrent_kernel)
    if _split_candidate(cell):
        h = cell.units
        return {"input": kernel, "recurrent": recurrent[:, : 2 * h],
                "candidate": recurrent[:, 2 * h:]}
    return {"input": kernel, "recurrent": recurrent}


def _split_candidate(cell):
    return isinstance(cell, (keras.layers.GRUCell, StructuredGRUCell)) and (
        not cell.reset_after)


def _bias(cell):
    if hasattr(cell, "stock_weights"):
        return cell.stock_weights()[2]
    return None if cell.bias is None else ops.convert_to_numpy(cell.bias)


def _state_count(cell):
    return len(tree.flatten(cell.state_size))


class Recorder:
    """Accumulates `Moments` for the products of chosen cells.

    Args:
        cells: the cells to record (others are run but not recorded);
            ``None`` records every cell.

    Attributes:
        moments: ``{(id(cell), product): Moments}``.
    """

    def __init__(self, cells=None):
        self._wanted = None if cells is None else {id(c) for c in cells}
        self._cells = []  # keep the recorded cells alive: ids stay unique
        self._loops = {}  # id(cell) -> its compiled time loop
        self.moments = {}

    def moments_of(self, cell, product):
        """The `Moments` of one product, or ``None`` if never recorded."""
        return self.moments.get((id(cell), product))

    def _add(self, cell, product, rows):
        key = (id(cell), product)
        if key not in self.moments:
            self.moments[key] = Moments(rows.shape[-1])
            self._cells.append(cell)
        self.moments[key].add(rows)

    def record_call(self, layer, sequences, initial_state=None, mask=None):
        """Records one call of a recurrent layer (or ``Bidirectional``)."""
        if isinstance(layer, keras.layers.Bidirectional):
            states = None
            if initial_state is not None:
                flat = tree.flatten(initial_state)
                half = len(flat) // 2
                states = (flat[:half], flat[half:])
            for i, sub in enumerate((layer.forward_layer,
                                     layer.backward_layer)):
                self.record_call(sub, sequences,
                                 None if states is None else states[i], mask)
            return
        if tree.is_nested(mask):  # as keras.layers.RNN: the first mask
            mask = tree.flatten(mask)[0]
        x = np.asarray(ops.convert_to_numpy(sequences), "float32")
        batch, steps = x.shape[0], x.shape[1]
        keep = (np.ones((batch, steps), bool) if mask is None
                else np.asarray(ops.convert_to_numpy(mask), bool))
        if layer.go_backwards:
            x, keep = x[:, ::-1], keep[:, ::-1]
        cells = cells_of(layer)
        flat = self._initial_states(layer, cells, initial_state, batch)
        for cell in cells:
            count = _state_count(cell)
            states, flat = flat[:count], flat[count:]
            x = self._record_cell(cell, x, states, keep)

    @staticmethod
    def _initial_states(layer, cells, initial_state, batch):
        if initial_state is not None:
            flat = tree.flatten(initial_state)
        elif getattr(layer, "stateful", False) and getattr(
                layer, "states", None) is not None:
            flat = tree.flatten(layer.states)
        else:
            flat = [np.zeros((batch, d), "float32")
                    for c in cells for d in tree.flatten(c.state_size)]
        return [np.asarray(ops.convert_to_numpy(s), "float32") for s in flat]

    def _record_cell(self, cell, x, states, keep):
        """Records one cell over ``x`` [B, T, n] (processing order) and
        returns its output sequence."""
        run = self._loops.get(id(cell))
        if run is None:
            run = self._loops[id(cell)] = _cell_loop(cell)
        outputs = run(ops.convert_to_tensor(x),
                      [ops.convert_to_tensor(s) for s in states],
                      ops.convert_to_tensor(keep))
        outputs = np.asarray(ops.convert_to_numpy(outputs), "float32")
        if self._wanted is not None and id(cell) not in self._wanted:
            return outputs
        # h_{t-1}: the initial state, then the output of the last
        # unmasked step (a masked step leaves the state unchanged).
        h_prev = np.empty_like(outputs)
        prev = states[0]
        for t in range(x.shape[1]):
            h_prev[:, t] = prev
            prev = np.where(keep[:, t, None], outputs[:, t], prev)
        x_rows, h_rows = x[keep], h_prev[keep]
        self._add(cell, "input", x_rows)
        self._add(cell, "recurrent", h_rows)
        if _split_candidate(cell):
            self._add(cell, "candidate", self._reset(cell, x_rows, h_rows)
                      * h_rows)
        return outputs

    @staticmethod
    def _reset(cell, x_rows, h_rows):
        """The reset gate ``r`` of a GRU with ``reset_after=False`` (gate
        order z, r, h; one bias vector added to the input side)."""
        w = product_weights(cell)
        h = cell.units
        z = (x_rows.astype("float64") @ w["input"][:, h: 2 * h]
             + h_rows.astype("float64") @ w["recurrent"][:, h: 2 * h])
        bias = _bias(cell)
        if bias is not None:
            z = z + np.reshape(bias, (-1,))[h: 2 * h]
        r = cell.recurrent_activation(ops.convert_to_tensor(z, "float32"))
        return np.asarray(ops.convert_to_numpy(r), "float64")


def _cell_loop(cell):
    """A compiled (``tf.function``) run of ``cell`` over a sequence:
    ``(x [B, T, n], states, mask [B, T]) -> outputs [B, T, h]``, with
    Keras's own time loop; masked steps keep the state."""

    def step(inputs, step_states):
        out, new = cell.call(inputs, list(step_states), training=False)
        return out, list(new) if tree.is_nested(new) else [new]

    @tf.function(reduce_retracing=True, autograph=False)
    def run(x, states, mask):
        _, outputs, _ = _keras.rnn(
            step, x, list(states), mask=mask, unroll=False,
            input_length=x.shape[1], zero_output_for_mask=False,
            return_all_outputs=True,
        )
        return outputs

    return run


class _Probe(keras.layers.Layer):
    """Calls a recurrent layer unchanged, first recording its inputs.

    Takes the layer's call signature, so Keras hands it the same mask and
    initial state; records only when run eagerly (not while the probe
    model is being built).
    """

    def __init__(self, layer, recorder):
        super().__init__(name=layer.name, dtype=layer.dtype_policy)
        self.layer = layer
        self.recorder = recorder
        self.supports_masking = True

    def call(self, sequences, initial_state=None, mask=None, training=None):
        sequences, initial_state = _keras.unfold_rnn_inputs(
            sequences, initial_state)
        if tf.executing_eagerly() and not any(
            isinstance(t, keras.KerasTensor) for t in tree.flatten(sequences)
        ):
            self.recorder.record_call(self.layer, sequences, initial_state,
                                      mask)
            # Compiled, as `predict` would run it (eager loops are slow).
            return self._compiled(sequences, initial_state, mask)
        return self.layer(sequences, initial_state=initial_state, mask=mask,
                          training=False)

    @tf.function(reduce_retracing=True, autograph=False)
    def _compiled(self, sequences, initial_state, mask):
        return self.layer(sequences, initial_state=initial_state, mask=mask,
                          training=False)

    def compute_output_spec(self, sequences, initial_state=None, mask=None,
                            training=None):
        return self.layer.compute_output_spec(
            sequences, initial_state=initial_state)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)


def probe_model(model, recorder, wanted):
    """The original model, with each layer in ``wanted`` (ids) wrapped in a
    `_Probe`; every layer is the original's own (weights shared)."""

    def clone_function(layer):
        if id(layer) in wanted:
            return _Probe(layer, recorder)
        return layer

    return _keras.clone_model(model, clone_function, recursive=True)


def _batches(data, steps, batch_size):
    """The model inputs of at most ``steps`` batches of ``data``."""
    if isinstance(data, tf.Tensor):
        data = data.numpy()
    if isinstance(data, (np.ndarray, dict)) or (
        isinstance(data, (list, tuple))
        and all(isinstance(d, np.ndarray) for d in data)
    ):
        arrays = data
        size = len(tree.flatten(arrays)[0])
        data = (tree.map_structure(lambda a, i=i: a[i: i + batch_size],
                                   arrays)
                for i in range(0, size, batch_size))
        unpack = False
    elif isinstance(data, tf.data.Dataset) or hasattr(data, "__iter__"):
        unpack = True
    else:
        raise ValueError(
            "`calibration_data` must be a tf.data.Dataset (or another "
            "iterable) of batches x or (x, y) or (x, y, sample_weight), or "
            f"a NumPy array of inputs. Received: {type(data).__name__}"
        )
    for i, batch in enumerate(data):
        if steps is not None and i >= steps:
            return
        if unpack:
            batch = keras.utils.unpack_x_y_sample_weight(batch)[0]
        yield batch


def stateful_layers(obj):
    """The stateful recurrent layers of ``obj`` (a model or a layer, nested
    models, wrappers and sub-models such as a `Distiller`'s student and
    teacher included) whose states exist (built), in tracking order."""
    found = []

    def walk(layer):
        if getattr(layer, "stateful", False) and getattr(
                layer, "states", None) is not None:
            found.append(layer)
        for sub in _keras.sublayers(layer):
            walk(sub)

    walk(obj)
    return found


@contextlib.contextmanager
def kept_states(obj):
    """Yields ``stateful_layers(obj)`` and puts their states back as they
    were on exit, so that a run in between (an evaluation, a calibration
    pass) leaves the carried state of a training run untouched."""
    layers = stateful_layers(obj)
    saved = [[ops.convert_to_numpy(s) for s in tree.flatten(layer.states)]
             for layer in layers]
    try:
        yield layers
    finally:
        for layer, values in zip(layers, saved):
            for var, value in zip(tree.flatten(layer.states), values):
                var.assign(value)


def record(model, layers, data, steps=None):
    """Runs ``model`` on ``data`` and records the rows of ``layers``' cells.

    Args:
        model: a Sequential or Functional model, or a single recurrent
            layer (then ``data`` holds its input sequences).
        layers: the recurrent layers (of ``model``) whose cells to record.
        data: see `keras_antman.compress` (``calibration_data``).
        steps: at most this many batches (``None``: all).

    Returns:
        A `Recorder`.
    """
    cells = [c for layer in layers for sub in _directions(layer)
             for c in cells_of(sub)]
    recorder = Recorder(cells)
    if _keras.is_graph_model(model):
        runner = probe_model(model, recorder, {id(x) for x in layers})
        batch = model.inputs[0].shape[0] if model.inputs else None
    else:  # a single layer: the data are its input sequences
        def runner(x, training=False):
            recorder.record_call(model, x)
            return model(x, training=training)

        batch = None
    with kept_states(model):
        for x in _batches(data, steps, batch or ARRAY_BATCH_SIZE):
            runner(x, training=False)
    return recorder


def _directions(layer):
    if isinstance(layer, keras.layers.Bidirectional):
        return [layer.forward_layer, layer.backward_layer]
    return [layer]


def fit_matrix(matrix, w, moments, ridge=DEFAULT_RIDGE):
    """Refits a `StructuredMatrix` (holding its `from_dense` weights) to
    the recorded rows if that lowers the output error.

    Args:
        matrix: a built `StructuredMatrix`, already set by ``from_dense``.
        w: the dense ``[n, m]`` matrix it replaces.
        moments: the `Moments` of its rows.
        ridge: see `Scheme.arrays_from_data`.

    Returns:
        A `CalibrationError`.
    """
    scheme = matrix.scheme
    w32 = np.asarray(w, "float32")
    xtx = moments.xtx
    start = matrix.weight_arrays()
    fitted = {k: np.asarray(v, "float32") for k, v in
              scheme.arrays_from_data(w32, xtx, xtx @ w32.astype("float64"),
                                      ridge).items()}
    before = output_error(xtx, w32, scheme.dense_from_arrays(start))
    after = output_error(xtx, w32, scheme.dense_from_arrays(fitted))
    if not np.all([np.all(np.isfinite(v)) for v in fitted.values()]):
        after = float("inf")
    if after < before:
        matrix.set_weight_arrays(fitted)
    return CalibrationError(before, after)


def cell_keys(obj, prefix=""):
    """``{id(cell): (layer, part prefix)}``: each cell's name in `report`
    (``("bi", "forward/")``, ``("stack", "cell_1/")``, ``("outer/lstm",
    "")`` for a layer of a nested model)."""
    keys = {}
    if _keras.is_graph_model(obj):
        for layer in obj.layers:
            if _keras.is_graph_model(layer):
                keys.update(cell_keys(layer, f"{prefix}{layer.name}/"))
            else:
                keys.update(cell_keys(layer, prefix))
        return keys
    name = prefix + obj.name
    if isinstance(obj, keras.layers.Bidirectional):
        for side, sub in (("forward", obj.forward_layer),
                          ("backward", obj.backward_layer)):
            for cid, (_, part) in cell_keys(sub).items():
                keys[cid] = (name, f"{side}/{part}")
        return keys
    if isinstance(obj, keras.layers.RNN):
        cells = cells_of(obj)
        for i, cell in enumerate(cells):
            keys[id(cell)] = (name, "" if len(cells) == 1 else f"cell_{i}/")
    return keys


def calibrate(model, layers, cell_pairs, data, steps=None,
              ridge=DEFAULT_RIDGE):
    """Records ``layers`` of ``model`` on ``data`` and refits the new cells.

    Args:
        model: the original model (or layer).
        layers: its recurrent layers being compressed.
        cell_pairs: ``[(original cell, structured cell)]``, the structured
            cells already initialised with `Scheme.from_dense`.
        data, steps: see `keras_antman.compress`.
        ridge: see `Scheme.arrays_from_data`.

    Returns:
        ``{(layer, product): CalibrationError}``, keyed as `report` names
        the products.
    """
    recorder = record(model, layers, data, steps)
    keys = cell_keys(model)
    errors = {}
    for old, new in cell_pairs:
        dense = product_weights(old)
        layer, prefix = keys.get(id(old), (old.name, ""))
        for product, matrix in new.products().items():
            moments = recorder.moments_of(old, product)
            if moments is None or moments.rows == 0:
                continue
            errors[(layer, prefix + product)] = fit_matrix(
                matrix, dense[product], moments, ridge)
    return errors

"""tf_keras side of the seam (`keras_antman._keras`): the same names as
`keras_antman._keras3`, for tf_keras (``TF_USE_LEGACY_KERAS=1``).

tf_keras's RNN layer has no ``inner_loop`` hook and its cells' dropout
mixin has another interface, so `RNN` and `DropoutRNNCell` here give the
structured layers the Keras 3 ones: `RNN.call` prepares the states as
tf_keras's does and hands the loop to ``inner_loop``; `DropoutRNNCell`
caches one mask per call as Keras 3's does.
"""

import tensorflow as tf
from tf_keras.src import backend as _backend
from tf_keras.src.engine.functional import Functional
from tf_keras.src.export import export_lib

from keras_antman import _tf_keras_api as keras

ops = keras.ops
tree = keras.tree
activations = keras.activations
constraints = keras.constraints
initializers = keras.initializers
regularizers = keras.regularizers

__all__ = [
    "DropoutRNNCell",
    "Loss",
    "MultiWorkerFit",
    "RNN",
    "activations",
    "call_loss",
    "clone_model",
    "compute_loss",
    "constraints",
    "export_saved_model",
    "fresh_initializer",
    "initializers",
    "is_graph_model",
    "keras",
    "layer_calls",
    "ops",
    "optimizer_built",
    "own_variables",
    "regularizers",
    "rnn",
    "set_variable_constraint",
    "set_variable_regularizer",
    "sublayers",
    "tree",
    "unfold_rnn_inputs",
    "variable_regularizer",
]


def rnn(step_function, inputs, initial_states, **kwargs):
    """tf_keras's time loop (``tf_keras.backend.rnn``; the same arguments
    as Keras 3's)."""
    return _backend.rnn(step_function, inputs, initial_states, **kwargs)


def is_graph_model(obj):
    """Whether ``obj`` is a Sequential or Functional model (not subclassed).

    tf_keras's Sequential is a Functional; one without inputs yet has no
    graph, but `clone_model` still clones it layer by layer.
    """
    return isinstance(obj, Functional)


class MultiWorkerFit:
    """Mixin of a `keras.Model` that overrides ``compute_loss`` with Keras
    3's signature (``training`` too): the Keras 3 trainer behaviour it
    relies on, for tf_keras.

    tf_keras's trainer runs under `tf.distribute.MultiWorkerMirroredStrategy`
    as it is (the Keras 3 fix is not needed), but it reports a ``loss``
    metric only for losses given to ``compile``. Keras 3 tracks whatever
    ``compute_loss`` returns as ``loss``; these steps do the same.
    """

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        self._set_loss_tracker(keras.metrics.Mean(name="loss"))

    @tf.__internal__.tracking.no_automatic_dependency_tracking
    def _set_loss_tracker(self, tracker):
        # Untracked, so that a second compile replaces it.
        self._loss_tracker = tracker

    @property
    def metrics(self):
        tracker = getattr(self, "_loss_tracker", None)
        return ([tracker] if tracker is not None else []) + super().metrics

    def _track_loss(self, loss, x):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self._loss_tracker.update_state(
            loss * float(replicas),
            sample_weight=tf.shape(tf.nest.flatten(x)[0])[0])

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x, y, y_pred, sample_weight)
        self.optimizer.minimize(loss, self.trainable_variables, tape=tape)
        self._track_loss(loss, x)
        return self.compute_metrics(x, y, y_pred, sample_weight)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=False)
        loss = self.compute_loss(x, y, y_pred, sample_weight, training=False)
        self._track_loss(loss, x)
        return self.compute_metrics(x, y, y_pred, sample_weight)


_STATE_FOLDING = (keras.layers.RNN, keras.layers.Bidirectional)


def unfold_rnn_inputs(sequences, initial_state):
    """``(sequences, initial_state)`` of a recurrent layer's call as Keras 3
    records it: tf_keras's ``RNN.__call__`` folds the states into the
    inputs (``[sequences, *states]``), and layers cloned from its graph are
    called so."""
    if (initial_state is None and isinstance(sequences, (list, tuple))
            and len(sequences) > 1):
        return sequences[0], list(sequences[1:])
    return sequences, initial_state


def layer_calls(model):
    """The layer calls of a Functional model, inputs first:
    ``[(layer, args, kwargs, output tensors)]`` (tensors by identity)."""
    calls = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input or node.layer is None:
                continue
            args, kwargs = tuple(node.call_args), dict(node.call_kwargs)
            if isinstance(node.layer, _STATE_FOLDING) and args:
                first, state = unfold_rnn_inputs(
                    args[0], kwargs.get("initial_state"))
                args = (first,) + args[1:]
                if state is not None:
                    kwargs["initial_state"] = state
            calls.append((node.layer, args, kwargs,
                          tf.nest.flatten(node.outputs)))
    return calls


def sublayers(layer):
    """The direct sub-layers tf_keras tracks for ``layer``."""
    return list(layer._flatten_layers(include_self=False, recursive=False))


def optimizer_built(optimizer):
    """Whether the optimizer has created its variables."""
    return getattr(optimizer, "_built", False)


def own_variables(layer):
    """The variables a layer saves as its own, in the saved order."""
    return layer._trainable_weights + layer._non_trainable_weights


def clone_model(model, clone_function=None, recursive=False):
    """Keras 3's `clone_model`: tf_keras's, which hands nested models to
    ``clone_function`` whole; with ``recursive`` they are cloned layer by
    layer with it instead."""
    if clone_function is None or not recursive:
        return keras.models.clone_model(model, clone_function=clone_function)

    def clone(layer):
        if is_graph_model(layer):
            return clone_model(layer, clone_function, recursive=True)
        return clone_function(layer)

    return keras.models.clone_model(model, clone_function=clone)


def compute_loss(model, x, y, y_pred, sample_weight=None, training=True):
    """``model.compute_loss`` (the loss `fit` minimises) on one batch;
    tf_keras's takes no ``training``, and tensors only (as `fit` gives)."""
    y, sample_weight = (None if v is None else
                        tf.nest.map_structure(tf.convert_to_tensor, v)
                        for v in (y, sample_weight))
    return model.compute_loss(x, y, y_pred, sample_weight)


def fresh_initializer(initializer):
    """The initializer for one more weight: an unseeded tf_keras
    initializer fixes its seed at its first call and repeats its values, so
    each weight gets a copy (a new seed), as each gets new values on
    Keras 3."""
    initializer = keras.initializers.get(initializer)
    config = getattr(initializer, "get_config", dict)()
    if not isinstance(initializer, keras.initializers.Initializer) or (
            config.get("seed", None) is not None or "seed" not in config):
        return initializer
    return initializer.__class__.from_config(config)


def export_saved_model(model, path, input_signature=None, verbose=False):
    """The model's inference as a SavedModel with a ``serve`` endpoint
    (tf_keras's `ExportArchive`; it prints no summary)."""
    if input_signature is None:
        model.export(path)
        return
    archive = export_lib.ExportArchive()
    archive.track(model)
    if len(input_signature) > 1:
        input_signature = [input_signature]
    archive.add_endpoint("serve", model.__call__, input_signature)
    archive.write_out(path)


def variable_regularizer(variable):
    """The regularizer set by `set_variable_regularizer` (tf_keras keeps
    a weight's own ``add_weight`` regularizer in its layer, not here)."""
    return getattr(variable, "_antman_regularizer", None)


def set_variable_regularizer(model, variable, regularizer):
    """Add ``regularizer(variable)`` to ``model.losses``, replacing the one
    set before (Keras 3 reads a variable's ``regularizer`` there; tf_keras
    fixes a weight's regularizer when it is created, so this is a callable
    loss of ``model``)."""
    previous = getattr(variable, "_antman_loss", None)
    if previous is not None and previous in model._callable_losses:
        model._callable_losses.remove(previous)
    variable._antman_regularizer = regularizer
    variable._antman_loss = None
    if regularizer is not None:
        variable._antman_loss = lambda: regularizer(variable)
        model._callable_losses.append(variable._antman_loss)


def set_variable_constraint(variable, constraint):
    """The constraint tf_keras's optimizers apply after each update."""
    variable._constraint = constraint


class Loss(keras.losses.Loss):
    """tf_keras's `Loss` with Keras 3's constructor (``dtype``)."""

    def __init__(self, name=None, reduction="sum_over_batch_size",
                 dtype=None):
        super().__init__(reduction=reduction, name=name)
        self.dtype = dtype or keras.backend.floatx()


def call_loss(loss, y_true, y_pred, sample_weight=None):
    """``loss(y_true, y_pred, sample_weight)`` as Keras 3 computes it.

    Under a distribution strategy Keras 3 reduces with
    ``"sum_over_batch_size"`` and divides by the replica count; tf_keras
    allows that reduction there only in compiled losses, so it is allowed
    here (on ``loss``) and the division done.
    """
    loss._allow_sum_over_batch_size = True
    value = loss(y_true, y_pred, sample_weight)
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1 and loss.reduction in ("auto", "sum_over_batch_size"):
        value = value * (1.0 / replicas)
    return value


class DropoutRNNCell:
    """Keras 3's dropout-mask mixin of RNN cells, for tf_keras.

    The cell has ``dropout``, ``recurrent_dropout`` and ``seed_generator``
    (``keras.random.SeedGenerator``). A mask is made on first use and kept
    until `RNN.call` resets it, so every step of one call shares it.
    """

    def _create_dropout_mask(self, step_input, rate):
        return keras.random.dropout(
            tf.ones_like(step_input), rate, seed=self.seed_generator
        )

    def get_dropout_mask(self, step_input):
        if getattr(self, "_dropout_mask", None) is None and self.dropout > 0:
            self._dropout_mask = self._create_dropout_mask(
                step_input, self.dropout)
        return self._dropout_mask

    def get_recurrent_dropout_mask(self, step_input):
        if (getattr(self, "_recurrent_dropout_mask", None) is None
                and self.recurrent_dropout > 0):
            self._recurrent_dropout_mask = self._create_dropout_mask(
                step_input, self.recurrent_dropout)
        return self._recurrent_dropout_mask

    def reset_dropout_mask(self):
        self._dropout_mask = None

    def reset_recurrent_dropout_mask(self):
        self._recurrent_dropout_mask = None


class RNN(keras.layers.RNN):
    """tf_keras's `RNN` with Keras 3's ``inner_loop`` hook.

    ``call`` does what tf_keras's does around the loop (states from
    ``initial_state``, the stateful states or the cell's zeros; the
    stateful update; ``return_sequences`` / ``return_state``) and runs
    ``inner_loop(sequences, initial_state, mask, training)``, which returns
    ``(last_output, outputs, states)``. No ragged inputs, no constants.
    """

    def build(self, input_shape):
        # tf_keras's build sets ``input_spec[0]``: a list, not one spec.
        if isinstance(self.input_spec, keras.layers.InputSpec):
            self.input_spec = [self.input_spec]
        super().build(input_shape)

    def get_initial_state(self, inputs):
        states = self.cell.get_initial_state(batch_size=tf.shape(inputs)[0])
        return list(states)

    def _reset_masks(self):
        if isinstance(self.cell, DropoutRNNCell):
            self.cell.reset_dropout_mask()
            self.cell.reset_recurrent_dropout_mask()

    def call(self, inputs, mask=None, training=None, initial_state=None):
        if isinstance(inputs, tf.RaggedTensor):
            raise ValueError(
                f"`{self.name}` does not take ragged inputs; pad them and "
                "pass a mask (e.g. `inputs.to_tensor()` with `Masking`)."
            )
        inputs, initial_state, _ = self._process_inputs(
            inputs, initial_state, None)
        if self.unroll and inputs.shape[1] is None:
            raise ValueError(
                f"`{self.name}`: cannot unroll an RNN whose time dimension "
                "is undefined; give the Input a fixed number of timesteps."
            )
        if mask is not None:
            mask = tf.nest.flatten(mask)[0]
        self._reset_masks()
        last_output, outputs, states = self.inner_loop(
            inputs, list(initial_state), mask, training=training)
        self._reset_masks()
        if self.stateful:
            self.add_update([
                tf.compat.v1.assign(var, tf.cast(state, var.dtype))
                for var, state in zip(tf.nest.flatten(self.states),
                                      tf.nest.flatten(states))
            ])
        output = outputs if self.return_sequences else last_output
        if self.return_state:
            return [output] + list(states)
        return output

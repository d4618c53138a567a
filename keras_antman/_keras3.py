"""Keras 3 side of the seam (`keras_antman._keras`): the Keras internals
the package needs, and the names it imports from Keras."""

import keras
from keras import activations
from keras import constraints
from keras import initializers
from keras import ops
from keras import regularizers
from keras import tree
from keras.src import backend as _backend
from keras.src.layers.rnn.dropout_rnn_cell import DropoutRNNCell
from keras.src.models.functional import Functional

RNN = keras.layers.RNN
Loss = keras.losses.Loss

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
    """Keras's own time loop (masks, ``go_backwards``, ``unroll``).

    The same function `keras.layers.RNN` runs; ``kwargs`` are those of
    ``keras.src.backend.rnn``.
    """
    return _backend.rnn(step_function, inputs, initial_states, **kwargs)


def is_graph_model(obj):
    """Whether ``obj`` is a Sequential or Functional model (not subclassed).

    Only those can be cloned layer by layer, since their structure is data.
    """
    return isinstance(obj, (keras.Sequential, Functional))


class MultiWorkerFit:
    """Mixin of a `keras.Model` that lets it `fit` under
    `tf.distribute.MultiWorkerMirroredStrategy`.

    Keras 3's TF trainer fails there twice (keras-team/keras#20585), so
    plain Keras models cannot `fit` under it at all:

    - Before the first step it learns a batch's shapes by averaging the
      first distributed batch over the replicas, a reduce that fails for a
      ``PerReplica`` under this strategy. Only the shapes matter, and a
      replica's local batch has them: this takes it instead.
    - After each step it averages the logs with ``strategy.reduce("MEAN",
      v, axis=0)``, which needs a leading axis that scalar logs lack. The
      step's logs are given one (shape ``[1]``), so that reduce is the
      mean over the replicas, a scalar again.
    """

    def _multi_worker(self):
        import tensorflow as tf

        return isinstance(getattr(self, "_distribute_strategy", None),
                          tf.distribute.MultiWorkerMirroredStrategy)

    def _with_leading_axis(self, logs):
        if not self._multi_worker():
            return logs
        return {k: keras.ops.reshape(v, (1,)) if len(v.shape) == 0 else v
                for k, v in logs.items()}

    def train_step(self, data):
        return self._with_leading_axis(super().train_step(data))

    def test_step(self, data):
        return self._with_leading_axis(super().test_step(data))

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        import tensorflow as tf

        strategy = getattr(self, "_distribute_strategy", None)
        if iterator is None or not self._multi_worker():
            return super()._maybe_symbolic_build(iterator, data_batch)
        for _, _, it in iterator:
            batch = next(it)
            data_batch = keras.tree.map_structure(
                lambda v: strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v,
                batch,
            )
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)


def layer_calls(model):
    """The layer calls of a Functional model, inputs first:
    ``[(layer, args, kwargs, output tensors)]`` (tensors by identity)."""
    calls = []
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input or node.operation is None:
                continue
            calls.append(
                (node.operation, node.arguments.args,
                 node.arguments.kwargs, list(node.outputs))
            )
    return calls


def sublayers(layer):
    """The direct sub-layers Keras tracks for ``layer`` (wrappers, cells,
    layers of a model), in tracking order."""
    return list(layer._flatten_layers(include_self=False, recursive=False))


def optimizer_built(optimizer):
    """Whether the optimizer has created its variables."""
    return optimizer.built


def own_variables(layer):
    """The variables a layer saves as its own, in the saved order."""
    return layer._trainable_variables + layer._non_trainable_variables


def clone_model(model, clone_function=None, recursive=False):
    """`keras.models.clone_model`; ``recursive`` clones the layers of
    nested graph models with ``clone_function`` too."""
    return keras.models.clone_model(
        model, clone_function=clone_function, recursive=recursive)


def call_loss(loss, y_true, y_pred, sample_weight=None):
    """``loss(y_true, y_pred, sample_weight)``."""
    return loss(y_true, y_pred, sample_weight)


def compute_loss(model, x, y, y_pred, sample_weight=None, training=True):
    """``model.compute_loss`` (the loss `fit` minimises) on one batch."""
    return model.compute_loss(x=x, y=y, y_pred=y_pred,
                              sample_weight=sample_weight, training=training)


def export_saved_model(model, path, input_signature=None, verbose=False):
    """The model's inference as a SavedModel with a ``serve`` endpoint."""
    model.export(path, format="tf_saved_model", verbose=verbose,
                 input_signature=input_signature)


def variable_regularizer(variable):
    """The regularizer Keras adds to the losses of the variable's layer."""
    return variable.regularizer


def set_variable_regularizer(model, variable, regularizer):
    """Replace it (``model`` holds the variable; Keras 3 needs no model)."""
    variable.regularizer = regularizer


def set_variable_constraint(variable, constraint):
    """The constraint the optimizer applies after each update."""
    variable.constraint = constraint


def unfold_rnn_inputs(sequences, initial_state):
    """``(sequences, initial_state)`` of a recurrent layer's call, as given
    (tf_keras may fold the states into the inputs)."""
    return sequences, initial_state


def fresh_initializer(initializer):
    """The initializer for one more weight (Keras 3's unseeded ones draw
    new values on every call already)."""
    return initializer

"""The one seam between keras-antman and Keras internals.

Keras 3 has no public name for three things the package needs: the
backend's time loop (``rnn``), the dropout-mask mixin of its RNN cells and a
way to tell a graph-network model (Functional or Sequential) from a
subclassed one, to list a layer's direct sub-layers, or to list the layer
calls of a Functional model. Everything that
reaches past Keras's public API does it here and nowhere else, so a port to
another Keras flavour (tf_keras) has one module to give counterparts for.
"""

import keras
from keras.src import backend as _backend
from keras.src.layers.rnn.dropout_rnn_cell import DropoutRNNCell
from keras.src.models.functional import Functional

__all__ = [
    "DropoutRNNCell",
    "is_graph_model",
    "layer_calls",
    "rnn",
    "sublayers",
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

"""The one seam between keras-antman and Keras: which Keras, and its
internals.

The package runs on Keras 3 or, when ``TF_USE_LEGACY_KERAS`` is set as
TensorFlow reads it (``1``, ``true``, ``True``) and tf_keras is installed,
on tf_keras. Every module imports ``keras``, ``ops``, ``tree`` and the
other Keras modules from here, never directly, and everything that
reaches past Keras's public API is here too: the backend's time loop
(``rnn``), the dropout-mask mixin of RNN cells (`DropoutRNNCell`), an RNN
base class with Keras 3's ``inner_loop`` hook (`RNN`), a way to tell a
graph-network model from a subclassed one, a layer's direct sub-layers,
the layer calls of a Functional model, and `MultiWorkerFit` (Keras 3's TF
trainer fails under ``MultiWorkerMirroredStrategy``).

`keras_antman._keras3` gives them for Keras 3, `keras_antman._tf_keras`
for tf_keras (with `keras_antman._tf_keras_api` as its ``keras``: tf_keras
plus the Keras 3 names the package uses). Importing this module never
changes the flavour and never imports tfmot.
"""

import os

LEGACY_VALUES = ("1", "true", "True")


def legacy_requested():
    """Whether ``TF_USE_LEGACY_KERAS`` asks for tf_keras, as TF reads it."""
    return os.environ.get("TF_USE_LEGACY_KERAS") in LEGACY_VALUES


LEGACY = legacy_requested()
FLAVOUR = "tf_keras" if LEGACY else "keras3"

if LEGACY:
    try:
        import tf_keras  # noqa: F401
    except ImportError:
        raise ImportError(
            "keras-antman: TF_USE_LEGACY_KERAS is set, so it runs on "
            "tf_keras, which is not installed. Install it (pip install "
            "'keras-antman[tfkeras]', or tf-keras matching your "
            "TensorFlow) or unset TF_USE_LEGACY_KERAS to use Keras 3."
        ) from None
    from keras_antman import _tf_keras as _flavour
else:
    from keras_antman import _keras3 as _flavour

keras = _flavour.keras
ops = _flavour.ops
tree = _flavour.tree
activations = _flavour.activations
constraints = _flavour.constraints
initializers = _flavour.initializers
regularizers = _flavour.regularizers

RNN = _flavour.RNN
Loss = _flavour.Loss
DropoutRNNCell = _flavour.DropoutRNNCell
MultiWorkerFit = _flavour.MultiWorkerFit
call_loss = _flavour.call_loss
clone_model = _flavour.clone_model
compute_loss = _flavour.compute_loss
export_saved_model = _flavour.export_saved_model
fresh_initializer = _flavour.fresh_initializer
is_graph_model = _flavour.is_graph_model
layer_calls = _flavour.layer_calls
optimizer_built = _flavour.optimizer_built
own_variables = _flavour.own_variables
rnn = _flavour.rnn
set_variable_constraint = _flavour.set_variable_constraint
set_variable_regularizer = _flavour.set_variable_regularizer
sublayers = _flavour.sublayers
unfold_rnn_inputs = _flavour.unfold_rnn_inputs
variable_regularizer = _flavour.variable_regularizer

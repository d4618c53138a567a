"""`compress`: replace the LSTMs and GRUs of a Keras model by structured ones.

In the style of tfmot's ``prune_low_magnitude``: it takes a Sequential or
Functional model (nested models included) or a single layer, clones it with a
``clone_function`` that swaps every recurrent layer (also inside
``Bidirectional`` and ``RNN`` of stacked cells) for its structured twin, and
initialises the structured weights from the trained dense ones with each
scheme's ``from_dense``, or, given calibration data, fits them to the rows
each product sees in the original (`keras_antman.calibration`). The input
model is left untouched.
"""

import numpy as np

from keras_antman import _keras
from keras_antman import calibration
from keras_antman import schemes as schemes_lib
from keras_antman._keras import keras
from keras_antman._keras import ops
from keras_antman.layers import StructuredGRU
from keras_antman.layers import StructuredGRUCell
from keras_antman.layers import StructuredLSTM
from keras_antman.layers import StructuredLSTMCell

# Stock layer or cell -> structured twin. Structured ones map to themselves,
# so an already compressed layer can be compressed again (from `to_dense`).
_LAYER_TWINS = {
    keras.layers.LSTM: StructuredLSTM,
    keras.layers.GRU: StructuredGRU,
    StructuredLSTM: StructuredLSTM,
    StructuredGRU: StructuredGRU,
}
_CELL_TWINS = {
    keras.layers.LSTMCell: StructuredLSTMCell,
    keras.layers.GRUCell: StructuredGRUCell,
    StructuredLSTMCell: StructuredLSTMCell,
    StructuredGRUCell: StructuredGRUCell,
}
# Config keys of the stock layers that the structured ones do not take.
_DROPPED_KEYS = ("use_cudnn", "implementation", "cell")


def compress(model, input_scheme=None, recurrent_scheme=None, layers=None,
             calibration_data=None, calibration_steps=None,
             calibration_ridge=calibration.DEFAULT_RIDGE):
    """Replace every LSTM/GRU of ``model`` by a structured layer.

    Each recurrent layer's fused input product (``n_x -> 4h`` for an LSTM,
    ``3h`` for a GRU) gets ``input_scheme`` and its recurrent product
    ``recurrent_scheme``; weights come from the trained dense matrices via
    each scheme's ``from_dense`` (truncated SVD for low rank, the block
    diagonal for LGP, least-squares mixing matrices). Every other layer is
    cloned with its weights. Optimizer state is not carried over: compile
    the result (or wrap it in a `Distiller`) before training it.

    Args:
        model: a built Sequential or Functional `keras.Model` (nested
            models, ``Bidirectional``, stacked and ``RNN(cell)`` layers
            included), or a single recurrent layer.
        input_scheme: `Scheme` for input products (default: `Dense`).
        recurrent_scheme: `Scheme` for recurrent products (default:
            `Dense`).
        layers: which layers to compress and how. ``None``: every recurrent
            layer, with the two schemes above. A dict ``{layer name: spec}``:
            only the named layers (a ``Bidirectional`` is named by the
            wrapper or its inner layer). A callable ``policy(layer) -> spec``
            called with each recurrent layer (the forward layer of a
            ``Bidirectional``). A spec is ``None`` (leave the layer as it
            is), a ``(input_scheme, recurrent_scheme)`` tuple or a dict with
            those keys; missing entries fall back to the two arguments.
        calibration_data: ``None`` (the default: every product from
            `Scheme.from_dense`), or inputs for a data-aware
            initialisation: a ``tf.data.Dataset`` (or other iterable) of
            batches ``x``, ``(x, y)`` or ``(x, y, sample_weight)``, or a
            NumPy array (or dict / list of arrays) of model inputs, cut
            into batches of the model's fixed batch size or else 32. The
            original model runs on it (inference mode) and each compressed
            product is then fitted to the rows it multiplies there
            (`Scheme.arrays_from_data`; see `keras_antman.calibration`),
            keeping whichever of the fit and `from_dense` has the smaller
            output error on those rows. For a single layer, the data are
            its input sequences.
        calibration_steps: at most this many batches of
            ``calibration_data`` (``None``: all of it).
        calibration_ridge: relative ridge of the fits: each solve adds
            ``calibration_ridge * trace(G) / dim`` to its Gram matrix ``G``
            (default ``1e-6``), so rank-deficient data stay finite.

    Returns:
        A new model (or layer) whose recurrent layers are `StructuredLSTM`
        / `StructuredGRU` layers with the same names and configuration;
        they run the compiled CPU op at inference when it is available
        (``kernel="auto"``). With ``calibration_data`` it has an attribute
        ``calibration_errors``: ``{(layer, product): CalibrationError}``
        (``from_dense`` and ``fitted`` relative output errors
        ``||X W - X W_hat|| / ||X W||`` on the calibration rows), keyed as
        `report` names products; pass it to ``report(..., errors=)``.

    Raises:
        ValueError: for a subclassed model, an unbuilt model, names in
            ``layers`` that are not recurrent layers of the model, or a
            scheme that does not fit a layer's dimensions (the message names
            the layer, the product, the dims and the valid choices), or
            calibration arguments of the wrong kind.

    Example:

    >>> student = am.compress(teacher, input_scheme=am.LGPShuffle(10),
    ...                       recurrent_scheme=am.LGPShuffle(10))
    """
    policy = _Policy(input_scheme, recurrent_scheme, layers)
    _check_calibration(calibration_steps, calibration_ridge)
    if _recurrent_twin(model) is not None:
        new, cell_pairs = _compress_layer(model, policy)
        if calibration_data is not None:
            new.calibration_errors = _calibrate(
                model, [model] if cell_pairs else [], cell_pairs,
                calibration_data, calibration_steps, calibration_ridge)
        return new
    if not _keras.is_graph_model(model):
        raise ValueError(
            "`compress` can only compress a Sequential or Functional model or "
            "a single LSTM/GRU layer. Received an object of type "
            f"'{type(model).__name__}'. For a subclassed model, build its "
            "recurrent layers with keras_antman.StructuredLSTM / StructuredGRU "
            "or compress each layer: `compress(model.lstm, ...)`."
        )
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built: call it on data or build it "
            "first, so that `compress` can read the trained weights."
        )
    policy.check_names(_recurrent_names(model))

    pairs = []

    def clone_function(layer):
        new = _clone_layer(layer, policy)
        pairs.append((layer, new))
        return new

    new_model = _keras.clone_model(model, clone_function, recursive=True)
    if not new_model.built:
        new_model.build(model.inputs[0].shape if model.inputs else None)
    cell_pairs, compressed = [], []
    for old, new in pairs:
        copied = _copy_weights(old, new)
        if copied:
            cell_pairs += copied
            compressed.append(old)
    if calibration_data is not None:
        new_model.calibration_errors = _calibrate(
            model, compressed, cell_pairs, calibration_data,
            calibration_steps, calibration_ridge)
    if not model.trainable:
        # A frozen model (the Distiller freezes its teacher) gives a
        # trainable student: freezing the whole model set every layer's
        # flag, so no flag of it was chosen layer by layer. Each layer is
        # set: Keras 3 passes a model's flag on to its layers only when
        # the model's own flag changes, and a functional clone's is True.
        new_model.trainable = True
        for layer in new_model.layers:
            layer.trainable = True
    return new_model


def _check_calibration(steps, ridge):
    if steps is not None and (
        isinstance(steps, bool) or not isinstance(steps, (int, np.integer))
        or steps < 1
    ):
        raise ValueError(
            "`calibration_steps` must be None or a positive integer (a "
            f"number of batches). Received: calibration_steps={steps!r}"
        )
    if isinstance(ridge, bool) or not isinstance(
        ridge, (int, float, np.number)
    ) or not ridge >= 0:
        raise ValueError(
            "`calibration_ridge` must be a number >= 0 (relative to the "
            "mean eigenvalue of X^T X; default 1e-6). Received: "
            f"calibration_ridge={ridge!r}"
        )


def _calibrate(model, layers, cell_pairs, data, steps, ridge):
    errors = calibration.calibrate(
        model, layers, cell_pairs, data, steps, float(ridge))
    # A plain object, not a dict: Keras would track a dict attribute.
    return calibration.CalibrationErrors(errors)


class _Policy:
    """Which schemes (if any) each recurrent layer gets."""

    def __init__(self, input_scheme, recurrent_scheme, layers):
        self.defaults = (
            schemes_lib.get(input_scheme),
            schemes_lib.get(recurrent_scheme),
        )
        if layers is not None and not (
            callable(layers) or isinstance(layers, dict)
        ):
            raise ValueError(
                "`layers` must be None, a dict {layer name: spec} or a "
                f"callable policy(layer) -> spec. Received: {layers!r}"
            )
        self.layers = layers

    def check_names(self, names):
        if not isinstance(self.layers, dict):
            return
        unknown = sorted(set(self.layers) - set(names))
        if unknown:
            raise ValueError(
                f"`layers` names {unknown}, which are not recurrent layers of "
                f"the model. Its LSTM/GRU layers are: {sorted(names)}."
            )

    def schemes_for(self, layer, names):
        """``(input_scheme, recurrent_scheme)`` or ``None`` to keep it."""
        if self.layers is None:
            return self.defaults
        if callable(self.layers):
            spec = self.layers(layer)
        else:
            hits = [n for n in names if n in self.layers]
            if not hits:
                return None
            spec = self.layers[hits[0]]
        if spec is None:
            return None
        if isinstance(spec, dict):
            unknown = set(spec) - {"input_scheme", "recurrent_scheme"}
            if unknown:
                raise ValueError(
                    f"Spec for layer '{layer.name}' has unknown keys "
                    f"{sorted(unknown)}; expected 'input_scheme' and/or "
                    "'recurrent_scheme'."
                )
            spec = (
                spec.get("input_scheme", self.defaults[0]),
                spec.get("recurrent_scheme", self.defaults[1]),
            )
        if not (isinstance(spec, (tuple, list)) and len(spec) == 2):
            raise ValueError(
                f"Spec for layer '{layer.name}' must be None, a dict or an "
                f"(input_scheme, recurrent_scheme) pair. Received: {spec!r}"
            )
        return tuple(schemes_lib.get(s) for s in spec)


def _recurrent_twin(layer):
    return _LAYER_TWINS.get(type(layer))


def _rnn_cells(layer):
    """The cells of a plain ``keras.layers.RNN`` if all have twins."""
    if type(layer) is not keras.layers.RNN:
        return None
    cell = layer.cell
    cells = cell.cells if isinstance(cell, keras.layers.StackedRNNCells) else [
        cell
    ]
    if all(type(c) in _CELL_TWINS for c in cells):
        return cells
    return None


def _recurrent_names(model):
    names = []
    for layer in model.layers:
        if _keras.is_graph_model(layer):
            names += _recurrent_names(layer)
        elif isinstance(layer, keras.layers.Bidirectional):
            if _recurrent_twin(layer.forward_layer) is not None:
                names += [
                    layer.name,
                    layer.forward_layer.name,
                    layer.backward_layer.name,
                ]
        elif _recurrent_twin(layer) is not None or _rnn_cells(layer):
            names.append(layer.name)
    return names


def _structured_config(config, schemes):
    config = {k: v for k, v in config.items() if k not in _DROPPED_KEYS}
    config["input_scheme"], config["recurrent_scheme"] = schemes
    return config


def _clone_layer(layer, policy):
    if isinstance(layer, keras.layers.Bidirectional):
        fwd, bwd = layer.forward_layer, layer.backward_layer
        if _recurrent_twin(fwd) is None:
            return _plain_clone(layer)
        schemes = policy.schemes_for(fwd, [layer.name, fwd.name, bwd.name])
        if schemes is None:
            return _plain_clone(layer)
        return keras.layers.Bidirectional(
            _structured_twin(fwd, schemes),
            backward_layer=_structured_twin(bwd, schemes),
            merge_mode=layer.merge_mode,
            name=layer.name,
        )
    if _recurrent_twin(layer) is not None:
        schemes = policy.schemes_for(layer, [layer.name])
        if schemes is not None:
            return _structured_twin(layer, schemes)
    cells = _rnn_cells(layer)
    if cells:
        schemes = policy.schemes_for(layer, [layer.name])
        if schemes is not None:
            new_cells = [
                _CELL_TWINS[type(c)](
                    **_structured_config(c.get_config(), schemes)
                )
                for c in cells
            ]
            config = layer.get_config()
            config.pop("cell")
            cell = (
                keras.layers.StackedRNNCells(new_cells)
                if len(cells) > 1 or isinstance(
                    layer.cell, keras.layers.StackedRNNCells
                )
                else new_cells[0]
            )
            return keras.layers.RNN(cell, **config)
    return _plain_clone(layer)


def _plain_clone(layer):
    return layer.__class__.from_config(layer.get_config())


def _structured_twin(layer, schemes):
    twin = _recurrent_twin(layer)
    return twin(**_structured_config(layer.get_config(), schemes))


def _stock_weights(cell):
    """``(kernel, recurrent_kernel, bias)`` of a stock or structured cell."""
    if hasattr(cell, "stock_weights"):
        return cell.stock_weights()
    bias = None if cell.bias is None else ops.convert_to_numpy(cell.bias)
    return (
        ops.convert_to_numpy(cell.kernel),
        ops.convert_to_numpy(cell.recurrent_kernel),
        bias,
    )


def _copy_weights(old, new):
    """Copies ``old``'s weights into its clone ``new``.

    Returns:
        ``[(old cell, new structured cell)]`` set through `from_dense`.
    """
    if _keras.is_graph_model(new) or not isinstance(new, keras.layers.Layer):
        # Nested models are copied layer by layer; ops have no weights.
        return []
    if isinstance(new, keras.layers.Bidirectional) and isinstance(
        new.forward_layer, (StructuredLSTM, StructuredGRU)
    ):
        pairs = []
        for o, n in ((old.forward_layer, new.forward_layer),
                     (old.backward_layer, new.backward_layer)):
            n.cell.set_stock_weights(*_stock_weights(o.cell))
            pairs.append((o.cell, n.cell))
        return pairs
    if isinstance(new, (StructuredLSTM, StructuredGRU)):
        new.cell.set_stock_weights(*_stock_weights(old.cell))
        return [(old.cell, new.cell)]
    if isinstance(new, keras.layers.RNN) and _cells_of(new) and any(
        isinstance(c, (StructuredLSTMCell, StructuredGRUCell))
        for c in _cells_of(new)
    ):
        for o, n in zip(_cells_of(old), _cells_of(new)):
            n.set_stock_weights(*_stock_weights(o))
        return list(zip(_cells_of(old), _cells_of(new)))
    new.set_weights(old.get_weights())
    return []


def _cells_of(rnn):
    cell = rnn.cell
    if isinstance(cell, keras.layers.StackedRNNCells):
        return list(cell.cells)
    return [cell]


def _compress_layer(layer, policy):
    """`compress` of a single recurrent layer: ``(new layer, [(old cell,
    new cell)])``."""
    schemes = policy.schemes_for(layer, [layer.name])
    if schemes is None:
        return _plain_clone(layer), []
    new = _structured_twin(layer, schemes)
    if not layer.built:
        return new, []
    kernel, recurrent_kernel, bias = _stock_weights(layer.cell)
    new.build((None, None, np.shape(kernel)[0]))
    new.cell.set_stock_weights(kernel, recurrent_kernel, bias)
    return new, [(layer.cell, new.cell)]

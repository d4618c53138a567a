"""Structured LSTM and GRU layers: one scheme per matrix product.

`StructuredLSTM` and `StructuredGRU` take the arguments and behaviour of
`keras.layers.LSTM` / `keras.layers.GRU` (gate order, bias layout, masking,
dropout, states, ``go_backwards``, ``stateful``) plus an ``input_scheme`` for
the fused input product (``n_x -> 4h``, or ``3h`` for a GRU) and a
``recurrent_scheme`` for the fused recurrent product (``h -> 4h`` / ``3h``).
With `Dense` schemes they compute exactly what the stock layers compute.

The layers project the input for all timesteps at once (one big product
outside the time loop) and run only the recurrent product per step; that is
both what the compiled kernel does and what makes plain TF fast here.
"""

import warnings

import numpy as np

from keras_antman import _keras
from keras_antman import ops as compiled_ops
from keras_antman import schemes as schemes_lib
from keras_antman._keras import activations
from keras_antman._keras import constraints
from keras_antman._keras import initializers
from keras_antman._keras import keras
from keras_antman._keras import ops
from keras_antman._keras import regularizers
from keras_antman._keras import tree

_PACKAGE = "keras_antman"
KERNEL_CHOICES = ("auto", "compiled", "portable")
# Constructor arguments that belong to the cell, not to the RNN layer.
_CELL_ARGS = (
    "input_scheme", "recurrent_scheme", "activation", "recurrent_activation",
    "use_bias", "kernel_initializer", "recurrent_initializer",
    "bias_initializer", "kernel_regularizer", "recurrent_regularizer",
    "bias_regularizer", "kernel_constraint", "recurrent_constraint",
    "bias_constraint", "dropout", "recurrent_dropout", "seed",
    "unit_forget_bias", "reset_after",
)


_warned = []


def _warn_portable_once():
    if not _warned:
        _warned.append(True)
        warnings.warn(
            "keras-antman: the compiled CPU op is not available, so "
            "structured layers run on stock TF ops (slower inference). "
            + compiled_ops.HOW_TO_BUILD,
            RuntimeWarning,
            stacklevel=3,
        )


def _zeros(shape):
    return ops.zeros(shape, dtype="float32")


def _schemes_from_config(config, cls):
    """``config`` with its scheme entries deserialized; a bad scheme entry
    (an edited file) raises a ValueError naming the layer and the entry."""
    config = dict(config)
    for key in ("input_scheme", "recurrent_scheme"):
        try:
            config[key] = schemes_lib.get(config.get(key))
        except ValueError as e:
            raise ValueError(
                f"{cls.__name__} '{config.get('name')}': `{key}` of its "
                f"config is invalid: {e}"
            ) from None
    return config


def _check_rate(name, value):
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"`{name}` must be in [0, 1). Received: {name}={value}"
        )
    return float(value)


class _StructuredCell(keras.layers.Layer, _keras.DropoutRNNCell):
    """What the LSTM and GRU cells share: schemes, bias, dropout, config.

    Subclasses set ``gates`` (4 or 3), build their products in `build` and
    implement `recurrent_step`, which takes the input projection of one
    step (bias included) instead of the raw input.
    """

    gates = None

    def __init__(
        self,
        units,
        input_scheme=None,
        recurrent_scheme=None,
        activation="tanh",
        recurrent_activation="sigmoid",
        use_bias=True,
        kernel_initializer="glorot_uniform",
        recurrent_initializer="orthogonal",
        bias_initializer="zeros",
        kernel_regularizer=None,
        recurrent_regularizer=None,
        bias_regularizer=None,
        kernel_constraint=None,
        recurrent_constraint=None,
        bias_constraint=None,
        dropout=0.0,
        recurrent_dropout=0.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(units, (int, np.integer)) or units < 1:
            raise ValueError(
                f"`units` must be a positive integer. Received: units={units}"
            )
        self.units = int(units)
        self.input_scheme = schemes_lib.get(input_scheme)
        self.recurrent_scheme = schemes_lib.get(recurrent_scheme)
        self.activation = activations.get(activation)
        self.recurrent_activation = activations.get(recurrent_activation)
        self.use_bias = use_bias
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.recurrent_initializer = initializers.get(recurrent_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.recurrent_regularizer = regularizers.get(recurrent_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.recurrent_constraint = constraints.get(recurrent_constraint)
        self.bias_constraint = constraints.get(bias_constraint)
        self.dropout = _check_rate("dropout", dropout)
        self.recurrent_dropout = _check_rate(
            "recurrent_dropout", recurrent_dropout
        )
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed=seed)
        # Name of the owning layer, for error messages; not in the config.
        self.owner = None

    def _bind(self, scheme, m, name, product, kind):
        """The `StructuredMatrix` of one product, with the cell's
        initializer, regularizer and constraint of that ``kind``."""
        where = self.owner or self.name
        return scheme.bind(
            m,
            name=name,
            context=f"{where}: {product} product",
            initializer=getattr(self, f"{kind}_initializer"),
            regularizer=getattr(self, f"{kind}_regularizer"),
            constraint=getattr(self, f"{kind}_constraint"),
            dtype=self.dtype_policy,
            # A cell built frozen (a frozen model's layer, rebuilt from its
            # config) makes frozen matrices: Keras freezes sublayers only
            # when the flag is set, not ones made later.
            trainable=self.trainable,
        )

    def _build_input(self, input_shape):
        self.input_matrix = self._bind(
            self.input_scheme, self.gates * self.units, "input_matrix",
            "input", "kernel",
        )
        self.input_matrix.build((None, int(input_shape[-1])))

    def _add_bias(self, shape, initializer=None):
        if not self.use_bias:
            self.bias = None
            return
        self.bias = self.add_weight(
            shape=shape,
            name="bias",
            initializer=initializer or self.bias_initializer,
            regularizer=self.bias_regularizer,
            constraint=self.bias_constraint,
        )

    def input_bias(self):
        """The bias added to the input projection (or ``None``)."""
        return self.bias

    def project_inputs(self, inputs):
        """Input product plus input bias, for one step or a whole sequence."""
        z = self.input_matrix(inputs)
        bias = self.input_bias()
        if bias is not None:
            z = z + bias
        return z

    def call(self, inputs, states, training=False):
        if training and 0.0 < self.dropout < 1.0:
            inputs = inputs * self.get_dropout_mask(inputs)
        return self.recurrent_step(
            self.project_inputs(inputs), states, training=training
        )

    def _recurrent_input(self, h_tm1, training):
        if training and 0.0 < self.recurrent_dropout < 1.0:
            return h_tm1 * self.get_recurrent_dropout_mask(h_tm1)
        return h_tm1

    def products(self):
        """``{product name: StructuredMatrix}`` of the built cell."""
        raise NotImplementedError

    def get_initial_state(self, batch_size=None, **kwargs):
        # tf_keras also passes ``inputs`` and ``dtype``.
        return [
            ops.zeros((batch_size, d), dtype=self.compute_dtype)
            for d in tree.flatten(self.state_size)
        ]

    def get_config(self):
        config = {
            "units": self.units,
            "input_scheme": keras.saving.serialize_keras_object(
                self.input_scheme
            ),
            "recurrent_scheme": keras.saving.serialize_keras_object(
                self.recurrent_scheme
            ),
            "activation": activations.serialize(self.activation),
            "recurrent_activation": activations.serialize(
                self.recurrent_activation
            ),
            "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(
                self.kernel_initializer
            ),
            "recurrent_initializer": initializers.serialize(
                self.recurrent_initializer
            ),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "kernel_regularizer": regularizers.serialize(
                self.kernel_regularizer
            ),
            "recurrent_regularizer": regularizers.serialize(
                self.recurrent_regularizer
            ),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": constraints.serialize(self.kernel_constraint),
            "recurrent_constraint": constraints.serialize(
                self.recurrent_constraint
            ),
            "bias_constraint": constraints.serialize(self.bias_constraint),
            "dropout": self.dropout,
            "recurrent_dropout": self.recurrent_dropout,
            "seed": self.seed,
        }
        return {**super().get_config(), **config}

    @classmethod
    def from_config(cls, config):
        return cls(**_schemes_from_config(config, cls))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StructuredLSTMCell(_StructuredCell):
    """LSTM cell whose two matrix products are structured schemes.

    Same equations, gate order (i, f, c, o) and bias as
    `keras.layers.LSTMCell`: ``z = x W + h U + b``, with ``x W`` computed by
    ``input_scheme`` (``n_x -> 4 units``) and ``h U`` by
    ``recurrent_scheme`` (``units -> 4 units``).

    Args:
        units: positive integer, dimensionality of the output space.
        input_scheme: a `Scheme` for the input product (default `Dense`).
        recurrent_scheme: a `Scheme` for the recurrent product
            (default `Dense`).
        unit_forget_bias: add 1 to the forget-gate bias at initialisation.
        **kwargs: the other arguments of `keras.layers.LSTMCell`.
    """

    gates = 4

    def __init__(self, units, unit_forget_bias=True, **kwargs):
        super().__init__(units, **kwargs)
        self.unit_forget_bias = unit_forget_bias
        self.state_size = [self.units, self.units]
        self.output_size = self.units

    def build(self, input_shape):
        super().build(input_shape)
        self._build_input(input_shape)
        self.recurrent_matrix = self._bind(
            self.recurrent_scheme, 4 * self.units, "recurrent_matrix",
            "recurrent", "recurrent",
        )
        self.recurrent_matrix.build((None, self.units))
        initializer = None
        if self.unit_forget_bias:
            units, base = self.units, self.bias_initializer

            def initializer(_, *args, **kwargs):
                return ops.concatenate(
                    [
                        base((units,), *args, **kwargs),
                        initializers.get("ones")((units,), *args, **kwargs),
                        base((2 * units,), *args, **kwargs),
                    ]
                )

        self._add_bias((4 * self.units,), initializer)

    def products(self):
        return {"input": self.input_matrix, "recurrent": self.recurrent_matrix}

    def recurrent_step(self, z_input, states, training=False):
        """One step given the step's input projection ``x W + b``."""
        h_tm1, c_tm1 = states[0], states[1]
        z = z_input + self.recurrent_matrix(
            self._recurrent_input(h_tm1, training)
        )
        z_i, z_f, z_c, z_o = ops.split(z, 4, axis=-1)
        i = self.recurrent_activation(z_i)
        f = self.recurrent_activation(z_f)
        c = f * c_tm1 + i * self.activation(z_c)
        o = self.recurrent_activation(z_o)
        h = o * self.activation(c)
        return h, [h, c]

    def stock_weights(self):
        """``(kernel, recurrent_kernel, bias)`` as stock-LSTM numpy arrays."""
        bias = None if self.bias is None else ops.convert_to_numpy(self.bias)
        return (
            self.input_matrix.to_dense(),
            self.recurrent_matrix.to_dense(),
            bias,
        )

    def set_stock_weights(self, kernel, recurrent_kernel, bias=None):
        """Initialise every product from stock-LSTM weights (`from_dense`)."""
        self.input_matrix.from_dense(kernel)
        self.recurrent_matrix.from_dense(recurrent_kernel)
        if self.bias is not None and bias is not None:
            self.bias.assign(np.asarray(bias, dtype="float32"))

    def get_config(self):
        return {
            **super().get_config(),
            "unit_forget_bias": self.unit_forget_bias,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StructuredGRUCell(_StructuredCell):
    """GRU cell whose matrix products are structured schemes.

    Same equations, gate order (z, r, h) and bias as `keras.layers.GRUCell`.
    With ``reset_after=True`` (the default, as in Keras) ``recurrent_scheme``
    covers the whole fused recurrent product ``units -> 3 units``. With
    ``reset_after=False`` the reset gate multiplies ``h`` *before* the
    candidate's product, so the recurrent product is split in two products of
    the same scheme: ``units -> 2 units`` (update and reset gates) and
    ``units -> units`` (the candidate, applied to ``r * h``).

    Args:
        units: positive integer, dimensionality of the output space.
        reset_after: GRU convention (see above).
        **kwargs: the other arguments of `StructuredLSTMCell`.
    """

    gates = 3

    def __init__(self, units, reset_after=True, **kwargs):
        super().__init__(units, **kwargs)
        self.reset_after = reset_after
        self.state_size = self.units
        self.output_size = self.units

    def build(self, input_shape):
        super().build(input_shape)
        self._build_input(input_shape)
        h = self.units
        if self.reset_after:
            self.recurrent_matrix = self._bind(
                self.recurrent_scheme, 3 * h, "recurrent_matrix",
                "recurrent", "recurrent",
            )
            self.candidate_matrix = None
        else:
            self.recurrent_matrix = self._bind(
                self.recurrent_scheme, 2 * h, "recurrent_matrix",
                "recurrent (update and reset gates)", "recurrent",
            )
            self.candidate_matrix = self._bind(
                self.recurrent_scheme, h, "candidate_matrix",
                "recurrent (candidate)", "recurrent",
            )
            self.candidate_matrix.build((None, h))
        self.recurrent_matrix.build((None, h))
        self._add_bias((2, 3 * h) if self.reset_after else (3 * h,))

    def products(self):
        out = {"input": self.input_matrix, "recurrent": self.recurrent_matrix}
        if self.candidate_matrix is not None:
            out["candidate"] = self.candidate_matrix
        return out

    def input_bias(self):
        if self.bias is None or not self.reset_after:
            return self.bias
        return self.bias[0]

    def recurrent_step(self, z_input, states, training=False):
        """One step given the step's input projection ``x W + b_input``."""
        h_tm1 = states[0] if tree.is_nested(states) else states
        h_in = self._recurrent_input(h_tm1, training)
        x_z, x_r, x_h = ops.split(z_input, 3, axis=-1)
        inner = self.recurrent_matrix(h_in)
        if self.reset_after and self.bias is not None:
            inner = inner + self.bias[1]
        if self.reset_after:
            rec_z, rec_r, rec_h = ops.split(inner, 3, axis=-1)
        else:
            rec_z, rec_r = ops.split(inner, 2, axis=-1)
        z = self.recurrent_activation(x_z + rec_z)
        r = self.recurrent_activation(x_r + rec_r)
        if self.reset_after:
            rec_h = r * rec_h
        else:
            rec_h = self.candidate_matrix(r * h_in)
        hh = self.activation(x_h + rec_h)
        h = z * h_tm1 + (1 - z) * hh
        return h, ([h] if tree.is_nested(states) else h)

    def stock_weights(self):
        """``(kernel, recurrent_kernel, bias)`` as stock-GRU numpy arrays."""
        rec = self.recurrent_matrix.to_dense()
        if self.candidate_matrix is not None:
            rec = np.concatenate([rec, self.candidate_matrix.to_dense()], 1)
        bias = None if self.bias is None else ops.convert_to_numpy(self.bias)
        return self.input_matrix.to_dense(), rec, bias

    def set_stock_weights(self, kernel, recurrent_kernel, bias=None):
        """Initialise every product from stock-GRU weights (`from_dense`)."""
        self.input_matrix.from_dense(kernel)
        recurrent_kernel = np.asarray(recurrent_kernel)
        if self.candidate_matrix is None:
            self.recurrent_matrix.from_dense(recurrent_kernel)
        else:
            h = self.units
            self.recurrent_matrix.from_dense(recurrent_kernel[:, : 2 * h])
            self.candidate_matrix.from_dense(recurrent_kernel[:, 2 * h :])
        if self.bias is not None and bias is not None:
            self.bias.assign(np.asarray(bias, dtype="float32"))

    def get_config(self):
        return {**super().get_config(), "reset_after": self.reset_after}


class _StructuredRNN(_keras.RNN):
    """The time loop shared by `StructuredLSTM` and `StructuredGRU`.

    The input product runs once over the whole sequence, then
    Keras's own time loop (``_keras.rnn``: masks: masks, ``go_backwards``,
    ``unroll``) runs the recurrent step. With ``kernel="auto"`` or
    ``"compiled"`` inference goes through the compiled op when it applies.
    """

    cell_class = None

    def __init__(
        self,
        units,
        return_sequences=False,
        return_state=False,
        go_backwards=False,
        stateful=False,
        unroll=False,
        kernel="auto",
        activity_regularizer=None,
        **kwargs,
    ):
        if kernel not in KERNEL_CHOICES:
            raise ValueError(
                f"`kernel` must be one of {KERNEL_CHOICES}. Received: "
                f"kernel={kernel!r}"
            )
        cell_kwargs = {k: kwargs.pop(k) for k in _CELL_ARGS if k in kwargs}
        cell = self.cell_class(
            units,
            name="cell",
            dtype=kwargs.get("dtype"),
            trainable=kwargs.get("trainable", True),
            **cell_kwargs,
        )
        super().__init__(
            cell,
            return_sequences=return_sequences,
            return_state=return_state,
            go_backwards=go_backwards,
            stateful=stateful,
            unroll=unroll,
            activity_regularizer=activity_regularizer,
            **kwargs,
        )
        self.input_spec = keras.layers.InputSpec(ndim=3)
        self.kernel = kernel
        self.cell.owner = self.name

    def inner_loop(self, sequences, initial_state, mask, training=False):
        if tree.is_nested(mask):
            mask = mask[0]
        if not training and self.kernel != "portable":
            result = self._compiled_loop(sequences, initial_state, mask)
            if result is not None:
                return result
        cell = self.cell
        if training and 0.0 < cell.dropout < 1.0:
            dp_mask = cell.get_dropout_mask(sequences[:, 0, :])
            sequences = sequences * ops.expand_dims(dp_mask, 1)
        projected = cell.project_inputs(sequences)

        def step(z, states):
            output, new_states = cell.recurrent_step(z, states, training)
            if not tree.is_nested(new_states):
                new_states = [new_states]
            return output, new_states

        if not tree.is_nested(initial_state):
            initial_state = [initial_state]
        return _keras.rnn(
            step,
            projected,
            initial_state,
            go_backwards=self.go_backwards,
            mask=mask,
            unroll=self.unroll,
            input_length=sequences.shape[1],
            zero_output_for_mask=self.zero_output_for_mask,
            return_all_outputs=self.return_sequences,
        )

    def call(self, sequences, initial_state=None, mask=None, training=False):
        return super().call(
            sequences, mask=mask, training=training, initial_state=initial_state
        )

    def compiled_blockers(self, mask=None):
        """Why the compiled op cannot run this layer (empty if it can)."""
        return self._lowering(mask)[0]

    def _lowering(self, mask):
        """``(reasons the op cannot run this layer, {product: stages})``."""
        cell = self.cell
        lowered = {}
        reasons = []
        if mask is not None:
            reasons.append("a mask was given (the op has no masking)")
        if activations.serialize(cell.activation) != "tanh":
            reasons.append("activation is not tanh")
        if activations.serialize(cell.recurrent_activation) != "sigmoid":
            reasons.append("recurrent_activation is not sigmoid")
        if self.compute_dtype != "float32":
            reasons.append(f"dtype is {self.compute_dtype}, not float32")
        for name, matrix in cell.products().items():
            try:
                stages = matrix.kernel_stages()
            except NotImplementedError as e:
                reasons.append(f"the {name} product: {e}")
                continue
            lowered[name] = stages
            last = compiled_ops.lowered_stages(stages)[-1]
            groups = int(last.blocks.shape[0])
            if name != "input" and last.shuffle and cell.units % groups:
                # The op gives each group of a shuffling last stage every
                # gate of its units.
                reasons.append(
                    f"the {name} product's last stage shuffles {groups} "
                    f"groups, which do not divide units = {cell.units}")
        return reasons, lowered

    def _compiled_loop(self, sequences, initial_state, mask):
        """The inference loop on the compiled op, or None to use TF ops."""
        reasons, stages = self._lowering(mask)
        if reasons:
            if self.kernel == "compiled":
                raise ValueError(
                    f"`{self.name}`: kernel='compiled' cannot run this layer: "
                    f"{'; '.join(reasons)}. Use kernel='auto' or 'portable'."
                )
            return None
        if self.kernel == "compiled":
            compiled_ops.load()  # raises CompiledOpsUnavailableError
        elif not compiled_ops.is_available():
            if not compiled_ops.portable_forced():
                _warn_portable_once()
            return None
        cell = self.cell
        bias = cell.bias
        if bias is None:
            shape = (2, 3 * cell.units) if getattr(
                cell, "reset_after", False) else (cell.gates * cell.units,)
            bias = _zeros(shape)
        common = dict(
            input_stages=stages["input"],
            recurrent_stages=stages["recurrent"],
            go_backwards=self.go_backwards,
            return_sequences=self.return_sequences,
        )
        if isinstance(cell, StructuredLSTMCell):
            output, h, c = compiled_ops.structured_lstm(
                sequences, initial_state[0], initial_state[1], bias, **common
            )
            states = [h, c]
        else:
            output, h = compiled_ops.structured_gru(
                sequences, initial_state[0], bias,
                candidate_stages=stages.get("candidate"),
                reset_after=cell.reset_after, **common
            )
            states = [h]
        last = output[:, -1] if self.return_sequences else output
        return last, output, states

    def products(self):
        """``{product name: StructuredMatrix}`` (built layers only)."""
        return self.cell.products()

    def stock_weights(self):
        """The stock layer's ``(kernel, recurrent_kernel, bias)``."""
        return self.cell.stock_weights()

    def get_prunable_weights(self):
        """The trainable weights of every structured product, not the bias:
        tfmot's ``PrunableLayer`` interface (tfmot finds the method; it is
        not imported), so ``prune_low_magnitude`` prunes them."""
        return [w for matrix in self.products().values()
                for w in matrix.trainable_weights]

    def set_stock_weights(self, kernel, recurrent_kernel, bias=None):
        """Initialise every product from the stock layer's weights."""
        self.cell.set_stock_weights(kernel, recurrent_kernel, bias)

    def get_config(self):
        config = super().get_config()
        cell_config = config.pop("cell")["config"]
        for key in ("name", "dtype", "trainable"):
            cell_config.pop(key, None)
        config.update(cell_config)
        config["kernel"] = self.kernel
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**_schemes_from_config(config, cls))


def _cell_property(name):
    return property(
        lambda self: getattr(self.cell, name),
        doc=f"The cell's `{name}` (read-only).",
    )


# Cell arguments and products read as layer attributes, as on keras LSTM.
for _name in (
    "units", "input_scheme", "recurrent_scheme", "activation",
    "recurrent_activation", "use_bias", "dropout", "recurrent_dropout",
    "input_matrix", "recurrent_matrix", "bias",
):
    setattr(_StructuredRNN, _name, _cell_property(_name))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StructuredLSTM(_StructuredRNN):
    """Long Short-Term Memory layer with structured matrix products.

    A drop-in `keras.layers.LSTM` (same arguments, gate order, bias,
    masking, dropout, states) whose fused input product ``n_x -> 4 units``
    uses ``input_scheme`` and whose fused recurrent product
    ``units -> 4 units`` uses ``recurrent_scheme``. With `Dense` schemes it
    computes what `keras.layers.LSTM` computes.

    Args:
        units: positive integer, dimensionality of the output space.
        input_scheme: `Scheme` of the input product (default `Dense`).
        recurrent_scheme: `Scheme` of the recurrent product (default
            `Dense`).
        kernel: ``"auto"`` runs inference on the compiled CPU op when it is
            loaded and applies (sigmoid/tanh activations, no mask), else
            plain TF ops; ``"compiled"`` requires the op; ``"portable"``
            always uses plain TF ops. Training always uses plain TF ops.
        **kwargs: every other argument of `keras.layers.LSTM`
            (``return_sequences``, ``return_state``, ``go_backwards``,
            ``stateful``, ``unroll``, ``dropout``, ``recurrent_dropout``,
            initializers, regularizers, constraints, ``seed``...).

    Call arguments:
        sequences: a 3-D tensor ``[batch, timesteps, features]``.
        initial_state: list of the initial ``[h, c]`` states.
        mask: boolean ``[batch, timesteps]`` tensor.
        training: whether dropout applies.

    Example:

    >>> import keras_antman as am
    >>> layer = am.StructuredLSTM(
    ...     64, input_scheme=am.LGPShuffle(8),
    ...     recurrent_scheme=am.LowRankLGP(4, 4, 2))
    >>> y = layer(np.zeros((2, 5, 32), "float32"))
    """

    cell_class = StructuredLSTMCell


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StructuredGRU(_StructuredRNN):
    """Gated Recurrent Unit layer with structured matrix products.

    A drop-in `keras.layers.GRU` whose fused input product
    ``n_x -> 3 units`` uses ``input_scheme`` and whose recurrent product
    uses ``recurrent_scheme`` (one ``units -> 3 units`` product with
    ``reset_after=True``; ``units -> 2 units`` plus ``units -> units`` with
    ``reset_after=False``, see `StructuredGRUCell`).

    Args:
        units: positive integer, dimensionality of the output space.
        input_scheme: `Scheme` of the input product (default `Dense`).
        recurrent_scheme: `Scheme` of the recurrent product(s).
        reset_after: GRU convention, as in `keras.layers.GRU`.
        kernel: ``"auto"``, ``"compiled"`` or ``"portable"``, as in
            `StructuredLSTM`.
        **kwargs: every other argument of `keras.layers.GRU`.
    """

    cell_class = StructuredGRUCell

    reset_after = _cell_property("reset_after")
    candidate_matrix = _cell_property("candidate_matrix")

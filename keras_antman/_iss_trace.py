"""Tracing of ISS components through a Keras model (used by `iss`).

A *unit space* is the hidden dimension of a recurrent layer (or of several
layers tied together: an LSTM whose final states are another one's
``initial_state`` shares its units with it). Its component ``k`` is every
weight that reads or writes unit ``k`` (Wen et al., section 3):

* columns ``g * h + k`` of the input kernel and of the recurrent kernel(s),
  one per gate block ``g`` (4 for an LSTM, 3 for a GRU);
* row ``k`` of the recurrent kernel(s);
* row ``offset + k`` of the kernel of every layer that consumes the
  layer's output (the next recurrent layer, a ``Dense`` or
  ``TimeDistributed(Dense)`` head), where ``offset`` is the unit's slot
  in a concatenation (the backward half of a ``Bidirectional`` concat).

The trace walks the Functional graph (or the Sequential order) and follows
each unit-indexed tensor through layers that act on every feature position
separately (dropout, elementwise activations); anything else that reads
such a tensor raises a ``ValueError`` naming the layer.
"""

import dataclasses

from keras_antman import _keras
from keras_antman import schemes as schemes_lib
from keras_antman._keras import keras
from keras_antman.layers import StructuredGRUCell
from keras_antman.layers import StructuredLSTMCell

# Layers that act on each feature position on its own (no mixing), so that
# unit k of their input is feature k of their output.
_PER_UNIT = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.Identity,
)
# Activation functions that are elementwise (``Activation(name)``).
_ELEMENTWISE = {
    "linear", "relu", "relu6", "tanh", "sigmoid", "hard_sigmoid", "elu",
    "selu", "gelu", "silu", "swish", "softplus", "softsign", "exponential",
    "leaky_relu", "mish", "hard_silu", "hard_swish", "celu", "glu_",
    "log_sigmoid", "hard_tanh", "soft_shrink", "hard_shrink", "tanh_shrink",
    "squareplus", "sparse_plus",
}
_STOCK_RNN = (keras.layers.LSTM, keras.layers.GRU)


@dataclasses.dataclass(eq=False, repr=False)
class Space:
    """A set of ``units`` hidden units removed together."""

    units: int
    rnns: list = dataclasses.field(default_factory=list)
    parent: "Space" = None

    def root(self):
        s = self
        while s.parent is not None:
            s = s.parent
        return s


@dataclasses.dataclass(eq=False, repr=False)
class Rnn:
    """One recurrent layer (a ``Bidirectional`` direction is one).

    Attributes:
        layer: the LSTM/GRU (stock or structured) layer.
        key: its name in logs (``"lstm"``, ``"bidi/forward"``).
        owner: the layer of the model (the ``Bidirectional`` for a
            direction).
        gates: 4 (LSTM) or 3 (GRU).
        kernel: the input kernel variable ``[n, gates * h]``.
        recurrent: ``[(variable, blocks)]``: the recurrent kernel(s); a GRU
            with ``reset_after=False`` and structured layers split it.
        bias: the bias variable or ``None``.
        space: its unit `Space`, or ``None`` if ISS does not prune it (it is
            then only a consumer of its input).
        inputs: the segments of its input (``[(space or None, width)]``).
    """

    layer: object
    key: str
    owner: object
    gates: int
    kernel: object
    recurrent: list
    bias: object
    space: Space = None
    inputs: tuple = ()

    @property
    def units(self):
        return self.layer.units


@dataclasses.dataclass(eq=False, repr=False)
class Trace:
    """What `trace` found: recurrent layers, spaces and weight parts.

    Attributes:
        rnns: every traced recurrent layer (pruned ones and consumers).
        spaces: the root unit spaces, in model order.
        rows: ``{id(variable): [(offset, space)]}`` rows owned by units.
        cols: ``{id(variable): [(space, blocks)]}`` gate columns of units.
        variables: ``{id(variable): variable}`` for the two maps above.
    """

    rnns: list
    spaces: list
    rows: dict
    cols: dict
    variables: dict


def rnn_weights(layer, context):
    """``(gates, kernel, [(recurrent variable, blocks)], bias)``.

    Raises:
        ValueError: for a structured layer whose schemes are not `Dense`.
    """
    cell = layer.cell
    if isinstance(cell, (StructuredLSTMCell, StructuredGRUCell)):
        bad = {
            name: m.describe() for name, m in cell.products().items()
            if not isinstance(m.scheme, schemes_lib.Dense)
        }
        if bad:
            raise ValueError(
                f"`{layer.name}` ({context}): ISS needs Dense schemes, since "
                "it removes whole hidden units from dense kernels; this layer "
                f"has {', '.join(f'{k}={v}' for k, v in bad.items())}. Run "
                "ISS on the dense model (before `compress`), or exclude the "
                "layer with `layers=`."
            )
        rec = [(cell.recurrent_matrix.kernel, 4 if cell.gates == 4 else (
            3 if cell.candidate_matrix is None else 2))]
        if getattr(cell, "candidate_matrix", None) is not None:
            rec.append((cell.candidate_matrix.kernel, 1))
        return cell.gates, cell.input_matrix.kernel, rec, cell.bias
    gates = 4 if isinstance(layer, keras.layers.LSTM) else 3
    return gates, cell.kernel, [(cell.recurrent_kernel, gates)], cell.bias


def is_rnn(layer):
    """Whether ISS knows this recurrent layer (stock or structured)."""
    cell = getattr(layer, "cell", None)
    return isinstance(layer, _STOCK_RNN) or isinstance(
        cell, (StructuredLSTMCell, StructuredGRUCell)
    )


def is_per_unit(layer):
    if type(layer) in _PER_UNIT:
        return True
    if type(layer) is keras.layers.Activation:
        name = keras.activations.serialize(layer.activation)
        return isinstance(name, str) and name in _ELEMENTWISE
    return False


def model_calls(model):
    """The layer calls of a model: ``[(layer, args, kwargs, outputs)]``.

    Tensors are compared by identity. A Sequential model is a chain; a
    Functional one is read from its graph of nodes (`_keras.layer_calls`:
    Keras has no public API listing the calls of a Functional model).

    Returns:
        ``(calls, inputs, outputs)``.
    """
    if isinstance(model, keras.Sequential):
        tensors = [object() for _ in range(len(model.layers) + 1)]
        calls = [
            (layer, (tensors[i],), {}, [tensors[i + 1]])
            for i, layer in enumerate(model.layers)
        ]
        return calls, [tensors[0]], [tensors[-1]]
    return _keras.layer_calls(model), list(model.inputs), list(model.outputs)


def _flat(obj):
    if isinstance(obj, (list, tuple)):
        return [y for x in obj for y in _flat(x)]
    if isinstance(obj, dict):
        return [y for x in obj.values() for y in _flat(x)]
    return [obj]


def _width(tensor):
    shape = getattr(tensor, "shape", None)
    return None if shape is None else shape[-1]


def trace(model, layers=None):
    """Find every ISS component of ``model`` (see the module docstring).

    Args:
        model: a built Sequential or Functional model.
        layers: names of the recurrent layers to prune (a ``Bidirectional``
            by its own name); ``None`` for all.

    Returns:
        A `Trace`.

    Raises:
        ValueError: naming the layer, for an arrangement that cannot be
            traced.
    """
    if not _keras.is_graph_model(model):
        raise ValueError(
            "ISS needs a Sequential or Functional keras.Model. Received: "
            f"{type(model).__name__}. For a subclassed model, build it as a "
            "Functional model."
        )
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built: call it on data first."
        )
    calls, inputs, outputs = model_calls(model)
    seg = {}  # id(tensor) -> [(space or None, width)]
    rnns, spaces, by_layer = [], [], {}
    rows, cols, variables = {}, {}, {}

    def traced(t):
        s = seg.get(id(t))
        return s if s and any(sp is not None for sp, _ in s) else None

    def add_rows(var, segments):
        off = 0
        for space, width in segments:
            if space is not None:
                rows.setdefault(id(var), []).append((off, space))
                variables[id(var)] = var
            off += width

    def new_rnn(layer, key, owner, selected):
        if id(layer) in by_layer:
            return by_layer[id(layer)]
        gates, kernel, rec, bias = rnn_weights(layer, key)
        r = Rnn(layer, key, owner, gates, kernel, rec, bias)
        if selected:
            r.space = Space(layer.units, [r])
            spaces.append(r.space)
            cols.setdefault(id(kernel), []).append((r.space, gates))
            variables[id(kernel)] = kernel
            for var, blocks in rec:
                cols.setdefault(id(var), []).append((r.space, blocks))
                rows.setdefault(id(var), []).append((0, r.space))
                variables[id(var)] = var
        by_layer[id(layer)] = r
        rnns.append(r)
        return r

    def untraceable(layer, why):
        raise ValueError(
            "ISS cannot trace the hidden units of the recurrent layers "
            f"through `{getattr(layer, 'name', '?')}` "
            f"({type(layer).__name__}): {why} "
            "ISS follows units into Dense / TimeDistributed(Dense) heads, "
            "recurrent layers (LSTM, GRU, Bidirectional concat or None), "
            "Concatenate on the last axis, and per-unit layers (Dropout, "
            "elementwise Activation). Exclude the producing layer with "
            "`layers=` or restructure the model."
        )

    def tie(space, state, layer):
        s = traced(state)
        if s is None:
            return
        if len(s) != 1 or s[0][1] != space.units:
            untraceable(layer, "its initial_state mixes units of several "
                        "layers or has another width.")
        a, b = s[0][0].root(), space.root()
        if a is not b:
            if a.units != b.units:
                untraceable(layer, "its initial_state comes from a layer "
                            "with a different number of units.")
            b.parent = a
            a.rnns += b.rnns

    fed = set()  # layers already called on unit tensors
    for layer, args, kwargs, outs in calls:
        flat_in = _flat((args, kwargs))
        has_traced = [t for t in flat_in if traced(t) is not None]
        if has_traced:
            if id(layer) in fed:
                untraceable(layer, "it is shared: called on the units of "
                            "recurrent layers more than once, its rows "
                            "would serve several units at once.")
            fed.add(id(layer))
        bidi = isinstance(layer, keras.layers.Bidirectional)
        if bidi or is_rnn(layer):
            wanted = layers is None or layer.name in layers
            if not wanted and not has_traced:
                continue
            if bidi:
                if not is_rnn(layer.forward_layer):
                    if has_traced:
                        untraceable(layer, "it wraps an unsupported layer.")
                    continue
                if layer.merge_mode not in ("concat", None):
                    if has_traced or wanted:
                        untraceable(
                            layer,
                            f"merge_mode='{layer.merge_mode}' adds the two "
                            "directions' units together; use "
                            "merge_mode='concat' (or None).",
                        )
                    continue
                dirs = [
                    new_rnn(layer.forward_layer, f"{layer.name}/forward",
                            layer, wanted),
                    new_rnn(layer.backward_layer, f"{layer.name}/backward",
                            layer, wanted),
                ]
            else:
                dirs = [new_rnn(layer, layer.name, layer, wanted)]
            seq = args[0] if args else kwargs.get("sequences")
            if kwargs.get("mask") is not None and traced(kwargs["mask"]):
                untraceable(layer, "a unit tensor is used as a mask.")
            in_seg = traced(seq) or [(None, dirs[0].kernel.shape[0])]
            for r in dirs:
                r.inputs = tuple(in_seg)
                add_rows(r.kernel, in_seg)
            init = kwargs.get("initial_state")
            if init is None and len(args) > 1:
                init = args[1]
            if init is not None:
                states = _flat(init)
                per = len(states) // len(dirs)
                for i, r in enumerate(dirs):
                    for st in states[i * per:(i + 1) * per]:
                        if r.space is None:
                            if traced(st) is not None:
                                untraceable(layer, "a unit tensor feeds its "
                                            "initial_state but it is not "
                                            "pruned.")
                        else:
                            tie(r.space, st, layer)
            # Outputs: the sequence output(s), then the states.
            n_states = (2 if dirs[0].gates == 4 else 1) if getattr(
                layer, "return_state", False) else 0
            if bidi and layer.merge_mode == "concat":
                main = [[(r.space, r.units) for r in dirs]]
            else:
                main = [[(r.space, r.units)] for r in dirs]
            state_segs = [
                [(r.space, r.units)] for r in dirs for _ in range(n_states)
            ]
            for t, s in zip(outs, main + state_segs):
                seg[id(t)] = s
            continue
        if not has_traced:
            if isinstance(layer, keras.Model) and _has_rnn(layer):
                if layers is None:
                    raise ValueError(
                        f"ISS does not trace into the nested model "
                        f"`{layer.name}`, which holds recurrent layers: "
                        "flatten it into the outer model first."
                    )
            continue
        if not isinstance(layer, keras.layers.Layer):
            untraceable(
                layer, "it is an operation on tensors that ISS cannot see "
                "through (use layers instead of raw ops)."
            )
        if is_per_unit(layer):
            seg[id(outs[0])] = seg[id(args[0])]
            continue
        if isinstance(layer, keras.layers.Concatenate):
            rank = len(args[0][0].shape)
            if layer.axis not in (-1, rank - 1):
                untraceable(layer, f"it concatenates on axis {layer.axis}, "
                            "not on the unit axis.")
            seg[id(outs[0])] = [
                piece for t in args[0]
                for piece in (seg.get(id(t)) or [(None, _width(t))])
            ]
            continue
        inner = layer.layer if isinstance(
            layer, keras.layers.TimeDistributed) else layer
        if type(inner) is keras.layers.Dense and len(has_traced) == 1 and (
            args and traced(args[0])
        ):
            add_rows(inner.kernel, traced(args[0]))
            continue
        if isinstance(layer, keras.layers.LayerNormalization):
            why = "it normalises over all units (mixes them)."
        elif isinstance(layer, (keras.layers.Reshape, keras.layers.Flatten)):
            why = "it moves units off the last axis."
        elif isinstance(layer, keras.layers.Lambda):
            why = "a Lambda's function cannot be inspected."
        else:
            why = "it may mix units (not a layer ISS can slice)."
        untraceable(layer, why)

    for t in outputs:
        if traced(t) is not None:
            names = sorted({
                r.key for sp, _ in seg[id(t)] if sp is not None
                for r in sp.root().rnns
            })
            raise ValueError(
                f"ISS cannot prune {names}: their hidden units reach a model "
                "output directly, so removing one would change the output's "
                "shape. Add a consumer (e.g. a Dense head) or exclude them "
                "with `layers=`."
            )
    roots = []
    for s in spaces:
        r = s.root()
        if r not in roots:
            roots.append(r)
    # Re-point every part to its root space.
    rows = {k: [(o, s.root()) for o, s in v] for k, v in rows.items()}
    cols = {k: [(s.root(), b) for s, b in v] for k, v in cols.items()}
    for r in rnns:
        if r.space is not None:
            r.space = r.space.root()
        r.inputs = tuple(
            (None if s is None else s.root(), w) for s, w in r.inputs
        )
    if layers is not None:
        missing = set(layers) - {
            r.owner.name for r in rnns if r.space is not None
        }
        if missing:
            raise ValueError(
                f"`layers` names {sorted(missing)}, which are not recurrent "
                "layers of the model that ISS can prune. Its recurrent "
                f"layers: {sorted({r.owner.name for r in rnns})}."
            )
    return Trace(rnns, roots, rows, cols, variables)


def _has_rnn(model):
    for layer in model.layers:
        if is_rnn(layer) or isinstance(layer, keras.layers.Bidirectional):
            return True
        if isinstance(layer, keras.Model) and _has_rnn(layer):
            return True
    return False

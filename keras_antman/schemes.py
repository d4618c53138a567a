"""Structured matrices ("schemes") that replace a dense product ``x @ W``.

Every compression method of the package is one `Scheme` subclass: a
template of hyper-parameters (``LGPShuffle(10)``) that knows the method's
weights, a differentiable forward product in plain TF ops, its exact cost
(the AntMan paper's Table 1), the dense matrix of given weights, the
weights nearest a trained dense matrix, and its lowering to the compiled
op's stages. `Scheme.bind` makes a `StructuredMatrix`: the Keras layer that
holds the weights of one ``n -> m`` product (``to_dense``, ``from_dense``,
``params``, ``macs``). Cells and layers hold matrices and never ask which
scheme is inside, so new methods plug in by subclassing `Scheme` alone.

Convention: row vectors, ``y = x @ W`` with ``W`` of shape ``[n, m]``. The
paper writes ``A x`` with ``A = W^T`` of shape ``m x n``; its Table 1
formulas are quoted below in its own ``m`` (output) and ``n`` (input).
"""

import contextlib
import inspect
import math

import numpy as np

from keras_antman import _keras
from keras_antman import ops as compiled_ops
from keras_antman._keras import keras
from keras_antman._keras import ops

_PACKAGE = "keras_antman"


def _divisors(k):
    return [d for d in range(1, k + 1) if k % d == 0]


def _block_diag_extract(w, groups):
    """The block-diagonal part of ``w`` [n, m] as blocks [g, n/g, m/g]."""
    n, m = w.shape
    a, b = n // groups, m // groups
    return np.stack(
        [w[i * a : (i + 1) * a, i * b : (i + 1) * b] for i in range(groups)]
    )


def _block_diag_dense(blocks):
    """The dense [n, m] matrix of block-diagonal ``blocks`` [g, a, b]."""
    g, a, b = blocks.shape
    w = np.zeros((g * a, g * b), dtype=blocks.dtype)
    for i in range(g):
        w[i * a : (i + 1) * a, i * b : (i + 1) * b] = blocks[i]
    return w


def _shuffle_columns(m, groups):
    """Column permutation of the shuffle mix.

    Group ``i``'s ``j``-th output lands at position ``j * g + i`` (the
    paper's ``O^T`` of the ``[g, m/g]`` output), so ``y = v[:, perm]`` with
    ``perm[j * g + i] = i * (m/g) + j``.
    """
    b = m // groups
    return np.arange(m).reshape(groups, b).T.reshape(m)


_LOWERING = {"per_group": False}


@contextlib.contextmanager
def per_group_products():
    """Trace `block_diag_matmul` as one 2-D matmul per group instead of one
    batched matmul (what `keras_antman.export_tflite` does for full-integer
    int8: TFLite quantizes the constant operand of a ``BATCH_MATMUL`` like
    an activation, with a non-zero zero point, and its int8 output came out
    far off, while a ``FULLY_CONNECTED`` gets symmetric per-channel
    weights)."""
    saved = _LOWERING["per_group"]
    _LOWERING["per_group"] = True
    try:
        yield
    finally:
        _LOWERING["per_group"] = saved


def block_diag_matmul(x, blocks, shuffle=False):
    """``x @ blockdiag(blocks)`` in plain TF ops, optionally shuffle-mixed.

    One batched matmul over the groups: ``x`` [..., n] is viewed as
    ``[g, N, n/g]`` and multiplied by ``blocks`` [g, n/g, m/g]. With
    ``shuffle=True`` the final transpose to ``[N, m/g, g]`` *is* the shuffle
    (element ``j`` of group ``i`` goes to ``j * g + i``).

    Args:
        x: tensor of shape ``[..., n]``.
        blocks: tensor of shape ``[g, n/g, m/g]``.
        shuffle: apply the shuffle mix to the output.

    Returns:
        Tensor of shape ``[..., m]``.
    """
    g, a, b = blocks.shape
    lead = ops.shape(x)[:-1]
    if _LOWERING["per_group"]:
        # One 2-D product per group (TFLite: a FULLY_CONNECTED each); the
        # shuffle interleaves the groups' outputs: j * g + i.
        xs = ops.split(x, g, axis=-1)
        ys = [ops.matmul(xs[i], blocks[i]) for i in range(g)]
        y = ops.stack(ys, axis=-1) if shuffle else ops.concatenate(ys, -1)
        return ops.reshape(y, (*lead, g * b))
    xg = ops.transpose(ops.reshape(x, (-1, g, a)), (1, 0, 2))
    yg = ops.matmul(xg, blocks)
    yg = ops.transpose(yg, (1, 2, 0) if shuffle else (1, 0, 2))
    return ops.reshape(yg, (*lead, g * b))


# -- least squares on calibration statistics (`Scheme.arrays_from_data`) --
#
# The data-aware fits minimise the output error on calibration rows X,
# ``||X W - X W_hat||_F^2 = tr(W_hat^T C W_hat) - 2 tr(W_hat^T B) + const``
# with ``C = X^T X`` and ``B = X^T Y``, ``Y = X W``: only those two
# statistics are needed, never X itself. Every solve adds a ridge
# ``ridge * trace(G) / dim`` to its Gram matrix ``G`` (scale-free), so a
# rank-deficient calibration set still gives finite weights.

ALS_SWEEPS = 10


def _ridged(gram, ridge):
    """``gram + ridge * trace(gram) / dim * I`` in float64."""
    gram = np.asarray(gram, "float64")
    dim = gram.shape[0]
    scale = np.trace(gram) / dim if dim else 0.0
    if not scale > 0.0:  # all-zero (or empty) inputs
        scale = 1.0
    return gram + (ridge * scale) * np.eye(dim)


def _solve(gram, rhs):
    """``gram^-1 rhs`` for a symmetric positive definite (ridged) gram."""
    try:
        return np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(gram, rhs, rcond=None)[0]


def _objective(xtx, xty, w_hat):
    """``||X W_hat||^2 - 2 <X W_hat, Y>``: the output error up to a
    constant."""
    return float(np.sum(w_hat * (xtx @ w_hat)) - 2.0 * np.sum(w_hat * xty))


def _group_least_squares(gram, cross, groups, ridge):
    """Block-diagonal ``D`` [p, q] minimising ``||Y - X D||^2``.

    Block ``i`` reads only input slice ``i`` and writes only output slice
    ``i``, so the problem splits into ``groups`` ridge solves
    ``C[I, I] D_i = B[I, J]`` (``C = X^T X`` [p, p], ``B = X^T Y``
    [p, q]).

    Returns:
        The blocks ``[groups, p / groups, q / groups]``.
    """
    p, q = cross.shape
    a, b = p // groups, q // groups
    lam = ridge * max(np.trace(gram) / p, 0.0) or ridge
    blocks = []
    for i in range(groups):
        rows, cols = slice(i * a, (i + 1) * a), slice(i * b, (i + 1) * b)
        blocks.append(_solve(gram[rows, rows] + lam * np.eye(a),
                             cross[rows, cols]))
    return np.stack(blocks)


def _block_gauss_seidel(gram, cross, right_gram, blocks):
    """One sweep improving a block-diagonal ``D`` on
    ``min tr(D^T C D G) - 2 tr(D^T P)``.

    That is ``||X W - X D N||^2`` with ``C = X^T X``, ``G = N N^T`` and
    ``P = X^T Y N^T``: ``N`` mixes every output, so the blocks are coupled
    and are updated one at a time (Gauss-Seidel). Block ``i``'s normal
    equation ``C_ii D_i G_ii = P_i - sum_{j != i} C_ij D_j G_ji`` is a
    Sylvester equation, solved exactly in the eigenbases of ``C_ii`` and
    ``G_ii`` (both ridged, so positive definite).
    """
    g, a, b = blocks.shape
    blocks = np.array(blocks, "float64")
    d = _block_diag_dense(blocks)
    for i in range(g):
        rows, cols = slice(i * a, (i + 1) * a), slice(i * b, (i + 1) * b)
        c_ii, g_ii = gram[rows, rows], right_gram[cols, cols]
        rest = (cross[rows, cols] - gram[rows] @ d @ right_gram[:, cols]
                + c_ii @ blocks[i] @ g_ii)
        la, qa = np.linalg.eigh(c_ii)
        lb, qb = np.linalg.eigh(g_ii)
        blocks[i] = qa @ ((qa.T @ rest @ qb) / np.outer(la, lb)) @ qb.T
        d[rows, cols] = blocks[i]
    return blocks


def _whitened_low_rank(gram, cross, k, ridge):
    """Rank-``k`` ``U V`` minimising ``||Y - X U V||^2`` (activation-aware
    SVD), given ``C = X^T X`` and ``B = X^T Y``.

    With ``C + ridge = L L^T`` (Cholesky), ``||Y - X U V||^2`` is
    ``||L^-1 B - L^T U V||^2`` up to a constant: truncate the SVD of the
    whitened target ``L^-1 B`` (Eckart-Young) and un-whiten ``U`` with
    ``L^-T``; each rank-one term is rescaled so ``U``'s column and ``V``'s
    row have equal norms.
    """
    chol = np.linalg.cholesky(_ridged(gram, ridge))
    target = np.linalg.solve(chol, np.asarray(cross, "float64"))
    # The top-k singular subspace from the smaller Gram matrix of the
    # target (an eigh of min(n, m)^2, much cheaper than the full SVD):
    # the truncation is the target projected on it.
    if target.shape[0] <= target.shape[1]:
        left = np.linalg.eigh(target @ target.T)[1][:, ::-1][:, :k]
        u_white, v = left, left.T @ target
    else:
        right = np.linalg.eigh(target.T @ target)[1][:, ::-1][:, :k]
        u_white, v = target @ right, right.T
    return _balance(np.linalg.solve(chol.T, u_white), v)


def _balance(u, v):
    """Rescale the rank-one terms of ``u @ v`` so that each column of ``u``
    and row of ``v`` have equal norms (the product is unchanged)."""
    nu = np.linalg.norm(u, axis=0)
    nv = np.linalg.norm(v, axis=1)
    alpha = np.sqrt(np.where(nu > 0, nv / np.where(nu > 0, nu, 1.0), 1.0))
    alpha = np.where(alpha > 0, alpha, 1.0)
    return u * alpha, v / alpha[:, None]


class Scheme:
    """A compression method for one dense product ``x @ W``: the template.

    A scheme holds hyper-parameters only (``LGPShuffle(10)``) and the
    method's mathematics over weight arrays: which weights an ``n -> m``
    product needs, its forward product, its exact cost (Table 1), the dense
    matrix of given weights, the weights nearest a dense matrix, and how it
    lowers to the compiled op's stages. One template serves any number of
    products: `bind` makes the `StructuredMatrix` layer that holds the
    weights of one of them. Cells and layers never ask which scheme they
    hold, so a new method is one subclass.

    Subclasses pass their hyper-parameters to ``super().__init__`` (they
    become attributes, the config, and the `describe` text) and implement
    `weight_shapes`, `product`, `cost`, `dense_from_arrays` and
    `arrays_from_dense`; they may override `check` (reject impossible
    dims), `kernel_stages` (run on the compiled op) and `arrays_from_data`
    (fit to calibration data; default `arrays_from_dense`). A class attribute
    ``spec_name`` registers the scheme under that name for `get` and the
    command line (``"lgp_shuffle:10"``).

    A composite scheme (`keras_antman.doping.Doped`) also uses the optional
    hooks: `weight_options` (a non-trainable weight, its own initializer),
    `training_product` with ``random_in_training`` (a training-only
    dropout; the matrix then owns a seed generator), `serving_arrays` and
    `serving_product` (constants written into an exported graph) and
    `cost_parts` (sub-rows of the report).
    """

    spec_name = None
    _registry = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("spec_name"):
            Scheme._registry[cls.spec_name] = cls

    def __init__(self, **hyperparameters):
        self._hyperparameters = dict(hyperparameters)
        for key, value in hyperparameters.items():
            setattr(self, key, value)

    # -- configuration ---------------------------------------------------

    def describe(self):
        """Short text like ``LGPShuffle(groups=10)``."""
        args = ", ".join(
            f"{k}={v}" for k, v in self._hyperparameters.items()
            if v is not None
        )
        name = type(self).__name__
        return f"{name}({args})" if args else name

    def __repr__(self):
        return self.describe()

    def __eq__(self, other):
        return type(self) is type(other) and (
            self.get_config() == other.get_config())

    def __hash__(self):
        return hash((type(self), tuple(sorted(self.get_config().items()))))

    def get_config(self):
        """The hyper-parameters given (``None`` ones left out)."""
        return {k: v for k, v in self._hyperparameters.items()
                if v is not None}

    @classmethod
    def from_config(cls, config):
        # Configs of the earlier layer-based schemes carry layer keys
        # (name, output_dim, initializer...): only hyper-parameters count.
        names = inspect.signature(cls.__init__).parameters
        try:
            return cls(**{k: v for k, v in config.items() if k in names})
        except TypeError as e:  # a missing or mistyped hyper-parameter
            raise ValueError(
                f"Invalid {cls.__name__} config {config!r}: {e}") from None

    def check(self, n, m):
        """Raise `ValueError` if this scheme cannot map ``n`` to ``m``."""

    def _fail(self, n, m, need, valid):
        raise ValueError(
            f"{self.describe()} cannot compress a {n} -> {m} "
            f"product: it needs {need}. Valid choices here: {valid}."
        )

    # -- cost (Table 1) ---------------------------------------------------

    def cost(self, n, m):
        """Parameters and multiply-adds of one ``n -> m`` product.

        Returns:
            ``(params, macs)``; for every scheme of the paper they are equal.
        """
        raise NotImplementedError

    def cost_parts(self, n, m):
        """The cost broken into named parts, for `report`.

        Returns:
            A list of ``(part, description, params, macs)`` that sums to
            `cost`; a scheme made of one part (the default) returns
            ``[("", describe(), params, macs)]``. A composite scheme (e.g.
            `keras_antman.doping.Doped`) lists its parts, which `report`
            shows as sub-rows of the product.
        """
        return [("", self.describe(), *self.cost(n, m))]

    def params(self, n=None, m=None):
        """Number of weights of an ``n -> m`` product."""
        return self.cost(*self._dims(n, m))[0]

    def macs(self, n=None, m=None):
        """Multiply-adds of one product ``x @ W`` for one vector ``x``."""
        return self.cost(*self._dims(n, m))[1]

    def _dims(self, n, m):
        if n is None or m is None:
            raise ValueError(
                f"{self.describe()} is not built: pass the dims, e.g. "
                f"`.params(n, m)`, or ask the `StructuredMatrix` of a layer "
                f"(`layer.input_matrix.params()`)."
            )
        return n, m

    # -- the mathematics over weight arrays --------------------------------

    def weight_shapes(self, n, m):
        """``{weight name: shape}`` for an ``n -> m`` product."""
        raise NotImplementedError

    def weight_options(self, n, m):
        """Per-weight `add_weight` arguments that replace the matrix's own.

        Returns:
            ``{weight name: {argument: value}}`` for the weights that need
            something else than the matrix's initializer, regularizer and
            constraint, e.g. ``{"mask": {"trainable": False, "initializer":
            "ones", "regularizer": None, "constraint": None}}``. Default:
            none.
        """
        return {}

    def product(self, x, w):
        """``x @ W`` in plain TF ops; ``x`` [..., n], ``w`` the weights by
        name (variables or tensors)."""
        raise NotImplementedError

    # Whether `training_product` draws random numbers: the matrix then
    # owns a `keras.random.SeedGenerator` seeded with ``self.seed``.
    random_in_training = False

    def training_product(self, x, w, seed_generator):
        """The product in training (``training=True``); default `product`.

        A scheme with a training-only regulariser (dropout on part of the
        product) overrides this and sets ``random_in_training``.
        """
        return self.product(x, w)

    def serving_arrays(self, arrays):
        """Constants that an exported graph uses instead of some weights.

        Args:
            arrays: the weight arrays (numpy) by name.

        Returns:
            ``None`` (the default: the graph reads the weights) or a dict
            of numpy arrays handed to `serving_product` while `export`
            traces the model.
        """
        return None

    def serving_product(self, x, w, constants):
        """The product in an exported graph, given `serving_arrays`."""
        return self.product(x, w)

    def dense_from_arrays(self, arrays):
        """The dense ``[n, m]`` matrix of the given weight arrays (numpy)."""
        raise NotImplementedError

    def arrays_from_dense(self, w):
        """Weight arrays (by name) approximating the dense ``w`` [n, m]."""
        raise NotImplementedError

    def arrays_from_data(self, w, xtx, xty, ridge=1e-6):
        """Weight arrays fitted to calibration data (data-aware init).

        Minimises the output error ``||X W - X W_hat||`` over the rows
        ``X`` a product actually sees, given only their statistics (see
        `keras_antman.compress` with ``calibration_data``). The default
        ignores the data and returns `arrays_from_dense`; subclasses that
        can do better override it.

        Args:
            w: the dense ``[n, m]`` matrix (numpy).
            xtx: ``X^T X`` [n, n] of the calibration rows (float64).
            xty: ``X^T Y`` [n, m] with ``Y = X W`` (float64).
            ridge: each solve adds ``ridge * trace(G) / dim`` to the
                diagonal of its Gram matrix ``G``, so rank-deficient
                calibration data stays finite.

        Returns:
            Weight arrays by name, as `arrays_from_dense`.
        """
        return self.arrays_from_dense(w)

    def kernel_stages(self, w):
        """The compiled op's chain of stages computing ``x @ W``.

        Args:
            w: the weights by name (variables or tensors).

        Returns:
            A list of `keras_antman.ops.Stage` (block-diagonal ``[g, a, b]``
            arrays, a dense matrix being ``[1, n, m]``), optionally ending
            with one `keras_antman.ops.SparseTerm` added to their product.

        Raises:
            NotImplementedError: the op cannot run this scheme (the layers
                then use stock TF ops).
        """
        raise NotImplementedError(
            f"{self.describe()} has no lowering to the compiled op"
        )

    def serving_kernel_stages(self, w, constants):
        """`kernel_stages` while `export` traces the model, given
        `serving_arrays` (e.g. a sparse term as constant CSR arrays).
        Default: `kernel_stages`."""
        del constants
        return self.kernel_stages(w)

    # -- binding ----------------------------------------------------------

    def bind(self, output_dim, name=None, context=None, **weight_args):
        """The `StructuredMatrix` layer of one ``n -> output_dim`` product.

        Args:
            output_dim: ``m``.
            name: the layer's name (``"input_matrix"``...).
            context: where the product lives, for error messages.
            **weight_args: ``initializer``, ``regularizer``, ``constraint``,
                ``dtype`` (of the layer).

        Returns:
            An unbuilt `StructuredMatrix`; ``n`` comes when it is built.
        """
        return StructuredMatrix(
            self, output_dim=output_dim, name=name, context=context,
            **weight_args,
        )

    def from_dense(self, w):
        """The `StructuredMatrix` of this scheme nearest the dense ``w``.

        Args:
            w: array of shape ``[n, m]``.

        Returns:
            A built `StructuredMatrix` initialised with `arrays_from_dense`.
        """
        w = _as_matrix(w)
        return self.bind(int(w.shape[1])).from_dense(w)


def _as_matrix(w):
    w = np.asarray(w, dtype="float32")
    if w.ndim != 2:
        raise ValueError(
            f"`from_dense` expects a 2-D matrix [n, m]; received shape "
            f"{w.shape}."
        )
    return w


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StructuredMatrix(keras.layers.Layer):
    """The weights of one structured ``n -> m`` product: a bias-free layer
    computing ``x @ W`` with ``W`` in the form of its `Scheme`.

    Made by `Scheme.bind` (the structured layers make one per product:
    ``layer.input_matrix``, ``layer.recurrent_matrix``) or directly, e.g.
    ``StructuredMatrix(LGPShuffle(3), output_dim=6)`` as a layer of a
    model. ``n`` is taken from the input when it is built.

    Args:
        scheme: the `Scheme` (or its serialized config).
        output_dim: ``m``.
        initializer: initializer of every weight (default glorot uniform).
        regularizer: regularizer of every weight.
        constraint: constraint of every weight.
        context: text naming where the product lives (layer and product),
            used in error messages.
        **kwargs: `keras.layers.Layer` arguments (``name``, ``dtype``...).
    """

    def __init__(
        self,
        scheme,
        output_dim,
        initializer="glorot_uniform",
        regularizer=None,
        constraint=None,
        context=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if (isinstance(output_dim, bool)
                or not isinstance(output_dim, (int, np.integer))
                or output_dim < 1):
            raise ValueError(
                f"`output_dim` must be a positive integer. "
                f"Received: output_dim={output_dim!r}"
            )
        self.scheme = get(scheme)
        self.output_dim = int(output_dim)
        self.initializer = keras.initializers.get(initializer)
        self.regularizer = keras.regularizers.get(regularizer)
        self.constraint = keras.constraints.get(constraint)
        self.context = context
        self.input_dim = None
        # Applied position by position, so a sequence mask passes through.
        self.supports_masking = True
        # Only schemes that are random in training own a generator, so the
        # variables (and saved files) of the others are unchanged.
        self.seed_generator = (
            keras.random.SeedGenerator(getattr(self.scheme, "seed", None))
            if self.scheme.random_in_training else None
        )
        # Set by `serving_constants` while `export` traces the model.
        self._serving = None

    def describe(self):
        return self.scheme.describe()

    def build(self, input_shape):
        n = int(input_shape[-1])
        try:
            self.scheme.check(n, self.output_dim)
        except ValueError as e:
            where = f"`{self.context}`: " if self.context else ""
            raise ValueError(f"{where}{e}") from None
        self.input_dim = n
        shapes = self.scheme.weight_shapes(n, self.output_dim)
        options = self.scheme.weight_options(n, self.output_dim)
        for wname, shape in shapes.items():
            kwargs = dict(
                initializer=self.initializer,
                regularizer=self.regularizer,
                constraint=self.constraint,
            )
            kwargs.update(options.get(wname, {}))
            kwargs["initializer"] = _keras.fresh_initializer(
                kwargs["initializer"])
            var = self.add_weight(shape=shape, name=wname, **kwargs)
            setattr(self, wname, var)
        self.built = True

    def scheme_weights(self):
        """The weight variables by name, in `Scheme.weight_shapes` order."""
        self._require_built("scheme_weights")
        shapes = self.scheme.weight_shapes(self.input_dim, self.output_dim)
        return {k: getattr(self, k) for k in shapes}

    def weight_arrays(self):
        """The weights as ``{name: numpy array}``."""
        return {k: ops.convert_to_numpy(v)
                for k, v in self.scheme_weights().items()}

    def call(self, x, training=False):
        w = self.scheme_weights()
        if training and self.seed_generator is not None:
            return self.scheme.training_product(x, w, self.seed_generator)
        if self._serving is not None and not training:
            return self.scheme.serving_product(x, w, self._serving)
        return self.scheme.product(x, w)

    @contextlib.contextmanager
    def serving_constants(self):
        """Trace inference with the scheme's `Scheme.serving_arrays`.

        `keras_antman.export` enters this for every matrix of the model,
        so e.g. a doped matrix's sparse part is written into the graph as
        constant sparse arrays. Outside it nothing changes.
        """
        self._require_built("serving_constants")
        self._serving = self.scheme.serving_arrays(self.weight_arrays())
        try:
            yield self
        finally:
            self._serving = None

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.output_dim)

    def kernel_stages(self):
        """This product lowered to the compiled op (`Scheme.kernel_stages`).

        Inside `serving_constants` (while `export` traces), the scheme's
        serving constants are used (`Scheme.serving_kernel_stages`).

        Raises:
            NotImplementedError: the op cannot run this scheme.
        """
        if self._serving is not None:
            return self.scheme.serving_kernel_stages(
                self.scheme_weights(), self._serving)
        return self.scheme.kernel_stages(self.scheme_weights())

    def params(self):
        """Number of weights (Table 1)."""
        self._require_built("params")
        return self.scheme.params(self.input_dim, self.output_dim)

    def macs(self):
        """Multiply-adds of one product for one vector (Table 1)."""
        self._require_built("macs")
        return self.scheme.macs(self.input_dim, self.output_dim)

    def cost_parts(self):
        """``[(part, description, params, macs)]`` (`Scheme.cost_parts`)."""
        self._require_built("cost_parts")
        return self.scheme.cost_parts(self.input_dim, self.output_dim)

    def to_dense(self):
        """The equivalent dense matrix ``W`` [n, m] as a numpy array."""
        self._require_built("to_dense")
        return self.scheme.dense_from_arrays(self.weight_arrays())

    def from_dense(self, w):
        """Sets the weights nearest the trained dense matrix ``w`` [n, m].

        Builds the layer first if needed.

        Returns:
            ``self``.

        Raises:
            ValueError: ``w`` is not 2-D or does not match the dims.
        """
        w = _as_matrix(w)
        if not self.built:
            self.build((None, w.shape[0]))
        if w.shape != (self.input_dim, self.output_dim):
            raise ValueError(
                f"`from_dense` expects a [{self.input_dim}, "
                f"{self.output_dim}] matrix for {self.describe()}; received "
                f"shape {w.shape}."
            )
        return self.set_weight_arrays(self.scheme.arrays_from_dense(w))

    def set_weight_arrays(self, arrays):
        """Assigns weight arrays by name (as `weight_arrays` returns them).

        Returns:
            ``self``.
        """
        self._require_built("set_weight_arrays")
        variables = self.scheme_weights()
        for k, v in arrays.items():
            variables[k].assign(np.asarray(v, dtype="float32"))
        return self

    def _require_built(self, what):
        if not self.built:
            raise ValueError(
                f"{self.describe()} must be built before `{what}()`: call it "
                f"on an input or use `from_dense`."
            )

    def load_own_variables(self, store):
        # Keras would report a bare count or shape mismatch; say which
        # product and weight disagree with the (possibly edited) config.
        variables = _keras.own_variables(self)
        saved = [tuple(store[str(i)].shape) for i in range(len(store.keys()))]
        expected = [tuple(v.shape) for v in variables]
        if saved != expected:
            if not saved and getattr(self, "_load_error", None):
                # After a failure Keras retries through the layer's alias
                # attributes (an empty store) and reports the last error.
                raise ValueError(self._load_error)
            where = f"`{self.context}`" if self.context else repr(self.name)
            # tf_keras's names carry the scope and ":0".
            names = [v.name.rsplit("/", 1)[-1].split(":")[0]
                     for v in variables]
            self._load_error = (
                f"{where}: the saved weights do not fit the config's "
                f"{self.describe()} on a {self.input_dim} -> "
                f"{self.output_dim} product: it needs {names} of shapes "
                f"{expected}, the file holds shapes {saved}. The config "
                "and the weights disagree (an edited config, or weights "
                "saved with another scheme)."
            )
            raise ValueError(self._load_error)
        super().load_own_variables(store)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "scheme": keras.saving.serialize_keras_object(self.scheme),
                "output_dim": self.output_dim,
                "initializer": keras.initializers.serialize(self.initializer),
                "regularizer": keras.regularizers.serialize(self.regularizer),
                "constraint": keras.constraints.serialize(self.constraint),
                "context": self.context,
            }
        )
        return config


def _stage(blocks, shuffle=False):
    return compiled_ops.Stage(blocks, shuffle)


def _dense_stage(matrix):
    """A dense [n, m] matrix as the op's one-block stage [1, n, m]."""
    return _stage(ops.expand_dims(matrix, 0))


def _positive_int(name, value, cls):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"{cls}: `{name}` must be a positive integer. Received: "
            f"{name}={value!r}"
        )
    if value < 1:
        raise ValueError(
            f"{cls}: `{name}` must be a positive integer. Received: "
            f"{name}={value}"
        )
    return int(value)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Dense(Scheme):
    """The uncompressed product ``x @ W``: ``m n`` weights and MACs."""

    spec_name = "dense"

    def cost(self, n, m):
        return n * m, n * m

    def weight_shapes(self, n, m):
        return {"kernel": (n, m)}

    def product(self, x, w):
        return ops.matmul(x, w["kernel"])

    def dense_from_arrays(self, arrays):
        return arrays["kernel"]

    def arrays_from_dense(self, w):
        return {"kernel": w}

    def kernel_stages(self, w):
        return [_dense_stage(w["kernel"])]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LowRank(Scheme):
    """SVD-style low rank ``W ~ U V`` of rank ``k = n / rank_reduction``.

    Table 1 ("SVD"): ``m n / r + n n / r`` weights and MACs. `from_dense`
    takes the truncated SVD and splits the singular values evenly
    (``U = U_k sqrt(S_k)``, ``V = sqrt(S_k) V_k^T``). This is also the
    Doping paper's LMF (low-rank matrix factorisation).

    Args:
        rank_reduction: ``r``; the rank is ``n / r`` and ``r`` must divide
            ``n``.
        rank: the rank ``k`` itself (``k <= min(n, m)``), instead of
            ``rank_reduction``; for a cost between those of the divisors of
            ``n`` (e.g. exactly 10x fewer MACs on a 200 -> 800 product:
            ``rank=16``). Give exactly one of the two.
    """

    spec_name = "low_rank"

    def __init__(self, rank_reduction=None, rank=None):
        if (rank_reduction is None) == (rank is None):
            raise ValueError(
                "LowRank: give exactly one of `rank_reduction` (rank n/r) "
                "and `rank` (the rank itself). Received: "
                f"rank_reduction={rank_reduction!r}, rank={rank!r}"
            )
        if rank is None:
            rank_reduction = _positive_int(
                "rank_reduction", rank_reduction, "LowRank")
        else:
            rank = _positive_int("rank", rank, "LowRank")
        super().__init__(rank_reduction=rank_reduction, rank=rank)

    def rank_for(self, n):
        """The rank ``k`` of an ``n -> m`` product."""
        return self.rank or n // self.rank_reduction

    def check(self, n, m):
        if self.rank:
            if self.rank > min(n, m):
                self._fail(
                    n, m, f"rank <= min(n, m) = {min(n, m)}",
                    f"rank in 1..{min(n, m)}",
                )
            return
        valid = [r for r in _divisors(n) if n // r <= m]
        if n % self.rank_reduction or self.rank_for(n) > m:
            self._fail(
                n, m, f"r to divide n = {n} with rank n/r <= m = {m}",
                f"rank_reduction in {valid}",
            )

    def cost(self, n, m):
        k = self.rank_for(n)
        return n * k + k * m, n * k + k * m

    def weight_shapes(self, n, m):
        k = self.rank_for(n)
        return {"u": (n, k), "v": (k, m)}

    def product(self, x, w):
        return ops.matmul(ops.matmul(x, w["u"]), w["v"])

    def dense_from_arrays(self, arrays):
        return arrays["u"] @ arrays["v"]

    def arrays_from_dense(self, w):
        k = self.rank_for(w.shape[0])
        u, s, vt = np.linalg.svd(w.astype("float64"), full_matrices=False)
        root = np.sqrt(s[:k])
        return {"u": u[:, :k] * root, "v": root[:, None] * vt[:k]}

    def arrays_from_data(self, w, xtx, xty, ridge=1e-6):
        """Activation-aware SVD: the best rank-``k`` ``U V`` for the rows.

        With ``X^T X + ridge = L L^T`` (Cholesky), ``||X (W - U V)||`` is
        ``||L^T W - L^T U V||``: truncate the SVD of the whitened target
        ``L^-1 X^T Y`` (``= L^T W``) and un-whiten ``U`` with ``L^-T``
        (`_whitened_low_rank`).
        """
        u, v = _whitened_low_rank(xtx, xty, self.rank_for(w.shape[0]), ridge)
        return {"u": u, "v": v}

    def kernel_stages(self, w):
        return [_dense_stage(w["u"]), _dense_stage(w["v"])]


class _Grouped(Scheme):
    """Shared checks of the localized-group-projection schemes."""

    def __init__(self, groups):
        super().__init__(
            groups=_positive_int("groups", groups, type(self).__name__))

    def check(self, n, m):
        g = self.groups
        if n % g or m % g:
            common = _divisors(math.gcd(n, m))
            self._fail(
                n, m, f"both n = {n} and m = {m} divisible by groups = {g}",
                f"groups in {common}",
            )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LGPShuffle(_Grouped):
    """Localized group projection with shuffle mix, ``S D_g x``.

    The input is cut into ``g`` contiguous groups, each projected by its own
    ``[n/g, m/g]`` block; the shuffle (a transpose of the ``[g, m/g]``
    output, paper section 3.2) spreads every group's outputs over the whole
    vector so that information crosses groups from one step to the next.
    Table 1: ``m n / g`` weights and MACs. `from_dense` keeps the entries of
    ``W`` that lie on the scheme's support.

    Args:
        groups: ``g``; must divide both ``n`` and ``m``.
    """

    spec_name = "lgp_shuffle"

    def cost(self, n, m):
        return n * m // self.groups, n * m // self.groups

    def weight_shapes(self, n, m):
        g = self.groups
        return {"blocks": (g, n // g, m // g)}

    def product(self, x, w):
        return block_diag_matmul(x, w["blocks"], shuffle=True)

    def dense_from_arrays(self, arrays):
        w = _block_diag_dense(arrays["blocks"])
        return w[:, _shuffle_columns(w.shape[1], self.groups)]

    def arrays_from_dense(self, w):
        perm = _shuffle_columns(w.shape[1], self.groups)
        unshuffled = np.empty_like(w)
        unshuffled[:, perm] = w
        return {"blocks": _block_diag_extract(unshuffled, self.groups)}

    def arrays_from_data(self, w, xtx, xty, ridge=1e-6):
        """Per-group least squares on the support.

        Each block is the ridge least-squares solution restricted to its
        input slice and the output columns it owns after the shuffle.
        """
        xty = np.asarray(xty, "float64")
        unshuffled = np.empty_like(xty)
        unshuffled[:, _shuffle_columns(w.shape[1], self.groups)] = xty
        blocks = _group_least_squares(
            np.asarray(xtx, "float64"), unshuffled, self.groups, ridge)
        return {"blocks": blocks}

    def kernel_stages(self, w):
        return [_stage(w["blocks"], shuffle=True)]


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LGPDense(_Grouped):
    """Localized group projection with a dense mixing matrix.

    ``M D_g x`` when ``m <= n`` (mix after, ``M`` is ``m x m``) and
    ``D_g M x`` when ``n < m`` (mix first, ``M`` is ``n x n``), so the mix
    is always on the smaller side. Table 1: ``m n / g + min(m, n)^2``.
    `from_dense` takes the block-diagonal part of ``W`` and then the mix
    that fits ``W`` best in least squares given those blocks.

    Args:
        groups: ``g``; must divide both ``n`` and ``m``.
    """

    spec_name = "lgp_dense"

    @staticmethod
    def mix_first(n, m):
        return n < m

    @staticmethod
    def _dims_of(blocks):
        g, a, b = blocks.shape
        return g * a, g * b

    def cost(self, n, m):
        c = n * m // self.groups + min(n, m) ** 2
        return c, c

    def weight_shapes(self, n, m):
        g = self.groups
        return {"mix": (min(n, m),) * 2, "blocks": (g, n // g, m // g)}

    def product(self, x, w):
        if self.mix_first(*self._dims_of(w["blocks"])):
            return block_diag_matmul(ops.matmul(x, w["mix"]), w["blocks"])
        return ops.matmul(block_diag_matmul(x, w["blocks"]), w["mix"])

    def dense_from_arrays(self, arrays):
        d = _block_diag_dense(arrays["blocks"])
        if self.mix_first(*d.shape):
            return arrays["mix"] @ d
        return d @ arrays["mix"]

    def arrays_from_dense(self, w):
        blocks = _block_diag_extract(w, self.groups)
        d = _block_diag_dense(blocks).astype("float64")
        if self.mix_first(*w.shape):
            mix = w @ np.linalg.pinv(d)
        else:
            mix = np.linalg.pinv(d) @ w
        return {"mix": mix, "blocks": blocks}

    def arrays_from_data(self, w, xtx, xty, ridge=1e-6):
        """Alternating least squares from `arrays_from_dense`.

        ``ALS_SWEEPS`` sweeps, keeping the best: mix first (``M D``), the
        mix is ``C^-1 X^T Y D^T (D D^T)^-1`` and the blocks a per-group
        least squares on the mixed rows ``X M``; mix after (``D M``), the
        mix is ``(D^T C D)^-1 D^T X^T Y`` and the blocks one Gauss-Seidel
        pass of block Sylvester solves.
        """
        xtx = np.asarray(xtx, "float64")
        xty = np.asarray(xty, "float64")
        start = self.arrays_from_dense(w)
        blocks = np.asarray(start["blocks"], "float64")
        mix_first = self.mix_first(*w.shape)
        c = _ridged(xtx, ridge)
        best, best_obj = start, _objective(
            xtx, xty, self.dense_from_arrays(start).astype("float64"))
        for _ in range(ALS_SWEEPS):
            d = _block_diag_dense(blocks)
            if mix_first:
                mix = _solve(c, xty @ d.T)
                mix = _solve(_ridged(d @ d.T, ridge), mix.T).T
                blocks = _group_least_squares(
                    mix.T @ xtx @ mix, mix.T @ xty, self.groups, ridge)
            else:
                mix = _solve(_ridged(d.T @ xtx @ d, ridge), d.T @ xty)
                blocks = _block_gauss_seidel(
                    c, xty @ mix.T, _ridged(mix @ mix.T, ridge), blocks)
            arrays = {"mix": mix, "blocks": blocks}
            obj = _objective(xtx, xty, self.dense_from_arrays(arrays))
            if obj < best_obj:
                best, best_obj = arrays, obj
        return best

    def kernel_stages(self, w):
        stages = [_stage(w["blocks"]), _dense_stage(w["mix"])]
        if self.mix_first(*self._dims_of(w["blocks"])):
            stages.reverse()
        return stages


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LowRankLGP(Scheme):
    """Low rank with localized group projections, ``D_gout M_r D_gin x``.

    ``x`` [n] is projected to the reduced rank ``k = n / r`` by ``g_in``
    blocks, mixed by a dense ``k x k`` matrix and projected to ``m`` by
    ``g_out`` blocks (paper section 3.4). Table 1:
    ``m n / (r g_out) + n n / (r g_in) + n^2 / r^2``. `from_dense` takes the
    block-diagonal parts of the truncated SVD factors and the mix that fits
    ``W`` best in least squares given them.

    Args:
        groups_in: ``g_in``; divides ``n`` and ``k``.
        groups_out: ``g_out``; divides ``k`` and ``m``.
        rank_reduction: ``r``; divides ``n``.
    """

    spec_name = "low_rank_lgp"

    def __init__(self, groups_in, groups_out, rank_reduction):
        super().__init__(
            groups_in=_positive_int("groups_in", groups_in, "LowRankLGP"),
            groups_out=_positive_int("groups_out", groups_out, "LowRankLGP"),
            rank_reduction=_positive_int(
                "rank_reduction", rank_reduction, "LowRankLGP"),
        )

    def rank_for(self, n):
        """The rank ``k = n / r`` of an ``n -> m`` product."""
        return n // self.rank_reduction

    def check(self, n, m):
        r = self.rank_reduction
        if n % r or self.rank_for(n) > m:
            self._fail(
                n, m, f"rank_reduction to divide n = {n} with rank <= m",
                f"rank_reduction in {[d for d in _divisors(n) if n // d <= m]}",
            )
        k = self.rank_for(n)
        if n % self.groups_in or k % self.groups_in:
            self._fail(
                n, m,
                f"groups_in = {self.groups_in} to divide n = {n} and the "
                f"rank k = n/r = {k}",
                f"groups_in in {_divisors(math.gcd(n, k))}",
            )
        if m % self.groups_out or k % self.groups_out:
            self._fail(
                n, m,
                f"groups_out = {self.groups_out} to divide the rank k = {k} "
                f"and m = {m}",
                f"groups_out in {_divisors(math.gcd(k, m))}",
            )

    def cost(self, n, m):
        k = self.rank_for(n)
        c = n * k // self.groups_in + k * k + k * m // self.groups_out
        return c, c

    def weight_shapes(self, n, m):
        k, gi, go = self.rank_for(n), self.groups_in, self.groups_out
        return {
            "in_blocks": (gi, n // gi, k // gi),
            "mix": (k, k),
            "out_blocks": (go, k // go, m // go),
        }

    def product(self, x, w):
        h = ops.matmul(block_diag_matmul(x, w["in_blocks"]), w["mix"])
        return block_diag_matmul(h, w["out_blocks"])

    def dense_from_arrays(self, arrays):
        d_in = _block_diag_dense(arrays["in_blocks"])
        d_out = _block_diag_dense(arrays["out_blocks"])
        return d_in @ arrays["mix"] @ d_out

    def arrays_from_dense(self, w):
        k = self.rank_for(w.shape[0])
        u, s, vt = np.linalg.svd(w.astype("float64"), full_matrices=False)
        root = np.sqrt(s[:k])
        in_blocks = _block_diag_extract(u[:, :k] * root, self.groups_in)
        out_blocks = _block_diag_extract(
            root[:, None] * vt[:k], self.groups_out
        )
        d_in = _block_diag_dense(in_blocks)
        d_out = _block_diag_dense(out_blocks)
        mix = np.linalg.pinv(d_in) @ w @ np.linalg.pinv(d_out)
        return {"in_blocks": in_blocks, "mix": mix, "out_blocks": out_blocks}

    def arrays_from_data(self, w, xtx, xty, ridge=1e-6):
        """Alternating least squares from `arrays_from_dense`.

        ``ALS_SWEEPS`` sweeps over the three factors, keeping the best:
        the mix ``(D_in^T C D_in)^-1 D_in^T X^T Y D_out^T (D_out
        D_out^T)^-1``; the output blocks a per-group least squares on the
        rows ``X D_in M``; the input blocks one Gauss-Seidel pass of block
        Sylvester solves against ``N = M D_out``.
        """
        xtx = np.asarray(xtx, "float64")
        xty = np.asarray(xty, "float64")
        start = self.arrays_from_dense(w)
        in_blocks = np.asarray(start["in_blocks"], "float64")
        out_blocks = np.asarray(start["out_blocks"], "float64")
        c = _ridged(xtx, ridge)
        best, best_obj = start, _objective(
            xtx, xty, self.dense_from_arrays(start).astype("float64"))
        for _ in range(ALS_SWEEPS):
            d_in = _block_diag_dense(in_blocks)
            d_out = _block_diag_dense(out_blocks)
            mix = _solve(_ridged(d_in.T @ xtx @ d_in, ridge),
                         d_in.T @ xty @ d_out.T)
            mix = _solve(_ridged(d_out @ d_out.T, ridge), mix.T).T
            f = d_in @ mix
            out_blocks = _group_least_squares(
                f.T @ xtx @ f, f.T @ xty, self.groups_out, ridge)
            nmat = mix @ _block_diag_dense(out_blocks)
            in_blocks = _block_gauss_seidel(
                c, xty @ nmat.T, _ridged(nmat @ nmat.T, ridge), in_blocks)
            arrays = {"in_blocks": in_blocks, "mix": mix,
                      "out_blocks": out_blocks}
            obj = _objective(xtx, xty, self.dense_from_arrays(arrays))
            if obj < best_obj:
                best, best_obj = arrays, obj
        return best

    def kernel_stages(self, w):
        return [_stage(w["in_blocks"]), _dense_stage(w["mix"]),
                _stage(w["out_blocks"])]


def _factor_pair(k):
    """Near-square ``(k1, k2)`` with ``k1 * k2 = k``: ``k1`` is the largest
    divisor of ``k`` not above ``sqrt(k)`` (so ``k1 <= k2``)."""
    k1 = max(d for d in _divisors(k) if d * d <= k)
    return k1, k // k1


def _shape_pair(name, value, cls):
    if value is None:
        return None
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                   or v < 1 for v in value)):
        raise ValueError(
            f"{cls}: `{name}` must be None or a pair of positive integers "
            f"(rows, columns). Received: {name}={value!r}"
        )
    return tuple(int(v) for v in value)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Kronecker(Scheme):
    """Kronecker product ``W = A kron B`` (the Doping paper's KP).

    ``A`` is ``[n1, m1]``, ``B`` is ``[n2, m2]``, ``n = n1 n2`` and
    ``m = m1 m2``; ``A`` indexes the outer blocks, as in NumPy:
    ``W[i1 n2 + i2, j1 m2 + j2] = A[i1, j1] B[i2, j2]`` and
    ``W == np.kron(A, B)``. With ``terms = r`` the matrix is a sum of
    ``r`` such products; the weights are ``a`` [r, n1, m1] and ``b``
    [r, n2, m2].

    The forward pass never forms ``W``: with ``X`` the input viewed as
    ``[n1, n2]``, ``y = A^T X B`` (as ``[m1, m2]``), two small matmuls in
    the cheaper order. ``B`` first costs ``n1 n2 m2 + n1 m2 m1 =
    n1 m2 (n2 + m1)`` multiply-adds per vector and term, ``A`` first
    ``m1 n2 (n1 + m2)``; MACs are ``r * min`` of the two (ties: ``B``
    first). Params: ``r (n1 m1 + n2 m2)``; unlike Table 1's schemes,
    params and MACs differ.

    Factor shapes: give ``a_shape``, ``b_shape`` or both; the missing one
    follows from ``n`` and ``m``. With neither, each dimension is split
    near-square: ``n1`` is the largest divisor of ``n`` not above
    ``sqrt(n)``, ``n2 = n / n1`` (likewise ``m1``, ``m2``), e.g.
    ``800 = 25 x 32``, ``200 = 10 x 20``; a prime dimension gives
    ``1 x p``.

    `from_dense` takes the nearest Kronecker product in Frobenius norm
    (Van Loan and Pitsianis): the rank-``r`` truncated SVD of the
    rearrangement ``R[(i1, j1), (i2, j2)] = W[i1 n2 + i2, j1 m2 + j2]``,
    singular values split evenly between ``A`` and ``B``.

    On the compiled op (`kernel_stages`) it is two shuffling block stages,
    ``B`` first: ``n1`` copies of ``B`` (all terms side by side) act on the
    ``n1`` input groups, the shuffle gathers each output column ``j2`` of
    every group, then ``m2`` copies of the stacked ``A`` map them to the
    ``m1`` outputs and the last shuffle puts output ``j1 m2 + j2`` in
    place: ``r n1 m2 (n2 + m1)`` multiply-adds, the "B first" count. As a
    recurrent product the last shuffle needs ``m2`` to divide the units;
    otherwise the layer runs it on stock TF ops.

    Args:
        a_shape: ``(n1, m1)`` or ``None``.
        b_shape: ``(n2, m2)`` or ``None``.
        terms: ``r``, the number of Kronecker products summed (default 1).
    """

    spec_name = "kronecker"

    def __init__(self, a_shape=None, b_shape=None, terms=1):
        super().__init__(
            a_shape=_shape_pair("a_shape", a_shape, "Kronecker"),
            b_shape=_shape_pair("b_shape", b_shape, "Kronecker"),
            terms=_positive_int("terms", terms, "Kronecker"),
        )

    def describe(self):
        """``Kronecker(a_shape=(4, 8))``; ``terms`` shown when not 1."""
        args = ", ".join(
            f"{k}={v}" for k, v in self.get_config().items()
            if not (k == "terms" and v == 1)
        )
        return f"Kronecker({args})" if args else "Kronecker"

    def factors(self, n, m):
        """``((n1, m1), (n2, m2))`` of an ``n -> m`` product."""
        self.check(n, m)
        return self._factors(n, m)

    def _factors(self, n, m):
        if self.a_shape is None and self.b_shape is None:
            (n1, n2), (m1, m2) = _factor_pair(n), _factor_pair(m)
            return (n1, m1), (n2, m2)
        if self.a_shape is not None:
            n1, m1 = self.a_shape
            return (n1, m1), self.b_shape or (n // n1, m // m1)
        n2, m2 = self.b_shape
        return (n // n2, m // m2), (n2, m2)

    def check(self, n, m):
        (n1, m1), (n2, m2) = self._factors(n, m)
        if n1 * n2 != n or m1 * m2 != m:
            self._fail(
                n, m,
                f"A [n1, m1] and B [n2, m2] with n1 n2 = n = {n} and "
                f"m1 m2 = m = {m}",
                f"a_shape (n1, m1) with n1 in {_divisors(n)} and m1 in "
                f"{_divisors(m)}, b_shape = (n / n1, m / m1)",
            )
        if self.terms > min(n1 * m1, n2 * m2):
            self._fail(
                n, m, f"terms <= min(n1 m1, n2 m2) = {min(n1 * m1, n2 * m2)}",
                f"terms in 1..{min(n1 * m1, n2 * m2)}",
            )

    @staticmethod
    def _b_first(n1, m1, n2, m2):
        return n1 * m2 * (n2 + m1) <= m1 * n2 * (n1 + m2)

    def cost(self, n, m):
        (n1, m1), (n2, m2) = self._factors(n, m)
        r = self.terms
        macs = r * min(n1 * m2 * (n2 + m1), m1 * n2 * (n1 + m2))
        return r * (n1 * m1 + n2 * m2), macs

    def weight_shapes(self, n, m):
        (n1, m1), (n2, m2) = self._factors(n, m)
        return {"a": (self.terms, n1, m1), "b": (self.terms, n2, m2)}

    def product(self, x, w):
        a, b = w["a"], w["b"]
        r, n1, m1 = a.shape
        _, n2, m2 = b.shape
        lead = ops.shape(x)[:-1]
        if self._b_first(n1, m1, n2, m2):
            # [N n1, n2] @ [n2, r m2] -> [N, n1, r, m2] -> [N m2, r n1]
            b_cat = ops.reshape(ops.transpose(b, (1, 0, 2)), (n2, r * m2))
            z = ops.matmul(ops.reshape(x, (-1, n2)), b_cat)
            z = ops.transpose(ops.reshape(z, (-1, n1, r, m2)), (0, 3, 2, 1))
            y = ops.matmul(ops.reshape(z, (-1, r * n1)),
                           ops.reshape(a, (r * n1, m1)))
            y = ops.transpose(ops.reshape(y, (-1, m2, m1)), (0, 2, 1))
        else:
            # [N n2, n1] @ [n1, r m1] -> [N, n2, r, m1] -> [N m1, r n2]
            xt = ops.transpose(ops.reshape(x, (-1, n1, n2)), (0, 2, 1))
            a_cat = ops.reshape(ops.transpose(a, (1, 0, 2)), (n1, r * m1))
            z = ops.matmul(ops.reshape(xt, (-1, n1)), a_cat)
            z = ops.transpose(ops.reshape(z, (-1, n2, r, m1)), (0, 3, 2, 1))
            y = ops.matmul(ops.reshape(z, (-1, r * n2)),
                           ops.reshape(b, (r * n2, m2)))
        return ops.reshape(y, (*lead, m1 * m2))

    def dense_from_arrays(self, arrays):
        return sum(np.kron(a, b) for a, b in zip(arrays["a"], arrays["b"]))

    def kernel_stages(self, w):
        a, b = w["a"], w["b"]
        r, n1, m1 = a.shape
        _, n2, m2 = b.shape
        # Column j2 * r + t of b_cat is term t's column j2 of B, so that
        # after the shuffle each group j2 holds (term, i1) in A's order.
        b_cat = ops.reshape(ops.transpose(b, (1, 2, 0)), (n2, m2 * r))
        a_stack = ops.reshape(a, (r * n1, m1))
        return [
            _stage(ops.tile(b_cat[None], (n1, 1, 1)), shuffle=True),
            _stage(ops.tile(a_stack[None], (m2, 1, 1)), shuffle=True),
        ]

    def arrays_from_dense(self, w):
        n, m = w.shape
        (n1, m1), (n2, m2) = self._factors(n, m)
        r = self.terms
        rearranged = (w.astype("float64").reshape(n1, n2, m1, m2)
                      .transpose(0, 2, 1, 3).reshape(n1 * m1, n2 * m2))
        u, s, vt = np.linalg.svd(rearranged, full_matrices=False)
        root = np.sqrt(s[:r])
        a = (u[:, :r] * root).T.reshape(r, n1, m1)
        b = (root[:, None] * vt[:r]).reshape(r, n2, m2)
        return {"a": a, "b": b}


def _dense_rows(n, fraction):
    """``round(fraction * n)``, halves up."""
    return int(math.floor(fraction * n + 0.5))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class HMD(Scheme):
    """Hybrid matrix decomposition: some rows of ``W`` dense, the rest low
    rank.

    The first ``n_d = round(dense_rows * n)`` input rows of ``W`` [n, m]
    (halves rounded up) are kept as a dense ``[n_d, m]`` block ``D``; the
    other ``n - n_d`` rows are ``U V`` with ``U`` [n - n_d, k] and ``V``
    [k, m]: ``y = x[:n_d] D + (x[n_d:] U) V``. Params = MACs =
    ``n_d m + (n - n_d) k + k m``. (Thakker et al.'s HMD splits the rows of
    the paper's ``A = W^T``, i.e. the outputs; splitting the inputs is the
    same construction on the other side, and adds the two parts instead of
    concatenating them.) `from_dense` copies the dense rows and takes the
    truncated SVD of the rest (singular values split evenly). The Doping
    paper's LMF is `LowRank`. On the compiled op (`kernel_stages`) it is
    two dense stages, ``x [[I, 0], [0, U]]`` (the dense rows pass through
    unchanged beside ``x_r U``) then ``[[D], [V]]``: ``n (n_d + k) +
    (n_d + k) m`` multiply-adds, ``n_d (n + k)`` more than `cost`
    counts (the identity block and its zero neighbours).

    Args:
        rank: ``k``, the rank of the low-rank rows
            (``k <= min(n - n_d, m)``).
        dense_rows: fraction of the input rows kept dense, in (0, 1);
            ``n_d`` must come out between 1 and ``n - 1``.
    """

    spec_name = "hmd"

    def __init__(self, rank, dense_rows=0.5):
        rank = _positive_int("rank", rank, "HMD")
        if (isinstance(dense_rows, bool)
                or not isinstance(dense_rows, (int, float, np.number))
                or not 0.0 < float(dense_rows) < 1.0):
            raise ValueError(
                "HMD: `dense_rows` must be a fraction in (0, 1) of the input "
                f"rows kept dense. Received: dense_rows={dense_rows!r}"
            )
        super().__init__(rank=rank, dense_rows=float(dense_rows))

    def split(self, n):
        """``n_d``, the number of dense input rows of an ``n -> m``
        product."""
        return _dense_rows(n, self.dense_rows)

    def check(self, n, m):
        nd = self.split(n)
        if not 1 <= nd <= n - 1:
            self._fail(
                n, m,
                f"between 1 and n - 1 = {n - 1} dense rows (dense_rows = "
                f"{self.dense_rows} gives {nd})",
                f"dense_rows in [{0.5 / n:.3g}, {1 - 0.5 / n:.3g})"
                if n > 1 else "none (n = 1)",
            )
        if self.rank > min(n - nd, m):
            self._fail(
                n, m,
                f"rank <= min(n - n_d, m) = {min(n - nd, m)} (n_d = {nd} "
                f"dense rows)",
                f"rank in 1..{min(n - nd, m)}",
            )

    def cost(self, n, m):
        nd, k = self.split(n), self.rank
        c = nd * m + (n - nd) * k + k * m
        return c, c

    def weight_shapes(self, n, m):
        nd, k = self.split(n), self.rank
        return {"dense": (nd, m), "u": (n - nd, k), "v": (k, m)}

    def product(self, x, w):
        nd = w["dense"].shape[0]
        return (ops.matmul(x[..., :nd], w["dense"])
                + ops.matmul(ops.matmul(x[..., nd:], w["u"]), w["v"]))

    def dense_from_arrays(self, arrays):
        return np.concatenate(
            [arrays["dense"], arrays["u"] @ arrays["v"]], axis=0)

    def kernel_stages(self, w):
        dense, u, v = w["dense"], w["u"], w["v"]
        nd, (nr, k) = dense.shape[0], u.shape
        first = ops.concatenate([
            ops.concatenate([ops.eye(nd, dtype=u.dtype),
                             ops.zeros((nd, k), u.dtype)], axis=1),
            ops.concatenate([ops.zeros((nr, nd), u.dtype), u], axis=1),
        ], axis=0)
        return [_dense_stage(first),
                _dense_stage(ops.concatenate([dense, v], axis=0))]

    def arrays_from_data(self, w, xtx, xty, ridge=1e-6):
        """Alternating least squares from `arrays_from_dense`.

        With the rows split as ``X = [X_d, X_r]`` (dense and low-rank
        inputs), ``ALS_SWEEPS`` sweeps, keeping the best: the dense rows
        ``D`` by least squares given ``U V``, then ``U V`` by the
        activation-aware SVD (`LowRank.arrays_from_data`) of what ``X_d D``
        leaves unexplained.
        """
        xtx = np.asarray(xtx, "float64")
        xty = np.asarray(xty, "float64")
        nd = self.split(w.shape[0])
        start = self.arrays_from_dense(w)
        low = np.asarray(start["u"], "float64") @ start["v"]
        c_dd = _ridged(xtx[:nd, :nd], ridge)
        best, best_obj = start, _objective(
            xtx, xty, self.dense_from_arrays(start).astype("float64"))
        for _ in range(ALS_SWEEPS):
            dense = _solve(c_dd, xty[:nd] - xtx[:nd, nd:] @ low)
            u, v = _whitened_low_rank(
                xtx[nd:, nd:], xty[nd:] - xtx[nd:, :nd] @ dense, self.rank,
                ridge)
            low = u @ v
            arrays = {"dense": dense, "u": u, "v": v}
            obj = _objective(xtx, xty, self.dense_from_arrays(arrays))
            if obj < best_obj:
                best, best_obj = arrays, obj
        return best

    def arrays_from_dense(self, w):
        nd, k = self.split(w.shape[0]), self.rank
        u, s, vt = np.linalg.svd(w[nd:].astype("float64"), full_matrices=False)
        root = np.sqrt(s[:k])
        return {"dense": w[:nd], "u": u[:, :k] * root,
                "v": root[:, None] * vt[:k]}


def registry():
    """``{spec name: Scheme class}`` of every registered scheme."""
    return dict(Scheme._registry)


def _spec_key(name):
    return name.strip().lower().replace("_", "").replace("-", "")


def _spec_value(text):
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    parts = text.lower().split("x")
    if len(parts) > 1 and all(p.strip().isdigit() for p in parts):
        return tuple(int(p) for p in parts)
    raise ValueError(
        f"scheme arguments are integers, decimals or shapes such as 4x8; "
        f"received {text!r}") from None


def from_spec(spec):
    """A `Scheme` from ``name[:args]`` text, the grammar of the CLI.

    ``name`` is a registered ``spec_name`` (underscores optional:
    ``lgp_shuffle`` or ``lgpshuffle``); ``args`` are the constructor's
    arguments (integers, decimals, or shapes written ``4x8``), positional
    or ``key=value``, separated by commas: ``dense``, ``low_rank:4``,
    ``low_rank:rank=16``, ``lgp_shuffle:10``, ``lgp_dense:4``,
    ``low_rank_lgp:10,10,2``, ``kronecker``, ``kronecker:a_shape=4x8``,
    ``hmd:8,dense_rows=0.25``. `keras_antman.doping.Doped` has no spec: its
    argument is another scheme, which this grammar cannot nest.

    Raises:
        ValueError: unknown name or arguments the scheme rejects; the
            message lists the valid names.
    """
    name, _, args = str(spec).partition(":")
    by_key = {_spec_key(k): cls for k, cls in Scheme._registry.items()}
    cls = by_key.get(_spec_key(name))
    if cls is None:
        raise ValueError(
            f"Unknown scheme {name.strip()!r} in {spec!r}; expected one of "
            f"{sorted(Scheme._registry)}, as name[:args], e.g. "
            f"'lgp_shuffle:10' or 'low_rank_lgp:10,10,2'."
        )
    positional, keywords = [], {}
    for part in filter(None, (p.strip() for p in args.split(","))):
        key, eq, value = part.partition("=")
        if eq:
            keywords[key.strip()] = _spec_value(value.strip())
        else:
            positional.append(_spec_value(part))
    try:
        return cls(*positional, **keywords)
    except TypeError as e:
        raise ValueError(f"Bad arguments in scheme spec {spec!r}: {e}") \
            from None


def get(identifier):
    """A `Scheme` from an instance, a serialized config or a spec string.

    Args:
        identifier: a `Scheme`, a dict made by
            ``keras.saving.serialize_keras_object``, spec text such as
            ``"dense"`` or ``"lgp_shuffle:10"`` (see `from_spec`), or
            ``None`` (same as ``"dense"``).

    Returns:
        A `Scheme` instance.

    Raises:
        ValueError: for anything else.
    """
    if identifier is None:
        return Dense()
    if isinstance(identifier, Scheme):
        return identifier
    if isinstance(identifier, str):
        try:
            return from_spec(identifier)
        except ValueError as e:
            raise ValueError(
                f"Expected a keras_antman scheme (e.g. LGPShuffle(10) or "
                f"'lgp_shuffle:10'). {e}"
            ) from None
    if isinstance(identifier, dict):
        try:
            # By class name too: tf_keras's H5 loading looks them up so.
            obj = keras.saving.deserialize_keras_object(
                identifier, custom_objects={
                    c.__name__: c for c in Scheme._registry.values()})
        except TypeError as e:  # Keras: a class it cannot locate
            name = identifier.get("registered_name") or identifier.get(
                "class_name")
            raise ValueError(
                f"Unknown scheme {name!r} in a saved config. Known: "
                f"{sorted(c.__name__ for c in Scheme._registry.values())}. "
                "A custom Scheme must be imported, and registered with "
                "@keras.saving.register_keras_serializable, before loading."
                f" ({str(e).splitlines()[0][:200]})"
            ) from None
        if isinstance(obj, Scheme):
            return obj
    raise ValueError(
        f"Expected a keras_antman scheme (e.g. LGPShuffle(10)) or 'dense'. "
        f"Received: {identifier!r}"
    )

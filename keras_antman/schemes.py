"""Structured matrices ("schemes") that replace a dense product ``x @ W``.

Every compression method of the package is one `Scheme`: a Keras layer that,
once built for an input size ``n`` and an output size ``m``, *is* a
structured ``n x m`` matrix. It knows its weights, a differentiable forward
pass in plain TF ops, its exact cost (the AntMan paper's Table 1), how to
materialise the equivalent dense matrix (`to_dense`) and how to initialise
itself from a trained dense one (`from_dense`). Cells and layers never ask
which scheme they hold, so new schemes (Kronecker, doped, ...) plug in by
subclassing `Scheme` alone.

Convention: row vectors, ``y = x @ W`` with ``W`` of shape ``[n, m]``. The
paper writes ``A x`` with ``A = W^T`` of shape ``m x n``; its Table 1
formulas are quoted below in its own ``m`` (output) and ``n`` (input).
"""

import math

import keras
import numpy as np
from keras import ops

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
    xg = ops.transpose(ops.reshape(x, (-1, g, a)), (1, 0, 2))
    yg = ops.matmul(xg, blocks)
    yg = ops.transpose(yg, (1, 2, 0) if shuffle else (1, 0, 2))
    return ops.reshape(yg, (*lead, g * b))


class Scheme(keras.layers.Layer):
    """Base class of structured matrices.

    A scheme is created with its hyper-parameters only (``LGPShuffle(10)``)
    and can be given to many layers: each layer calls `bind` to get its own
    copy for its product, which creates weights when built with the input
    size. Built standalone (``LGPShuffle(10, output_dim=1000)``) it is a
    bias-free Keras layer computing ``x @ W``.

    Subclasses implement `weight_shapes`, `product`, `cost`, `dense_of`
    and `weights_from_dense`, and may override `check` to reject
    impossible dimensions.

    Args:
        output_dim: ``m``, the output size; set by `bind` when used inside
            a cell.
        initializer: initializer of every weight (default glorot uniform).
        regularizer: regularizer of every weight.
        constraint: constraint of every weight.
        context: text naming where the product lives (layer and product),
            used in error messages.
    """

    def __init__(
        self,
        output_dim=None,
        initializer="glorot_uniform",
        regularizer=None,
        constraint=None,
        context=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if output_dim is not None and (
            not isinstance(output_dim, int) or output_dim < 1
        ):
            raise ValueError(
                f"`output_dim` must be a positive integer. "
                f"Received: output_dim={output_dim}"
            )
        self.output_dim = output_dim
        self.initializer = keras.initializers.get(initializer)
        self.regularizer = keras.regularizers.get(regularizer)
        self.constraint = keras.constraints.get(constraint)
        self.context = context
        self.input_dim = None
        # Applied position by position, so a sequence mask passes through.
        self.supports_masking = True

    # -- configuration ---------------------------------------------------

    def describe(self):
        """Short text like ``LGPShuffle(groups=10)``."""
        return self.__class__.__name__

    def hyperparameters(self):
        """The scheme's own constructor arguments (a dict)."""
        return {}

    def bind(self, output_dim, name, context=None, **weight_args):
        """A fresh, unbuilt copy of this scheme for one ``n -> m`` product.

        Args:
            output_dim: ``m``.
            name: the copy's layer name (``"input_matrix"``...).
            context: where the product lives, for error messages.
            **weight_args: ``initializer``, ``regularizer``, ``constraint``.

        Returns:
            A new `Scheme` of the same class and hyper-parameters.
        """
        return self.__class__(
            **self.hyperparameters(),
            output_dim=output_dim,
            name=name,
            context=context,
            dtype=self.dtype_policy,
            **weight_args,
        )

    def check(self, n, m):
        """Raise `ValueError` if this scheme cannot map ``n`` to ``m``."""

    def _fail(self, n, m, need, valid):
        where = f"`{self.context}`: " if self.context else ""
        raise ValueError(
            f"{where}{self.describe()} cannot compress a {n} -> {m} "
            f"product: it needs {need}. Valid choices here: {valid}."
        )

    # -- cost (Table 1) ---------------------------------------------------

    def cost(self, n, m):
        """Parameters and multiply-adds of one ``n -> m`` product.

        Returns:
            ``(params, macs)``; for every scheme of the paper they are equal.
        """
        raise NotImplementedError

    def params(self, n=None, m=None):
        """Number of weights for ``n -> m`` (default: the built dims)."""
        return self.cost(*self._dims(n, m))[0]

    def macs(self, n=None, m=None):
        """Multiply-adds of one product ``x @ W`` for one vector ``x``."""
        return self.cost(*self._dims(n, m))[1]

    def _dims(self, n, m):
        n = self.input_dim if n is None else n
        m = self.output_dim if m is None else m
        if n is None or m is None:
            raise ValueError(
                f"{self.describe()} is not built: pass the dims, e.g. "
                f"`.params(n, m)`, or build it first."
            )
        return n, m

    # -- weights ----------------------------------------------------------

    def weight_shapes(self, n, m):
        """``{weight name: shape}`` for an ``n -> m`` product."""
        raise NotImplementedError

    def build(self, input_shape):
        n = int(input_shape[-1])
        if self.output_dim is None:
            raise ValueError(
                f"{self.describe()} needs `output_dim` before it is built; "
                f"pass output_dim=... or use it inside a structured layer."
            )
        self.check(n, self.output_dim)
        self.input_dim = n
        for wname, shape in self.weight_shapes(n, self.output_dim).items():
            var = self.add_weight(
                shape=shape,
                name=wname,
                initializer=self.initializer,
                regularizer=self.regularizer,
                constraint=self.constraint,
            )
            setattr(self, wname, var)
        self.built = True

    def weight_arrays(self):
        """The weights as ``{name: numpy array}``."""
        shapes = self.weight_shapes(self.input_dim, self.output_dim)
        return {k: ops.convert_to_numpy(getattr(self, k)) for k in shapes}

    # -- forward ----------------------------------------------------------

    def call(self, x):
        return self.product(x)

    def product(self, x):
        """``x @ W`` in plain TF ops; ``x`` has shape ``[..., n]``."""
        raise NotImplementedError

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.output_dim)

    # -- dense equivalence ------------------------------------------------

    def dense_of(self, arrays):
        """The dense ``[n, m]`` matrix of the given weight arrays (numpy)."""
        raise NotImplementedError

    def weights_from_dense(self, w):
        """Weight arrays approximating the dense ``w`` [n, m] (numpy)."""
        raise NotImplementedError

    def to_dense(self):
        """The equivalent dense matrix ``W`` [n, m] as a numpy array."""
        self._require_built("to_dense")
        return self.dense_of(self.weight_arrays())

    def from_dense(self, w):
        """Initialise the weights from a trained dense matrix ``w`` [n, m].

        Builds the scheme first if needed (taking ``m`` from ``w``).

        Args:
            w: array of shape ``[n, m]``.

        Returns:
            ``self``.

        Raises:
            ValueError: if ``w`` does not match the built dims.
        """
        w = np.asarray(w, dtype="float32")
        if w.ndim != 2:
            raise ValueError(
                f"`from_dense` expects a 2-D matrix [n, m]; received shape "
                f"{w.shape}."
            )
        if self.output_dim is None:
            self.output_dim = int(w.shape[1])
        if not self.built:
            self.build((None, w.shape[0]))
        if w.shape != (self.input_dim, self.output_dim):
            raise ValueError(
                f"`from_dense` expects a [{self.input_dim}, "
                f"{self.output_dim}] matrix for {self.describe()}; received "
                f"shape {w.shape}."
            )
        for k, v in self.weights_from_dense(w).items():
            getattr(self, k).assign(v.astype("float32"))
        return self

    def _require_built(self, what):
        if not self.built:
            raise ValueError(
                f"{self.describe()} must be built before `{what}()`: call it "
                f"on an input or use `from_dense`."
            )

    def get_config(self):
        config = super().get_config()
        config.update(self.hyperparameters())
        config.update(
            {
                "output_dim": self.output_dim,
                "initializer": keras.initializers.serialize(self.initializer),
                "regularizer": keras.regularizers.serialize(self.regularizer),
                "constraint": keras.constraints.serialize(self.constraint),
                "context": self.context,
            }
        )
        return config


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

    def cost(self, n, m):
        return n * m, n * m

    def weight_shapes(self, n, m):
        return {"kernel": (n, m)}

    def product(self, x):
        return ops.matmul(x, self.kernel)

    def dense_of(self, arrays):
        return arrays["kernel"]

    def weights_from_dense(self, w):
        return {"kernel": w}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LowRank(Scheme):
    """SVD-style low rank ``W ~ U V`` of rank ``k = n / rank_reduction``.

    Table 1 ("SVD"): ``m n / r + n n / r`` weights and MACs. `from_dense`
    takes the truncated SVD and splits the singular values evenly
    (``U = U_k sqrt(S_k)``, ``V = sqrt(S_k) V_k^T``).

    Args:
        rank_reduction: ``r``; the rank is ``n / r`` and ``r`` must divide
            ``n``.
        rank: the rank ``k`` itself (``k <= min(n, m)``), instead of
            ``rank_reduction``; for a cost between those of the divisors of
            ``n`` (e.g. exactly 10x fewer MACs on a 200 -> 800 product:
            ``rank=16``). Give exactly one of the two.
    """

    def __init__(self, rank_reduction=None, rank=None, **kwargs):
        super().__init__(**kwargs)
        if (rank_reduction is None) == (rank is None):
            raise ValueError(
                "LowRank: give exactly one of `rank_reduction` (rank n/r) "
                "and `rank` (the rank itself). Received: "
                f"rank_reduction={rank_reduction!r}, rank={rank!r}"
            )
        self.rank_reduction = self.fixed_rank = None
        if rank is None:
            self.rank_reduction = _positive_int(
                "rank_reduction", rank_reduction, "LowRank"
            )
        else:
            self.fixed_rank = _positive_int("rank", rank, "LowRank")

    def describe(self):
        if self.fixed_rank:
            return f"LowRank(rank={self.fixed_rank})"
        return f"LowRank(rank_reduction={self.rank_reduction})"

    def hyperparameters(self):
        if self.fixed_rank:
            return {"rank": self.fixed_rank}
        return {"rank_reduction": self.rank_reduction}

    def rank(self, n):
        return self.fixed_rank or n // self.rank_reduction

    def check(self, n, m):
        if self.fixed_rank:
            if self.fixed_rank > min(n, m):
                self._fail(
                    n, m, f"rank <= min(n, m) = {min(n, m)}",
                    f"rank in 1..{min(n, m)}",
                )
            return
        valid = [r for r in _divisors(n) if n // r <= m]
        if n % self.rank_reduction or self.rank(n) > m:
            self._fail(
                n, m, f"r to divide n = {n} with rank n/r <= m = {m}",
                f"rank_reduction in {valid}",
            )

    def cost(self, n, m):
        k = self.rank(n)
        return n * k + k * m, n * k + k * m

    def weight_shapes(self, n, m):
        k = self.rank(n)
        return {"u": (n, k), "v": (k, m)}

    def product(self, x):
        return ops.matmul(ops.matmul(x, self.u), self.v)

    def dense_of(self, arrays):
        return arrays["u"] @ arrays["v"]

    def weights_from_dense(self, w):
        k = self.rank(w.shape[0])
        u, s, vt = np.linalg.svd(w.astype("float64"), full_matrices=False)
        root = np.sqrt(s[:k])
        return {"u": u[:, :k] * root, "v": root[:, None] * vt[:k]}


class _Grouped(Scheme):
    """Shared checks of the localized-group-projection schemes."""

    def __init__(self, groups, **kwargs):
        super().__init__(**kwargs)
        self.groups = _positive_int("groups", groups, type(self).__name__)

    def describe(self):
        return f"{type(self).__name__}(groups={self.groups})"

    def hyperparameters(self):
        return {"groups": self.groups}

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

    def cost(self, n, m):
        return n * m // self.groups, n * m // self.groups

    def weight_shapes(self, n, m):
        g = self.groups
        return {"blocks": (g, n // g, m // g)}

    def product(self, x):
        return block_diag_matmul(x, self.blocks, shuffle=True)

    def dense_of(self, arrays):
        w = _block_diag_dense(arrays["blocks"])
        return w[:, _shuffle_columns(w.shape[1], self.groups)]

    def weights_from_dense(self, w):
        perm = _shuffle_columns(w.shape[1], self.groups)
        unshuffled = np.empty_like(w)
        unshuffled[:, perm] = w
        return {"blocks": _block_diag_extract(unshuffled, self.groups)}


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

    @staticmethod
    def mix_first(n, m):
        return n < m

    def cost(self, n, m):
        c = n * m // self.groups + min(n, m) ** 2
        return c, c

    def weight_shapes(self, n, m):
        g = self.groups
        return {"mix": (min(n, m),) * 2, "blocks": (g, n // g, m // g)}

    def product(self, x):
        if self.mix_first(self.input_dim, self.output_dim):
            return block_diag_matmul(ops.matmul(x, self.mix), self.blocks)
        return ops.matmul(block_diag_matmul(x, self.blocks), self.mix)

    def dense_of(self, arrays):
        d = _block_diag_dense(arrays["blocks"])
        n, m = d.shape
        if self.mix_first(n, m):
            return arrays["mix"] @ d
        return d @ arrays["mix"]

    def weights_from_dense(self, w):
        blocks = _block_diag_extract(w, self.groups)
        d = _block_diag_dense(blocks).astype("float64")
        n, m = w.shape
        if self.mix_first(n, m):
            mix = w @ np.linalg.pinv(d)
        else:
            mix = np.linalg.pinv(d) @ w
        return {"mix": mix, "blocks": blocks}


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

    def __init__(self, groups_in, groups_out, rank_reduction, **kwargs):
        super().__init__(**kwargs)
        self.groups_in = _positive_int("groups_in", groups_in, "LowRankLGP")
        self.groups_out = _positive_int("groups_out", groups_out, "LowRankLGP")
        self.rank_reduction = _positive_int(
            "rank_reduction", rank_reduction, "LowRankLGP"
        )

    def describe(self):
        return (
            f"LowRankLGP(groups_in={self.groups_in}, groups_out="
            f"{self.groups_out}, rank_reduction={self.rank_reduction})"
        )

    def hyperparameters(self):
        return {
            "groups_in": self.groups_in,
            "groups_out": self.groups_out,
            "rank_reduction": self.rank_reduction,
        }

    def rank(self, n):
        return n // self.rank_reduction

    def check(self, n, m):
        r = self.rank_reduction
        if n % r or self.rank(n) > m:
            self._fail(
                n, m, f"rank_reduction to divide n = {n} with rank <= m",
                f"rank_reduction in {[d for d in _divisors(n) if n // d <= m]}",
            )
        k = self.rank(n)
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
        k = self.rank(n)
        c = n * k // self.groups_in + k * k + k * m // self.groups_out
        return c, c

    def weight_shapes(self, n, m):
        k, gi, go = self.rank(n), self.groups_in, self.groups_out
        return {
            "in_blocks": (gi, n // gi, k // gi),
            "mix": (k, k),
            "out_blocks": (go, k // go, m // go),
        }

    def product(self, x):
        h = ops.matmul(block_diag_matmul(x, self.in_blocks), self.mix)
        return block_diag_matmul(h, self.out_blocks)

    def dense_of(self, arrays):
        d_in = _block_diag_dense(arrays["in_blocks"])
        d_out = _block_diag_dense(arrays["out_blocks"])
        return d_in @ arrays["mix"] @ d_out

    def weights_from_dense(self, w):
        k = self.rank(w.shape[0])
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


_ALIASES = {
    "dense": Dense,
}


def get(identifier):
    """A `Scheme` from an instance, a serialized config or ``"dense"``.

    Args:
        identifier: a `Scheme`, a dict made by
            ``keras.saving.serialize_keras_object``, ``"dense"`` or ``None``
            (same as ``"dense"``).

    Returns:
        A `Scheme` instance.

    Raises:
        ValueError: for anything else.
    """
    if identifier is None:
        return Dense()
    if isinstance(identifier, Scheme):
        return identifier
    if isinstance(identifier, str) and identifier.lower() in _ALIASES:
        return _ALIASES[identifier.lower()]()
    if isinstance(identifier, dict):
        obj = keras.saving.deserialize_keras_object(identifier)
        if isinstance(obj, Scheme):
            return obj
    raise ValueError(
        f"Expected a keras_antman scheme (e.g. LGPShuffle(10)) or 'dense'. "
        f"Received: {identifier!r}"
    )

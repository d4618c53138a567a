"""NumPy references: the dense matrix of each scheme written out from the
paper's formulas, and LSTM / GRU over dense matrices (Keras conventions)."""

import numpy as np

import keras_antman as am


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def lstm(x, kernel, recurrent_kernel, bias, go_backwards=False, h0=None,
         c0=None):
    """All hidden states [B, T, h] and the final (h, c) of a Keras LSTM
    (initial states h0, c0; None: zeros)."""
    b, t, _ = x.shape
    units = recurrent_kernel.shape[0]
    h = np.zeros((b, units)) if h0 is None else np.asarray(h0, np.float64)
    c = np.zeros((b, units)) if c0 is None else np.asarray(c0, np.float64)
    steps = range(t - 1, -1, -1) if go_backwards else range(t)
    outs = []
    for s in steps:
        z = x[:, s] @ kernel + h @ recurrent_kernel + bias
        i, f, g, o = np.split(z, 4, axis=-1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        outs.append(h)
    return np.stack(outs, 1), h, c


def gru(x, kernel, recurrent_kernel, bias, reset_after=True,
        go_backwards=False, h0=None):
    """All hidden states [B, T, h] and the final h of a Keras GRU (initial
    state h0; None: zeros)."""
    b, t, _ = x.shape
    units = recurrent_kernel.shape[0]
    h = np.zeros((b, units)) if h0 is None else np.asarray(h0, np.float64)
    b_in, b_rec = (bias[0], bias[1]) if reset_after else (bias, 0.0)
    outs = []
    for s in (range(t - 1, -1, -1) if go_backwards else range(t)):
        xz, xr, xh = np.split(x[:, s] @ kernel + b_in, 3, axis=-1)
        if reset_after:
            rz, rr, rh = np.split(h @ recurrent_kernel + b_rec, 3, axis=-1)
            z, r = sigmoid(xz + rz), sigmoid(xr + rr)
            hh = np.tanh(xh + r * rh)
        else:
            rz, rr = np.split(h @ recurrent_kernel[:, : 2 * units], 2, -1)
            z, r = sigmoid(xz + rz), sigmoid(xr + rr)
            hh = np.tanh(xh + (r * h) @ recurrent_kernel[:, 2 * units :])
        h = z * h + (1 - z) * hh
        outs.append(h)
    return np.stack(outs, 1), h


def block_diag(blocks):
    """Dense matrix of blocks [g, a, b], written out independently."""
    g, a, b = blocks.shape
    out = np.zeros((g * a, g * b))
    for i in range(g):
        out[i * a:(i + 1) * a, i * b:(i + 1) * b] = blocks[i]
    return out


def shuffled(w, g):
    """Column j * g + i of the result is column i * (m/g) + j of ``w``."""
    m = w.shape[1]
    out = np.empty_like(w)
    for i in range(g):
        for j in range(m // g):
            out[:, j * g + i] = w[:, i * (m // g) + j]
    return out


def dense(s):
    """The dense matrix of a built `StructuredMatrix` ``s`` from the
    paper's formulas (not the package's `dense_from_arrays`)."""
    w = {k: v.astype("float64") for k, v in s.weight_arrays().items()}
    scheme = s.scheme
    if isinstance(scheme, am.Dense):
        return w["kernel"]
    if isinstance(scheme, am.LowRank):
        return w["u"] @ w["v"]
    if isinstance(scheme, am.LGPShuffle):
        return shuffled(block_diag(w["blocks"]), scheme.groups)
    if isinstance(scheme, am.LGPDense):
        d = block_diag(w["blocks"])
        return w["mix"] @ d if s.input_dim < s.output_dim else d @ w["mix"]
    if isinstance(scheme, am.LowRankLGP):
        return (block_diag(w["in_blocks"]) @ w["mix"]
                @ block_diag(w["out_blocks"]))
    raise AssertionError(scheme)

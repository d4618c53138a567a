"""NumPy reference LSTM and GRU over dense matrices (Keras conventions)."""

import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def lstm(x, kernel, recurrent_kernel, bias, go_backwards=False):
    """All hidden states [B, T, h] and the final (h, c) of a Keras LSTM."""
    b, t, _ = x.shape
    units = recurrent_kernel.shape[0]
    h = np.zeros((b, units))
    c = np.zeros((b, units))
    steps = range(t - 1, -1, -1) if go_backwards else range(t)
    outs = []
    for s in steps:
        z = x[:, s] @ kernel + h @ recurrent_kernel + bias
        i, f, g, o = np.split(z, 4, axis=-1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        outs.append(h)
    return np.stack(outs, 1), h, c


def gru(x, kernel, recurrent_kernel, bias, reset_after=True):
    """All hidden states [B, T, h] of a Keras GRU."""
    b, t, _ = x.shape
    units = recurrent_kernel.shape[0]
    h = np.zeros((b, units))
    b_in, b_rec = (bias[0], bias[1]) if reset_after else (bias, 0.0)
    outs = []
    for s in range(t):
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

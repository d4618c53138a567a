"""The fused NumPy LSTM that the benches time as a dense reference.

Shared by bench/speedup.py and bench/op_peers.py (imported as a sibling
module: the benches run as scripts, so bench/ is on sys.path).
"""

import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_lstm(x, kernel, rec, bias):
    """Fused dense LSTM: one GEMM for all inputs, one GEMV per step."""
    z_all = x[0] @ kernel + bias
    d = rec.shape[0]
    h = np.zeros(d, np.float32)
    c = np.zeros(d, np.float32)
    for t in range(z_all.shape[0]):
        z = z_all[t] + h @ rec
        i, f, o = sigmoid(z[:d]), sigmoid(z[d:2 * d]), sigmoid(z[3 * d:])
        c = f * c + i * np.tanh(z[2 * d:3 * d])
        h = o * np.tanh(c)
    return h

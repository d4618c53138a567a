"""Which path serves unstructured sparsity faster: dense with zeros, or the
op's CSR sparse term (issue 17 item 4, "measured, not assumed").

The shape is the PTB hardware-guided student's (2 x LSTM(64), input 200,
batch 1, 35 steps, 1 thread). Dense: the op with `Dense` schemes (zeros
kept in the weights). CSR: `Doped(LowRank(rank=1))`, whose S runs as the
op's CSR term at the given share of zeros (the rank-1 base adds 2 x 200 +
2 x 256 MACs per product, next to nothing). Both are exported with
`export(kernel="compiled")` (S as constant CSR arrays) and loaded in this
process, then timed interleaved (`hardware.time_round_robin`).

    python bench/gp_sparse_path.py
"""
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

import keras  # noqa: E402

import keras_antman as am  # noqa: E402
from keras_antman import doping  # noqa: E402
from keras_antman import hardware as hw  # noqa: E402
from keras_antman import ops  # noqa: E402

ops.set_num_threads(1)

def model(scheme):
    x = keras.Input((35, 200), batch_size=1)
    h = am.StructuredLSTM(64, input_scheme=scheme, recurrent_scheme=scheme,
                          return_sequences=True, kernel="compiled")(x)
    h = am.StructuredLSTM(64, input_scheme=scheme, recurrent_scheme=scheme,
                          kernel="compiled")(h)
    return keras.Model(x, h)

rng = np.random.default_rng(0)
xin = tf.constant(rng.normal(size=(1, 35, 200)).astype(np.float32))
fns, names = [], []
for name, scheme in [("dense (zeros kept)", am.Dense()),
                     *[(f"CSR term, {z:.0%} zeros",
                        am.Doped(am.LowRank(rank=1), sparsity=z))
                       for z in (0.35, 0.90, 0.98)]]:
    m = model(scheme)
    for v in m.trainable_variables:  # S starts at zero: give it values
        v.assign(0.1 * rng.normal(size=v.shape).astype(np.float32))
    nnz = sum(int(np.count_nonzero(np.asarray(t.mask)))
              for t in doping.doped_matrices(m))
    name = f"{name} (S nnz {nnz})" if nnz else name
    d = tempfile.mkdtemp()
    path = am.export(m, os.path.join(d, "m"), kernel="compiled", batch_size=1)
    loaded = tf.saved_model.load(path)
    f = loaded.signatures["serving_default"]
    f(xin)  # warm
    fns.append(lambda f=f: f(xin))
    names.append(name)
t = hw.time_round_robin(fns, repeats=301, warmup=5)
print(f"CPU: {hw.cpu_model()}, op ISA {ops.isa()}, 1 thread, "
      f"load average {os.getloadavg()[0]:.2f}")
for n, r in zip(names, t):
    print(f"{n:34s} median {r.median_ms:.3f} ms  IQR {r.spread_ms:.3f}")

"""The subset of `keras.ops` keras-antman uses, over TensorFlow, for
tf_keras (which has no ``keras.ops``).

Each function takes the arguments of its `keras.ops` namesake that the
package passes, with the same semantics (NumPy-style names and axes).
"""

import numpy as np
import tensorflow as tf
import tf_keras


def convert_to_tensor(x, dtype=None):
    if isinstance(x, tf.Variable):
        x = x.value()
    return tf.convert_to_tensor(x, dtype=dtype)


def convert_to_numpy(x):
    if isinstance(x, (tf.Tensor, tf.Variable)):
        return x.numpy()
    return np.asarray(x)


def cast(x, dtype):
    return tf.cast(x, dtype)


def shape(x):
    """Static sizes where known, scalar tensors where not (as Keras 3)."""
    x = convert_to_tensor(x)
    static = x.shape.as_list()
    if None not in static:
        return tuple(static)
    dynamic = tf.shape(x)
    return tuple(
        dynamic[i] if s is None else s for i, s in enumerate(static)
    )


def reshape(x, newshape):
    return tf.reshape(x, newshape)


def transpose(x, axes=None):
    return tf.transpose(x, perm=axes)


def expand_dims(x, axis):
    return tf.expand_dims(x, axis)


def matmul(x1, x2):
    return tf.linalg.matmul(x1, x2)


def split(x, indices_or_sections, axis=0):
    return tf.split(x, indices_or_sections, axis=axis)


def concatenate(xs, axis=0):
    return tf.concat(xs, axis=axis)


def stack(xs, axis=0):
    return tf.stack(xs, axis=axis)


def tile(x, repeats):
    return tf.tile(x, repeats)


def take(x, indices, axis=None):
    if axis is None:
        return tf.gather(tf.reshape(x, [-1]), indices)
    return tf.gather(x, indices, axis=axis)


def where(condition, x1, x2):
    return tf.where(condition, x1, x2)


def flip(x, axis=None):
    axis = list(range(len(x.shape))) if axis is None else axis
    return tf.reverse(x, tf.nest.flatten(axis))


def diagonal(x, offset=0, axis1=0, axis2=1):
    """NumPy's ``diagonal``: the diagonal moved to the last axis."""
    x = convert_to_tensor(x)
    rank = len(x.shape)
    axis1, axis2 = axis1 % rank, axis2 % rank
    rest = [i for i in range(rank) if i not in (axis1, axis2)]
    moved = tf.transpose(x, rest + [axis1, axis2])
    return tf.linalg.diag_part(moved, k=offset)


def segment_sum(data, segment_ids, num_segments=None, sorted=False):
    if num_segments is None:
        return tf.math.segment_sum(data, segment_ids)
    return tf.math.unsorted_segment_sum(data, segment_ids, num_segments)


def zeros(shape, dtype=None):
    return tf.zeros(shape, dtype=dtype or tf_keras.backend.floatx())


def ones(shape, dtype=None):
    return tf.ones(shape, dtype=dtype or tf_keras.backend.floatx())


def eye(n, m=None, dtype=None):
    return tf.eye(n, m, dtype=dtype or tf_keras.backend.floatx())


def ones_like(x, dtype=None):
    return tf.ones_like(x, dtype=dtype)


def sum(x, axis=None, keepdims=False):  # noqa: A001 - keras.ops's name
    return tf.reduce_sum(x, axis=axis, keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    return tf.reduce_mean(x, axis=axis, keepdims=keepdims)


def maximum(x1, x2):
    return tf.maximum(x1, x2)


def square(x):
    return tf.square(x)


def sqrt(x):
    return tf.sqrt(x)


def exp(x):
    return tf.exp(x)


def log_softmax(x, axis=-1):
    return tf.nn.log_softmax(x, axis=axis)


def stop_gradient(x):
    return tf.stop_gradient(x)

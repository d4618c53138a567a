"""``keras`` for keras-antman under tf_keras: tf_keras itself, plus the
Keras 3 names the package uses that tf_keras lacks.

Every attribute not defined here is tf_keras's (``keras.layers``,
``keras.Model``, ``keras.saving``, ...). Added: ``ops`` (the subset of
`keras.ops` the package uses, `keras_antman._tf_keras_ops`), ``tree``,
``random`` (``SeedGenerator``, ``dropout``), ``Variable``, ``KerasTensor``
and ``config.floatx``. tf_keras's own modules are not modified.
"""

import types

import tensorflow as tf
import tf_keras
from tf_keras.src import backend as _backend
from tf_keras.src.engine.keras_tensor import KerasTensor

from keras_antman import _tf_keras_ops as ops

__all__ = ["KerasTensor", "Variable", "config", "ops", "random", "tree"]

tree = types.SimpleNamespace(
    flatten=tf.nest.flatten,
    is_nested=tf.nest.is_nested,
    map_structure=tf.nest.map_structure,
)

config = types.SimpleNamespace(floatx=tf_keras.backend.floatx)


class SeedGenerator:
    """`keras.random.SeedGenerator` for tf_keras: tf_keras's own
    `RandomGenerator` (the one its Dropout layers use)."""

    def __init__(self, seed=None, name=None):
        self.seed = seed
        self.generator = _backend.RandomGenerator(seed)


def _dropout(inputs, rate, noise_shape=None, seed=None):
    """`keras.random.dropout`: ``seed`` is a `SeedGenerator` or None."""
    generator = (seed if isinstance(seed, SeedGenerator)
                 else SeedGenerator(seed)).generator
    return generator.dropout(inputs, rate, noise_shape=noise_shape)


random = types.SimpleNamespace(SeedGenerator=SeedGenerator, dropout=_dropout)


def Variable(initializer, shape=None, dtype=None, trainable=True, name=None,
             **kwargs):
    """`keras.Variable`: a `tf.Variable` from a value or an initializer."""
    if callable(initializer):
        initializer = initializer(shape, dtype=dtype or config.floatx())
    return tf.Variable(initializer, dtype=dtype, trainable=trainable,
                       name=name)


def __getattr__(name):
    return getattr(tf_keras, name)

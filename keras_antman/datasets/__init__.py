"""Datasets for language-model compression experiments.

``keras_antman.datasets.ptb``: Penn Treebank, read from a directory or
downloaded with checksums (`load_ptb`, also ``ptb.load_data`` in the style
of ``keras.datasets``), and `bptt_dataset` for truncated backpropagation
through time.
``keras_antman.datasets.text``: token ids and a vocabulary from a user's
text file (word or character level) or an ``.npz`` of ids.
"""

from keras_antman.datasets import ptb
from keras_antman.datasets import text
from keras_antman.datasets.ptb import PTB
from keras_antman.datasets.ptb import PTB_FILES
from keras_antman.datasets.ptb import PTB_SHA256
from keras_antman.datasets.ptb import PTB_URL
from keras_antman.datasets.ptb import bptt_dataset
from keras_antman.datasets.ptb import load_ptb

__all__ = [
    "PTB",
    "PTB_FILES",
    "PTB_SHA256",
    "PTB_URL",
    "bptt_dataset",
    "load_ptb",
    "ptb",
    "text",
]

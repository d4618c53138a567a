"""keras-antman: structured (AntMan) compression of Keras recurrent models.

Importing the package registers its layers and schemes with Keras
serialization and nothing else: no environment variable, no Keras setting,
and the compiled op library is not loaded until a layer first runs on it.
A process that loads a SavedModel exported with ``kernel="compiled"``
calls `keras_antman.ops.load` first, which registers the ops with
TensorFlow.
"""

from keras_antman import calibration
from keras_antman import datasets
from keras_antman import doping
from keras_antman import grow_prune
from keras_antman import hardware
from keras_antman import iss
from keras_antman.compress import compress
from keras_antman.distill import DistillationCoefficients
from keras_antman.distill import DistillationTerm
from keras_antman.distill import Distiller
from keras_antman.distill import LogitsKLDivergence
from keras_antman.distill import LogitsMeanSquaredError
from keras_antman.distill import Perplexity
from keras_antman.distill import calibrate_coefficients
from keras_antman.distill import coefficients_from_losses
from keras_antman.doping import Doped
from keras_antman.doping import DopingSchedule
from keras_antman.export import export
from keras_antman.export import export_tflite
from keras_antman.export import tflite_summary
from keras_antman.layers import StructuredGRU
from keras_antman.layers import StructuredGRUCell
from keras_antman.layers import StructuredLSTM
from keras_antman.layers import StructuredLSTMCell
from keras_antman.report import Report
from keras_antman.report import report
from keras_antman.schemes import HMD
from keras_antman.schemes import Dense
from keras_antman.schemes import Kronecker
from keras_antman.schemes import LGPDense
from keras_antman.schemes import LGPShuffle
from keras_antman.schemes import LowRank
from keras_antman.schemes import LowRankLGP
from keras_antman.schemes import Scheme
from keras_antman.schemes import StructuredMatrix

__version__ = "0.1.0"

__all__ = [
    "Dense",
    "DistillationCoefficients",
    "DistillationTerm",
    "Distiller",
    "Doped",
    "DopingSchedule",
    "HMD",
    "Kronecker",
    "LGPDense",
    "LGPShuffle",
    "LogitsKLDivergence",
    "LogitsMeanSquaredError",
    "LowRank",
    "LowRankLGP",
    "Perplexity",
    "Report",
    "Scheme",
    "StructuredGRU",
    "StructuredGRUCell",
    "StructuredLSTM",
    "StructuredLSTMCell",
    "StructuredMatrix",
    "calibrate_coefficients",
    "calibration",
    "coefficients_from_losses",
    "compress",
    "datasets",
    "doping",
    "export",
    "export_tflite",
    "grow_prune",
    "hardware",
    "iss",
    "report",
    "tflite_summary",
]

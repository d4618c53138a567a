"""keras-antman: structured (AntMan) compression of Keras recurrent models.

Importing the package registers its layers and schemes with Keras
serialization and, when the compiled CPU op library was built for this
TensorFlow, registers its ops with TensorFlow, so that SavedModels exported
with ``kernel="compiled"`` load after ``import keras_antman``. Nothing else
global changes (no environment variables, no Keras settings).
"""

from keras_antman import datasets
from keras_antman import iss
from keras_antman.compress import compress
from keras_antman.distill import DistillationCoefficients
from keras_antman.distill import Distiller
from keras_antman.distill import LogitsKLDivergence
from keras_antman.distill import LogitsMeanSquaredError
from keras_antman.distill import Perplexity
from keras_antman.distill import calibrate_coefficients
from keras_antman.distill import coefficients_from_losses
from keras_antman.export import export
from keras_antman.layers import StructuredGRU
from keras_antman.layers import StructuredGRUCell
from keras_antman.layers import StructuredLSTM
from keras_antman.layers import StructuredLSTMCell
from keras_antman.report import Report
from keras_antman.report import report
from keras_antman.schemes import Dense
from keras_antman.schemes import LGPDense
from keras_antman.schemes import LGPShuffle
from keras_antman.schemes import LowRank
from keras_antman.schemes import LowRankLGP
from keras_antman.schemes import Scheme

__version__ = "0.1.0"

from keras_antman import ops as _ops  # noqa: E402

_ops.is_available()  # registers the ops; warns once if the build is stale

__all__ = [
    "Dense",
    "DistillationCoefficients",
    "Distiller",
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
    "calibrate_coefficients",
    "coefficients_from_losses",
    "compress",
    "datasets",
    "export",
    "iss",
    "report",
]
